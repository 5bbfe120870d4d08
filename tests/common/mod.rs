//! Helpers for the engine's tests: tiny bundles made by the model pipeline (Python, in the
//! tests' venv with PyTorch that build.sh sets up), and references from ONNX Runtime on the same
//! files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python(args: &[&str]) -> String {
    // the tests' venv: the tiny models are traced in PyTorch
    let py = repo().join("models/.venv-torch/bin/python");
    assert!(py.exists(), "{} is missing: ./build.sh test sets it up", py.display());
    let out = Command::new(py)
        .args(["-m", "wasmlm_models"])
        .args(args)
        .current_dir(repo().join("models"))
        .output()
        .expect("python runs");
    assert!(out.status.success(), "python {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// build/models/<reference>, built (or found up to date) by the Python pipeline, once a process.
pub fn bundle(reference: &str) -> PathBuf {
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    let out = repo().join("build/models").join(reference);
    if !checked.iter().any(|r| r == reference) {
        // Test processes run in parallel (nextest): one builds, the others wait for it.
        std::fs::create_dir_all(repo().join("build/models")).unwrap();
        let lock = std::fs::File::create(repo().join("build/models/.test-lock")).unwrap();
        lock.lock().unwrap();
        python(&["bundle", reference, "--out", out.to_str().unwrap()]);
        lock.unlock().unwrap();
        checked.push(reference.to_string());
    }
    out
}

/// build/test/nbits/<reference>: ONNX Runtime's MatMulNBits forms of the bundle's FP32 with-past
/// file (its own quantizer, `python -m wasmlm_models nbits`), as a bundle of their own, made once
/// a process. `forms`: bits:block[:asym].
pub fn nbits_bundle(reference: &str, forms: &[&str]) -> PathBuf {
    let src = bundle(reference);
    let out = repo().join("build/test/nbits").join(reference);
    let key = format!("nbits {reference} {forms:?}");
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(&key) {
        let lock = std::fs::File::create(repo().join("build/models/.test-lock")).unwrap();
        lock.lock().unwrap();
        let mut args = vec!["nbits", src.to_str().unwrap(), "--out", out.to_str().unwrap(), "--form"];
        args.extend(forms);
        python(&args);
        lock.unlock().unwrap();
        checked.push(key);
    }
    out
}

/// ONNX Runtime's last-position logits (prefill, then `decode` steps) and `greedy` tokens.
pub fn reference(bundle: &Path, file: &str, prompt: &[u32], decode: usize, greedy: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut args = vec!["reference".to_string(), bundle.display().to_string(), "--file".into(), file.into(),
                        "--decode".into(), decode.to_string(), "--greedy".into(), greedy.to_string(), "--prompt".into()];
    args.extend(prompt.iter().map(|t| t.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let v: Value = serde_json::from_str(&python(&args)).unwrap();
    let logits = v["logits"].as_array().unwrap().iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let greedy = v["greedy"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    (logits, greedy)
}

/// The Python tokenizers library's ids for the first `chars` characters of tinyshakespeare.
pub fn python_tokenize(bundle: &Path, chars: usize) -> (Vec<u32>, String) {
    let v: Value = serde_json::from_str(&python(&["tokenize", bundle.to_str().unwrap(), "--chars", &chars.to_string()])).unwrap();
    let ids = v["ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    (ids, v["decoded"].as_str().unwrap().to_string())
}

pub fn shakespeare() -> String {
    std::fs::read_to_string(repo().join("models/data/tinyshakespeare.txt")).expect("models/data/tinyshakespeare.txt")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Engine logits for the same protocol as `reference`: prefill, then greedy steps.
pub fn engine_run(engine: &wasmlm::Engine, prompt: &[u32], decode: usize, greedy: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    wasmlm::bench::greedy_trace(engine, prompt, decode, greedy).unwrap()
}

pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub fn matching(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

/// Feed `forced` tokens after the prompt and return the engine's argmax before each of them
/// (teacher forcing: one disagreement does not change every later context).
pub fn engine_forced(engine: &wasmlm::Engine, prompt: &[u32], forced: &[u32]) -> Vec<u32> {
    let mut session = engine.session().unwrap();
    let mut logits = session.prefill(prompt).unwrap();
    let mut out = vec![];
    for &t in forced {
        out.push(wasmlm::sampler::argmax(&logits));
        logits = session.step(t).unwrap();
    }
    out
}

/// build/test/hub/wasmlm-test/<reference>[-external]: the bundle laid out as a transformers.js
/// repository (`python -m wasmlm_models hub-layout`), made once a process. Returns (the folder
/// that plays the hub's root, the repository id).
pub fn hub_layout(reference: &str, external: bool) -> (PathBuf, String) {
    let src = bundle(reference);
    let root = repo().join("build/test/hub");
    let id = format!("wasmlm-test/{reference}{}", if external { "-external" } else { "" });
    let key = format!("hub {id}");
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(&key) {
        let lock = std::fs::File::create(repo().join("build/models/.test-lock")).unwrap();
        lock.lock().unwrap();
        let out = root.join(&id);
        let mut args = vec!["hub-layout", src.to_str().unwrap(), "--out", out.to_str().unwrap()];
        if external {
            args.push("--external");
        }
        python(&args);
        lock.unlock().unwrap();
        checked.push(key);
    }
    (root, id)
}

/// build/test/matrix: the compatibility matrix's files (`python -m wasmlm_models matrix`: tiny
/// random decoders by family, exporter and form, with ONNX Runtime's greedy tokens on each), made
/// once (the index is reused while its inputs are unchanged). Returns the folder.
pub fn matrix() -> PathBuf {
    let tokenizer = bundle("tiny-llama");
    let out = repo().join("build/test/matrix");
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.iter().any(|k| k == "matrix") {
        let lock = std::fs::File::create(repo().join("build/models/.test-lock")).unwrap();
        lock.lock().unwrap();
        python(&["matrix", "--out", out.to_str().unwrap(), "--tokenizer", tokenizer.to_str().unwrap()]);
        lock.unlock().unwrap();
        checked.push("matrix".into());
    }
    out
}
