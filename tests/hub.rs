//! Loading by Hugging Face repository id (src/hub.rs), against a local server with the hub's URL
//! layout (`/<owner>/<name>/resolve/<revision>/<path>`) serving the tiny Llama bundle laid out as
//! a transformers.js repository.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use wasmlm::hub::{self, HubSource};
use wasmlm::{Engine, Prepare};

/// A static server for `root`; repositories whose name ends in "-cut" send only the first half of
/// each .onnx file (after announcing all of it). Returns the endpoint and a count of requests.
fn serve(root: PathBuf) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let root = root.clone();
            std::thread::spawn(move || answer(stream, &root));
        }
    });
    (endpoint, hits)
}

fn answer(mut stream: TcpStream, root: &Path) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
            break;
        }
    }
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let file = match parts[..] {
        [owner, name, "resolve", "main", rest] => Some((root.join(owner).join(name.trim_end_matches("-cut")).join(rest), name.ends_with("-cut"))),
        _ => None,
    };
    match file.and_then(|(f, cut)| Some((std::fs::read(f).ok()?, cut))) {
        Some((bytes, cut)) => {
            let sent = if cut && path.ends_with(".onnx") { &bytes[..bytes.len() / 2] } else { &bytes[..] };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.len());
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(sent));
        }
        None => {
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
        }
    }
}

/// An empty cache folder of this test's own.
fn cache(name: &str) -> PathBuf {
    let dir = repo().join("build/test/hub-cache").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn quiet() -> impl FnMut(&str, u64, Option<u64>) {
    |_: &str, _: u64, _: Option<u64>| {}
}

const PROMPT: [u32; 6] = [1, 504, 3458, 282, 4649, 314];

#[test]
fn a_repository_loads_its_dtype_once_then_from_the_cache_and_runs_the_same_bits() {
    let (root, id) = hub_layout("tiny-llama", false);
    let (endpoint, hits) = serve(root);
    let dir = cache("q8");
    let src = HubSource::new(&id, "q8", "main", &endpoint).unwrap();
    let mut progress_files = vec![];
    let fetched = hub::fetch(&src, &dir, &mut |p: &str, _, _| {
        if !progress_files.iter().any(|f| f == p) {
            progress_files.push(p.to_string());
        }
    }).unwrap();
    assert_eq!(progress_files, ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "onnx/model_quantized.onnx"]);
    let from_hub = hub::load(&fetched, None, Prepare::default()).unwrap();

    // the same file and tokenizer, given as a user's files
    let b = bundle("tiny-llama");
    let read = |n: &str| std::fs::read(b.join(n)).unwrap();
    let direct = Engine::from_user_files("direct", read("model.with_past.ort-dynamic-qint8.onnx"), &read("tokenizer.json"),
                                         Some(&read("tokenizer_config.json")), None, bundle_context(), Prepare::default()).unwrap();
    assert_eq!(from_hub.context, direct.context, "config.json's context (cut to tokenizer_config.json's)");
    assert_eq!(engine_run(&from_hub, &PROMPT, 3, 12), engine_run(&direct, &PROMPT, 3, 12));
    assert_eq!(from_hub.sha256, direct.sha256);
    // the chat template from the repository's chat_template.jinja (its tokenizer_config.json has
    // none): the bundle's
    let manifest: serde_json::Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let template = manifest["tokens"]["chat_template"].as_str().expect("tiny-llama's template");
    let hi = || [wasmlm::text::Message { role: "user".into(), content: "hi".into() }];
    let bundle_text = wasmlm::text::Text::from_bytes(&read("tokenizer.json"), Some(template.into())).unwrap();
    assert_eq!(from_hub.text.chat_prompt(&hi()).unwrap(), bundle_text.chat_prompt(&hi()).unwrap());

    // a second load: no request, the same engine
    let before = hits.load(Ordering::SeqCst);
    let again = hub::fetch(&src, &dir, &mut quiet()).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), before, "the cached copy is read without the network");
    let reloaded = hub::load(&again, Some(64), Prepare::default()).unwrap();
    assert_eq!(reloaded.context, 64, "a smaller context than config.json's is taken");
    assert_eq!(engine_run(&reloaded, &PROMPT, 1, 4), engine_run(&direct, &PROMPT, 1, 4));
}

fn bundle_context() -> usize {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle("tiny-llama").join("manifest.json")).unwrap()).unwrap();
    m["architecture"]["context"].as_u64().unwrap() as usize
}

#[test]
fn external_data_lands_in_the_weights_and_matches_onnxruntime() {
    let (root, id) = hub_layout("tiny-llama", true);
    let onnx = root.join(&id).join("onnx");
    assert!(std::fs::metadata(onnx.join("model.onnx")).unwrap().len() < 100_000, "the weights are outside the graph's file");
    assert!(std::fs::metadata(onnx.join("model.onnx_data")).unwrap().len() > 1_000_000);
    let (endpoint, _) = serve(root);
    let src = HubSource::new(&id, "fp32", "main", &endpoint).unwrap();
    let fetched = hub::fetch(&src, &cache("fp32-external"), &mut quiet()).unwrap();
    assert!(fetched.files.contains(&"onnx/model.onnx_data".to_string()));
    let engine = hub::load(&fetched, None, Prepare::default()).unwrap();
    let (logits, greedy) = engine_run(&engine, &PROMPT, 3, 16);
    let (want_logits, want_greedy) = reference(&bundle("tiny-llama"), "model.with_past.onnx", &PROMPT, 3, 16);
    for (a, b) in logits.iter().zip(&want_logits) {
        assert!(max_abs_diff(a, b) < 1e-4, "{}", max_abs_diff(a, b));
    }
    assert_eq!(greedy, want_greedy);
    // without its side file, the graph is refused with the file's name
    let e = Engine::from_user_files("bare", std::fs::read(fetched.dir.join("onnx/model.onnx")).unwrap(),
                                    &std::fs::read(fetched.dir.join("tokenizer.json")).unwrap(), None, None, 64, Prepare::default())
        .err().expect("refused").to_string();
    assert!(e.contains("model.onnx_data") && e.contains("not given"), "{e}");
}

#[test]
fn a_missing_dtype_an_unreachable_hub_or_a_cut_download_is_a_clear_error_leaving_nothing() {
    let (root, id) = hub_layout("tiny-llama", false);
    let (endpoint, _) = serve(root);
    let err = |repo: &str, dtype: &str, endpoint: &str, dir: &Path| {
        hub::fetch(&HubSource::new(repo, dtype, "main", endpoint).unwrap(), dir, &mut quiet()).unwrap_err().to_string()
    };
    let dir = cache("errors");
    let e = err(&id, "q4", &endpoint, &dir);
    assert!(e.contains("HTTP 404") && e.contains("no q4 file") && e.contains("onnx/model_q4.onnx"), "{e}");
    let e = err("wasmlm-test/no-such-model", "q8", &endpoint, &dir);
    assert!(e.contains("HTTP 404") && e.contains("no such repository"), "{e}");

    // a port nothing listens on
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = err(&id, "q8", &format!("http://{closed}"), &dir);
    assert!(e.contains("cannot reach") && e.contains("offline"), "{e}");

    let cut = format!("{id}-cut");
    let e = err(&cut, "q8", &endpoint, &dir);
    assert!(e.contains("onnx/model_quantized.onnx") && (e.contains("broke off") || e.contains("interrupted")), "{e}");
    let folder = HubSource::new(&cut, "q8", "main", &endpoint).unwrap().folder(&dir);
    let left: Vec<String> = walk(&folder).into_iter().map(|p| p.strip_prefix(&folder).unwrap().display().to_string()).collect();
    assert_eq!(left, ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"], "no partial file, no list of files");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
