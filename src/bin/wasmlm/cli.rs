//! The native CLI's commands (see main.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use wasmlm::{bench, Engine, GenerateOptions, Generation, Prepare, RunStats};

/// The prompt text of `bench` and `profile` unless `--text` names another: the repository's
/// (models/data/README.md says where it comes from).
const DEFAULT_TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/data/tinyshakespeare.txt");

type Res<T> = std::result::Result<T, String>;

struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        let found = self.0.iter().position(|a| a == name);
        found.map(|i| self.0.remove(i)).is_some()
    }
    fn values(&mut self, name: &str) -> Res<Vec<String>> {
        let mut out = vec![];
        while let Some(i) = self.0.iter().position(|a| a == name) {
            if i + 1 >= self.0.len() {
                return Err(format!("{name} needs a value"));
            }
            out.push(self.0.remove(i + 1));
            self.0.remove(i);
        }
        Ok(out)
    }
    fn value(&mut self, name: &str) -> Res<Option<String>> {
        Ok(self.values(name)?.pop())
    }
    fn parsed<T: std::str::FromStr>(&mut self, name: &str) -> Res<Option<T>> {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| format!("{name}: cannot read {v:?}")),
        }
    }
    fn required(&mut self, name: &str) -> Res<String> {
        self.value(name)?.ok_or_else(|| format!("{name} is required"))
    }
}

/// The engine's preparation from `--threads N`, `--no-fold` (tract's own constant folding only),
/// `--no-int8-kernels` (tract's integer matmul for dynamic-quantization files) and
/// `--no-fused-ops` (tract's attention products and GELU nodes): the last three exist to
/// compare against the fast path.
fn prepare(a: &mut Args) -> Res<Prepare> {
    Ok(Prepare {
        threads: a.parsed("--threads")?.unwrap_or(1),
        fold_constants: !a.flag("--no-fold"),
        int8_kernels: !a.flag("--no-int8-kernels"),
        fused_ops: !a.flag("--no-fused-ops"),
        ..Prepare::default()
    })
}

fn generate(mut a: Args) -> Res<()> {
    let bundle = PathBuf::from(a.required("--bundle")?);
    let file = a.value("--file")?;
    let prep = prepare(&mut a)?;
    let mut opts = GenerateOptions { chat: a.flag("--chat"), stop: a.values("--stop")?, ..Default::default() };
    opts.max_new_tokens = a.parsed("--max-new-tokens")?.unwrap_or(opts.max_new_tokens);
    let s = &mut opts.sampling;
    s.temperature = a.parsed("--temperature")?.unwrap_or(s.temperature);
    s.top_k = a.parsed("--top-k")?.unwrap_or(s.top_k);
    s.top_p = a.parsed("--top-p")?.unwrap_or(s.top_p);
    s.repetition_penalty = a.parsed("--repetition-penalty")?.unwrap_or(s.repetition_penalty);
    s.seed = a.parsed("--seed")?.unwrap_or(s.seed);
    let prompt = match a.0.as_slice() {
        [p] => p.clone(),
        _ => return Err(format!("expected one PROMPT, got {:?}", a.0)),
    };
    let engine = Engine::from_dir(&bundle, file.as_deref(), prep).map_err(|e| e.to_string())?;
    let phases: Vec<String> = engine.info.load_phases_ms.iter().map(|(n, ms)| format!("{n} {ms:.0}")).collect();
    eprintln!("[{} {} loaded in {:.0} ms: {}]", engine.info.model, engine.info.file, engine.info.load_ms, phases.join(", "));
    let mut session = engine.session().map_err(|e| e.to_string())?;
    let mut gen = Generation::new(&engine, &prompt, opts).map_err(|e| e.to_string())?;
    let mut events = vec![];
    let mut out = std::io::stdout();
    while let Some(ev) = gen.next(&engine, &mut session).map_err(|e| e.to_string())? {
        print!("{}", ev.text);
        out.flush().ok();
        events.push(ev);
    }
    let st = RunStats::from_events(gen.prompt_tokens(), &events);
    println!();
    eprintln!(
        "[{} prompt tokens, {} new ({:?}); TTFT {:.1} ms; decode {:.2} ms/token median, {:.2} p90; {:.1} tokens/s]",
        st.prompt_tokens, st.new_tokens, gen.stopped.unwrap(), st.ttft_ms, st.decode_ms_median,
        st.decode_ms_p90, st.tokens_per_s
    );
    Ok(())
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

fn bench_row(mut a: Args) -> Res<()> {
    let bundle = PathBuf::from(a.required("--bundle")?);
    let file = a.required("--file")?;
    let runs: usize = a.parsed("--runs")?.unwrap_or(5);
    let prep = prepare(&mut a)?;
    let threads = prep.threads;
    let text = std::fs::read_to_string(a.required("--text")?).map_err(|e| e.to_string())?;
    let engine = Engine::from_dir(&bundle, Some(&file), prep).map_err(|e| e.to_string())?;
    let prompt = bench::prompt_ids(&engine, &text).map_err(|e| e.to_string())?;
    let mut row = bench::row(&engine, &prompt, runs, threads).map_err(|e| e.to_string())?;
    row["peak_rss_mib"] = serde_json::json!(peak_rss_mib());
    println!("{row}");
    Ok(())
}

fn onnx_files(bundle: &Path) -> Res<Vec<String>> {
    let text = std::fs::read_to_string(bundle.join("manifest.json")).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let m = wasmlm::Manifest::from_json(&text).map_err(|e| e.to_string())?;
    Ok(m.files.iter().filter(|f| f.kind == "onnx").map(|f| f.name.clone()).collect())
}

fn bench_all(mut a: Args) -> Res<()> {
    let out = PathBuf::from(a.required("--out")?);
    let runs = a.value("--runs")?.unwrap_or_else(|| "5".into());
    let text = a.value("--text")?.unwrap_or_else(|| DEFAULT_TEXT.into());
    let bundles = a.values("--bundle")?;
    let threads = a.values("--threads")?;
    let threads = if threads.is_empty() { vec!["1".to_string(), "2".into()] } else { threads };
    let only = a.values("--file")?;
    let mut rows = vec![];
    for (bundle, t) in bundles.iter().flat_map(|b| threads.iter().map(move |t| (b, t))) {
        for file in onnx_files(Path::new(bundle))? {
            if !only.is_empty() && !only.contains(&file) {
                continue;
            }
            eprintln!("[bench] {bundle} {file} x{t} thread(s)");
            // Each row in its own process, so its peak RSS is its own.
            let o = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
                .args(["bench-row", "--bundle", bundle, "--file", &file, "--runs", &runs, "--text", &text,
                       "--threads", t])
                .output()
                .map_err(|e| e.to_string())?;
            let row: serde_json::Value = if o.status.success() {
                serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?
            } else {
                let err = String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("failed").to_string();
                serde_json::json!({"backend": "tract native", "file": file, "threads": t.parse::<usize>().ok(), "error": err})
            };
            eprintln!("[bench]   -> {}", row.get("decode_ms_per_token").or(row.get("latency_ms")).or(row.get("error")).unwrap_or(&row));
            rows.push(row);
        }
    }
    let table = std::fs::read_to_string(&out).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let merged = bench::merge(table, rows);
    let tmp = out.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&merged).unwrap()).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    Ok(())
}

/// How decode and prefill hold as the context grows (bench::context_sweep): Markdown, and the
/// JSON with --json.
fn context(mut a: Args) -> Res<()> {
    let bundle = PathBuf::from(a.required("--bundle")?);
    let file = a.value("--file")?;
    let rounds: usize = a.parsed("--rounds")?.unwrap_or(3);
    let json = a.flag("--json");
    let prep = prepare(&mut a)?;
    let text = std::fs::read_to_string(a.value("--text")?.unwrap_or_else(|| DEFAULT_TEXT.into()))
        .map_err(|e| e.to_string())?;
    let engine = Engine::from_dir(&bundle, file.as_deref(), prep).map_err(|e| e.to_string())?;
    let v = bench::context_sweep(&engine, &text, rounds).map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    } else {
        print!("{}", bench::sweep_markdown(&v));
    }
    Ok(())
}

/// Decode time per op over `steps` greedy steps after the bench prompt, largest first.
fn profile(mut a: Args) -> Res<()> {
    let bundle = PathBuf::from(a.required("--bundle")?);
    let file = a.value("--file")?;
    let steps: usize = a.parsed("--steps")?.unwrap_or(bench::PROFILE_STEPS);
    let prep = prepare(&mut a)?;
    let text = std::fs::read_to_string(a.value("--text")?.unwrap_or_else(|| DEFAULT_TEXT.into()))
        .map_err(|e| e.to_string())?;
    let engine = Engine::from_dir(&bundle, file.as_deref(), prep).map_err(|e| e.to_string())?;
    let prompt = bench::prompt_ids(&engine, &text).map_err(|e| e.to_string())?;
    let p = bench::profile(&engine, &prompt, steps).map_err(|e| e.to_string())?;
    let ops = p["ops"].as_array().unwrap();
    println!("{} {}: {} nodes, {} ms/token in ops, {} ms/token in all, over {steps} steps", engine.info.model,
             engine.info.file, engine.graph.nodes, p["ops_ms_per_token"], p["wall_ms_per_token"]);
    for op in ops.iter().take(20) {
        println!("{:>8.3} ms/token {:>5.1}%  {:>6} calls/token  {}", op["ms_per_token"].as_f64().unwrap(),
                 100.0 * op["share"].as_f64().unwrap(), op["calls_per_token"], op["op"].as_str().unwrap());
    }
    Ok(())
}

/// Memory read bandwidth at 1 thread and at N, alternating rounds: the ceiling of a decode step,
/// which reads every weight once. A buffer far larger than the last-level cache is split into N
/// equal parts, each XOR-reduced by its own thread (16 u64 lanes, which the compiler vectorizes
/// with the baseline SIMD); a round's figure for each thread count is the best of 3 passes.
fn membw(mut a: Args) -> Res<()> {
    let mib: usize = a.parsed("--mib")?.unwrap_or(512);
    let rounds: usize = a.parsed("--rounds")?.unwrap_or(7);
    let threads: usize = a.parsed("--threads")?.unwrap_or(2);
    if mib == 0 || rounds == 0 || threads < 2 {
        return Err("--mib and --rounds must be at least 1, --threads at least 2".into());
    }
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
    let words: Vec<u64> = (0..(mib << 20) / 8).map(|i| i as u64).collect();
    let pass = |n: usize| -> f64 {
        let start = std::time::Instant::now();
        let part = words.len().div_ceil(n);
        let r = std::thread::scope(|s| {
            let hs: Vec<_> = words.chunks(part).map(|c| s.spawn(move || reduce(c))).collect();
            hs.into_iter().fold(0, |x, h| x ^ h.join().unwrap())
        });
        std::hint::black_box(r);
        (words.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let (mut one, mut many, mut ratios) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        let g1 = (0..3).map(|_| pass(1)).fold(0.0, f64::max);
        let gn = (0..3).map(|_| pass(threads)).fold(0.0, f64::max);
        println!("round {round}: 1 thread {g1:.1} GB/s, {threads} threads {gn:.1} GB/s, ratio {:.2}", gn / g1);
        one.push(g1);
        many.push(gn);
        ratios.push(gn / g1);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("median over {rounds} rounds of {mib} MiB: 1 thread {:.1} GB/s, {threads} threads {:.1} GB/s, ratio {:.2} (range {:.2}-{:.2})",
             median(&mut one), median(&mut many), median(&mut ratios), ratios[0], ratios[rounds - 1]);
    Ok(())
}

/// The parity protocol's output as JSON, for the wasm build's tests to compare with.
fn trace(mut a: Args) -> Res<()> {
    let bundle = PathBuf::from(a.required("--bundle")?);
    let file = a.value("--file")?;
    let decode: usize = a.parsed("--decode")?.unwrap_or(3);
    let greedy: usize = a.parsed("--greedy")?.unwrap_or(32);
    let prep = prepare(&mut a)?;
    let prompt: Vec<u32> = a.0.iter().map(|t| t.parse().map_err(|_| format!("not a token id: {t}"))).collect::<Res<_>>()?;
    let engine = Engine::from_dir(&bundle, file.as_deref(), prep).map_err(|e| e.to_string())?;
    let (logits, tokens) = bench::greedy_trace(&engine, &prompt, decode, greedy).map_err(|e| e.to_string())?;
    println!("{}", serde_json::json!({ "prompt": prompt, "logits": logits, "tokens": tokens }));
    Ok(())
}

pub fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: wasmlm generate|bench|bench-row|profile|context|trace|membw … (see src/bin/wasmlm/main.rs)");
        return ExitCode::from(2);
    }
    let cmd = args.remove(0);
    let a = Args(args);
    let result = match cmd.as_str() {
        "generate" => generate(a),
        "bench" => bench_all(a),
        "bench-row" => bench_row(a),
        "profile" => profile(a),
        "context" => context(a),
        "trace" => trace(a),
        "membw" => membw(a),
        other => Err(format!("unknown command {other:?}: generate, bench, bench-row, profile, context, trace, membw")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
