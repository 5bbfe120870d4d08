"""Export checks on tiny random models: PyTorch vs ONNX Runtime, with past vs without, the
our I/O convention, the tied embedding stored once."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import manifest_of
from wasmlm_models import export, parity, sources

REFS = ("tiny-gpt2", "tiny-llama")


@pytest.fixture(scope="module", params=REFS)
def case(request, tiny_bundles):
    src = sources.load(request.param)
    return src, export.Shape.of(src.model.config), tiny_bundles[request.param]


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_no_past_matches_pytorch_for_batch_and_lengths(case):
    src, shape, folder = case
    sess = ort.InferenceSession(str(folder / "model.onnx"))
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 1), (1, 7), (3, 11)):     # none is the export's dummy (2, 3)
        ids = rng.integers(0, shape.vocab, (batch, seq))
        got = sess.run(["logits"], {"input_ids": ids})[0]
        assert np.abs(got - torch_logits(src.model, ids)).max() < 1e-4


def test_with_past_prefill_and_decode_match_pytorch(case):
    src, shape, folder = case
    ids = np.random.default_rng(2).integers(0, shape.vocab, (1, 9))
    runner = parity.PastRunner(folder / "model.with_past.onnx", shape)
    pieces = [runner(ids[:, :5])] + [runner(ids[:, i:i + 1]) for i in range(5, 9)]
    got = np.concatenate(pieces, axis=1)
    assert np.abs(got - torch_logits(src.model, ids)).max() < 1e-4
    # present grows by what was fed: (batch, kv_heads, 9, head_dim)
    assert runner.past[0].shape == (1, shape.kv_heads, 9, shape.head_dim)


def test_greedy_tokens_identical_for_32_steps(case):
    src, shape, folder = case
    prompt = np.array([11, 22, 33, 44], dtype=np.int64)
    ort_tokens = parity.greedy_ort(parity.PastRunner(folder / "model.with_past.onnx", shape), prompt, 32)
    assert ort_tokens == parity.greedy_torch(src.model, prompt, 32)


def test_manifest_records_parity_within_goals(case):
    _, _, folder = case
    p = manifest_of(folder)["parity"]
    assert p["tolerance"] == 1e-4          # tiny models: FP32's floor is far below 1e-4
    assert p["max_abs_logit_diff_with_past_vs_torch"] < 1e-4
    assert p["max_abs_logit_diff_no_past_vs_torch"] < 1e-4
    assert p["max_abs_logit_diff_with_past_vs_no_past"] < 1e-4
    assert p["greedy_identical_steps"] == p["greedy_steps"] == 32


def test_io_convention_is_past_key_indexed(case):
    _, shape, folder = case
    m = onnx.load(str(folder / "model.with_past.onnx"), load_external_data=False)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    L = shape.layers
    assert ins == ["input_ids"] + [f"past_key_{i}" for i in range(L)] + [f"past_value_{i}" for i in range(L)]
    assert outs == ["logits"] + [f"present_key_{i}" for i in range(L)] + [f"present_value_{i}" for i in range(L)]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[1].type.tensor_type.shape.dim]
    assert dims == ["batch", shape.kv_heads, "past_sequence", shape.head_dim]


def test_tied_embedding_stored_once(case):
    _, shape, folder = case
    m = onnx.load(str(folder / "model.onnx"))
    vocab_sized = [t.name for t in m.graph.initializer if shape.vocab in t.dims]
    assert len(vocab_sized) == 1, vocab_sized
    entry = next(f for f in manifest_of(folder)["files"] if f["name"] == "model.onnx")
    embedding_bytes = shape.vocab * shape.hidden * 4
    assert entry["tied_twice_bytes"] - entry["bytes"] >= 0.99 * embedding_bytes


def test_gqa_shape_recorded(tiny_bundles):
    arch = manifest_of(tiny_bundles["tiny-llama"])["architecture"]
    assert (arch["heads"], arch["kv_heads"], arch["head_dim"]) == (4, 2, 16)
