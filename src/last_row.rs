//! The LM head on the last position only.
//!
//! A causal LM's graph computes the logits of every position it is fed; a session only ever
//! reads the last one's (the token after the prompt). On SmolLM2 the head is a 576 x 49,152
//! product, a fifth of a token's multiply-adds: a 512-token prefill computed 511 rows of it for
//! nothing. When the logits come straight out of a product whose rows are independent, this cuts
//! that product's input to its last row (a `Slice` on the sequence axis, written in the graph's
//! own length symbol), so the plan's logits are `(1, 1, vocab)` whatever the prompt's length.
//!
//! Only products whose rows are computed one from one row of the input take the cut, so every
//! logit is the one the whole product gives: [`BlockQ8MatMul`] (each row quantized on its own)
//! and tract's float `EinSum` whose input row axis maps to the output's. `quantize_dynamic`'s
//! products ([`DynQMatMul`]) quantize the whole input with one scale, which cutting their input
//! would change: they keep their input and compute its last row only, quantized with the scale
//! of the whole (`DynQMatMul::last_row`). Any other producer is left as it is (the plan then
//! gives every position).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::InOut;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::qmatmul::blockq8::BlockQ8MatMul;
use crate::qmatmul::DynQMatMul;

/// Cut the product that gives `logits` to the last position; false when its producer is not
/// one whose rows are independent, or the graph gives one position already.
pub fn cut(model: &mut TypedModel, logits: OutletId) -> TractResult<bool> {
    let node = model.node(logits.node);
    let rank = model.outlet_fact(logits)?.rank();
    if logits.slot != 0 || node.inputs.is_empty() || rank < 2 {
        return Ok(false);
    }
    let x = node.inputs[0];
    let x_rank = model.outlet_fact(x)?.rank();
    if let Some(op) = node.op_as::<DynQMatMul>().filter(|op| !op.last_row && x_rank == rank) {
        if model.outlet_fact(x)?.shape[x_rank - 2].is_one() {
            return Ok(false);
        }
        let op = DynQMatMul { last_row: true, ..op.clone() };
        model.node_mut(logits.node).op = Box::new(op);
        model.refresh_output_facts()?;
        return Ok(true);
    }
    let row_wise = node.op_is::<BlockQ8MatMul>() && x_rank == rank
        || node.op_as::<EinSum>().is_some_and(|e| {
            e.q_params.is_none()
                && node.inputs.len() == 2
                && x_rank >= 2
                && e.axes.axis((InOut::In(0), x_rank - 2)).is_ok_and(|a| {
                    a.outputs[0].as_slice() == [rank - 2] && a.inputs[1].is_empty() && a.inputs[0].len() == 1
                })
        });
    if !row_wise {
        return Ok(false);
    }
    let axis = x_rank - 2;
    let len = model.outlet_fact(x)?.shape[axis].clone();
    if len.is_one() {
        return Ok(false);
    }
    let name = format!("{}.last_position", node.name);
    let last = model.wire_node(name, Slice::new(axis, len.clone() - 1, len), &[x])?[0];
    model.add_edge(last, InletId::new(logits.node, 0))?;
    model.refresh_output_facts()?;
    Ok(true)
}
