"""The compatibility matrix's driver of ONNX Runtime (tests/matrix.rs holds the engine to it) and
its command's bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, manifest_of
from wasmlm_models import matrix
from wasmlm_models.baseline_runs import Shape
from wasmlm_models.runner import PastRunner, greedy_ort


@pytest.mark.parametrize("ref", ["tiny-gpt2", "tiny-llama"])
def test_the_matrix_feeds_a_file_as_the_baselines_do(tiny_bundles, ref):
    """On our own I/O names, its greedy tokens and logits are the PastRunner's, the driver every
    ONNX Runtime row and reference uses."""
    folder = tiny_bundles[ref]
    file = folder / "model.with_past.onnx"
    tokens, rows = matrix.ort_greedy(file, matrix.PROMPT, 8)
    runner = PastRunner(file, Shape(manifest_of(folder)["architecture"]), threads=1)
    assert tokens == greedy_ort(runner, np.asarray(matrix.PROMPT, np.int64), 8)
    runner.reset()
    first = runner(np.asarray([matrix.PROMPT], np.int64))[0, -1]
    assert rows.shape == (matrix.ROWS, first.shape[0])
    np.testing.assert_allclose(rows[0], first, rtol=0, atol=1e-5)


def test_unknown_families_and_a_missing_tokenizer_are_refused(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "wasmlm_models", "matrix", "--out", str(tmp_path / "m"), *args],
                              cwd=REPO / "models", capture_output=True, text=True)
    r = run("--tokenizer", str(tmp_path), "--families", "llama", "bert")
    assert r.returncode == 2 and "no family named bert" in r.stderr
    r = run("--tokenizer", str(tmp_path))
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr
    assert not (tmp_path / "m").exists()


def test_the_past_runner_feeds_optimum_files_as_the_matrix_does(tiny_bundles, tmp_path):
    """The baselines' ONNX Runtime rows (PastRunner) on an Optimum export: attention_mask,
    position_ids and Optimum's cache names fed, the same greedy tokens as the matrix's driver."""
    from transformers import AutoConfig

    from wasmlm_models.export_names import Shape as ModelShape
    hf = matrix.hf_model("llama", tmp_path / "hf", tiny_bundles["tiny-llama"])
    file = tmp_path / "model.onnx"
    matrix.export_optimum(hf, file)
    runner = PastRunner(file, ModelShape.of(AutoConfig.from_pretrained(hf)), threads=1)
    assert runner.extra == ["attention_mask", "position_ids"]
    assert runner.ins[1] == "past_key_values.0.key" and runner.outs[1] == "present.0.key"
    tokens, _ = matrix.ort_greedy(file, matrix.PROMPT, 8)
    assert greedy_ort(runner, np.asarray(matrix.PROMPT, np.int64), 8) == tokens


def test_a_file_that_lowers_its_precision_is_held_to_the_operators_arithmetic(tiny_bundles, tmp_path):
    """MatMulNBits with accuracy_level 4 (the genai builder's): the reference is ONNX Runtime on a
    copy at accuracy_level 0, which differs from ONNX Runtime on the file as it is, and the copy
    is gone afterwards; a file at the default level is its own reference."""
    from wasmlm_models import nbits
    src = tiny_bundles["tiny-llama"] / "model.with_past.onnx"
    lowered, exact = tmp_path / "lowered.onnx", tmp_path / "exact.onnx"
    nbits.quantize(src, lowered, 4, 32, symmetric=True, accuracy_level=4)
    nbits.quantize(src, exact, 4, 32, symmetric=True, accuracy_level=None)
    tokens, rows, note = matrix.reference(lowered, matrix.PROMPT, 4)
    assert note and "accuracy_level" in note and "asks for 4: INT8 activations" in note
    want_tokens, want_rows = matrix.ort_greedy(exact, matrix.PROMPT, 4)
    assert tokens == want_tokens
    np.testing.assert_array_equal(rows, want_rows)
    _, as_is = matrix.ort_greedy(lowered, matrix.PROMPT, 4)
    assert np.abs(as_is - rows).max() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact.onnx", "lowered.onnx"]
    assert matrix.reference(exact, matrix.PROMPT, 4)[2] is None
