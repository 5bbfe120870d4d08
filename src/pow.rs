//! `Pow(x, 3)` -> `Mul(Mul(x, x), x)` in the ONNX protobuf, before tract sees it.
//!
//! GPT-2's GELU (`0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`) is exported with `Pow(x, 3.0)`.
//! tract evaluates it with `powf` per element: 0.14 ms of distilgpt2-shape's ~4 ms per token
//! (`wasmlm profile`, 6 calls). ONNX Runtime's CPU `Pow` computes a constant exponent of 3 as
//! `(x * x) * x`: checked bitwise on 100,000 random values (onnxruntime 1.23.2, optimizations
//! off), where the correctly rounded cube differs on a quarter of them. So this rewrite is also
//! the reference's arithmetic. Only a scalar FLOAT exponent of exactly 3, from an initializer or
//! a `Constant` node, is rewritten; anything else stays a `Pow`.

use tract_onnx::pb::{ModelProto, NodeProto};

use crate::proto::scalar_constants;

/// Rewrites in place; returns how many `Pow` nodes became two `Mul`s.
pub fn cube_powers(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let constants = scalar_constants(graph);
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut rewritten = 0;
    for n in std::mem::take(&mut graph.node) {
        let cube = n.op_type == "Pow"
            && n.input.len() == 2
            && n.output.len() == 1
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && constants.get(&n.input[1]) == Some(&3.0);
        if !cube {
            nodes.push(n);
            continue;
        }
        let (x, y) = (n.input[0].clone(), n.output[0].clone());
        let square = format!("{y}__wasmlm_square");
        let mul = |name: String, a: &str, b: &str, out: &str| NodeProto {
            name,
            op_type: "Mul".into(),
            input: vec![a.into(), b.into()],
            output: vec![out.into()],
            ..Default::default()
        };
        nodes.push(mul(format!("{}__wasmlm_square", n.name), &x, &x, &square));
        nodes.push(mul(format!("{}__wasmlm_cube", n.name), &square, &x, &y));
        rewritten += 1;
    }
    graph.node = nodes;
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, GraphProto, TensorProto};

    fn constant(out: &str, v: f32) -> NodeProto {
        let t = TensorProto { data_type: DataType::Float as i32, float_data: vec![v], ..Default::default() };
        let attr = AttributeProto { name: "value".into(), t: Some(t), ..Default::default() };
        NodeProto { op_type: "Constant".into(), output: vec![out.into()], attribute: vec![attr], ..Default::default() }
    }

    fn pow(x: &str, e: &str, y: &str) -> NodeProto {
        NodeProto { op_type: "Pow".into(), input: vec![x.into(), e.into()], output: vec![y.into()], ..Default::default() }
    }

    #[test]
    fn only_a_scalar_exponent_of_three_becomes_two_products() {
        let raw = TensorProto {
            name: "three_raw".into(),
            data_type: DataType::Float as i32,
            raw_data: 3f32.to_le_bytes().to_vec(),
            ..Default::default()
        };
        let graph = GraphProto {
            node: vec![
                constant("three", 3.0),
                constant("half", 0.5),
                pow("x", "three", "a"),
                pow("x", "half", "b"),
                pow("x", "three_raw", "c"),
                pow("x", "unknown", "d"),
            ],
            initializer: vec![raw],
            ..Default::default()
        };
        let mut model = ModelProto { graph: Some(graph), ..Default::default() };
        assert_eq!(cube_powers(&mut model), 2);
        let ops: Vec<(&str, Vec<&str>, &str)> = model.graph.as_ref().unwrap().node[2..]
            .iter()
            .map(|n| (n.op_type.as_str(), n.input.iter().map(|s| s.as_str()).collect(), n.output[0].as_str()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("Mul", vec!["x", "x"], "a__wasmlm_square"),
                ("Mul", vec!["a__wasmlm_square", "x"], "a"),
                ("Pow", vec!["x", "half"], "b"),
                ("Mul", vec!["x", "x"], "c__wasmlm_square"),
                ("Mul", vec!["c__wasmlm_square", "x"], "c"),
                ("Pow", vec!["x", "unknown"], "d"),
            ]
        );
    }
}
