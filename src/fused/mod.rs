//! Ops of our own for what tract runs as many small nodes: attention's products of two
//! computed tensors ([`matmul`]), GPT-2's tanh GELU ([`gelu`]), Llama's rotary embedding
//! ([`rope`]) and the attention core with its key/value cache ([`attention`]); and the f32
//! `Add`s and `Mul`s tract's codegen leaves on its broadcasting path ([`binary`]).
//!
//! The first two are found in the ONNX protobuf before tract sees it, as the INT8 products are
//! (crate::qmatmul), the rotary embedding (by tract-transformers' rules) and the attention core
//! on the typed model. All
//! are the per-token overhead left once those products ran near the memory bandwidth: on
//! distilgpt2-shape's `ort-dynamic-qint8` file, 0.59 + ~0.2 of ~4.0 ms per token (`wasmlm profile`).
//! `Prepare::fused_ops = false` leaves the graph to tract, to compare.

pub mod attention;
pub mod binary;
pub mod gelu;
pub mod matmul;
pub mod rope;
pub mod rows;
pub mod sdpa;

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::{OutletId, TypedModel, TypedNode};
use tract_onnx::Onnx;

/// Makes `onnx` understand the ops [`rewrite`] writes.
pub fn register(onnx: &mut Onnx) {
    onnx.op_register.insert(matmul::OP_TYPE, matmul::build);
    onnx.op_register.insert(gelu::OP_TYPE, gelu::build);
}

/// The rewrites on the protobuf ([`sdpa`] first: it makes the products [`matmul`] takes);
/// returns (products, GELUs) rewritten.
pub fn rewrite(model: &mut ModelProto) -> (usize, usize) {
    sdpa::rewrite(model);
    (matmul::rewrite(model), gelu::rewrite(model))
}

/// Whether `o` is read by one node and is not a graph output: a link of a chain a fusion may
/// take in.
pub(crate) fn only_reader(model: &TypedModel, o: OutletId) -> bool {
    model.outlet_successors(o).len() == 1 && !model.output_outlets().unwrap_or(&[]).contains(&o)
}

/// How many of a plan's nodes are our ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Attention products ([`matmul::ActMatMul`]),
    pub products: usize,
    /// of which reading grouped key/value heads.
    pub grouped: usize,
    pub gelus: usize,
    /// Rotary embeddings ([`rope::Rope`]).
    pub ropes: usize,
    /// Attention cores ([`attention::Attention`]), each two products besides the ones above,
    pub attentions: usize,
    /// of which keeping the key/value cache in their state.
    pub with_cache: usize,
}

/// Our ops in `model`: read off the ops, so a `MatMul` left to tract at wiring (a constant
/// operand, another type) is not counted.
pub fn count(model: &TypedModel) -> Counts {
    let products: Vec<&matmul::ActMatMul> = model.nodes.iter().filter_map(|n| n.op_as::<matmul::ActMatMul>()).collect();
    let of = |f: fn(&TypedNode) -> bool| model.nodes.iter().filter(|n| f(n)).count();
    Counts {
        products: products.len(),
        grouped: products.iter().filter(|p| p.group > 1).count(),
        gelus: of(|n| n.op_is::<gelu::GeluTanh>()),
        ropes: of(|n| n.op_is::<rope::Rope>()),
        attentions: of(|n| n.op_is::<attention::Attention>()),
        with_cache: of(|n| n.op_as::<attention::Attention>().is_some_and(|a| a.cache.is_some())),
    }
}


/// Protobuf builders for the rewrites' unit tests.
#[cfg(test)]
pub(crate) mod test_proto {
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::{type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto, ValueInfoProto};

    /// A graph input or output: f32 of `shape`.
    pub fn value(name: &str, shape: &[i64]) -> ValueInfoProto {
        use tract_onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
        let dim = shape.iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() }).collect();
        let tensor = type_proto::Tensor {
            elem_type: DataType::Float as i32,
            shape: Some(tract_onnx::pb::TensorShapeProto { dim }),
        };
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }),
            ..Default::default()
        }
    }

    /// A node with one output, named after it.
    pub fn node(op: &str, ins: &[&str], out: &str) -> NodeProto {
        NodeProto {
            name: out.into(),
            op_type: op.into(),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            ..Default::default()
        }
    }

    /// `graph` as an opset-17 model.
    pub fn model(graph: GraphProto) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(graph),
            ..Default::default()
        }
    }
}
