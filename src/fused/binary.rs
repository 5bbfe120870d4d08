//! f32 `Add` and `Mul` that tract's codegen leaves on its broadcasting path.
//!
//! tract turns a binary op into a linalg kernel (`OptBinUnicast`, `OptBinByScalar`) only when it
//! can prove, on the symbolic shapes, that the kernel pays and that the output fits the first
//! operand. With the sequence length a symbol, it proves neither for Llama's residual `Add`s,
//! its `silu(gate) * up` nor its RMS norm's `Mul` by the weight (`(1, 1, d) * (1, S, d)`): they
//! run element by element through ndarray's broadcasting, which is slow in wasm. A 512-token
//! prefill of SmolLM2 in the SIMD128 build spent 8-11% of its time in them (`wasmlm profile
//! --prefill 512` in wasm: `Engine.benchProfilePrefill`), against ~1% natively.
//!
//! [`Binary`] takes those whose one operand has the output's shape and whose other has either
//! that shape too or its last axis alone (a row repeated over the others): the result is
//! written in the first one's buffer, in loops the compiler vectorizes. `a + b` and `a * b` are
//! exact IEEE operations and commutative, so the result is bit-identical to tract's
//! (`binary_equals_tracts_bit_for_bit`).

use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_hir::internal::*;

/// The op's name in a plan.
pub const OP_NAME: &str = "WasmlmBinary";

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    Add,
    Mul,
}

/// `y = a op b`, f32: `a` (input `full`) has y's shape; `b` (the other input) has it too, or is
/// one row of y's last axis (`row`), repeated over the other axes.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Binary {
    pub kind: Kind,
    /// Which input has the output's shape.
    pub full: usize,
    pub row: bool,
}

/// Runs on [`Binary`] the f32 `Add`s and `Mul`s that tract left as `TypedBinOp` (see the
/// module's doc); returns how many.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut ours = vec![];
    for node in &model.nodes {
        let Some(bin) = node.op_as::<TypedBinOp>() else { continue };
        let kind = match bin.0.name() {
            "Add" => Kind::Add,
            "Mul" => Kind::Mul,
            _ => continue,
        };
        let facts = model.node_input_facts(node.id)?;
        let out = &model.outlet_fact(OutletId::new(node.id, 0))?;
        let f32s = facts.iter().chain([out]).all(|f| f.datum_type == f32::datum_type());
        if facts.len() != 2 || !f32s || bin.1.is_some_and(|dt| dt != f32::datum_type()) {
            continue;
        }
        let Some(full) = (0..2).find(|&i| facts[i].shape == out.shape) else { continue };
        let (y, b) = (&out.shape, &facts[1 - full].shape);
        let row = b != y;
        let is_row = b.rank() >= 1
            && b.rank() <= y.rank()
            && b.last() == y.last()
            && b.iter().rev().skip(1).all(|d| d.is_one());
        if row && !is_row {
            continue;
        }
        ours.push((node.id, Binary { kind, full, row }));
    }
    let n = ours.len();
    for (id, op) in ours {
        model.node_mut(id).op = Box::new(op);
    }
    Ok(n)
}

impl Op for Binary {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}{}", self.kind, if self.row { " by a row" } else { "" })])
    }

    op_as_typed_op!();
}

impl EvalOp for Binary {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "{OP_NAME} takes two inputs");
        let b = inputs.remove(1 - self.full);
        let a = inputs.remove(0);
        let mut y = a.into_tensor();
        // A tensor's storage is dense and row-major; its strides may still be other than
        // natural along unit axes (tract's `insert_axis`), which changes no value's place.
        let dense = |t: &Tensor| t.len() == t.shape().iter().product::<usize>();
        ensure!(dense(&y) && dense(&b), "{OP_NAME}: an operand's storage does not match its shape");
        let bv = b.try_as_plain_ram()?;
        let bs = bv.as_slice::<f32>()?;
        let mut view = y.try_as_plain_ram_mut()?;
        let ys = view.as_slice_mut::<f32>()?;
        if ys.is_empty() {
            // nothing to compute (an empty axis), as tract gives
        } else if self.row {
            let d = bs.len();
            ensure!(d > 0 && ys.len() % d == 0, "{OP_NAME}: a row of {d} does not tile {} values", ys.len());
            for r in ys.chunks_exact_mut(d) {
                apply(self.kind, r, bs);
            }
        } else {
            ensure!(ys.len() == bs.len(), "{OP_NAME}: {} values against {}", ys.len(), bs.len());
            apply(self.kind, ys, bs);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

#[inline(always)]
fn apply(kind: Kind, y: &mut [f32], b: &[f32]) {
    match kind {
        Kind::Add => y.iter_mut().zip(b).for_each(|(y, b)| *y += b),
        Kind::Mul => y.iter_mut().zip(b).for_each(|(y, b)| *y *= b),
    }
}

impl TypedOp for Binary {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[self.full].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::test_proto::{model, node, value};
    use tract_onnx::pb::GraphProto;
    use tract_onnx::prelude::tract_ndarray::ArrayD;

    /// `y = (x * w + x) * x` with w (d) a row over x (1, S, d), S symbolic, as in Llama's block,
    /// and `z = w * x` with the row first.
    fn graph() -> tract_onnx::pb::ModelProto {
        use tract_onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
        let mut x = value("x", &[1, 1, 8]);
        if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) = x.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.shape.as_mut().unwrap().dim[1] = Dimension { value: Some(Value::DimParam("S".into())), ..Default::default() };
        }
        let graph = GraphProto {
            node: vec![
                node("Mul", &["x", "w"], "xw"),
                node("Add", &["xw", "x"], "s"),
                node("Mul", &["s", "x"], "y"),
                node("Mul", &["w", "x"], "z"),
            ],
            input: vec![x, value("w", &[8])],
            output: vec![value("y", &[1, 1, 8]), value("z", &[1, 1, 8])],
            ..Default::default()
        };
        model(graph)
    }

    fn run(fuse_it: bool) -> (usize, Vec<Vec<u32>>) {
        let mut typed = tract_onnx::onnx().model_for_proto_model(&graph()).unwrap().into_typed().unwrap();
        typed.declutter().unwrap();
        typed.optimize().unwrap();
        let fused = if fuse_it { fuse(&mut typed).unwrap() } else { 0 };
        assert_eq!(fused, typed.nodes.iter().filter(|n| n.op_is::<Binary>()).count());
        let plan = typed.into_runnable().unwrap();
        let x = ArrayD::from_shape_vec(vec![1, 5, 8], (0..40).map(|i| (i as f32 / 3.0).sin() * 7.0).collect()).unwrap();
        let w = ArrayD::from_shape_vec(vec![8], (0..8).map(|i| (i as f32 / 7.0).cos()).collect()).unwrap();
        let out = plan.run(tvec!(x.into_tensor().into(), w.into_tensor().into())).unwrap();
        let bits = |t: &TValue| t.to_plain_array_view::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
        (fused, out.iter().map(bits).collect())
    }

    #[test]
    fn binary_equals_tracts_bit_for_bit() {
        let (fused, ours) = run(true);
        let (_, tracts) = run(false);
        assert_eq!(fused, 4, "every Add and Mul of the graph is taken");
        assert_eq!(ours, tracts);
    }
}
