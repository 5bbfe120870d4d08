//! The native bench: the baseline protocol of models/wasmlm_models/baseline_runs.py, run by this
//! engine, producing rows in baselines.json's format (backend "tract native").
//!
//! Batch 1, the same 32 prompt tokens, exactly 64 new tokens with EOS ignored (greedy), one
//! warm-up run then `runs` measured runs; a run's decode ms/token is its 63 decode steps' mean;
//! median and p90 over runs. Without a cache: the latency of one inference over the prompt.

use serde_json::{json, Value};

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::error::Result;
use crate::generate::percentile;
use crate::sampler::argmax;

pub const NEW_TOKENS: usize = 64;
pub const PROMPT_TOKENS: usize = 32;
pub const KEY: [&str; 6] = ["model", "backend", "precision", "preset", "cache", "threads"];

pub fn summary(values: &[f64]) -> Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"median": r(percentile(&v, 50.0)), "p90": r(percentile(&v, 90.0)), "runs": v.len()})
}

/// The bench prompt: the first 32 tokens of the text's first 2,000 characters.
pub fn prompt_ids(engine: &Engine, text: &str) -> Result<Vec<u32>> {
    let head: String = text.chars().take(2000).collect();
    let mut ids = engine.text.encode(&head)?;
    ids.truncate(PROMPT_TOKENS);
    Ok(ids)
}

/// (prefill ms, decode step ms...) of one greedy run.
pub fn one_run(engine: &Engine, prompt: &[u32]) -> Result<(f64, Vec<f64>)> {
    let mut session = engine.session()?;
    let t = now_ms();
    let mut logits = session.prefill(prompt)?;
    let prefill = now_ms() - t;
    let mut steps = Vec::with_capacity(NEW_TOKENS - 1);
    for _ in 0..NEW_TOKENS - 1 {
        let next = argmax(&logits);
        let t = now_ms();
        logits = session.step(next)?;
        steps.push(now_ms() - t);
    }
    Ok((prefill, steps))
}

/// The parity protocol shared by the tests (native and wasm) and `wasmlm trace`: the last
/// position's logits after the prefill and after each of the first `decode` greedy steps, and
/// the first `greedy` greedy tokens.
pub fn greedy_trace(engine: &Engine, prompt: &[u32], decode: usize, greedy: usize) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let mut session = engine.session()?;
    let mut logits = session.prefill(prompt)?;
    let (mut rows, mut tokens) = (vec![logits.clone()], vec![]);
    for _ in 0..greedy.max(decode) {
        tokens.push(argmax(&logits));
        logits = session.step(*tokens.last().unwrap())?;
        if rows.len() <= decode {
            rows.push(logits.clone());
        }
    }
    tokens.truncate(greedy);
    Ok((rows, tokens))
}

/// A row's identity and what was loaded; the measurements are added by `add_runs`.
pub fn base_row(engine: &Engine, backend: &str, prompt_tokens: usize, threads: usize) -> Value {
    let info = &engine.info;
    json!({
        "model": info.model, "backend": backend, "precision": info.precision,
        "preset": info.preset, "cache": info.cache, "threads": threads,
        "real_weights": info.real_weights, "file": info.file, "file_bytes": info.file_bytes,
        "load_ms": (info.load_ms * 10.0).round() / 10.0, "load_phases_ms": info.load_phases_ms,
        "prompt_tokens": prompt_tokens, "int8_kernels": info.int8_kernels, "fused_ops": info.fused_ops,
        "engine": format!("wasmlm {} (tract {})", env!("CARGO_PKG_VERSION"), crate::TRACT_VERSION),
    })
}

/// The measured runs (warm-up excluded) of a graph with a cache, summarized into `row`.
pub fn add_runs(row: &mut Value, results: &[(f64, Vec<f64>)]) {
    let prefill: Vec<f64> = results.iter().map(|r| r.0).collect();
    let decode: Vec<f64> = results.iter().map(|r| r.1.iter().sum::<f64>() / r.1.len() as f64).collect();
    row["prefill_ms"] = summary(&prefill);
    row["decode_ms_per_token"] = summary(&decode);
    row["new_tokens"] = json!(NEW_TOKENS);
}

/// One bench row for the loaded engine.
pub fn row(engine: &Engine, prompt: &[u32], runs: usize, threads: usize) -> Result<Value> {
    let mut row = base_row(engine, "tract native", prompt.len(), threads);
    if engine.graph.conv.has_cache() {
        one_run(engine, prompt)?; // warm-up
        let results: Vec<(f64, Vec<f64>)> = (0..runs).map(|_| one_run(engine, prompt)).collect::<Result<_>>()?;
        add_runs(&mut row, &results);
    } else {
        let mut latency = vec![];
        for i in 0..=runs.max(10) {
            let mut session = engine.session()?;
            let t = now_ms();
            session.prefill(prompt)?;
            if i > 0 {
                latency.push(now_ms() - t); // the first one is the warm-up
            }
        }
        row["latency_ms"] = summary(&latency);
    }
    Ok(row)
}

/// Steps timed per op by [`profile`] unless told otherwise.
pub const PROFILE_STEPS: usize = 32;

/// Decode time per op: the bench prompt, then `steps` greedy steps with every node of the plan
/// timed (`Session::step_profiled`). {steps, wall_ms_per_token, ops_ms_per_token, ops: [{op,
/// ms_per_token, calls_per_token, share}]}, largest first. `wall` is each step's whole time
/// (the timing itself included), `ops` the sum of the nodes' times; the difference is what
/// happens around the plan (inputs, the cache handed back). In a browser the clock is
/// `performance.now`, coarsened to 5 µs where the page is cross-origin isolated, to 100 µs
/// (jittered) where it is not: the per-op sums are then only indicative.
pub fn profile(engine: &Engine, prompt: &[u32], steps: usize) -> Result<Value> {
    if !engine.graph.conv.has_cache() {
        return Err(crate::error::Error::Options("the per-op profile times decode steps; pick a file with a KV cache".into()));
    }
    if steps == 0 {
        return Err(crate::error::Error::Options("the per-op profile needs at least one step".into()));
    }
    let mut session = engine.session()?;
    let mut logits = session.prefill(prompt)?;
    let mut times: Vec<(String, f64, usize)> = vec![];
    let mut wall = 0.0;
    for _ in 0..steps {
        let next = argmax(&logits);
        let t = now_ms();
        logits = session.step_profiled(next, &mut times)?;
        wall += now_ms() - t;
    }
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = times.iter().map(|t| t.1).sum();
    let per = |ms: f64| (ms / steps as f64 * 1e4).round() / 1e4;
    let ops: Vec<Value> = times
        .iter()
        .map(|(op, ms, calls)| {
            json!({"op": op, "ms_per_token": per(*ms), "calls_per_token": *calls as f64 / steps as f64,
                   "share": (ms / total.max(f64::MIN_POSITIVE) * 1e3).round() / 1e3})
        })
        .collect();
    Ok(json!({"steps": steps, "threads": engine.graph.threads, "wall_ms_per_token": per(wall),
              "ops_ms_per_token": per(total), "ops": ops}))
}

/// Rows of `table` (baselines.json) with `new` added, replacing rows with the same key.
pub fn merge(mut table: Value, new: Vec<Value>) -> Value {
    let key = |r: &Value| KEY.iter().map(|k| r.get(*k).cloned().unwrap_or(Value::Null)).collect::<Vec<_>>();
    let new_keys: Vec<_> = new.iter().map(key).collect();
    let mut rows: Vec<Value> = table
        .get("rows")
        .and_then(|r| r.as_array())
        .map(|rows| rows.iter().filter(|r| !new_keys.contains(&key(r))).cloned().collect())
        .unwrap_or_default();
    rows.extend(new);
    if !table.is_object() {
        table = json!({});
    }
    table["rows"] = Value::Array(rows);
    table
}
