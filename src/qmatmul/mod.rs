//! INT8 weight products on our own integer kernels, in place of tract's.
//!
//! Three kinds, all found in the ONNX protobuf before tract sees it ([`rewrite`], [`nbits`]):
//!
//! - This module: the dynamic-quantization product of `quantize_dynamic` files. ONNX Runtime
//!   writes each weight product as
//!   `DynamicQuantizeLinear(x) -> MatMulInteger(xq, W, xzp, Wzp) -> Cast(float) -> Mul(xs * Ws)`.
//!   tract runs that as written, through its generic integer matmul: natively 1.7-2.7x slower
//!   than ONNX Runtime on the same file, and in wasm slower than FP32 (no integer
//!   matrix-vector kernel there: docs/decisions.md, "INT8 products on our own kernels"). [`rewrite::fuse`] replaces the four nodes by one
//!   `WasmlmDynQMatMul(x, W, Wzp, Ws)` node, which computes the same thing: the activations
//!   quantized per tensor exactly as tract's (and the ONNX spec's) DynamicQuantizeLinear, the
//!   product exact in i32 ([`kernel`]), then `float(acc) * (xs * Ws)` in the graph's order.
//! - [`blockq8`]: `q8b32`'s block weights, kept as INT8 ([`rewrite::fuse_blocks`]); and
//!   [`gather`], the embedding lookup on the same blocks.
//! - [`nbits`]: ONNX Runtime's `MatMulNBits` (4 and 8 bits), on `blockq8`'s kernels.
//!
//! The weights are packed once, at load, in panels ([`kernel::PackedI8`]).

/// `fn $name(args) -> ret` that runs `$body` (an `#[inline(always)]` function of the same
/// arguments) compiled a second time for AVX2 where the CPU has it: x86_64's baseline, SSE2,
/// vectorizes the loops around the kernels four lanes wide, AVX2 eight (the activations'
/// quantization took ~6% of a 32-token prefill of the `ort-dynamic-qint8` file, `perf record`).
/// The same operations either way, so the same results; elsewhere, `$body` as compiled.
macro_rules! with_avx2 {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $body:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked on this line)
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use with_avx2;

pub mod blockq8;
pub mod gather;
pub mod kernel;
pub mod nbits;
pub mod packs;
pub mod rewrite;
pub mod split;

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::Onnx;

use kernel::{Kernel, PackedI8, PANEL};

/// The op name [`rewrite::fuse`] writes and [`register`] teaches tract.
pub const OP_TYPE: &str = "WasmlmDynQMatMul";

/// "N x dynamic-quant KERNEL, M x q8 blocks KERNEL" for the fused products in `model` (read off
/// the ops themselves, so it names what runs), or None.
pub fn describe(model: &TypedModel) -> Option<String> {
    let mut counts: Vec<(String, usize)> = vec![];
    for node in &model.nodes {
        let what = if let Some(op) = node.op_as::<DynQMatMul>() {
            format!("dynamic-quant {}", op.kernel.name())
        } else if let Some(op) = node.op_as::<blockq8::BlockQ8MatMul>() {
            format!("q8 blocks {}", op.kernel.name())
        } else {
            continue;
        };
        match counts.iter_mut().find(|(w, _)| *w == what) {
            Some((_, n)) => *n += 1,
            None => counts.push((what, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(what, n)| format!("{n} x {what}")).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Makes `onnx` understand the fused nodes.
pub fn register(onnx: &mut Onnx) {
    onnx.op_register.insert(OP_TYPE, build);
    onnx.op_register.insert(blockq8::OP_TYPE, blockq8::build);
    onnx.op_register.insert(gather::OP_TYPE, gather::build);
    onnx.op_register.insert(gather::F32_OP_TYPE, gather::build);
}

fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // the weights come from packs::attach, once the model is parsed
    ensure!(node.input.len() == 1, "{OP_TYPE} takes x once its weights are packed (qmatmul/packs.rs)");
    Ok((expand(DynQMatMulExpansion { op: None }), vec![]))
}

/// The op for [`packs::attach`] to put in the parsed model.
pub(crate) fn expansion(op: DynQMatMul) -> Box<dyn InferenceOp> {
    expand(DynQMatMulExpansion { op: Some(op) })
}

/// The inference-level face of the op: x (…, K) f32 -> (…, N) f32.
#[derive(Debug, Clone)]
struct DynQMatMulExpansion {
    /// Built by [`packs::pack`], weights and all.
    op: Option<DynQMatMul>,
}

impl DynQMatMulExpansion {
    fn op(&self) -> TractResult<&DynQMatMul> {
        self.op.as_ref().with_context(|| format!("{OP_TYPE}: its weights were never attached"))
    }
}

impl Expansion for DynQMatMulExpansion {
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
        let (k, n) = (self.op()?.w.k as i64, self.op()?.w.cols as i64);
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
        let op = self.op()?;
        let x = target.outlet_fact(inputs[0])?;
        ensure!(x.shape.last() == Some(&op.w.k.to_dim()), "{prefix}: x's last axis must be K = {}, found {:?}", op.w.k, x.shape);
        target.wire_node(prefix, op.clone(), &[inputs[0]])
    }
}

/// `y = float(Σ_k (q(x) - xzp)(W - Wzp)) * (xs * Ws)`, with `q(x), xs, xzp` the
/// DynamicQuantizeLinear of the whole of x.
#[derive(Debug, Clone)]
pub struct DynQMatMul {
    pub w: Arc<PackedI8>,
    /// One per tensor, or one per column.
    pub w_zp: Arc<Vec<i32>>,
    pub w_scale: Arc<Vec<f32>>,
    pub kernel: Kernel,
    /// Only the last row of x's second-last axis is computed (src/last_row.rs): x is still
    /// quantized as a whole (its scale and zero point over every row), so that row's results are
    /// the ones the whole product gives; the output's second-last axis is 1.
    pub last_row: bool,
}

impl PartialEq for DynQMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w) && self.kernel == other.kernel && self.last_row == other.last_row
    }
}
impl Eq for DynQMatMul {}

impl Op for DynQMatMul {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let last = if self.last_row { " last row" } else { "" };
        Ok(vec![format!("K={} N={} kernel={}{last}", self.w.k, self.w.cols, self.kernel.name())])
    }

    op_as_typed_op!();
}

impl EvalOp for DynQMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let (k, kp, n) = (self.w.k, self.w.kp, self.w.cols);
        let (scale, zp) = dynamic_quantization(xs);
        // the rows computed: every row, or the last of each run along the second-last axis
        let every = xs.chunks_exact(k);
        let taken: Vec<&[f32]> = match (self.last_row, x.rank()) {
            (false, _) => every.collect(),
            (true, rank) if rank >= 2 && x.shape()[rank - 2] > 0 => {
                every.skip(x.shape()[rank - 2] - 1).step_by(x.shape()[rank - 2]).collect()
            }
            (true, _) => bail!("{OP_TYPE} on the last row of x of shape {:?}", x.shape()),
        };
        let rows = taken.len();
        let mut xq = vec![zp; rows * kp];
        for (src, dst) in taken.into_iter().zip(xq.chunks_exact_mut(kp)) {
            quantize(src, scale, zp, &mut dst[..k]);
        }
        let mut y = if self.last_row {
            let mut shape: TVec<usize> = x.shape().into();
            let rank = shape.len();
            (shape[rank - 2], shape[rank - 1]) = (1, n);
            unsafe { Tensor::uninitialized::<f32>(&shape)? }
        } else {
            product_output(&x, n)?
        };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys = view.as_slice_mut::<f32>()?;
            let (w, kernel) = (&*self.w, self.kernel);
            // each part's sums, then its outputs, on the thread that computed them
            let has_wzp = self.w_zp.iter().any(|&z| z != 0);
            split::split_columns(rows, n, w.w.len(), kernel.column_unit(w, rows), ys, |part, ys| {
                let width = part.width(n);
                let mut acc = vec![0i32; part.rows.len() * width];
                kernel.run_part(&xq, zp, w, part.clone(), &mut acc);
                let c0 = part.panels.start * PANEL;
                for (i, acc) in acc.chunks_exact(width).enumerate() {
                    let r = part.rows.start + i;
                    self.dequantize_row(&xq[r * kp..r * kp + k], zp, has_wzp, c0, acc, scale, ys.row(i, width));
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl DynQMatMul {
    /// One row's outputs from its sums over columns `c0..c0 + acc.len()`: the graph's
    /// `Mul(x_scale, W_scale)`, then `Mul(Cast(acc), that)`, less the weights' zero points'
    /// share. `xq`: the row's quantized activations (`zp` their zero point); `has_wzp`: whether
    /// any weight zero point is not 0.
    #[allow(clippy::too_many_arguments)] // one row's inputs; a struct would only rename them
    fn dequantize_row(&self, xq: &[u8], zp: u8, has_wzp: bool, c0: usize, acc: &[i32], scale: f32, y: &mut [f32]) {
        if !has_wzp && self.w_scale.len() == 1 {
            return dequantize(acc, scale * self.w_scale[0], y);
        }
        let per_col = |v: &[f32], c: usize| v[if v.len() == 1 { 0 } else { c }];
        // Σ (xq - xzp)(w - wzp) = Σ (xq - xzp) w - wzp Σ (xq - xzp)
        let row_sum: i32 = if has_wzp { xq.iter().map(|&q| q as i32 - zp as i32).sum() } else { 0 };
        for (j, (y, &a)) in y.iter_mut().zip(acc).enumerate() {
            let c = c0 + j;
            let z = if has_wzp { self.w_zp[if self.w_zp.len() == 1 { 0 } else { c }] } else { 0 };
            *y = (a - z * row_sum) as f32 * (scale * per_col(&self.w_scale, c));
        }
    }
}

impl TypedOp for DynQMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut facts = product_facts(inputs[0], &self.w)?;
        if self.last_row {
            let rank = facts[0].rank();
            ensure!(rank >= 2, "{OP_TYPE} on the last row of x of rank {rank}");
            let mut shape: TVec<TDim> = facts[0].shape.to_tvec();
            shape[rank - 2] = 1.to_dim();
            facts[0] = f32::fact(&shape);
        }
        Ok(facts)
    }

    as_op!();
}

/// The product's type: x's shape with K replaced by N, f32.
pub(crate) fn product_facts(x: &TypedFact, w: &PackedI8) -> TractResult<TVec<TypedFact>> {
    let mut shape: TVec<TDim> = x.shape.to_tvec();
    ensure!(shape.last() == Some(&w.k.to_dim()), "x's last axis must be K = {}", w.k);
    *shape.last_mut().unwrap() = w.cols.to_dim();
    Ok(tvec!(f32::fact(&shape)))
}

/// The product's output for x, uninitialized: every element is written by the caller.
pub(crate) fn product_output(x: &Tensor, n: usize) -> TractResult<Tensor> {
    let mut shape: TVec<usize> = x.shape().into();
    *shape.last_mut().unwrap() = n;
    unsafe { Tensor::uninitialized::<f32>(&shape) }
}

with_avx2! {
    /// DynamicQuantizeLinear's scale and zero point over all of `x`, as the ONNX spec (and tract's
    /// implementation of it) define them: the range extended to include 0, u8 target; NaN skipped.
    ///
    /// In eight lanes, each a compare and select (`minps`/`maxps` on x86): one running pair was a
    /// chain of scalar compares and branches, 2-3% of a prefill on the `report` files. Minima and
    /// maxima are exact in any order.
    pub fn dynamic_quantization = dynamic_quantization_lanes(x: &[f32]) -> (f32, u8)
}

#[inline(always)]
fn dynamic_quantization_lanes(x: &[f32]) -> (f32, u8) {
    const LANES: usize = 8;
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            // false for NaN: the lane keeps its value
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let (mut min, mut max) = (0f32, 0f32);
    for &v in lo.iter().chain(hi.iter()).chain(rest) {
        if v < min {
            min = v;
        } else if v > max {
            max = v;
        }
    }
    let scale = (max - min) / 255.0;
    let zp = (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8; // NaN (all zeros): 0
    (scale, zp)
}

with_avx2! {
    /// `y = acc * s`, each sum converted to f32 and multiplied: the graph's `Cast` and `Mul` by
    /// `x_scale * W_scale` (a scalar W_scale, no weight zero point).
    pub fn dequantize = dequantize_lanes(acc: &[i32], s: f32, y: &mut [f32])
}

#[inline(always)]
fn dequantize_lanes(acc: &[i32], s: f32, y: &mut [f32]) {
    for (y, &a) in y.iter_mut().zip(acc) {
        *y = a as f32 * s;
    }
}

with_avx2! {
    /// `saturate(round_half_to_even(x / scale) + zp)`, NaN (x's own, or 0/0 where x is all zero) as
    /// 0 before the zero point.
    ///
    /// Rounded by adding and subtracting 1.5 * 2^23, which rounds half to even in f32's default
    /// mode for |v| < 2^22, and vectorizes (`round_ties_even` is a libm call per element without
    /// SSE4.1: 5% of a distilgpt2-shape token). Clamping v to ±512 first keeps it in that range and
    /// changes no result: zp is within [0, 255], so anything beyond saturates either way. With NaN
    /// made 0 and the value within ±512, the cast to i32 cannot overflow: the plain conversion
    /// (`cvttps2dq`), where `as`'s saturating one stayed scalar.
    pub fn quantize = quantize_lanes(x: &[f32], scale: f32, zp: u8, out: &mut [u8])
}

#[inline(always)]
fn quantize_lanes(x: &[f32], scale: f32, zp: u8, out: &mut [u8]) {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (v / scale).clamp(-512.0, 512.0);
        let q = if q.is_nan() { 0.0 } else { q };
        // SAFETY: q is an integer within ±512 after the rounding, not NaN
        let r: i32 = unsafe { ((q + ROUND) - ROUND).to_int_unchecked() };
        *o = (r + zp as i32).clamp(0, 255) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_proto::{model, value};
    use tract_onnx::pb::{GraphProto, NodeProto, ValueInfoProto};
    use tract_onnx::prelude::tract_ndarray::ArrayD;

    /// tract's DynamicQuantizeLinear of `x`: (y, scale, zero point).
    fn tracts(x: &[f32]) -> (Vec<u8>, f32, u8) {
        let out = |name: &str| ValueInfoProto { name: name.into(), ..Default::default() };
        let graph = GraphProto {
            node: vec![NodeProto {
                op_type: "DynamicQuantizeLinear".into(),
                input: vec!["x".into()],
                output: vec!["y".into(), "s".into(), "z".into()],
                ..Default::default()
            }],
            input: vec![value("x", &[x.len() as i64])],
            output: vec![out("y"), out("s"), out("z")],
            ..Default::default()
        };
        let plan = tract_onnx::onnx().model_for_proto_model(&model(graph)).unwrap().into_typed().unwrap().into_runnable().unwrap();
        let input = ArrayD::from_shape_vec(vec![x.len()], x.to_vec()).unwrap().into_tensor();
        let r = plan.run(tvec!(input.into())).unwrap();
        let y = r[0].to_plain_array_view::<u8>().unwrap().iter().copied().collect();
        let first = |t: &TValue| t.to_plain_array_view::<f32>().unwrap().iter().next().copied().unwrap();
        let zp = *r[2].to_plain_array_view::<u8>().unwrap().iter().next().unwrap();
        (y, first(&r[1]), zp)
    }

    /// Our scale, zero point and quantization, vectorized, equal tract's scalar ones bit for bit:
    /// lengths around the eight lanes, ties after the scaling, NaN (skipped by the range, 0
    /// before the zero point), infinities, an all-zero x (its 0/0), one sign only.
    #[test]
    fn dynamic_quantization_equals_tracts() {
        let wave = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i as f32) * 0.7).sin() * 3.0 - 0.4).collect() };
        let mut cases: Vec<Vec<f32>> = [1, 7, 8, 9, 16, 37, 576].into_iter().map(wave).collect();
        // values that land on halves once divided by the scale 2/255 (range [-1, 1])
        cases.push((0..40).map(|i| if i == 0 { -1.0 } else if i == 1 { 1.0 } else { (i as f32 - 20.0) * 0.5 * (2.0 / 255.0) }).collect());
        for (at, v) in [(3, f32::NAN), (12, f32::NAN), (5, f32::INFINITY), (30, f32::NEG_INFINITY)] {
            let mut x = wave(37);
            x[at] = v;
            cases.push(x);
        }
        cases.push(vec![0.0; 19]);
        cases.push(wave(23).iter().map(|v| v.abs() + 0.1).collect());
        cases.push(wave(23).iter().map(|v| -v.abs() - 0.1).collect());
        for x in &cases {
            let (want, ws, wz) = tracts(x);
            let (scale, zp) = dynamic_quantization(x);
            assert_eq!((scale.to_bits(), zp), (ws.to_bits(), wz), "scale and zero point of {x:?}");
            let mut got = vec![0u8; x.len()];
            quantize(x, scale, zp, &mut got);
            assert_eq!(got, want, "{x:?}");
        }
    }
}
