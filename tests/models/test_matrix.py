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
