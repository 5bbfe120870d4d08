//! Products by `q8b32` weights (INT8 in blocks of 32 along K, one scale per block: GGML's Q8_0)
//! on integer kernels, the weights kept as INT8.
//!
//! The ONNX graph says `x @ (q * s)` in f32. Here each row of x is quantized to int16 with one
//! symmetric scale (`sx = max|x| / 32767`), each block's integer dot product is exact in i32,
//! then scaled in f32: `y[c] = sx * Σ_b s[c][b] * Σ_{k in b} xi[k] q[c][k]`. The only departure
//! from the f32 product is x's rounding to 15 bits (relative error <= 2^-16 of the row's
//! largest value), far below the weights' own 8-bit rounding; the tests bound what it does to
//! the logits against ONNX Runtime. Integer sums cannot overflow: |xi q| <= 32767 * 127, and
//! 32 of them stay below 2^31.
//!
//! Kernels: scalar (any target), wasm SIMD128 (`i16x8.load8x8_s`, `i32x4.dot_i16x8_s`),
//! x86_64 AVX2 (`vpmovsxbw`, `vpmaddwd`) and AVX-512 VNNI (`vpdpwssd`, a panel's four columns
//! per instruction, 8 values each). Weights in panels as [`super::kernel::PackedI8`].

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::kernel::{PackedI8, Part, K_ALIGN, PANEL};
use super::packs::BlockWeights;
use super::split::Rows;
use super::{product_facts, product_output};

/// Rows per call of the AVX2 block kernel in a prefill. x86_64 has 16 vector registers: each row
/// takes PANEL accumulators, the block's weights and scale three more. With three rows LLVM kept
/// accumulators on the stack, and a 2-thread prefill took 1.4x the time it takes with two.
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 2;

/// The op name [`super::rewrite::fuse_blocks`] writes.
pub const OP_TYPE: &str = "WasmlmBlockQ8MatMul";
/// Values per scale.
pub const BLOCK: usize = 32;

pub(super) fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // the weights come from packs::attach, once the model is parsed
    ensure!(node.input.len() == 1, "{OP_TYPE} takes x once its weights are packed (qmatmul/packs.rs)");
    Ok((expand(Expansion { weights: None }), vec![]))
}

/// The op for [`super::packs::attach`] to put in the parsed model.
pub(super) fn expansion(weights: BlockWeights) -> Box<dyn InferenceOp> {
    expand(Expansion { weights: Some(weights) })
}

/// x (…, K) f32 -> (…, N) f32.
#[derive(Debug, Clone)]
struct Expansion {
    weights: Option<BlockWeights>,
}

impl Expansion {
    fn weights(&self) -> TractResult<&BlockWeights> {
        self.weights.as_ref().with_context(|| format!("{OP_TYPE}: its weights were never attached"))
    }
}

impl tract_onnx::tract_hir::ops::expandable::Expansion for Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> TractResult<()> {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        let (k, n) = (self.weights()?.w.k as i64, self.weights()?.w.cols as i64);
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for i in 0..rank - 1 {
                s.equals(&outputs[0].shape[i], &inputs[0].shape[i])?;
            }
            s.equals(&inputs[0].shape[rank - 1], k.to_dim())?;
            s.equals(&outputs[0].shape[rank - 1], n.to_dim())
        })
    }

    fn wire(&self, prefix: &str, target: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let weights = self.weights()?;
        let x = target.outlet_fact(inputs[0])?;
        ensure!(x.shape.last() == Some(&weights.w.k.to_dim()), "{prefix}: x's last axis must be K = {}, found {:?}", weights.w.k, x.shape);
        let op = BlockQ8MatMul { w: weights.w.clone(), scales: weights.scales.clone(), kernel: BlockKernel::best() };
        target.wire_node(prefix, op, &[inputs[0]])
    }
}

#[derive(Debug, Clone)]
pub struct BlockQ8MatMul {
    pub w: Arc<PackedI8>,
    /// One scale per block of the padded K (0 beyond K) per column, in panel order
    /// ([`panel_scales`]).
    pub scales: Arc<Vec<f32>>,
    pub kernel: BlockKernel,
}

impl PartialEq for BlockQ8MatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w) && self.kernel == other.kernel
    }
}
impl Eq for BlockQ8MatMul {}

impl Op for BlockQ8MatMul {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("K={} N={} kernel={}", self.w.k, self.w.cols, self.kernel.name())])
    }

    op_as_typed_op!();
}

impl EvalOp for BlockQ8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let xv = x.try_as_plain_ram()?;
        let xv = xv.as_slice::<f32>()?;
        let (k, kp, n) = (self.w.k, self.w.kp, self.w.cols);
        let rows = xv.len() / k;
        let mut xi = vec![0i16; rows * kp];
        let mut sx = vec![0f32; rows];
        for r in 0..rows {
            sx[r] = quantize_row(&xv[r * k..(r + 1) * k], &mut xi[r * kp..r * kp + k]);
        }
        let mut y = product_output(&x, n)?;
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            let (w, scales, kernel) = (&*self.w, &self.scales[..], self.kernel);
            super::split::split_columns(rows, n, w.w.len(), PANEL, ys, |part, ys| match ys {
                Rows::Together(y) => kernel.run_part(&xi, &sx, w, scales, part, y),
                Rows::Apart(rows) => {
                    // the part's columns of each row, through a buffer of its own
                    let width = part.width(n);
                    let mut y = vec![0f32; rows.len() * width];
                    kernel.run_part(&xi, &sx, w, scales, part, &mut y);
                    for (dst, src) in rows.iter_mut().zip(y.chunks_exact(width)) {
                        dst.copy_from_slice(src);
                    }
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for BlockQ8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        product_facts(inputs[0], &self.w)
    }

    as_op!();
}

/// Block scales laid out as the kernels read them: panel by panel, then block by block, then the
/// panel's columns: `(p * kbp + b) * PANEL + j`, with `kbp` blocks in the padded K; 0 for padded
/// blocks and columns. `scale(c, b)` gives column c's block b.
pub fn panel_scales(k: usize, n: usize, scale: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let kbp = k.div_ceil(K_ALIGN) * K_ALIGN / BLOCK;
    let panels = n.div_ceil(PANEL);
    let mut out = vec![0f32; panels * kbp * PANEL];
    for c in 0..n {
        let (p, j) = (c / PANEL, c % PANEL);
        for b in 0..k / BLOCK {
            out[(p * kbp + b) * PANEL + j] = scale(c, b);
        }
    }
    out
}

/// Symmetric int16 quantization of one row: returns the scale (0 for an all-zero row).
pub fn quantize_row(x: &[f32], out: &mut [i16]) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if let Some(scale) = simd128::quantize_row(x, out) {
        return scale;
    }
    quantize_row_wide(x, out)
}

with_avx2! {
    /// [`quantize_row_portable`], eight lanes wide where the CPU has AVX2.
    fn quantize_row_wide = quantize_row_portable(x: &[f32], out: &mut [i16]) -> f32
}

/// [`quantize_row`] in scalar code: what the SIMD128 one computes, and its path for a row with a
/// NaN or an infinity.
#[inline(always)]
pub fn quantize_row_portable(x: &[f32], out: &mut [i16]) -> f32 {
    // in eight lanes of compare and select, which vectorize (a fold of `f32::max` stays a chain
    // of scalar ones); NaN skipped, as `f32::max` does
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let a = c[i].abs();
            lanes[i] = if a > lanes[i] { a } else { lanes[i] };
        }
    }
    let max = lanes.iter().chain(rest).fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        out.iter_mut().for_each(|o| *o = 0);
        return if max.is_finite() { 0.0 } else { f32::NAN };
    }
    let scale = max / 32767.0;
    let inv = 32767.0 / max;
    // round half to even by 1.5 * 2^23, as in `super::quantize` (no libm call per element)
    const ROUND: f32 = 12_582_912.0;
    for (o, &v) in out.iter_mut().zip(x) {
        // a NaN (which `max` skipped) as 0, as `as` made it; then, an integer within ±32767, the
        // plain conversion, which vectorizes where `as`'s saturating one stayed scalar
        let r = ((v * inv).clamp(-32767.0, 32767.0) + ROUND) - ROUND;
        let r = if r.is_nan() { 0.0 } else { r };
        // SAFETY: not NaN, and an integer within ±32767
        *o = unsafe { r.to_int_unchecked::<i32>() } as i16;
    }
    scale
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKernel {
    Scalar,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw")
}

impl BlockKernel {
    pub fn best() -> BlockKernel {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_vnni() {
            return BlockKernel::Avx512Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return BlockKernel::Avx2;
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        return BlockKernel::Simd128;
        #[allow(unreachable_code)]
        BlockKernel::Scalar
    }

    pub fn available() -> Vec<BlockKernel> {
        #[allow(unused_mut)]
        let mut all = vec![BlockKernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            all.push(BlockKernel::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512_vnni() {
            all.push(BlockKernel::Avx512Vnni);
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        all.push(BlockKernel::Simd128);
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockKernel::Scalar => "scalar",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            BlockKernel::Simd128 => "simd128",
            #[cfg(target_arch = "x86_64")]
            BlockKernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            BlockKernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// `xi`: rows of `w.kp` int16 (0 beyond K); `sx`: one scale per row; `scales`: from
    /// [`panel_scales`]; `y`: rows * cols.
    pub fn run(self, xi: &[i16], sx: &[f32], rows: usize, w: &PackedI8, scales: &[f32], y: &mut [f32]) {
        self.run_part(xi, sx, w, scales, Part { rows: 0..rows, panels: 0..w.cols.div_ceil(PANEL) }, y)
    }

    /// Rows `part.rows` by the columns of panels `part.panels`, into `y`: `part.rows.len() *
    /// part.width(w.cols)`, row-major (one thread's share, [`super::split`]).
    pub fn run_part(self, xi: &[i16], sx: &[f32], w: &PackedI8, scales: &[f32], part: Part, y: &mut [f32]) {
        let kp = w.kp;
        let kbp = kp / BLOCK;
        let n = part.width(w.cols);
        let c0 = part.panels.start * PANEL;
        assert!(xi.len() >= part.rows.end * kp && sx.len() >= part.rows.end && y.len() >= part.rows.len() * n);
        assert!(scales.len() >= part.panels.end * kbp * PANEL);
        let start = part.rows.start;
        for block in row_blocks(part.rows.clone(), kp) {
            for p in part.panels.clone() {
                let panel = &w.w[p * PANEL * kp..(p + 1) * PANEL * kp];
                let ps = &scales[p * kbp * PANEL..(p + 1) * kbp * PANEL];
                let c = p * PANEL - c0;
                let take = (n - c).min(PANEL);
                let mut store = |i: usize, r: usize, out: &[f32; PANEL]| {
                    for j in 0..take {
                        y[i * n + c + j] = out[j] * sx[r];
                    }
                };
                #[allow(unused_mut)] // advanced several at a time on SIMD128 and AVX-512 VNNI
                let mut rows = block.clone().map(|r| (r - start, r));
                // SIMD128: rows two by two, the weights' loads and widenings shared (a prefill's)
                #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
                if self == BlockKernel::Simd128 {
                    while rows.len() >= 2 {
                        let ((i, r), (_, r1)) = (rows.next().unwrap(), rows.next().unwrap());
                        let (mut out, mut out1) = ([0f32; PANEL], [0f32; PANEL]);
                        let (x, x1) = (&xi[r * kp..(r + 1) * kp], &xi[r1 * kp..(r1 + 1) * kp]);
                        unsafe { simd128::dot4x2(x, x1, panel, ps, &mut out, &mut out1) };
                        store(i, r, &out);
                        store(i + 1, r1, &out1);
                    }
                }
                // AVX-512 VNNI: rows sixteen, then eight, then four at a time, each weight block
                // transposed and widened once for them
                #[cfg(target_arch = "x86_64")]
                if self == BlockKernel::Avx512Vnni {
                    macro_rules! rows_at_a_time {
                        ($n:literal) => {
                            while rows.len() >= $n {
                                let rs: [(usize, usize); $n] = std::array::from_fn(|_| rows.next().unwrap());
                                let x = rs.map(|(_, r)| &xi[r * kp..(r + 1) * kp]);
                                let mut out = [[0f32; PANEL]; $n];
                                unsafe { x86::dot4xr_vnni::<$n>(x, panel, ps, &mut out) };
                                for ((i, r), out) in rs.iter().zip(&out) {
                                    store(*i, *r, out);
                                }
                            }
                        };
                    }
                    rows_at_a_time!(16);
                    rows_at_a_time!(8);
                    rows_at_a_time!(4);
                }
                // AVX2: rows AVX2_ROWS at a time, each weight block widened once for them
                #[cfg(target_arch = "x86_64")]
                if self == BlockKernel::Avx2 {
                    while rows.len() >= AVX2_ROWS {
                        let rs: [(usize, usize); AVX2_ROWS] = std::array::from_fn(|_| rows.next().unwrap());
                        let x = rs.map(|(_, r)| &xi[r * kp..(r + 1) * kp]);
                        let mut out = [[0f32; PANEL]; AVX2_ROWS];
                        unsafe { x86::dot4xr(x, panel, ps, &mut out) };
                        for ((i, r), out) in rs.iter().zip(&out) {
                            store(*i, *r, out);
                        }
                    }
                }
                for (i, r) in rows {
                    let x = &xi[r * kp..(r + 1) * kp];
                    let mut out = [0f32; PANEL];
                    match self {
                        BlockKernel::Scalar => scalar_dot4(x, panel, ps, &mut out),
                        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
                        BlockKernel::Simd128 => unsafe { simd128::dot4(x, panel, ps, &mut out) },
                        #[cfg(target_arch = "x86_64")]
                        BlockKernel::Avx2 => unsafe { x86::dot4(x, panel, ps, &mut out) },
                        #[cfg(target_arch = "x86_64")]
                        BlockKernel::Avx512Vnni => unsafe { x86::dot4_vnni(x, panel, ps, &mut out) },
                    }
                    store(i, r, &out);
                }
            }
        }
    }
}

/// A prefill's rows in blocks of at most [`ROW_BLOCK_BYTES`] of int16 activations, each taken
/// by every panel before the next: a panel's weights stay in L1 while it reads a block's rows,
/// which stay in L2 for the next panel. Without the blocks, every panel read all the rows,
/// which are larger than L2 in a long prefill (1.5 MB for the MLP's down product of 512 rows).
/// A 512-token prefill of SmolLM2 spent 4-10% less time in these products in the SIMD128 build
/// (Node, 3 alternating runs of `Engine.benchProfilePrefill`), ~3% less natively.
fn row_blocks(rows: std::ops::Range<usize>, kp: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (ROW_BLOCK_BYTES / (kp * 2).max(1)).max(4) / 4 * 4;
    let end = rows.end;
    rows.step_by(per).map(move |r| r..(r + per).min(end))
}

pub const ROW_BLOCK_BYTES: usize = 96 << 10;

/// Byte `b` of chunk `kc` of column `j` is at `(kc * PANEL + j) * K_ALIGN + b` in a panel; a
/// chunk holds `K_ALIGN / BLOCK` blocks.
fn scalar_dot4(x: &[i16], panel: &[i8], ps: &[f32], out: &mut [f32; PANEL]) {
    for (kc, chunk) in panel.chunks_exact(PANEL * K_ALIGN).enumerate() {
        for (j, col) in chunk.chunks_exact(K_ALIGN).enumerate() {
            for (h, blk) in col.chunks_exact(BLOCK).enumerate() {
                let b = kc * (K_ALIGN / BLOCK) + h;
                let xs = &x[b * BLOCK..(b + 1) * BLOCK];
                let s: i32 = xs.iter().zip(blk).map(|(&a, &w)| a as i32 * w as i32).sum();
                out[j] += s as f32 * ps[b * PANEL + j];
            }
        }
    }
}

// the kernels index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use super::{BLOCK, K_ALIGN, PANEL};
    use core::arch::wasm32::*;

    #[inline]
    pub unsafe fn dot4(x: &[i16], panel: &[i8], ps: &[f32], out: &mut [f32; PANEL]) {
        let kp = x.len();
        let xp = x.as_ptr();
        let mut wp = panel.as_ptr();
        let mut acc = [f32x4_splat(0.0); PANEL];
        let mut k = 0;
        while k < kp {
            for h in 0..K_ALIGN / BLOCK {
                let o = k + h * BLOCK;
                let a0 = v128_load(xp.add(o) as *const v128);
                let a1 = v128_load(xp.add(o + 8) as *const v128);
                let a2 = v128_load(xp.add(o + 16) as *const v128);
                let a3 = v128_load(xp.add(o + 24) as *const v128);
                let s = v128_load(ps.as_ptr().add((o / BLOCK) * PANEL) as *const v128);
                let mut dots = [i32x4_splat(0); PANEL];
                for j in 0..PANEL {
                    let w = wp.add(j * K_ALIGN + h * BLOCK);
                    let d0 = i32x4_add(
                        i32x4_dot_i16x8(a0, i16x8_load_extend_i8x8(w)),
                        i32x4_dot_i16x8(a1, i16x8_load_extend_i8x8(w.add(8))),
                    );
                    let d1 = i32x4_add(
                        i32x4_dot_i16x8(a2, i16x8_load_extend_i8x8(w.add(16))),
                        i32x4_dot_i16x8(a3, i16x8_load_extend_i8x8(w.add(24))),
                    );
                    dots[j] = i32x4_add(d0, d1);
                }
                let sj = column_scales(s);
                for j in 0..PANEL {
                    acc[j] = f32x4_add(acc[j], f32x4_mul(f32x4_convert_i32x4(dots[j]), sj[j]));
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for j in 0..PANEL {
            out[j] = lane_sum(acc[j]);
        }
    }

    /// [`super::quantize_row_portable`]'s result, four lanes at a time (the max is exact in any
    /// order; the rounding is the same operations per value); None for a row with a NaN or an
    /// infinity, which the portable code handles.
    pub fn quantize_row(x: &[f32], out: &mut [i16]) -> Option<f32> {
        let n8 = x.len() / 8 * 8;
        let mut max = f32x4_splat(0.0);
        let mut bad = i32x4_splat(0);
        let inf = f32x4_splat(f32::INFINITY);
        for c in x[..n8].chunks_exact(4) {
            let v = f32x4_abs(unsafe { v128_load(c.as_ptr() as *const v128) });
            bad = v128_or(bad, v128_not(f32x4_lt(v, inf))); // NaN or infinity
            max = f32x4_max(max, v);
        }
        if v128_any_true(bad) {
            return None;
        }
        let mut m = f32x4_extract_lane::<0>(max)
            .max(f32x4_extract_lane::<1>(max))
            .max(f32x4_extract_lane::<2>(max))
            .max(f32x4_extract_lane::<3>(max));
        for v in &x[n8..] {
            if !v.is_finite() {
                return None;
            }
            m = m.max(v.abs());
        }
        if m == 0.0 {
            return None;
        }
        let scale = m / 32767.0;
        let inv = 32767.0 / m;
        const ROUND: f32 = 12_582_912.0;
        let (vinv, lo, hi, round) = (f32x4_splat(inv), f32x4_splat(-32767.0), f32x4_splat(32767.0), f32x4_splat(ROUND));
        let q = |p: *const f32| unsafe {
            let v = f32x4_mul(v128_load(p as *const v128), vinv);
            let v = f32x4_min(f32x4_max(v, lo), hi);
            i32x4_trunc_sat_f32x4(f32x4_sub(f32x4_add(v, round), round))
        };
        for (c, o) in x[..n8].chunks_exact(8).zip(out.chunks_exact_mut(8)) {
            let w = i16x8_narrow_i32x4(q(c.as_ptr()), q(c[4..].as_ptr()));
            unsafe { v128_store(o.as_mut_ptr() as *mut v128, w) };
        }
        for (o, &v) in out[n8..].iter_mut().zip(&x[n8..]) {
            *o = (((v * inv).clamp(-32767.0, 32767.0) + ROUND) - ROUND) as i16;
        }
        Some(scale)
    }

    /// Lane j of `s` (column j's block scale) in every lane, for each column of the panel.
    #[inline]
    fn column_scales(s: v128) -> [v128; PANEL] {
        [
            i32x4_shuffle::<0, 0, 0, 0>(s, s),
            i32x4_shuffle::<1, 1, 1, 1>(s, s),
            i32x4_shuffle::<2, 2, 2, 2>(s, s),
            i32x4_shuffle::<3, 3, 3, 3>(s, s),
        ]
    }

    fn lane_sum(v: v128) -> f32 {
        (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v)) + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
    }

    /// Two rows, each computed in [`dot4`]'s order (the same bits), the weights loaded and
    /// widened once for both.
    #[inline]
    pub unsafe fn dot4x2(
        x0: &[i16],
        x1: &[i16],
        panel: &[i8],
        ps: &[f32],
        out0: &mut [f32; PANEL],
        out1: &mut [f32; PANEL],
    ) {
        let kp = x0.len();
        let (p0, p1) = (x0.as_ptr(), x1.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc0 = [f32x4_splat(0.0); PANEL];
        let mut acc1 = [f32x4_splat(0.0); PANEL];
        let dot = |a: *const i16, w: [v128; 4]| {
            let d0 = i32x4_add(
                i32x4_dot_i16x8(v128_load(a as *const v128), w[0]),
                i32x4_dot_i16x8(v128_load(a.add(8) as *const v128), w[1]),
            );
            let d1 = i32x4_add(
                i32x4_dot_i16x8(v128_load(a.add(16) as *const v128), w[2]),
                i32x4_dot_i16x8(v128_load(a.add(24) as *const v128), w[3]),
            );
            f32x4_convert_i32x4(i32x4_add(d0, d1))
        };
        let mut k = 0;
        while k < kp {
            for h in 0..K_ALIGN / BLOCK {
                let o = k + h * BLOCK;
                let s = v128_load(ps.as_ptr().add((o / BLOCK) * PANEL) as *const v128);
                let sj = column_scales(s);
                for j in 0..PANEL {
                    let w = wp.add(j * K_ALIGN + h * BLOCK);
                    let w = [
                        i16x8_load_extend_i8x8(w),
                        i16x8_load_extend_i8x8(w.add(8)),
                        i16x8_load_extend_i8x8(w.add(16)),
                        i16x8_load_extend_i8x8(w.add(24)),
                    ];
                    acc0[j] = f32x4_add(acc0[j], f32x4_mul(dot(p0.add(o), w), sj[j]));
                    acc1[j] = f32x4_add(acc1[j], f32x4_mul(dot(p1.add(o), w), sj[j]));
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for j in 0..PANEL {
            out0[j] = lane_sum(acc0[j]);
            out1[j] = lane_sum(acc1[j]);
        }
    }
}

// the kernels index their accumulators by row and column, as the sums they stand for
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, K_ALIGN, PANEL};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(x: &[i16], panel: &[i8], ps: &[f32], out: &mut [f32; PANEL]) {
        let kp = x.len();
        let xp = x.as_ptr();
        let mut wp = panel.as_ptr();
        let mut acc = [_mm256_setzero_ps(); PANEL];
        let mut k = 0;
        while k < kp {
            for h in 0..K_ALIGN / BLOCK {
                let o = k + h * BLOCK;
                let a0 = _mm256_loadu_si256(xp.add(o) as *const __m256i);
                let a1 = _mm256_loadu_si256(xp.add(o + 16) as *const __m256i);
                for j in 0..PANEL {
                    let w = wp.add(j * K_ALIGN + h * BLOCK);
                    let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w as *const __m128i));
                    let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(16) as *const __m128i));
                    let d = _mm256_add_epi32(_mm256_madd_epi16(a0, w0), _mm256_madd_epi16(a1, w1));
                    let s = _mm256_broadcast_ss(&*ps.as_ptr().add((o / BLOCK) * PANEL + j));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[j]);
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for j in 0..PANEL {
            let v = acc[j];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            out[j] = _mm_cvtss_f32(s);
        }
    }

    /// `R` rows, each computed in [`dot4`]'s order (the same bits), each block of weights
    /// widened and each scale broadcast once for all of them (a prefill's).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4xr<const R: usize>(x: [&[i16]; R], panel: &[i8], ps: &[f32], out: &mut [[f32; PANEL]; R]) {
        let kp = x[0].len();
        let xp = x.map(|x| x.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); PANEL]; R];
        let mut k = 0;
        while k < kp {
            for h in 0..K_ALIGN / BLOCK {
                let o = k + h * BLOCK;
                for j in 0..PANEL {
                    let w = wp.add(j * K_ALIGN + h * BLOCK);
                    let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w as *const __m128i));
                    let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(16) as *const __m128i));
                    let s = _mm256_broadcast_ss(&*ps.as_ptr().add((o / BLOCK) * PANEL + j));
                    for r in 0..R {
                        let a0 = _mm256_loadu_si256(xp[r].add(o) as *const __m256i);
                        let a1 = _mm256_loadu_si256(xp[r].add(o + 16) as *const __m256i);
                        let d = _mm256_add_epi32(_mm256_madd_epi16(a0, w0), _mm256_madd_epi16(a1, w1));
                        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[r][j]);
                    }
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        for r in 0..R {
            for j in 0..PANEL {
                let v = acc[r][j];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                out[r][j] = _mm_cvtss_f32(s);
            }
        }
    }

    /// The panel's four columns of block `h` of the chunk at `wp`, as four vectors of 32 int16:
    /// vector `s` holds k `8s..8s+8` of column 0, then of columns 1, 2 and 3 (one 128-bit lane
    /// each). The chunk holds each column's `K_ALIGN` weights in turn ([`PackedI8`]), so this is a
    /// 4 x 4 transpose of 8-byte pieces (eight shuffles), then a widening per vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block_columns(wp: *const i8, h: usize) -> [__m512i; 4] {
        let col = |j: usize| _mm256_loadu_si256(wp.add(j * K_ALIGN + h * BLOCK) as *const __m256i);
        let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
        // per 128-bit half: [c0 piece 0, c1 piece 0] and [c0 piece 1, c1 piece 1] (pieces 2, 3 in the high half)
        let (lo01, hi01) = (_mm256_unpacklo_epi64(c0, c1), _mm256_unpackhi_epi64(c0, c1));
        let (lo23, hi23) = (_mm256_unpacklo_epi64(c2, c3), _mm256_unpackhi_epi64(c2, c3));
        [
            _mm256_permute2x128_si256::<0x20>(lo01, lo23),
            _mm256_permute2x128_si256::<0x20>(hi01, hi23),
            _mm256_permute2x128_si256::<0x31>(lo01, lo23),
            _mm256_permute2x128_si256::<0x31>(hi01, hi23),
        ]
        .map(|v| _mm512_cvtepi8_epi16(v))
    }

    /// Block `b`'s four column scales, each over its column's 128-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_scales(ps: &[f32], b: usize) -> __m512 {
        let idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(ps.as_ptr().add(b * PANEL))))
    }

    /// `d + Σ a w` over each lane's two int16 pairs: `vpdpwssd`, written out. LLVM turns a chain of
    /// `_mm512_dpwssd_epi32` from zero into `vpmaddwd` and `vpaddd` (one more instruction each),
    /// and the 32-token prefill's block products took 85.5-86.6 ms against 77.5-83.2 with it
    /// (`wasmlm profile --prefill 32`, alternating, 2-core AMD EPYC Zen 4).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dpwssd(mut d: __m512i, a: __m512i, w: __m512i) -> __m512i {
        // SAFETY: register operands only; the caller's target features include AVX-512 VNNI
        std::arch::asm!("vpdpwssd {d}, {a}, {w}", d = inout(zmm_reg) d, a = in(zmm_reg) a, w = in(zmm_reg) w,
                        options(pure, nomem, nostack));
        d
    }

    /// `R` rows against a panel, AVX-512 VNNI: one accumulator per row for the panel's four
    /// columns (a 128-bit lane each). A block is four `vpdpwssd` into one integer sum per lane
    /// (eight products each, exact), then one conversion and one multiply-add by the four
    /// columns' scales: where a block per column took a `vpdpwssd`, a conversion and a
    /// multiply-add, a quarter of the float work. Each row's order is the same whatever `R`, so a
    /// prefill's rows have the bits of the row alone. With `PREFETCH`, the weights
    /// [`PREFETCH_BYTES`] ahead are asked for (a decode step's, read from memory).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dotr_vnni<const R: usize, const PREFETCH: bool>(x: [&[i16]; R], panel: &[i8], ps: &[f32], out: &mut [[f32; PANEL]; R]) {
        const { assert!(PANEL == 4 && K_ALIGN.is_multiple_of(BLOCK)) };
        let kp = x[0].len();
        let xp = x.map(|x| x.as_ptr());
        let mut wp = panel.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut k = 0;
        while k < kp {
            if PREFETCH {
                for l in 0..PANEL * K_ALIGN / 64 {
                    // wrapping_add: the address may lie past the weights (a hint, never read)
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_BYTES + 64 * l));
                }
            }
            for h in 0..K_ALIGN / BLOCK {
                let o = k + h * BLOCK;
                let w = block_columns(wp, h);
                let s = block_scales(ps, o / BLOCK);
                for r in 0..R {
                    let mut d = _mm512_setzero_si512();
                    for (i, w) in w.iter().enumerate() {
                        // k 8i..8i+8 of the block, in each column's lane
                        let a = _mm512_broadcast_i32x4(_mm_loadu_si128(xp[r].add(o + 8 * i) as *const __m128i));
                        d = dpwssd(d, a, *w);
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
                }
            }
            wp = wp.add(PANEL * K_ALIGN);
            k += K_ALIGN;
        }
        // each lane's four partial sums: (l0 + l1) + (l2 + l3)
        let idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
        for r in 0..R {
            let a = _mm512_add_ps(acc[r], _mm512_permute_ps::<0b10_11_00_01>(acc[r]));
            let a = _mm512_add_ps(a, _mm512_permute_ps::<0b01_00_11_10>(a));
            _mm_storeu_ps(out[r].as_mut_ptr(), _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, a)));
        }
    }

    /// How far ahead of the block being read [`dot4_vnni`] asks for the weights (bytes; the
    /// panels lie one after the other, so this reaches into the next ones). A decode step reads
    /// each weight once, from memory: without the hint, the loads' stalls were most of the
    /// kernel's time (`perf record` on an Intel Xeon VM); with it, the block products of
    /// SmolLM2's decode took 0.77x the time. Prefetching changes no result.
    const PREFETCH_BYTES: usize = 4096;

    /// One row (a decode step's), [`dotr_vnni`] with the weights prefetched.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot4_vnni(x: &[i16], panel: &[i8], ps: &[f32], out: &mut [f32; PANEL]) {
        let mut o = [[0f32; PANEL]; 1];
        dotr_vnni::<1, true>([x], panel, ps, &mut o);
        *out = o[0];
    }

    /// `R` rows (a prefill's), each in [`dot4_vnni`]'s order (the same bits), each block of
    /// weights transposed and widened once for the `R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot4xr_vnni<const R: usize>(x: [&[i16]; R], panel: &[i8], ps: &[f32], out: &mut [[f32; PANEL]; R]) {
        dotr_vnni::<R, false>(x, panel, ps, out)
    }
}

/// The row quantization against its portable code, then every block kernel this process can
/// run (the wasm builds run it on theirs: tests/wasm.rs) against an f64 reference of the same integer-and-scale arithmetic, and the whole (quantized
/// x) product against the f32 product of the dequantized weights; cut in parts, and each row of
/// a product of several rows (SIMD128 and AVX2 take them two by two, AVX-512 VNNI 16, 8 and 4 at a time) against that row alone, bit for
/// bit. Returns the names of the kernels checked, or the first difference.
#[doc(hidden)]
pub fn check_block_kernels() -> Result<Vec<&'static str>, String> {
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }
    let mut seed = 3;
    // the row quantization (SIMD128's own in wasm) against the portable one: lengths around the
    // vectors' 8, halves to round, a NaN, an infinity, an all-zero row
    for len in [1, 7, 8, 9, 33, 576] {
        for case in 0..5 {
            let mut x: Vec<f32> = (0..len).map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
            match case {
                1 => x.iter_mut().for_each(|v| *v = (*v * 8.0).round() / 2.0 + 0.5), // ties after scaling
                2 => x[len / 2] = f32::NAN,
                3 => x[len - 1] = f32::NEG_INFINITY,
                4 => x.iter_mut().for_each(|v| *v = 0.0),
                _ => {}
            }
            let (mut a, mut b) = (vec![0i16; len], vec![0i16; len]);
            let (sa, sb) = (quantize_row(&x, &mut a), quantize_row_portable(&x, &mut b));
            if a != b || sa.to_bits() != sb.to_bits() {
                return Err(format!("quantize_row, {len} values, case {case}: {sa} {a:?} against {sb} {b:?}"));
            }
        }
    }
    let mut checked = vec![];
    // the last: rows in several of run_part's row blocks (32 rows of 1,536 int16 each)
    for &(rows, kb, n) in &[(1, 2, 4), (1, 24, 1536), (3, 18, 7), (2, 3, 5), (5, 4, 9), (9, 18, 13), (70, 48, 6)] {
        let k = kb * BLOCK;
        let q: Vec<i8> = (0..k * n).map(|_| (lcg(&mut seed) % 255) as i32 as i8).collect(); // (K, N)
        let s: Vec<f32> = (0..kb * n).map(|_| (lcg(&mut seed) % 1000 + 1) as f32 * 1e-5).collect(); // (kb, N)
        let x: Vec<f32> = (0..rows * k).map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
        let w = PackedI8::from_k_by_n(&q, k, n);
        let scales = panel_scales(k, n, |c, b| s[b * n + c]);
        let mut xi = vec![0i16; rows * w.kp];
        let sx: Vec<f32> = (0..rows).map(|r| quantize_row(&x[r * k..(r + 1) * k], &mut xi[r * w.kp..r * w.kp + k])).collect();
        for kernel in BlockKernel::available() {
            let name = kernel.name();
            let mut y = vec![0f32; rows * n];
            kernel.run(&xi, &sx, rows, &w, &scales, &mut y);
            let mut parts = vec![0f32; rows * n];
            super::split::for_each_part(rows, n, 3, &mut parts, |part, out| kernel.run_part(&xi, &sx, &w, &scales, part, out));
            if parts != y {
                return Err(format!("{name} rows={rows} k={k} n={n}: parts differ from the whole"));
            }
            for r in 0..rows {
                let mut alone = vec![0f32; n];
                let row = Part { rows: r..r + 1, panels: 0..n.div_ceil(PANEL) };
                kernel.run_part(&xi, &sx, &w, &scales, row, &mut alone);
                if alone[..] != y[r * n..(r + 1) * n] {
                    return Err(format!("{name} rows={rows} k={k} n={n}: row {r} alone differs from row {r} of {rows}"));
                }
                for c in 0..n {
                    let exact: f64 = (0..k)
                        .map(|i| xi[r * w.kp + i] as f64 * sx[r] as f64 * q[i * n + c] as f64 * s[(i / BLOCK) * n + c] as f64)
                        .sum();
                    let float: f64 = (0..k).map(|i| x[r * k + i] as f64 * (q[i * n + c] as f32 * s[(i / BLOCK) * n + c]) as f64).sum();
                    let mag: f64 = (0..k).map(|i| (x[r * k + i] as f64 * q[i * n + c] as f64 * s[(i / BLOCK) * n + c] as f64).abs()).sum();
                    let got = y[r * n + c] as f64;
                    if (got - exact).abs() > 1e-5 * mag.max(1e-6) {
                        return Err(format!("{name} rows={rows} k={k} n={n} r{r} c{c}: {got} vs {exact}"));
                    }
                    // x's 15-bit rounding: at most 2^-16 of max|x| per term
                    if (got - float).abs() > 4e-5 * mag.max(1e-6) {
                        return Err(format!("{name} rows={rows} k={k} n={n} r{r} c{c}: {got} vs f32 {float}"));
                    }
                }
            }
            if !checked.contains(&name) {
                checked.push(name);
            }
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernels_agree_and_stay_near_the_float_product() {
        let checked = super::check_block_kernels().unwrap();
        assert!(checked.len() >= 2 || !cfg!(target_arch = "x86_64"), "{checked:?}");
    }
}
