//! Llama's rotary position embedding, `x cos + rotate_half(x) sin`, as one op.
//!
//! The export writes it as seven nodes for each of a layer's queries and keys: two `Slice`s,
//! `Neg`, `Concat`, two `Mul`s and an `Add`, 420 of SmolLM2's ~1,100 plan nodes run per token.
//! tract-transformers finds the pattern on the typed model (`rotate_half_rule`, then
//! `apply_rope_rule`, as its `detect_apply_rope` transform does) and puts its `ApplyRope` op in
//! its place; that op's eval still runs `RotateHalf`, two `Mul`s and an `Add` through tract's
//! broadcasting binary path, four new tensors. [`Rope`] replaces it where the operands are f32
//! and cos and sin broadcast to the input's shape: the same products and sum (each rounded to
//! f32, as tract's `Mul` and `Add`), element by element, in the input's buffer. Its results are
//! therefore bit-identical to the unfused graph's (`rope_equals_tracts_nodes_bit_for_bit`).

use tract_onnx::tract_core::broadcast::multi_broadcast;
use tract_onnx::tract_core::model::Rewriter;
use tract_onnx::tract_hir::internal::*;
use tract_transformers::ops::apply_rope::ApplyRope;
use tract_transformers::ops::{apply_rope_rule, rotate_half_rule};

/// The op's name in a plan.
pub const OP_NAME: &str = "WasmlmRope";

/// Finds the rotary embeddings of `model` (tract-transformers' rules) and runs the f32 ones on
/// [`Rope`]; returns how many.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    Rewriter::default()
        .with_rule_for("detect-rotate-half", rotate_half_rule)
        .with_rule_for("detect-apply-rope", apply_rope_rule)
        .rewrite(&(), model)?;
    let mut ours = vec![];
    for node in model.nodes.iter().filter(|n| n.op_is::<ApplyRope>()) {
        let facts = model.node_input_facts(node.id)?;
        let f32s = facts.iter().all(|f| f.datum_type == f32::datum_type());
        let shapes: Vec<TVec<TDim>> = facts.iter().map(|f| f.shape.to_tvec()).collect();
        // ApplyRope's output has the input's shape: so must cos and sin broadcast to it
        if f32s && multi_broadcast(&shapes).ok().as_deref() == Some(&shapes[0][..]) {
            ours.push(node.id);
        }
    }
    for &id in &ours {
        model.node_mut(id).op = Box::new(Rope);
    }
    Ok(ours.len())
}

/// `y = x cos + rotate_half(x) sin` along the last axis, where `rotate_half(x) = [-x₂, x₁]` for
/// the halves `x₁, x₂` of each row; f32; cos and sin broadcast to x's shape.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Rope;

impl Op for Rope {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    op_as_typed_op!();
}

impl EvalOp for Rope {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, cos, sin) = args_3!(inputs);
        let mut y = x.into_tensor();
        let shape: TVec<usize> = y.shape().into();
        let last = shape.len().checked_sub(1).context("rotary embedding of a scalar")?;
        let d = shape[last];
        ensure!(d.is_multiple_of(2), "rotary embedding over an odd last axis: {shape:?}");
        if y.len() == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        let (sc, ss) = (broadcast_strides(cos.shape(), &shape)?, broadcast_strides(sin.shape(), &shape)?);
        let (cos, sin) = (cos.try_as_plain_ram()?, sin.try_as_plain_ram()?);
        let (cos, sin) = (cos.as_slice::<f32>()?, sin.as_slice::<f32>()?);
        let mut view = y.try_as_plain_ram_mut()?;
        let half = d / 2;
        let mut row = vec![0f32; d];
        // the row's offsets in cos and sin, moved along the outer axes as an odometer
        let (mut idx, mut oc, mut os) = (tvec![0usize; last], 0, 0);
        // cos and sin contiguous along the last axis (as every exporter writes them): each half
        // a loop of its own that vectorizes, where one loop with the halves' branch and strided
        // reads stayed scalar (4% of a 32-token prefill of the `ort-dynamic-qint8` file natively,
        // `perf record`). The same products and sums either way.
        let contiguous = sc[last] == 1 && ss[last] == 1;
        for y in view.as_slice_mut::<f32>()?.chunks_exact_mut(d) {
            row.copy_from_slice(y);
            if contiguous {
                let (c, s) = (&cos[oc..][..d], &sin[os..][..d]);
                let (lo, hi) = row.split_at(half);
                let (ylo, yhi) = y.split_at_mut(half);
                for j in 0..half {
                    ylo[j] = lo[j] * c[j] + -hi[j] * s[j];
                }
                for j in 0..half {
                    yhi[j] = hi[j] * c[half + j] + lo[j] * s[half + j];
                }
            } else {
                for j in 0..d {
                    let rotated = if j < half { -row[j + half] } else { row[j - half] };
                    let (a, b) = (row[j] * cos[oc + j * sc[last]], rotated * sin[os + j * ss[last]]);
                    y[j] = a + b;
                }
            }
            for i in (0..last).rev() {
                idx[i] += 1;
                (oc, os) = (oc + sc[i], os + ss[i]);
                if idx[i] < shape[i] {
                    break;
                }
                (oc, os) = (oc - sc[i] * shape[i], os - ss[i] * shape[i]);
                idx[i] = 0;
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

/// The strides (in elements) that read a contiguous tensor of shape `from` broadcast to `to`,
/// numpy's way: 0 along the axes it is repeated on.
pub(super) fn broadcast_strides(from: &[usize], to: &[usize]) -> TractResult<TVec<usize>> {
    let bad = || format!("rotary cos/sin of shape {from:?} does not broadcast to the input's {to:?}");
    ensure!(from.len() <= to.len(), bad());
    let pad = to.len() - from.len();
    let mut strides = tvec![0; to.len()];
    let mut step = 1;
    for (i, &n) in from.iter().enumerate().rev() {
        ensure!(n == to[i + pad] || n == 1, bad());
        strides[i + pad] = if n == 1 { 0 } else { step };
        step *= n;
    }
    Ok(strides)
}

impl TypedOp for Rope {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::test_proto::{model, node, value};
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::{AttributeProto, GraphProto, ModelProto, TensorProto};
    use tract_onnx::prelude::tract_ndarray::ArrayD;

    fn ints(name: &str, v: &[i64]) -> TensorProto {
        TensorProto { name: name.into(), data_type: DataType::Int64 as i32, dims: vec![v.len() as i64], int64_data: v.to_vec(), ..Default::default() }
    }

    /// `y = x cos + cat(-x[..., cut:], x[..., :cut]) sin` as Llama's export writes it, x (1, 3, 5, 8)
    /// and cos, sin (1, 1, 5, 8) broadcast over the heads.
    fn rope_graph(cut: i64) -> ModelProto {
        let mut concat = node("Concat", &["neg", "lo"], "rot");
        concat.attribute.push(AttributeProto { name: "axis".into(), r#type: 2, i: -1, ..Default::default() });
        let graph = GraphProto {
            node: vec![
                node("Mul", &["x", "cos"], "xc"),
                node("Slice", &["x", "cut", "end", "axes"], "hi"),
                node("Slice", &["x", "zero", "cut", "axes"], "lo"),
                node("Neg", &["hi"], "neg"),
                concat,
                node("Mul", &["rot", "sin"], "rs"),
                node("Add", &["xc", "rs"], "y"),
            ],
            initializer: vec![ints("cut", &[cut]), ints("end", &[i64::MAX]), ints("axes", &[-1]), ints("zero", &[0])],
            input: vec![value("x", &[1, 3, 5, 8]), value("cos", &[1, 1, 5, 8]), value("sin", &[1, 1, 5, 8])],
            output: vec![value("y", &[1, 3, 5, 8])],
            ..Default::default()
        };
        model(graph)
    }

    /// (ropes on our op, the output) for inputs that are not exact in f32 (thirds, sevenths).
    fn run(cut: i64, fuse_it: bool) -> (usize, Vec<f32>) {
        let model = tract_onnx::onnx().model_for_proto_model(&rope_graph(cut)).unwrap();
        let mut typed = model.into_typed().unwrap();
        typed.declutter().unwrap();
        let fused = if fuse_it { fuse(&mut typed).unwrap() } else { 0 };
        assert_eq!(fused, typed.nodes.iter().filter(|n| n.op_is::<Rope>()).count());
        let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
        let t = |shape: &[usize], f: fn(usize) -> f32| {
            ArrayD::from_shape_vec(shape, (0..shape.iter().product()).map(f).collect()).unwrap().into_tensor()
        };
        let x = t(&[1, 3, 5, 8], |i| (i as f32 / 3.0).sin() * 7.0);
        let cos = t(&[1, 1, 5, 8], |i| (i as f32 / 7.0).cos());
        let sin = t(&[1, 1, 5, 8], |i| (i as f32 / 7.0).sin());
        let out = plan.run(tvec!(x.into(), cos.into(), sin.into())).unwrap();
        (fused, out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect())
    }

    #[test]
    fn rope_equals_tracts_nodes_bit_for_bit() {
        let (fused, y) = run(4, true);
        let (_, want) = run(4, false);
        assert_eq!(fused, 1);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&want));
        // a rotation by other than half the axis is not Llama's: left to tract, still right
        let (fused, y) = run(3, true);
        assert_eq!((fused, bits(&y)), (0, bits(&run(3, false).1)));
    }

    #[test]
    fn cos_that_does_not_broadcast_to_x_is_an_error() {
        assert_eq!(&broadcast_strides(&[5, 8], &[1, 3, 5, 8]).unwrap()[..], &[0, 0, 8, 1]);
        assert_eq!(&broadcast_strides(&[1, 1, 5, 8], &[1, 3, 5, 8]).unwrap()[..], &[0, 0, 8, 1]);
        let e = broadcast_strides(&[1, 2, 5, 8], &[1, 3, 5, 8]).unwrap_err();
        assert!(e.to_string().contains("does not broadcast"), "{e}");
    }
}
