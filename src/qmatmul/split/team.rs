//! Helper threads that spin between products.
//!
//! A decode step runs ~25 (distilgpt2-shape) to ~120 (SmolLM2 `q8b32`) products of 10-1,500 µs each,
//! with the rest of the graph in between on the calling thread. Handing each product to a rayon
//! pool made 2 threads slower than 1 (4.9-5.3 against 4.1-4.2 ms/token on distilgpt2-shape's
//! `ort-dynamic-qint8` file, measured alternately): `install` from outside the pool parks the caller and
//! wakes a sleeping worker, then the other way round, for every product. Here the caller runs
//! part 0 itself, and helpers that spin for a while after each part (then park) take the others
//! as soon as they see the job (3.1-3.5 ms/token on the same file).
//!
//! Parts are claimed through one atomic word (`Team::work`), by the helpers and by the caller
//! alike: a helper late to wake never holds up a part nobody has started.
//!
//! One team per thread count, made on first use; its helpers live as long as the process
//! (parked when idle). One caller at a time: a second caller that finds the team busy runs its
//! parts itself. Natively the helpers are OS threads. In the threaded wasm build they are the
//! Web Workers of rayon's global pool (`startThreads(n - 1)` in wasm.rs, which calls
//! wasm-bindgen-rayon's `initThreadPool`): each
//! helper is a rayon job that never ends, so nothing else may use that pool (tract's executor
//! stays single-threaded there, graph.rs). The same hand-off through rayon's own jobs measured
//! 7-8 ms/token against 4.5-4.9 on one thread (Chromium, distilgpt2-shape `ort-dynamic-qint8`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use crate::clock::now_ms;

/// How long (ms) an idle helper spins before it parks: longer than the gaps between a token's
/// products (tens of µs), short enough not to burn a core after the last token.
const SPIN_MS: f64 = 2.0;

/// The work of one call, on the caller's stack: `f(i)` for part `i`.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
}

/// A job's claim word: (epoch << 32) | (next part << 16) | parts. Whoever moves `next` up by
/// one (a compare-and-swap on the whole word, so a stale epoch never succeeds) owns that part.
fn word(epoch: u64, next: u64, parts: u64) -> u64 {
    (epoch << 32) | (next << 16) | parts
}

fn unpack(w: u64) -> (u64, u64, u64) {
    (w >> 32, (w >> 16) & 0xffff, w & 0xffff)
}

struct Team {
    helpers: usize,
    /// The current job's claim word ([`word`]); a new epoch is a new job.
    claim: AtomicU64,
    job: AtomicPtr<Job>,
    /// Parts of the current job finished.
    done: AtomicUsize,
    panicked: AtomicBool,
    /// Held by the caller for the whole of a job.
    busy: Mutex<()>,
    sleeping: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

impl Team {
    /// Claims and runs parts of the job of `epoch` until none is left (or that job is over).
    fn work(&self, epoch: u64) {
        let mut w = self.claim.load(SeqCst);
        loop {
            let (e, next, parts) = unpack(w);
            if e != epoch || next >= parts {
                return;
            }
            match self.claim.compare_exchange(w, word(e, next + 1, parts), SeqCst, SeqCst) {
                Ok(_) => {
                    // SAFETY: part `next` of the current job is ours and unfinished, so its
                    // caller is still waiting in `run`: the job and what `f` borrows are alive.
                    let f = unsafe { &*(*self.job.load(SeqCst)).f };
                    if catch_unwind(AssertUnwindSafe(|| f(next as usize))).is_err() {
                        self.panicked.store(true, SeqCst);
                    }
                    self.done.fetch_add(1, SeqCst);
                    w = self.claim.load(SeqCst);
                }
                Err(now) => w = now,
            }
        }
    }
}

static TEAMS: Mutex<Vec<Arc<Team>>> = Mutex::new(vec![]);

fn team(threads: usize) -> Arc<Team> {
    let mut teams = TEAMS.lock().unwrap();
    if let Some(t) = teams.iter().find(|t| t.helpers + 1 == threads) {
        return t.clone();
    }
    let team = Arc::new(Team {
        helpers: threads - 1,
        claim: AtomicU64::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        busy: Mutex::new(()),
        sleeping: AtomicUsize::new(0),
        park: Mutex::new(()),
        wake: Condvar::new(),
    });
    for i in 1..threads {
        let t = team.clone();
        spawn(format!("wasmlm-{threads}-{i}"), move || helper(&t));
    }
    teams.push(team.clone());
    team
}

#[cfg(not(target_arch = "wasm32"))]
fn spawn(name: String, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().name(name).spawn(f).expect("spawning a helper thread");
}

#[cfg(target_arch = "wasm32")]
fn spawn(_name: String, f: impl FnOnce() + Send + 'static) {
    rayon::spawn(f)
}

/// Workers in rayon's global pool, as started by the page (`startThreads`, src/wasm.rs): rayon
/// itself reports 1 for a pool nobody started (it falls back to the calling thread, on which a
/// helper job would never run).
#[cfg(target_arch = "wasm32")]
pub static POOL_WORKERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a team of `threads` can have its helpers: in wasm, from the workers of rayon's pool
/// that no team has taken yet.
#[cfg(target_arch = "wasm32")]
pub fn helpers_available(threads: usize) -> Result<(), String> {
    let teams = TEAMS.lock().unwrap();
    if teams.iter().any(|t| t.helpers + 1 == threads) {
        return Ok(());
    }
    let taken: usize = teams.iter().map(|t| t.helpers).sum();
    let free = POOL_WORKERS.load(SeqCst).saturating_sub(taken);
    if free + 1 < threads {
        return Err(format!("{threads} threads need {} free WebAssembly workers (startThreads), there are {free}",
                           threads - 1));
    }
    Ok(())
}

fn helper(team: &Team) {
    let mut seen = 0;
    loop {
        let since = now_ms();
        let mut spins = 0u32;
        loop {
            let e = unpack(team.claim.load(SeqCst)).0;
            if e != seen {
                seen = e;
                break;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && now_ms() - since > SPIN_MS {
                let mut guard = team.park.lock().unwrap();
                team.sleeping.fetch_add(1, SeqCst);
                while unpack(team.claim.load(SeqCst)).0 == seen {
                    guard = team.wake.wait(guard).unwrap();
                }
                team.sleeping.fetch_sub(1, SeqCst);
            }
        }
        team.work(seen);
    }
}

/// `f(i)` for every `i < parts` (at most `threads`) on the team of the session's `threads` (the
/// caller's thread among them) when it is free, else on the caller alone. Returns once all are
/// done. Parts are claimed, not assigned: the caller takes any part no helper has started, so
/// a helper that is parked or descheduled (the page's own thread wanting the core) delays the
/// product by nothing but the part it may be running. The team is the session's whatever the
/// number of parts: a product cut in fewer parts must not make a team of another size, which
/// in wasm would queue its helpers on a pool whose workers are all taken.
pub fn run(threads: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let inline = || (0..parts).for_each(f);
    if parts <= 1 || threads < parts || parts > 0xffff {
        return inline();
    }
    let team = team(threads);
    let Ok(_busy) = team.busy.try_lock() else { return inline() };
    // SAFETY: only the pointer's lifetime is erased; `f` outlives the job: this function
    // returns only once every part is done, and a part is only run after being claimed.
    let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    let mut job = Job { f };
    team.job.store(&mut job, SeqCst);
    team.done.store(0, SeqCst);
    // the epoch after the last one, skipping 0 (a helper's first `seen`)
    let epoch = (unpack(team.claim.load(SeqCst)).0 + 1) & 0xffff_ffff;
    let epoch = epoch.max(1);
    team.claim.store(word(epoch, 0, parts as u64), SeqCst);
    if team.sleeping.load(SeqCst) > 0 {
        let _guard = team.park.lock().unwrap();
        team.wake.notify_all();
    }
    team.work(epoch);
    while team.done.load(SeqCst) != parts {
        std::hint::spin_loop();
    }
    if team.panicked.swap(false, SeqCst) {
        panic!("a product's part panicked");
    }
}
