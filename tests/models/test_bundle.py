"""The bundle as a whole: manifest, hashes, skipping unchanged work, atomicity, bad input."""
from __future__ import annotations

import json
import os

import pytest

from conftest import manifest_of
from wasmlm_models import bundle, files, quantize, sources


def test_manifest_lists_every_file_with_size_and_sha256(tiny_bundles):
    for folder in tiny_bundles.values():
        m = manifest_of(folder)
        listed = {f["name"] for f in m["files"]}
        on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
        assert listed == on_disk
        for f in m["files"]:
            assert f["bytes"] == (folder / f["name"]).stat().st_size
            assert f["sha256"] == files.sha256_of(folder / f["name"])
        assert m["real_weights"] is False
        assert "random" in m["provenance"]["source"]
        assert m["default"] == {"precision": "int8", "preset": quantize.DEFAULT_PRESET,
                                "cache": "with_past", "file": "model.with_past.int8.onnx"}
        assert m["tokens"]["eos_ids"] and m["versions"]["transformers"].startswith("4.57")


def test_unchanged_inputs_are_skipped_and_damage_is_rebuilt(tiny_bundles, tmp_path):
    out = tmp_path / "b"
    bundle.build("tiny-llama", out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    bundle.build("tiny-llama", out)                      # nothing changed: kept as is
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with open(out / "model.int8.onnx", "r+b") as f:      # a damaged file: rebuilt
        f.write(b"garbage")
    assert not bundle.up_to_date(out, bundle.input_key("tiny-llama", bundle.DEFAULT_TEXT,
                                                       ["ort-dynamic-qint8", quantize.DEFAULT_PRESET]))
    bundle.build("tiny-llama", out)
    m = manifest_of(out)
    entry = next(f for f in m["files"] if f["name"] == "model.int8.onnx")
    assert files.sha256_of(out / "model.int8.onnx") == entry["sha256"]


def test_interrupted_build_leaves_no_bundle(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted")
    monkeypatch.setattr(quantize, "quantize", boom)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        bundle.build("tiny-gpt2", out)
    assert list(tmp_path.iterdir()) == []               # no bundle, no partial folder


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    files.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_offline_hub_id_names_the_default(monkeypatch):
    # This machine has no route to the hub; pointing the endpoint at a name that cannot resolve
    # makes the test mean the same on a machine that has one.
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    with pytest.raises(sources.SourceError, match="smollm2-135m"):
        sources.load("distilgpt2")


def test_missing_gguf_and_unsupported_architecture(tmp_path):
    with pytest.raises(sources.SourceError, match="not found"):
        sources.load(str(tmp_path / "nope.gguf"))
    from transformers import BertConfig, BertForMaskedLM
    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100)).save_pretrained(folder)
    with pytest.raises((sources.SourceError, ValueError), match="(?i)bert"):
        sources.load(str(folder))


def test_cli_reports_errors_without_traceback(capsys):
    from wasmlm_models.__main__ import main
    assert main(["bundle", "/no/such/model.gguf", "--out", "/tmp/never-written"]) == 2
    assert "not found" in capsys.readouterr().err
