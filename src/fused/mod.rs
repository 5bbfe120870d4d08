//! Ops of our own for what tract runs as many small nodes: attention's products of two
//! computed tensors ([`matmul`]) and GPT-2's tanh GELU ([`gelu`]).
//!
//! Both are found in the ONNX protobuf before tract sees it, as the INT8 products are
//! (crate::qmatmul), and both are the per-token overhead left once those products ran near
//! the memory bandwidth: on distilgpt2-shape's `report` file, 0.59 + ~0.2 of ~4.0 ms per token
//! (`wasmlm profile`). `Prepare::fused_ops = false` leaves the graph to tract, to compare.

pub mod gelu;
pub mod matmul;

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::TypedModel;
use tract_onnx::Onnx;

/// Makes `onnx` understand the ops [`rewrite`] writes.
pub fn register(onnx: &mut Onnx) {
    onnx.op_register.insert(matmul::OP_TYPE, matmul::build);
    onnx.op_register.insert(gelu::OP_TYPE, gelu::build);
}

/// Both rewrites; returns (products, GELUs) rewritten.
pub fn rewrite(model: &mut ModelProto) -> (usize, usize) {
    (matmul::rewrite(model), gelu::rewrite(model))
}

/// (products, of which reading grouped key/value heads, GELUs) on our ops in `model`: read off
/// the ops, so a `MatMul` left to tract at wiring (a constant operand, another type) is not
/// counted.
pub fn count(model: &TypedModel) -> (usize, usize, usize) {
    let products: Vec<&matmul::ActMatMul> = model.nodes.iter().filter_map(|n| n.op_as::<matmul::ActMatMul>()).collect();
    let grouped = products.iter().filter(|p| p.group > 1).count();
    let gelus = model.nodes.iter().filter(|n| n.op_is::<gelu::GeluTanh>()).count();
    (products.len(), grouped, gelus)
}
