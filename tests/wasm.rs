//! The WebAssembly build in Node (wasm-bindgen-test): the same greedy tokens as the native engine
//! and ONNX Runtime on the tiny models, through the JS surface (src/wasm.rs), and bad bytes give
//! an error, not a panic. Run by `./build.sh test` for each wasm build (SIMD128 and without SIMD),
//! after it wrote the expectations:
//!   build/wasm-test/<model>/<file>.ort.json     ONNX Runtime: {logits, greedy}   (wasmlm_models reference)
//!   build/wasm-test/<model>/<file>.native.json  native engine: {logits, tokens}  (wasmlm trace)
//! WASMLM_ROOT (the repository) tells the test where they and the bundles are.
#![cfg(target_arch = "wasm32")]

use serde_json::Value;
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;
use wasmlm::wasm::{JsEngine, JsModelFile, JsSession};
use wasmlm::{bench, Engine, Manifest, Prepare};

#[path = "common/wasm_kernels.rs"]
mod wasm_kernels;

#[wasm_bindgen(module = "fs")]
extern "C" {
    #[wasm_bindgen(js_name = readFileSync, catch)]
    fn read_file_sync(path: &str) -> Result<js_sys::Uint8Array, JsValue>;
}

const PROMPT: [u32; 7] = [510, 2317, 314, 260, 3575, 282, 4649];
const FILES: [&str; 3] = ["model.with_past.onnx", "model.with_past.int8.onnx", "model.with_past.ort-dynamic-qint8.onnx"];

fn root() -> String {
    let env = js_sys::Reflect::get(&js_sys::global(), &"process".into())
        .and_then(|p| js_sys::Reflect::get(&p, &"env".into()))
        .expect("process.env (these tests run in Node)");
    js_sys::Reflect::get(&env, &"WASMLM_ROOT".into())
        .ok()
        .and_then(|v| v.as_string())
        .expect("WASMLM_ROOT: the repository's path (./build.sh test sets it)")
}

fn read(path: &str) -> Vec<u8> {
    read_file_sync(path).unwrap_or_else(|e| panic!("{path}: {e:?} (run ./build.sh test)")).to_vec()
}

/// Bytes as the page hands them to the engine.
fn u8a(bytes: &[u8]) -> JsValue {
    js_sys::Uint8Array::from(bytes).into()
}

/// The bytes as the page holds a file served in parts: an `Array` of `Uint8Array`s.
fn parts(bytes: &[u8], cuts: &[usize]) -> JsValue {
    let array = js_sys::Array::new();
    let mut from = 0;
    for &cut in cuts.iter().chain([bytes.len()].iter()) {
        array.push(&js_sys::Uint8Array::from(&bytes[from..cut]));
        from = cut;
    }
    array.into()
}

fn json(path: &str) -> Value {
    serde_json::from_slice(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// A plain JS object, as a page passes (serde_wasm_bindgen's default would make a Map).
fn js(v: &Value) -> JsValue {
    use serde::Serialize;
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Bundle {
    dir: String,
    manifest_text: String,
    tokenizer: Vec<u8>,
}

fn bundle(model: &str) -> Bundle {
    let dir = format!("{}/build/models/{model}", root());
    let manifest_text = String::from_utf8(read(&format!("{dir}/manifest.json"))).unwrap();
    let tokenizer = read(&format!("{dir}/tokenizer.json"));
    Bundle { dir, manifest_text, tokenizer }
}

/// Logits and tokens of the wasm engine against the native engine's and ONNX Runtime's.
fn parity(model: &str) {
    let b = bundle(model);
    let manifest = Manifest::from_json(&b.manifest_text).unwrap();
    for file in FILES {
        let expect = format!("{}/build/wasm-test/{model}/{file}", root());
        let (ort, native) = (json(&format!("{expect}.ort.json")), json(&format!("{expect}.native.json")));
        assert_eq!(ids(&native["prompt"]), PROMPT.to_vec());
        let onnx = read(&format!("{}/{file}", b.dir));
        let engine = Engine::from_bytes(&manifest, file, onnx.clone(), &b.tokenizer, Prepare::default()).unwrap();
        // INT8 files run on our int8 kernels, this build's own (scalar without SIMD), every
        // product on the same one
        let kernels = engine.info.int8_kernels.clone().unwrap_or_default();
        let want = match (file, cfg!(target_feature = "simd128")) {
            ("model.with_past.onnx", _) => "",
            ("model.with_past.ort-dynamic-qint8.onnx", true) if cfg!(feature = "relaxed-simd") => "relaxed-simd",
            (_, true) => "simd128",
            _ => "scalar",
        };
        assert!(kernels.contains(want) && kernels.is_empty() == want.is_empty(), "{model} {file}: int8 kernels {kernels:?}");
        if !want.is_empty() {
            assert!(!kernels.contains(','), "{model} {file}: every product on one kernel, found {kernels:?}");
        }
        let (logits, tokens) = bench::greedy_trace(&engine, &PROMPT, 3, 32).unwrap();
        // Same engine, same graph: only SIMD vs native summation order may differ.
        let (native_logits, native_tokens) = (rows(&native["logits"]), ids(&native["tokens"]));
        for (step, (a, n)) in logits.iter().zip(&native_logits).enumerate() {
            let d = max_abs_diff(a, n);
            assert!(d < 1e-4, "{model} {file} step {step}: wasm vs native logits differ by {d}");
        }
        assert_eq!(tokens, native_tokens, "{model} {file}: wasm vs native greedy tokens");
        // And against ONNX Runtime, with the native tests' bounds (tests/parity.rs).
        let tolerance = if file.contains("ort-dynamic-qint8") { 0.02 } else { 1e-4 };
        for (step, (a, o)) in logits.iter().zip(&rows(&ort["logits"])).enumerate() {
            let range = o.iter().cloned().fold(f32::MIN, f32::max) - o.iter().cloned().fold(f32::MAX, f32::min);
            let d = max_abs_diff(a, o);
            assert!(d <= tolerance * range.max(1.0), "{model} {file} step {step}: wasm vs ORT {d}");
        }
        if !file.contains("ort-dynamic-qint8") {
            assert_eq!(tokens, ids(&ort["greedy"]), "{model} {file}: wasm vs ORT greedy tokens");
        }
    }
}

/// This build's integer kernels equal the scalar one, and its `q8b32` block kernels an f64
/// reference (the native unit tests' checks, run here on the kernels only wasm has: SIMD128,
/// and relaxed SIMD in the relaxed build).
#[wasm_bindgen_test]
fn int8_kernels_equal_the_scalar_one() {
    assert_eq!(wasmlm::qmatmul::kernel::check_kernels().unwrap(), wasm_kernels::expected());
    assert_eq!(wasmlm::qmatmul::blockq8::check_block_kernels().unwrap(), wasm_kernels::expected_block());
}

/// The attention op's SIMD128 loops (scores, softmax, the values' sum, a prefill's products)
/// give the portable loops' bits.
#[wasm_bindgen_test]
fn attention_loops_equal_the_portable_ones() {
    let want: &[&str] = if cfg!(target_feature = "simd128") { &["simd128 scores", "simd128 mix", "simd128 softmax", "simd128 tiles"] } else { &[] };
    assert_eq!(wasmlm::fused::rows::check().unwrap(), want);
}

#[wasm_bindgen_test]
fn same_tokens_as_native_and_onnxruntime_gpt2() {
    parity("tiny-gpt2");
}

#[wasm_bindgen_test]
fn same_tokens_as_native_and_onnxruntime_llama_gqa() {
    parity("tiny-llama");
}

/// The JS surface: prefill + next, one call per token, gives the native greedy tokens; timings
/// are measured inside the engine and positive.
#[wasm_bindgen_test]
fn js_surface_streams_the_native_tokens() {
    let b = bundle("tiny-llama");
    let file = "model.with_past.int8.onnx";
    let native = json(&format!("{}/build/wasm-test/tiny-llama/{file}.native.json", root()));
    let engine = JsEngine::from_bundle(&b.manifest_text, file, u8a(&read(&format!("{}/{file}", b.dir))), &b.tokenizer,
                                       JsValue::UNDEFINED).map_err(JsValue::from).unwrap();
    let mut session: JsSession = engine.session().map_err(JsValue::from).unwrap();
    // The native trace starts from PROMPT's ids; the surface takes text, so decode them first.
    let prompt = engine.decode(&PROMPT).map_err(JsValue::from).unwrap();
    assert_eq!(engine.encode(&prompt).map_err(JsValue::from).unwrap(), PROMPT.to_vec(), "prompt round trip");
    let opts = js(&serde_json::json!({"max_new_tokens": 16, "ignore_eos": true}));
    let mut ev = session.prefill(&prompt, opts).map_err(JsValue::from).unwrap();
    let mut tokens = vec![];
    while !ev.is_undefined() {
        let e: Value = serde_wasm_bindgen::from_value(ev).unwrap();
        assert!(e["ms"].as_f64().unwrap() > 0.0, "per-token time {e}");
        assert_eq!(e["prefill"].as_bool().unwrap(), tokens.is_empty());
        tokens.push(e["id"].as_u64().unwrap() as u32);
        ev = session.next().map_err(JsValue::from).unwrap();
    }
    assert_eq!(tokens, ids(&native["tokens"])[..16].to_vec());
    assert_eq!(session.stop_reason().as_deref(), Some("MaxTokens"));
}

/// The ONNX file is read out of its parts (`Uint8Array`s) in chunks (src/js_bytes.rs): with
/// 997-byte chunks, boundaries fall inside every field and across parts. The sha256 computed through them must match the
/// manifest's, and the decoded graph must give the native greedy tokens.
#[wasm_bindgen_test]
fn onnx_read_in_small_chunks_gives_the_same_model() {
    let SiteFile { b, file, bytes, tokens, cuts } = site_file();
    // each chunk boundary falling elsewhere than the parts'
    wasmlm::js_bytes::set_chunk_bytes(997);
    let engine = JsEngine::from_bundle(&b.manifest_text, file, parts(&bytes, &cuts), &b.tokenizer, JsValue::UNDEFINED);
    wasmlm::js_bytes::set_chunk_bytes(4 << 20);
    let engine = engine.map_err(JsValue::from).unwrap();
    assert_eq!(greedy(&engine, 8), tokens);
}

/// tiny-llama's INT8 file as the loading tests take it: its bundle, name and bytes, the native
/// engine's first 8 greedy tokens, and where a site would cut it into parts (uneven, one empty).
struct SiteFile {
    b: Bundle,
    file: &'static str,
    bytes: Vec<u8>,
    tokens: Vec<u32>,
    cuts: [usize; 5],
}

fn site_file() -> SiteFile {
    let b = bundle("tiny-llama");
    let file = "model.with_past.int8.onnx";
    let native = json(&format!("{}/build/wasm-test/tiny-llama/{file}.native.json", root()));
    let bytes = read(&format!("{}/{file}", b.dir));
    let cuts = [1, 4096, 4096, bytes.len() / 3, bytes.len() - 7];
    SiteFile { b, file, tokens: ids(&native["tokens"])[..8].to_vec(), bytes, cuts }
}

/// `n` greedy tokens after PROMPT (as text), through the JS surface.
fn greedy(engine: &JsEngine, n: usize) -> Vec<u32> {
    let mut session: JsSession = engine.session().map_err(JsValue::from).unwrap();
    let prompt = engine.decode(&PROMPT).map_err(JsValue::from).unwrap();
    let opts = js(&serde_json::json!({"max_new_tokens": n, "ignore_eos": true}));
    let mut ev = session.prefill(&prompt, opts).map_err(JsValue::from).unwrap();
    let mut tokens = vec![];
    while !ev.is_undefined() {
        let e: Value = serde_wasm_bindgen::from_value(ev).unwrap();
        tokens.push(e["id"].as_u64().unwrap() as u32);
        ev = session.next().map_err(JsValue::from).unwrap();
    }
    tokens
}

fn js_message(e: JsError) -> String {
    let e = JsValue::from(e);
    js_sys::Reflect::get(&e, &"message".into()).unwrap().as_string().unwrap()
}

/// The page's way in: the file written into the engine's memory as it downloads
/// (src/file_parts.rs), the parts in any order and each in chunks. The engine built from it
/// gives the native greedy tokens. A ModelFile given to a second load, a part left unfinished, a
/// chunk past a part's size, a size that is not a whole number and a file above the engine's
/// limit are refused with their reason.
#[wasm_bindgen_test]
fn a_model_file_written_as_it_downloads_gives_the_same_model() {
    let SiteFile { b, file, bytes, tokens, cuts } = site_file();
    let bounds: Vec<usize> = [0].into_iter().chain(cuts).chain([bytes.len()]).collect();
    let sizes: Vec<f64> = bounds.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    let written = |unfinished: Option<usize>| -> JsModelFile {
        let mut f = JsModelFile::new(sizes.clone()).map_err(JsValue::from).unwrap();
        for i in (0..sizes.len()).rev() {
            let part = &bytes[bounds[i]..bounds[i + 1]];
            for chunk in part.chunks(997) {
                f.write(i, &js_sys::Uint8Array::from(chunk)).map_err(JsValue::from).unwrap();
            }
            if unfinished != Some(i) {
                f.finish(i).map_err(JsValue::from).unwrap();
            }
            assert_eq!(f.part(i).map_err(JsValue::from).unwrap().to_vec(), part, "part {i} as the page hashes it");
        }
        f
    };
    let model_file: JsValue = written(None).into();
    let engine = JsEngine::from_bundle(&b.manifest_text, file, model_file.clone(), &b.tokenizer, JsValue::UNDEFINED)
        .map_err(JsValue::from)
        .unwrap();
    assert_eq!(greedy(&engine, 8), tokens);
    // the load took it: a second load of the same JS object is refused
    let m = js_message(JsEngine::from_bundle(&b.manifest_text, file, model_file, &b.tokenizer, JsValue::UNDEFINED).err().unwrap());
    assert!(m.contains("or a ModelFile not yet given to a load"), "{m}");
    let m = js_message(JsEngine::from_bundle(&b.manifest_text, file, written(Some(3)).into(), &b.tokenizer, JsValue::UNDEFINED)
        .err()
        .unwrap());
    assert!(m.contains("part 3 of 6 is not finished"), "{m}");
    let mut f = JsModelFile::new(vec![3.0]).map_err(JsValue::from).unwrap();
    let m = js_message(f.write(0, &js_sys::Uint8Array::from(&[1u8, 2, 3, 4][..])).err().unwrap());
    assert!(m.contains("part 0 holds 3 bytes; 4 more would make 4"), "{m}");
    let m = js_message(JsModelFile::new(vec![2.5]).err().unwrap());
    assert!(m.contains("a part's size must be a whole number of bytes, not 2.5"), "{m}");
    let m = js_message(JsModelFile::new(vec![1e9, 1e9]).err().unwrap());
    assert!(m.contains("1.86 GiB") && m.contains("up to 1.5 GiB"), "{m}");
}

/// The benchmark mode's per-op profile through the JS surface: every product of the file is
/// timed once per step, and the ops' times add up to at most the steps' own.
#[wasm_bindgen_test]
fn bench_profile_times_every_product() {
    let b = bundle("tiny-gpt2");
    let file = "model.with_past.ort-dynamic-qint8.onnx";
    let engine = JsEngine::from_bundle(&b.manifest_text, file, u8a(&read(&format!("{}/{file}", b.dir))), &b.tokenizer,
                                       JsValue::UNDEFINED).map_err(JsValue::from).unwrap();
    let p: Value = serde_wasm_bindgen::from_value(engine.bench_profile(&PROMPT, Some(3)).map_err(JsValue::from).unwrap()).unwrap();
    let info: Value = serde_wasm_bindgen::from_value(engine.info()).unwrap();
    let kernels = info["int8_kernels"].as_str().unwrap();
    let products: f64 = kernels.split(" x ").next().unwrap().parse().unwrap();
    let ops = p["ops"].as_array().unwrap();
    let row = ops.iter().find(|o| o["op"] == "WasmlmDynQMatMul").unwrap_or_else(|| panic!("{p}"));
    assert_eq!(row["calls_per_token"].as_f64().unwrap(), products, "{kernels}");
    assert_eq!(p["steps"], 3);
    let (in_ops, wall) = (p["ops_ms_per_token"].as_f64().unwrap(), p["wall_ms_per_token"].as_f64().unwrap());
    assert!(in_ops > 0.0 && in_ops <= wall, "{p}");
}

/// Truncated ONNX bytes, a wrong hash and nonsense options are errors with the engine's message.
#[wasm_bindgen_test]
fn bad_input_is_an_error_not_a_panic() {
    let b = bundle("tiny-gpt2");
    let file = "model.with_past.onnx";
    let onnx = read(&format!("{}/{file}", b.dir));
    let message = |what: &str, r: Result<JsEngine, JsError>| -> String {
        let e: JsValue = r.err().unwrap_or_else(|| panic!("{what}: expected an error")).into();
        js_sys::Reflect::get(&e, &"message".into()).unwrap().as_string().unwrap()
    };
    // Right size, wrong content: the manifest check catches it.
    let mut corrupt = onnx.clone();
    corrupt[1000] ^= 0xff;
    let m = message("corrupt", JsEngine::from_bundle(&b.manifest_text, file, u8a(&corrupt), &b.tokenizer, JsValue::UNDEFINED));
    assert!(m.contains("sha256"), "{m}");
    // Truncated and without a manifest to catch it: tract's parser must fail cleanly.
    let m = message("truncated", JsEngine::from_user_files("cut.onnx", u8a(&onnx[..onnx.len() / 2]), &b.tokenizer, None, None, 64.0, JsValue::UNDEFINED, JsValue::UNDEFINED));
    assert!(m.contains("ONNX"), "{m}");
    let m = message("not onnx", JsEngine::from_user_files("x.onnx", u8a(b"not onnx at all"), &b.tokenizer, None, None, 64.0, JsValue::UNDEFINED, JsValue::UNDEFINED));
    assert!(m.contains("ONNX"), "{m}");
    // A context that is not a whole number of tokens from 1 (JS would pass -1 as 4294967295).
    for bad in [-1.0, 0.0, 2.5, f64::NAN] {
        let m = message("context", JsEngine::from_user_files("x.onnx", u8a(&onnx), &b.tokenizer, None, None, bad, JsValue::UNDEFINED, JsValue::UNDEFINED));
        assert!(m.contains("whole number of tokens"), "{bad}: {m}");
    }
    // Above the file size wasm32's memory can load: refused before a byte is read (25 views of
    // one 64 MiB buffer: 1.56 GiB)
    let big = js_sys::Uint8Array::new_with_length(64 << 20);
    let views = js_sys::Array::new();
    for _ in 0..25 {
        views.push(&big);
    }
    let m = message("too big", JsEngine::from_user_files("big.onnx", views.into(), &b.tokenizer, None, None, 64.0, JsValue::UNDEFINED, JsValue::UNDEFINED));
    assert!(m.contains("1.56 GiB") && m.contains("up to 1.5 GiB"), "{m}");
    // Not a Uint8Array (wasm-bindgen passes any JS value through).
    use wasm_bindgen::JsCast;
    let buffer: js_sys::Uint8Array = js_sys::Uint8Array::from(&onnx[..]).buffer().unchecked_into();
    let m = message("array buffer", JsEngine::from_bundle(&b.manifest_text, file, buffer.into(), &b.tokenizer, JsValue::UNDEFINED));
    assert!(m.contains("must be a Uint8Array"), "{m}");
    let mixed = js_sys::Array::of2(&js_sys::Uint8Array::from(&onnx[..10]), &JsValue::from(3));
    let m = message("array of non-bytes", JsEngine::from_bundle(&b.manifest_text, file, mixed.into(), &b.tokenizer, JsValue::UNDEFINED));
    assert!(m.contains("an Array of them"), "{m}");
    // Parts whose join is not the file: the manifest's sha256 catches a part left out.
    let m = message("part missing", JsEngine::from_bundle(&b.manifest_text, file, parts(&onnx[1000..], &[5000]), &b.tokenizer, JsValue::UNDEFINED));
    assert!(m.contains("bytes") || m.contains("sha256"), "{m}");
    let opts = js(&serde_json::json!({"fold_constants": "yes"}));
    let m = message("options", JsEngine::from_bundle(&b.manifest_text, file, u8a(&onnx), &b.tokenizer, opts));
    assert!(m.contains("load options"), "{m}");
    // A digest computed by the caller (WebCrypto in the page) is compared with the manifest too.
    let opts = js(&serde_json::json!({"sha256": {file: "00".repeat(32)}}));
    let m = message("wrong digest", JsEngine::from_bundle(&b.manifest_text, file, u8a(&onnx), &b.tokenizer, opts));
    assert!(m.contains("sha256 is 0000"), "{m}");
    let opts = js(&serde_json::json!({"fold_constant": false}));
    let m = message("misspelt option", JsEngine::from_bundle(&b.manifest_text, file, u8a(&onnx), &b.tokenizer, opts));
    assert!(m.contains("unknown fold_constant"), "{m}");
    // A user's own file that works: the cache layout comes from the graph itself.
    let engine = JsEngine::from_user_files("mine.onnx", u8a(&onnx), &b.tokenizer, None, None, 64.0, JsValue::UNDEFINED, JsValue::UNDEFINED)
        .map_err(JsValue::from)
        .unwrap();
    let mut session = engine.session().map_err(JsValue::from).unwrap();
    let long: String = "word ".repeat(100);
    let e: JsValue = session.prefill(&long, JsValue::UNDEFINED).err().expect("prompt too long").into();
    let m = js_sys::Reflect::get(&e, &"message".into()).unwrap().as_string().unwrap();
    assert!(m.contains("context is 64"), "{m}");
}

/// The cache handle through the JS surface: `append` then `generate("")` continues from the cache
/// with the native greedy tokens; a fork and a restored snapshot continue the same way; a
/// snapshot is refused by another file's session, which keeps its cache.
#[wasm_bindgen_test]
fn js_handle_appends_forks_and_restores() {
    let b = bundle("tiny-llama");
    let file = "model.with_past.int8.onnx";
    let native = json(&format!("{}/build/wasm-test/tiny-llama/{file}.native.json", root()));
    let want = ids(&native["tokens"])[..6].to_vec();
    let engine = JsEngine::from_bundle(&b.manifest_text, file, u8a(&read(&format!("{}/{file}", b.dir))), &b.tokenizer,
                                       JsValue::UNDEFINED).map_err(JsValue::from).unwrap();
    let opts = || js(&serde_json::json!({"max_new_tokens": 6, "ignore_eos": true}));
    let run = |s: &mut JsSession, first: JsValue| {
        let mut ev = first;
        let mut tokens = vec![];
        while !ev.is_undefined() {
            let e: Value = serde_wasm_bindgen::from_value(ev).unwrap();
            tokens.push(e["id"].as_u64().unwrap() as u32);
            ev = s.next().map_err(JsValue::from).unwrap();
        }
        tokens
    };
    let mut s: JsSession = engine.session().map_err(JsValue::from).unwrap();
    let fed = s.append(js(&serde_json::json!(PROMPT))).map_err(JsValue::from).unwrap();
    assert_eq!((fed, s.length(), s.tokens()), (7, 7, PROMPT.to_vec()));
    let mut fork = s.fork();
    let snapshot = s.snapshot().map_err(JsValue::from).unwrap();
    let first = s.generate("", opts()).map_err(JsValue::from).unwrap();
    assert_eq!(run(&mut s, first), want, "generate continuing from an appended cache");
    assert_eq!(s.fed_tokens(), Some(0));
    let first = fork.generate("", opts()).map_err(JsValue::from).unwrap();
    assert_eq!(run(&mut fork, first), want, "the fork, after its origin generated");
    let mut restored: JsSession = engine.session().map_err(JsValue::from).unwrap();
    restored.restore(&snapshot).map_err(JsValue::from).unwrap();
    let first = restored.generate("", opts()).map_err(JsValue::from).unwrap();
    assert_eq!(run(&mut restored, first), want, "a restored snapshot");
    restored.truncate(7).map_err(JsValue::from).unwrap();
    assert_eq!(restored.tokens(), PROMPT.to_vec());
    // a prompt fed in chunks (begin, prefillStep: what the page's worker does) gives what
    // generate gives, with its progress and the engine's statistics
    let text = "The quick brown fox jumps over the lazy dog, and then";
    let mut whole: JsSession = engine.session().map_err(JsValue::from).unwrap();
    let first = whole.generate(text, opts()).map_err(JsValue::from).unwrap();
    let want_text = run(&mut whole, first);
    let mut chunked: JsSession = engine.session().map_err(JsValue::from).unwrap();
    chunked.begin(text, opts()).map_err(JsValue::from).unwrap();
    let mut progress = vec![];
    loop {
        let p = chunked.prefill_step(3).map_err(JsValue::from).unwrap();
        if p.is_undefined() {
            break;
        }
        let p: Value = serde_wasm_bindgen::from_value(p).unwrap();
        progress.push((p["fed"].as_u64().unwrap() as usize, p["of"].as_u64().unwrap() as usize));
    }
    let n = chunked.prompt_tokens();
    assert!(n > 6 && progress.len() == n.div_ceil(3) && progress.last() == Some(&(n, n)), "{progress:?} of {n}");
    let first = chunked.next().map_err(JsValue::from).unwrap();
    assert_eq!(run(&mut chunked, first), want_text, "a chunked prefill");
    let stats: Value = serde_wasm_bindgen::from_value(chunked.stats()).unwrap();
    assert_eq!((stats["new_tokens"].as_u64(), stats["prompt_tokens"].as_u64()), (Some(6), Some(n as u64)), "{stats}");
    assert!(stats["ttft_ms"].as_f64().unwrap() > 0.0 && stats["decode_ms_median"].as_f64().unwrap() > 0.0, "{stats}");
    // another file of the same model refuses it and keeps its cache
    let other = "model.with_past.onnx";
    let engine2 = JsEngine::from_bundle(&b.manifest_text, other, u8a(&read(&format!("{}/{other}", b.dir))), &b.tokenizer,
                                        JsValue::UNDEFINED).map_err(JsValue::from).unwrap();
    let mut s2: JsSession = engine2.session().map_err(JsValue::from).unwrap();
    s2.append(js(&serde_json::json!([5, 6, 7]))).map_err(JsValue::from).unwrap();
    let e = s2.restore(&snapshot).map(|_| ()).map_err(JsValue::from).expect_err("another file");
    let message = js_sys::Error::from(e).message().as_string().unwrap();
    assert!(message.contains("another model file"), "{message}");
    assert_eq!(s2.tokens(), vec![5, 6, 7]);
}
