//! The real default model (SmolLM2-135M-Instruct): slow, still run in CI.
mod common;

use common::*;
use wasmlm::{Engine, GenerateOptions, Generation, Prepare};

#[test]
fn answers_paris_with_the_default_int8_file() {
    let dir = bundle("smollm2-135m");
    let engine = Engine::from_dir(&dir, None, Prepare::default()).unwrap();
    assert_eq!(engine.info.file, "model.with_past.int8.onnx");
    let opts = GenerateOptions { max_new_tokens: 16, chat: true, ..Default::default() };
    let mut gen = Generation::new(&engine, "What is the capital of France?", opts).unwrap();
    let mut session = engine.session().unwrap();
    let mut text = String::new();
    while let Some(ev) = gen.next(&engine, &mut session).unwrap() {
        assert!(ev.ms > 0.0);
        text.push_str(&ev.text);
    }
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(gen.stopped, Some(wasmlm::StopReason::Eos), "{text:?}");
}

#[test]
fn greedy_32_tokens_equal_onnxruntime_on_the_fp32_file() {
    let dir = bundle("smollm2-135m");
    let engine = Engine::from_dir(&dir, Some("model.with_past.onnx"), Prepare::default()).unwrap();
    let prompt = engine.text.encode("The quick brown fox jumps over the lazy dog. Then").unwrap();
    let (ref_logits, ref_tokens) = reference(&dir, "model.with_past.onnx", &prompt, 1, 32);
    let (logits, tokens) = engine_run(&engine, &prompt, 1, 32);
    assert!(max_abs_diff(&logits[0], &ref_logits[0]) < 1e-3);
    assert_eq!(tokens, ref_tokens);
}
