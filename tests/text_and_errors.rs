//! Tokenizer against the Python tokenizers library; bad input gives typed errors, not panics.
mod common;

use common::*;
use wasmlm::{Engine, Error, GenerateOptions, Generation, Manifest, Prepare};

#[test]
fn tokenizer_ids_equal_pythons_and_streaming_decode_equals_full_decode() {
    let dir = bundle("tiny-llama");
    let engine = Engine::from_dir(&dir, Some("model.with_past.int8.onnx"), Prepare::default()).unwrap();
    let text: String = shakespeare().chars().take(200_000).collect();
    let (py_ids, py_decoded) = python_tokenize(&dir, 200_000);
    let ids = engine.text.encode(&text).unwrap();
    assert_eq!(ids.len(), py_ids.len());
    assert_eq!(ids, py_ids);
    let full = engine.text.decode(&ids).unwrap();
    assert_eq!(full, py_decoded);
    let mut stream = wasmlm::text::DecodeStream::default();
    let pieces: String = ids[..5000].iter().map(|&id| engine.text.decode_step(&mut stream, id).unwrap()).collect();
    assert_eq!(pieces, engine.text.decode(&ids[..5000]).unwrap());
}

#[test]
fn streaming_never_splits_a_character() {
    let dir = bundle("tiny-llama");
    let engine = Engine::from_dir(&dir, Some("model.with_past.int8.onnx"), Prepare::default()).unwrap();
    let ids = engine.text.encode("naïve café — 東京 🦀 end").unwrap();
    let mut stream = wasmlm::text::DecodeStream::default();
    let mut joined = String::new();
    for &id in &ids {
        let piece = engine.text.decode_step(&mut stream, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "broken UTF-8 in {piece:?}");
        joined.push_str(&piece);
    }
    assert_eq!(joined, "naïve café — 東京 🦀 end");
}

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

#[test]
fn truncated_onnx_and_hash_mismatch_are_typed_errors() {
    let dir = bundle("tiny-gpt2");
    let manifest = Manifest::from_json(&String::from_utf8(read(&dir, "manifest.json")).unwrap()).unwrap();
    let onnx = read(&dir, "model.with_past.onnx");
    let tok = read(&dir, "tokenizer.json");
    let cut = &onnx[..onnx.len() / 3];
    let e = Engine::from_bytes(&manifest, "model.with_past.onnx", cut.to_vec(), &tok, Prepare::default()).err().unwrap();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
    let mut flipped = onnx.clone();
    flipped[onnx.len() / 2] ^= 1;
    let e = Engine::from_bytes(&manifest, "model.with_past.onnx", flipped, &tok, Prepare::default()).err().unwrap();
    assert!(matches!(e, Error::HashMismatch { .. }) && e.to_string().contains("sha256"), "{e}");
    // Without the manifest's protection, truncated bytes reach the parser: an error, no panic.
    let e = wasmlm::graph::load(cut.to_vec(), Some((4, 16)), Prepare::default()).err().unwrap();
    assert!(matches!(e, Error::Onnx(_)), "{e}");
}

#[test]
fn a_graph_with_unknown_io_names_is_refused_with_what_was_expected() {
    let dir = bundle("tiny-gpt2");
    // The same graph with its inputs renamed: a decoder the engine cannot feed.
    let mut onnx = read(&dir, "model.onnx");
    let (from, to) = (b"input_ids".as_slice(), b"pixel_vals".as_slice());
    let mut i = 0;
    while i + from.len() <= onnx.len() {
        if &onnx[i..i + from.len()] == from {
            onnx[i..i + from.len()].copy_from_slice(&to[..from.len()]);
        }
        i += 1;
    }
    let e = wasmlm::graph::load(onnx, None, Prepare::default()).err().unwrap();
    assert!(matches!(e, Error::UnsupportedGraph(_)), "{e}");
    assert!(e.to_string().contains("input_ids") && e.to_string().contains("past_key_<i>"), "{e}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = bundle("tiny-gpt2"); // context 256
    let engine = Engine::from_dir(&dir, Some("model.with_past.onnx"), Prepare::default()).unwrap();
    let mut session = engine.session().unwrap();
    let e = session.prefill(&vec![5; 300]).err().unwrap();
    assert!(matches!(e, Error::PromptTooLong { tokens: 300, context: 256 }), "{e}");
    // A generation that fills the context stops there instead of failing.
    let opts = GenerateOptions { max_new_tokens: 100, ignore_eos: true, ..Default::default() };
    let mut gen = Generation::from_ids(vec![5; 250], opts).unwrap();
    let mut n = 0;
    while gen.next(&engine, &mut session).unwrap().is_some() {
        n += 1;
    }
    assert_eq!((n, gen.stopped), (7, Some(wasmlm::StopReason::ContextFull)));
}

#[test]
fn a_missing_bundle_file_names_the_path() {
    let e = Engine::from_dir(std::path::Path::new("/no/such/bundle"), None, Prepare::default()).err().unwrap();
    assert!(matches!(e, Error::MissingFile(ref p) if p.contains("/no/such/bundle/manifest.json")), "{e}");
}

#[test]
fn same_seed_same_tokens_through_the_engine() {
    let dir = bundle("tiny-llama");
    let engine = Engine::from_dir(&dir, Some("model.with_past.int8.onnx"), Prepare::default()).unwrap();
    let run = |seed| {
        let mut opts = GenerateOptions { max_new_tokens: 16, ignore_eos: true, ..Default::default() };
        opts.sampling.temperature = 1.0;
        opts.sampling.top_k = 40;
        opts.sampling.seed = seed;
        let mut gen = Generation::from_ids(vec![1, 2, 3], opts).unwrap();
        let mut s = engine.session().unwrap();
        std::iter::from_fn(|| gen.next(&engine, &mut s).unwrap()).map(|e| e.id).collect::<Vec<_>>()
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

/// What a dropped file cannot do: name the engine's own op types, feed ids past the vocabulary,
/// ask for a context of 0 or beyond its tokenizer's limit, run a template for ever.
#[test]
fn untrusted_files_are_bounded() {
    use prost::Message as _;
    let dir = bundle("tiny-llama");
    let onnx = read(&dir, "model.with_past.onnx");
    let tok = read(&dir, "tokenizer.json");
    let user = |onnx: Vec<u8>, config: Option<&[u8]>, context| Engine::from_user_files("user.onnx", onnx, &tok, config, None, context, Prepare::default());
    // an empty file
    let e = user(vec![], None, 64).err().unwrap();
    assert!(matches!(e, Error::Onnx(_)) && e.to_string().contains("the file is empty"), "{e}");
    // a node renamed to one of our op types (only our rewrites write them)
    let mut proto = wasmlm::graph::decode_proto(&onnx[..]).unwrap();
    let node = proto.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == "MatMul").unwrap();
    node.op_type = wasmlm::qmatmul::OP_TYPE.into();
    let e = user(proto.encode_to_vec(), None, 64).err().unwrap();
    assert!(matches!(e, Error::UnsupportedGraph(_)) && e.to_string().contains("WasmlmDynQMatMul"), "{e}");
    // a constant shape of 2^40 elements (evaluated, so allocated, while the plan is prepared)
    let mut proto = wasmlm::graph::decode_proto(&onnx[..]).unwrap();
    let g = proto.graph.as_mut().unwrap();
    g.initializer.push(tract_onnx::pb::TensorProto { name: "huge_shape".into(), data_type: 7, dims: vec![2],
                                                     int64_data: vec![1 << 20, 1 << 20], ..Default::default() });
    g.node.push(tract_onnx::pb::NodeProto { name: "huge".into(), op_type: "ConstantOfShape".into(),
                                            input: vec!["huge_shape".into()], output: vec!["huge_out".into()], ..Default::default() });
    let e = user(proto.encode_to_vec(), None, 64).err().unwrap();
    assert!(matches!(e, Error::UnsupportedGraph(_)) && e.to_string().contains("ConstantOfShape") && e.to_string().contains("2147483648"), "{e}");
    // ids past the vocabulary: refused before the graph runs, the cache untouched
    let engine = user(onnx.clone(), None, 64).unwrap();
    let vocab = engine.graph.vocab.expect("the logits' width");
    let mut s = engine.session().unwrap();
    s.prefill(&[1, 2]).unwrap();
    let e = s.prefill(&[3, vocab as u32]).err().unwrap();
    assert!(matches!(e, Error::TokenId { id, vocab: v } if id == vocab as u32 && v == vocab), "{e}");
    assert_eq!(s.len(), 2);
    // the context: at least 1, and cut to model_max_length
    let e = user(onnx.clone(), None, 0).err().unwrap();
    assert!(matches!(e, Error::Options(_)), "{e}");
    let config = br#"{"model_max_length": 48}"#;
    assert_eq!(user(onnx.clone(), Some(config), 4096).unwrap().context, 48);
    let sentinel = br#"{"model_max_length": 1000000000000000019884624838656}"#;
    assert_eq!(user(onnx.clone(), Some(sentinel), 4096).unwrap().context, 4096);
    // a template that would run ~10^9 instructions stops on its fuel
    let text = wasmlm::text::Text::from_bytes(&tok, Some(
        "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}x{% endfor %}{% endfor %}{% endfor %}".into())).unwrap();
    let msg = wasmlm::text::Message { role: "user".into(), content: "hi".into() };
    let e = text.chat_prompt(&[msg]).err().unwrap();
    assert!(matches!(e, Error::Template(_)) && e.to_string().contains("fuel"), "{e}");
}

/// A user's files: the chat template from chat_template.jinja where given (newer repositories
/// keep it there), which takes precedence over tokenizer_config.json's, as in transformers.
#[test]
fn a_chat_template_file_gives_the_template() {
    let dir = bundle("tiny-llama");
    let (onnx, tok) = (read(&dir, "model.with_past.onnx"), read(&dir, "tokenizer.json"));
    let config = br#"{"chat_template": "config: {{ messages[0].content }}"}"#;
    let jinja = "file: {{ messages[0].content }}";
    let prompt = |config: Option<&[u8]>, template: Option<&str>| {
        let engine = Engine::from_user_files("user.onnx", onnx.clone(), &tok, config, template, 64, Prepare::default()).unwrap();
        let msg = wasmlm::text::Message { role: "user".into(), content: "hi".into() };
        engine.text.has_chat_template().then(|| engine.text.chat_prompt(&[msg]).unwrap())
    };
    assert_eq!(prompt(None, None), None);
    assert_eq!(prompt(Some(config), None).as_deref(), Some("config: hi"));
    assert_eq!(prompt(None, Some(jinja)).as_deref(), Some("file: hi"));
    assert_eq!(prompt(Some(config), Some(jinja)).as_deref(), Some("file: hi"));
}

/// The CLI: unknown flags are errors, every command has --help, and `bench --out` refuses to
/// replace a file that is not a baselines table (before any run), leaving it as it was.
#[test]
fn the_cli_refuses_unknown_flags_and_a_table_it_cannot_read() {
    let cli = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_wasmlm")).args(args).output().unwrap();
    let o = cli(&["context", "--bundle", "x", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unexpected argument '--bogus'"));
    for cmd in ["generate", "bench", "bench-row", "profile", "context", "trace", "membw"] {
        let o = cli(&[cmd, "--help"]);
        assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Usage: wasmlm"), "{cmd} --help");
    }
    let dir = std::env::temp_dir().join(format!("wasmlm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = bundle("tiny-gpt2");
    for (name, content) in [("garbage.json", "not json {"), ("shape.json", r#"{"rows": 5}"#)] {
        let out = dir.join(name);
        std::fs::write(&out, content).unwrap();
        let o = cli(&["bench", "--bundle", bundle.to_str().unwrap(), "--out", out.to_str().unwrap(), "--runs", "1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("refusing to replace it") && !err.contains("[bench]"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), content);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The bandwidth probe (`wasmlm membw`, the page's `lm.membw`): its JSON has a figure per round
/// for each thread count; a zero size is refused with what was wrong.
#[test]
fn the_bandwidth_probe_reports_each_round_and_refuses_a_zero_size() {
    let m = wasmlm::bench::membw(16, 2, 2).unwrap();
    assert_eq!((m.mib, m.threads, m.rounds.len()), (16, 2, 2));
    assert!(m.rounds.iter().all(|&(one, many)| one > 0.0 && many > 0.0 && one.is_finite() && many.is_finite()), "{m:?}");
    assert!(m.one >= m.rounds.iter().map(|r| r.0).fold(f64::MAX, f64::min) && m.one <= m.rounds.iter().map(|r| r.0).fold(0.0, f64::max));
    let e = wasmlm::bench::membw(0, 1, 2).unwrap_err().to_string();
    assert!(e.contains("0 MiB") && e.contains("at least 1"), "{e}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wasmlm")).args(["membw", "--mib", "16", "--rounds", "1", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["mib"].as_u64(), v["threads"].as_u64(), v["rounds"].as_array().map(|r| r.len())), (Some(16), Some(2), Some(1)));
}
