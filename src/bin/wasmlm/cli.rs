//! The native CLI's commands (see main.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Args, Parser, Subcommand};
use wasmlm::{bench, hub, Engine, GenerateOptions, Generation, Prepare, RunStats};

/// The prompt text of `bench` and `profile` unless `--text` names another: the repository's
/// (models/data/README.md says where it comes from).
const DEFAULT_TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/data/tinyshakespeare.txt");

type Res<T> = std::result::Result<T, String>;

/// wasmlm's native CLI: generate, benchmark and inspect a bundle's model.
#[derive(Parser)]
#[command(name = "wasmlm", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from a prompt, streaming the text; timings on stderr
    Generate(GenerateArgs),
    /// Benchmark every ONNX file of the bundles (each row in its own process) into a baselines table
    Bench(BenchArgs),
    /// One benchmark row as JSON (what `bench` runs for each file)
    BenchRow(BenchRowArgs),
    /// Decode time per op over greedy steps after the bench prompt (or --past tokens)
    Profile(ProfileArgs),
    /// How decode and prefill hold as the context grows (Markdown, or JSON)
    Context(ContextArgs),
    /// The parity protocol's output as JSON: logits and greedy tokens after a prompt of ids
    Trace(TraceArgs),
    /// Memory read bandwidth at 1 thread and at N, alternating rounds
    Membw(MembwArgs),
}

/// How the engine prepares the graph; the `--no-*` switches exist to compare against the fast
/// path.
#[derive(Args)]
struct Prep {
    /// Threads for the matrix products
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// tract's own constant folding only
    #[arg(long)]
    no_fold: bool,
    /// tract's integer matmul for dynamic-quantization files
    #[arg(long)]
    no_int8_kernels: bool,
    /// tract's attention products and GELU nodes
    #[arg(long)]
    no_fused_ops: bool,
    /// The LM head on every position fed, as the file says (default: the last one only)
    #[arg(long)]
    all_logits: bool,
}

impl Prep {
    fn prepare(&self) -> Prepare {
        Prepare {
            threads: self.threads as usize,
            fold_constants: !self.no_fold,
            int8_kernels: !self.no_int8_kernels,
            fused_ops: !self.no_fused_ops,
            last_logits_only: !self.all_logits,
            ..Prepare::default()
        }
    }
}

/// A bundle folder and one of its ONNX files (default: the manifest's), or a Hugging Face
/// repository laid out as transformers.js's (src/hub.rs).
#[derive(Args)]
struct Model {
    /// The bundle folder (manifest.json, tokenizer.json, ONNX files)
    #[arg(long, required_unless_present = "hub", conflicts_with = "hub")]
    bundle: Option<PathBuf>,
    /// The ONNX file (default: the manifest's default)
    #[arg(long, requires = "bundle")]
    file: Option<String>,
    /// A Hugging Face repository id (e.g. onnx-community/SmolLM2-135M-Instruct): its
    /// onnx/model_<dtype>.onnx, tokenizer and config, downloaded once into $WASMLM_CACHE
    /// (default ~/.cache/wasmlm) from $HF_ENDPOINT (default https://huggingface.co)
    #[arg(long)]
    hub: Option<String>,
    /// With --hub: fp32, fp16, q8, int8, uint8, q4, q4f16 (transformers.js's file names)
    #[arg(long, default_value = "q8", requires = "hub")]
    dtype: String,
    /// With --hub: a branch, tag or commit
    #[arg(long, default_value = "main", requires = "hub")]
    revision: String,
    /// With --hub: the context in tokens (default and most: config.json's max_position_embeddings)
    #[arg(long, requires = "hub", value_parser = clap::value_parser!(u32).range(1..))]
    context: Option<u32>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: Model,
    #[command(flatten)]
    prep: Prep,
    /// Through the model's chat template, as a user turn
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop at this text (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    prompt: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Bundle folders (repeatable)
    #[arg(long, required = true)]
    bundle: Vec<String>,
    /// The table to merge the rows into (rows with the same key are replaced); refused if it
    /// exists and is not a table
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The prompt's text
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    /// Thread counts (repeatable; default 1 and 2)
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Vec<u16>,
    /// Only these ONNX files (repeatable; default all)
    #[arg(long)]
    file: Vec<String>,
}

#[derive(Args)]
struct BenchRowArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    file: String,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    #[command(flatten)]
    prep: Prep,
}

#[derive(Args)]
struct ProfileArgs {
    #[command(flatten)]
    model: Model,
    #[arg(long, default_value_t = bench::PROFILE_STEPS)]
    steps: usize,
    /// Time a prefill of this many tokens of the text instead (each op's ms per prefill,
    /// over --steps rounds)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    prefill: Option<u32>,
    /// The decode steps (or with --prefill, its tokens) come after a past of this many tokens
    /// of the text, fed first and untimed (a long chat; with --prefill, its next turn)
    #[arg(long)]
    past: Option<u32>,
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    #[command(flatten)]
    prep: Prep,
}

#[derive(Args)]
struct ContextArgs {
    #[command(flatten)]
    model: Model,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// The sweep's JSON rather than Markdown
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    #[command(flatten)]
    prep: Prep,
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    model: Model,
    /// Decode steps whose logits are written
    #[arg(long, default_value_t = 3)]
    decode: usize,
    /// Greedy tokens generated
    #[arg(long, default_value_t = 32)]
    greedy: usize,
    #[command(flatten)]
    prep: Prep,
    /// The prompt's token ids
    #[arg(required = true)]
    ids: Vec<u32>,
}

#[derive(Args)]
struct MembwArgs {
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    mib: u32,
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..))]
    threads: u16,
    /// The figures as JSON
    #[arg(long)]
    json: bool,
}

fn load(model: &Model, prep: &Prep) -> Res<Engine> {
    let Some(repo) = &model.hub else {
        let bundle = model.bundle.as_ref().expect("clap requires --bundle without --hub");
        return Engine::from_dir(bundle, model.file.as_deref(), prep.prepare()).map_err(|e| e.to_string());
    };
    let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| hub::DEFAULT_ENDPOINT.into());
    let source = hub::HubSource::new(repo, &model.dtype, &model.revision, &endpoint).map_err(|e| e.to_string())?;
    let cache = hub::default_cache().map_err(|e| e.to_string())?;
    let mut last = (String::new(), 0u64);
    let mut progress = |path: &str, loaded: u64, total: Option<u64>| {
        // a line per file and per 10 MB
        if path != last.0 || loaded >= last.1 + 10_000_000 || Some(loaded) == total {
            last = (path.to_string(), loaded);
            let mb = |b: u64| b as f64 / 1e6;
            match total {
                Some(t) => eprintln!("[{repo}: {path} {:.1} / {:.1} MB]", mb(loaded), mb(t)),
                None => eprintln!("[{repo}: {path} {:.1} MB]", mb(loaded)),
            }
        }
    };
    let fetched = hub::fetch(&source, &cache, &mut progress).map_err(|e| e.to_string())?;
    hub::load(&fetched, model.context.map(|c| c as usize), prep.prepare()).map_err(|e| e.to_string())
}

fn generate(a: GenerateArgs) -> Res<()> {
    let mut opts = GenerateOptions { chat: a.chat, stop: a.stop, ..Default::default() };
    opts.max_new_tokens = a.max_new_tokens.unwrap_or(opts.max_new_tokens);
    let s = &mut opts.sampling;
    s.temperature = a.temperature.unwrap_or(s.temperature);
    s.top_k = a.top_k.unwrap_or(s.top_k);
    s.top_p = a.top_p.unwrap_or(s.top_p);
    s.repetition_penalty = a.repetition_penalty.unwrap_or(s.repetition_penalty);
    s.seed = a.seed.unwrap_or(s.seed);
    let prompt = a.prompt;
    let engine = load(&a.model, &a.prep)?;
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

fn bench_row(a: BenchRowArgs) -> Res<()> {
    let (runs, threads) = (a.runs, a.prep.threads as usize);
    let text = std::fs::read_to_string(&a.text).map_err(|e| format!("{}: {e}", a.text))?;
    let engine = Engine::from_dir(&a.bundle, Some(&a.file), a.prep.prepare()).map_err(|e| e.to_string())?;
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

fn bench_all(a: BenchArgs) -> Res<()> {
    let out = a.out;
    // the table the rows merge into, read before minutes of runs: one that does not parse is
    // refused, never replaced by the new rows alone
    let table = read_table(&out)?;
    let runs = a.runs.to_string();
    let text = a.text;
    let bundles = a.bundle;
    let threads: Vec<String> = if a.threads.is_empty() { vec!["1".into(), "2".into()] } else { a.threads.iter().map(|t| t.to_string()).collect() };
    let only = a.file;
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
    let merged = bench::merge(table, rows);
    write_atomically(&out, serde_json::to_string_pretty(&merged).unwrap().as_bytes())
}

/// The baselines table at `path`: an empty one if there is no file; an error if the file cannot
/// be read or is not a JSON object (its rows, if any, an array).
fn read_table(path: &Path) -> Res<serde_json::Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::json!({})),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not JSON ({e}); refusing to replace it: move it away or fix it", path.display()))?;
    if !v.is_object() || v.get("rows").is_some_and(|r| !r.is_array()) {
        return Err(format!("{}: not a baselines table (an object with a \"rows\" array); refusing to replace it", path.display()));
    }
    Ok(v)
}

/// `bytes` into `path` whole or not at all: a temporary file of a unique name beside it, synced,
/// then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Res<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| format!("{}: not a file name", path.display()))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        std::fs::remove_file(&tmp).ok();
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(())
}

/// How decode and prefill hold as the context grows (bench::context_sweep): Markdown, and the
/// JSON with --json.
fn context(a: ContextArgs) -> Res<()> {
    let (rounds, json) = (a.rounds as usize, a.json);
    let text = std::fs::read_to_string(&a.text).map_err(|e| format!("{}: {e}", a.text))?;
    let engine = load(&a.model, &a.prep)?;
    let v = bench::context_sweep(&engine, &text, rounds).map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    } else {
        print!("{}", bench::sweep_markdown(&v));
    }
    Ok(())
}

/// Decode time per op over `steps` greedy steps after the bench prompt (or a past of the text's
/// first tokens), largest first.
fn profile(a: ProfileArgs) -> Res<()> {
    let steps = a.steps;
    let text = std::fs::read_to_string(&a.text).map_err(|e| format!("{}: {e}", a.text))?;
    let engine = load(&a.model, &a.prep)?;
    if let Some(n) = a.prefill {
        return profile_prefill(&engine, &text, a.past.unwrap_or(0) as usize, n as usize, steps);
    }
    let prompt = match a.past {
        Some(p) => text_ids(&engine, &text, p as usize + steps, "--past and --steps")?[..p as usize].to_vec(),
        None => bench::prompt_ids(&engine, &text).map_err(|e| e.to_string())?,
    };
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

/// Prefill time per op: the text's `n` tokens after its first `past` fed at once (after those,
/// fed untimed), over `rounds` rounds.
fn profile_prefill(engine: &Engine, text: &str, past: usize, n: usize, rounds: usize) -> Res<()> {
    let ids = text_ids(engine, text, past + n, "--past and --prefill")?;
    let p = bench::profile_prefill(engine, &ids[..past], &ids[past..past + n], rounds).map_err(|e| e.to_string())?;
    let wall = p["wall_ms"].as_f64().unwrap();
    let after = if past > 0 { format!(" after {past}") } else { String::new() };
    println!("{} {}: a {n}-token prefill{after}, {} ms in ops, {wall} ms in all ({:.1} tokens/s), mean of {rounds} round(s)",
             engine.info.model, engine.info.file, p["ops_ms"], n as f64 / wall * 1e3);
    for op in p["ops"].as_array().unwrap().iter().take(20) {
        println!("{:>9.3} ms {:>5.1}%  {:>6} calls  {}", op["ms"].as_f64().unwrap(), 100.0 * op["share"].as_f64().unwrap(),
                 op["calls"], op["op"].as_str().unwrap());
    }
    Ok(())
}

/// The text's first `n` tokens, if the model's context holds them (`what` names the options that
/// asked for them).
fn text_ids(engine: &Engine, text: &str, n: usize, what: &str) -> Res<Vec<u32>> {
    if n > engine.context {
        return Err(format!("{what} make {n} tokens; the model's context is {}", engine.context));
    }
    let chars: String = text.chars().take(n * 8).collect();
    let ids = engine.text.encode(&chars).map_err(|e| e.to_string())?;
    if ids.len() < n {
        return Err(format!("the text gives {} tokens; {what} ask for {n}", ids.len()));
    }
    Ok(ids[..n].to_vec())
}

/// Memory read bandwidth at 1 thread and at N, alternating rounds (bench::membw, which the page's
/// threaded build runs too).
fn membw(a: MembwArgs) -> Res<()> {
    let m = bench::membw(a.mib as usize, a.rounds as usize, a.threads as usize).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m).map_err(|e| e.to_string())?);
        return Ok(());
    }
    for (i, (one, many)) in m.rounds.iter().enumerate() {
        println!("round {}: 1 thread {one:.1} GB/s, {} threads {many:.1} GB/s, ratio {:.2}", i + 1, m.threads, many / one);
    }
    let (lo, hi) = m.rounds.iter().map(|r| r.1 / r.0).fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    println!("median over {} rounds of {} MiB: 1 thread {:.1} GB/s, {} threads {:.1} GB/s, ratio {:.2} (range {lo:.2}-{hi:.2})",
             m.rounds.len(), m.mib, m.one, m.threads, m.many, m.ratio);
    Ok(())
}

/// The parity protocol's output as JSON, for the wasm build's tests to compare with.
fn trace(a: TraceArgs) -> Res<()> {
    let (decode, greedy, prompt) = (a.decode, a.greedy, a.ids);
    let engine = load(&a.model, &a.prep)?;
    let (logits, tokens) = bench::greedy_trace(&engine, &prompt, decode, greedy).map_err(|e| e.to_string())?;
    println!("{}", serde_json::json!({ "prompt": prompt, "logits": logits, "tokens": tokens }));
    Ok(())
}

pub fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Generate(a) => generate(a),
        Cmd::Bench(a) => bench_all(a),
        Cmd::BenchRow(a) => bench_row(a),
        Cmd::Profile(a) => profile(a),
        Cmd::Context(a) => context(a),
        Cmd::Trace(a) => trace(a),
        Cmd::Membw(a) => membw(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
