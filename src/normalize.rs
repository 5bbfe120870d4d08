//! Rewrites, on the protobuf before tract reads it, that bring other exporters' graph shapes to
//! ones tract takes:
//!
//! - [`unpack_qkv`]: onnxruntime-genai's `GroupQueryAttention` with packed QKV;
//! - [`half_gemms`]: an FP16 file's `Gemm`s.
//!
//! ## Packed QKV
//! onnxruntime-genai's `GroupQueryAttention` (com.microsoft) with packed QKV: its model builder
//! writes one product for the queries, keys and values and feeds the result as `query`, leaving
//! the `key` and `value` inputs empty. tract's op (tract-onnx's `group_query_attention`) takes
//! them apart only; this rewrite, on the protobuf before tract reads it, cuts the packed tensor
//! into the three:
//!
//! ```text
//! qkv (B, S, (H + 2 Hkv) * D) --Reshape [0, 0, H + 2 Hkv, -1]--> (B, S, H + 2 Hkv, D)
//!     --Split axis 2 [H, Hkv, Hkv]--> three --Reshape [0, 0, -1]--> query, key, value
//! ```
//!
//! `H` and `Hkv` are the node's `num_heads` and `kv_num_heads` attributes, so nothing depends on
//! a shape the file may not declare.

use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto};

use crate::proto::replace_nodes;

/// Rewrites every packed-QKV `GroupQueryAttention` of `model`; returns how many.
pub fn unpack_qkv(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let mut replace = std::collections::HashMap::new();
    let mut consts = vec![];
    for (i, n) in graph.node.iter().enumerate() {
        let packed = n.op_type == "GroupQueryAttention"
            && n.domain == "com.microsoft"
            && !n.input.is_empty()
            && n.input.get(1).is_none_or(|k| k.is_empty())
            && n.input.get(2).is_none_or(|v| v.is_empty());
        let heads = |name: &str| n.attribute.iter().find(|a| a.name == name).map(|a| a.i).filter(|&h| h > 0);
        let (Some(h), Some(hkv)) = (heads("num_heads"), heads("kv_num_heads")) else { continue };
        if !packed {
            continue;
        }
        let p = format!("{}.unpacked", if n.name.is_empty() { &n.output[0] } else { &n.name });
        let (split_shape, flat, sizes) = (format!("{p}.heads_shape"), format!("{p}.flat_shape"), format!("{p}.sizes"));
        consts.push(int64(&split_shape, &[0, 0, h + 2 * hkv, -1]));
        consts.push(int64(&flat, &[0, 0, -1]));
        consts.push(int64(&sizes, &[h, hkv, hkv]));
        let heads_out = format!("{p}.heads");
        let parts: Vec<String> = ["q", "k", "v"].iter().map(|x| format!("{p}.{x}4")).collect();
        let outs: Vec<String> = ["q", "k", "v"].iter().map(|x| format!("{p}.{x}")).collect();
        let mut nodes = vec![
            node("Reshape", vec![n.input[0].clone(), split_shape], vec![heads_out.clone()], vec![]),
            node("Split", vec![heads_out, sizes], parts.clone(), vec![AttributeProto {
                name: "axis".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
                i: 2,
                ..Default::default()
            }]),
        ];
        for (part, out) in parts.iter().zip(&outs) {
            nodes.push(node("Reshape", vec![part.clone(), flat.clone()], vec![out.clone()], vec![]));
        }
        let mut gqa = n.clone();
        while gqa.input.len() < 3 {
            gqa.input.push(String::new());
        }
        gqa.input[..3].clone_from_slice(&outs);
        nodes.push(gqa);
        replace.insert(i, nodes);
    }
    let count = replace.len();
    graph.initializer.extend(consts);
    replace_nodes(graph, replace);
    count
}

fn int64(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Int64 as i32,
        dims: vec![values.len() as i64],
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, input: Vec<String>, output: Vec<String>, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto { op_type: op.into(), input, output, attribute, ..Default::default() }
}

/// ## FP16 `Gemm`
/// tract's `Gemm` scales `C` by `beta` as an f32 constant, so an FP16 file's `Gemm` (GPT-2's
/// projections, in transformers.js's fp16 and q4f16 files) comes out F32 and the graph no longer
/// type-checks. `Gemm(A, B, C)` with `alpha = beta = 1` and a FLOAT16 `B` initializer becomes
/// `Add(MatMul(A, B or Bᵀ), C)`, what the `Gemm` computes. Returns how many.
pub fn half_gemms(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let half: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Float16 as i32 && t.dims.len() == 2)
        .map(|t| t.name.as_str())
        .collect();
    let mut replace = std::collections::HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let attr = |name: &str| n.attribute.iter().find(|a| a.name == name);
        let float = |name: &str| attr(name).map_or(1.0, |a| a.f);
        let int = |name: &str| attr(name).map_or(0, |a| a.i);
        if n.op_type != "Gemm" || !crate::proto::default_domain(n) || n.input.len() < 2 || !half.contains(n.input[1].as_str())
            || float("alpha") != 1.0 || float("beta") != 1.0 || int("transA") != 0 {
            continue;
        }
        let p = if n.name.is_empty() { n.output[0].clone() } else { n.name.clone() };
        let mut nodes = vec![];
        let mut b = n.input[1].clone();
        if int("transB") != 0 {
            nodes.push(node("Transpose", vec![b], vec![format!("{p}.b_t")], vec![AttributeProto {
                name: "perm".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            }]));
            b = format!("{p}.b_t");
        }
        match n.input.get(2).filter(|c| !c.is_empty()) {
            Some(c) => {
                nodes.push(node("MatMul", vec![n.input[0].clone(), b], vec![format!("{p}.ab")], vec![]));
                nodes.push(node("Add", vec![format!("{p}.ab"), c.clone()], n.output.clone(), vec![]));
            }
            None => nodes.push(node("MatMul", vec![n.input[0].clone(), b], n.output.clone(), vec![])),
        }
        replace.insert(i, nodes);
    }
    let count = replace.len();
    replace_nodes(graph, replace);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_proto::{model, node, value};
    use tract_onnx::pb::GraphProto;
    use tract_onnx::prelude::*;

    fn int_attr(name: &str, i: i64) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32, i, ..Default::default() }
    }

    #[test]
    fn packed_qkv_is_split_by_heads_into_three_inputs() {
        let mut gqa = node("GroupQueryAttention", &["qkv", "", "", "pk", "pv", "lens", "total"], "y");
        gqa.domain = "com.microsoft".into();
        gqa.attribute = vec![int_attr("num_heads", 4), int_attr("kv_num_heads", 2)];
        let mut proto = model(GraphProto { node: vec![gqa.clone()], ..Default::default() });
        assert_eq!(unpack_qkv(&mut proto), 1);
        let g = proto.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Reshape", "Split", "Reshape", "Reshape", "Reshape", "GroupQueryAttention"]);
        let shape = |name: &str| g.initializer.iter().find(|t| t.name == name).unwrap().int64_data.clone();
        assert_eq!(shape(&g.node[0].input[1]), [0, 0, 8, -1]);
        assert_eq!(shape(&g.node[1].input[1]), [4, 2, 2]);
        let last = g.node.last().unwrap();
        assert_eq!(&last.input[3..], &gqa.input[3..]);
        assert_eq!(last.input[..3], [g.node[2].output[0].clone(), g.node[3].output[0].clone(), g.node[4].output[0].clone()]);
        // with key and value given, nothing to do
        let mut given = gqa.clone();
        given.input[1] = "k".into();
        given.input[2] = "v".into();
        assert_eq!(unpack_qkv(&mut model(GraphProto { node: vec![given], ..Default::default() })), 0);
    }

    #[test]
    fn an_fp16_gemm_runs_as_matmul_and_add() {
        let half = |name: &str, dims: &[i64], v: &[f32]| TensorProto {
            name: name.into(),
            data_type: DataType::Float16 as i32,
            dims: dims.to_vec(),
            raw_data: v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
            ..Default::default()
        };
        let w: Vec<f32> = (0..12).map(|i| i as f32 / 8.0 - 0.5).collect();
        let mut gemm = node("Gemm", &["x", "w", "b"], "y");
        gemm.attribute = vec![int_attr("transB", 1)];
        let mut x = value("x", &[2, 4]);
        let mut y = value("y", &[2, 3]);
        for v in [&mut x, &mut y] {
            if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                t.elem_type = DataType::Float16 as i32;
            }
        }
        let mut proto = model(GraphProto {
            node: vec![gemm],
            initializer: vec![half("w", &[3, 4], &w), half("b", &[3], &[1.0, -2.0, 0.5])],
            input: vec![x],
            output: vec![y],
            ..Default::default()
        });
        assert_eq!(half_gemms(&mut proto), 1);
        let plan = tract_onnx::onnx().model_for_proto_model(&proto).unwrap().into_optimized().unwrap().into_runnable().unwrap();
        let xs: Vec<f32> = (0..8).map(|i| i as f32 / 4.0 - 1.0).collect();
        let input = tract_ndarray::Array2::from_shape_vec((2, 4), xs.iter().map(|&v| f16::from_f32(v)).collect()).unwrap();
        let out = plan.run(tvec!(input.into_tensor().into_tvalue())).unwrap();
        let got = out[0].cast_to::<f32>().unwrap();
        let got = got.to_plain_array_view::<f32>().unwrap();
        for r in 0..2 {
            for c in 0..3 {
                let want: f32 = (0..4).map(|k| xs[r * 4 + k] * w[c * 4 + k]).sum::<f32>() + [1.0, -2.0, 0.5][c];
                assert!((got[[r, c]] - want).abs() < 1e-2, "({r}, {c}): {} vs {want}", got[[r, c]]);
            }
        }
    }
}
