//! A product split across the session's threads.
//!
//! tract runs the plan on the calling thread. Natively, `--threads N` also gives tract a rayon
//! pool of N for its own matmuls; ours are most of a token's time (70% of distilgpt2-shape's
//! `ort-dynamic-qint8` file), so a session's step runs [`with_threads`] and its products are cut across
//! that many threads: a decode step (one row) cuts the columns at panel boundaries, so each
//! thread streams its own share of the weights (a matrix-vector product is bound by memory
//! bandwidth: two cores of this machine read 81 MB in 1.5-1.7 ms against 2.1-2.8 ms for one);
//! a short prefill ([`split_columns`]) cuts the columns too, so each thread still reads its own
//! share of the weights, and a long one cuts the rows. The threads are our own helpers
//! ([`team`]): natively OS threads, in the threaded wasm build the Web Workers of
//! wasm-bindgen-rayon's pool (where tract's own ops stay on one thread).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::kernel::{Part, PANEL};

/// Weight bytes times rows below which a product stays on the calling thread: handing work to
/// another thread costs a few microseconds, a 256 KiB product takes ~7 µs at ~35 GB/s.
static MIN_WORK: AtomicUsize = AtomicUsize::new(256 << 10);

/// Sets the size below which products are not split (for the tests: 0 splits every product).
#[doc(hidden)]
pub fn set_min_work(bytes: usize) {
    MIN_WORK.store(bytes, Relaxed);
}

static SPLITS: AtomicUsize = AtomicUsize::new(0);

/// How many products this process has split so far (for the tests).
#[doc(hidden)]
pub fn splits() -> usize {
    SPLITS.load(Relaxed)
}

/// Calls `f(part, out)` on disjoint parts of the `rows x n` row-major output `out` that
/// together cover it: one per thread of the running session ([`with_threads`]), or one part if
/// the product is small or there is one thread. A single row's columns are cut at multiples of
/// `unit` columns (a multiple of [`PANEL`]: the weights' panel, which a kernel computes whole).
/// Parts are independent, so the result does not depend on the split (the tests check each
/// kernel's parts against its whole).
pub fn split<T: Send>(rows: usize, n: usize, weight_bytes: usize, unit: usize, out: &mut [T], f: impl Fn(Part, &mut [T]) + Sync) {
    let threads = if weight_bytes.saturating_mul(rows) >= MIN_WORK.load(Relaxed) { threads() } else { 1 };
    if threads <= 1 {
        return f(Part { rows: 0..rows, panels: 0..n.div_ceil(PANEL) }, &mut out[..rows * n]);
    }
    let parts = cut(rows, n, threads, unit, out);
    if parts.len() == 1 {
        let (p, o) = parts.into_iter().next().unwrap();
        return f(p, o);
    }
    SPLITS.fetch_add(1, Relaxed);
    run_all(threads, parts, &|(p, o)| f(p, o))
}

/// The most rows [`split_columns`] cuts by columns: in a longer prefill the arithmetic outweighs
/// the weights' read, and a cut of uneven columns (SmolLM2's 576: nine panels of 64 for AVX-512
/// VNNI) leaves a thread idle longer than rows do.
const COLUMN_ROWS: usize = 64;

/// [`split`] for a short prefill, where the weights are the larger read: its rows stay together and
/// its columns are cut at multiples of `unit` (as a single row's are), so each thread streams its
/// own share of the weights instead of all of them. `f(part, rows)`: the part's slices of `out`
/// ([`Rows`]). A product of fewer `unit`s than threads, or of more than [`COLUMN_ROWS`] rows, is
/// cut as [`split`] cuts it.
pub fn split_columns<T: Send>(rows: usize, n: usize, weight_bytes: usize, unit: usize, out: &mut [T], f: impl Fn(Part, &mut Rows<T>) + Sync) {
    let threads = if weight_bytes.saturating_mul(rows) >= MIN_WORK.load(Relaxed) { threads() } else { 1 };
    let unit_panels = (unit / PANEL).max(1);
    let units = n.div_ceil(PANEL).div_ceil(unit_panels);
    if threads <= 1 || rows <= 1 || rows > COLUMN_ROWS || units < threads {
        return split(rows, n, weight_bytes, unit, out, |part, o| f(part, &mut Rows::Together(o)));
    }
    let (panels, per) = (n.div_ceil(PANEL), units.div_ceil(threads) * unit_panels);
    let mut parts: Vec<(Part, Vec<&mut [T]>)> = (0..panels.div_ceil(per))
        .map(|i| (Part { rows: 0..rows, panels: i * per..((i + 1) * per).min(panels) }, Vec::with_capacity(rows)))
        .collect();
    for row in out[..rows * n].chunks_mut(n) {
        let mut rest = row;
        for (part, slices) in parts.iter_mut() {
            let (mine, others) = std::mem::take(&mut rest).split_at_mut(part.width(n));
            slices.push(mine);
            rest = others;
        }
    }
    SPLITS.fetch_add(1, Relaxed);
    run_all(threads, parts, &|(part, slices): (Part, Vec<&mut [T]>)| f(part, &mut Rows::Apart(slices)))
}

/// A part's outputs in [`split_columns`]: its rows one after another (a cut by rows, or a single
/// row), or one slice per row (a cut by columns).
pub enum Rows<'a, T> {
    Together(&'a mut [T]),
    Apart(Vec<&'a mut [T]>),
}

impl<T> Rows<'_, T> {
    /// Row `i` of the part: its `width` columns of it.
    pub fn row(&mut self, i: usize, width: usize) -> &mut [T] {
        match self {
            Rows::Together(all) => &mut all[i * width..(i + 1) * width],
            Rows::Apart(rows) => rows[i],
        }
    }
}

/// Calls `f` once on each thread of the running session (the caller's among them) when `bytes`
/// (read, times rows) is at least a quarter of the products' threshold ([`set_min_work`]), else
/// once on the caller; returns when all calls have. For work the calls share out among
/// themselves (attention's heads, fused/attention.rs: a decode step's attention on SmolLM2 reads
/// ~4.6 KB per cached token, so a 32-token context's, tens of µs, is split).
pub fn on_threads(bytes: usize, f: impl Fn() + Sync) {
    let threads = if bytes.saturating_mul(4) >= MIN_WORK.load(Relaxed) { threads() } else { 1 };
    if threads <= 1 {
        return f();
    }
    SPLITS.fetch_add(1, Relaxed);
    run_all(threads, (0..threads).collect(), &|_| f())
}

/// `f(i)` for each `i < parts` on the running session's threads ([`with_threads`]; the caller's
/// among them), each part run by whichever thread claims it first; returns when all have run.
pub fn each_part(parts: usize, f: impl Fn(usize) + Sync) {
    run_all(threads(), (0..parts).collect(), &f)
}

/// `f` on the parts of a cut in `parts`, one after the other (for the kernels' tests).
#[doc(hidden)]
pub fn for_each_part<T>(rows: usize, n: usize, parts: usize, out: &mut [T], f: impl Fn(Part, &mut [T])) {
    cut(rows, n, parts, PANEL, out).into_iter().for_each(|(p, o)| f(p, o))
}

/// At most `parts` parts: a single row is cut at multiples of `unit` columns, several rows by rows.
fn cut<T>(rows: usize, n: usize, parts: usize, unit: usize, out: &mut [T]) -> Vec<(Part, &mut [T])> {
    let panels = n.div_ceil(PANEL);
    let out = &mut out[..rows * n];
    if parts <= 1 || (rows == 1 && panels < 2) {
        return vec![(Part { rows: 0..rows, panels: 0..panels }, out)];
    }
    if rows == 1 {
        let per = panels.div_ceil(parts).next_multiple_of((unit / PANEL).max(1));
        out.chunks_mut(per * PANEL)
            .enumerate()
            .map(|(i, o)| (Part { rows: 0..1, panels: i * per..((i + 1) * per).min(panels) }, o))
            .collect()
    } else {
        let per = rows.div_ceil(parts);
        out.chunks_mut(per * n)
            .enumerate()
            .map(|(i, o)| (Part { rows: i * per..((i + 1) * per).min(rows), panels: 0..panels }, o))
            .collect()
    }
}

thread_local! {
    /// The running session's thread count (see [`with_threads`]).
    static THREADS: Cell<usize> = const { Cell::new(1) };
}

/// Runs `f` (a session's step: tract runs the plan on this thread) with products split across
/// `threads` threads.
pub fn with_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    /// Puts the count back however `f` ends (a panic too, which a wasm caller may survive).
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREADS.set(self.0);
        }
    }
    let _restore = Restore(THREADS.replace(threads.max(1)));
    f()
}

fn threads() -> usize {
    if cfg!(any(not(target_arch = "wasm32"), feature = "threads")) {
        THREADS.get()
    } else {
        1
    }
}

#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
fn run_all<P: Send>(threads: usize, parts: Vec<P>, f: &(impl Fn(P) + Sync)) {
    let slots: Vec<std::sync::Mutex<Option<P>>> = parts.into_iter().map(|p| std::sync::Mutex::new(Some(p))).collect();
    team::run(threads, slots.len(), &|i| {
        if let Some(p) = slots[i].lock().unwrap().take() {
            f(p)
        }
    });
}

#[cfg(not(any(not(target_arch = "wasm32"), feature = "threads")))]
fn run_all<P: Send>(_threads: usize, parts: Vec<P>, f: &(impl Fn(P) + Sync)) {
    parts.into_iter().for_each(f)
}

#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
pub mod team;

#[cfg(test)]
mod tests {
    use super::*;

    /// A short prefill's columns are cut (a product of fewer units than threads: its rows), a
    /// long one's rows, a single row's columns; each element reaches one part, once, as its own
    /// row and column.
    #[test]
    fn split_columns_gives_each_element_to_one_part() {
        set_min_work(0);
        const FREE: (usize, usize) = (usize::MAX, usize::MAX);
        for (rows, n, unit, by_columns) in [(32, 1536, 64, true), (32, 576, 64, true), (32, 64, 64, false), (65, 64, 4, false), (1, 64, 4, true)] {
            let mut out = vec![FREE; rows * n];
            let parts = std::sync::Mutex::new(vec![]);
            with_threads(2, || {
                split_columns(rows, n, 1, unit, &mut out, |part, ys| {
                    let (c0, width) = (part.panels.start * PANEL, part.width(n));
                    if let Rows::Apart(apart) = ys {
                        assert_eq!(apart.len(), part.rows.len());
                    }
                    for (i, r) in part.rows.clone().enumerate() {
                        let y = ys.row(i, width);
                        assert_eq!(y.len(), width);
                        for (j, v) in y.iter_mut().enumerate() {
                            assert_eq!(*v, FREE, "({r}, {}) written twice", c0 + j);
                            *v = (r, c0 + j);
                        }
                    }
                    parts.lock().unwrap().push(part);
                })
            });
            let parts = parts.into_inner().unwrap();
            assert_eq!(parts.len(), 2, "{rows} x {n}");
            assert_eq!(parts.iter().all(|p| p.rows == (0..rows)), by_columns, "{rows} x {n}");
            assert!(out.iter().enumerate().all(|(i, &v)| v == (i / n, i % n)), "{rows} x {n}");
        }
    }
}
