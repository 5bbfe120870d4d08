//! GPT-2's tanh GELU, exported as nine element-wise nodes, as one op.
//!
//! `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` arrives (after [`crate::pow`]) as
//!
//! ```text
//! sq = Mul(x, x); cu = Mul(sq, x); d = Mul(cu, c1); e = Add(x, d); f = Mul(e, c2)
//! g = Tanh(f); h = Add(g, c3); a = Mul(x, c0); y = Mul(a, h)
//! ```
//!
//! tract runs each node over the whole (S, 3072) tensor, most of them through its broadcasting
//! binary path: 0.2 ms per distilgpt2-shape token for six layers, against ~2 µs of arithmetic.
//! [`GeluTanh`] computes the very same operations in the same order (IEEE `+` and `*` commute,
//! so operand order does not matter), tanh included: tract's own f32 kernel. Its results are
//! therefore bit-identical to the unfused graph's (`the_fused_gelu_equals_tracts_nodes_bit_for_bit`).
//! Constants are read from the file, so other GELU constants match too; any other shape of
//! graph is left alone.

use tract_linalg::routines::Func;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use crate::proto::{default_domain, drop_unread, scalar_constants, Index};
use crate::qmatmul::with_avx2;

/// The op name [`rewrite`] writes.
pub const OP_TYPE: &str = "WasmlmGeluTanh";

/// Rewrites in place; returns how many GELUs were fused.
pub fn rewrite(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    let constants = scalar_constants(graph);
    let index = Index::new(graph);
    // the inputs of `name`'s producer if it is an `op` read only by its one consumer
    let made_by = |name: &str, op: &str| -> Option<&[String]> {
        let n = index.producer(name)?;
        (n.op_type == op && default_domain(n) && n.output.len() == 1 && index.read_once(name)).then_some(n.input.as_slice())
    };
    // a binary node's (other operand, scalar constant)
    let with_constant = |ins: &[String]| -> Option<(String, f32)> {
        match ins {
            [p, q] => match (constants.get(p), constants.get(q)) {
                (None, Some(&c)) => Some((p.clone(), c)),
                (Some(&c), None) => Some((q.clone(), c)),
                _ => None,
            },
            _ => None,
        }
    };
    // (x, c0..c3) when `y`'s producer is the chain's last Mul
    let gelu = |n: &NodeProto| -> Option<(String, [f32; 4])> {
        if n.op_type != "Mul" || n.input.len() != 2 || n.output.len() != 1 {
            return None;
        }
        for (a, h) in [(&n.input[0], &n.input[1]), (&n.input[1], &n.input[0])] {
            let found = (|| {
                let (x, c0) = with_constant(made_by(a, "Mul")?)?;
                let (g, c3) = with_constant(made_by(h, "Add")?)?;
                let [f] = made_by(&g, "Tanh")? else { return None };
                let (e, c2) = with_constant(made_by(f, "Mul")?)?;
                let [p, q] = made_by(&e, "Add")? else { return None };
                let d = if *p == x { q } else if *q == x { p } else { return None };
                let (cu, c1) = with_constant(made_by(d, "Mul")?)?;
                let [p, q] = made_by(&cu, "Mul")? else { return None };
                let sq = if *p == x { q } else if *q == x { p } else { return None };
                let [p, q] = made_by(sq, "Mul")? else { return None };
                (*p == x && *q == x).then(|| (x.clone(), [c0, c1, c2, c3]))
            })();
            if found.is_some() {
                return found;
            }
        }
        None
    };
    let found: Vec<(usize, String, [f32; 4])> =
        graph.node.iter().enumerate().filter_map(|(i, n)| gelu(n).map(|(x, c)| (i, x, c))).collect();
    let count = found.len();
    for (i, x, c) in found {
        let n = &mut graph.node[i];
        let attr = |name: &str, f: f32| AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f, ..Default::default() };
        *n = NodeProto {
            name: format!("{}.gelu", n.name),
            op_type: OP_TYPE.into(),
            input: vec![x],
            output: n.output.clone(),
            attribute: vec![attr("c0", c[0]), attr("c1", c[1]), attr("c2", c[2]), attr("c3", c[3])],
            ..Default::default()
        };
    }
    if count > 0 {
        drop_unread(graph);
    }
    count
}

pub(super) fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 1, "{OP_TYPE} takes x");
    let c = [node.get_attr("c0")?, node.get_attr("c1")?, node.get_attr("c2")?, node.get_attr("c3")?];
    Ok((expand(Expansion(GeluTanh { c })), vec![]))
}

#[derive(Debug, Clone)]
struct Expansion(GeluTanh);

impl tract_onnx::tract_hir::ops::expandable::Expansion for Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> TractResult<()> {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)
    }

    fn wire(&self, prefix: &str, target: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        target.wire_node(prefix, self.0.clone(), inputs)
    }
}

/// `y = (x c0) (tanh((x + ((x x) x) c1) c2) + c3)`, element-wise.
#[derive(Debug, Clone)]
pub struct GeluTanh {
    pub c: [f32; 4],
}

impl PartialEq for GeluTanh {
    fn eq(&self, other: &Self) -> bool {
        self.c.map(f32::to_bits) == other.c.map(f32::to_bits)
    }
}
impl Eq for GeluTanh {}

impl Op for GeluTanh {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("c={:?}", self.c)])
    }

    op_as_typed_op!();
}

impl EvalOp for GeluTanh {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let mut y = x.into_tensor();
        {
            let mut view = y.try_as_plain_ram_mut()?;
            self.run_on_threads(view.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

/// Values per pass of [`GeluTanh::run`]: tract's tanh costs per call as well as per value
/// (distilgpt2-shape's six GELUs of a 32-token prefill: 0.75-0.83 ms in chunks of 256, 0.34-0.45
/// in 1,024, 0.23-0.24 in 4,096).
const CHUNK: usize = 4096;

/// Values a thread takes whole when a prefill's GELU is cut across threads: GPT-2's rows of
/// 3,072 (or 768 times any multiple of 4) are whole numbers of them.
const PART: usize = 1024;

impl GeluTanh {
    /// [`Self::run`], a prefill's values cut across the session's threads in whole [`PART`]s;
    /// each value is computed alone, so the bits are those of one thread, wherever its passes
    /// start. A decode step's row is below `split`'s threshold and stays on this one. On one
    /// thread, GELU was 9% of a 32-token prefill of distilgpt2-shape's `ort-dynamic-qint8` file
    /// at 2 threads (`wasmlm profile`).
    pub fn run_on_threads(&self, xs: &mut [f32]) -> TractResult<()> {
        if !xs.len().is_multiple_of(PART) {
            return self.run(xs);
        }
        let failed = std::sync::Mutex::new(None);
        crate::qmatmul::split::split(xs.len() / PART, PART, PART * 4, PART, xs, |_, part| {
            if let Err(e) = self.run(part) {
                *failed.lock().unwrap() = Some(e);
            }
        });
        failed.into_inner().unwrap().map_or(Ok(()), Err)
    }

    /// In place, in chunks that stay in L1 between the three passes.
    pub fn run(&self, xs: &mut [f32]) -> TractResult<()> {
        let [c0, c1, c2, c3] = self.c;
        let tanh = Func::Tanh.ew_f32()?;
        let mut f = [0f32; CHUNK];
        for xs in xs.chunks_mut(CHUNK) {
            let f = &mut f[..xs.len()];
            tanh_argument(xs, f, c1, c2);
            tanh.run(f)?;
            scale_by(xs, f, c0, c3);
        }
        Ok(())
    }
}

with_avx2! {
    /// `f = (x + x³ c1) c2`, the operations in the graph's order (no fused multiply-add: AVX2
    /// here only widens the same operations to eight lanes).
    fn tanh_argument = tanh_argument_lanes(xs: &[f32], f: &mut [f32], c1: f32, c2: f32)
}

#[inline(always)]
fn tanh_argument_lanes(xs: &[f32], f: &mut [f32], c1: f32, c2: f32) {
    for (f, &x) in f.iter_mut().zip(xs.iter()) {
        *f = (x + ((x * x) * x) * c1) * c2;
    }
}

with_avx2! {
    /// `x = (x c0)(g + c3)`, `g` the tanh.
    fn scale_by = scale_by_lanes(xs: &mut [f32], g: &[f32], c0: f32, c3: f32)
}

#[inline(always)]
fn scale_by_lanes(xs: &mut [f32], g: &[f32], c0: f32, c3: f32) {
    for (x, &g) in xs.iter_mut().zip(g.iter()) {
        *x = (*x * c0) * (g + c3);
    }
}

impl TypedOp for GeluTanh {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::test_proto::{model, node, value};
    use tract_onnx::pb::{tensor_proto::DataType, GraphProto, TensorProto};

    /// GPT-2's GELU as exported (constants as initializers and one as a `Constant` node, operands
    /// in both orders), with `c0` for 0.5, tanh's output also a graph output when `shared_tanh`
    /// (then nothing is fused).
    fn chain(c0: f32, shared_tanh: bool) -> ModelProto {
        let init = |name: &str, v: f32| TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        };
        let c3 = {
            let t = TensorProto { data_type: DataType::Float as i32, float_data: vec![1.0], ..Default::default() };
            let a = AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(t),
                ..Default::default()
            };
            NodeProto { op_type: "Constant".into(), output: vec!["c3".into()], attribute: vec![a], ..Default::default() }
        };
        let mut output = vec![value("y", &[3, 1000])];
        if shared_tanh {
            output.push(value("g", &[3, 1000]));
        }
        let graph = GraphProto {
            node: vec![
                c3,
                node("Mul", &["x", "c0"], "a"),
                node("Pow", &["x", "three"], "cu"),
                node("Mul", &["c1", "cu"], "d"),
                node("Add", &["x", "d"], "e"),
                node("Mul", &["e", "c2"], "f"),
                node("Tanh", &["f"], "g"),
                node("Add", &["c3", "g"], "h"),
                node("Mul", &["a", "h"], "y"),
            ],
            initializer: vec![init("c0", c0), init("c1", 0.044715), init("c2", 0.797_884_6), init("three", 3.0)],
            input: vec![value("x", &[3, 1000])],
            output,
            ..Default::default()
        };
        model(graph)
    }

    fn run(mut proto: ModelProto, fuse: bool) -> (usize, Vec<f32>) {
        crate::pow::cube_powers(&mut proto);
        let fused = if fuse { rewrite(&mut proto) } else { 0 };
        let mut onnx = tract_onnx::onnx();
        super::super::register(&mut onnx);
        let model = onnx.model_for_proto_model(&proto).unwrap().into_optimized().unwrap().into_runnable().unwrap();
        // values from -12 to 12, where tanh saturates, and around 0
        let x: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) / 125.0 * if i % 2 == 0 { 1.0 } else { 0.013 }).collect();
        let x = tract_ndarray::Array2::from_shape_vec((3, 1000), x).unwrap().into_tensor();
        let out = model.run(tvec!(x.into_tvalue())).unwrap();
        (fused, out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect())
    }

    #[test]
    fn the_fused_gelu_equals_tracts_nodes_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // 0.3, not a power of two, so that another association of the products would show
        for c0 in [0.3, 0.5] {
            let (fused, y) = run(chain(c0, false), true);
            let (_, want) = run(chain(c0, false), false);
            assert_eq!(fused, 1);
            let first = bits(&y).iter().zip(bits(&want)).position(|(a, b)| *a != b);
            assert_eq!(first, None, "c0 = {c0}: first differing element");
        }
        let (_, y) = run(chain(0.5, false), true);
        // the formula, in f64: `1 + tanh` near -1 cancels, leaving tanh's f32 rounding (a few
        // 1e-7) times 0.5 |x|
        for (i, &y) in y.iter().enumerate() {
            let x = ((i as f64) - 1500.0) / 125.0 * if i % 2 == 0 { 1.0 } else { 0.013 };
            let exact = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((y as f64 - exact).abs() <= 1e-6 * (1.0 + x.abs()), "x={x}: {y} vs {exact}");
        }
    }

    #[test]
    fn values_cut_across_threads_equal_one_thread() {
        use crate::qmatmul::split;
        let op = GeluTanh { c: [0.5, 0.044715, 0.797_884_6, 1.0] };
        // 37 parts: the second thread's passes start 19 parts in, not at a multiple of CHUNK
        let x: Vec<f32> = (0..PART * 37).map(|i| (i as f32 - 4000.0) / 500.0).collect();
        let mut one = x.clone();
        op.run(&mut one).unwrap();
        split::set_min_work(0);
        let before = split::splits();
        let mut two = x.clone();
        split::with_threads(2, || op.run_on_threads(&mut two)).unwrap();
        assert!(split::splits() > before, "the values were not cut across threads");
        assert_eq!(one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), two.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn an_intermediate_read_elsewhere_is_not_fused() {
        let mut proto = chain(0.5, true);
        crate::pow::cube_powers(&mut proto);
        assert_eq!(rewrite(&mut proto), 0);
    }
}
