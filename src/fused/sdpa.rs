//! PyTorch's `scaled_dot_product_attention` as its ONNX exporter writes it (transformers' default
//! attention, so Optimum's and transformers.js's files), brought to the shape the attention core
//! ([`super::attention`]) is found in, on the protobuf before tract reads it:
//!
//! ```text
//! MatMul(Mul(Q, √s), Mul(Transpose(K), √s))  ->  Mul(MatMul(Q, Transpose(K)), √s·√s)
//! Where(IsNaN(Softmax(x)), 0, Softmax(x))     ->  Softmax(x)
//! ```
//!
//! The first moves the scale, split between the two operands, after the product: one scale of
//! the scores, as the eager attention our own exports use writes it (the product then reads K
//! transposed, [`super::matmul`]). In floating point the two orders round differently; the
//! scores stay within the FP32 parity bound (`tests/matrix.rs` holds these files to ONNX
//! Runtime's logits at 1e-4 of their range).
//!
//! The second drops the guard for rows that are all masked: a softmax of a row whose every score
//! is -inf is NaN, and the guard makes it 0. The engine feeds an attention mask of ones and the
//! graph's mask is causal, so every row sees at least its own position, and the guard never
//! fires; without it, the softmax feeds the product of the values directly, as the attention core
//! needs.

use std::collections::HashMap;

use tract_onnx::pb::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, TensorProto};

use crate::proto::{default_domain, drop_unread, replace_nodes, scalar_constants, Index};

/// Both rewrites; returns (scales moved, guards dropped).
pub fn rewrite(model: &mut ModelProto) -> (usize, usize) {
    let Some(graph) = model.graph.as_mut() else { return (0, 0) };
    let scales = move_scales(graph);
    let guards = drop_nan_guards(graph);
    if scales + guards > 0 {
        drop_unread(graph);
    }
    (scales, guards)
}

fn move_scales(graph: &mut GraphProto) -> usize {
    let constants = scalar_constants(graph);
    let index = Index::new(graph);
    // (node, Q, Kᵀ, the scales' product)
    let mut found: Vec<(usize, String, String, f32)> = vec![];
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "MatMul" || !default_domain(n) || n.input.len() != 2 {
            continue;
        }
        // x · c for a one-element constant c, read by this MatMul only: (x, c)
        let scaled = |name: &str| -> Option<(String, f32)> {
            let m = index.producer(name).filter(|m| m.op_type == "Mul" && default_domain(m) && index.read_once(name))?;
            match (constants.get(&m.input[0]), constants.get(&m.input[1])) {
                (None, Some(&c)) => Some((m.input[0].clone(), c)),
                (Some(&c), None) => Some((m.input[1].clone(), c)),
                _ => None,
            }
        };
        let (Some((q, a)), Some((kt, b))) = (scaled(&n.input[0]), scaled(&n.input[1])) else { continue };
        let swaps_last_two = index.producer(&kt).is_some_and(|t| {
            let perm = t.attribute.iter().find(|a| a.name == "perm").map(|a| a.ints.clone()).unwrap_or_default();
            let r = perm.len();
            t.op_type == "Transpose" && r >= 2 && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i as i64)
                && perm[r - 2..] == [r as i64 - 1, r as i64 - 2]
        });
        let scale = a * b;
        if swaps_last_two && scale.is_finite() {
            found.push((i, q, kt, scale));
        }
    }
    let count = found.len();
    let mut replace = HashMap::new();
    for (i, q, kt, scale) in found {
        let n = &graph.node[i];
        let p = if n.name.is_empty() { n.output[0].clone() } else { n.name.clone() };
        let (product, c) = (format!("{p}.unscaled"), format!("{p}.scale"));
        graph.initializer.push(TensorProto {
            name: c.clone(),
            data_type: DataType::Float as i32,
            float_data: vec![scale],
            ..Default::default()
        });
        replace.insert(i, vec![
            NodeProto { name: product.clone(), op_type: "MatMul".into(), input: vec![q, kt], output: vec![product.clone()], ..Default::default() },
            NodeProto { name: p, op_type: "Mul".into(), input: vec![product, c], output: n.output.clone(), ..Default::default() },
        ]);
    }
    replace_nodes(graph, replace);
    count
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
    use tract_onnx::prelude::*;

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

    fn run(proto: &ModelProto) -> Vec<f32> {
        let model = tract_onnx::onnx().model_for_proto_model(proto).unwrap().into_optimized().unwrap().into_runnable().unwrap();
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

    #[test]
    fn the_scale_moves_after_the_product_and_the_guard_goes() {
        let original = sdpa(false);
        let mut proto = original.clone();
        assert_eq!(rewrite(&mut proto), (1, 1));
        let g = proto.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Transpose", "MatMul", "Mul", "Add", "Softmax", "MatMul"]);
        let (a, b) = (run(&original), run(&proto));
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn a_guard_the_caller_reads_stays() {
        let mut proto = sdpa(true);
        assert_eq!(rewrite(&mut proto), (1, 0));
    }
}
