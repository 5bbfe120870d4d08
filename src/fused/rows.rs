//! The attention op's loops for a few query rows against a long cache (decode, and a short turn
//! after a long conversation): the scores of one query row against every key, the softmax of a
//! row, and the weighted sum of the values. [`super::matmul::product`] takes its products of
//! fewer than 16 rows a row at a time with the same two loops.
//!
//! The portable loops define the results: eight running sums of a dot product, and their sum
//! `((0+4)+(1+5))+((2+6)+(3+7))`; the values' sums in key order; `exp` as [`exp_le0`]. Compilers
//! do not vectorize them well (a decode step after a 1,024-token past spent ~8.6 of its 24 ms in
//! them in Node, `--cpu-prof`; natively LLVM left the softmax's `exp` scalar and each dot
//! product's sum of lanes in shuffles), so wasm32's SIMD128 and x86_64's SSE2 run them as one
//! definition written on four lanes ([`lanes`]), in the same operations and order: the same
//! bits, checked by [`check`] natively and in the wasm tests. No FMA: relaxed SIMD's `madd` may
//! or may not fuse, by machine.

/// `out[j] = q · k[j]` for each row `k[j]` (of `q.len()` values) of `k`.
#[inline(always)]
pub fn scores(q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = q.len();
    debug_assert_eq!(k.len(), out.len() * d);
    #[cfg(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64"))]
    if d.is_multiple_of(8) && d > 0 {
        // SAFETY: k holds out.len() rows of d, d a multiple of 8 (checked above).
        return unsafe { lanes::scores::<lanes::Native>(q, k, out) };
    }
    scores_portable(q, k, out)
}

#[inline(always)]
fn scores_portable(q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = q.len();
    if d == 0 {
        return out.fill(0.0);
    }
    for (row, o) in k.chunks_exact(d).zip(out) {
        *o = dot(q, row);
    }
}

/// `y = Σ p[j] v[j]` over the rows `v[j]` (of `y.len()` values) of `v`, summed in `j`'s order.
#[inline(always)]
pub fn mix(p: &[f32], v: &[f32], y: &mut [f32]) {
    debug_assert_eq!(v.len(), p.len() * y.len());
    y.fill(0.0);
    mix_into(p, v, y.len(), y)
}

/// `y += Σ p[j] v[j]`, each element's sum continued in `j`'s order, over rows `v[j]` that start
/// `stride` values apart (`y.len()` values each): a sum taken block of rows by block of rows
/// this way, from zeros, has the bits of [`mix`]'s over all of them.
#[inline(always)]
pub fn mix_into(p: &[f32], v: &[f32], stride: usize, y: &mut [f32]) {
    let w = y.len();
    assert!(w <= stride && (p.is_empty() || v.len() >= (p.len() - 1) * stride + w), "mix of {} rows of {w} every {stride} from {} values", p.len(), v.len());
    #[cfg(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64"))]
    if w.is_multiple_of(4) {
        // SAFETY: v holds p.len() rows of w values every `stride` (checked above), w a multiple
        // of 4.
        return unsafe { lanes::mix_into::<lanes::Native>(p, v, stride, y) };
    }
    mix_portable(p, v, stride, y)
}

#[inline(always)]
fn mix_portable(p: &[f32], v: &[f32], stride: usize, y: &mut [f32]) {
    let w = y.len();
    if w == 0 {
        return;
    }
    for (j, &x) in p.iter().enumerate() {
        for (y, &v) in y.iter_mut().zip(&v[j * stride..][..w]) {
            *y += x * v;
        }
    }
}

/// `C = A B` for a prefill's attention in the wasm builds, `A` (m × k) and `C` (m × n)
/// row-major, `B` (k × n) row-major or, with `trans_b`, (n × k) read as its transpose: each
/// element summed over k in order, a multiply then an add (as [`tiles_portable`]). SIMD128 takes
/// four rows by eight columns at a time: attention took ~20% less time than on matrixmultiply's
/// portable kernel in a 20-token turn after 1,000 tokens (Node; docs/decisions.md).
#[inline(always)]
pub fn tiles(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, trans_b: bool, c: &mut [f32]) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    // SAFETY: the slices hold the shapes (checked by the caller, debug-asserted above).
    unsafe {
        simd::tiles(a, m, k, b, n, trans_b, c)
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    tiles_portable(a, m, k, b, n, trans_b, c)
}

/// [`tiles`] as the textbook loop.
pub fn tiles_portable(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, trans_b: bool, c: &mut [f32]) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for kk in 0..k {
                s += a[i * k + kk] * if trans_b { b[j * k + kk] } else { b[kk * n + j] };
            }
            c[i * n + j] = s;
        }
    }
}

/// `x[j] = x[j] * scale + mask[j]` (each rounded to f32, as the graph's `Mul` and `Add`).
pub fn scale_and_mask(x: &mut [f32], scale: f32, mask: &[f32]) {
    for (x, &m) in x.iter_mut().zip(mask) {
        *x = *x * scale + m;
    }
}

/// `x = exp(x - max) / Σ exp(x - max)` in place, on eight lanes; exp by [`exp_le0`].
pub fn softmax(x: &mut [f32]) {
    #[cfg(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64"))]
    // SAFETY: SIMD128 is enabled in this build; every x86_64 CPU has SSE2.
    unsafe {
        lanes::softmax::<lanes::Native>(x)
    }
    #[cfg(not(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64")))]
    softmax_portable(x)
}

fn softmax_portable(x: &mut [f32]) {
    const L: usize = 8;
    let mut m = [f32::NEG_INFINITY; L];
    let (chunks, tail) = x.as_chunks::<L>();
    for c in chunks {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let max = max_of(tail, &m);
    let mut sum = [0f32; L];
    let (chunks, tail) = x.as_chunks_mut::<L>();
    for c in chunks {
        for i in 0..L {
            c[i] = exp_le0(c[i] - max);
            sum[i] += c[i];
        }
    }
    let mut total = lanes_sum(sum);
    for t in tail {
        *t = exp_le0(*t - max);
        total += *t;
    }
    let r = total.recip();
    for x in x.iter_mut() {
        *x *= r;
    }
}

/// The largest of the tail and the eight lanes' maxima (NaN-blind, as `>`).
fn max_of(tail: &[f32], lanes: &[f32; 8]) -> f32 {
    tail.iter().chain(lanes).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Eight lanes' sum, in the order both the dot product and the softmax use.
#[inline(always)]
fn lanes_sum(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Σ x[i] y[i] over eight running sums (so the compiler keeps them in SIMD lanes), then the
/// tail.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = lanes_sum(acc);
    for (x, y) in xt.iter().zip(yt) {
        s += x * y;
    }
    s
}

const EXP_LO: f32 = -87.0;
const SHIFT: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `exp(x)` for `x <= 0` (softmax's shifted scores), within ~2 ulp: `2ⁿ exp(r)`, with
/// `n = round(x / ln 2)` (by the 1.5·2²³ trick, which vectorizes where `round` would not),
/// `r = x - n ln 2` in two parts (Cody and Waite) and Cephes' `expf` polynomial for `exp(r)`.
/// Below -87 (and at -inf, a masked score) it is 0; NaN stays NaN.
#[inline(always)]
pub fn exp_le0(x: f32) -> f32 {
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p * r + c;
    }
    let e = (p * r) * r + r + 1.0;
    // n as an integer, from t's low bits (t = n + 1.5·2²³ exactly, n in [-126, 0]): no
    // float-to-int conversion, whose saturation kept LLVM from vectorizing the softmax natively
    let n_int = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < EXP_LO { 0.0 } else { e * scale }
}

// the tiles index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> v128 {
        v128_load(p as *const v128)
    }

    /// `R` rows (`a[r]`, one value per step) by eight columns (two vectors at `b`, `b_step`
    /// apart per step), over `k` steps: each of the 8R sums in step order.
    #[inline(always)]
    unsafe fn tile<const R: usize>(a: [*const f32; R], b: *const f32, b_step: usize, k: usize) -> [[v128; 2]; R] {
        let mut acc = [[f32x4_splat(0.0); 2]; R];
        for kk in 0..k {
            let (b0, b1) = (load(b.add(kk * b_step)), load(b.add(kk * b_step + 4)));
            for r in 0..R {
                let x = v128_load32_splat(a[r].add(kk) as *const u32);
                acc[r][0] = f32x4_add(acc[r][0], f32x4_mul(x, b0));
                acc[r][1] = f32x4_add(acc[r][1], f32x4_mul(x, b1));
            }
        }
        acc
    }

    /// [`super::tiles_portable`]'s sums, eight columns at a time: `C[i, j0..j0+8]` from rows of
    /// A (four, then one) by eight columns of B. B's columns are read where they lie (B
    /// row-major) or, for `Bᵀ`, C's transpose is computed instead (rows of B by eight rows of A,
    /// copied as columns), so that the eight values of a step are contiguous either way.
    pub unsafe fn tiles(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, trans_b: bool, c: &mut [f32]) {
        if k == 0 {
            return c[..m * n].fill(0.0);
        }
        if trans_b {
            // Cᵀ (n × m) = B (n × k) · Aᵀ: Aᵀ's columns (A's rows) eight at a time, packed as
            // k steps of eight (zeros past m), B's rows four at a time
            let mut panel = vec![0f32; k * 8];
            let mut i0 = 0;
            while i0 < m {
                let w = (m - i0).min(8);
                for i in 0..w {
                    for kk in 0..k {
                        panel[kk * 8 + i] = a[(i0 + i) * k + kk];
                    }
                }
                for i in w..8 {
                    for kk in 0..k {
                        panel[kk * 8 + i] = 0.0;
                    }
                }
                let put = |c: &mut [f32], j: usize, acc: &[v128; 2]| {
                    let mut lanes = [0f32; 8];
                    v128_store(lanes.as_mut_ptr() as *mut v128, acc[0]);
                    v128_store(lanes.as_mut_ptr().add(4) as *mut v128, acc[1]);
                    for i in 0..w {
                        c[(i0 + i) * n + j] = lanes[i];
                    }
                };
                let mut j = 0;
                while j + 4 <= n {
                    let rows: [*const f32; 4] = std::array::from_fn(|r| b.as_ptr().add((j + r) * k));
                    let acc = tile::<4>(rows, panel.as_ptr(), 8, k);
                    for r in 0..4 {
                        put(c, j + r, &acc[r]);
                    }
                    j += 4;
                }
                while j < n {
                    let acc = tile::<1>([b.as_ptr().add(j * k)], panel.as_ptr(), 8, k);
                    put(c, j, &acc[0]);
                    j += 1;
                }
                i0 += 8;
            }
            return;
        }
        // A's rows four at a time (then one) by B's columns eight at a time; the last columns
        // (n not a multiple of 8) in the textbook loop, which sums in the same order
        let n8 = n / 8 * 8;
        let mut i = 0;
        while i < m {
            let h = if m - i >= 4 { 4 } else { 1 };
            let mut j = 0;
            while j < n8 {
                let bp = b.as_ptr().add(j);
                if h == 4 {
                    let rows: [*const f32; 4] = std::array::from_fn(|r| a.as_ptr().add((i + r) * k));
                    let acc = tile::<4>(rows, bp, n, k);
                    for r in 0..4 {
                        v128_store(c.as_mut_ptr().add((i + r) * n + j) as *mut v128, acc[r][0]);
                        v128_store(c.as_mut_ptr().add((i + r) * n + j + 4) as *mut v128, acc[r][1]);
                    }
                } else {
                    let acc = tile::<1>([a.as_ptr().add(i * k)], bp, n, k);
                    v128_store(c.as_mut_ptr().add(i * n + j) as *mut v128, acc[0][0]);
                    v128_store(c.as_mut_ptr().add(i * n + j + 4) as *mut v128, acc[0][1]);
                }
                j += 8;
            }
            for r in i..i + h {
                for j in n8..n {
                    let mut s = 0f32;
                    for kk in 0..k {
                        s += a[r * k + kk] * b[kk * n + j];
                    }
                    c[r * n + j] = s;
                }
            }
            i += h;
        }
    }
}

/// The portable loops on four lanes, one definition for wasm32's SIMD128 ([`F4`] for `v128`) and
/// x86_64's SSE2 (for `__m128`, which every x86_64 CPU has).
#[cfg(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64"))]
mod lanes {
    use super::{lanes_sum, max_of, EXP_LO, LN2_HI, LN2_LO, POLY, SHIFT};

    /// Four f32 lanes and the operations the loops use, each the scalar one lane by lane.
    pub trait F4: Copy {
        /// # Safety
        /// Four values readable at `p`.
        unsafe fn load(p: *const f32) -> Self;
        /// # Safety
        /// Four values writable at `p`.
        unsafe fn store(self, p: *mut f32);
        fn splat(x: f32) -> Self;
        fn add(self, b: Self) -> Self;
        fn sub(self, b: Self) -> Self;
        fn mul(self, b: Self) -> Self;
        /// `if self < b { b } else { self }` (a NaN in `self` stays).
        fn max(self, b: Self) -> Self;
        /// `2ⁿ` for whole `n` (as floats) within the exponent's range.
        fn pow2(n: Self) -> Self;
        /// `if x < lo { 0 } else { self }`.
        fn zero_below(self, x: Self, lo: Self) -> Self;
        /// The four vectors' lane sums, each `(l0 + l1) + (l2 + l3)`.
        fn sums(u: [Self; 4]) -> Self;
    }

    #[cfg(target_arch = "wasm32")]
    pub type Native = core::arch::wasm32::v128;
    #[cfg(target_arch = "x86_64")]
    pub type Native = core::arch::x86_64::__m128;

    #[cfg(target_arch = "wasm32")]
    impl F4 for core::arch::wasm32::v128 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            core::arch::wasm32::v128_load(p as *const Self)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            core::arch::wasm32::v128_store(p as *mut Self, self)
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            core::arch::wasm32::f32x4_splat(x)
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            core::arch::wasm32::f32x4_add(self, b)
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            core::arch::wasm32::f32x4_sub(self, b)
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            core::arch::wasm32::f32x4_mul(self, b)
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            core::arch::wasm32::f32x4_pmax(self, b)
        }
        #[inline(always)]
        fn pow2(n: Self) -> Self {
            use core::arch::wasm32::*;
            i32x4_shl(i32x4_add(i32x4_trunc_sat_f32x4(n), i32x4_splat(127)), 23)
        }
        #[inline(always)]
        fn zero_below(self, x: Self, lo: Self) -> Self {
            use core::arch::wasm32::*;
            v128_bitselect(f32x4_splat(0.0), self, f32x4_lt(x, lo))
        }
        #[inline(always)]
        fn sums(u: [Self; 4]) -> Self {
            use core::arch::wasm32::*;
            // [u0₀+u0₁, u1₀+u1₁, u0₂+u0₃, u1₂+u1₃], the same for u2 and u3, then across
            let s01 = f32x4_add(i32x4_shuffle::<0, 4, 2, 6>(u[0], u[1]), i32x4_shuffle::<1, 5, 3, 7>(u[0], u[1]));
            let s23 = f32x4_add(i32x4_shuffle::<0, 4, 2, 6>(u[2], u[3]), i32x4_shuffle::<1, 5, 3, 7>(u[2], u[3]));
            f32x4_add(i32x4_shuffle::<0, 1, 4, 5>(s01, s23), i32x4_shuffle::<2, 3, 6, 7>(s01, s23))
        }
    }

    // SAFETY (each intrinsic): SSE2 is part of x86_64.
    #[cfg(target_arch = "x86_64")]
    impl F4 for core::arch::x86_64::__m128 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            core::arch::x86_64::_mm_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            core::arch::x86_64::_mm_storeu_ps(p, self)
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { core::arch::x86_64::_mm_set1_ps(x) }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            unsafe { core::arch::x86_64::_mm_add_ps(self, b) }
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            unsafe { core::arch::x86_64::_mm_sub_ps(self, b) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { core::arch::x86_64::_mm_mul_ps(self, b) }
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            // maxps(b, self) = if b > self { b } else { self }
            unsafe { core::arch::x86_64::_mm_max_ps(b, self) }
        }
        #[inline(always)]
        fn pow2(n: Self) -> Self {
            use core::arch::x86_64::*;
            unsafe { _mm_castsi128_ps(_mm_slli_epi32::<23>(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)))) }
        }
        #[inline(always)]
        fn zero_below(self, x: Self, lo: Self) -> Self {
            use core::arch::x86_64::*;
            unsafe { _mm_andnot_ps(_mm_cmplt_ps(x, lo), self) }
        }
        #[inline(always)]
        fn sums(u: [Self; 4]) -> Self {
            use core::arch::x86_64::*;
            // [u0₀+u0₁, u0₂+u0₃, u1₀+u1₁, u1₂+u1₃], the same for u2 and u3, then across
            unsafe {
                let s01 = _mm_add_ps(_mm_shuffle_ps::<0b10_00_10_00>(u[0], u[1]), _mm_shuffle_ps::<0b11_01_11_01>(u[0], u[1]));
                let s23 = _mm_add_ps(_mm_shuffle_ps::<0b10_00_10_00>(u[2], u[3]), _mm_shuffle_ps::<0b11_01_11_01>(u[2], u[3]));
                _mm_add_ps(_mm_shuffle_ps::<0b10_00_10_00>(s01, s23), _mm_shuffle_ps::<0b11_01_11_01>(s01, s23))
            }
        }
    }

    /// [`super::scores_portable`] four keys at a time: each key's eight lanes in two vectors,
    /// then the four keys' lane sums at once ([`F4::sums`]), as [`super::lanes_sum`]. `d` is a
    /// multiple of 8.
    #[inline(always)]
    pub unsafe fn scores<V: F4>(q: &[f32], k: &[f32], out: &mut [f32]) {
        let (d, l) = (q.len(), out.len());
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + 4 <= l {
            let kp = k.as_ptr().add(j * d);
            let mut lo = [V::splat(0.0); 4];
            let mut hi = [V::splat(0.0); 4];
            let mut c = 0;
            while c < d {
                let (q0, q1) = (V::load(qp.add(c)), V::load(qp.add(c + 4)));
                for r in 0..4 {
                    let kr = kp.add(r * d + c);
                    lo[r] = lo[r].add(q0.mul(V::load(kr)));
                    hi[r] = hi[r].add(q1.mul(V::load(kr.add(4))));
                }
                c += 8;
            }
            // u[r] = [a0+a4, a1+a5, a2+a6, a3+a7] of key r
            V::sums(std::array::from_fn(|r| lo[r].add(hi[r]))).store(op.add(j));
            j += 4;
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            *o = super::dot(q, &k[j * d..][..d]);
        }
    }

    /// [`super::mix_portable`] on eight vectors (32 values) of `y` at a time, then one; `y.len()`
    /// is a multiple of 4, and `v` holds `p.len()` rows of it every `stride`.
    #[inline(always)]
    pub unsafe fn mix_into<V: F4>(p: &[f32], v: &[f32], stride: usize, y: &mut [f32]) {
        let dv = y.len();
        let (vp, yp) = (v.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        while c + 32 <= dv {
            let mut acc: [V; 8] = std::array::from_fn(|i| V::load(yp.add(c + 4 * i)));
            for (j, &x) in p.iter().enumerate() {
                let (x, row) = (V::splat(x), vp.add(j * stride + c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = a.add(x.mul(V::load(row.add(4 * i))));
                }
            }
            for (i, a) in acc.iter().enumerate() {
                a.store(yp.add(c + 4 * i));
            }
            c += 32;
        }
        while c < dv {
            let mut acc = V::load(yp.add(c));
            for (j, &x) in p.iter().enumerate() {
                acc = acc.add(V::splat(x).mul(V::load(vp.add(j * stride + c))));
            }
            acc.store(yp.add(c));
            c += 4;
        }
    }

    /// [`super::exp_le0`] on four lanes, the same operations in the same order.
    #[inline(always)]
    fn exp4<V: F4>(x: V) -> V {
        let lo = V::splat(EXP_LO);
        let xc = x.max(lo);
        let shift = V::splat(SHIFT);
        let n = xc.mul(V::splat(std::f32::consts::LOG2_E)).add(shift).sub(shift);
        let r = xc.sub(n.mul(V::splat(LN2_HI))).sub(n.mul(V::splat(LN2_LO)));
        let mut p = V::splat(POLY[0]);
        for c in &POLY[1..] {
            p = p.mul(r).add(V::splat(*c));
        }
        let e = p.mul(r).mul(r).add(r).add(V::splat(1.0));
        e.mul(V::pow2(n)).zero_below(x, lo)
    }

    /// [`super::softmax_portable`]: its eight lanes as two vectors.
    #[inline(always)]
    pub unsafe fn softmax<V: F4>(x: &mut [f32]) {
        let n8 = x.len() / 8 * 8;
        let xp = x.as_mut_ptr();
        let (mut m0, mut m1) = (V::splat(f32::NEG_INFINITY), V::splat(f32::NEG_INFINITY));
        let mut i = 0;
        while i < n8 {
            // the portable `if c > m { c } else { m }`
            m0 = m0.max(V::load(xp.add(i)));
            m1 = m1.max(V::load(xp.add(i + 4)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        m0.store(lanes.as_mut_ptr());
        m1.store(lanes.as_mut_ptr().add(4));
        let max = max_of(&x[n8..], &lanes);
        let vmax = V::splat(max);
        let (mut s0, mut s1) = (V::splat(0.0), V::splat(0.0));
        i = 0;
        while i < n8 {
            let e0 = exp4(V::load(xp.add(i)).sub(vmax));
            let e1 = exp4(V::load(xp.add(i + 4)).sub(vmax));
            e0.store(xp.add(i));
            e1.store(xp.add(i + 4));
            s0 = s0.add(e0);
            s1 = s1.add(e1);
            i += 8;
        }
        s0.store(lanes.as_mut_ptr());
        s1.store(lanes.as_mut_ptr().add(4));
        let mut total = lanes_sum(lanes);
        for t in &mut x[n8..] {
            *t = super::exp_le0(*t - max);
            total += *t;
        }
        let r = total.recip();
        let vr = V::splat(r);
        let n4 = x.len() / 4 * 4;
        i = 0;
        while i < n4 {
            V::load(xp.add(i)).mul(vr).store(xp.add(i));
            i += 4;
        }
        for x in &mut x[n4..] {
            *x *= r;
        }
    }
}

/// This build's loops against the portable ones, bitwise, on random rows (keys of 8 to 72 values,
/// 1 to 37 of them, masked scores): the names of the loops checked (natively, x86_64's SSE2 loops
/// only; elsewhere the portable loops are the only ones), or the first difference. Run by the
/// wasm tests and by this module's test natively.
pub fn check() -> Result<Vec<&'static str>, String> {
    let mut seed = 11u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut checked = vec![];
    if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        checked = vec!["simd128 scores", "simd128 mix", "simd128 softmax", "simd128 tiles"];
    }
    // the prefill's products: row and column counts around the tiles' four and eight
    for (m, k, n) in [(1, 1, 1), (3, 5, 7), (4, 8, 8), (5, 64, 9), (17, 64, 20), (20, 64, 37), (9, 37, 64), (16, 13, 8)] {
        for trans_b in [false, true] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            tiles(&a, m, k, &b, n, trans_b, &mut got);
            tiles_portable(&a, m, k, &b, n, trans_b, &mut want);
            if bits(&got) != bits(&want) {
                return Err(format!("tiles of ({m} x {k}) by {}({k}, {n}): {got:?} against {want:?}", if trans_b { "transposed " } else { "" }));
            }
        }
    }
    if cfg!(target_arch = "x86_64") {
        checked = vec!["sse2 scores", "sse2 mix", "sse2 softmax"];
    }
    for d in [8, 16, 24, 64, 72] {
        for l in [1, 3, 4, 5, 8, 13, 37] {
            let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..l * d).map(|_| rnd()).collect();
            let (mut got, mut want) = (vec![0f32; l], vec![0f32; l]);
            scores(&q, &k, &mut got);
            scores_portable(&q, &k, &mut want);
            if bits(&got) != bits(&want) {
                return Err(format!("scores of {l} keys of {d}: {got:?} against {want:?}"));
            }
            // masked (one key of several: a row of -inf only is NaN), then the softmax
            if l > 1 {
                got[l / 2] = f32::NEG_INFINITY;
                want[l / 2] = f32::NEG_INFINITY;
            }
            softmax(&mut got);
            softmax_portable(&mut want);
            if bits(&got) != bits(&want) {
                return Err(format!("softmax of {l}: {got:?} against {want:?}"));
            }
            let v: Vec<f32> = (0..l * d).map(|_| rnd()).collect();
            let (mut y, mut y0) = (vec![f32::NAN; d], vec![0f32; d]);
            mix(&got, &v, &mut y);
            mix_portable(&want, &v, d, &mut y0);
            if bits(&y) != bits(&y0) {
                return Err(format!("mix of {l} rows of {d}: {y:?} against {y0:?}"));
            }
            // the columns from 4 on, rows by blocks of 3: the same sums
            let mut part = vec![0f32; d - 4];
            for j in (0..l).step_by(3) {
                let n = 3.min(l - j);
                mix_into(&got[j..j + n], &v[j * d + 4..], d, &mut part);
            }
            if bits(&part) != bits(&y[4..]) {
                return Err(format!("mix of {l} rows of {d} by blocks, from column 4: {part:?} against {:?}", &y[4..]));
            }
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_targets_loops_equal_the_portable_ones() {
        let want: &[&str] = if cfg!(target_arch = "x86_64") { &["sse2 scores", "sse2 mix", "sse2 softmax"] } else { &[] };
        assert_eq!(super::check().unwrap(), want);
    }
}
