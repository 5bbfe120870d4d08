//! A session: one conversation's KV cache, held inside the engine (the handle a caller keeps).
//! prefill(prompt) and step(token) return the next-token logits; the cache never leaves.

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::graph::Graph;

pub struct Session {
    graph: Arc<Graph>,
    state: TypedSimpleState,
    /// per layer (key, value), each (1, kv_heads, len, head_dim); unused where the graph's
    /// attention ops hold the cache (`Graph::cache_in_ops`)
    past: Vec<(TValue, TValue)>,
    /// every token the cache holds, in order (a graph without cache recomputes from them)
    tokens: Vec<u32>,
    context: usize,
}

impl Session {
    pub fn new(graph: Arc<Graph>, context: usize) -> Result<Session> {
        let state = graph.plan.spawn().map_err(Error::run)?;
        let mut s = Session { graph, state, past: vec![], tokens: vec![], context };
        s.reset();
        Ok(s)
    }

    /// Empty the cache: the next call is a prefill again.
    pub fn reset(&mut self) {
        let (kv, hd) = (self.graph.kv_heads, self.graph.head_dim);
        let empty = || Tensor::zero::<f32>(&[1, kv, 0, hd]).unwrap().into_tvalue();
        self.past = (0..self.graph.conv.layers()).map(|_| (empty(), empty())).collect();
        self.tokens.clear();
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

    /// Keep only the first `len` tokens of the cache (a slice along the past axis: cheap; a
    /// cache in the attention ops is cut at the next step, which gives it the shorter length).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.tokens.len() {
            return Ok(());
        }
        if self.graph.cache_in_ops {
            self.tokens.truncate(len);
            return Ok(());
        }
        for (k, v) in self.past.iter_mut() {
            *k = k.slice(2, 0, len).map_err(Error::run)?.into_tvalue();
            *v = v.slice(2, 0, len).map_err(Error::run)?.into_tvalue();
        }
        self.tokens.truncate(len);
        Ok(())
    }

    /// Feed the prompt (or any tokens) and get the logits for the token after them.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::Options("an empty prompt gives nothing to predict from".into()));
        }
        if self.tokens.len() + ids.len() > self.context {
            return Err(if self.tokens.is_empty() {
                Error::PromptTooLong { tokens: ids.len(), context: self.context }
            } else {
                Error::ContextFull { context: self.context }
            });
        }
        self.feed(ids)
    }

    /// Feed one token, get the logits for the next.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        if self.tokens.len() >= self.context {
            return Err(Error::ContextFull { context: self.context });
        }
        self.feed(&[id])
    }

    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let inputs = self.inputs(ids)?;
        let threads = self.graph.threads;
        let outputs = crate::qmatmul::split::with_threads(threads, || self.state.run(inputs)).map_err(Error::run)?;
        self.absorb(ids, outputs)
    }

    /// `step`, timing every node of the plan: op name -> (ms, calls), added into `times`.
    pub fn step_profiled(&mut self, id: u32, times: &mut Vec<(String, f64, usize)>) -> Result<Vec<f32>> {
        let inputs = self.inputs(&[id])?;
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
        self.absorb(&[id], outputs)
    }

    /// The graph's inputs for feeding `ids` after what the cache holds.
    fn inputs(&self, ids: &[u32]) -> Result<TVec<TValue>> {
        let conv = &self.graph.conv;
        // Without a cache, the graph sees the whole sequence every time.
        let fed: Vec<u32> = if conv.has_cache() {
            ids.to_vec()
        } else {
            self.tokens.iter().chain(ids).copied().collect()
        };
        let past_len = if conv.has_cache() { self.tokens.len() } else { 0 };
        let n = fed.len();
        let mut inputs: Vec<Option<TValue>> = vec![None; 1 + 2 * conv.layers() + 2];
        let as_i64 = |v: Vec<i64>| tensor1(&v).into_shape(&[1, v.len()]).map(|t| t.into_tvalue());
        inputs[conv.input_ids] = Some(as_i64(fed.iter().map(|&t| t as i64).collect()).map_err(Error::run)?);
        if let Some(ix) = conv.attention_mask {
            inputs[ix] = Some(as_i64(vec![1; past_len + n]).map_err(Error::run)?);
        }
        if let Some(ix) = conv.position_ids {
            let pos = (past_len..past_len + n).map(|p| p as i64).collect();
            inputs[ix] = Some(as_i64(pos).map_err(Error::run)?);
        }
        // the cache in the attention ops' states (fused/attention.rs): the past inputs only say
        // its length, one tensor of zeros for all
        let held = self.graph.cache_in_ops.then(|| {
            Tensor::zero::<f32>(&[1, self.graph.kv_heads, past_len, self.graph.head_dim]).map(|t| t.into_tvalue())
        });
        let held = held.transpose().map_err(Error::run)?;
        for (layer, &(k, v)) in conv.past.iter().enumerate() {
            inputs[k] = Some(held.clone().unwrap_or_else(|| self.past[layer].0.clone()));
            inputs[v] = Some(held.clone().unwrap_or_else(|| self.past[layer].1.clone()));
        }
        Ok(inputs.into_iter().flatten().collect())
    }

    /// Keep the new cache, remember the tokens, return the last position's logits.
    fn absorb(&mut self, ids: &[u32], mut outputs: TVec<TValue>) -> Result<Vec<f32>> {
        let conv = &self.graph.conv;
        if !self.graph.cache_in_ops {
            for (layer, &(k, v)) in conv.present.iter().enumerate() {
                self.past[layer] = (outputs[k].clone(), outputs[v].clone());
            }
        }
        self.tokens.extend_from_slice(ids);
        last_row(outputs.swap_remove(conv.logits))
    }
}

/// logits (1, n, vocab) -> the last position's row.
fn last_row(logits: TValue) -> Result<Vec<f32>> {
    let view = logits.to_plain_array_view::<f32>().map_err(Error::run)?;
    let shape = view.shape();
    if shape.len() != 3 || shape[1] == 0 {
        return Err(Error::Run(format!("logits of shape {shape:?}, expected (1, n, vocab)")));
    }
    let row = view.index_axis(tract_ndarray::Axis(1), shape[1] - 1);
    Ok(row.iter().copied().collect())
}
