//! Fold every all-constant node into a constant, whatever its size.
//!
//! tract folds constants only within a 4 MiB growth budget (CONST_FOLD_MEM_BUDGET), so on an INT8
//! file the weight side of each product (`quantize_dynamic`'s `Const(W i8) -> Cast -> ReduceSum`
//! zero-point chains, or q8b32's `Const(i8) -> Cast -> Mul(scale) -> Reshape`) would be
//! recomputed at every token: 12-20x slower (docs/decisions.md, "Constant folding without a
//! budget"). A model is loaded once and run thousands of times, so paying the memory once at load
//! is the right trade here.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::dummy::Dummy;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::optim::{Optimizer, TypedPass};
use tract_onnx::tract_core::optim::OptimizerSession;

#[derive(Clone, Debug, Default)]
struct FoldAll(usize);

impl TypedPass for FoldAll {
    fn reset(&mut self) -> TractResult<()> {
        self.0 = 0;
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        for node in &model.nodes[self.0..] {
            if node.op_is::<Const>() || node.op_is::<TypedSource>() || node.op_is::<Dummy>() {
                continue;
            }
            let facts = model.node_input_facts(node.id)?;
            if facts.is_empty() || !facts.iter().all(|f| f.konst.is_some()) {
                continue;
            }
            let inputs = facts.iter().map(|f| f.konst.clone().unwrap().into_tvalue()).collect();
            // None: the op keeps state or needs a session; leave it to run.
            let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else { continue };
            let mut patch = TypedModelPatch::default();
            for (ix, output) in outputs.into_iter().enumerate() {
                let outlet = OutletId::new(node.id, ix);
                let exotic = model.outlet_fact(outlet)?.exotic_fact.clone();
                let name = if ix == 0 { node.name.clone() } else { format!("{}.{ix}", node.name) };
                let op = Const::new_with_opt_exotic_fact(output.into_arc_tensor(), exotic)?;
                let wire = patch.wire_node(name, op, &[])?[0];
                patch.shunt_outside(model, outlet, wire)?;
            }
            self.0 = node.id;
            return Ok(Some(patch));
        }
        Ok(None)
    }
}

/// Run the fold to a fixed point (each folded node may make its successors foldable).
pub fn fold_all_constants(model: &mut TypedModel) -> TractResult<()> {
    let mut optimizer = Optimizer::prop_consts();
    optimizer.passes = vec![Box::<FoldAll>::default()];
    optimizer.optimize(model)
}
