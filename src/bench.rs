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
    let (ops, total) = per_op(times, steps, ["ms_per_token", "calls_per_token"]);
    Ok(json!({"steps": steps, "threads": engine.graph.threads, "wall_ms_per_token": per(wall, steps),
              "ops_ms_per_token": total, "ops": ops}))
}

/// `ms / n`, to 0.1 µs.
fn per(ms: f64, n: usize) -> f64 {
    (ms / n as f64 * 1e4).round() / 1e4
}

/// The per-op times summed over `n` steps or prefills, largest first, each divided by `n`:
/// [{op, <keys[0]>: ms, <keys[1]>: calls, share}], and their total ms over `n`.
fn per_op(mut times: Vec<(String, f64, usize)>, n: usize, keys: [&str; 2]) -> (Vec<Value>, f64) {
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = times.iter().map(|t| t.1).sum();
    let ops = times
        .iter()
        .map(|(op, ms, calls)| {
            json!({"op": op, keys[0]: per(*ms, n), keys[1]: *calls as f64 / n as f64,
                   "share": (ms / total.max(f64::MIN_POSITIVE) * 1e3).round() / 1e3})
        })
        .collect();
    (ops, per(total, n))
}

/// Prefill time per op: `prompt` fed at once after `past` (none, or a chat's history: the
/// second turn of [`context_sweep`]) `rounds` times after a warm-up one, every node of the plan
/// timed (`Session::feed_profiled`); the past is fed once, untimed, and each round feeds the
/// prompt to a fork of it. {tokens, past, rounds, threads, wall_ms, ops_ms, ops: [{op, ms, calls,
/// share}]}, per prefill, largest first; `wall` and `ops` as in [`profile`].
pub fn profile_prefill(engine: &Engine, past: &[u32], prompt: &[u32], rounds: usize) -> Result<Value> {
    if rounds == 0 {
        return Err(crate::error::Error::Options("the prefill profile needs at least one round".into()));
    }
    let mut history = engine.session()?;
    if !past.is_empty() {
        history.prefill(past)?;
    }
    history.fork().feed_profiled(prompt, &mut vec![])?; // the warm-up (refused past the context)
    let mut times: Vec<(String, f64, usize)> = vec![];
    let mut wall = 0.0;
    for _ in 0..rounds {
        let mut session = history.fork();
        let t = now_ms();
        session.feed_profiled(prompt, &mut times)?;
        wall += now_ms() - t;
    }
    let (ops, total) = per_op(times, rounds, ["ms", "calls"]);
    Ok(json!({"tokens": prompt.len(), "past": past.len(), "rounds": rounds, "threads": engine.graph.threads,
              "wall_ms": per(wall, rounds), "ops_ms": total, "ops": ops}))
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
/// The tokens are the text's, from its start. Medians over the rounds. [`Sweep`] runs it one step
/// at a time (the page: progress and a stop between steps).
pub fn context_sweep(engine: &Engine, text: &str, rounds: usize) -> Result<Value> {
    let mut sweep = Sweep::new(engine, text, rounds)?;
    for i in 0..sweep.steps() {
        sweep.step(engine, i)?;
    }
    Ok(sweep.result(engine))
}

/// Memory read bandwidth at 1 thread and at `threads` ([`membw`]), GB/s.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Membw {
    pub mib: usize,
    pub threads: usize,
    /// Per round: (1 thread, `threads`), each the best of [`MEMBW_PASSES`] passes.
    pub rounds: Vec<(f64, f64)>,
    /// Medians over the rounds, and of the rounds' ratios.
    pub one: f64,
    pub many: f64,
    pub ratio: f64,
}

pub const MEMBW_PASSES: usize = 3;

/// Memory read bandwidth at 1 thread and at `threads`, alternating rounds: the ceiling of a
/// decode step, which reads every weight once. A buffer of `mib` MiB (far larger than the
/// last-level cache) is cut into `threads` equal parts, each XOR-reduced (16 u64 lanes, which
/// the compiler vectorizes with the build's SIMD) by a thread of the session's team, the one the
/// INT8 products are split across ([`crate::qmatmul::split`]): natively OS threads, in the
/// threaded wasm build the pool's Web Workers. An error if the buffer cannot be allocated.
pub fn membw(mib: usize, rounds: usize, threads: usize) -> Result<Membw> {
    use crate::qmatmul::split;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    fn reduce(s: &[u64]) -> u64 {
        let mut acc = [0u64; 16];
        let (chunks, rest) = s.as_chunks::<16>();
        for c in chunks {
            for i in 0..16 {
                acc[i] ^= c[i];
            }
        }
        acc.iter().chain(rest).fold(0, |x, y| x ^ y)
    }
    if mib == 0 || rounds == 0 || threads == 0 {
        return Err(crate::Error::Options(format!("membw: {mib} MiB, {rounds} rounds, {threads} threads: each must be at least 1")));
    }
    // checked: on wasm32, 4,096 MiB would wrap a usize to 0
    let n = mib.checked_mul(1 << 20).ok_or_else(|| crate::Error::Options(format!("membw: {mib} MiB is more than this build can address")))? / 8;
    let mut words: Vec<u64> = Vec::new();
    words.try_reserve_exact(n).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("membw: {mib} MiB could not be allocated"))
    })?;
    words.extend((0..n).map(|i| i as u64));
    let pass = |t: usize| -> f64 {
        let part = words.len().div_ceil(t);
        let sink = AtomicU64::new(0);
        let start = now_ms();
        split::with_threads(t, || split::each_part(t, |i| {
            let r = reduce(&words[(i * part).min(n)..((i + 1) * part).min(n)]);
            sink.fetch_xor(r, Relaxed);
        }));
        let ms = now_ms() - start;
        std::hint::black_box(sink.load(Relaxed));
        (n * 8) as f64 / ms / 1e6
    };
    let best = |t: usize| (0..MEMBW_PASSES).map(|_| pass(t)).fold(0.0, f64::max);
    let all: Vec<(f64, f64)> = (0..rounds).map(|_| (best(1), best(threads))).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Membw {
        mib,
        threads,
        one: median(all.iter().map(|r| r.0).collect()),
        many: median(all.iter().map(|r| r.1).collect()),
        ratio: median(all.iter().map(|r| r.1 / r.0).collect()),
        rounds: all,
    })
}

/// One step of [`Sweep`].
#[derive(Debug, Clone, Copy)]
enum Case {
    /// Untimed: the shared conversation grows to this many tokens (a prefill chunk).
    Grow(usize),
    Decode(usize),
    Prefill(usize),
    Chunked(usize),
    Turn,
}

/// Tokens per [`Case::Grow`] step.
const GROW_CHUNK: usize = 256;

/// [`context_sweep`] as steps: first the shared conversation (the longest past, fed in chunks,
/// untimed), then each round's cases. A decode case times 16 steps on a copy of the conversation
/// cut to its past; the second-turn case feeds its turn to a copy cut to the history.
pub struct Sweep {
    ids: Vec<u32>,
    rounds: usize,
    setup: Vec<Case>,
    round: Vec<Case>,
    /// The shared conversation, grown by the setup steps.
    long: crate::session::Session,
    pasts: Vec<usize>,
    prompts: Vec<usize>,
    decode: Vec<Vec<f64>>,
    prefill: Vec<Vec<f64>>,
    chunked: Vec<f64>,
    whole512: Vec<f64>,
    after: Vec<f64>,
    fresh: Vec<f64>,
}

impl Sweep {
    pub fn new(engine: &Engine, text: &str, rounds: usize) -> Result<Sweep> {
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
        let turn = fits(SWEEP_HISTORY + SWEEP_TURN);
        let shared = pasts.iter().copied().chain(turn.then_some(SWEEP_HISTORY)).max().unwrap_or(0);
        let setup = (1..=shared.div_ceil(GROW_CHUNK)).map(|i| Case::Grow((i * GROW_CHUNK).min(shared))).collect();
        let mut round: Vec<Case> = pasts.iter().map(|&n| Case::Decode(n)).collect();
        for &n in &prompts {
            round.push(Case::Prefill(n));
            if n == 512 {
                round.push(Case::Chunked(n));
            }
        }
        if turn {
            round.push(Case::Turn);
        }
        Ok(Sweep {
            rounds: rounds.max(1),
            setup,
            round,
            long: engine.session()?,
            decode: vec![vec![]; pasts.len()],
            prefill: vec![vec![]; prompts.len()],
            pasts,
            prompts,
            ids,
            chunked: vec![],
            whole512: vec![],
            after: vec![],
            fresh: vec![],
        })
    }

    /// Steps in all: the setup's, then each round's.
    pub fn steps(&self) -> usize {
        self.setup.len() + self.rounds * self.round.len()
    }

    fn case(&self, i: usize) -> Option<Case> {
        match i.checked_sub(self.setup.len()) {
            None => self.setup.get(i).copied(),
            Some(j) => (j < self.rounds * self.round.len()).then(|| self.round[j % self.round.len()]),
        }
    }

    /// What step `i` does, for a progress line.
    pub fn label(&self, i: usize) -> String {
        match self.case(i) {
            Some(Case::Grow(n)) => format!("feeding the {n}-token conversation the decode cases share"),
            Some(Case::Decode(n)) => format!("decode after {n} tokens"),
            Some(Case::Prefill(n)) => format!("prefill of {n} tokens"),
            Some(Case::Chunked(n)) => format!("prefill of {n} tokens in chunks of {SWEEP_CHUNK}"),
            Some(Case::Turn) => format!("a {SWEEP_TURN}-token turn after {SWEEP_HISTORY} tokens, and on an empty cache"),
            None => String::new(),
        }
    }

    /// Runs step `i` (in order: a case reads what the setup fed).
    pub fn step(&mut self, engine: &Engine, i: usize) -> Result<()> {
        use crate::error::Error;
        let ids = &self.ids;
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let t = now_ms();
            f()?;
            Ok(now_ms() - t)
        };
        match self.case(i).ok_or_else(|| Error::Options(format!("the sweep has {} steps, not {}", self.steps(), i + 1)))? {
            Case::Grow(n) => {
                let at = self.long.len();
                self.long.prefill(&ids[at..n])?;
            }
            Case::Decode(n) => {
                let mut s = self.long.fork();
                s.truncate(n - 1)?;
                let mut logits = s.prefill(&ids[n - 1..n])?;
                let mut steps = vec![];
                for _ in 0..SWEEP_STEPS {
                    let next = argmax(&logits);
                    let t = now_ms();
                    logits = s.step(next)?;
                    steps.push(now_ms() - t);
                }
                steps.sort_by(f64::total_cmp);
                let at = self.pasts.iter().position(|&p| p == n).unwrap_or(0);
                self.decode[at].push(percentile(&steps, 50.0));
            }
            Case::Prefill(n) => {
                let mut s = engine.session()?;
                let ms = timed(&mut || s.prefill(&ids[..n]).map(drop))?;
                let at = self.prompts.iter().position(|&p| p == n).unwrap_or(0);
                self.prefill[at].push(n as f64 * 1e3 / ms);
                if n == 512 {
                    self.whole512.push(n as f64 * 1e3 / ms);
                }
            }
            Case::Chunked(n) => {
                let mut s = engine.session()?;
                let ms = timed(&mut || {
                    for c in ids[..n].chunks(SWEEP_CHUNK) {
                        s.prefill(c)?;
                    }
                    Ok(())
                })?;
                self.chunked.push(n as f64 * 1e3 / ms);
            }
            Case::Turn => {
                let turn = &ids[SWEEP_HISTORY..SWEEP_HISTORY + SWEEP_TURN];
                let mut s = self.long.fork();
                s.truncate(SWEEP_HISTORY)?;
                self.after.push(timed(&mut || s.prefill(turn).map(drop))?);
                let mut s = engine.session()?;
                self.fresh.push(timed(&mut || s.prefill(turn).map(drop))?);
            }
        }
        Ok(())
    }

    /// The medians of what the steps run so far measured.
    pub fn result(&self, engine: &Engine) -> Value {
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            (percentile(&v, 50.0) * 1000.0).round() / 1000.0
        };
        let measured = |v: &Vec<f64>| !v.is_empty();
        let base = self.decode.first().filter(|v| measured(v)).map(|v| med(v));
        let decode: Vec<Value> = self.pasts.iter().zip(&self.decode).filter(|(_, v)| measured(v)).map(|(&n, v)| {
            let ms = med(v);
            let ratio = base.map(|b| (ms / b * 1000.0).round() / 1000.0);
            json!({"past": n, "ms_per_token": ms, "ratio_to_32": ratio})
        }).collect();
        let prefill: Vec<Value> = self.prompts.iter().zip(&self.prefill).filter(|(_, v)| measured(v))
            .map(|(&n, v)| json!({"tokens": n, "tokens_per_s": med(v)})).collect();
        let rounds = self.decode.iter().chain(&self.prefill).map(Vec::len).max().unwrap_or(0);
        let mut out = json!({"model": engine.info.model, "file": engine.info.file, "threads": engine.graph.threads,
                             "context": engine.context, "rounds": rounds, "decode": decode, "prefill": prefill});
        if measured(&self.chunked) {
            out["prefill_512_chunked"] = json!({"chunk": SWEEP_CHUNK, "tokens_per_s": med(&self.chunked),
                                                "at_once_tokens_per_s": med(&self.whole512)});
        }
        if measured(&self.after) {
            let (a, f) = (med(&self.after), med(&self.fresh));
            out["second_turn"] = json!({"history": SWEEP_HISTORY, "turn": SWEEP_TURN, "ms_after_history": a,
                                        "ms_on_empty_cache": f, "ratio": (a / f * 1000.0).round() / 1000.0});
        }
        out
    }
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
