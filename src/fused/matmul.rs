//! Products of two computed tensors (attention's `Q Kᵀ` and `A V`) on a plain loop.
//!
//! tract plans every `MatMul` onto its packed-panel kernels: both operands are packed at each
//! call (`OptMatMulPack`), then multiplied (`OptMatMul`). For a decode step's attention, where
//! Q has one row, the packing and the kernel's set-up cost more than the arithmetic: on
//! distilgpt2-shape's `ort-dynamic-qint8` file, 12 products and 24 packings took 0.59 of ~4.0 ms per token
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

use super::only_reader;
use crate::proto::{default_domain, drop_unread, Index};

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
    let mut constant: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    for n in &graph.node {
        if n.input.iter().all(|x| x.is_empty() || constant.contains(x.as_str())) {
            constant.extend(n.output.iter().map(|o| o.as_str()));
        }
    }
    let index = Index::new(graph);
    // (node, what B becomes when it is a Transpose folded in)
    let mut found: Vec<(usize, Option<String>)> = vec![];
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "MatMul" || !default_domain(n) || n.input.len() != 2 || n.input.iter().any(|x| constant.contains(x.as_str())) {
            continue;
        }
        let b = &n.input[1];
        // b = Transpose(t) swapping the last two axes, read only here: read t as Bᵀ.
        let transposed = index.producer(b).filter(|t| t.op_type == "Transpose" && index.read_once(b)).and_then(|t| {
            let perm = &t.attribute.iter().find(|a| a.name == "perm")?.ints;
            let r = perm.len();
            let swaps_last_two = r >= 2
                && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i as i64)
                && perm[r - 2..] == [r as i64 - 1, r as i64 - 2];
            swaps_last_two.then(|| t.input[0].clone())
        });
        found.push((i, transposed));
    }
    let count = found.len();
    for (i, transposed) in found {
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
    }
    if count > 0 {
        drop_unread(graph);
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
            target.wire_node(prefix, ActMatMul { trans_b: self.trans_b, group: 1 }, inputs)
        } else {
            self.tracts.wire(prefix, target, inputs)
        }
    }
}

/// On the typed model (after tract's declutter): grouped-query attention repeats each key and
/// value head for `group` query heads before the product,
///
/// ```text
/// B = Reshape(heads: [kv, group] -> [kv * group])(MultiBroadcastTo(AddAxis(heads + 1)(x)))
/// ```
///
/// which tract's own einsum absorbed, but which our product would get materialized (SmolLM2: 60
/// `MultiBroadcastTo` per token), or, with one key/value head, a broadcast of that head
/// ([`single_head_broadcast`]). Such a product reads x instead, with `group` set. Returns how
/// many products were changed.
pub fn absorb_kv_repeats(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        let Some(op) = node.op_as::<ActMatMul>() else { continue };
        let b = node.inputs[1];
        let rank = model.outlet_fact(b)?.rank();
        if op.group != 1 || rank < 3 || model.outlet_fact(node.inputs[0])?.rank() != rank || !only_reader(model, b) {
            continue;
        }
        if let Some((group, x)) = repeat(model, b, rank).or_else(|| single_head_broadcast(model, b, rank)) {
            found.push((node.id, op.trans_b, group, x));
        }
    }
    for &(id, trans_b, group, x) in &found {
        let node = model.node(id);
        let mut patch = TypedModelPatch::default();
        let a = patch.tap_model(model, node.inputs[0])?;
        let x = patch.tap_model(model, x)?;
        let out = patch.wire_node(&node.name, ActMatMul { trans_b, group }, &[a, x])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(found.len())
}

/// `Reshape(heads: [kv, group] -> [kv * group])(MultiBroadcastTo(AddAxis(heads + 1)(x)))`: x and
/// the group.
fn repeat(model: &TypedModel, b: OutletId, rank: usize) -> Option<(usize, OutletId)> {
    use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let reshape = model.node(b.node);
    let Some(AxisOp::Reshape(at, from, to)) = reshape.op_as::<AxisOp>() else { return None };
    let group = from.get(1).and_then(|g| g.to_usize().ok())?;
    let merges_heads = *at == rank - 3 && from.len() == 2 && to.len() == 1 && to[0] == from[0].clone() * from[1].clone();
    let broadcast = model.node(reshape.inputs[0].node);
    if !merges_heads || broadcast.op_as::<MultiBroadcastTo>().is_none() || !only_reader(model, reshape.inputs[0]) {
        return None;
    }
    let add = model.node(broadcast.inputs[0].node);
    if add.op_as::<AxisOp>() != Some(&AxisOp::Add(at + 1)) || !only_reader(model, broadcast.inputs[0]) {
        return None;
    }
    // the broadcast only repeats the new axis: (…, kv, 1, L, d) -> (…, kv, group, L, d)
    let (before, after) = (model.outlet_fact(add.id.into()).ok()?.shape.to_tvec(), model.outlet_fact(broadcast.id.into()).ok()?.shape.to_tvec());
    let repeats_only = before.len() == after.len()
        && before.iter().zip(&after).enumerate().all(|(d, (x, y))| if d == at + 1 { x.is_one() && *y == group.to_dim() } else { x == y });
    repeats_only.then_some((group, add.inputs[0]))
}

/// One key/value head for all query heads (Gemma's multi-query attention): tract drops the
/// `Reshape` of [`repeat`] and broadcasts the heads axis itself, `MultiBroadcastTo(heads: 1 ->
/// group)(y)`, where y is x behind axis changes that cancel out (`AddAxis`, then `RmAxis` of
/// another unit axis). x and the group.
fn single_head_broadcast(model: &TypedModel, b: OutletId, rank: usize) -> Option<(usize, OutletId)> {
    use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let broadcast = model.node(b.node);
    broadcast.op_as::<MultiBroadcastTo>()?;
    let y = broadcast.inputs[0];
    let (before, after) = (model.outlet_fact(y).ok()?.shape.to_tvec(), model.outlet_fact(b).ok()?.shape.to_tvec());
    let heads = rank - 3;
    let group = after.get(heads)?.to_usize().ok()?;
    let repeats_only = before.len() == after.len()
        && before.iter().zip(&after).enumerate().all(|(d, (x, y))| if d == heads { x.is_one() } else { x == y });
    if !repeats_only || group < 2 || !only_reader(model, y) {
        return None;
    }
    // back through axis changes, to the earliest outlet of y's shape (which may be a graph
    // output too: the cache's Concat)
    let (mut x, mut at) = (y, y);
    while let Some(AxisOp::Add(_) | AxisOp::Rm(_)) = model.node(at.node).op_as::<AxisOp>() {
        let input = model.node(at.node).inputs[0];
        if model.outlet_successors(input).len() != 1 {
            break;
        }
        at = input;
        if model.outlet_fact(at).ok()?.shape.to_tvec() == before {
            x = at;
        }
    }
    Some((group, x))
}

/// `C = A B` (or `A Bᵀ`), batch axes broadcast; A is (…, M, K), B (…, K, N) or (…, N, K).
///
/// `group` > 1: grouped-query attention's keys and values, read without their repeat. B's last
/// batch axis (the heads) has `group` times fewer entries than A's, and A's head `h` is
/// multiplied by B's head `h / group` ([`absorb_kv_repeats`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActMatMul {
    pub trans_b: bool,
    pub group: usize,
}

impl ActMatMul {
    /// B's shape as the product sees it: its heads axis repeated `group` times.
    fn b_shape<D: DimLike>(&self, b: &[D]) -> TVec<D> {
        let mut b: TVec<D> = b.into();
        let r = b.len();
        if self.group > 1 && r >= 3 {
            b[r - 3] = b[r - 3].clone() * self.group;
        }
        b
    }
}

impl Op for ActMatMul {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("trans_b={} group={}", self.trans_b, self.group)])
    }

    op_as_typed_op!();
}

impl EvalOp for ActMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        let (_, _, _, c_shape) = compute_shapes(a.shape().into(), self.b_shape(b.shape()), false, self.trans_b, false)?;
        let (av, bv) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let mut c = unsafe { Tensor::uninitialized::<f32>(&c_shape)? };
        {
            let mut cv = c.try_as_plain_ram_mut()?;
            let (a, b) = (av.as_slice::<f32>()?, bv.as_slice::<f32>()?);
            product(a, av.shape(), b, bv.shape(), self.trans_b, self.group, cv.as_slice_mut()?);
        }
        Ok(tvec!(c.into_tvalue()))
    }
}

impl TypedOp for ActMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(self.group == 1 || (inputs[0].rank() >= 3 && inputs[0].rank() == inputs[1].rank()), "grouped heads need A and B of one rank");
        let (a, b) = (inputs[0].shape.to_tvec(), self.b_shape(&inputs[1].shape));
        let (_, _, _, c) = compute_shapes(a, b, false, self.trans_b, false)?;
        Ok(tvec!(f32::fact(c)))
    }

    as_op!();
}

/// Rows of A from which a batch goes to a blocked kernel instead of the loops below, which take
/// one row at a time: a prefill's attention. Natively `matrixmultiply`'s (packed panels,
/// register tiles); in the SIMD128 builds [`super::rows::tiles`]. Measured on a 680-token
/// prompt (README).
pub const BLOCKED_ROWS: usize = 16;

/// The batched product into `c` (every element written). Shapes as numpy's `matmul` with both
/// ranks >= 2: the batch axes, right-aligned, broadcast where one of them is 1.
///
/// The loops are plain Rust; on x86_64 with AVX2 they are compiled a second time for it (the
/// build's baseline is SSE2), chosen at run time. No FMA: the same roundings either way.
pub fn product(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, group: usize, c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, checked just above.
        return unsafe { product_avx2(a, a_shape, b, b_shape, trans_b, group, c) };
    }
    product_any(a, a_shape, b, b_shape, trans_b, group, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn product_avx2(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, group: usize, c: &mut [f32]) {
    product_any(a, a_shape, b, b_shape, trans_b, group, c)
}

#[inline(always)]
fn product_any(a: &[f32], a_shape: &[usize], b: &[f32], b_shape: &[usize], trans_b: bool, group: usize, c: &mut [f32]) {
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
    // B's heads (its last batch axis) each serve `group` of C's
    let heads = if rank >= 3 && group > 1 { Some(rank - 3) } else { None };
    let g = |d: usize| if Some(d) == heads { group } else { 1 };
    let cd: Vec<usize> = (0..rank - 2).map(|d| ad[d].max(bd[d] * g(d))).collect();
    let batches: usize = cd.iter().product();
    let mut index = vec![0usize; cd.len()];
    for batch in 0..batches {
        // the batch's offset in a and b: an axis of 1 is broadcast (stride 0)
        let (mut ao, mut bo) = (0, 0);
        for (d, ((&i, &x), &y)) in index.iter().zip(&ad).zip(&bd).enumerate() {
            ao = ao * x + if x == 1 { 0 } else { i };
            bo = bo * y + if y == 1 { 0 } else { i / g(d) };
        }
        let a = &a[ao * m * k..][..m * k];
        let b = &b[bo * k * n..][..k * n];
        let c = &mut c[batch * m * n..][..m * n];
        if m >= BLOCKED_ROWS && cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
            super::rows::tiles(a, m, k, b, n, trans_b, c);
        } else if m >= BLOCKED_ROWS && k > 0 && n > 0 {
            // SAFETY: a is m x k and c is m x n, row-major; b is k x n row-major, or n x k
            // row-major read as its transpose (strides swapped); the slices hold exactly that.
            let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
            unsafe {
                matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), rsb, csb, 0.0, c.as_mut_ptr(), n as isize, 1)
            }
        } else if k == 0 {
            c.fill(0.0);
        } else {
            // a row at a time: the attention op's loops (SIMD128 in the wasm builds)
            let rows = a.chunks_exact(k).zip(c.chunks_exact_mut(n.max(1)));
            if trans_b {
                rows.for_each(|(a_row, c_row)| super::rows::scores(a_row, b, c_row));
            } else {
                rows.for_each(|(a_row, c_row)| super::rows::mix(a_row, b, c_row));
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

    /// Grouped heads: B of 3 heads, each serving 3 of A's 9 (SmolLM2's shape), against the
    /// textbook loop on B with its heads repeated.
    #[test]
    fn grouped_heads_equal_the_repeated_product() {
        let mut seed = 11u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        // m >= BLOCKED_ROWS: the blocked kernel (a prefill)
        for (m, l, trans_b) in [(1, 13, true), (1, 13, false), (4, 4, true), (4, 4, false), (20, 20, true), (20, 20, false)] {
            let (a_shape, d) = ([1, 9, m, if trans_b { 64 } else { l }], 64);
            let b_shape = [1, 3, l, d]; // (N, K) when trans_b, else (K, N)
            let a: Vec<f32> = (0..a_shape.iter().product()).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..b_shape.iter().product()).map(|_| rnd()).collect();
            // B's heads repeated: head h of the full B is head h / 3 of b
            let per_head = l * d;
            let full: Vec<f32> = (0..9).flat_map(|h| b[(h / 3) * per_head..][..per_head].to_vec()).collect();
            let (c_shape, want) = reference(&a, &a_shape, &full, &[1, 9, l, d], trans_b);
            for path in 0..2 {
                let mut got = vec![f32::NAN; c_shape.iter().product()];
                let run = if path == 0 { product } else { product_any };
                run(&a, &a_shape, &b, &b_shape, trans_b, 3, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "m={m} l={l} trans_b={trans_b} path {path}: {g} vs {w}");
                }
            }
        }
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
            // rows >= BLOCKED_ROWS: matrixmultiply's kernel
            (&[1, 12, 21, 64], &[1, 12, 21, 64], true), // prefill Q Kᵀ
            (&[1, 12, 21, 21], &[1, 12, 21, 64], false), // prefill A V
            (&[2, 3, 17, 9], &[1, 9, 7], false),
            (&[3, 1, 16, 9], &[2, 7, 9], true),
            (&[2, 16, 0], &[2, 0, 4], false),
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
                run(&a, a_shape, &b, b_shape, trans_b, 1, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{a_shape:?} x {b_shape:?} trans_b={trans_b} path {path}: {g} vs {w}");
                }
            }
        }
    }
}
