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

/// Pasts at which `context_sweep` times decode steps, prompts whose prefill it times, and the
/// history and turn of its second-turn case.
pub const SWEEP_PASTS: [usize; 4] = [32, 256, 1024, 2048];
pub const SWEEP_PROMPTS: [usize; 3] = [128, 512, 1024];
pub const SWEEP_HISTORY: usize = 1000;
pub const SWEEP_TURN: usize = 20;
/// Decode steps timed after each past.
const SWEEP_STEPS: usize = 16;
/// The chunk the page feeds a prefill in (www/protocol.js, PREFILL_CHUNK).
pub const SWEEP_CHUNK: usize = 64;

/// How the speed holds as the context grows (what a long chat feels), over `rounds` rounds, each
/// case measured once per round, one after the other:
/// - `decode`: ms per decode step (median of 16 steps) after a past of each of [`SWEEP_PASTS`]
///   (those that fit the context), and its ratio to the 32-token past's;
/// - `prefill`: tokens/s of a prefill of each of [`SWEEP_PROMPTS`], at once and in chunks of
///   [`SWEEP_CHUNK`] (as the page feeds it) for 512;
/// - `second_turn`: a [`SWEEP_TURN`]-token turn's prefill after a [`SWEEP_HISTORY`]-token
///   conversation held in the cache, against the same turn on an empty cache.
///
/// The tokens are the text's, from its start. Medians over the rounds.
pub fn context_sweep(engine: &Engine, text: &str, rounds: usize) -> Result<Value> {
    use crate::error::Error;
    let context = engine.context;
    let longest = SWEEP_PASTS.iter().chain(&SWEEP_PROMPTS).max().copied().unwrap_or(0) + SWEEP_STEPS;
    let chars: String = text.chars().take(longest * 8).collect();
    let ids = engine.text.encode(&chars)?;
    if ids.len() < longest {
        return Err(Error::Options(format!("the text gives {} tokens; the sweep needs {longest}", ids.len())));
    }
    let fits = |n: usize| n + SWEEP_STEPS <= context;
    let pasts: Vec<usize> = SWEEP_PASTS.into_iter().filter(|&n| fits(n)).collect();
    let prompts: Vec<usize> = SWEEP_PROMPTS.into_iter().filter(|&n| fits(n)).collect();
    let mut decode = vec![vec![]; pasts.len()];
    let mut prefill = vec![vec![]; prompts.len()];
    let (mut chunked, mut whole512) = (vec![], vec![]);
    let (mut after, mut fresh) = (vec![], vec![]);
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = now_ms();
        f()?;
        Ok(now_ms() - t)
    };
    let history = fits(SWEEP_HISTORY + SWEEP_TURN).then(|| -> Result<_> {
        let mut s = engine.session()?;
        s.prefill(&ids[..SWEEP_HISTORY])?;
        Ok(s)
    }).transpose()?;
    for _ in 0..rounds.max(1) {
        for (i, &n) in pasts.iter().enumerate() {
            let mut s = engine.session()?;
            let mut logits = s.prefill(&ids[..n])?;
            let mut steps = vec![];
            for _ in 0..SWEEP_STEPS {
                let next = argmax(&logits);
                let t = now_ms();
                logits = s.step(next)?;
                steps.push(now_ms() - t);
            }
            steps.sort_by(f64::total_cmp);
            decode[i].push(percentile(&steps, 50.0));
        }
        for (i, &n) in prompts.iter().enumerate() {
            let mut s = engine.session()?;
            let ms = timed(&mut || s.prefill(&ids[..n]).map(drop))?;
            prefill[i].push(n as f64 * 1e3 / ms);
            if n == 512 {
                whole512.push(n as f64 * 1e3 / ms);
                let mut s = engine.session()?;
                let ms = timed(&mut || {
                    for c in ids[..n].chunks(SWEEP_CHUNK) {
                        s.prefill(c)?;
                    }
                    Ok(())
                })?;
                chunked.push(n as f64 * 1e3 / ms);
            }
        }
        if let Some(h) = &history {
            let turn = &ids[SWEEP_HISTORY..SWEEP_HISTORY + SWEEP_TURN];
            let mut s = h.fork();
            after.push(timed(&mut || s.prefill(turn).map(drop))?);
            let mut s = engine.session()?;
            fresh.push(timed(&mut || s.prefill(turn).map(drop))?);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (percentile(v, 50.0) * 1000.0).round() / 1000.0
    };
    let base = decode.first().map(|v| { let mut v = v.clone(); med(&mut v) }).unwrap_or(0.0);
    let decode: Vec<Value> = pasts.iter().zip(&mut decode).map(|(&n, v)| {
        let ms = med(v);
        json!({"past": n, "ms_per_token": ms, "ratio_to_32": (ms / base * 1000.0).round() / 1000.0})
    }).collect();
    let prefill: Vec<Value> = prompts.iter().zip(&mut prefill).map(|(&n, v)| json!({"tokens": n, "tokens_per_s": med(v)})).collect();
    let mut out = json!({"model": engine.info.model, "file": engine.info.file, "threads": engine.graph.threads,
                         "context": context, "rounds": rounds.max(1), "decode": decode, "prefill": prefill});
    if !chunked.is_empty() {
        out["prefill_512_chunked"] = json!({"chunk": SWEEP_CHUNK, "tokens_per_s": med(&mut chunked),
                                            "at_once_tokens_per_s": med(&mut whole512)});
    }
    if !after.is_empty() {
        let (a, f) = (med(&mut after), med(&mut fresh));
        out["second_turn"] = json!({"history": SWEEP_HISTORY, "turn": SWEEP_TURN, "ms_after_history": a,
                                    "ms_on_empty_cache": f, "ratio": (a / f * 1000.0).round() / 1000.0});
    }
    Ok(out)
}

/// `context_sweep`'s result as Markdown lines.
pub fn sweep_markdown(v: &Value) -> String {
    let mut s = format!("{} {}, {} thread(s), median of {} rounds\n\n| past | decode ms/token | x past 32 |\n|---|---|---|\n",
                        v["model"].as_str().unwrap_or(""), v["file"].as_str().unwrap_or(""), v["threads"], v["rounds"]);
    for d in v["decode"].as_array().into_iter().flatten() {
        s += &format!("| {} | {} | {} |\n", d["past"], d["ms_per_token"], d["ratio_to_32"]);
    }
    s += "\n| prompt tokens | prefill tokens/s |\n|---|---|\n";
    for p in v["prefill"].as_array().into_iter().flatten() {
        s += &format!("| {} | {} |\n", p["tokens"], p["tokens_per_s"]);
    }
    if let Some(c) = v.get("prefill_512_chunked") {
        s += &format!("\n512 tokens in chunks of {}: {} tokens/s (at once, same rounds: {})\n", c["chunk"], c["tokens_per_s"],
                      c["at_once_tokens_per_s"]);
    }
    if let Some(t) = v.get("second_turn") {
        s += &format!("\nA {}-token turn after {} tokens: {} ms; on an empty cache: {} ms ({}x)\n", t["turn"], t["history"],
                      t["ms_after_history"], t["ms_on_empty_cache"], t["ratio"]);
    }
    s
}
