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
//! [`super::matmul::product`] (its row loops, or its blocked kernel for a prefill of 16
//! rows or more), the scale and mask as the `Mul` and `Add` (each rounded to
//! f32), then a softmax of our own ([`softmax`]: tract's picks its kernel per row length and
//! cost ~8 µs per layer here, natively). The logits stay within the FP32 parity bound (1e-4) of
//! tract's nodes with the same greedy tokens (`fused_ops_equal_tracts_ops`, on the tiny models),
//! and are the same bits however the heads are cut across threads
//! (`products_split_across_threads_equal_one_thread`).
//!
//! Taking the `Concat`s in moves the key/value cache into the op ([`Cache`]): the graph's
//! `Concat(past, new)` copied the whole cache every step, ~2x its size in memory traffic (46 KB
//! per cached token on SmolLM2, quadratic over a generation); the op's state keeps each layer's
//! keys and values in a buffer with room to grow and writes only the new rows. The graph's
//! `past_*` inputs and `present_*` outputs are then removed from the plan: the state is the one
//! store of the cache, and it gives tract the past length `P` (the symbol the graph's positions
//! and mask are written in) from the rows it holds. The session reaches the states by node id
//! (src/session.rs). This is all or nothing over the layers ([`fuse`]).

use tract_onnx::tract_core::broadcast::multi_broadcast;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::{add, Add, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_hir::internal::*;

use super::matmul::{product, ActMatMul, BLOCKED_ROWS};
use super::rope::broadcast_strides;
use super::rows::{mix_into, scale_and_mask, scores as key_scores, softmax};
#[cfg(test)]
use super::rows::exp_le0;

/// The op's name in a plan.
pub const OP_NAME: &str = "WasmlmAttention";

/// `y = softmax(q kᵀ · scale + mask) v` over the last axis, per batch and head; q is (B, H, S, D),
/// k (B, H / group, L, D), v (B, H / group, L, Dv), mask broadcast to (B, H, S, L); y is
/// (B, H, S, Dv). With a `cache`, the inputs are (q, new k, new v, mask): the keys and values
/// are the op's [`Cache`] with the new rows appended.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub group: usize,
    pub scale: f32,
    pub cache: Option<Past>,
}

/// The graph's past this op's state took over: the name of the past-key input it replaced (so
/// its layer), and that input's length, `P` in the graph's other shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Past {
    pub input: String,
    pub len: TDim,
}

/// `scale` is a finite constant of the graph (never NaN), so equality is an equivalence.
impl Eq for Attention {}

/// Where the keys (or values) come from.
enum Kv {
    Whole(OutletId),
    /// A `Concat` along the sequence axis of a graph input (the past) and the new rows.
    Concat(usize, OutletId, OutletId),
}

/// Where the mask comes from.
enum Mask {
    /// Added to the scaled scores.
    Added(OutletId),
    /// GPT-2's: the scaled scores replaced by `low` where `keep` is false, then `added` added
    /// (with a past), `Where(keep, x, low) + added`. The op takes it as
    /// `x + (Where(keep, 0, low) + added)`: the same values where `keep` is true (`0 + m` is
    /// `m`), and scores far below the softmax's `exp` range where it is false (low is -1e30 or
    /// below), whose weights are 0 either way.
    Replaced { keep: OutletId, low: OutletId, added: Option<OutletId> },
}

struct Found {
    softmax: usize,
    av: usize,
    q: OutletId,
    k: Kv,
    v: Kv,
    mask: Mask,
    scale: f32,
    group: usize,
}

/// Replaces each f32 attention core of `model` by [`Attention`]; returns how many. Run after
/// [`super::matmul::absorb_kv_repeats`] (which gives the products their `group`).
///
/// The cache's `Concat`s are taken in (the op then keeps the cache, [`Cache`]) only if all of
/// them are, every graph output made by a `Concat`; the graph's past inputs and present outputs
/// are then removed (the session feeds all layers one way or the other).
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        if let Some(f) = find(model, node)? {
            found.push(f);
        }
    }
    let outputs: std::collections::BTreeSet<usize> =
        model.output_outlets()?.iter().filter(|o| model.node(o.node).op_is::<TypedConcat>()).map(|o| o.node).collect();
    let taken: std::collections::BTreeSet<usize> = found
        .iter()
        .flat_map(|f| [&f.k, &f.v])
        .filter_map(|x| if let Kv::Concat(id, ..) = x { Some(*id) } else { None })
        .collect();
    if taken != outputs {
        for x in found.iter_mut().flat_map(|f| [&mut f.k, &mut f.v]) {
            if let Kv::Concat(id, ..) = *x {
                *x = Kv::Whole(OutletId::new(id, 0));
            }
        }
    }
    for f in &found {
        let mut patch = TypedModelPatch::default();
        let mut tap = |o: OutletId| patch.tap_model(model, o);
        let q = tap(f.q)?;
        let mut kv = vec![];
        let mut cache = None;
        for x in [&f.k, &f.v] {
            match x {
                Kv::Whole(o) => kv.push(tap(*o)?),
                Kv::Concat(_, past, new) => {
                    kv.push(tap(*new)?);
                    cache.get_or_insert(Past { input: model.node(past.node).name.clone(), len: model.outlet_fact(*past)?.shape[2].clone() });
                }
            }
        }
        let mask = match f.mask {
            Mask::Added(m) => tap(m)?,
            Mask::Replaced { keep, low, added } => {
                let (keep, low) = (tap(keep)?, tap(low)?);
                let added = added.map(&mut tap).transpose()?;
                let name = &model.node(f.softmax).name;
                let rank = patch.outlet_fact(low)?.rank();
                let zero = patch.add_const(format!("{name}.mask.zero"), tensor0(0f32).broadcast_into_rank(rank)?)?;
                let hidden = patch.wire_node(format!("{name}.mask.hidden"), Iff, &[keep, zero, low])?[0];
                match added {
                    Some(added) => patch.wire_node(format!("{name}.mask"), add(), &[hidden, added])?[0],
                    None => hidden,
                }
            }
        };
        let inputs: TVec<OutletId> = std::iter::once(q).chain(kv).chain([mask]).collect();
        let name = &model.node(f.softmax).name;
        let op = Attention { group: f.group, scale: f.scale, cache };
        let outs = patch.wire_node(format!("{name}.attention"), op, &inputs)?;
        patch.shunt_outside(model, f.av.into(), outs[0])?;
        patch.apply(model)?;
    }
    if !taken.is_empty() && taken == outputs {
        // the past inputs (each read by its Concat only) and the present outputs go: the
        // states hold the cache
        let pasts: Vec<usize> = found
            .iter()
            .flat_map(|f| [&f.k, &f.v])
            .filter_map(|x| if let Kv::Concat(_, past, _) = x { Some(past.node) } else { None })
            .collect();
        model.outputs.retain(|o| !taken.contains(&o.node));
        model.inputs.retain(|o| !pasts.contains(&o.node));
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
    let only_reader = |o: OutletId| super::only_reader(model, o);
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
    // Add(Mul(Q Kᵀ, scale), mask), or [Add(]Where(keep, Mul(Q Kᵀ, scale), low)[, mask)]; either
    // operand order
    let add = model.node(node.inputs[0].node);
    if !only_reader(node.inputs[0]) {
        return Ok(None);
    }
    let scalar = |o: OutletId| -> Option<f32> {
        let k = model.outlet_fact(o).ok()?.konst.clone()?;
        (k.len() == 1 && k.datum_type() == f32::datum_type()).then(|| k.cast_to_scalar::<f32>().ok()).flatten()
    };
    let is_mul = |o: OutletId| bin(o.node).is_some_and(|b| b.0.is::<Mul>()) && only_reader(o);
    // Where(keep, x, low) read once, x a Mul read once, low a constant -1e30 or below: (x, keep, low)
    let replaced = |o: OutletId| -> Option<(OutletId, OutletId, OutletId)> {
        let w = model.node(o.node);
        let low = w.inputs.get(2).copied()?;
        let far_below = scalar(low).is_some_and(|x| x <= -1e30);
        (w.op_is::<Iff>() && only_reader(o) && is_mul(w.inputs[1]) && far_below).then_some((w.inputs[1], w.inputs[0], low))
    };
    let (mul, mask) = if !bin(add.id).is_some_and(|b| b.0.is::<Add>()) {
        match replaced(node.inputs[0]) {
            Some((x, keep, low)) => (model.node(x.node), Mask::Replaced { keep, low, added: None }),
            None => return Ok(None),
        }
    } else {
        match (is_mul(add.inputs[0]), is_mul(add.inputs[1])) {
            (true, _) => (model.node(add.inputs[0].node), Mask::Added(add.inputs[1])),
            (_, true) => (model.node(add.inputs[1].node), Mask::Added(add.inputs[0])),
            _ => match (replaced(add.inputs[0]), replaced(add.inputs[1])) {
                (Some((x, keep, low)), _) => (model.node(x.node), Mask::Replaced { keep, low, added: Some(add.inputs[1]) }),
                (_, Some((x, keep, low))) => (model.node(x.node), Mask::Replaced { keep, low, added: Some(add.inputs[0]) }),
                _ => return Ok(None),
            },
        }
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
    let masks = match mask {
        Mask::Added(m) => vec![fact(m)?],
        Mask::Replaced { keep, added, .. } => {
            let mut parts = vec![fact(keep)?];
            if let Some(a) = added {
                parts.push(fact(a)?);
            }
            parts
        }
    };
    let (qf, kf, vf) = (fact(q)?, fact(k)?, fact(v)?);
    // an added mask is f32; a replacing one's `keep` is bool
    let types_fit = masks.iter().enumerate().all(|(i, f)| {
        let bool_keep = i == 0 && matches!(mask, Mask::Replaced { .. });
        f.datum_type == if bool_keep { bool::datum_type() } else { f32::datum_type() }
    });
    if [qf, kf, vf].iter().any(|f| f.datum_type != f32::datum_type() || f.rank() != 4) || !types_fit {
        return Ok(None);
    }
    let (qs, ks, vs) = (&qf.shape, &kf.shape, &vf.shape);
    let heads_fit = qs[1] == ks[1].clone() * group && vs[1] == ks[1];
    if qs[0] != ks[0] || vs[0] != ks[0] || !heads_fit || qs[3] != ks[3] || vs[2] != ks[2] {
        return Ok(None);
    }
    // each part of the mask broadcasts to the scores; the parts of a replacing mask, combined by
    // our Where and Add, are of the scores' rank as tract's binary ops need
    let scores_shape = scores.shape.to_tvec();
    let fits = |f: &TypedFact| multi_broadcast(&[scores_shape.clone(), f.shape.to_tvec()]).ok() == Some(scores_shape.clone());
    let ranks_fit = match mask {
        Mask::Added(_) => masks[0].rank() <= 4,
        Mask::Replaced { low, .. } => masks.iter().all(|f| f.rank() == 4) && fact(low)?.rank() == 4,
    };
    if !ranks_fit || !masks.iter().all(|f| fits(f)) {
        return Ok(None);
    }
    // the cache's Concats along the sequence axis of a graph input read by nothing else, taken
    // in when both are
    let inputs = model.input_outlets()?;
    let concat = |o: OutletId| -> Kv {
        let n = model.node(o.node);
        match n.op_as::<TypedConcat>() {
            Some(c) if c.axis == 2 && n.inputs.len() == 2 && o.slot == 0
                && inputs.contains(&n.inputs[0]) && model.outlet_successors(n.inputs[0]).len() == 1 =>
            {
                Kv::Concat(n.id, n.inputs[0], n.inputs[1])
            }
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
        let cache = self.cache.as_ref().map(|c| format!(" cache of {} ({})", c.input, c.len)).unwrap_or_default();
        Ok(vec![format!("group={} scale={}{cache}", self.group, self.scale)])
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    /// Without the cache the op is a function of its inputs; with it, it keeps the cache
    /// ([`Cache`]) and runs only in a plan's state.
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        if self.cache.is_some() {
            return Ok(None);
        }
        let (q, k, v, mask) = args_4!(inputs);
        let (k, v) = (Keys::whole(&k)?, Keys::whole(&v)?);
        Ok(Some(tvec!(attend(&q, &k, &v, &mask, self.scale, self.group)?.into_tvalue())))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.eval_out_of_plan(inputs)?.context("the attention op with the cache runs in a plan's state")
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(self.cache.as_ref().map(|c| Box::new(Cache::new(c.len.clone())) as Box<dyn OpState>))
    }
}

/// A layer's key/value cache, kept by its [`Attention`] between steps and grown in place: the
/// graph's `Concat(past, new)` copied the whole cache every step (~2x its size in memory
/// traffic, 46 KB per cached token on SmolLM2); here a step writes its new rows only.
///
/// The session owns these states through its plan state and reaches them by node id
/// (src/session.rs, `Store::Ops`): it truncates, copies, saves and loads them. The graph has no
/// past inputs left: before each run the state gives tract the past length `P` from its rows
/// ([`OpState::resolve_symbols`], as tract-transformers' own caches do), which the graph reads
/// for the positions and the mask. Where an input also says `P` (an attention mask of `P + S`),
/// the two must agree: a step refuses a cache of another length.
#[derive(Debug, Clone)]
pub struct Cache {
    k: Rows,
    v: Rows,
    /// The past length in the graph's shapes: a symbol, `P`.
    past: TDim,
}

impl OpState for Cache {
    fn init_tensor_fact(&self) -> Option<(String, TypedFact)> {
        let s = [self.k.shape[0], self.k.shape[1]].map(|x| x.to_dim());
        Some(("attention cache".into(), f32::fact([s[0].clone(), s[1].clone(), self.past.clone(), self.k.shape[3].to_dim()])))
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    /// `P` is the rows this state holds.
    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        if let TDim::Sym(p) = &self.past {
            if state.resolved_symbols.get(p).is_none() {
                state.resolved_symbols.set(p, self.len() as i64);
                if state.scenario.is_none() {
                    state.scenario = p.scope().context("the past length's symbol scope")?.guess_scenario(&state.resolved_symbols)?;
                }
            }
        }
        Ok(())
    }

    fn eval(&mut self, ctx: &EvalContext, op: &dyn Op, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = op.downcast_ref::<Attention>().context("the attention cache on another op")?;
        if let Ok(p) = self.past.eval(ctx.symbols).to_usize() {
            ensure!(p == self.len(), "the attention cache holds {} tokens, the graph's inputs say {p}", self.len());
        }
        let (q, k, v, mask) = args_4!(inputs);
        self.k.append(&k)?;
        self.v.append(&v)?;
        let y = attend(&q, &self.k.keys(), &self.v.keys(), &mask, op.scale, op.group)?;
        Ok(tvec!(y.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("the attention cache serves one stream")
    }
}

/// What the session reads and writes of a layer's cache (src/session.rs: truncate, fork,
/// snapshot, restore); the op's steps grow it.
impl Cache {
    fn new(past: TDim) -> Cache {
        Cache { k: Rows::default(), v: Rows::default(), past }
    }

    /// Rows per head.
    pub fn len(&self) -> usize {
        self.k.shape[2]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep the first `len` rows of every head (at once: the next step's past is that length).
    pub fn truncate(&mut self, len: usize) {
        self.k.shape[2] = self.k.shape[2].min(len);
        self.v.shape[2] = self.v.shape[2].min(len);
    }

    /// The keys, then the values, each (B, H, len, D) in order, appended to `out`.
    pub fn export(&self, out: &mut Vec<f32>) {
        self.k.export(out);
        self.v.export(out);
    }

    /// The cache `export` wrote for `shape` (B, H, len, D): keys then values.
    pub fn import(&mut self, shape: [usize; 4], kv: &[f32]) -> TractResult<()> {
        let n = shape.iter().product::<usize>();
        ensure!(kv.len() == 2 * n, "{} values for two caches of shape {shape:?}", kv.len());
        self.k = Rows { data: kv[..n].to_vec(), shape, cap: shape[2] };
        self.v = Rows { data: kv[n..].to_vec(), shape, cap: shape[2] };
        Ok(())
    }
}

/// Per (batch, key head) `cap` rows of `d`, the first `shape[2]` of them the cache.
#[derive(Debug, Clone, Default)]
struct Rows {
    data: Vec<f32>,
    shape: [usize; 4],
    cap: usize,
}

impl Rows {
    /// Appends `new`'s rows (B, H, n, D) after the cache's; an empty cache takes its B, H, D.
    fn append(&mut self, new: &Tensor) -> TractResult<()> {
        let s = new.shape();
        ensure!(s.len() == 4, "new keys or values of shape {s:?}");
        if self.shape[2] == 0 && [self.shape[0], self.shape[1], self.shape[3]] != [s[0], s[1], s[3]] {
            *self = Rows { data: vec![], shape: [s[0], s[1], 0, s[3]], cap: 0 };
        }
        ensure!([self.shape[0], self.shape[1], self.shape[3]] == [s[0], s[1], s[3]],
                "new rows of shape {s:?} for a cache of {:?}", self.shape);
        self.write(new)
    }

    /// `t`'s rows after the cache's.
    fn write(&mut self, t: &Tensor) -> TractResult<()> {
        let [b, h, at, d] = self.shape;
        let n = t.shape()[2];
        self.reserve(at + n);
        let src = t.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        for i in 0..b * h {
            self.data[(i * self.cap + at) * d..][..n * d].copy_from_slice(&src[i * n * d..][..n * d]);
        }
        self.shape[2] = at + n;
        Ok(())
    }

    /// Room for `rows` rows per head: when they do not fit, a new buffer of twice the capacity
    /// or 1.5 times `rows` (a prefill's, so the steps after it do not grow it at once), at least
    /// 64, the cache copied over once.
    fn reserve(&mut self, rows: usize) {
        if rows <= self.cap {
            return;
        }
        let [b, h, len, d] = self.shape;
        let cap = (rows + rows / 2).max(2 * self.cap).max(64);
        let mut data = vec![0f32; b * h * cap * d];
        for i in 0..b * h {
            data[i * cap * d..][..len * d].copy_from_slice(&self.data[i * self.cap * d..][..len * d]);
        }
        (self.data, self.cap) = (data, cap);
    }

    fn export(&self, out: &mut Vec<f32>) {
        let [b, h, len, d] = self.shape;
        for i in 0..b * h {
            out.extend_from_slice(&self.data[i * self.cap * d..][..len * d]);
        }
    }

    fn keys(&self) -> Keys<'_> {
        Keys { shape: self.shape, data: &self.data, stride: self.cap }
    }
}

/// Keys or values as the products read them: (B, H, L, D) of which each (batch, head)'s `L`
/// rows start `stride` rows after the previous one's.
struct Keys<'a> {
    shape: [usize; 4],
    data: &'a [f32],
    stride: usize,
}

impl<'a> Keys<'a> {
    fn whole(t: &'a Tensor) -> TractResult<Keys<'a>> {
        let s = t.shape();
        ensure!(s.len() == 4, "keys or values of shape {s:?}");
        Ok(Keys { shape: [s[0], s[1], s[2], s[3]], data: t.try_as_plain_ram()?.as_slice::<f32>()?, stride: s[2] })
    }

    /// (Batch x head) `i`'s rows.
    #[inline(always)]
    fn head(&self, i: usize) -> &'a [f32] {
        let (l, d) = (self.shape[2], self.shape[3]);
        &self.data[i * self.stride * d..][..l * d]
    }
}

/// The attention of every (batch, head). A few query rows (decode, a short turn) take
/// [`attend_rows`]; a prefill's heads are tasks claimed one at a time by the session's threads,
/// each head's products [`product`]'s on the keys and values where they lie (a head's rows are
/// contiguous in the cache's buffer), a chunk of rows at a time.
fn attend(q: &Tensor, k: &Keys, v: &Keys, mask: &Tensor, scale: f32, group: usize) -> TractResult<Tensor> {
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
    let mut yv = y.try_as_plain_ram_mut()?;
    // head `i` = (batch, query head), query row r
    let mask_row = |i: usize, r: usize| &mask[i / h * st[0] + i % h * st[1] + r * st[2]..];
    let scale_mask_softmax = |i: usize, r: usize, row: &mut [f32]| {
        if st[3] == 1 {
            scale_and_mask(row, scale, mask_row(i, r));
        } else {
            let m = mask_row(i, r);
            for (j, x) in row.iter_mut().enumerate() {
                *x = *x * scale + m[j * st[3]];
            }
        }
        softmax(row);
    };
    if s < BLOCKED_ROWS {
        attend_rows(q, k, v, [b * kv, group * s, l, d, dv], yv.as_slice_mut::<f32>()?, &|row, p| {
            scale_mask_softmax(row / s, row % s, p)
        });
        return Ok(y);
    }
    // A turn short enough to be one chunk of rows, whose mask is the same for every head: the
    // `group` query heads that share a key head are one task and one product of `group * s` rows
    // (consecutive in q and y), so that their keys and values are read, and packed by the
    // blocked product, once, not once per query head. Each row's sums are the same either way.
    let per = if s < CHUNK_ROWS + BLOCKED_ROWS && group > 1 && st[1] == 0 { group } else { 1 };
    // Each chunk's live keys, once per batch when the mask is the same for every head: scanned
    // for each head, the mask took 4.6% of a 1,024-token prefill in wasm (Node, --cpu-prof).
    let chunks = row_chunks(s);
    let live = |i: usize, rows: std::ops::Range<usize>| live_keys(rows, l, |r, j| mask_row(i, r)[j * st[3]]);
    let widths: Option<Vec<usize>> =
        (st[1] == 0).then(|| (0..b).flat_map(|bi| chunks.iter().map(move |c| (bi, c.clone()))).map(|(bi, c)| live(bi * h, c)).collect());
    let width = |i: usize, c: usize| match &widths {
        Some(w) => w[i / h * chunks.len() + c],
        None => live(i, chunks[c].clone()),
    };
    let ys = slots(yv.as_slice_mut::<f32>()?, per * s * dv);
    let next = AtomicUsize::new(0);
    let head = |t: usize, y: &mut [f32], scores: &mut [f32]| {
        let i = t * per;
        let kvi = i / h * kv + i % h / group;
        let (qh, kh, vh) = (&q[i * s * d..][..per * s * d], k.head(kvi), v.head(kvi));
        if per > 1 {
            let rows = per * s;
            let w = width(i, 0); // one chunk: s < CHUNK_ROWS + BLOCKED_ROWS
            let chunk = &mut scores[..rows * w];
            product(qh, &[rows, d], &kh[..w * d], &[w, d], true, 1, chunk);
            for (n, row) in chunk.chunks_exact_mut(w.max(1)).enumerate() {
                scale_mask_softmax(i + n / s, n % s, row);
            }
            product(chunk, &[rows, w], &vh[..w * dv], &[w, dv], false, 1, y);
            return;
        }
        // rows a chunk at a time, each against the keys its mask leaves live
        for (c, rows) in chunks.iter().enumerate() {
            let (r0, r1) = (rows.start, rows.end);
            let w = width(i, c);
            let chunk = &mut scores[..(r1 - r0) * w];
            product(&qh[r0 * d..r1 * d], &[r1 - r0, d], &kh[..w * d], &[w, d], true, 1, chunk);
            for (n, row) in chunk.chunks_exact_mut(w.max(1)).enumerate() {
                scale_mask_softmax(i, r0 + n, row);
            }
            product(chunk, &[r1 - r0, w], &vh[..w * dv], &[w, dv], false, 1, &mut y[r0 * dv..r1 * dv]);
        }
    };
    let work = b * h * s * l * (d + dv) * 4;
    crate::qmatmul::split::on_threads(work, || {
        let mut scores = vec![0f32; per * s.min(CHUNK_ROWS + BLOCKED_ROWS) * l];
        loop {
            let i = next.fetch_add(1, Relaxed);
            if i >= ys.len() {
                break;
            }
            if let Some(out) = take(&ys, i) {
                head(i, out, &mut scores);
            }
        }
    });
    drop(ys);
    Ok(y)
}

/// Keys per scoring task of [`attend_rows`], and per block within one (16 KB of keys of 64
/// values: read from memory once, then from the L1 cache for each query row of the group).
const KEY_TASK: usize = 256;
const KEY_BLOCK: usize = 64;
/// Value columns per mixing task of [`attend_rows`]: whole rows of SmolLM2's 64 (natively,
/// halves, two tasks per key head, were no faster on 2 threads and slower on 1).
const MIX_COLS: usize = 64;

/// Attention for a few query rows per head, by key head: the `rows` query rows that read key
/// head `g` (its `group` query heads' rows, consecutive in `q` and `y`) are taken together, so
/// a decode step reads each cached key and value once, not once per query head (SmolLM2: three
/// query heads per key head, and a 1,024-token cache of 46 MB per step outgrows the caches).
/// Three kinds of tasks, claimed in this order by the session's threads:
/// 1. scores: a key head's rows against [`KEY_TASK`] of its keys, a [`KEY_BLOCK`] at a time;
/// 2. `weigh(row, scores)`: one row's scale, mask and softmax, once its key head's scores are
///    all done;
/// 3. mix: a key head's rows' sums over [`MIX_COLS`] of the value columns, once its rows are
///    all weighed, a block of values at a time ([`mix_into`]).
///
/// A task waits only on tasks claimed before it, each run by a thread that is running it, so
/// the wait ends (one thread runs them all in order). Each score, weight and output element is
/// computed as by the loops alone, in the same order: the same bits as each head alone, however
/// the tasks are shared out (`rows_by_key_head_equal_each_head_alone`).
fn attend_rows(q: &[f32], k: &Keys, v: &Keys, [groups, rows, l, d, dv]: [usize; 5], y: &mut [f32], weigh: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    use std::sync::atomic::{AtomicUsize, Ordering::{Acquire, Relaxed, Release}};
    let (chunks, pieces) = (l.div_ceil(KEY_TASK).max(1), dv.div_ceil(MIX_COLS));
    let mut p = vec![0f32; groups * rows * l];
    let (ps, ys) = (Shared(p.as_mut_ptr()), Shared(y.as_mut_ptr()));
    let scored: Vec<AtomicUsize> = (0..groups).map(|_| AtomicUsize::new(0)).collect();
    let weighed: Vec<AtomicUsize> = (0..groups).map(|_| AtomicUsize::new(0)).collect();
    let wait = |done: &AtomicUsize, n: usize| {
        while done.load(Acquire) < n {
            std::hint::spin_loop();
        }
    };
    let (first, second, tasks) = (groups * chunks, groups * (chunks + rows), groups * (chunks + rows + pieces));
    let next = AtomicUsize::new(0);
    let work = groups * rows * l * (d + dv) * 4;
    crate::qmatmul::split::on_threads(work, || loop {
        let t = next.fetch_add(1, Relaxed);
        if t >= tasks {
            break;
        }
        // SAFETY (the three arms): each task writes its own elements of `p` or `y` (a row's
        // keys of its chunk; a row; a row's columns of its piece), and reads those of `p` that
        // tasks it waited on wrote (Release/Acquire on the counters); the buffers outlive the
        // threads' calls, which return before `on_threads` does.
        if t < first {
            let (g, c) = (t / chunks, t % chunks);
            let (j0, j1) = (c * KEY_TASK, l.min((c + 1) * KEY_TASK));
            let kh = k.head(g);
            for jb in (j0..j1).step_by(KEY_BLOCK) {
                let je = j1.min(jb + KEY_BLOCK);
                for row in g * rows..(g + 1) * rows {
                    let out = unsafe { ps.slice(row * l + jb, je - jb) };
                    key_scores(&q[row * d..][..d], &kh[jb * d..je * d], out);
                }
            }
            scored[g].fetch_add(1, Release);
        } else if t < second {
            let (g, r) = ((t - first) / rows, (t - first) % rows);
            wait(&scored[g], chunks);
            let row = g * rows + r;
            weigh(row, unsafe { ps.slice(row * l, l) });
            weighed[g].fetch_add(1, Release);
        } else {
            let (g, c) = ((t - second) / pieces, (t - second) % pieces);
            wait(&weighed[g], rows);
            let (c0, c1) = (c * MIX_COLS, dv.min((c + 1) * MIX_COLS));
            let vh = v.head(g);
            for row in g * rows..(g + 1) * rows {
                unsafe { ys.slice(row * dv + c0, c1 - c0) }.fill(0.0);
            }
            for jb in (0..l).step_by(KEY_BLOCK) {
                let je = l.min(jb + KEY_BLOCK);
                for row in g * rows..(g + 1) * rows {
                    let w = unsafe { ps.get(row * l + jb, je - jb) };
                    mix_into(w, &vh[jb * dv + c0..], dv, unsafe { ys.slice(row * dv + c0, c1 - c0) });
                }
            }
        }
    });
}

/// A buffer the tasks of [`attend_rows`] share, each writing its own elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: the tasks that share it write disjoint elements, and read others' only after those
// tasks have signalled (attend_rows).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// # Safety
    /// `at + n` within the buffer, and no other task using these elements meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, n: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), n)
    }

    /// # Safety
    /// `at + n` within the buffer, and no task writing these elements meanwhile.
    unsafe fn get(&self, at: usize, n: usize) -> &[f32] {
        std::slice::from_raw_parts(self.0.add(at), n)
    }
}

/// A prefill's query rows per blocked product (a last piece of fewer than [`BLOCKED_ROWS`] goes
/// with the one before).
const CHUNK_ROWS: usize = 64;

/// A prefill's rows in chunks of [`CHUNK_ROWS`], the last piece of fewer than [`BLOCKED_ROWS`]
/// with the one before.
fn row_chunks(s: usize) -> Vec<std::ops::Range<usize>> {
    let (mut chunks, mut r0) = (vec![], 0);
    while r0 < s {
        let r1 = if s - r0 < CHUNK_ROWS + BLOCKED_ROWS { s } else { r0 + CHUNK_ROWS };
        chunks.push(r0..r1);
        r0 = r1;
    }
    chunks
}

/// How many of the `l` keys rows `rows` compute against: the keys after the last one any of the
/// rows can see (a causal mask's future, at -3.4e38 or -inf) are left out, rounded up to a
/// multiple of 8 (or all `l`) so that each row's softmax sums its lanes as over the whole row
/// (rows.rs): a left-out key's weight is exactly 0 there (its `exp` is below -87), so the rows
/// get the same bits as against every key. A row that sees no key takes every key, as the
/// softmax of an all-masked row is uniform. `mask(r, j)`: row r's mask at key j.
fn live_keys(rows: std::ops::Range<usize>, l: usize, mask: impl Fn(usize, usize) -> f32) -> usize {
    const DEAD: f32 = -1e30;
    let mut live = 0;
    for r in rows {
        let Some(last) = (0..l).rev().find(|&j| {
            let m = mask(r, j);
            m > DEAD || m.is_nan() // NaN: live
        }) else {
            return l;
        };
        live = live.max(last + 1);
    }
    let w = live.div_ceil(8) * 8;
    if w <= l / 8 * 8 { w } else { l }
}

/// Piece `i` of [`slots`], if nobody took it.
fn take<'a>(slots: &[std::sync::Mutex<Option<&'a mut [f32]>>], i: usize) -> Option<&'a mut [f32]> {
    slots.get(i).and_then(|s| s.lock().unwrap().take())
}

/// `x` cut into pieces of `per`, each for one taker.
fn slots(x: &mut [f32], per: usize) -> Vec<std::sync::Mutex<Option<&mut [f32]>>> {
    x.chunks_mut(per.max(1)).map(|c| std::sync::Mutex::new(Some(c))).collect()
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, v) = (&inputs[0].shape, &inputs[2].shape);
        ensure!(q.rank() == 4 && v.rank() == 4, "attention of rank {} and {}", q.rank(), v.rank());
        Ok(tvec!(f32::fact([q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], from: f32) -> Tensor {
        let n = shape.iter().product::<usize>();
        tract_ndarray::ArrayD::from_shape_vec(shape, (0..n).map(|i| from + i as f32).collect()).unwrap().into_tensor()
    }

    /// `n` values in [-1, 1] at each call, from `seed`.
    fn randoms(mut seed: u64) -> impl FnMut(usize) -> Vec<f32> {
        move |n| {
            (0..n).map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) % 2001) as f32 / 1000.0 - 1.0
            }).collect()
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    fn rows(r: &Rows) -> Vec<f32> {
        let k = r.keys();
        (0..k.shape[0] * k.shape[1]).flat_map(|i| k.head(i).to_vec()).collect()
    }

    /// A prefill against only the keys its causal mask leaves live gives the bits it gets against
    /// every key: the same mask at -1e29 (below the softmax's exp range, so every left-out weight
    /// is 0 either way, but not taken as dead) computes against all of them. 150 new rows after
    /// a past of 37, two query heads per key head, rows of 8 and of 20 (a softmax tail).
    #[test]
    fn a_prefill_against_its_live_keys_equals_one_against_all() {
        let mut rnd = randoms(7u64);
        for d in [8, 20] {
            let (p, s, kv, group) = (37, 150, 2, 2);
            let l = p + s;
            let tensor = |shape: &[usize], v: Vec<f32>| tract_ndarray::ArrayD::from_shape_vec(shape, v).unwrap().into_tensor();
            let q = tensor(&[1, kv * group, s, d], rnd(kv * group * s * d));
            let k = tensor(&[1, kv, l, d], rnd(kv * l * d));
            let v = tensor(&[1, kv, l, d], rnd(kv * l * d));
            let mask = |dead: f32| tensor(&[1, 1, s, l], (0..s * l).map(|i| if i % l > p + i / l { dead } else { 0.0 }).collect());
            let (causal, kept) = (mask(f32::MIN), mask(-1e29));
            let m = causal.try_as_plain_ram().unwrap();
            let m = m.as_slice::<f32>().unwrap();
            assert!(live_keys(0..CHUNK_ROWS, l, |r, j| m[r * l + j]) < l, "the first rows leave keys out");
            let (k, v) = (Keys::whole(&k).unwrap(), Keys::whole(&v).unwrap());
            let cut = attend(&q, &k, &v, &causal, 0.125, group).unwrap();
            let all = attend(&q, &k, &v, &kept, 0.125, group).unwrap();
            assert_eq!(flat(&cut), flat(&all), "head size {d}");
        }
    }

    /// A few query rows taken by key head ([`attend_rows`]) give each head's rows alone the
    /// same bits: the scores against every key, the scale, mask and softmax, then the sum of the
    /// values. 1 and 5 rows, three query heads per key head, 600 keys (three scoring tasks, the
    /// last one short), values of 64 and of 20; on one thread and cut across three.
    #[test]
    fn rows_by_key_head_equal_each_head_alone() {
        let mut rnd = randoms(3u64);
        let tensor = |shape: &[usize], v: Vec<f32>| tract_ndarray::ArrayD::from_shape_vec(shape, v).unwrap().into_tensor();
        for (s, dv) in [(1, 64), (5, 20)] {
            let (kv, group, l, d) = (2, 3, 600, 64);
            let h = kv * group;
            let q = tensor(&[1, h, s, d], rnd(h * s * d));
            let (k, v) = (tensor(&[1, kv, l, d], rnd(kv * l * d)), tensor(&[1, kv, l, dv], rnd(kv * l * dv)));
            // the last rows' last keys masked
            let mask: Vec<f32> = (0..s * l).map(|i| if i % l >= l - (s - i / l) { f32::NEG_INFINITY } else { 0.0 }).collect();
            let mask = tensor(&[1, 1, s, l], mask);
            let (kf, vf, qf, mf) = (flat(&k), flat(&v), flat(&q), flat(&mask));
            let mut want = vec![0f32; h * s * dv];
            for i in 0..h {
                let (kh, vh) = (&kf[i / group * l * d..][..l * d], &vf[i / group * l * dv..][..l * dv]);
                for r in 0..s {
                    let mut row = vec![0f32; l];
                    key_scores(&qf[(i * s + r) * d..][..d], kh, &mut row);
                    scale_and_mask(&mut row, 0.125, &mf[r * l..]);
                    softmax(&mut row);
                    super::super::rows::mix(&row, vh, &mut want[(i * s + r) * dv..][..dv]);
                }
            }
            let (k, v) = (Keys::whole(&k).unwrap(), Keys::whole(&v).unwrap());
            let one = attend(&q, &k, &v, &mask, 0.125, group).unwrap();
            assert_eq!(bits(&flat(&one)), bits(&want), "{s} rows, values of {dv}");
            crate::qmatmul::split::set_min_work(0);
            let three = crate::qmatmul::split::with_threads(3, || attend(&q, &k, &v, &mask, 0.125, group).unwrap());
            assert_eq!(bits(&flat(&three)), bits(&want), "{s} rows, values of {dv}, 3 threads");
        }
    }

    /// A short turn's query heads taken together by key head (one product of `group * s` rows)
    /// give each head's bits alone: against keys and values repeated for every query head (each
    /// head its own task), 20 rows after a past of 300 under a causal mask, three query heads per
    /// key head; on one thread and cut across three.
    #[test]
    fn a_turn_by_key_head_equals_each_head_alone() {
        let mut rnd = randoms(5u64);
        let tensor = |shape: &[usize], v: Vec<f32>| tract_ndarray::ArrayD::from_shape_vec(shape, v).unwrap().into_tensor();
        let (p, s, kv, group, d) = (300, 20, 2, 3, 16);
        let (l, h) = (p + s, kv * group);
        let q = tensor(&[1, h, s, d], rnd(h * s * d));
        let (k, v) = (rnd(kv * l * d), rnd(kv * l * d));
        let repeat = |x: &[f32]| -> Vec<f32> { (0..h).flat_map(|i| x[i / group * l * d..][..l * d].to_vec()).collect() };
        let (kr, vr) = (tensor(&[1, h, l, d], repeat(&k)), tensor(&[1, h, l, d], repeat(&v)));
        let (k, v) = (tensor(&[1, kv, l, d], k), tensor(&[1, kv, l, d], v));
        let mask = tensor(&[1, 1, s, l], (0..s * l).map(|i| if i % l > p + i / l { f32::NEG_INFINITY } else { 0.0 }).collect());
        let alone = attend(&q, &Keys::whole(&kr).unwrap(), &Keys::whole(&vr).unwrap(), &mask, 0.25, 1).unwrap();
        let (k, v) = (Keys::whole(&k).unwrap(), Keys::whole(&v).unwrap());
        let together = attend(&q, &k, &v, &mask, 0.25, group).unwrap();
        assert_eq!(bits(&flat(&together)), bits(&flat(&alone)));
        crate::qmatmul::split::set_min_work(0);
        let three = crate::qmatmul::split::with_threads(3, || attend(&q, &k, &v, &mask, 0.25, group).unwrap());
        assert_eq!(bits(&flat(&three)), bits(&flat(&alone)), "3 threads");
    }

    /// The cache grown in place holds what the graph's Concat made: appended to, cut to a
    /// shorter past, across a growth of its buffer; rows of other heads are refused.
    #[test]
    fn cache_rows_equal_the_concatenation() {
        let concat = |a: &Tensor, b: &Tensor| Tensor::stack_tensors(2, &[a.clone(), b.clone()]).unwrap();
        let mut r = Rows::default();
        // 2 heads, 3 rows of 4, then a new row
        let (first, new) = (t(&[1, 2, 3, 4], 0.0), t(&[1, 2, 1, 4], 100.0));
        r.append(&first).unwrap();
        r.append(&new).unwrap();
        let want = concat(&first, &new);
        assert_eq!(rows(&r), flat(&want));
        // truncated to 2 rows, then 70 new ones (past the first capacity, 64)
        let long = t(&[1, 2, 70, 4], 300.0);
        r.shape[2] = 2;
        r.append(&long).unwrap();
        let want = concat(&want.slice(2, 0, 2).unwrap(), &long);
        assert_eq!(rows(&r), flat(&want));
        assert!(r.cap >= 72);
        // other heads: refused while it holds rows, taken once empty
        let other = t(&[1, 3, 1, 4], 0.0);
        assert!(r.append(&other).is_err());
        r.shape[2] = 0;
        r.append(&other).unwrap();
        assert_eq!(rows(&r), flat(&other));
    }

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

