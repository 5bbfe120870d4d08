//! PyTorch's `scaled_dot_product_attention` as its ONNX exporter writes it (transformers' default
//! attention, so Optimum's and transformers.js's files), brought to the shape the attention core
//! ([`super::attention`]) is found in:
//!
//! ```text
//! MatMul(Mul(Q, √s), Mul(Transpose(K), √s))  ->  Mul(MatMul(Q, Transpose(K)), √s·√s)
//! Where(IsNaN(Softmax(x)), 0, Softmax(x))     ->  Softmax(x)
//! ```
//!
//! The first ([`move_scales`]) moves the scale, split between the two operands, after the
//! product: one scale of the scores, as the eager attention our own exports use writes it (the
//! product then reads K transposed, [`super::matmul::ActMatMul`]). It runs on the typed model,
//! after tract's declutter, where √s is a constant even when the file computes it from the head
//! size's shape (GPT-2's export: `Sqrt(1 / Sqrt(Cast(Shape(q)[-1])))`). In floating point the two
//! orders round differently; the scores stay within the FP32 parity bound (`tests/matrix.rs`
//! holds these files to ONNX Runtime's logits at 1e-4 of their range).
//!
//! The second drops the guard for rows that are all masked: a softmax of a row whose every score
//! is -inf is NaN, and the guard makes it 0. The engine feeds an attention mask of ones and the
//! graph's mask is causal, so every row sees at least its own position, and the guard never
//! fires; without it, the softmax feeds the product of the values directly, as the attention core
//! needs. It is made on the protobuf before tract reads it ([`rewrite`]).

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, ModelProto};
use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::math::{mul, Mul};
use tract_onnx::tract_hir::internal::*;

use super::matmul::ActMatMul;
use crate::proto::{default_domain, drop_unread, scalar_constants, Index};

/// The guards' rewrite, on the protobuf; returns how many guards were dropped.
pub fn rewrite(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let guards = drop_nan_guards(graph);
    if guards > 0 {
        drop_unread(graph);
    }
    guards
}

/// On the typed model: each product `ActMatMul(Mul(Q, a), Mul(Kᵀ, b))` of scalar constants a and
/// b, where Kᵀ swaps K's last two axes (or is a broadcast of such a swap along the heads, as tract
/// writes one key/value head repeated), becomes `Mul(ActMatMul(Q, K, trans_b), a·b)`. Returns how
/// many.
pub fn move_scales(model: &mut TypedModel) -> TractResult<usize> {
    let only_reader = |o: OutletId| super::only_reader(model, o);
    // x · c for a one-element f32 constant c, read by the product only: (x, c)
    let scaled = |o: OutletId| -> Option<(OutletId, f32)> {
        let m = model.node(o.node);
        let bin = m.op_as::<TypedBinOp>()?;
        if !bin.0.is::<Mul>() || bin.1.is_some() || !only_reader(o) {
            return None;
        }
        let konst = |i: usize| {
            let k = model.outlet_fact(m.inputs[i]).ok()?.konst.clone()?;
            (k.len() == 1 && k.datum_type() == f32::datum_type()).then(|| k.cast_to_scalar::<f32>().ok()).flatten()
        };
        match (konst(0), konst(1)) {
            (None, Some(c)) => Some((m.inputs[0], c)),
            (Some(c), None) => Some((m.inputs[1], c)),
            _ => None,
        }
    };
    let mut found = vec![];
    for node in &model.nodes {
        if node.op_as::<ActMatMul>() != Some(&ActMatMul { trans_b: false, group: 1 }) {
            continue;
        }
        let (Some((q, a)), Some((kt, b))) = (scaled(node.inputs[0]), scaled(node.inputs[1])) else { continue };
        // Kᵀ, or a broadcast of its heads (one key/value head for all: Gemma)
        let rank = model.outlet_fact(kt)?.rank();
        let broadcast = model.node(kt.node).op_as::<MultiBroadcastTo>().map(|b| b.shape.clone());
        let swapped = if broadcast.is_some() { model.node(kt.node).inputs[0] } else { kt };
        let last_two = |x: usize, y: usize| rank >= 2 && x.min(y) == rank - 2 && x.max(y) == rank - 1;
        let swap = model.node(swapped.node);
        let swaps_last_two = matches!(swap.op_as::<AxisOp>(), Some(AxisOp::Move(x, y)) if last_two(*x, *y));
        let scale = a * b;
        if swaps_last_two && only_reader(kt) && only_reader(swapped) && scale.is_finite() {
            // the broadcast's shape, for K: its last two axes swapped back
            let shape = broadcast.map(|s| {
                let mut dims = s.to_tvec();
                dims.swap(rank - 2, rank - 1);
                ShapeFact::from_dims(dims)
            });
            found.push((node.id, q, swap.inputs[0], shape, scale));
        }
    }
    for (id, q, k, shape, scale) in &found {
        let (id, scale) = (*id, *scale);
        let name = model.node(id).name.clone();
        let rank = model.outlet_fact(OutletId::new(id, 0))?.rank();
        let mut patch = TypedModelPatch::default();
        let (q, mut k) = (patch.tap_model(model, *q)?, patch.tap_model(model, *k)?);
        if let Some(shape) = shape {
            k = patch.wire_node(format!("{name}.keys"), MultiBroadcastTo { shape: shape.clone() }, &[k])?[0];
        }
        let product = patch.wire_node(format!("{name}.unscaled"), ActMatMul { trans_b: true, group: 1 }, &[q, k])?[0];
        let c = patch.add_const(format!("{name}.scale"), tensor0(scale).broadcast_into_rank(rank)?)?;
        let y = patch.wire_node(format!("{name}.scaled"), mul(), &[product, c])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(found.len())
}

fn drop_nan_guards(graph: &mut GraphProto) -> usize {
    let constants = scalar_constants(graph);
    let index = Index::new(graph);
    // the guard's output -> the softmax's
    let mut to: HashMap<String, String> = HashMap::new();
    for n in &graph.node {
        if n.op_type != "Where" || !default_domain(n) || n.input.len() != 3 || n.output.len() != 1 {
            continue;
        }
        let (cond, zero, x) = (&n.input[0], &n.input[1], &n.input[2]);
        let is_nan_of_x = index.producer(cond).is_some_and(|c| c.op_type == "IsNaN" && c.input.first() == Some(x));
        let softmax = index.producer(x).is_some_and(|s| s.op_type == "Softmax" && default_domain(s));
        if is_nan_of_x && softmax && constants.get(zero) == Some(&0.0) {
            to.insert(n.output[0].clone(), x.clone());
        }
    }
    if to.is_empty() || graph.output.iter().any(|o| to.contains_key(&o.name)) {
        return 0;
    }
    for n in graph.node.iter_mut() {
        for x in n.input.iter_mut() {
            if let Some(s) = to.get(x) {
                *x = s.clone();
            }
        }
    }
    to.len()
}

#[cfg(test)]
mod tests {
    use super::super::test_proto::*;
    use super::*;
    use tract_onnx::pb::{tensor_proto::DataType, TensorProto};

    /// softmax(Q·√s (Kᵀ·√s) + mask), guarded, times V, as the exporter writes it; Q (2, 4, 8), K
    /// and V (2, 5, 8), a causal-like mask (every row sees a key). With `guard_read_elsewhere`,
    /// the guarded softmax is an output too.
    fn sdpa(guard_read_elsewhere: bool) -> ModelProto {
        let init = |name: &str, v: f32| TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            float_data: vec![v],
            ..Default::default()
        };
        let mut nodes = vec![
            node("Transpose", &["k"], "kt"),
            node("Mul", &["q", "c"], "qs"),
            node("Mul", &["kt", "c"], "kts"),
            node("MatMul", &["qs", "kts"], "scores"),
            node("Add", &["scores", "mask"], "masked"),
            node("Softmax", &["masked"], "p"),
            node("IsNaN", &["p"], "nan"),
            node("Where", &["nan", "zero", "p"], "pg"),
            node("MatMul", &["pg", "v"], "y"),
        ];
        nodes[0].attribute.push(tract_onnx::pb::AttributeProto {
            name: "perm".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![0, 2, 1],
            ..Default::default()
        });
        let mut output = vec![value("y", &[2, 4, 8])];
        if guard_read_elsewhere {
            output.push(value("pg", &[2, 4, 5]));
        }
        model(GraphProto {
            node: nodes,
            initializer: vec![init("c", 0.353_553_4_f32.sqrt()), init("zero", 0.0)],
            input: vec![value("q", &[2, 4, 8]), value("k", &[2, 5, 8]), value("v", &[2, 5, 8]), value("mask", &[4, 5])],
            output,
            ..Default::default()
        })
    }

    fn run(proto: ModelProto) -> Vec<f32> {
        run_typed(tract_onnx::onnx().model_for_proto_model(&proto).unwrap().into_typed().unwrap())
    }

    fn run_typed(model: TypedModel) -> Vec<f32> {
        let model = model.into_optimized().unwrap().into_runnable().unwrap();
        let t = |shape: &[usize], f: &dyn Fn(usize) -> f32| {
            let n = shape.iter().product();
            tract_ndarray::ArrayD::from_shape_vec(shape, (0..n).map(f).collect()).unwrap().into_tvalue()
        };
        let mask = t(&[4, 5], &|i| if i % 5 > i / 5 + 1 { f32::NEG_INFINITY } else { 0.0 });
        let out = model
            .run(tvec!(
                t(&[2, 4, 8], &|i| ((i * 37) % 17) as f32 / 9.0 - 0.9),
                t(&[2, 5, 8], &|i| ((i * 11) % 13) as f32 / 7.0 - 0.8),
                t(&[2, 5, 8], &|i| ((i * 5) % 7) as f32 - 3.0),
                mask
            ))
            .unwrap();
        out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    /// The protobuf through tract with our products, decluttered.
    fn typed(mut proto: ModelProto) -> TypedModel {
        let mut onnx = tract_onnx::onnx();
        super::super::register(&mut onnx);
        super::super::rewrite(&mut proto);
        let mut model = onnx.model_for_proto_model(&proto).unwrap().into_typed().unwrap();
        model.declutter().unwrap();
        model
    }

    #[test]
    fn the_guard_goes_and_the_scale_moves_after_the_product() {
        let original = sdpa(false);
        let mut proto = original.clone();
        assert_eq!(rewrite(&mut proto), 1);
        let ops: Vec<&str> = proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Transpose", "Mul", "Mul", "MatMul", "Add", "Softmax", "MatMul"]);
        let mut model = typed(proto);
        assert_eq!(move_scales(&mut model).unwrap(), 1);
        let products: Vec<&ActMatMul> = model.nodes.iter().filter_map(|n| n.op_as::<ActMatMul>()).collect();
        assert_eq!(products, [&ActMatMul { trans_b: true, group: 1 }, &ActMatMul { trans_b: false, group: 1 }]);
        let (a, b) = (run(original), run_typed(model));
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn a_guard_the_caller_reads_stays() {
        let mut proto = sdpa(true);
        assert_eq!(rewrite(&mut proto), 0);
    }
}
