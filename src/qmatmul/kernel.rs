//! Integer products of quantized activations (u8, with a zero point) by packed int8 weights.
//!
//! `acc[r][c] = Σ_k (xq[r][k] - xzp) * w[c][k]`, exact in i32 whatever the kernel: the kernels
//! differ in speed only, and the tests hold each against the scalar one.
//!
//! - scalar: any target (the no-SIMD wasm build);
//! - wasm SIMD128: `i16x8.load8x8_s` + `i32x4.dot_i16x8_s` (8 products per instruction);
//! - x86_64 AVX2: `vpmovsxbw` + `vpmaddwd` (16 products);
//! - x86_64 AVX-512 VNNI: `vpdpbusd` on the raw u8 activations (64 products), with the zero
//!   point taken out through each column's weight sum, on weights in column lanes
//!   ([`PackedI8::into_lanes`]).
//! - wasm relaxed SIMD (the `relaxed-simd` build): `i32x4.relaxed_dot_i8x16_i7x16_add_s`
//!   (16 products), for weights within [-64, 64] (`quantize_dynamic`'s reduce_range): see
//!   [`PackedI8::into_relaxed`].
//!
//! A prefill's rows go four at a time on SIMD128, relaxed SIMD and AVX-512 VNNI, each weight
//! loaded (and widened) once for the four.

/// Weights of one product in panels of [`PANEL`] columns: K padded with zeros to a multiple of
/// [`K_ALIGN`], and within a panel the columns interleaved by chunks of [`K_ALIGN`] bytes, so a
/// kernel reads one contiguous stream: byte `b` of chunk `kc` of column `j` of panel `p` is at
/// `((p * kp / K_ALIGN + kc) * PANEL + j) * K_ALIGN + b`. The last panel is padded with zero
/// columns.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    pub k: usize,
    pub kp: usize,
    pub cols: usize,
    pub w: Vec<i8>,
    /// `Σ_k w[c][k]` per column (for the u8 kernels' zero-point correction).
    pub col_sum: Vec<i32>,
    /// Set by [`Self::into_relaxed`]: `w` then holds the weights offset for the relaxed kernel.
    pub relaxed: Option<RelaxedFix>,
    /// Set by [`Self::into_narrow`]: every weight is within [-64, 64].
    pub narrow: bool,
    /// Set by [`Self::into_lanes`]: `w` holds panels of [`LANES`] columns in column lanes.
    pub lanes: bool,
}

/// [`PackedI8::from_k_by_n`]'s packing of `w` ((K, N) row-major) into `packed` (its panels,
/// zeroed) and `col_sum`.
fn pack_k_by_n(w: &[i8], k: usize, n: usize, packed: &mut [i8], col_sum: &mut [i32]) {
    assert_eq!(w.len(), k * n);
    let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
    // K_ALIGN rows at a time, column by column: each column's run of the chunk is written
    // contiguously, its bytes read from K_ALIGN rows that stay in L1 for the next columns
    // (writing row by row scattered every byte across the whole chunk's panels)
    for (kc, rows) in w.chunks(K_ALIGN * n.max(1)).enumerate() {
        let height = rows.len() / n.max(1);
        for c in 0..n {
            let (p, j) = (c / PANEL, c % PANEL);
            let at = ((p * kp / K_ALIGN + kc) * PANEL + j) * K_ALIGN;
            let mut sum = 0i32;
            for (b, dst) in packed[at..at + height].iter_mut().enumerate() {
                let v = rows[b * n + c];
                *dst = v;
                sum += v as i32;
            }
            col_sum[c] += sum;
        }
    }
}

/// What the relaxed kernel adds back: the weights equal to 64, stored as 127 (one short).
#[derive(Debug, Clone, Default)]
pub struct RelaxedFix {
    /// (column, k) of every weight 64, sorted.
    pub at: Vec<(u32, u32)>,
}

/// Padding of K and chunk of the interleave: a multiple of every kernel's step (64 bytes for
/// AVX-512).
pub const K_ALIGN: usize = 64;
/// Columns per panel (one accumulator each).
pub const PANEL: usize = 4;

impl PackedI8 {
    /// From the ONNX layout: `w` is (K, N) row-major, as MatMulInteger's B.
    pub fn from_k_by_n(w: &[i8], k: usize, n: usize) -> PackedI8 {
        PackedI8::from_k_by_n_parts(&[(w, n)], k)
    }

    /// Several (K, N_i) row-major matrices side by side along N, as one: the packing of their
    /// join, written straight from the parts (never joined in memory). Each N_i but the last
    /// must be a multiple of [`PANEL`], so that each part fills whole panels.
    pub fn from_k_by_n_parts(parts: &[(&[i8], usize)], k: usize) -> PackedI8 {
        let n: usize = parts.iter().map(|p| p.1).sum();
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![0i8; panels * PANEL * kp];
        let mut col_sum = vec![0i32; n];
        let mut first = 0;
        for (i, &(w, ni)) in parts.iter().enumerate() {
            assert!(i + 1 == parts.len() || ni % PANEL == 0, "part {i}: N = {ni} is not a multiple of {PANEL}");
            let end = first + ni.div_ceil(PANEL) * PANEL;
            pack_k_by_n(w, k, ni, &mut packed[first * kp..end * kp], &mut col_sum[first..first + ni]);
            first += ni;
        }
        PackedI8 { k, kp, cols: n, w: packed, col_sum, relaxed: None, narrow: false, lanes: false }
    }

    /// From a (N, K) row-major table (each column's K values contiguous, as a tied embedding
    /// read as `Bᵀ`): the same packing as [`Self::from_k_by_n`] of its transpose, copied in
    /// runs of [`K_ALIGN`] bytes.
    pub fn from_n_by_k(w: &[i8], k: usize, n: usize) -> PackedI8 {
        assert_eq!(w.len(), k * n);
        let kp = k.div_ceil(K_ALIGN) * K_ALIGN;
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![0i8; panels * PANEL * kp];
        let mut col_sum = vec![0i32; n];
        for (c, col) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let (p, j) = (c / PANEL, c % PANEL);
            for (kc, run) in col.chunks(K_ALIGN).enumerate() {
                let at = ((p * kp / K_ALIGN + kc) * PANEL + j) * K_ALIGN;
                packed[at..at + run.len()].copy_from_slice(run);
            }
            col_sum[c] = col.iter().map(|&v| v as i32).sum();
        }
        PackedI8 { k, kp, cols: n, w: packed, col_sum, relaxed: None, narrow: false, lanes: false }
    }

    /// [`Self::from_n_by_k`], in `w`'s own memory where the packing is as large as the table
    /// (K a multiple of [`K_ALIGN`], N of [`PANEL`]): each panel's columns are then the
    /// table's rows it replaces, interleaved through one panel's worth of scratch.
    pub fn from_n_by_k_owned(mut w: Vec<i8>, k: usize, n: usize) -> PackedI8 {
        assert_eq!(w.len(), k * n);
        if !k.is_multiple_of(K_ALIGN) || !n.is_multiple_of(PANEL) || k == 0 {
            return PackedI8::from_n_by_k(&w, k, n);
        }
        let mut col_sum = vec![0i32; n];
        let mut rows = vec![0i8; PANEL * k];
        for (p, panel) in w.chunks_exact_mut(PANEL * k).enumerate() {
            rows.copy_from_slice(panel);
            for (j, row) in rows.chunks_exact(k).enumerate() {
                for (kc, run) in row.chunks_exact(K_ALIGN).enumerate() {
                    let at = (kc * PANEL + j) * K_ALIGN;
                    panel[at..at + K_ALIGN].copy_from_slice(run);
                }
                col_sum[p * PANEL + j] = row.iter().map(|&v| v as i32).sum();
            }
        }
        PackedI8 { k, kp: k, cols: n, w, col_sum, relaxed: None, narrow: false, lanes: false }
    }

    /// The same packing marked for [`Kernel::Avx2Narrow`], if every weight is within [-64, 64]
    /// (`quantize_dynamic`'s `reduce_range`), else `self` back, unchanged.
    pub fn into_narrow(mut self) -> Result<PackedI8, PackedI8> {
        if self.w.iter().any(|&v| !(-64..=64).contains(&v)) {
            return Err(self);
        }
        self.narrow = true;
        Ok(self)
    }

    /// The packing for [`Kernel::Relaxed`], if every weight is within [-64, 64] (else `self`
    /// back, unchanged).
    ///
    /// `i32x4.relaxed_dot_i8x16_i7x16_add_s(a, b)` is deterministic only where every byte of `b`
    /// is within [0, 127] (x86 reads `b` unsigned, ARM signed). So `b = w + 64`, except that a
    /// weight 64 is stored as 127 and listed in [`RelaxedFix`]; padding stays 0. With the
    /// activations as `a = x - 128` (i8): `Σ (x - zp) w = Σ a b - 64 Σ a + Σ_{w = 64} a
    /// + (128 - zp) Σ w`, each sum exact in i32.
    pub fn into_relaxed(mut self) -> Result<PackedI8, PackedI8> {
        if self.w.iter().any(|&v| !(-64..=64).contains(&v)) {
            return Err(self);
        }
        let chunks_per_col = self.kp / K_ALIGN;
        let mut at = vec![];
        for (chunk, run) in self.w.chunks_exact_mut(K_ALIGN).enumerate() {
            let (j, t) = (chunk % PANEL, chunk / PANEL);
            let (p, kc) = (t / chunks_per_col, t % chunks_per_col);
            let col = p * PANEL + j;
            for (b, v) in run.iter_mut().enumerate() {
                let kk = kc * K_ALIGN + b;
                *v = if col >= self.cols || kk >= self.k {
                    0
                } else if *v == 64 {
                    at.push((col as u32, kk as u32));
                    127
                } else {
                    *v + 64
                };
            }
        }
        at.sort_unstable();
        self.relaxed = Some(RelaxedFix { at });
        Ok(self)
    }

    /// The same weights in column lanes, for [`Kernel::Avx512Vnni`]: panels of [`LANES`] columns
    /// (the last padded with zero columns), and within a panel, for each four consecutive k, the
    /// panel's columns' four bytes side by side: byte `b` of k-group `g` of column `j` of panel
    /// `p` is at `((p * kp / 4 + g) * LANES + j) * 4 + b`. One `vpdpbusd` then takes four k of
    /// sixteen columns against one row's four activations broadcast, each lane one column's
    /// sum: no lanes to add up after, where the interleaved panels leave every row and column a
    /// horizontal sum (docs/decisions.md, "INT8 products on our own kernels").
    pub fn into_lanes(self) -> PackedI8 {
        let (k, kp, n) = (self.k, self.kp, self.cols);
        let panels = n.div_ceil(LANES);
        let mut w = vec![0i8; panels * LANES * kp];
        for c in 0..n {
            let (p, j) = (c / LANES, c % LANES);
            let old = &self.w[(c / PANEL) * PANEL * kp..];
            for (kc, run) in (0..k.div_ceil(K_ALIGN)).map(|kc| (kc, &old[(kc * PANEL + c % PANEL) * K_ALIGN..][..K_ALIGN])) {
                for (b4, four) in run.chunks_exact(4).enumerate() {
                    let g = kc * K_ALIGN / 4 + b4;
                    w[((p * kp / 4 + g) * LANES + j) * 4..][..4].copy_from_slice(four);
                }
            }
        }
        PackedI8 { w, lanes: true, ..self }
    }

    /// Columns per panel: what a kernel computes whole.
    pub fn panel_columns(&self) -> usize {
        if self.lanes { LANES } else { PANEL }
    }

    fn panel(&self, p: usize) -> &[i8] {
        debug_assert!(!self.lanes, "panels of PANEL columns read from weights in column lanes");
        &self.w[p * PANEL * self.kp..(p + 1) * PANEL * self.kp]
    }
}

/// Columns per panel of weights in column lanes ([`PackedI8::into_lanes`]): four 512-bit
/// registers of sixteen i32 sums.
pub const LANES: usize = 64;

/// Which kernel runs: chosen once per process from the CPU (natively) or the build (wasm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// [`Kernel::Avx512Vnni`], with a prefill's rows sixteen at a time on AMX's `tdpbusd` where
    /// the CPU has AMX-INT8 and Linux grants its tiles (`x86::amx_ready`).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// Only on weights packed by [`PackedI8::into_narrow`]: `vpmaddubsw`, u8 activations by i8
    /// weights, whose pair sums stay within i16 (|255 × 64 × 2| < 32768): exact.
    #[cfg(target_arch = "x86_64")]
    Avx2Narrow,
    /// Only on weights packed by [`PackedI8::into_relaxed`].
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
    Relaxed,
}

/// The dynamic-quant product's weights packed for the fastest kernel that can run them: the
/// relaxed one where the build has it and the weights fit, AVX2's narrow one on a CPU without
/// AVX-512 VNNI where they fit, else [`Kernel::best`].
pub fn pack_for_best(w: &[i8], k: usize, n: usize) -> (PackedI8, Kernel) {
    let packed = PackedI8::from_k_by_n(w, k, n);
    #[cfg(target_arch = "x86_64")]
    let packed = match Kernel::best() {
        Kernel::Avx2 => match packed.into_narrow() {
            Ok(narrow) => return (narrow, Kernel::Avx2Narrow),
            Err(plain) => plain,
        },
        best @ (Kernel::Avx512Vnni | Kernel::Amx) => return (packed.into_lanes(), best),
        _ => packed,
    };
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
    let packed = match packed.into_relaxed() {
        Ok(relaxed) => return (relaxed, Kernel::Relaxed),
        Err(plain) => plain,
    };
    (packed, Kernel::best())
}

impl Kernel {
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::amx_ready() {
                return Kernel::Amx;
            }
            if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw") {
                return Kernel::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            return Kernel::Simd128;
        }
        #[allow(unreachable_code)]
        Kernel::Scalar
    }

    /// Every kernel this process can run (for the tests).
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                all.push(Kernel::Avx2);
                all.push(Kernel::Avx2Narrow);
            }
            if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw") {
                all.push(Kernel::Avx512Vnni);
            }
            if x86::amx_ready() {
                all.push(Kernel::Amx);
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        all.push(Kernel::Simd128);
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
        all.push(Kernel::Relaxed);
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Kernel::Simd128 => "simd128",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Narrow => "avx2-u8",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512vnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => "amx",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
            Kernel::Relaxed => "relaxed-simd",
        }
    }

    /// The columns a product of `rows` rows on `w` is cut at across threads: the weights' panel
    /// ([`PackedI8::panel_columns`]), or on AMX, where a prefill reads only the blocks of sixteen
    /// columns it computes, half a panel, so that SmolLM2's 576 and 192 columns cut evenly in two.
    pub fn column_unit(self, w: &PackedI8, rows: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Amx && rows >= 16 {
            return LANES / 2;
        }
        let _ = rows;
        w.panel_columns()
    }

    /// Whether this kernel needs the weights [`PackedI8::into_narrow`] accepts.
    fn wants_narrow(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2Narrow {
            return true;
        }
        false
    }

    /// Whether this kernel reads the weights as [`PackedI8::into_lanes`] leaves them.
    fn wants_lanes(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Kernel::Avx512Vnni | Kernel::Amx) {
            return true;
        }
        false
    }

    /// Whether this kernel reads the weights as [`PackedI8::into_relaxed`] leaves them.
    fn wants_relaxed(self) -> bool {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
        if self == Kernel::Relaxed {
            return true;
        }
        false
    }

    /// `xq`: `rows` rows of `w.kp` bytes (beyond K: anything, the weights there are 0).
    /// `acc`: `rows * w.cols`, row-major.
    pub fn run(self, xq: &[u8], xzp: u8, rows: usize, w: &PackedI8, acc: &mut [i32]) {
        self.run_part(xq, xzp, w, Part { rows: 0..rows, panels: 0..w.cols.div_ceil(PANEL) }, acc)
    }

    /// The products of rows `part.rows` of `xq` by the columns of panels `part.panels`, into
    /// `acc`: `part.rows.len() * part.width(w)`, row-major (a part of the whole product that one
    /// thread computes, [`super::split`]).
    pub fn run_part(self, xq: &[u8], xzp: u8, w: &PackedI8, part: Part, acc: &mut [i32]) {
        let kp = w.kp;
        let width = part.width(w.cols);
        assert!(xq.len() >= part.rows.end * kp && acc.len() >= part.rows.len() * width);
        assert_eq!(w.relaxed.is_some(), self.wants_relaxed(), "{} kernel on weights packed for another", self.name());
        assert!(w.narrow || !self.wants_narrow(), "{} kernel on weights not checked to fit it", self.name());
        assert_eq!(w.lanes, self.wants_lanes(), "{} kernel on weights packed for another", self.name());
        let acc = &mut acc[..part.rows.len() * width];
        #[allow(unused_variables)]
        let c0 = part.panels.start * PANEL;
        #[allow(unused_variables)]
        let xq_rows = &xq[part.rows.start * kp..part.rows.end * kp];
        let part = Panels { w, part };
        match self {
            Kernel::Scalar => {
                part.each(acc, |r, panel, out| {
                    let x = &xq[r * kp..(r + 1) * kp];
                    for (kc, chunk) in panel.chunks_exact(PANEL * K_ALIGN).enumerate() {
                        let x = &x[kc * K_ALIGN..(kc + 1) * K_ALIGN];
                        for (j, col) in chunk.chunks_exact(K_ALIGN).enumerate() {
                            let s: i32 = x.iter().zip(col).map(|(&a, &b)| (a as i32 - xzp as i32) * b as i32).sum();
                            out[j] += s;
                        }
                    }
                }, ONE_BY_ONE);
            }
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Kernel::Simd128 => {
                let (a, r0) = (centered_i16(xq_rows, xzp), part.part.rows.start);
                let row = |r: usize| &a[(r - r0) * kp..(r - r0 + 1) * kp];
                // a prefill's rows ROWS at a time: each weight widened once for all of them
                part.each(acc, |r, panel, out| unsafe { simd128::dot4(row(r), panel, out) },
                          Some((ROWS, |r: usize, panel: &[i8], outs: &mut [[i32; PANEL]]| unsafe { simd128::dot4xr::<ROWS>(std::array::from_fn(|i| row(r + i)), panel, outs) })));
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                let (a, r0) = (centered_i16(xq_rows, xzp), part.part.rows.start);
                let row = |r: usize| &a[(r - r0) * kp..(r - r0 + 1) * kp];
                // a prefill's rows AVX2_ROWS at a time: each weight widened once for all of them
                part.each(acc, |r, panel, out| unsafe { x86::dot4_avx2(row(r), panel, out) },
                          Some((AVX2_ROWS, |r: usize, panel: &[i8], outs: &mut [[i32; PANEL]]| unsafe { x86::dot4xr_avx2::<AVX2_ROWS>(std::array::from_fn(|i| row(r + i)), panel, outs) })));
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 VNNI (Kernel::best, available); the slices' sizes are
            // checked above.
            Kernel::Avx512Vnni => unsafe { x86::lanes_part(xq, xzp, part.w, &part.part, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and Linux granted the AMX tiles (Kernel::Amx is chosen only then).
            Kernel::Amx => unsafe { x86::amx_part(xq, xzp, part.w, &part.part, acc) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Narrow => {
                let row = |r: usize| &xq[r * kp..(r + 1) * kp];
                part.each(acc, |r, panel, out| unsafe { x86::dot4_u8(row(r), panel, out) },
                          Some((AVX2_ROWS, |r: usize, panel: &[i8], outs: &mut [[i32; PANEL]]| unsafe { x86::dot4xr_u8::<AVX2_ROWS>(std::array::from_fn(|i| row(r + i)), panel, outs) })));
                subtract_zero_point(acc, xzp, &w.col_sum[c0..c0 + width]);
            }
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
            Kernel::Relaxed => {
                let (k, r0) = (w.k, part.part.rows.start);
                // x - 128 as i8
                let a: Vec<i8> = xq_rows.iter().map(|&v| (v ^ 0x80) as i8).collect();
                let row = |r: usize| &a[(r - r0) * kp..(r - r0 + 1) * kp];
                // a prefill's rows ROWS at a time: each weight loaded once for all of them
                part.each(acc, |r, panel, out| unsafe { relaxed::dot4(row(r), panel, out) },
                          Some((ROWS, |r: usize, panel: &[i8], outs: &mut [[i32; PANEL]]| unsafe { relaxed::dot4xr::<ROWS>(std::array::from_fn(|i| row(r + i)), panel, outs) })));
                let fix = w.relaxed.as_ref().unwrap();
                let lo = fix.at.partition_point(|&(c, _)| (c as usize) < c0);
                let hi = fix.at.partition_point(|&(c, _)| (c as usize) < c0 + width);
                let z = 128 - xzp as i32;
                for (row, a) in acc.chunks_exact_mut(width).zip(a.chunks_exact(kp)) {
                    let a_sum: i32 = a[..k].iter().map(|&v| v as i32).sum();
                    for (v, s) in row.iter_mut().zip(&w.col_sum[c0..c0 + width]) {
                        *v += z * s - 64 * a_sum;
                    }
                    for &(c, kk) in &fix.at[lo..hi] {
                        row[c as usize - c0] += a[kk as usize] as i32;
                    }
                }
            }
        }
    }
}

/// Σ (x - zp) w = Σ x w - zp Σ w, for the kernels that take raw u8 activations: `acc` holds rows
/// of `col_sum.len()` sums Σ x w.
#[cfg(target_arch = "x86_64")]
fn subtract_zero_point(acc: &mut [i32], xzp: u8, col_sum: &[i32]) {
    let z = xzp as i32;
    if z != 0 {
        for row in acc.chunks_exact_mut(col_sum.len()) {
            for (v, s) in row.iter_mut().zip(col_sum) {
                *v -= z * s;
            }
        }
    }
}

/// A block of a product: rows of the activations by panels of the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub rows: std::ops::Range<usize>,
    pub panels: std::ops::Range<usize>,
}

impl Part {
    /// The output columns of the part, of a product with `n` columns.
    pub fn width(&self, n: usize) -> usize {
        (self.panels.end * PANEL).min(n) - self.panels.start * PANEL
    }
}

/// Rows per call of a grouped kernel (a prefill's, on SIMD128, relaxed SIMD and AVX-512 VNNI),
/// and the most [`Panels::each`] takes.
const ROWS: usize = 4;

/// AVX2's grouped rows: x86_64 has 16 vector registers, and four rows' PANEL accumulators
/// would take them all (the activations are read from memory by each multiply).
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 3;

#[allow(dead_code)]
fn centered_i16(xq: &[u8], xzp: u8) -> Vec<i16> {
    xq.iter().map(|&v| v as i16 - xzp as i16).collect()
}

/// The products of a part's rows by its panels.
struct Panels<'a> {
    w: &'a PackedI8,
    part: Part,
}

/// A kernel of several rows at a time, as [`Panels::each`] takes it.
type Grouped = fn(usize, &[i8], &mut [[i32; PANEL]]);

/// [`Panels::each`] without a grouped kernel.
const ONE_BY_ONE: Option<(usize, Grouped)> = None;

impl Panels<'_> {
    /// Panel by panel, rows inside: a panel's weights stay in L1 while every row of a prefill
    /// passes over them. `dot4(r, panel, out)` adds into `out` (zeroed here), `r` counted in the
    /// whole product; `acc` is the part's rows by its width. With `(g, dot4xr)`, rows go `g` at
    /// a time (the rest through `dot4`), the weights read (and widened) once for the `g`.
    ///
    /// The kernels are generic, not `&dyn Fn`: each one's loop is compiled into its own `each`,
    /// a direct call. As indirect calls (one per panel and row group), V8 (Chromium 156) left a
    /// prefill's products slow in the relaxed-SIMD build by its inlining and tiering guesses: 1.7x
    /// on Optimum's q8 file after an unrelated change elsewhere in the module.
    fn each<D, G>(&self, acc: &mut [i32], dot4: D, grouped: Option<(usize, G)>)
    where
        D: Fn(usize, &[i8], &mut [i32; PANEL]),
        G: Fn(usize, &[i8], &mut [[i32; PANEL]]),
    {
        let n = self.part.width(self.w.cols);
        let c0 = self.part.panels.start * PANEL;
        for p in self.part.panels.clone() {
            let panel = self.w.panel(p);
            let c = p * PANEL - c0;
            let take = (n - c).min(PANEL);
            let mut store = |i: usize, out: &[i32; PANEL]| {
                if take == PANEL {
                    // a fixed-size store: a slice of variable length is a memcpy call per panel
                    let dst: &mut [i32; PANEL] = (&mut acc[i * n + c..i * n + c + PANEL]).try_into().unwrap();
                    *dst = *out;
                } else {
                    acc[i * n + c..i * n + c + take].copy_from_slice(&out[..take]);
                }
            };
            let rows = self.part.rows.clone();
            let mut r = rows.start;
            if let Some((g, dot4xr)) = &grouped {
                let g = *g;
                assert!(g <= ROWS, "groups of {g} rows, at most {ROWS}");
                let mut outs = [[0i32; PANEL]; ROWS];
                while r + g <= rows.end {
                    let outs = &mut outs[..g];
                    outs.iter_mut().for_each(|o| *o = [0; PANEL]);
                    dot4xr(r, panel, outs);
                    for (i, out) in outs.iter().enumerate() {
                        store(r + i - rows.start, out);
                    }
                    r += g;
                }
            }
            for r in r..rows.end {
                let mut out = [0i32; PANEL];
                dot4(r, panel, &mut out);
                store(r - rows.start, &out);
            }
        }
    }
}

// the kernels index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use core::arch::wasm32::*;

    use super::{K_ALIGN, PANEL};

    /// `a`: kp centered activations; `panel`: PANEL interleaved columns (see PackedI8).
    #[inline]
    pub unsafe fn dot4(a: &[i16], panel: &[i8], out: &mut [i32; PANEL]) {
        let kp = a.len();
        let ap = a.as_ptr();
        let mut wp = panel.as_ptr();
        let mut acc = [i32x4_splat(0); PANEL];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                let a0 = v128_load(ap.add(k + sub) as *const v128);
                let a1 = v128_load(ap.add(k + sub + 8) as *const v128);
                for j in 0..PANEL {
                    let w0 = i16x8_load_extend_i8x8(wp.add(j * K_ALIGN + sub));
                    let w1 = i16x8_load_extend_i8x8(wp.add(j * K_ALIGN + sub + 8));
                    acc[j] = i32x4_add(acc[j], i32x4_add(i32x4_dot_i16x8(a0, w0), i32x4_dot_i16x8(a1, w1)));
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for j in 0..PANEL {
            out[j] = lane_sum(acc[j]);
        }
    }

    /// [`dot4`] of `R` rows at once: each weight is loaded and widened once for all of them.
    #[inline]
    pub unsafe fn dot4xr<const R: usize>(a: [&[i16]; R], panel: &[i8], out: &mut [[i32; PANEL]]) {
        let kp = a[0].len();
        debug_assert!(a.iter().all(|a| a.len() == kp) && out.len() == R);
        let ap = a.map(|a| a.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc = [[i32x4_splat(0); PANEL]; R];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                let x: [(v128, v128); R] =
                    std::array::from_fn(|r| (v128_load(ap[r].add(k + sub) as *const v128), v128_load(ap[r].add(k + sub + 8) as *const v128)));
                for j in 0..PANEL {
                    let w0 = i16x8_load_extend_i8x8(wp.add(j * K_ALIGN + sub));
                    let w1 = i16x8_load_extend_i8x8(wp.add(j * K_ALIGN + sub + 8));
                    for r in 0..R {
                        acc[r][j] = i32x4_add(acc[r][j], i32x4_add(i32x4_dot_i16x8(x[r].0, w0), i32x4_dot_i16x8(x[r].1, w1)));
                    }
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for r in 0..R {
            for j in 0..PANEL {
                out[r][j] = lane_sum(acc[r][j]);
            }
        }
    }

    /// The sum of an i32x4's lanes.
    #[inline]
    pub fn lane_sum(v: v128) -> i32 {
        i32x4_extract_lane::<0>(v)
            .wrapping_add(i32x4_extract_lane::<1>(v))
            .wrapping_add(i32x4_extract_lane::<2>(v))
            .wrapping_add(i32x4_extract_lane::<3>(v))
    }
}

// the kernels index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(all(target_arch = "wasm32", target_feature = "simd128", feature = "relaxed-simd"))]
mod relaxed {
    use core::arch::wasm32::*;

    use super::{K_ALIGN, PANEL};

    /// `a`: kp activations minus 128 (i8); `panel`: PANEL interleaved columns of weights plus 64,
    /// within [0, 127] (see PackedI8::into_relaxed). Σ a b per column.
    #[inline]
    #[target_feature(enable = "relaxed-simd")]
    pub unsafe fn dot4(a: &[i8], panel: &[i8], out: &mut [i32; PANEL]) {
        let kp = a.len();
        let ap = a.as_ptr();
        let mut wp = panel.as_ptr();
        let mut acc = [i32x4_splat(0); PANEL];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                let va = v128_load(ap.add(k + sub) as *const v128);
                for j in 0..PANEL {
                    let vw = v128_load(wp.add(j * K_ALIGN + sub) as *const v128);
                    acc[j] = i32x4_relaxed_dot_i8x16_i7x16_add(va, vw, acc[j]);
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for j in 0..PANEL {
            out[j] = super::simd128::lane_sum(acc[j]);
        }
    }

    /// [`dot4`] of `R` rows at once: each weight is loaded once for all of them.
    #[inline]
    #[target_feature(enable = "relaxed-simd")]
    pub unsafe fn dot4xr<const R: usize>(a: [&[i8]; R], panel: &[i8], out: &mut [[i32; PANEL]]) {
        let kp = a[0].len();
        debug_assert!(a.iter().all(|a| a.len() == kp) && out.len() == R);
        let ap = a.map(|a| a.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc = [[i32x4_splat(0); PANEL]; R];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                let x: [v128; R] = std::array::from_fn(|r| v128_load(ap[r].add(k + sub) as *const v128));
                for j in 0..PANEL {
                    let vw = v128_load(wp.add(j * K_ALIGN + sub) as *const v128);
                    for r in 0..R {
                        acc[r][j] = i32x4_relaxed_dot_i8x16_i7x16_add(x[r], vw, acc[r][j]);
                    }
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for r in 0..R {
            for j in 0..PANEL {
                out[r][j] = super::simd128::lane_sum(acc[r][j]);
            }
        }
    }
}

// the kernels index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedI8, Part, K_ALIGN, LANES, PANEL, ROWS};
    use std::arch::x86_64::*;

    const _: () = assert!(PANEL == 4, "the sums below take a panel's four columns at once");

    /// Each accumulator's lanes summed, `out[j] = Σ acc[j]`: the four as one transpose-and-add
    /// (11 instructions, where one at a time took 24). Exact: i32 sums wrap alike in any order.
    #[target_feature(enable = "avx2")]
    unsafe fn sums256(acc: &[__m256i; PANEL], out: &mut [i32; PANEL]) {
        // per 128-bit half: [a0 lanes 0+2, a1 0+2, a0 1+3, a1 1+3], then [a0, a1, a2, a3]
        let t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(acc[0], acc[1]), _mm256_unpackhi_epi32(acc[0], acc[1]));
        let t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(acc[2], acc[3]), _mm256_unpackhi_epi32(acc[2], acc[3]));
        let s = _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
    }

    /// `a`: kp centered activations (i16); `panel`: PANEL interleaved columns.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot4_avx2(a: &[i16], panel: &[i8], out: &mut [i32; PANEL]) {
        let kp = a.len();
        let ap = a.as_ptr();
        let mut wp = panel.as_ptr();
        let mut acc = [_mm256_setzero_si256(); PANEL];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                let va = _mm256_loadu_si256(ap.add(k + sub) as *const __m256i);
                for j in 0..PANEL {
                    let vw = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(j * K_ALIGN + sub) as *const __m128i));
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(va, vw));
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        sums256(&acc, out);
    }

    /// [`dot4_avx2`] of `R` rows at once: each weight is loaded and widened once for all of them.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot4xr_avx2<const R: usize>(a: [&[i16]; R], panel: &[i8], out: &mut [[i32; PANEL]]) {
        let kp = a[0].len();
        debug_assert!(a.iter().all(|a| a.len() == kp) && out.len() == R);
        let ap = a.map(|a| a.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc = [[_mm256_setzero_si256(); PANEL]; R];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(16) {
                for j in 0..PANEL {
                    let vw = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(j * K_ALIGN + sub) as *const __m128i));
                    for r in 0..R {
                        let va = _mm256_loadu_si256(ap[r].add(k + sub) as *const __m256i);
                        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(va, vw));
                    }
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for r in 0..R {
            sums256(&acc[r], &mut out[r]);
        }
    }

    /// `x`: kp raw u8 activations; `panel`: weights within [-64, 64]; result is Σ x w (no zero
    /// point). `vpmaddubsw` adds two products into an i16 (saturating, never reached here),
    /// `vpmaddwd` by ones two of those into an i32.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot4_u8(x: &[u8], panel: &[i8], out: &mut [i32; PANEL]) {
        let kp = x.len();
        let xp = x.as_ptr();
        let mut wp = panel.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); PANEL];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(32) {
                let vx = _mm256_loadu_si256(xp.add(k + sub) as *const __m256i);
                for j in 0..PANEL {
                    let vw = _mm256_loadu_si256(wp.add(j * K_ALIGN + sub) as *const __m256i);
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(vx, vw), ones));
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        sums256(&acc, out);
    }

    /// [`dot4_u8`] of `R` rows at once: each weight is loaded once for all of them.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot4xr_u8<const R: usize>(x: [&[u8]; R], panel: &[i8], out: &mut [[i32; PANEL]]) {
        let kp = x[0].len();
        debug_assert!(x.iter().all(|x| x.len() == kp) && out.len() == R);
        let xp = x.map(|x| x.as_ptr());
        let mut wp = panel.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); PANEL]; R];
        let mut k = 0;
        while k < kp {
            for sub in (0..K_ALIGN).step_by(32) {
                for j in 0..PANEL {
                    let vw = _mm256_loadu_si256(wp.add(j * K_ALIGN + sub) as *const __m256i);
                    for r in 0..R {
                        let vx = _mm256_loadu_si256(xp[r].add(k + sub) as *const __m256i);
                        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(vx, vw), ones));
                    }
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for r in 0..R {
            sums256(&acc[r], &mut out[r]);
        }
    }

    /// Whether AMX-INT8 runs here: the CPU has it (CPUID leaf 7: AMX-TILE, AMX-INT8), and
    /// AVX-512 VNNI for the rows it leaves; and Linux granted this process the tiles' state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once). Elsewhere, never.
    pub fn amx_ready() -> bool {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            let id = __cpuid_count(7, 0);
            let cpu = id.edx >> 24 & 1 == 1 && id.edx >> 25 & 1 == 1
                && std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw");
            cpu && granted()
        })
    }

    #[cfg(target_os = "linux")]
    fn granted() -> bool {
        const ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let r: i64;
        // SAFETY: the arch_prctl system call, which changes no memory of ours.
        unsafe {
            std::arch::asm!("syscall", inlateout("rax") ARCH_PRCTL => r, in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn granted() -> bool {
        false
    }

    /// AMX's tile configuration (palette 1): eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Tiles {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// [`lanes_part`] with the part's rows sixteen at a time on AMX (then the rest on
    /// [`lanes_rows`]): `tdpbusd` takes sixteen rows by 64 k of the activations (a tile, rows at
    /// the stride `kp`) against 64 k of sixteen columns of a panel in column lanes (a tile whose
    /// rows are four k of those columns, at the lanes' stride of 256 bytes), into sixteen by
    /// sixteen i32 sums. A row block by a panel's four column blocks at a time: four sum tiles,
    /// one of activations, three of weights. Integer sums, exact: the same results as every
    /// kernel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn amx_part(xq: &[u8], xzp: u8, w: &PackedI8, part: &Part, acc: &mut [i32]) {
        use std::arch::asm;
        let (kp, width) = (w.kp, part.width(w.cols));
        let (c0, blocks) = (part.panels.start * PANEL, part.rows.len() / 16);
        let c1 = c0 + width;
        assert!(w.lanes && kp % 64 == 0 && xq.len() >= part.rows.end * kp && acc.len() >= part.rows.len() * width);
        if blocks > 0 {
            // palette 1 has eight tiles; the other entries must be 0
            let mut tiles = Tiles { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
            tiles.colsb[..8].fill(64);
            tiles.rows[..8].fill(16);
            asm!("ldtilecfg [{}]", in(reg) &tiles, options(nostack, readonly));
            let mut sums = [[0i32; 256]; 4];
            for p in c0 / LANES..c1.div_ceil(LANES) {
                let (panel, j0, j1, zsum) = lanes_panel(w, xzp, p, c0..c1);
                // the column blocks of sixteen the part has in this panel: only their weights are read
                let blocks_of_part = j0 / 16..j1.div_ceil(16);
                for rb in 0..blocks {
                    let r = part.rows.start + rb * 16;
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    // each 64 k: the rows' tile, then the part's column blocks of the panel in
                    // turn (all four: 4 KiB of weights read in order)
                    for kc in 0..kp / 64 {
                        let b = panel.add(kc * 16 * LANES * 4);
                        asm!("tileloadd tmm4, [{a} + {sa}*1]", a = in(reg) xq.as_ptr().add(r * kp + kc * 64), sa = in(reg) kp,
                             options(nostack, readonly));
                        for cb in blocks_of_part.clone() {
                            let (b, sb) = (b.add(cb * 64), LANES * 4);
                            match cb {
                                0 => asm!("tileloadd tmm5, [{b} + {sb}*1]", "tdpbusd tmm0, tmm4, tmm5", b = in(reg) b, sb = in(reg) sb, options(nostack, readonly)),
                                1 => asm!("tileloadd tmm6, [{b} + {sb}*1]", "tdpbusd tmm1, tmm4, tmm6", b = in(reg) b, sb = in(reg) sb, options(nostack, readonly)),
                                2 => asm!("tileloadd tmm7, [{b} + {sb}*1]", "tdpbusd tmm2, tmm4, tmm7", b = in(reg) b, sb = in(reg) sb, options(nostack, readonly)),
                                _ => asm!("tileloadd tmm5, [{b} + {sb}*1]", "tdpbusd tmm3, tmm4, tmm5", b = in(reg) b, sb = in(reg) sb, options(nostack, readonly)),
                            }
                        }
                    }
                    asm!("tilestored [{s0} + {st}*1], tmm0", "tilestored [{s1} + {st}*1], tmm1",
                         "tilestored [{s2} + {st}*1], tmm2", "tilestored [{s3} + {st}*1], tmm3",
                         s0 = in(reg) sums[0].as_mut_ptr(), s1 = in(reg) sums[1].as_mut_ptr(),
                         s2 = in(reg) sums[2].as_mut_ptr(), s3 = in(reg) sums[3].as_mut_ptr(), st = in(reg) 64usize,
                         options(nostack));
                    for (cb, t) in sums.iter().enumerate() {
                        let (lo, hi) = (j0.max(cb * 16), j1.min(cb * 16 + 16));
                        if lo >= hi {
                            continue;
                        }
                        let z = _mm512_loadu_si512(zsum.as_ptr().add(cb * 16) as *const _);
                        for i in 0..16 {
                            let out = acc.as_mut_ptr().add((r + i - part.rows.start) * width + p * LANES + lo - c0);
                            let v = _mm512_sub_epi32(_mm512_loadu_si512(t.as_ptr().add(i * 16) as *const _), z);
                            if hi - lo == 16 {
                                _mm512_storeu_si512(out as *mut _, v);
                            } else {
                                let mut row = [0i32; 16];
                                _mm512_storeu_si512(row.as_mut_ptr() as *mut _, v);
                                std::ptr::copy_nonoverlapping(row.as_ptr().add(lo - cb * 16), out, hi - lo);
                            }
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
        let done = blocks * 16;
        if done < part.rows.len() {
            let rest = Part { rows: part.rows.start + done..part.rows.end, panels: part.panels.clone() };
            lanes_part(xq, xzp, w, &rest, &mut acc[done * width..]);
        }
    }

    /// Panel `p` of weights in column lanes, for a part of columns `cols`: its weights, the
    /// part's columns within it (`j0..j1`, counted within the panel), and the zero point's share
    /// of each of those columns' sums, `xzp Σ w`.
    fn lanes_panel(w: &PackedI8, xzp: u8, p: usize, cols: std::ops::Range<usize>) -> (*const i8, usize, usize, [i32; LANES]) {
        let panel = w.w[p * LANES * w.kp..(p + 1) * LANES * w.kp].as_ptr();
        let (j0, j1) = (cols.start.max(p * LANES) - p * LANES, cols.end.min((p + 1) * LANES) - p * LANES);
        let mut zsum = [0i32; LANES];
        for j in j0..j1 {
            zsum[j] = xzp as i32 * w.col_sum[p * LANES + j];
        }
        (panel, j0, j1, zsum)
    }

    /// Rows `part.rows` of the u8 activations `xq` (rows of `w.kp`) by the columns of
    /// `part.panels`, minus the zero point's `xzp Σ w`, into `acc` (the part's rows by its width,
    /// row-major), on weights in column lanes ([`PackedI8::into_lanes`]): a panel of [`LANES`]
    /// columns at a time, each taken by every row, [`ROWS`] rows at a time (then one), each
    /// weight loaded once for them. A panel the part covers only in part is computed whole, and
    /// only the part's columns are stored.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn lanes_part(xq: &[u8], xzp: u8, w: &PackedI8, part: &Part, acc: &mut [i32]) {
        let (kp, width) = (w.kp, part.width(w.cols));
        let c0 = part.panels.start * PANEL;
        let c1 = c0 + width;
        assert!(w.lanes && xq.len() >= part.rows.end * kp && acc.len() >= part.rows.len() * width);
        for p in c0 / LANES..c1.div_ceil(LANES) {
            let (panel, j0, j1, zsum) = lanes_panel(w, xzp, p, c0..c1);
            let base = acc.as_mut_ptr();
            let out = |r: usize| base.add((r - part.rows.start) * width + p * LANES + j0 - c0);
            let x = |r: usize| xq.as_ptr().add(r * kp);
            let mut r = part.rows.start;
            while r + ROWS <= part.rows.end {
                lanes_rows::<ROWS>(std::array::from_fn(|i| x(r + i)), kp, panel, &zsum, std::array::from_fn(|i| out(r + i)), j0..j1);
                r += ROWS;
            }
            for r in r..part.rows.end {
                lanes_rows::<1>([x(r)], kp, panel, &zsum, [out(r)], j0..j1);
            }
        }
    }

    /// `R` rows' sums over one panel in column lanes, minus `zsum`, each row's columns `cols`
    /// (of the panel's [`LANES`]) stored from its `out`: four k of sixteen columns per
    /// `vpdpbusd`, a row's four activations broadcast.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn lanes_rows<const R: usize>(x: [*const u8; R], kp: usize, panel: *const i8, zsum: &[i32; LANES], out: [*mut i32; R], cols: std::ops::Range<usize>) {
        const Q: usize = LANES / 16;
        let mut acc = [[_mm512_setzero_si512(); Q]; R];
        let mut wp = panel;
        let mut k = 0;
        while k < kp {
            let vx: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32((x[r].add(k) as *const i32).read_unaligned()));
            for q in 0..Q {
                let vw = _mm512_loadu_si512(wp.add(q * 64) as *const _);
                for r in 0..R {
                    acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], vx[r], vw);
                }
            }
            wp = wp.add(LANES * 4);
            k += 4;
        }
        for r in 0..R {
            let sums: [__m512i; Q] = std::array::from_fn(|q| _mm512_sub_epi32(acc[r][q], _mm512_loadu_si512(zsum.as_ptr().add(q * 16) as *const _)));
            if cols.len() == LANES {
                for (q, v) in sums.iter().enumerate() {
                    _mm512_storeu_si512(out[r].add(q * 16) as *mut _, *v);
                }
            } else {
                let mut row = [0i32; LANES];
                for (q, v) in sums.iter().enumerate() {
                    _mm512_storeu_si512(row.as_mut_ptr().add(q * 16) as *mut _, *v);
                }
                std::ptr::copy_nonoverlapping(row.as_ptr().add(cols.start), out[r], cols.len());
            }
        }
    }
}

/// Every kernel this process can run against the scalar one (the tests' check, public so the
/// wasm builds run it on their own kernels): random weights and activations, random bytes in x's
/// padding, several zero points. Returns the names of the kernels checked, or the first difference.
#[doc(hidden)]
pub fn check_kernels() -> Result<Vec<&'static str>, String> {
    // 33 and 16 rows: AMX's blocks of sixteen, and a row left over
    check_kernels_on(&[(1, 64, 4), (1, 768, 2304), (3, 100, 7), (5, 576, 192), (2, 1, 1), (1, 130, 5), (7, 64, 192), (33, 576, 200), (16, 130, 64)])
}

/// [`check_kernels`] on small products only (a few milliseconds): what the page runs before it
/// trusts the relaxed-SIMD build, whose instruction browsers may implement differently
/// (`wasm::check_kernels`). Five rows reach the kernels that take four at a time.
pub fn check_kernels_quick() -> Result<Vec<&'static str>, String> {
    check_kernels_on(&[(1, 64, 4), (3, 100, 7), (2, 1, 1), (1, 130, 5), (2, 192, 40), (5, 192, 40)])
}

/// `cases`: (rows, K, N) of each product checked.
fn check_kernels_on(cases: &[(usize, usize, usize)]) -> Result<Vec<&'static str>, String> {
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }
    let mut seed = 7;
    let mut checked = vec![];
    // each case with full-range weights, then with reduce_range's [-64, 64] (the relaxed kernel's
    // domain), ±64 one time in 8
    for (&(rows, k, n), narrow) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let w: Vec<i8> = (0..k * n)
            .map(|_| {
                let v = lcg(&mut seed);
                match (narrow, v % 16) {
                    (false, _) => v as u8 as i8,
                    (true, 0) => 64,
                    (true, 1) => -64,
                    (true, _) => ((v >> 8) % 129) as i8 - 64,
                }
            })
            .collect();
        let plain = PackedI8::from_k_by_n(&w, k, n);
        // the padding beyond K gets random bytes too: the zero weights there must cancel them
        let xq: Vec<u8> = (0..rows * plain.kp).map(|_| lcg(&mut seed) as u8).collect();
        for xzp in [0u8, 1, 128, 255] {
            // the reference, from the unpacked (K, N) weights
            let mut want = vec![0i32; rows * n];
            for r in 0..rows {
                for c in 0..n {
                    want[r * n + c] =
                        (0..k).map(|i| (xq[r * plain.kp + i] as i32 - xzp as i32) * w[i * n + c] as i32).sum();
                }
            }
            for kernel in Kernel::available() {
                let (relaxed, narrowed, laned);
                let packed = if kernel.wants_lanes() {
                    laned = plain.clone().into_lanes();
                    &laned
                } else if kernel.wants_narrow() {
                    match plain.clone().into_narrow() {
                        Ok(p) => {
                            narrowed = p;
                            &narrowed
                        }
                        Err(_) if !narrow => continue,
                        Err(_) => return Err(format!("weights within [-64, 64] refused by into_narrow (k={k} n={n})")),
                    }
                } else if kernel.wants_relaxed() {
                    match plain.clone().into_relaxed() {
                        Ok(p) => {
                            relaxed = p;
                            &relaxed
                        }
                        Err(_) if !narrow => continue,
                        Err(_) => return Err(format!("weights within [-64, 64] refused by into_relaxed (k={k} n={n})")),
                    }
                } else {
                    &plain
                };
                let mut got = vec![0i32; rows * n];
                kernel.run(&xq, xzp, rows, packed, &mut got);
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                    let name = kernel.name();
                    return Err(format!("{name} rows={rows} k={k} n={n} zp={xzp}: [{i}] = {} instead of {}", got[i], want[i]));
                }
                // and in parts, as split::split cuts a product across threads
                let mut parts = vec![0i32; rows * n];
                let panels = n.div_ceil(PANEL);
                super::split::for_each_part(rows, n, 3, &mut parts, |part, out| kernel.run_part(&xq, xzp, packed, part, out));
                if parts != got {
                    return Err(format!("{} rows={rows} k={k} n={n} zp={xzp}: parts of {panels} panels differ from the whole", kernel.name()));
                }
                if !checked.contains(&kernel.name()) {
                    checked.push(kernel.name());
                }
            }
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_equals_the_scalar_one() {
        let checked = super::check_kernels().unwrap();
        assert!(checked.len() >= 2 || !cfg!(target_arch = "x86_64"), "{checked:?}");
    }

    /// `into_relaxed`'s arithmetic, the relaxed kernel's dot emulated in scalar (any target: the
    /// kernel itself runs only in the relaxed wasm build, `check_kernels`): `Σ a b - 64 Σ a +
    /// Σ_{w = 64} a + (128 - zp) Σ w` equals `Σ (x - zp) w`; bytes within [0, 127]; weights
    /// beyond [-64, 64] refused.
    #[test]
    fn relaxed_packing_gives_the_exact_product() {
        use super::{PackedI8, K_ALIGN, PANEL};
        for (k, n) in [(64, 4), (100, 7), (130, 9), (1, 1), (576, 13)] {
            let w: Vec<i8> = (0..k * n).map(|i| ((i as u64).wrapping_mul(2654435761) >> 5) % 129).map(|v| v as i8 - 64).collect();
            assert!(w.contains(&64) || k * n < 129);
            let r = PackedI8::from_k_by_n(&w, k, n).into_relaxed().expect("within [-64, 64]");
            assert!(r.w.iter().all(|&b| (0..=127).contains(&b)));
            let fix = r.relaxed.as_ref().unwrap();
            assert_eq!(fix.at.len(), w.iter().filter(|&&v| v == 64).count());
            let x: Vec<u8> = (0..r.kp).map(|i| (i * 37 % 256) as u8).collect();
            let a: Vec<i32> = x.iter().map(|&v| v as i32 - 128).collect();
            for zp in [0u8, 3, 128, 255] {
                for c in 0..n {
                    let (p, j) = (c / PANEL, c % PANEL);
                    let ab: i32 = (0..r.kp)
                        .map(|kk| a[kk] * r.w[((p * r.kp / K_ALIGN + kk / K_ALIGN) * PANEL + j) * K_ALIGN + kk % K_ALIGN] as i32)
                        .sum();
                    let corr: i32 = fix.at.iter().filter(|&&(cc, _)| cc as usize == c).map(|&(_, kk)| a[kk as usize]).sum();
                    let a_sum: i32 = a[..k].iter().sum();
                    let got = ab - 64 * a_sum + corr + (128 - zp as i32) * r.col_sum[c];
                    let want: i32 = (0..k).map(|i| (x[i] as i32 - zp as i32) * w[i * n + c] as i32).sum();
                    assert_eq!(got, want, "k={k} n={n} zp={zp} c={c}");
                }
            }
        }
        let mut w = vec![3i8; 64 * 4];
        w[77] = 65;
        assert!(PackedI8::from_k_by_n(&w, 64, 4).into_relaxed().is_err());
        w[77] = -65;
        assert!(PackedI8::from_k_by_n(&w, 64, 4).into_relaxed().is_err());
    }

    /// The (N, K) packer gives the very bytes and column sums of the (K, N) one on the transpose,
    /// K a multiple of the chunk or not, N a multiple of the panel or not.
    #[test]
    fn packing_n_by_k_equals_packing_its_transpose() {
        for (k, n) in [(64, 4), (576, 49), (100, 7), (1, 1), (130, 9)] {
            let kn: Vec<i8> = (0..k * n).map(|i| (i as u64).wrapping_mul(2654435761).rotate_right(7) as u8 as i8).collect();
            let nk: Vec<i8> = (0..n * k).map(|i| kn[(i % k) * n + i / k]).collect();
            let (a, b) = (super::PackedI8::from_k_by_n(&kn, k, n), super::PackedI8::from_n_by_k(&nk, k, n));
            assert_eq!((a.k, a.kp, a.cols), (b.k, b.kp, b.cols));
            assert_eq!(a.w, b.w, "k={k} n={n}");
            assert_eq!(a.col_sum, b.col_sum, "k={k} n={n}");
            // packed in the table's own memory: the same (in place where the sizes allow)
            let c = super::PackedI8::from_n_by_k_owned(nk.clone(), k, n);
            assert_eq!((c.k, c.kp, c.cols, &c.w, &c.col_sum), (a.k, a.kp, a.cols, &a.w, &a.col_sum), "owned k={k} n={n}");
        }
        for (k, n) in [(576, 48), (128, 8)] {
            let nk: Vec<i8> = (0..n * k).map(|i| (i as u64).wrapping_mul(40503).rotate_right(5) as u8 as i8).collect();
            let ptr = nk.as_ptr();
            let c = super::PackedI8::from_n_by_k_owned(nk, k, n);
            assert_eq!(c.w.as_ptr(), ptr, "k={k} n={n}: packed where it lay");
        }
    }

    /// Parts side by side pack as their join along N, the last part's N any.
    #[test]
    fn packing_parts_equals_packing_their_join() {
        for (k, ns) in [(64, vec![8, 4, 4]), (100, vec![4, 7]), (576, vec![12, 4, 5]), (33, vec![3])] {
            let n: usize = ns.iter().sum();
            let joined: Vec<i8> = (0..k * n).map(|i| (i as u64).wrapping_mul(2654435761).rotate_right(9) as u8 as i8).collect();
            let mut first = 0;
            let parts: Vec<Vec<i8>> = ns.iter().map(|&ni| {
                let part = (0..k * ni).map(|i| joined[(i / ni) * n + first + i % ni]).collect();
                first += ni;
                part
            }).collect();
            let views: Vec<(&[i8], usize)> = parts.iter().zip(&ns).map(|(p, &ni)| (p.as_slice(), ni)).collect();
            let (a, b) = (super::PackedI8::from_k_by_n(&joined, k, n), super::PackedI8::from_k_by_n_parts(&views, k));
            assert_eq!((a.k, a.kp, a.cols, &a.w, &a.col_sum), (b.k, b.kp, b.cols, &b.w, &b.col_sum), "k={k} ns={ns:?}");
        }
    }
}
