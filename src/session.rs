//! A session: one conversation's KV cache, held inside the engine (the handle a caller keeps).
//!
//! `prefill(tokens)` feeds tokens on top of what the cache holds and `step(token)` one more; both
//! return the next-token logits. The cache never leaves, but the handle can cut it (`truncate`),
//! copy it (`fork`), save it (`snapshot`) and load it (`restore`), and `sync` keeps the longest
//! common prefix with a whole conversation and feeds only the rest (a chat's new turn).
//!
//! Where the cache lives depends on the graph ([`Store`]), and the session is its one owner
//! either way: the graph's present outputs fed back as its past inputs, or the attention ops'
//! states, which the session reaches by node id in its plan state.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::fused::attention::Cache;
use crate::graph::Graph;

/// Where a session's key/value cache is.
#[derive(Clone)]
enum Store {
    /// Per layer (key, value), each (1, kv_heads, len, head_dim): the graph's present outputs,
    /// fed back as its past inputs on the next call.
    Tensors(Vec<(TValue, TValue)>),
    /// Per layer, the node (in the plan) of the attention op whose state ([`Cache`]) holds it
    /// (fused/attention.rs); the plan has no past inputs or present outputs then.
    Ops(Vec<usize>),
    /// A graph without a cache: it sees every token each time.
    None,
}

pub struct Session {
    graph: Arc<Graph>,
    /// The model file's sha256 (hex): what a snapshot is tied to.
    model: Arc<str>,
    state: TypedSimpleState,
    store: Store,
    /// Every token the cache holds, in order.
    tokens: Vec<u32>,
    /// The logits after the last token fed, while the cache has not been cut or loaded since.
    last: Option<Vec<f32>>,
    context: usize,
}

impl Clone for Session {
    /// `fork`: an independent copy (the plan is shared, the cache copied).
    fn clone(&self) -> Session {
        Session {
            graph: self.graph.clone(),
            model: self.model.clone(),
            state: self.state.clone(),
            store: self.store.clone(),
            tokens: self.tokens.clone(),
            last: self.last.clone(),
            context: self.context,
        }
    }
}

impl Session {
    pub fn new(graph: Arc<Graph>, model: Arc<str>, context: usize) -> Result<Session> {
        let state = graph.plan.spawn().map_err(Error::run)?;
        let store = if !graph.conv.has_cache() {
            Store::None
        } else if graph.cache_in_ops() {
            Store::Ops(graph.caches.clone())
        } else {
            Store::Tensors(empty_past(&graph, 0)?)
        };
        Ok(Session { graph, model, state, store, tokens: vec![], last: None, context })
    }

    /// Empty the cache: the next call is a prefill again.
    pub fn reset(&mut self) {
        // cutting to 0 cannot fail: no slicing, empty tensors
        let _ = self.truncate(0);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// The model file this session's cache belongs to (sha256, hex).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// An independent copy: advancing one leaves the other as it was.
    pub fn fork(&self) -> Session {
        self.clone()
    }

    /// Keep only the first `len` tokens of the cache, at once.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.tokens.len() {
            return Ok(());
        }
        match &mut self.store {
            Store::Tensors(past) if len == 0 => *past = empty_past(&self.graph, 0)?,
            Store::Tensors(past) => {
                for (k, v) in past.iter_mut() {
                    *k = k.slice(2, 0, len).map_err(Error::run)?.into_tvalue();
                    *v = v.slice(2, 0, len).map_err(Error::run)?.into_tvalue();
                }
            }
            Store::Ops(nodes) => {
                for &node in nodes.iter() {
                    op_cache(&mut self.state, node)?.truncate(len);
                }
            }
            Store::None => {}
        }
        self.tokens.truncate(len);
        self.last = None;
        Ok(())
    }

    /// Feed tokens after what the cache holds (a prompt, a chat's new turn) and get the logits
    /// for the token after them. Refused, with the cache as it was, past the context.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.admit(ids)?;
        self.feed(ids)
    }

    /// Whether `ids` can be fed: some, and room for them.
    fn admit(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Options("an empty prompt gives nothing to predict from".into()));
        }
        self.room_for(ids.len())
    }

    /// Whether `more` tokens fit after what the cache holds (the error says why not).
    pub fn room_for(&self, more: usize) -> Result<()> {
        if self.tokens.len() + more <= self.context {
            return Ok(());
        }
        Err(if self.tokens.is_empty() {
            Error::PromptTooLong { tokens: more, context: self.context }
        } else {
            Error::ContextFull { context: self.context, held: self.tokens.len(), more }
        })
    }

    /// Feed one token, get the logits for the next.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.prefill(&[id])
    }

    /// The logits for the token after the cache: kept from the last call, or (after `truncate`
    /// or `restore`) its last token fed again.
    pub fn logits(&mut self) -> Result<Vec<f32>> {
        if let Some(l) = &self.last {
            return Ok(l.clone());
        }
        let Some(&last) = self.tokens.last() else {
            return Err(Error::Options("the cache is empty: there is nothing to predict from".into()));
        };
        self.truncate(self.tokens.len() - 1)?;
        self.feed(&[last])
    }

    /// Make the cache hold exactly `ids` (a whole conversation): keep the longest common prefix,
    /// cut the rest, feed what follows (at least the last token, for its logits). Returns the
    /// tokens fed and the next-token logits. Refused past the context, the cache as it was.
    pub fn sync(&mut self, ids: &[u32]) -> Result<(usize, Vec<f32>)> {
        let keep = self.keep_common(ids)?;
        if keep == ids.len() {
            return Ok((0, self.logits()?));
        }
        Ok((ids.len() - keep, self.feed(&ids[keep..])?))
    }

    /// `sync`'s first half: keep the longest common prefix of the cache and `ids` (cut the
    /// rest) and return its length; `ids[keep..]` is then to be fed. All of `ids` is kept only
    /// when the cache holds exactly them (its logits are then `logits()`); otherwise at least
    /// the last token is left to feed. Refused past the context, the cache as it was.
    pub fn keep_common(&mut self, ids: &[u32]) -> Result<usize> {
        if ids.is_empty() {
            return Err(Error::Options("an empty conversation gives nothing to predict from".into()));
        }
        if ids.len() > self.context {
            return Err(Error::PromptTooLong { tokens: ids.len(), context: self.context });
        }
        let common = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count();
        if common == ids.len() && common == self.tokens.len() {
            return Ok(common);
        }
        let keep = common.min(ids.len() - 1);
        self.truncate(keep)?;
        Ok(keep)
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let inputs = self.inputs(ids)?;
        let threads = self.graph.threads;
        let outputs = crate::qmatmul::split::with_threads(threads, || self.state.run(inputs)).map_err(Error::run)?;
        self.absorb(ids, outputs)
    }

    /// `step`, timing every node of the plan: op name -> (ms, calls), added into `times`.
    pub fn step_profiled(&mut self, id: u32, times: &mut Vec<(String, f64, usize)>) -> Result<Vec<f32>> {
        self.feed_profiled(&[id], times)
    }

    /// Feed `ids` after the cache (a decode step, or a prefill of several), timing every node
    /// of the plan: op name -> (ms, calls), added into `times`.
    pub fn feed_profiled(&mut self, ids: &[u32], times: &mut Vec<(String, f64, usize)>) -> Result<Vec<f32>> {
        self.admit(ids)?;
        let inputs = self.inputs(ids)?;
        let threads = self.graph.threads;
        let state = &mut self.state;
        let outputs = crate::qmatmul::split::with_threads(threads, || {
            state.run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
                let t = now_ms();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                let ms = now_ms() - t;
                let name = node.op.name().to_string();
                match times.iter_mut().find(|e| e.0 == name) {
                    Some(e) => { e.1 += ms; e.2 += 1; }
                    None => times.push((name, ms, 1)),
                }
                out
            })
        })
        .map_err(Error::run)?;
        self.absorb(ids, outputs)
    }

    /// The graph's inputs for feeding `ids` after what the cache holds.
    fn inputs(&self, ids: &[u32]) -> Result<TVec<TValue>> {
        if let Some(vocab) = self.graph.vocab {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::TokenId { id, vocab });
            }
        }
        let (io, inputs) = (&self.graph.io, self.graph.plan.model().inputs.len());
        // Without a cache, the graph sees the whole sequence every time.
        let fed: Vec<u32> = match self.store {
            Store::None => self.tokens.iter().chain(ids).copied().collect(),
            _ => ids.to_vec(),
        };
        let past_len = if self.graph.conv.has_cache() { self.tokens.len() } else { 0 };
        let n = fed.len();
        let mut inputs: Vec<Option<TValue>> = vec![None; inputs];
        let as_i64 = |v: Vec<i64>| tensor1(&v).into_shape(&[1, v.len()]).map(|t| t.into_tvalue());
        inputs[io.input_ids] = Some(as_i64(fed.iter().map(|&t| t as i64).collect()).map_err(Error::run)?);
        if let Some(ix) = io.attention_mask {
            inputs[ix] = Some(as_i64(vec![1; past_len + n]).map_err(Error::run)?);
        }
        if let Some(ix) = io.position_ids {
            let pos = (past_len..past_len + n).map(|p| p as i64).collect();
            inputs[ix] = Some(as_i64(pos).map_err(Error::run)?);
        }
        if let Store::Tensors(past) = &self.store {
            for (layer, &(k, v)) in io.past.iter().enumerate() {
                inputs[k] = Some(past[layer].0.clone());
                inputs[v] = Some(past[layer].1.clone());
            }
        }
        inputs.into_iter().enumerate().map(|(ix, t)| t.ok_or_else(|| Error::UnsupportedGraph(format!("the plan's input {ix} has no role")))).collect()
    }

    /// Keep the new cache, remember the tokens, return the last position's logits.
    fn absorb(&mut self, ids: &[u32], mut outputs: TVec<TValue>) -> Result<Vec<f32>> {
        let io = &self.graph.io;
        if let Store::Tensors(past) = &mut self.store {
            for (layer, &(k, v)) in io.present.iter().enumerate() {
                past[layer] = (outputs[k].clone(), outputs[v].clone());
            }
        }
        self.tokens.extend_from_slice(ids);
        let logits = last_row(outputs.swap_remove(io.logits))?;
        self.last = Some(logits.clone());
        Ok(logits)
    }

    /// The cache as bytes: the tokens and every layer's keys and values, tied to the model file
    /// (see [`SNAPSHOT_FORMAT`]).
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        let n = self.tokens.len();
        let (kv, hd) = (self.graph.kv_heads, self.graph.head_dim);
        let layers = self.stored_layers();
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER + 4 * n + layers * 2 * kv * n * hd * 4 + 32);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        for x in [SNAPSHOT_VERSION, 0] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(self.model_digest()?.as_slice());
        for x in [layers, kv, hd, n] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        for t in &self.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        let mut values = Vec::with_capacity(2 * kv * n * hd);
        match &self.store {
            Store::Tensors(past) => {
                for (k, v) in past {
                    for t in [k, v] {
                        let t = t.cast_to::<f32>().map_err(Error::run)?;
                        values.extend(t.to_plain_array_view::<f32>().map_err(Error::run)?.iter().copied());
                    }
                    push_f32(&mut out, &values);
                    values.clear();
                }
            }
            Store::Ops(nodes) => {
                for &node in nodes {
                    let cache = self.state.op_states[node].as_ref().and_then(|s| s.downcast_ref::<Cache>());
                    let cache = cache.ok_or_else(|| Error::Run(format!("node {node} holds no attention cache")))?;
                    cache.export(&mut values);
                    push_f32(&mut out, &values);
                    values.clear();
                }
            }
            Store::None => {}
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Load a [`snapshot`](Session::snapshot) in place of the cache. Refused, the cache left as
    /// it was, for bytes that are not one, were damaged, or were made for another model file.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = |why: String| Err(Error::Snapshot(why));
        if bytes.len() < SNAPSHOT_HEADER + 32 || &bytes[..8] != SNAPSHOT_MAGIC {
            return bad("these bytes are not a wasmlm cache snapshot".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        let version = u32_at(8);
        if version != SNAPSHOT_VERSION as usize {
            return bad(format!("format version {version}; this engine reads version {SNAPSHOT_VERSION}"));
        }
        if Sha256::digest(body).as_slice() != sum {
            return bad("its checksum does not match: the bytes were damaged or cut".into());
        }
        let model = &body[16..48];
        if model != self.model_digest()?.as_slice() {
            return bad(format!(
                "it was made for another model file (sha256 {}…), this session runs {}…",
                &crate::manifest::hex(model)[..12],
                &self.model[..12.min(self.model.len())]
            ));
        }
        let (layers, kv, hd, n) = (u32_at(48), u32_at(52), u32_at(56), u32_at(60));
        let want = (self.stored_layers(), self.graph.kv_heads, self.graph.head_dim);
        if (layers, kv, hd) != want {
            return bad(format!("its cache is {layers} layers x {kv} heads x {hd}, this graph's {want:?}"));
        }
        if n > self.context {
            return bad(format!("it holds {n} tokens, over the context of {}", self.context));
        }
        let per_layer = 2 * kv * n * hd;
        if body.len() != SNAPSHOT_HEADER + 4 * n + layers * per_layer * 4 {
            return bad(format!("{} bytes where {n} tokens and their cache take {}", body.len(),
                               SNAPSHOT_HEADER + 4 * n + layers * per_layer * 4));
        }
        let tokens: Vec<u32> = body[SNAPSHOT_HEADER..SNAPSHOT_HEADER + 4 * n]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let floats: Vec<f32> = body[SNAPSHOT_HEADER + 4 * n..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let shape = [1, kv, n, hd];
        match &mut self.store {
            Store::Tensors(past) => {
                let half = per_layer / 2;
                let dt = self.graph.cache_dt;
                let t = |x: &[f32]| -> Result<TValue> {
                    let t = Tensor::from_shape(&shape, x).map_err(Error::run)?;
                    Ok(t.cast_to_dt(dt).map_err(Error::run)?.into_owned().into_tvalue())
                };
                *past = if n == 0 {
                    empty_past(&self.graph, 0)?
                } else {
                    floats.chunks_exact(per_layer).map(|l| Ok((t(&l[..half])?, t(&l[half..])?))).collect::<Result<_>>()?
                };
            }
            Store::Ops(nodes) => {
                for (i, &node) in nodes.iter().enumerate() {
                    op_cache(&mut self.state, node)?
                        .import(shape, &floats[i * per_layer..][..per_layer])
                        .map_err(Error::run)?;
                }
            }
            Store::None => {}
        }
        self.tokens = tokens;
        self.last = None;
        Ok(())
    }

    /// Layers whose keys and values a snapshot carries (none for a graph without a cache).
    fn stored_layers(&self) -> usize {
        match self.store {
            Store::None => 0,
            _ => self.graph.conv.layers(),
        }
    }

    fn model_digest(&self) -> Result<[u8; 32]> {
        let mut d = [0u8; 32];
        crate::manifest::unhex(&self.model, &mut d)
            .map_err(|_| Error::Run(format!("the session's model digest '{}' is not a sha256", self.model)))?;
        Ok(d)
    }
}

/// The snapshot format, version 1 (little-endian):
///
/// | bytes | what |
/// |---|---|
/// | 8 | `WASMLMKV` |
/// | 4, 4 | version (1), 0 |
/// | 32 | sha256 of the model file the cache was computed by |
/// | 4 x 4 | layers stored (0 for a graph without cache), key/value heads, head size, tokens n |
/// | 4 n | the tokens (u32) |
/// | per layer: 4 x 2 heads n d | keys (heads, n, d), then values, f32 |
/// | 32 | sha256 of everything before |
pub const SNAPSHOT_FORMAT: u32 = SNAPSHOT_VERSION;
const SNAPSHOT_VERSION: u32 = 1;
const SNAPSHOT_MAGIC: &[u8; 8] = b"WASMLMKV";
const SNAPSHOT_HEADER: usize = 8 + 8 + 32 + 16;

/// Per layer an empty (key, value) past of `len` rows of zeros.
fn empty_past(graph: &Graph, len: usize) -> Result<Vec<(TValue, TValue)>> {
    let t = || Tensor::zero_dt(graph.cache_dt, &[1, graph.kv_heads, len, graph.head_dim]).map(|t| t.into_tvalue()).map_err(Error::run);
    (0..graph.conv.layers()).map(|_| Ok((t()?, t()?))).collect()
}

fn push_f32(out: &mut Vec<u8>, values: &[f32]) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn op_cache(state: &mut TypedSimpleState, node: usize) -> Result<&mut Cache> {
    state.op_states[node]
        .as_mut()
        .and_then(|s| s.downcast_mut::<Cache>())
        .ok_or_else(|| Error::Run(format!("node {node} holds no attention cache")))
}

/// logits (1, n, vocab) -> the last position's row.
fn last_row(logits: TValue) -> Result<Vec<f32>> {
    // an FP16 file's logits are FP16
    let logits = logits.cast_to::<f32>().map_err(Error::run)?;
    let view = logits.to_plain_array_view::<f32>().map_err(Error::run)?;
    let shape = view.shape();
    if shape.len() != 3 || shape[1] == 0 {
        return Err(Error::Run(format!("logits of shape {shape:?}, expected (1, n, vocab)")));
    }
    let row = view.index_axis(tract_ndarray::Axis(1), shape[1] - 1);
    Ok(row.iter().copied().collect())
}
