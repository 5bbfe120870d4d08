//! The engine against ONNX Runtime on the same ONNX files (tiny random GPT-2 and Llama, GQA),
//! FP32 and both INT8 presets, with and without past.
mod common;

use common::*;
use wasmlm::{fused, Engine, Prepare};

const PROMPT: [u32; 7] = [510, 2317, 314, 260, 3575, 282, 4649];

fn load(bundle: &std::path::Path, file: &str) -> Engine {
    Engine::from_dir(bundle, Some(file), Prepare::default()).unwrap()
}

fn fp32_parity(reference_model: &str) {
    let dir = bundle(reference_model);
    for file in ["model.with_past.onnx", "model.onnx"] {
        let (ref_logits, ref_tokens) = reference(&dir, file, &PROMPT, 3, 32);
        let (logits, tokens) = engine_run(&load(&dir, file), &PROMPT, 3, 32);
        for (step, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "{reference_model} {file} step {step}: logits differ by {d}");
        }
        assert_eq!(tokens, ref_tokens, "{reference_model} {file}: greedy tokens");
    }
}

#[test]
fn fp32_matches_onnxruntime_gpt2() {
    fp32_parity("tiny-gpt2");
}

#[test]
fn fp32_matches_onnxruntime_llama_gqa() {
    fp32_parity("tiny-llama");
}

/// INT8: `q8b32` dequantizes the same INT8 weights to the same FP32 values in both runtimes, so
/// FP32's tolerance holds. `ort-dynamic-qint8` quantizes activations at run time; the two runtimes may
/// round a uint8 activation code differently (x.5 cases, scale computed in another order), and
/// one code step moves a logit by about scale_x * scale_w * |w| summed over a row: measured on
/// these files at < 0.02 of the logits' range. Greedy tokens: teacher-forced agreement >= 30/32.
fn int8_parity(reference_model: &str) {
    let dir = bundle(reference_model);
    for (file, tolerance) in [("model.with_past.int8.onnx", 1e-4), ("model.with_past.ort-dynamic-qint8.onnx", 0.02)] {
        let (ref_logits, ref_tokens) = reference(&dir, file, &PROMPT, 3, 32);
        let engine = load(&dir, file);
        let (logits, _) = engine_run(&engine, &PROMPT, 3, 0);
        for (step, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
            let range = b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
            let d = max_abs_diff(a, b);
            assert!(d <= tolerance * range.max(1.0), "{reference_model} {file} step {step}: {d} (range {range})");
        }
        let forced = engine_forced(&engine, &PROMPT, &ref_tokens);
        let agree = matching(&forced, &ref_tokens);
        assert!(agree >= 30, "{reference_model} {file}: greedy agreement {agree}/32");
    }
}

#[test]
fn int8_matches_onnxruntime_gpt2() {
    int8_parity("tiny-gpt2");
}

#[test]
fn int8_matches_onnxruntime_llama_gqa() {
    int8_parity("tiny-llama");
}

#[test]
fn with_past_equals_no_past() {
    let dir = bundle("tiny-llama");
    for (past, no_past) in [("model.with_past.onnx", "model.onnx"), ("model.with_past.int8.onnx", "model.int8.onnx")] {
        let (a, ta) = engine_run(&load(&dir, past), &PROMPT, 3, 16);
        let (b, tb) = engine_run(&load(&dir, no_past), &PROMPT, 3, 16);
        for (x, y) in a.iter().zip(&b) {
            assert!(max_abs_diff(x, y) < 1e-4, "{past} vs {no_past}");
        }
        assert_eq!(ta, tb);
    }
}

#[test]
fn folded_graph_equals_the_plain_one() {
    let dir = bundle("tiny-gpt2");
    for file in ["model.with_past.int8.onnx", "model.with_past.ort-dynamic-qint8.onnx"] {
        // tract's own integer matmul: with our int8 kernels, the ort-dynamic-qint8 file has nothing to fold
        let prep = Prepare { int8_kernels: false, ..Prepare::default() };
        let fast = Engine::from_dir(&dir, Some(file), prep).unwrap();
        let plain = Engine::from_dir(&dir, Some(file), Prepare { fold_constants: false, ..prep }).unwrap();
        assert!(fast.graph.nodes < plain.graph.nodes, "{file}: folding removed nothing");
        // q8b32's block weights are dequantized before tract (prefold.rs); the distilgpt2 study's are not blocks.
        // (10: every Reshape(Mul(Cast, Cast)) of the file, counted with the onnx package)
        let blocks = if file.contains("ort-dynamic-qint8") { 0 } else { 10 };
        assert_eq!((fast.graph.prefolded, plain.graph.prefolded), (blocks, 0), "{file}");
        let (a, ta) = engine_run(&fast, &PROMPT, 3, 8);
        let (b, tb) = engine_run(&plain, &PROMPT, 3, 8);
        for (x, y) in a.iter().zip(&b) {
            assert!(max_abs_diff(x, y) < 1e-4, "{file}");
        }
        assert_eq!(ta, tb);
    }
}

/// Our int8 kernels (qmatmul/) against the same file without them. The ort-dynamic-qint8 preset's dynamic
/// quantization: both sides quantize x the same way and the integer sums are exact, so only the
/// final float products' rounding may differ. q8b32: the kernels round x to 15 bits per row
/// (blockq8.rs) where tract multiplies f32 by the dequantized weights; measured here at
/// 2.7e-5 at most, held at 1e-4 (the FP32 parity bound). (The ort-dynamic-qint8 files: identical, 0.)
#[test]
fn int8_kernels_equal_the_unfused_graph() {
    // Products per file (counted with the onnx package): the distilgpt2 study's MatMulInteger nodes, and
    // q8b32's block-weight products (the layers' MatMul or Gemm, plus the tied LM head).
    let cases = [
        ("tiny-gpt2", "model.with_past.ort-dynamic-qint8.onnx", 9),
        ("tiny-gpt2", "model.ort-dynamic-qint8.onnx", 9),
        ("tiny-gpt2", "model.with_past.int8.onnx", 9),
        ("tiny-llama", "model.with_past.ort-dynamic-qint8.onnx", 15),
        ("tiny-llama", "model.ort-dynamic-qint8.onnx", 15),
        ("tiny-llama", "model.with_past.int8.onnx", 15),
        ("tiny-llama", "model.int8.onnx", 15),
    ];
    for (model, file, products) in cases {
        let dir = bundle(model);
        let fused = load(&dir, file);
        let plain = Engine::from_dir(&dir, Some(file), Prepare { int8_kernels: false, ..Prepare::default() }).unwrap();
        assert_eq!((fused.graph.fused, plain.graph.fused), (products, 0), "{model} {file}");
        // q8b32's embedding lookups on their blocks (qmatmul/gather.rs), bit for bit the
        // dequantized tables' rows: GPT-2's token and position tables, Llama's token table
        let lookups = match (file.contains("ort-dynamic-qint8"), model) { (true, _) => 0, (false, "tiny-gpt2") => 2, _ => 1 };
        assert_eq!((fused.graph.block_lookups, plain.graph.block_lookups), (lookups, 0), "{model} {file}");
        let (a, ta) = engine_run(&fused, &PROMPT, 3, 32);
        let (b, tb) = engine_run(&plain, &PROMPT, 3, 32);
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            let d = max_abs_diff(x, y);
            eprintln!("{model} {file} step {step}: max |logit diff| {d:e}");
            assert!(d < 1e-4, "{model} {file} step {step}: {d}");
        }
        assert_eq!(ta, tb, "{model} {file}");
    }
}

/// Our attention products and cores, GELU and rotary embedding (fused/) against tract's own ops
/// on the same file. The GELU and the rotary embedding are bit-identical (their unit tests); the
/// products sum in another order than tract's kernels and the cores' softmax has its own exp, so
/// logits may move by float rounding: held at the FP32 parity bound, 1e-4, and the same greedy
/// tokens for 32 steps.
#[test]
fn fused_ops_equal_tracts_ops() {
    // (products, of which on grouped key/value heads, GELUs, rotary embeddings, attention
    // cores, of which with the cache's Concats) per file, counted with the onnx package: each
    // layer's two attention MatMuls, GPT-2's one tanh GELU per layer, Llama's two rotary
    // embeddings per layer (queries and keys). The MatMuls (Llama's 4 query heads on 2 key/value
    // heads: the repeat absorbed) are inside their layer's attention core (Softmax(MatMul * scale
    // + mask), GPT-2's with its Where mask), which takes the cache's two Concats in where there
    // is a cache; GPT-2's no-past export transposes its keys in one permutation with the heads'
    // (B, S, H, D -> B, H, D, S), which the core does not take, and keeps its products. Two other
    // MatMuls stay
    // tract's, having a constant operand: the LM head's transposed embedding, and Llama's rotary
    // inverse frequencies (an Expand to batch 1, constant once typed).
    let c = |products, grouped, gelus, ropes, attentions, with_cache| fused::Counts { products, grouped, gelus, ropes, attentions, with_cache };
    let cases = [
        ("tiny-gpt2", "model.with_past.onnx", c(0, 0, 2, 0, 2, 2)),
        ("tiny-gpt2", "model.onnx", c(4, 0, 2, 0, 0, 0)),
        ("tiny-gpt2", "model.with_past.ort-dynamic-qint8.onnx", c(0, 0, 2, 0, 2, 2)),
        ("tiny-gpt2", "model.with_past.int8.onnx", c(0, 0, 2, 0, 2, 2)),
        ("tiny-llama", "model.with_past.onnx", c(0, 0, 0, 4, 2, 2)),
        ("tiny-llama", "model.with_past.ort-dynamic-qint8.onnx", c(0, 0, 0, 4, 2, 2)),
        ("tiny-llama", "model.int8.onnx", c(0, 0, 0, 4, 2, 0)),
    ];
    for (model, file, counts) in cases {
        let dir = bundle(model);
        let fused = load(&dir, file);
        let plain = Engine::from_dir(&dir, Some(file), Prepare { fused_ops: false, ..Prepare::default() }).unwrap();
        assert_eq!((fused.graph.fused_ops, plain.graph.fused_ops), (counts, fused::Counts::default()), "{model} {file}");
        // the cache kept in the attention ops where they took every layer's Concats in
        assert_eq!((fused.graph.cache_in_ops(), plain.graph.cache_in_ops()), (counts.with_cache > 0, false), "{model} {file}");
        // 7 tokens: the products' own loops; 40: a prefill's attention on the blocked kernel
        // (BLOCKED_ROWS in src/fused/matmul.rs), whose summation order differs from tract's.
        // There `ort-dynamic-qint8`, which quantizes activations at run time, may round an activation
        // code the other way: int8_parity's bound for that (0.02 of the logits' range,
        // teacher-forced agreement >= 30/32); it measured 0.0017 on tiny GPT-2.
        let long: Vec<u32> = (0..40).map(|i| PROMPT[i % PROMPT.len()] + 97 * i as u32).collect();
        for prompt in [&PROMPT[..], &long] {
            let codes_may_flip = prompt.len() > PROMPT.len() && file.contains("ort-dynamic-qint8");
            let (a, ta) = engine_run(&fused, prompt, 3, 32);
            let (b, tb) = engine_run(&plain, prompt, 3, 32);
            for (step, (x, y)) in a.iter().zip(&b).enumerate() {
                let d = max_abs_diff(x, y);
                let range = y.iter().cloned().fold(f32::MIN, f32::max) - y.iter().cloned().fold(f32::MAX, f32::min);
                let bound = if codes_may_flip { 0.02 * range.max(1.0) } else { 1e-4 };
                assert!(d < bound, "{model} {file} {} tokens, step {step}: {d}", prompt.len());
            }
            if codes_may_flip {
                let agree = matching(&engine_forced(&fused, prompt, &tb), &tb);
                assert!(agree >= 30, "{model} {file} {} tokens: greedy agreement {agree}/32", prompt.len());
            } else {
                assert_eq!(ta, tb, "{model} {file} {} tokens", prompt.len());
            }
        }
    }
}

#[test]
fn truncate_then_continue_equals_a_fresh_prefill() {
    let dir = bundle("tiny-llama");
    let engine = load(&dir, "model.with_past.onnx");
    let mut s = engine.session().unwrap();
    s.prefill(&PROMPT).unwrap();
    s.step(42).unwrap();
    s.step(43).unwrap();
    s.truncate(PROMPT.len()).unwrap();
    let again = s.step(44).unwrap();
    let mut fresh = engine.session().unwrap();
    fresh.prefill(&PROMPT).unwrap();
    assert!(max_abs_diff(&again, &fresh.step(44).unwrap()) < 1e-5);
}

/// Our products cut across threads (qmatmul/split): 2 threads, every product split however
/// small (the tiny models' are below the size that splits by default), give the very logits
/// of 1 thread, prefill (its columns cut, or its rows where a product has fewer panels than
/// threads) and decode (columns cut), on both kinds of fused product.
#[test]
fn products_split_across_threads_equal_one_thread() {
    wasmlm::qmatmul::split::set_min_work(0);
    for (model, file) in [
        ("tiny-gpt2", "model.with_past.ort-dynamic-qint8.onnx"),
        ("tiny-llama", "model.with_past.ort-dynamic-qint8.onnx"),
        ("tiny-llama", "model.with_past.int8.onnx"),
    ] {
        let dir = bundle(model);
        let one = load(&dir, file);
        let two = Engine::from_dir(&dir, Some(file), Prepare { threads: 2, ..Prepare::default() }).unwrap();
        let (a, ta) = engine_run(&one, &PROMPT, 3, 32);
        let before = wasmlm::qmatmul::split::splits();
        let (b, tb) = engine_run(&two, &PROMPT, 3, 32);
        assert!(wasmlm::qmatmul::split::splits() > before, "{model} {file}: no product was split");
        assert_eq!(a, b, "{model} {file}");
        assert_eq!(ta, tb, "{model} {file}");
    }
}

/// The per-op profile (`wasmlm profile`, the page's benchmark mode): a step timed node by node
/// gives the very logits of a plain step, and each fused product is timed once per step.
#[test]
fn profiled_steps_equal_plain_steps_and_count_every_product() {
    for (model, file, op) in [
        ("tiny-gpt2", "model.with_past.ort-dynamic-qint8.onnx", "WasmlmDynQMatMul"),
        ("tiny-llama", "model.with_past.int8.onnx", "WasmlmBlockQ8MatMul"),
    ] {
        let engine = load(&bundle(model), file);
        let (mut plain, mut timed) = (engine.session().unwrap(), engine.session().unwrap());
        let (mut a, mut b) = (plain.prefill(&PROMPT).unwrap(), timed.prefill(&PROMPT).unwrap());
        assert_eq!(a, b, "{model} {file}: prefill");
        let mut times = vec![];
        for _ in 0..4 {
            let next = wasmlm::sampler::argmax(&a);
            a = plain.step(next).unwrap();
            b = timed.step_profiled(next, &mut times).unwrap();
            assert_eq!(a, b, "{model} {file}");
        }
        let p = wasmlm::bench::profile(&engine, &PROMPT, 3).unwrap();
        // "N x dynamic-quant simd128" (one kernel for every product of these files)
        let kernels = engine.info.int8_kernels.clone().unwrap();
        let products: f64 = kernels.split(" x ").next().unwrap().parse().unwrap();
        let ops = p["ops"].as_array().unwrap();
        let row = ops.iter().find(|o| o["op"] == op).unwrap_or_else(|| panic!("{model} {file}: no {op} in {ops:?}"));
        assert_eq!(row["calls_per_token"].as_f64().unwrap(), products, "{model} {file}: {kernels}");
        let sum: f64 = ops.iter().map(|o| o["ms_per_token"].as_f64().unwrap()).sum();
        let (in_ops, wall) = (p["ops_ms_per_token"].as_f64().unwrap(), p["wall_ms_per_token"].as_f64().unwrap());
        assert!((sum - in_ops).abs() < 1e-3 * ops.len() as f64 && in_ops > 0.0 && in_ops <= wall, "{p}");
    }
    // A graph without a cache has no decode step to time.
    let dir = bundle("tiny-gpt2");
    let e = wasmlm::bench::profile(&load(&dir, "model.onnx"), &PROMPT, 3).err().unwrap();
    assert!(e.to_string().contains("KV cache"), "{e}");
}

/// The prefill's per-op profile (`wasmlm profile --prefill N`): a prefill timed node by node
/// gives the very logits of a plain one, and each fused product is timed once per prefill.
#[test]
fn a_profiled_prefill_equals_a_plain_one_and_counts_every_product() {
    let engine = load(&bundle("tiny-llama"), "model.with_past.int8.onnx");
    let plain = engine.session().unwrap().prefill(&PROMPT).unwrap();
    let mut times = vec![];
    let timed = engine.session().unwrap().feed_profiled(&PROMPT, &mut times).unwrap();
    assert_eq!(plain, timed);
    let p = wasmlm::bench::profile_prefill(&engine, &[], &PROMPT, 2).unwrap();
    assert_eq!((&p["tokens"], &p["past"]), (&PROMPT.len().into(), &0.into()));
    let kernels = engine.info.int8_kernels.clone().unwrap();
    let products: f64 = kernels.split(" x ").next().unwrap().parse().unwrap();
    let ops = p["ops"].as_array().unwrap();
    let row = ops.iter().find(|o| o["op"] == "WasmlmBlockQ8MatMul").unwrap_or_else(|| panic!("{ops:?}"));
    assert_eq!(row["calls"].as_f64().unwrap(), products, "{kernels}");
    let sum: f64 = ops.iter().map(|o| o["ms"].as_f64().unwrap()).sum();
    let (in_ops, wall) = (p["ops_ms"].as_f64().unwrap(), p["wall_ms"].as_f64().unwrap());
    assert!((sum - in_ops).abs() < 1e-2 * ops.len() as f64 && in_ops > 0.0 && in_ops <= wall, "{p}");
    // after a past, as a chat's next turn: the logits of the same tokens fed after it, each
    // product still timed once per prefill
    let (past, turn) = PROMPT.split_at(PROMPT.len() / 2);
    let mut history = engine.session().unwrap();
    history.prefill(past).unwrap();
    let plain = history.fork().prefill(turn).unwrap();
    assert_eq!(plain, history.fork().feed_profiled(turn, &mut vec![]).unwrap());
    let p = wasmlm::bench::profile_prefill(&engine, past, turn, 2).unwrap();
    assert_eq!((&p["tokens"], &p["past"]), (&turn.len().into(), &past.len().into()));
    let ops = p["ops"].as_array().unwrap();
    assert_eq!(ops.iter().find(|o| o["op"] == "WasmlmBlockQ8MatMul").unwrap()["calls"].as_f64().unwrap(), products);
    // no round, an empty prompt, one past the context (alone, or after the past): refused
    assert!(wasmlm::bench::profile_prefill(&engine, &[], &PROMPT, 0).unwrap_err().to_string().contains("round"));
    assert!(engine.session().unwrap().feed_profiled(&[], &mut times).is_err());
    let long = vec![PROMPT[0]; engine.context + 1];
    assert!(wasmlm::bench::profile_prefill(&engine, &[], &long, 1).is_err());
    let rest = vec![PROMPT[0]; engine.context - past.len() + 1];
    let e = wasmlm::bench::profile_prefill(&engine, past, &rest, 1).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
}

/// A layer's block products that read the same input run as one (qmatmul/rewrite.rs,
/// `merge_siblings`): q, k and v, then gate and up, so 4 products a layer and the LM head, where
/// each of the 7 projections was one; the logits stay ONNX Runtime's (the parity tests above).
#[test]
fn sibling_block_products_are_joined() {
    let engine = load(&bundle("tiny-llama"), "model.with_past.int8.onnx");
    let kernels = engine.info.int8_kernels.clone().unwrap();
    let want = 4 * engine.graph.conv.layers() + 1;
    assert!(kernels.starts_with(&format!("{want} x q8 blocks")), "{kernels}: {want} products expected");
}

/// The LM head cut to the last position (src/last_row.rs) gives the logits the whole head gives:
/// bit for bit on the products whose rows are computed alone, for a prefill of 7 and of 40
/// tokens (a prefill's blocked kernels) and the steps after; and on `quantize_dynamic`'s products,
/// whose one scale is taken over the whole input, by computing only the last row of it.
#[test]
fn the_lm_head_on_the_last_position_gives_the_same_logits() {
    let cases = [
        ("tiny-gpt2", "model.with_past.onnx", true),
        ("tiny-gpt2", "model.onnx", true),
        ("tiny-gpt2", "model.with_past.int8.onnx", true),
        ("tiny-gpt2", "model.with_past.ort-dynamic-qint8.onnx", true),
        ("tiny-llama", "model.with_past.onnx", true),
        ("tiny-llama", "model.int8.onnx", true),
        ("tiny-llama", "model.with_past.int8.onnx", true),
        ("tiny-llama", "model.with_past.ort-dynamic-qint8.onnx", true),
    ];
    let long: Vec<u32> = (0..40).map(|i| PROMPT[i % PROMPT.len()] + 97 * i as u32).collect();
    for (model, file, cut) in cases {
        let dir = bundle(model);
        let last = load(&dir, file);
        let all = Engine::from_dir(&dir, Some(file), Prepare { last_logits_only: false, ..Prepare::default() }).unwrap();
        let rows = |e: &Engine| {
            let model = e.graph.plan.model();
            let fact = model.output_fact(e.graph.io.logits).unwrap();
            fact.shape[fact.rank() - 2].to_string()
        };
        assert_eq!((last.graph.last_logits_only, all.graph.last_logits_only), (cut, false), "{model} {file}");
        assert_eq!((rows(&last), rows(&all)), (if cut { "1" } else { "S" }.to_string(), "S".to_string()), "{model} {file}");
        for prompt in [&PROMPT[..], &long] {
            let (a, ta) = engine_run(&last, prompt, 3, 16);
            let (b, tb) = engine_run(&all, prompt, 3, 16);
            assert_eq!(a, b, "{model} {file} {} tokens", prompt.len());
            assert_eq!(ta, tb, "{model} {file} {} tokens", prompt.len());
        }
    }
}

/// ONNX Runtime's `MatMulNBits` files (its own quantizer's output: 8 and 4 bits, blocks of 32
/// and 128, with zero points or without) run on the block kernels (src/qmatmul/nbits.rs), every
/// product of the file, and give ONNX Runtime's logits on the same file (computed in float:
/// no accuracy_level) and its greedy tokens. Llama only: the quantizer leaves GPT-2's `Gemm`s
/// as they are. 8 bits with zero points (weights less zero point outside INT8: the zero
/// points' rest subtracted after the product) included.
#[test]
fn matmulnbits_files_run_on_the_block_kernels_and_match_onnxruntime() {
    for model in ["tiny-llama"] {
        let dir = nbits_bundle(model, &["8:32", "4:32", "4:128:asym", "8:128", "8:128:asym", "8:32:asym"]);
        for file in ["model.with_past.nbits8-b32.onnx", "model.with_past.nbits4-b32.onnx",
                     "model.with_past.nbits4-b128-asym.onnx", "model.with_past.nbits8-b128.onnx",
                     "model.with_past.nbits8-b128-asym.onnx", "model.with_past.nbits8-b32-asym.onnx"] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let proto = wasmlm::graph::decode_proto(&bytes[..]).unwrap();
            let products = proto.graph.unwrap().node.iter().filter(|n| n.op_type == "MatMulNBits").count();
            let engine = load(&dir, file);
            assert!(products > 0 && engine.graph.fused == products, "{model} {file}: {} of {products} on our kernels", engine.graph.fused);
            let (ref_logits, ref_tokens) = reference(&dir, file, &PROMPT, 3, 32);
            let (logits, tokens) = engine_run(&engine, &PROMPT, 3, 32);
            for (step, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-3, "{model} {file} step {step}: logits differ by {d}");
            }
            assert_eq!(tokens, ref_tokens, "{model} {file}: greedy tokens");
        }
    }
}
