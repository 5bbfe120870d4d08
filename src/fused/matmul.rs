//! Products of two computed tensors (attention's `Q Kᵀ` and `A V`) on a plain loop.
//!
//! tract plans every `MatMul` onto its packed-panel kernels: both operands are packed at each
//! call (`OptMatMulPack`), then multiplied (`OptMatMul`). For a decode step's attention, where
//! Q has one row, the packing and the kernel's set-up cost more than the arithmetic: on
//! distilgpt2-shape's `report` file, 12 products and 24 packings took 0.59 of ~4.0 ms per token
//! (`wasmlm profile`, 64 steps). Here the product is computed where it lies:
//!
//! - `trans_b` (B read as `Bᵀ`, from a `Transpose` of its last two axes, which is folded in):
//!   `C[i, j] = dot(A[i, :], B[j, :])`, two contiguous rows;
//! - otherwise `C[i, :] = Σ_k A[i, k] B[k, :]`, contiguous rows of B added in.
//!
//! Batch axes broadcast as numpy's (and ONNX's) `matmul`. Only f32 products of two non-constant
//! operands of rank 2 or more take this op; the others become tract's `EinSum` as before.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::matmul::{compute_shapes, MatMulInference};

/// The op name [`rewrite`] writes.
pub const OP_TYPE: &str = "WasmlmMatMul";

/// In the ONNX protobuf: every `MatMul` whose operands are both computed at run time (neither
/// is, nor is made only from, initializers and `Constant` nodes) -> `WasmlmMatMul(a, b)`, with `trans_b = 1` and
/// the `Transpose` dropped where b is a `Transpose` of its last two axes read by nothing else.
/// Returns how many were rewritten.
pub fn rewrite(model: &mut tract_onnx::pb::ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else { return 0 };
    // constant: initializers, and the outputs of nodes whose inputs are all constant (a
    // dequantized weight, a transposed embedding), in the file's topological order
    let mut constant: std::collections::HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    for n in &graph.node {
        if n.input.iter().all(|x| x.is_empty() || constant.contains(x)) {
            constant.extend(n.output.iter().cloned());
        }
    }
    let mut readers: std::collections::HashMap<String, usize> = Default::default();
    for n in &graph.node {
        for x in &n.input {
            *readers.entry(x.clone()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *readers.entry(o.name.clone()).or_default() += 1;
    }
    let producer: std::collections::HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut count = 0;
    for i in 0..graph.node.len() {
        let n = &graph.node[i];
        let plain = n.domain.is_empty() || n.domain == "ai.onnx";
        if n.op_type != "MatMul" || !plain || n.input.len() != 2 || n.input.iter().any(|x| constant.contains(x)) {
            continue;
        }
        let b = n.input[1].clone();
        // b = Transpose(t) swapping the last two axes, read only here: read t as Bᵀ.
        let transposed = producer.get(&b).map(|&p| &graph.node[p]).and_then(|t| {
            let perm = t.attribute.iter().find(|a| a.name == "perm")?.ints.clone();
            let r = perm.len();
            let swaps_last_two = r >= 2
                && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i as i64)
                && perm[r - 2..] == [r as i64 - 1, r as i64 - 2];
            (t.op_type == "Transpose" && swaps_last_two && readers.get(&b) == Some(&1)).then(|| t.input[0].clone())
        });
        let node = &mut graph.node[i];
        node.op_type = OP_TYPE.into();
        node.domain.clear();
        if let Some(t) = transposed {
            node.input[1] = t;
            node.attribute.push(tract_onnx::pb::AttributeProto {
                name: "trans_b".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            });
        }
        count += 1;
    }
    if count > 0 {
        crate::qmatmul::rewrite::drop_unread(graph);
    }
    count
}

pub(super) fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    ensure!(node.input.len() == 2, "{OP_TYPE} takes a and b");
    let trans_b = node.get_attr_opt::<i64>("trans_b")?.unwrap_or(0) != 0;
    Ok((expand(Expansion { trans_b, tracts: MatMulInference::default().with_b_trans(trans_b) }), vec![]))
}

#[derive(Debug, Clone)]
struct Expansion {
    trans_b: bool,
    /// tract's own `MatMul`, for the shapes and for the products we leave to it.
    tracts: MatMulInference,
}

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
        self.tracts.rules(s, inputs, outputs)
    }

    /// Our op where it applies; tract's own product (an `EinSum`, as for any `MatMul`) elsewhere.
    fn wire(&self, prefix: &str, target: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let (a, b) = (target.outlet_fact(inputs[0])?, target.outlet_fact(inputs[1])?);
        let ours = a.datum_type == f32::datum_type()
            && b.datum_type == f32::datum_type()
            && a.rank() >= 2
            && b.rank() >= 2
            && a.konst.is_none()
            && b.konst.is_none();
        if ours {
            target.wire_node(prefix, ActMatMul { trans_b: self.trans_b }, inputs)
        } else {
            self.tracts.wire(prefix, target, inputs)
        }
    }
}

/// `C = A B` (or `A Bᵀ`), batch axes broadcast; A is (…, M, K), B (…, K, N) or (…, N, K).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActMatMul {
    pub trans_b: bool,
}

impl Op for ActMatMul {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("trans_b={}", self.trans_b)])
    }

    op_as_typed_op!();
}

impl EvalOp for ActMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        let (_, _, _, c_shape) = compute_shapes(a.shape().into(), b.shape().into(), false, self.trans_b, false)?;
        let (av, bv) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let mut c = unsafe { Tensor::uninitialized::<f32>(&c_shape)? };
        {
            let mut cv = c.try_as_plain_ram_mut()?;
            product(av.as_slice::<f32>()?, a.shape(), bv.as_slice::<f32>()?, b.shape(), self.trans_b, cv.as_slice_mut()?);
        }
        Ok(tvec!(c.into_tvalue()))
    }
}

impl TypedOp for ActMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (a, b) = (inputs[0].shape.to_tvec(), inputs[1].shape.to_tvec());
        let (_, _, _, c) = compute_shapes(a, b, false, self.trans_b, false)?;
        Ok(tvec!(f32::fact(c)))
    }

    as_op!();
}

/// The batched product into `c` (every element written). Shapes as numpy's `matmul` with both
/// ranks >= 2: the batch axes, right-aligned, broadcast where one of them is 1.
///
/// The loops are plain Rust; on x86_64 with AVX2 they are compiled a second time for it (the
/// build's baseline is SSE2), chosen at run time. No FMA: the same roundings either way.
pub fn product(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, checked just above.
        return unsafe { product_avx2(a, a_shape, b, b_shape, trans_b, c) };
    }
    product_any(a, a_shape, b, b_shape, trans_b, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn product_avx2(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, c: &mut [f32]) {
    product_any(a, a_shape, b, b_shape, trans_b, c)
}

#[inline(always)]
fn product_any(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, c: &mut [f32]) {
    let (ar, br) = (a_shape.len(), b_shape.len());
    let (m, k) = (a_shape[ar - 2], a_shape[ar - 1]);
    let n = if trans_b { b_shape[br - 2] } else { b_shape[br - 1] };
    let rank = ar.max(br);
    // batch dims, right-aligned and padded with 1
    let dims = |s: &[usize]| -> Vec<usize> {
        let mut d = vec![1; rank - s.len()];
        d.extend_from_slice(&s[..s.len() - 2]);
        d
    };
    let (ad, bd) = (dims(a_shape), dims(b_shape));
    let cd: Vec<usize> = ad.iter().zip(&bd).map(|(&x, &y)| x.max(y)).collect();
    let batches: usize = cd.iter().product();
    let mut index = vec![0usize; cd.len()];
    for batch in 0..batches {
        // the batch's offset in a and b: an axis of 1 is broadcast (stride 0)
        let (mut ao, mut bo) = (0, 0);
        for ((&i, &x), &y) in index.iter().zip(&ad).zip(&bd) {
            ao = ao * x + if x == 1 { 0 } else { i };
            bo = bo * y + if y == 1 { 0 } else { i };
        }
        let a = &a[ao * m * k..][..m * k];
        let b = &b[bo * k * n..][..k * n];
        let c = &mut c[batch * m * n..][..m * n];
        if trans_b {
            for (a_row, c_row) in a.chunks_exact(k.max(1)).zip(c.chunks_exact_mut(n.max(1))) {
                for (b_row, c) in b.chunks_exact(k.max(1)).zip(c_row.iter_mut()) {
                    *c = dot(a_row, b_row);
                }
            }
            if k == 0 {
                c.fill(0.0);
            }
        } else {
            for (i, c_row) in c.chunks_exact_mut(n.max(1)).enumerate() {
                c_row.fill(0.0);
                for (&x, b_row) in a[i * k..(i + 1) * k].iter().zip(b.chunks_exact(n.max(1))) {
                    for (c, &y) in c_row.iter_mut().zip(b_row) {
                        *c += x * y;
                    }
                }
            }
        }
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < cd[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// Σ x[i] y[i] over eight running sums (so the compiler keeps them in SIMD lanes), then the
/// tail.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in xt.iter().zip(yt) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop, in f64, on explicit indices.
    fn reference(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool) -> (Vec<usize>, Vec<f64>) {
        let (_, _, _, c_shape) = compute_shapes::<usize>(a_shape.into(), b_shape.into(), false, trans_b, false).unwrap();
        let c_shape: Vec<usize> = c_shape.to_vec();
        let rank = c_shape.len();
        let (m, n) = (c_shape[rank - 2], c_shape[rank - 1]);
        let k = a_shape[a_shape.len() - 1];
        let strides = |s: &[usize]| -> Vec<usize> {
            let mut st = vec![0; s.len()];
            let mut acc = 1;
            for i in (0..s.len()).rev() {
                st[i] = acc;
                acc *= s[i];
            }
            st
        };
        let (sa, sb) = (strides(a_shape), strides(b_shape));
        let total: usize = c_shape.iter().product();
        let mut out = vec![0f64; total];
        for (flat, o) in out.iter_mut().enumerate() {
            let mut idx = vec![0; rank];
            let mut f = flat;
            for d in (0..rank).rev() {
                idx[d] = f % c_shape[d];
                f /= c_shape[d];
            }
            let (i, j) = (idx[rank - 2], idx[rank - 1]);
            let batch_off = |shape: &[usize], st: &[usize]| -> usize {
                let r = shape.len();
                (0..r - 2).map(|d| {
                    let cd = rank - r + d;
                    if shape[d] == 1 { 0 } else { idx[cd] * st[d] }
                }).sum()
            };
            let (ao, bo) = (batch_off(a_shape, &sa), batch_off(b_shape, &sb));
            let rb = b_shape.len();
            for kk in 0..k {
                let x = a[ao + i * sa[a_shape.len() - 2] + kk] as f64;
                let y = if trans_b { b[bo + j * sb[rb - 2] + kk] } else { b[bo + kk * sb[rb - 2] + j] } as f64;
                *o += x * y;
            }
            let _ = (m, n);
        }
        (c_shape, out)
    }

    #[test]
    fn products_equal_the_textbook_loop_with_broadcast_batches() {
        let cases: &[(&[usize], &[usize], bool)] = &[
            (&[1, 12, 1, 64], &[1, 12, 37, 64], true), // decode Q Kᵀ
            (&[1, 12, 1, 37], &[1, 12, 37, 64], false), // decode A V
            (&[1, 12, 5, 64], &[1, 12, 5, 64], true),  // prefill
            (&[2, 3, 4, 19], &[1, 19, 7], false),      // broadcast, ranks differ
            (&[3, 1, 4, 9], &[2, 7, 9], true),
            (&[1, 32, 1], &[1, 1, 6], false),          // rotary: K = 1
            (&[4, 3], &[3, 5], false),
            (&[2, 0, 3], &[2, 3, 4], false),           // empty M
            (&[2, 3, 0], &[2, 0, 4], false),           // empty K: zeros
        ];
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(a_shape, b_shape, trans_b) in cases {
            let a: Vec<f32> = (0..a_shape.iter().product()).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..b_shape.iter().product()).map(|_| rnd()).collect();
            let (c_shape, want) = reference(&a, a_shape, &b, b_shape, trans_b);
            // the dispatched product (AVX2 here, where present) and the baseline build of it
            for path in 0..2 {
                let mut got = vec![f32::NAN; c_shape.iter().product()];
                let run = if path == 0 { product } else { product_any };
                run(&a, a_shape, &b, b_shape, trans_b, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{a_shape:?} x {b_shape:?} trans_b={trans_b} path {path}: {g} vs {w}");
                }
            }
        }
    }
}
