//! Attention's core, `softmax(Q Kᵀ · scale + mask) V`, as one op whose heads are cut across the
//! session's threads, with the key/value cache's `Concat`s taken in.
//!
//! After the rotary embedding ([`super::rope`]) a Llama layer's attention still ran seven
//! nodes per token on the calling thread: the cache's two `Concat`s, the two products
//! ([`super::matmul::ActMatMul`]), the scale's `Mul`, the mask's `Add` and the `Softmax`
//! (SmolLM2: 210 of ~1,000 per token; in the threaded wasm build ~1.4 of the ~2.6 ms per token
//! that stayed on one thread, `ab.mjs profile`). [`fuse`] finds them on the typed model and puts
//! [`Attention`] in their place.
//!
//! The op computes what the nodes did, head by head: the products in the order of
//! [`super::matmul::product`] (its row loops, or its blocked kernel for a prefill of
//! [`BLOCKED_ROWS`] rows or more), the scale and mask as the `Mul` and `Add` (each rounded to
//! f32), then a softmax of our own ([`softmax`]: tract's picks its kernel per row length and
//! cost ~8 µs per layer here, natively). Within ~1e-6 of tract's nodes
//! (`fused_ops_equal_tracts_ops`, on the tiny models), and the same bits however the heads are cut across
//! threads (`products_split_across_threads_equal_one_thread`).
//!
//! Reading the cache where it lies is the point of taking the `Concat`s in: a decode step's
//! products read the past keys and the new token's from their two tensors, and the copy into
//! the concatenations (the graph's `present_*` outputs, the next step's cache) is shared out
//! with the heads. That copy is still made every step, ~2 x the cache's size in memory traffic
//! (SmolLM2: 46 KB per cached token), and is most of the op's time at a 64-token context.

use tract_onnx::tract_core::broadcast::multi_broadcast;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::{Add, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_hir::internal::*;

use super::matmul::{dot, product, ActMatMul, BLOCKED_ROWS};
use super::rope::broadcast_strides;

/// The op's name in a plan.
pub const OP_NAME: &str = "WasmlmAttention";

/// `y = softmax(q kᵀ · scale + mask) v` over the last axis, per batch and head; q is (B, H, S, D),
/// k (B, H / group, L, D), v (B, H / group, L, Dv), mask broadcast to (B, H, S, L); y is
/// (B, H, S, Dv). With `concat`, the keys and values come as two parts each, concatenated along
/// the sequence axis here: the inputs are (q, k₀, k₁, v₀, v₁, mask) and the outputs (y, k, v).
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub group: usize,
    pub scale: f32,
    pub concat: bool,
}

/// `scale` is a finite constant of the graph (never NaN), so equality is an equivalence.
impl Eq for Attention {}

/// Where the keys (or values) come from.
enum Kv {
    Whole(OutletId),
    /// A `Concat` along the sequence axis of two parts.
    Concat(usize, OutletId, OutletId),
}

struct Found {
    softmax: usize,
    av: usize,
    q: OutletId,
    k: Kv,
    v: Kv,
    mask: OutletId,
    scale: f32,
    group: usize,
}

/// Replaces each f32 attention core of `model` by [`Attention`]; returns how many. Run after
/// [`super::matmul::absorb_kv_repeats`] (which gives the products their `group`).
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        if let Some(f) = find(model, node)? {
            found.push(f);
        }
    }
    for f in &found {
        let mut patch = TypedModelPatch::default();
        let mut tap = |o: OutletId| patch.tap_model(model, o);
        let q = tap(f.q)?;
        let mut kv = vec![];
        for x in [&f.k, &f.v] {
            match x {
                Kv::Whole(o) => kv.push(tap(*o)?),
                Kv::Concat(_, a, b) => {
                    kv.push(tap(*a)?);
                    kv.push(tap(*b)?);
                }
            }
        }
        let mask = tap(f.mask)?;
        let concat = matches!(f.k, Kv::Concat(..));
        let inputs: TVec<OutletId> = std::iter::once(q).chain(kv).chain([mask]).collect();
        let name = &model.node(f.softmax).name;
        let op = Attention { group: f.group, scale: f.scale, concat };
        let outs = patch.wire_node(format!("{name}.attention"), op, &inputs)?;
        patch.shunt_outside(model, f.av.into(), outs[0])?;
        if let (Kv::Concat(k, ..), Kv::Concat(v, ..)) = (&f.k, &f.v) {
            patch.shunt_outside(model, (*k).into(), outs[1])?;
            patch.shunt_outside(model, (*v).into(), outs[2])?;
        }
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(found.len())
}

/// The attention core ending at `node` (its `Softmax`), if it is one.
fn find(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Found>> {
    let Some(sm) = node.op_as::<Softmax>() else { return Ok(None) };
    let fact = |o: OutletId| model.outlet_fact(o);
    let scores = fact(node.inputs[0])?;
    let rank = scores.rank();
    if rank != 4 || sm.axes[..] != [3] || sm.kind != SoftmaxKind::Softmax || sm.quant_output_dt.is_some() || scores.datum_type != f32::datum_type() {
        return Ok(None);
    }
    // every link of the chain read by the next one only
    let only_reader = |o: OutletId| model.outlet_successors(o).len() == 1 && !model.output_outlets().unwrap_or(&[]).contains(&o);
    let bin = |id: usize| model.node(id).op_as::<TypedBinOp>().filter(|b| b.1.is_none_or(|t| t == f32::datum_type()));
    // Softmax -> A V
    let out = OutletId::new(node.id, 0);
    if !only_reader(out) {
        return Ok(None);
    }
    let av = model.node(model.outlet_successors(out)[0].node);
    let Some(&ActMatMul { trans_b: false, group }) = av.op_as::<ActMatMul>() else { return Ok(None) };
    if av.inputs[0] != out {
        return Ok(None);
    }
    // Add(Mul(Q Kᵀ, scale), mask), either operand order
    let add = model.node(node.inputs[0].node);
    if !bin(add.id).is_some_and(|b| b.0.is::<Add>()) || !only_reader(node.inputs[0]) {
        return Ok(None);
    }
    let is_mul = |o: OutletId| bin(o.node).is_some_and(|b| b.0.is::<Mul>()) && only_reader(o);
    let (mul, mask) = match (is_mul(add.inputs[0]), is_mul(add.inputs[1])) {
        (true, _) => (model.node(add.inputs[0].node), add.inputs[1]),
        (_, true) => (model.node(add.inputs[1].node), add.inputs[0]),
        _ => return Ok(None),
    };
    let scalar = |o: OutletId| -> Option<f32> {
        let k = model.outlet_fact(o).ok()?.konst.clone()?;
        (k.len() == 1 && k.datum_type() == f32::datum_type()).then(|| k.cast_to_scalar::<f32>().ok()).flatten()
    };
    let is_qk = |o: OutletId| {
        model.node(o.node).op_as::<ActMatMul>() == Some(&ActMatMul { trans_b: true, group }) && only_reader(o)
    };
    let (qk, scale) = match (is_qk(mul.inputs[0]), is_qk(mul.inputs[1])) {
        (true, _) => (model.node(mul.inputs[0].node), scalar(mul.inputs[1])),
        (_, true) => (model.node(mul.inputs[1].node), scalar(mul.inputs[0])),
        _ => return Ok(None),
    };
    let Some(scale) = scale.filter(|s| s.is_finite()) else { return Ok(None) };
    let (q, k, v) = (qk.inputs[0], qk.inputs[1], av.inputs[1]);
    // shapes our op takes: rank 4, one batch for all, H = group x kv heads, a mask that
    // broadcasts to the scores, all f32
    let (qf, kf, vf, mf) = (fact(q)?, fact(k)?, fact(v)?, fact(mask)?);
    if [qf, kf, vf, mf].iter().any(|f| f.datum_type != f32::datum_type()) || [qf, kf, vf].iter().any(|f| f.rank() != 4) {
        return Ok(None);
    }
    let (qs, ks, vs) = (&qf.shape, &kf.shape, &vf.shape);
    let heads_fit = qs[1] == ks[1].clone() * group && vs[1] == ks[1];
    if qs[0] != ks[0] || vs[0] != ks[0] || !heads_fit || qs[3] != ks[3] || vs[2] != ks[2] || mf.rank() > 4 {
        return Ok(None);
    }
    let scores_shape = scores.shape.to_tvec();
    if multi_broadcast(&[scores_shape.clone(), mf.shape.to_tvec()]).ok() != Some(scores_shape) {
        return Ok(None);
    }
    // the cache's Concats along the sequence axis, taken in when both are
    let concat = |o: OutletId| -> Kv {
        let n = model.node(o.node);
        match n.op_as::<TypedConcat>() {
            Some(c) if c.axis == 2 && n.inputs.len() == 2 && o.slot == 0 => Kv::Concat(n.id, n.inputs[0], n.inputs[1]),
            _ => Kv::Whole(o),
        }
    };
    let (k, v) = match (concat(k), concat(v)) {
        (k @ Kv::Concat(..), v @ Kv::Concat(..)) => (k, v),
        _ => (Kv::Whole(k), Kv::Whole(v)),
    };
    Ok(Some(Found { softmax: node.id, av: av.id, q, k, v, mask, scale, group }))
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("group={} scale={} concat={}", self.group, self.scale, self.concat)])
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if !self.concat {
            let (q, k, v, mask) = args_4!(inputs);
            let (k, v) = (Keys::whole(&k)?, Keys::whole(&v)?);
            return Ok(tvec!(attend(&q, &k, &v, &mask, self.scale, self.group, None)?.into_tvalue()));
        }
        let (q, k0, k1, v0, v1, mask) = args_6!(inputs);
        let (k, v) = (Keys::parts(&k0, &k1)?, Keys::parts(&v0, &v1)?);
        let (mut kc, mut vc) = (k.uninitialized()?, v.uninitialized()?);
        let y = if q.shape().get(2).is_some_and(|&s| s >= BLOCKED_ROWS) {
            // a prefill: the products on the blocked kernel, over the concatenations
            k.copy_into(&mut kc)?;
            v.copy_into(&mut vc)?;
            attend(&q, &Keys::whole(&kc)?, &Keys::whole(&vc)?, &mask, self.scale, self.group, None)?
        } else {
            attend(&q, &k, &v, &mask, self.scale, self.group, Some((&mut kc, &mut vc)))?
        };
        Ok(tvec!(y.into_tvalue(), kc.into_tvalue(), vc.into_tvalue()))
    }
}

/// Keys or values as the product reads them: for each (batch, head) a run of `len[0]` rows of
/// `d` from `parts[0]`, then `len[1]` from `parts[1]` (the cache and the new tokens, which the
/// graph concatenated).
struct Keys<'a> {
    shape: [usize; 4],
    parts: [&'a [f32]; 2],
    len: [usize; 2],
}

impl<'a> Keys<'a> {
    fn whole(t: &'a Tensor) -> TractResult<Keys<'a>> {
        let s = t.shape();
        ensure!(s.len() == 4, "keys or values of shape {s:?}");
        Ok(Keys { shape: [s[0], s[1], s[2], s[3]], parts: [t.try_as_plain_ram()?.as_slice::<f32>()?, &[]], len: [s[2], 0] })
    }

    fn parts(a: &'a Tensor, b: &'a Tensor) -> TractResult<Keys<'a>> {
        let (sa, sb) = (a.shape(), b.shape());
        ensure!(sa.len() == 4 && sb.len() == 4 && sa[..2] == sb[..2] && sa[3] == sb[3], "key/value parts of shapes {sa:?} and {sb:?}");
        let parts = [a.try_as_plain_ram()?.as_slice::<f32>()?, b.try_as_plain_ram()?.as_slice::<f32>()?];
        Ok(Keys { shape: [sa[0], sa[1], sa[2] + sb[2], sa[3]], parts, len: [sa[2], sb[2]] })
    }

    /// Row `j` of (batch x head) `i`.
    #[inline(always)]
    fn row(&self, i: usize, j: usize) -> &'a [f32] {
        let d = self.shape[3];
        let (p, j) = if j < self.len[0] { (0, j) } else { (1, j - self.len[0]) };
        &self.parts[p][(i * self.len[p] + j) * d..][..d]
    }

    fn uninitialized(&self) -> TractResult<Tensor> {
        unsafe { Tensor::uninitialized::<f32>(&self.shape) }
    }

    /// (Batch x head) `i`'s rows, concatenated, into `out` (their length).
    fn copy_head(&self, i: usize, out: &mut [f32]) {
        let d = self.shape[3];
        let (a, b) = (self.len[0] * d, self.len[1] * d);
        out[..a].copy_from_slice(&self.parts[0][i * a..][..a]);
        out[a..].copy_from_slice(&self.parts[1][i * b..][..b]);
    }

    fn copy_into(&self, out: &mut Tensor) -> TractResult<()> {
        let mut o = out.try_as_plain_ram_mut()?;
        let per = self.shape[2] * self.shape[3];
        for (i, o) in o.as_slice_mut::<f32>()?.chunks_exact_mut(per.max(1)).enumerate() {
            self.copy_head(i, o);
        }
        Ok(())
    }
}

/// The attention of every (batch, head) and, with `concat`, the copy of each (batch, key head)'s
/// keys and values into the concatenations: tasks claimed one at a time by the session's threads
/// (heads first, then copies, so whoever is done first takes more of the copies). Fewer than
/// [`BLOCKED_ROWS`] query rows run the product's row loops here (reading the keys where they
/// lie), more its blocked kernel per head (on whole keys).
fn attend(q: &Tensor, k: &Keys, v: &Keys, mask: &Tensor, scale: f32, group: usize, concat: Option<(&mut Tensor, &mut Tensor)>) -> TractResult<Tensor> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let qs = q.shape();
    ensure!(qs.len() == 4, "queries of shape {qs:?}");
    let (b, h, s, d) = (qs[0], qs[1], qs[2], qs[3]);
    let ([kb, kv, l, kd], [vb, vh, vl, dv]) = (k.shape, v.shape);
    ensure!(
        kb == b && vb == b && group > 0 && h == kv * group && vh == kv && kd == d && vl == l,
        "attention of shapes {qs:?}, {:?}, {:?} with {group} query heads per key head", k.shape, v.shape
    );
    let st = broadcast_strides(mask.shape(), &[b, h, s, l])?;
    let mut y = unsafe { Tensor::uninitialized::<f32>(&[b, h, s, dv])? };
    let (qv, mv) = (q.try_as_plain_ram()?, mask.try_as_plain_ram()?);
    let (q, mask) = (qv.as_slice::<f32>()?, mv.as_slice::<f32>()?);
    let (mut kc, mut vc) = match concat {
        Some((kc, vc)) => (Some(kc.try_as_plain_ram_mut()?), Some(vc.try_as_plain_ram_mut()?)),
        None => (None, None),
    };
    let mut yv = y.try_as_plain_ram_mut()?;
    // the outputs, claimed once each: y's heads, the concatenations' heads (keys, values)
    let ys = slots(Some(yv.as_slice_mut::<f32>()?), s * dv);
    let ks = slots(match kc.as_mut() { Some(t) => Some(t.as_slice_mut::<f32>()?), None => None }, l * d);
    let vs = slots(match vc.as_mut() { Some(t) => Some(t.as_slice_mut::<f32>()?), None => None }, l * dv);
    // tasks in the order of the key heads, each key head's copies then its query heads, so the
    // keys and values a head reads are in cache from the copy
    let copies = if ks.is_empty() { 0 } else { 2 };
    let per_kv = copies + group;
    let whole = k.len[1] == 0 && v.len[1] == 0;
    let next = AtomicUsize::new(0);
    let head = |head: usize, y: &mut [f32], scores: &mut [f32]| {
        let (bi, hi) = (head / h, head % h);
        let kvi = bi * kv + hi / group;
        let qh = &q[head * s * d..][..s * d];
        if s >= BLOCKED_ROWS && whole {
            product(qh, &[s, d], &k.parts[0][kvi * l * d..][..l * d], &[l, d], true, 1, scores);
        } else {
            for (qr, row) in qh.chunks_exact(d.max(1)).zip(scores.chunks_exact_mut(l.max(1))) {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = dot(qr, k.row(kvi, j));
                }
            }
        }
        for (r, row) in scores.chunks_exact_mut(l.max(1)).enumerate() {
            let m = &mask[bi * st[0] + hi * st[1] + r * st[2]..];
            for (j, x) in row.iter_mut().enumerate() {
                *x = *x * scale + m[j * st[3]];
            }
            softmax(row);
        }
        if s >= BLOCKED_ROWS && whole {
            product(scores, &[s, l], &v.parts[0][kvi * l * dv..][..l * dv], &[l, dv], false, 1, y);
        } else {
            for (p, y) in scores.chunks_exact(l.max(1)).zip(y.chunks_exact_mut(dv.max(1))) {
                y.fill(0.0);
                for (j, &x) in p.iter().enumerate().take(l) {
                    for (c, &w) in y.iter_mut().zip(v.row(kvi, j)) {
                        *c += x * w;
                    }
                }
            }
        }
    };
    let work = b * h * s * l * (d + dv) * 4;
    crate::qmatmul::split::on_threads(work, || {
        let mut scores = vec![0f32; s * l];
        loop {
            let t = next.fetch_add(1, Relaxed);
            let (kvi, j) = (t / per_kv, t % per_kv);
            if kvi >= b * kv {
                break;
            }
            match j {
                0 if copies > 0 => take(&ks, kvi).into_iter().for_each(|o| k.copy_head(kvi, o)),
                1 if copies > 0 => take(&vs, kvi).into_iter().for_each(|o| v.copy_head(kvi, o)),
                j => {
                    // query head (batch, kvi % kv x group + j - copies)
                    let hd = (kvi / kv) * h + (kvi % kv) * group + j - copies;
                    take(&ys, hd).into_iter().for_each(|o| head(hd, o, &mut scores))
                }
            }
        }
    });
    drop((ys, ks, vs));
    Ok(y)
}

/// Piece `i` of [`slots`], if nobody took it.
fn take<'a>(slots: &[std::sync::Mutex<Option<&'a mut [f32]>>], i: usize) -> Option<&'a mut [f32]> {
    slots.get(i).and_then(|s| s.lock().unwrap().take())
}

/// `x` cut into pieces of `per`, each for one taker.
fn slots(x: Option<&mut [f32]>, per: usize) -> Vec<std::sync::Mutex<Option<&mut [f32]>>> {
    x.map(|x| x.chunks_mut(per.max(1)).map(|c| std::sync::Mutex::new(Some(c))).collect()).unwrap_or_default()
}

/// `x = exp(x - max) / Σ exp(x - max)` in place, on eight lanes; exp by [`exp_le0`].
fn softmax(x: &mut [f32]) {
    const L: usize = 8;
    let mut m = [f32::NEG_INFINITY; L];
    let (chunks, tail) = x.as_chunks::<L>();
    for c in chunks {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let max = tail.iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut sum = [0f32; L];
    let (chunks, tail) = x.as_chunks_mut::<L>();
    for c in chunks {
        for i in 0..L {
            c[i] = exp_le0(c[i] - max);
            sum[i] += c[i];
        }
    }
    let mut total = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
    for t in tail {
        *t = exp_le0(*t - max);
        total += *t;
    }
    let r = total.recip();
    for x in x.iter_mut() {
        *x *= r;
    }
}

/// `exp(x)` for `x <= 0` (softmax's shifted scores), within ~2 ulp: `2ⁿ exp(r)`, with
/// `n = round(x / ln 2)` (by the 1.5·2²³ trick, which vectorizes where `round` would not),
/// `r = x - n ln 2` in two parts (Cody and Waite) and Cephes' `expf` polynomial for `exp(r)`.
/// Below -87 (and at -inf, a masked score) it is 0; NaN stays NaN.
#[inline(always)]
fn exp_le0(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    let xc = if x < -87.0 { -87.0 } else { x };
    let n = (xc * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (xc - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = (p * r) * r + r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { e * scale }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, v) = (&inputs[0].shape, &inputs[if self.concat { 3 } else { 2 }].shape);
        ensure!(q.rank() == 4 && v.rank() == 4, "attention of rank {} and {}", q.rank(), v.rank());
        let y = f32::fact([q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()]);
        if !self.concat {
            return Ok(tvec!(y));
        }
        let cat = |a: &TypedFact, b: &TypedFact| {
            let mut s = a.shape.to_tvec();
            s[2] = s[2].clone() + b.shape[2].clone();
            f32::fact(s)
        };
        Ok(tvec!(y, cat(inputs[1], inputs[2]), cat(inputs[3], inputs[4])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_zero_below_the_range() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp_le0(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 is 2.4e-7 relative
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(-100.0), 0.0);
        assert_eq!(exp_le0(0.0), 1.0);
        assert!(exp_le0(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_equals_the_f64_formula_and_masks_to_zero() {
        for len in [1, 3, 8, 13, 64, 97] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 1.7).collect();
            let mut masked = x.clone();
            masked[len / 2] = f32::NEG_INFINITY;
            for (row, drop) in [(x.clone(), None), (masked, Some(len / 2))] {
                if len == 1 && drop.is_some() {
                    continue;
                }
                let mut got = row.clone();
                softmax(&mut got);
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                for (j, (&g, &v)) in got.iter().zip(&row).enumerate() {
                    let want = (v as f64 - max).exp() / sum;
                    assert!((g as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12, "len {len} j {j}: {g} vs {want}");
                    if Some(j) == drop {
                        assert_eq!(g, 0.0);
                    }
                }
            }
        }
    }
}
