"""`python -m wasmlm_models optimum`: a bundle's model exported by Optimum and quantized as
transformers.js's q8 and q4 files, as a bundle the benchmarks measure."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import manifest_of
from wasmlm_models import baselines, files, matrix, optimum_bundle
from wasmlm_models.baseline_runs import Shape
from wasmlm_models.runner import PastRunner, greedy_ort


def test_the_optimum_bundle_lists_its_q8_and_q4_files_and_they_run(tiny_bundles, tmp_path):
    src = tiny_bundles["tiny-llama"]
    hf = baselines.hf_folder(manifest_of(src), tmp_path / "hf")
    out = tmp_path / "optimum"
    assert optimum_bundle.build(src, out, hf) == ["model_quantized.onnx", "model_q4.onnx"]
    m = manifest_of(out)
    onnx = [f for f in m["files"] if f["kind"] == "onnx"]
    assert [(f["name"], f["preset"], f["precision"]) for f in onnx] == [
        ("model_quantized.onnx", "optimum-q8", "int8"), ("model_q4.onnx", "optimum-q4", "int4")]
    assert m["id"] == manifest_of(src)["id"] and m["default"]["file"] == "model_quantized.onnx"
    assert not (out / "work").exists()
    for f in m["files"]:
        assert files.file_entry(out / f["name"]) == {k: f[k] for k in ("name", "bytes", "sha256")}
    for f in onnx:
        runner = PastRunner(out / f["name"], Shape(m["architecture"]), threads=1)
        assert runner.extra == ["attention_mask", "position_ids"]
        tokens, _ = matrix.ort_greedy(out / f["name"], matrix.PROMPT, 8)
        assert greedy_ort(runner, np.asarray(matrix.PROMPT, np.int64), 8) == tokens


def test_a_failed_run_leaves_a_whole_bundle_or_none(tiny_bundles, tmp_path):
    """An export that fails leaves the earlier bundle as it was; once a run starts replacing the
    files (files.derived_bundle), the earlier manifest is gone until the new one is written."""
    out = tmp_path / "optimum"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "model_q4.onnx").write_bytes(b"old")
    with pytest.raises(Exception):
        optimum_bundle.build(tiny_bundles["tiny-llama"], out, tmp_path / "no-such-folder")
    assert (out / "manifest.json").read_text() == "{}" and (out / "model_q4.onnx").read_bytes() == b"old"
    _, entries = files.derived_bundle(tiny_bundles["tiny-llama"], out)
    assert not (out / "manifest.json").exists() and not (out / "model_q4.onnx").exists()
    assert {e["name"] for e in entries} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "chat_template.jinja"}
