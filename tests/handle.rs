//! The session handle's operations (src/session.rs) on the three places a cache can live: the
//! attention ops' states (tiny Llama and GPT-2 with past: `cache_in_ops`, the plan without past
//! inputs or present outputs), the graph's present outputs fed back (tiny GPT-2 with past on
//! tract's own nodes, `fused_ops` off, whose attention keeps its `Concat`s) and no cache at all
//! (a no-past file, which sees every token each time).
mod common;

use common::*;
use wasmlm::{Engine, Prepare, Session};

const PROMPT: [u32; 7] = [510, 2317, 314, 260, 3575, 282, 4649];
const MORE: [u32; 5] = [17, 99, 1024, 7, 300];

fn load(model: &str, file: &str, fused_ops: bool) -> Engine {
    Engine::from_dir(&bundle(model), Some(file), Prepare { fused_ops, ..Prepare::default() }).unwrap()
}

/// Every kind of cache, with what it is.
fn engines() -> Vec<(String, Engine)> {
    let cases = [
        ("tiny-llama", "model.with_past.onnx", true),
        ("tiny-llama", "model.with_past.int8.onnx", true),
        ("tiny-gpt2", "model.with_past.onnx", true),
        ("tiny-gpt2", "model.with_past.onnx", false),
        ("tiny-llama", "model.onnx", true),
    ];
    let out: Vec<(String, Engine)> =
        cases.iter().map(|&(m, f, fused)| (format!("{m} {f} (fused ops: {fused})"), load(m, f, fused))).collect();
    // the cases above cover each store: held against the graphs' own flags
    let in_ops: Vec<bool> = out.iter().map(|(_, e)| e.graph.cache_in_ops()).collect();
    let cached: Vec<bool> = out.iter().map(|(_, e)| e.graph.conv.has_cache()).collect();
    assert_eq!((in_ops, cached), (vec![true, true, true, false, false], vec![true, true, true, true, false]));
    // one owner: where the ops keep the cache, the plan has no past inputs nor present outputs
    for (what, e) in &out {
        let (ins, outs) = (e.graph.plan.model().inputs.len(), e.graph.plan.model().outputs.len());
        let pairs = if e.graph.cache_in_ops() { 0 } else { e.graph.conv.layers() };
        assert_eq!((e.graph.io.past.len(), e.graph.io.present.len()), (pairs, pairs), "{what}");
        assert_eq!(ins, 1 + e.graph.io.attention_mask.is_some() as usize + e.graph.io.position_ids.is_some() as usize + 2 * pairs, "{what}");
        assert_eq!(outs, 1 + 2 * pairs, "{what}");
    }
    out
}

fn greedy(s: &mut Session, mut logits: Vec<f32>, n: usize) -> Vec<u32> {
    let mut out = vec![];
    for _ in 0..n {
        let id = argmax(&logits);
        out.push(id);
        logits = s.step(id).unwrap();
    }
    out
}

fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

#[test]
fn a_fork_is_independent_of_its_origin() {
    for (what, engine) in engines() {
        let mut a = engine.session().unwrap();
        a.prefill(&PROMPT).unwrap();
        let mut b = a.fork();
        // a goes on; b must then give what a session that never forked gives
        a.step(11).unwrap();
        a.step(12).unwrap();
        let mut plain = engine.session().unwrap();
        plain.prefill(&PROMPT).unwrap();
        assert_eq!(b.step(21).unwrap(), plain.step(21).unwrap(), "{what}: the fork after its origin moved on");
        assert_eq!(b.tokens(), plain.tokens(), "{what}");
        // and the other way round: b moved on, a is where it was
        b.step(22).unwrap();
        let mut again = engine.session().unwrap();
        again.prefill(&PROMPT).unwrap();
        again.step(11).unwrap();
        again.step(12).unwrap();
        assert_eq!(a.step(13).unwrap(), again.step(13).unwrap(), "{what}: the origin after its fork moved on");
    }
}

#[test]
fn a_snapshot_restores_the_same_next_logits() {
    for (what, engine) in engines() {
        let mut a = engine.session().unwrap();
        a.prefill(&PROMPT).unwrap();
        a.step(31).unwrap();
        let bytes = a.snapshot().unwrap();
        let mut b = engine.session().unwrap();
        b.prefill(&MORE).unwrap(); // whatever it held is replaced
        b.restore(&bytes).unwrap();
        assert_eq!(b.tokens(), a.tokens(), "{what}");
        assert_eq!(b.step(32).unwrap(), a.step(32).unwrap(), "{what}: next logits after a restore");
        assert_eq!(b.step(33).unwrap(), a.step(33).unwrap(), "{what}: and the step after");
        // an empty cache too
        let empty = engine.session().unwrap().snapshot().unwrap();
        b.restore(&empty).unwrap();
        assert!(b.is_empty(), "{what}");
        let mut fresh = engine.session().unwrap();
        assert_eq!(b.prefill(&PROMPT).unwrap(), fresh.prefill(&PROMPT).unwrap(), "{what}: after restoring an empty cache");
    }
}

#[test]
fn a_snapshot_is_refused_for_another_model_or_damaged_bytes() {
    let llama = load("tiny-llama", "model.with_past.onnx", true);
    let llama_int8 = load("tiny-llama", "model.with_past.int8.onnx", true);
    let mut s = llama.session().unwrap();
    s.prefill(&PROMPT).unwrap();
    let bytes = s.snapshot().unwrap();
    let refused = |engine: &Engine, bytes: &[u8], says: &str| {
        let mut t = engine.session().unwrap();
        t.prefill(&MORE).unwrap();
        let held = t.tokens().to_vec();
        let e = t.restore(bytes).expect_err("restore should refuse").to_string();
        assert!(e.contains(says), "{e:?} should say {says:?}");
        assert_eq!(t.tokens(), held, "the cache is left as it was");
    };
    // the same model's other file: another sha256
    refused(&llama_int8, &bytes, "another model file");
    refused(&load("tiny-gpt2", "model.with_past.onnx", true), &bytes, "another model file");
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    refused(&llama, &flipped, "checksum");
    refused(&llama, &bytes[..bytes.len() - 9], "checksum");
    refused(&llama, b"not a snapshot at all, not at all, not at all, not at all, not at all.", "not a wasmlm cache");
    let mut later = bytes.clone();
    later[8] = 2;
    refused(&llama, &later, "version 2");
}

/// Cutting the cache, then feeding other tokens, gives what a prefill of the kept tokens and the
/// new ones gives (within FP32 rounding: the products run in other chunks) and the same greedy
/// tokens.
#[test]
fn truncate_then_append_equals_a_fresh_prefill() {
    for (what, engine) in engines() {
        let mut s = engine.session().unwrap();
        s.prefill(&PROMPT).unwrap();
        s.prefill(&MORE).unwrap();
        s.truncate(4).unwrap();
        assert_eq!(s.tokens(), &PROMPT[..4], "{what}");
        let cut = s.prefill(&MORE[..3]).unwrap();
        let mut fresh = engine.session().unwrap();
        let whole: Vec<u32> = PROMPT[..4].iter().chain(&MORE[..3]).copied().collect();
        let direct = fresh.prefill(&whole).unwrap();
        let d = max_abs_diff(&cut, &direct);
        assert!(d < 1e-4, "{what}: logits differ by {d}");
        assert_eq!(greedy(&mut s, cut, 12), greedy(&mut fresh, direct, 12), "{what}: greedy tokens");
    }
}

/// A conversation fed turn by turn (each `sync` runs only what the cache lacks) equals the same
/// conversation fed at once.
#[test]
fn turn_by_turn_equals_all_at_once() {
    for (what, engine) in engines() {
        let turns: [&[u32]; 3] = [&PROMPT, &MORE, &[5, 6, 7, 8]];
        let mut s = engine.session().unwrap();
        let mut conversation = vec![];
        let mut logits = vec![];
        for turn in turns {
            conversation.extend_from_slice(turn);
            let (fed, l) = s.sync(&conversation).unwrap();
            assert_eq!(fed, turn.len(), "{what}: a turn feeds only its own tokens");
            logits = l;
        }
        let mut once = engine.session().unwrap();
        let direct = once.prefill(&conversation).unwrap();
        let d = max_abs_diff(&logits, &direct);
        assert!(d < 1e-4, "{what}: logits differ by {d}");
        assert_eq!(greedy(&mut s, logits, 12), greedy(&mut once, direct, 12), "{what}: greedy tokens");
        // a conversation that differs after token 5: the cache keeps 5, feeds the rest
        let mut edited = conversation[..5].to_vec();
        edited.extend_from_slice(&[9, 10]);
        let (fed, l) = s.sync(&edited).unwrap();
        assert_eq!((fed, s.tokens()), (2, &edited[..]), "{what}");
        let mut other = engine.session().unwrap();
        assert!(max_abs_diff(&l, &other.prefill(&edited).unwrap()) < 1e-4, "{what}");
        // the same conversation again: nothing to feed, the same logits
        let (fed, again) = s.sync(&edited).unwrap();
        assert_eq!((fed, again), (0, l), "{what}");
    }
}

/// Past the context: a clear error, and the cache as it was (it goes on as if nothing happened).
#[test]
fn a_full_context_is_refused_with_the_cache_intact() {
    let engine = load("tiny-llama", "model.with_past.onnx", true);
    let mut s = Session::new(engine.graph.clone(), engine.sha256.clone(), 10).unwrap();
    s.prefill(&PROMPT).unwrap();
    let mut twin = s.fork();
    let e = s.prefill(&MORE).expect_err("past the context").to_string();
    assert!(e.contains("context is full") && e.contains("7 tokens held, 5 more"), "{e}");
    assert_eq!(s.tokens(), PROMPT, "the cache is as it was");
    assert_eq!(s.step(3).unwrap(), twin.step(3).unwrap());
}

/// After a cut or a restore the logits for "what comes next" are computed again from the last
/// token: a generation can continue from any cache.
#[test]
fn logits_continue_from_any_cache() {
    for (what, engine) in engines() {
        let mut s = engine.session().unwrap();
        let expected = s.prefill(&PROMPT).unwrap();
        assert_eq!(s.logits().unwrap(), expected, "{what}: kept");
        s.step(5).unwrap();
        s.truncate(PROMPT.len()).unwrap();
        let again = s.logits().unwrap();
        assert!(max_abs_diff(&again, &expected) < 1e-4, "{what}: recomputed");
        assert_eq!(s.tokens(), PROMPT, "{what}");
        let e = engine.session().unwrap().logits().expect_err("empty").to_string();
        assert!(e.contains("cache is empty"), "{e}");
    }
}

/// A prefill fed in chunks (`Generation::prefill_step`, what the page does to stay cancellable)
/// gives the first tokens a prefill at once gives; stopped halfway, the cache holds what was
/// fed, and a chat turn then feeds only the rest.
#[test]
fn a_chunked_prefill_equals_one_prefill_and_can_stop_halfway() {
    use wasmlm::{GenerateOptions, Generation};
    let opts = || GenerateOptions { max_new_tokens: 8, ignore_eos: true, ..Default::default() };
    let prompt: Vec<u32> = PROMPT.iter().chain(&MORE).copied().collect();
    for (what, engine) in engines() {
        let run = |chunk: Option<usize>| {
            let mut s = engine.session().unwrap();
            let mut g = Generation::from_ids(prompt.clone(), opts()).unwrap();
            let mut progress = vec![];
            if let Some(chunk) = chunk {
                while let Some(p) = g.prefill_step(&mut s, chunk).unwrap() {
                    progress.push(p);
                }
            }
            let ids: Vec<u32> = std::iter::from_fn(|| g.next(&engine, &mut s).unwrap()).map(|e| e.id).collect();
            (ids, progress, g.fed_tokens())
        };
        let (once, _, fed) = run(None);
        let (chunked, progress, chunked_fed) = run(Some(5));
        assert_eq!(chunked, once, "{what}: greedy tokens");
        assert_eq!(progress, vec![(5, 12), (10, 12), (12, 12)], "{what}");
        assert_eq!((fed, chunked_fed), (Some(12), Some(12)), "{what}");
        // stopped after the first chunk: the cache holds it; the same conversation as a whole
        // then feeds only the rest
        let mut s = engine.session().unwrap();
        let mut g = Generation::from_ids(prompt.clone(), opts()).unwrap();
        g.prefill_step(&mut s, 5).unwrap();
        drop(g);
        assert_eq!(s.tokens(), &prompt[..5], "{what}");
        let (fed, _) = s.sync(&prompt).unwrap();
        assert_eq!(fed, 7, "{what}");
    }
}

/// An FP16 file's cache is FP16 (the graph's declared type, `Graph::cache_dt`), passed through
/// the graph; a snapshot holds it as f32, which is exact for f16 values, and a restore casts it
/// back: the next logits are the same bits, and a fork stays independent. The file is the
/// compatibility matrix's tiny Llama in FP16, as Optimum exports it and as ours does.
#[test]
fn an_fp16_cache_snapshots_and_forks_exactly() {
    let dir = matrix().join("llama");
    let hf = dir.join("hf");
    for exporter in ["ours", "optimum"] {
        let what = format!("{exporter} fp16");
        let engine = Engine::from_user_files(
            "fp16.onnx",
            std::fs::read(dir.join(exporter).join("fp16.onnx")).unwrap(),
            &std::fs::read(hf.join("tokenizer.json")).unwrap(),
            std::fs::read(hf.join("tokenizer_config.json")).ok().as_deref(),
            None,
            64,
            Prepare::default(),
        )
        .unwrap();
        assert_eq!(engine.graph.cache_dt, tract_onnx::prelude::DatumType::F16, "{what}");
        let mut a = engine.session().unwrap();
        a.prefill(&PROMPT).unwrap();
        a.step(31).unwrap();
        let bytes = a.snapshot().unwrap();
        let mut b = engine.session().unwrap();
        b.prefill(&MORE).unwrap();
        b.restore(&bytes).unwrap();
        assert_eq!(b.tokens(), a.tokens(), "{what}");
        let mut c = a.fork();
        let next = a.step(32).unwrap();
        assert!(next.iter().all(|x| x.is_finite()), "{what}");
        assert_eq!(b.step(32).unwrap(), next, "{what}: next logits after a restore");
        assert_eq!(c.step(32).unwrap(), next, "{what}: next logits of a fork");
        // and the restored cache goes on as the original: one more step each
        assert_eq!(b.step(33).unwrap(), a.step(33).unwrap(), "{what}: the step after");
    }
}
