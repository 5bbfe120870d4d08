//! The JavaScript surface (wasm32 only). It converts types and nothing else: every rule lives in
//! the engine, which the native CLI and tests run too.
//!
//! ```js
//! const engine = Engine.fromBundle(manifestText, "model.with_past.int8.onnx", onnxBytes, tokenizerBytes, {});
//! const session = engine.session();              // the KV cache, held inside the engine
//! let ev = session.prefill("What is the capital of France?", { chat: true, max_new_tokens: 32 });
//! while (ev) { show(ev.text, ev.ms); ev = session.next(); }   // one call per token
//! session.stopReason;                              // "Eos" | "StopString" | "MaxTokens" | "ContextFull"
//! session.free(); engine.free();
//! ```
//! Errors arrive as JS `Error`s carrying the engine's message; a panic is logged with its
//! message by console_error_panic_hook (and leaves the instance unusable: the page reloads it).

use std::rc::Rc;

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::bench;
use crate::engine::Engine;
use crate::external::{SideFile, SideFiles, WithExternal};
use crate::file_parts::FileParts;
use crate::generate::{GenerateOptions, Generation};
use crate::graph::Prepare;
use crate::js_bytes::JsBytes;
use crate::manifest::Manifest;
use crate::session::Session;
use crate::text::Message;

/// The threaded build: starts `workers` Web Workers sharing this module's memory (rayon's
/// global pool, wasm-bindgen-rayon's `initThreadPool`), before any engine is loaded; a session
/// of `threads: workers + 1` then cuts its products across them and the calling thread.
#[cfg(feature = "threads")]
#[wasm_bindgen(js_name = startThreads)]
pub fn start_threads(workers: usize) -> js_sys::Promise {
    crate::qmatmul::split::team::POOL_WORKERS.store(workers, std::sync::atomic::Ordering::SeqCst);
    wasm_bindgen_rayon::init_thread_pool(workers)
}

#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The crate version and the build's SIMD flavour, for the page's row labels.
#[wasm_bindgen(js_name = buildInfo)]
pub fn build_info() -> JsValue {
    // the relaxed build: SIMD128 everywhere, relaxed SIMD in our INT8 kernel (Cargo.toml)
    let simd = if cfg!(all(target_feature = "simd128", feature = "relaxed-simd")) {
        "relaxed-simd"
    } else if cfg!(target_feature = "simd128") {
        "simd128"
    } else {
        "none"
    };
    let info = serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "simd": simd, "tract": crate::TRACT_VERSION,
                                   "threads": cfg!(feature = "threads") });
    to_js(&info)
}

/// This build's INT8 kernels against the scalar one on small random products (a few
/// milliseconds): the names of the kernels checked, or an error naming the first difference. The
/// page runs it before it keeps the relaxed-SIMD build, whose dot product a browser may get wrong
/// (Node 20's V8 11.3, behind its flag, computes twice the sum).
#[wasm_bindgen(js_name = checkKernels)]
pub fn check_kernels() -> Result<Vec<String>, JsError> {
    let checked = crate::qmatmul::kernel::check_kernels_quick().map_err(|e| JsError::new(&e))?;
    Ok(checked.into_iter().map(String::from).collect())
}

/// The largest ONNX file the wasm engine takes: wasm32's memory is 4 GiB at most, and a load
/// holds up to ~2.5x its file (the default model: 174 MiB of memory for 137 MiB, its weights
/// packed from the protobuf, qmatmul/packs.rs; an `ort-dynamic-qint8` file: 391 for 237).
const MAX_WASM_FILE: u64 = 3 << 29; // 1.5 GiB

/// A side file of external data in a JS `Uint8Array`: read a tensor at a time.
struct JsSideFile(js_sys::Uint8Array);

impl SideFile for JsSideFile {
    fn len(&self) -> u64 {
        self.0.length() as u64
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.0.subarray(offset as u32, (offset + len) as u32).to_vec()
    }
}

/// `undefined`, or an array of `{name, bytes: Uint8Array}`: the side files an ONNX file's
/// external data names (src/external.rs).
fn side_files(external: JsValue) -> Result<SideFiles, JsError> {
    if external.is_undefined() || external.is_null() {
        return Ok(vec![]);
    }
    let bad = || JsError::new("external data: expected an array of {name: string, bytes: Uint8Array}");
    let list: js_sys::Array = external.dyn_into().map_err(|_| bad())?;
    let mut out: SideFiles = vec![];
    for item in list.iter() {
        let get = |k: &str| js_sys::Reflect::get(&item, &JsValue::from_str(k)).map_err(|_| bad());
        let name = get("name")?.as_string().ok_or_else(bad)?;
        let bytes: js_sys::Uint8Array = get("bytes")?.dyn_into().map_err(|_| bad())?;
        out.push((name, Box::new(JsSideFile(bytes))));
    }
    Ok(out)
}

/// An ONNX file's bytes from JS: a [`JsModelFile`] the page wrote as it downloaded, or a
/// `Uint8Array` (an `Array` of them) read in chunks ([`JsBytes`]); refused above
/// [`MAX_WASM_FILE`] before anything is read.
fn onnx_bytes(onnx: JsValue) -> Result<PageBytes, JsError> {
    use wasm_bindgen::convert::TryFromJsValue;
    use crate::graph::OnnxBytes;
    // an instance of ModelFile is moved out of JS here (its JS object is spent)
    let bytes = match JsModelFile::try_from_js_value(onnx) {
        Ok(file) => {
            file.inner.check_complete().map_err(err)?;
            PageBytes::Written(file.inner)
        }
        Err(onnx) => PageBytes::Js(JsBytes::new(onnx).map_err(err)?),
    };
    check_size(bytes.len())?;
    Ok(bytes)
}

fn check_size(bytes: u64) -> Result<(), JsError> {
    let gib = |n: u64| n as f64 / (1u64 << 30) as f64;
    if bytes > MAX_WASM_FILE {
        return Err(JsError::new(&format!(
            "the ONNX file is {:.2} GiB: the WebAssembly engine takes files up to {:.1} GiB (its memory is at most 4 GiB, \
             and a load holds ~2.5x the file); run it natively, or use a smaller (quantized) file",
            gib(bytes), gib(MAX_WASM_FILE))));
    }
    Ok(())
}

enum PageBytes {
    Js(JsBytes),
    Written(FileParts),
}

impl crate::graph::OnnxBytes for PageBytes {
    fn len(&self) -> u64 {
        match self {
            PageBytes::Js(b) => b.len(),
            PageBytes::Written(b) => b.len(),
        }
    }

    fn sha256(&self) -> String {
        match self {
            PageBytes::Js(b) => b.sha256(),
            PageBytes::Written(b) => b.sha256(),
        }
    }

    fn decode(self) -> crate::Result<tract_onnx::pb::ModelProto> {
        match self {
            PageBytes::Js(b) => b.decode(),
            PageBytes::Written(b) => b.decode(),
        }
    }
}

/// An ONNX file written into the engine's memory as the page downloads it, part by part, in any
/// order (src/file_parts.rs): JS never holds the whole file. Given to `Engine.fromBundle` in
/// place of the bytes, it is spent.
///
/// ```js
/// const file = new ModelFile([part0.bytes, part1.bytes]);  // the sizes, from the manifest
/// for await (const chunk of body) file.write(1, chunk);
/// file.finish(1);                                           // all of its bytes are there
/// await crypto.subtle.digest("SHA-256", file.part(1));      // then check it (restart(1) if bad)
/// ```
#[wasm_bindgen(js_name = ModelFile)]
pub struct JsModelFile {
    inner: FileParts,
}

#[wasm_bindgen(js_class = ModelFile)]
impl JsModelFile {
    /// Parts of these sizes in bytes; refused above the engine's largest file, before any
    /// download.
    #[wasm_bindgen(constructor)]
    pub fn new(part_sizes: Vec<f64>) -> Result<JsModelFile, JsError> {
        if let Some(bad) = part_sizes.iter().find(|s| !(s.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(*s))) {
            return Err(JsError::new(&format!("ModelFile: a part's size must be a whole number of bytes, not {bad}")));
        }
        let sizes: Vec<usize> = part_sizes.iter().map(|&s| s as usize).collect();
        check_size(sizes.iter().map(|&s| s as u64).sum())?;
        Ok(JsModelFile { inner: FileParts::new(&sizes) })
    }

    /// Appends a chunk of the download to part `part`; refused past the part's size.
    pub fn write(&mut self, part: usize, chunk: &js_sys::Uint8Array) -> Result<(), JsError> {
        self.inner.write(part, chunk.length() as usize, |dst| chunk.copy_to(dst)).map_err(err)
    }

    /// Empties part `part`, to write it again.
    pub fn restart(&mut self, part: usize) -> Result<(), JsError> {
        self.inner.restart(part).map_err(err)
    }

    /// Part `part` is complete; an error if bytes are missing.
    pub fn finish(&mut self, part: usize) -> Result<(), JsError> {
        self.inner.finish(part).map_err(err)
    }

    /// A view of part `part`'s bytes in wasm memory, to be read at once: it is invalid after
    /// any other call into the engine (wasm memory may grow and move).
    pub fn part(&self, part: usize) -> Result<js_sys::Uint8Array, JsError> {
        let bytes = self.inner.bytes(part).ok_or_else(|| JsError::new(&format!("ModelFile: no part {part}")))?;
        // SAFETY: the view is returned to JS to be read before the next call into wasm.
        Ok(unsafe { js_sys::Uint8Array::view(bytes) })
    }
}

fn to_js<T: Serialize + ?Sized>(value: &T) -> JsValue {
    // JSON-compatible: maps become plain objects, not Map.
    let ser = serde_wasm_bindgen::Serializer::json_compatible();
    value.serialize(&ser).unwrap_or(JsValue::UNDEFINED)
}

fn err(e: crate::Error) -> JsError {
    JsError::new(&e.to_string())
}

/// A plain options object into `T` (undefined/null: the defaults). serde_wasm_bindgen reads only
/// the fields it knows, so a misspelt option would pass silently: unknown keys are refused here.
fn options<T: for<'de> Deserialize<'de> + Default>(value: JsValue, what: &str, known: &[&str]) -> Result<T, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    if !value.is_object() || value.is_instance_of::<js_sys::Map>() {
        return Err(JsError::new(&format!("{what} options: expected a plain object")));
    }
    let keys = js_sys::Object::keys(value.unchecked_ref::<js_sys::Object>());
    let unknown: Vec<String> = keys.iter().filter_map(|k| k.as_string()).filter(|k| !known.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        return Err(JsError::new(&format!("{what} options: unknown {} (known: {})", unknown.join(", "), known.join(", "))));
    }
    serde_wasm_bindgen::from_value(value).map_err(|e| JsError::new(&format!("{what} options: {e}")))
}

const LOAD_KEYS: &[&str] = &["fold_constants", "optimize", "int8_kernels", "fused_ops", "sha256", "threads"];
const GENERATE_KEYS: &[&str] = &["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                                 "stop", "ignore_eos", "chat"];

#[derive(Deserialize)]
#[serde(default)]
struct LoadOptions {
    fold_constants: bool,
    optimize: bool,
    /// Our int8 kernels for dynamic-quantization files (false: tract's integer matmul).
    int8_kernels: bool,
    /// Our attention products and GELU (fused/) (false: tract's ops).
    fused_ops: bool,
    /// File name -> sha256 (hex) the caller computed with WebCrypto: compared with the manifest
    /// instead of hashing again in wasm (the sizes are checked all the same).
    sha256: std::collections::HashMap<String, String>,
    /// More than 1: the threaded build only, after `startThreads(threads - 1)`; the others refuse it.
    threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let p = Prepare::default();
        LoadOptions {
            fold_constants: p.fold_constants,
            optimize: p.optimize,
            int8_kernels: p.int8_kernels,
            fused_ops: p.fused_ops,
            sha256: Default::default(),
            threads: 1,
        }
    }
}

impl LoadOptions {
    fn prepare(&self) -> Prepare {
        Prepare {
            fold_constants: self.fold_constants,
            optimize: self.optimize,
            int8_kernels: self.int8_kernels,
            fused_ops: self.fused_ops,
            threads: self.threads.max(1),
            ..Prepare::default()
        }
    }
}

/// A loaded model: its graph optimized once, its tokenizer. Sessions are made from it.
#[wasm_bindgen(js_name = Engine)]
pub struct JsEngine {
    inner: Rc<Engine>,
}

#[wasm_bindgen(js_class = Engine)]
impl JsEngine {
    /// From a bundle: manifest.json's text, the ONNX file's name in it and its bytes: a
    /// [`JsModelFile`] written as it downloaded (spent here), or a `Uint8Array` (an `Array` of
    /// them, the file's parts in order; read in chunks: never whole in wasm memory,
    /// src/js_bytes.rs),
    /// tokenizer.json's bytes. Sizes and sha256 are checked against the manifest (options:
    /// `{sha256: {name: hex}}` gives digests already computed, e.g. by WebCrypto).
    #[wasm_bindgen(js_name = fromBundle)]
    pub fn from_bundle(
        manifest_json: &str,
        onnx_name: &str,
        onnx: JsValue,
        tokenizer_json: &[u8],
        load_options: JsValue,
    ) -> Result<JsEngine, JsError> {
        let opts: LoadOptions = options(load_options, "load", LOAD_KEYS)?;
        let manifest = Manifest::from_json(manifest_json).map_err(err)?;
        let digest = |name: &str| opts.sha256.get(name).map(String::as_str);
        let engine = Engine::from_bytes_hashed(&manifest, onnx_name, onnx_bytes(onnx)?, tokenizer_json, opts.prepare(),
                                               digest(onnx_name), digest("tokenizer.json"))
            .map_err(err)?;
        Ok(JsEngine { inner: Rc::new(engine) })
    }

    /// A user's own ONNX file and tokenizer.json (tokenizer_config.json optional: chat template
    /// and EOS; `chat_template` optional: a chat_template.jinja's text, which takes precedence),
    /// without a manifest; `context` bounds prompt + generated tokens. `external`: the
    /// side files of its external data, if it has any (`[{name, bytes}]`, names as the file
    /// gives them, e.g. "model.onnx_data").
    #[wasm_bindgen(js_name = fromUserFiles)]
    #[allow(clippy::too_many_arguments)] // the JavaScript call's own, one per thing a user picks
    pub fn from_user_files(
        name: &str,
        onnx: JsValue,
        tokenizer_json: &[u8],
        tokenizer_config: Option<Vec<u8>>,
        chat_template: Option<String>,
        context: f64,
        load_options: JsValue,
        external: JsValue,
    ) -> Result<JsEngine, JsError> {
        // a number, not usize: wasm-bindgen would wrap a negative one to ~4.29e9
        if !(context.fract() == 0.0 && (1.0..=u32::MAX as f64).contains(&context)) {
            return Err(JsError::new(&format!("the context must be a whole number of tokens from 1, not {context}")));
        }
        let context = context as usize;
        let opts: LoadOptions = options(load_options, "load", LOAD_KEYS)?;
        let onnx = WithExternal { onnx: onnx_bytes(onnx)?, files: side_files(external)? };
        if crate::graph::OnnxBytes::len(&onnx) > MAX_WASM_FILE {
            return Err(JsError::new(&format!(
                "the ONNX file and its external data are {:.2} GiB: the WebAssembly engine takes up to {:.1} GiB; \
                 run it natively, or use a smaller (quantized) file",
                crate::graph::OnnxBytes::len(&onnx) as f64 / (1u64 << 30) as f64, MAX_WASM_FILE as f64 / (1u64 << 30) as f64)));
        }
        let engine = Engine::from_user_files(name, onnx, tokenizer_json, tokenizer_config.as_deref(), chat_template.as_deref(), context, opts.prepare())
            .map_err(err)?;
        Ok(JsEngine { inner: Rc::new(engine) })
    }

    /// What was loaded: model, file, bytes, precision, preset, cache, load_ms, nodes, layout, plus
    /// has_chat_template, eos_ids and context.
    #[wasm_bindgen(getter)]
    pub fn info(&self) -> JsValue {
        let e = &self.inner;
        let mut v = serde_json::to_value(&e.info).unwrap_or_default();
        v["has_chat_template"] = e.text.has_chat_template().into();
        v["eos_ids"] = serde_json::json!(e.eos_ids);
        v["context"] = e.context.into();
        v["has_cache"] = e.graph.conv.has_cache().into();
        to_js(&v)
    }

    pub fn session(&self) -> Result<JsSession, JsError> {
        let session = self.inner.session().map_err(err)?;
        Ok(JsSession { engine: self.inner.clone(), session, generation: None })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, JsError> {
        self.inner.text.encode(text).map_err(err)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, JsError> {
        self.inner.text.decode(ids).map_err(err)
    }

    /// The bench prompt of the native protocol: the first 32 tokens of the text's first 2,000
    /// characters.
    #[wasm_bindgen(js_name = benchPrompt)]
    pub fn bench_prompt(&self, text: &str) -> Result<Vec<u32>, JsError> {
        bench::prompt_ids(&self.inner, text).map_err(err)
    }

    /// One run of the bench protocol (greedy, exactly 64 new tokens, EOS ignored) on a fresh
    /// session: {prefill_ms, steps_ms: [63 decode steps]}. The page calls it once for the warm-up
    /// and once per measured run, so progress and cancel get through between runs.
    #[wasm_bindgen(js_name = benchRun)]
    pub fn bench_run(&self, prompt: &[u32]) -> Result<JsValue, JsError> {
        let (prefill, steps) = bench::one_run(&self.inner, prompt).map_err(err)?;
        Ok(to_js(&serde_json::json!({ "prefill_ms": prefill, "steps_ms": steps })))
    }

    /// Decode time per op (bench::profile): the bench prompt, then `steps` (default 32) greedy
    /// steps with every node of the plan timed. {steps, threads, wall_ms_per_token,
    /// ops_ms_per_token, ops: [{op, ms_per_token, calls_per_token, share}]}, largest first.
    #[wasm_bindgen(js_name = benchProfile)]
    pub fn bench_profile(&self, prompt: &[u32], steps: Option<usize>) -> Result<JsValue, JsError> {
        let p = bench::profile(&self.inner, prompt, steps.unwrap_or(bench::PROFILE_STEPS)).map_err(err)?;
        Ok(to_js(&p))
    }

    /// Prefill time per op (bench::profile_prefill): `prompt` fed at once `rounds` times
    /// (default 3) after a warm-up one, each time to a fresh session or, with `past`, to a copy
    /// of a session that holds it (a chat's next turn), every node of the plan timed. {tokens,
    /// past, rounds, threads, wall_ms, ops_ms, ops: [{op, ms, calls, share}]}, per prefill.
    #[wasm_bindgen(js_name = benchProfilePrefill)]
    pub fn bench_profile_prefill(&self, prompt: &[u32], rounds: Option<usize>, past: Option<Vec<u32>>) -> Result<JsValue, JsError> {
        let p = bench::profile_prefill(&self.inner, past.as_deref().unwrap_or(&[]), prompt, rounds.unwrap_or(3)).map_err(err)?;
        Ok(to_js(&p))
    }

    /// How decode and prefill hold as the context grows (bench::context_sweep, as `wasmlm
    /// context` runs it natively), one step at a time: `steps`, `label(i)`, `step(i)` in order,
    /// then `result()`: {decode: [{past, ms_per_token, ratio_to_32}], prefill: [{tokens,
    /// tokens_per_s}], prefill_512_chunked, second_turn}. Tens of seconds per round.
    #[wasm_bindgen(js_name = contextSweep)]
    pub fn context_sweep(&self, text: &str, rounds: Option<usize>) -> Result<JsContextSweep, JsError> {
        let sweep = bench::Sweep::new(&self.inner, text, rounds.unwrap_or(1)).map_err(err)?;
        Ok(JsContextSweep { engine: self.inner.clone(), sweep })
    }

    /// Memory read bandwidth at 1 thread and at this engine's threads (bench::membw, as `wasmlm
    /// membw` runs it natively): what a second worker adds to what a decode step can read.
    /// {mib, threads, rounds: [[one, many]], one, many, ratio} in GB/s, and `grew_mib`: how much
    /// wasm memory grew for the buffer (up to `mib`; it never shrinks). An error with one
    /// thread.
    pub fn membw(&self, mib: usize, rounds: usize) -> Result<JsValue, JsError> {
        let threads = self.inner.graph.threads;
        if threads < 2 {
            return Err(JsError::new("the bandwidth probe compares 1 thread with the engine's threads: load the threaded build with 2 or more"));
        }
        let pages = || core::arch::wasm32::memory_size::<0>();
        let before = pages();
        let m = bench::membw(mib, rounds, threads).map_err(err)?;
        let mut v = serde_json::to_value(&m).map_err(|e| JsError::new(&e.to_string()))?;
        v["grew_mib"] = serde_json::json!((pages() - before) * 65536 / (1 << 20));
        Ok(to_js(&v))
    }

    /// A row in baselines.json's format from the measured runs ([{prefill_ms, steps_ms}], the
    /// warm-up excluded), summarized exactly as the native bench does.
    #[wasm_bindgen(js_name = benchRow)]
    pub fn bench_row(&self, runs: JsValue, prompt_tokens: usize, backend: &str) -> Result<JsValue, JsError> {
        #[derive(Deserialize)]
        struct Run {
            prefill_ms: f64,
            steps_ms: Vec<f64>,
        }
        let runs: Vec<Run> = serde_wasm_bindgen::from_value(runs).map_err(|e| JsError::new(&format!("bench runs: {e}")))?;
        let results: Vec<(f64, Vec<f64>)> = runs.into_iter().map(|r| (r.prefill_ms, r.steps_ms)).collect();
        let mut row = bench::base_row(&self.inner, backend, prompt_tokens, self.inner.graph.threads);
        bench::add_runs(&mut row, &results);
        Ok(to_js(&row))
    }
}

/// A context sweep run one step at a time (`Engine.contextSweep`).
#[wasm_bindgen(js_name = ContextSweep)]
pub struct JsContextSweep {
    engine: Rc<Engine>,
    sweep: bench::Sweep,
}

#[wasm_bindgen(js_class = ContextSweep)]
impl JsContextSweep {
    #[wasm_bindgen(getter)]
    pub fn steps(&self) -> usize {
        self.sweep.steps()
    }

    /// What step `i` measures.
    pub fn label(&self, i: usize) -> String {
        self.sweep.label(i)
    }

    /// Run step `i` (steps run in order).
    pub fn step(&mut self, i: usize) -> Result<(), JsError> {
        self.sweep.step(&self.engine, i).map_err(err)
    }

    /// The medians of the steps run so far.
    pub fn result(&self) -> JsValue {
        to_js(&self.sweep.result(&self.engine))
    }
}

/// The KV-cache handle: one conversation's state inside the engine.
#[wasm_bindgen(js_name = Session)]
pub struct JsSession {
    engine: Rc<Engine>,
    session: Session,
    generation: Option<Generation>,
}

#[wasm_bindgen(js_class = Session)]
impl JsSession {
    /// Start a generation: empties the cache, tokenizes the prompt (through the chat template
    /// when options.chat), runs the prefill and returns the first token event
    /// {id, text, ms, prefill: true}, or undefined if generation stopped at once.
    /// Options: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos, chat.
    pub fn prefill(&mut self, prompt: &str, generate_options: JsValue) -> Result<JsValue, JsError> {
        self.begin(prompt, generate_options)?;
        self.session.reset();
        self.next()
    }

    /// The next token event {id, text, ms, prefill: false}, or undefined once stopped.
    #[allow(clippy::should_implement_trait)] // JavaScript's name for it; no Rust caller iterates
    pub fn next(&mut self) -> Result<JsValue, JsError> {
        let generation = self.generation.as_mut().ok_or_else(|| JsError::new("call prefill() first"))?;
        match generation.next(&self.engine, &mut self.session).map_err(err)? {
            Some(event) => Ok(to_js(&event)),
            None => Ok(JsValue::UNDEFINED),
        }
    }

    /// Feed the next at most `chunk` tokens of the generation's prefill: returns {fed, of}, or
    /// undefined once the prefill is done (then `next()` gives the first token). Optional:
    /// `next()` runs whatever is left of it; a caller feeds it in chunks to stay responsive and
    /// to stop in the middle (the cache then holds what was fed).
    #[wasm_bindgen(js_name = prefillStep)]
    pub fn prefill_step(&mut self, chunk: usize) -> Result<JsValue, JsError> {
        let generation = self.generation.as_mut().ok_or_else(|| JsError::new("start a generation first"))?;
        match generation.prefill_step(&mut self.session, chunk).map_err(err)? {
            Some((fed, of)) => Ok(to_js(&serde_json::json!({"fed": fed, "of": of}))),
            None => Ok(JsValue::UNDEFINED),
        }
    }

    /// The current generation's timing summary (the engine's, as the CLI prints it):
    /// {prompt_tokens, new_tokens, ttft_ms, decode_ms_median, decode_ms_p90, tokens_per_s}.
    #[wasm_bindgen(getter)]
    pub fn stats(&self) -> JsValue {
        self.generation.as_ref().map(|g| to_js(&g.stats())).unwrap_or(JsValue::UNDEFINED)
    }

    /// Why the generation stopped ("Eos", "StopString", "MaxTokens", "ContextFull"), if it has.
    #[wasm_bindgen(getter, js_name = stopReason)]
    pub fn stop_reason(&self) -> Option<String> {
        self.generation.as_ref()?.stopped.map(|s| format!("{s:?}"))
    }

    /// Tokens of the prompt being generated from.
    #[wasm_bindgen(getter, js_name = promptTokens)]
    pub fn prompt_tokens(&self) -> usize {
        self.generation.as_ref().map(|g| g.prompt_tokens()).unwrap_or(0)
    }

    /// Tokens in the cache.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> usize {
        self.session.len()
    }

    /// The tokens the cache holds, in order.
    #[wasm_bindgen(getter)]
    pub fn tokens(&self) -> Vec<u32> {
        self.session.tokens().to_vec()
    }

    /// The tokens the current generation's prefill ran (a chat's new turn: only those the cache
    /// did not hold), once its first token is out.
    #[wasm_bindgen(getter, js_name = fedTokens)]
    pub fn fed_tokens(&self) -> Option<usize> {
        self.generation.as_ref()?.fed_tokens()
    }

    /// Feed text (tokenized as is) or token ids (an array or Uint32Array) after what the cache
    /// holds; returns how many tokens were fed. Refused past the context, the cache intact.
    pub fn append(&mut self, input: JsValue) -> Result<usize, JsError> {
        let ids = match input.as_string() {
            Some(text) => self.engine.text.encode(&text).map_err(err)?,
            None => serde_wasm_bindgen::from_value::<Vec<u32>>(input)
                .map_err(|e| JsError::new(&format!("append: expected text or token ids ({e})")))?,
        };
        self.generation = None;
        self.session.prefill(&ids).map_err(err)?;
        Ok(ids.len())
    }

    /// Start a generation that continues from the cache: the prompt (empty: none) is fed after
    /// what the cache holds; returns the first token event, like `prefill`.
    pub fn generate(&mut self, prompt: &str, generate_options: JsValue) -> Result<JsValue, JsError> {
        self.begin(prompt, generate_options)?;
        self.next()
    }

    /// `generate` without running anything yet: tokenizes and checks the options; then
    /// `prefillStep(chunk)` (optional, to feed the prompt in chunks) and `next()`.
    pub fn begin(&mut self, prompt: &str, generate_options: JsValue) -> Result<(), JsError> {
        let opts: GenerateOptions = options(generate_options, "generate", GENERATE_KEYS)?;
        self.generation = Some(Generation::new(&self.engine, prompt, opts).map_err(err)?);
        Ok(())
    }

    /// `chat` without running anything yet (see `begin`).
    #[wasm_bindgen(js_name = beginChat)]
    pub fn begin_chat(&mut self, messages: JsValue, generate_options: JsValue) -> Result<(), JsError> {
        let messages: Vec<Message> = serde_wasm_bindgen::from_value(messages)
            .map_err(|e| JsError::new(&format!("chat: expected messages [{{role, content}}] ({e})")))?;
        let opts: GenerateOptions = options(generate_options, "generate", GENERATE_KEYS)?;
        self.generation = Some(Generation::chat(&self.engine, &messages, opts).map_err(err)?);
        Ok(())
    }

    /// The assistant's next turn of `messages` ([{role, content}], through the chat template):
    /// the cache keeps what it shares with the conversation and runs only the rest (`fedTokens`
    /// says how many). Returns the first token event, like `prefill`.
    pub fn chat(&mut self, messages: JsValue, generate_options: JsValue) -> Result<JsValue, JsError> {
        self.begin_chat(messages, generate_options)?;
        self.next()
    }

    /// Keep only the first `n` tokens of the cache.
    pub fn truncate(&mut self, n: usize) -> Result<(), JsError> {
        self.generation = None;
        self.session.truncate(n).map_err(err)
    }

    /// An independent copy of this session's cache (no generation in progress).
    pub fn fork(&self) -> JsSession {
        JsSession { engine: self.engine.clone(), session: self.session.fork(), generation: None }
    }

    /// The cache as bytes (a versioned format tied to the model file's sha256; src/session.rs).
    pub fn snapshot(&self) -> Result<Vec<u8>, JsError> {
        self.session.snapshot().map_err(err)
    }

    /// Load a `snapshot()` in place of the cache; refused, the cache intact, for another model
    /// file or damaged bytes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), JsError> {
        self.session.restore(bytes).map_err(err)?;
        self.generation = None;
        Ok(())
    }

    /// Empty the cache and forget the generation.
    pub fn reset(&mut self) {
        self.session.reset();
        self.generation = None;
    }
}
