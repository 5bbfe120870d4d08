"""./build.sh site's models folder: the page's files only, in parts a static host accepts."""
from __future__ import annotations

import hashlib
import json

import pytest

from wasmlm_models import site


def test_large_files_are_split_into_checked_parts(tiny_bundles, tmp_path):
    src = tiny_bundles["tiny-llama"]
    max_part = 256 << 10
    site.build([src], tmp_path, max_part, "int8")
    out = tmp_path / "tiny-llama"
    m = json.loads((out / "manifest.json").read_text())
    names = {e["name"] for e in m["files"]}
    # "int8": the INT8 files with a KV cache and the tokenizer files; FP32 and no-cache files stay out
    assert "model.with_past.int8.onnx" in names and "model.with_past.ort-dynamic-qint8.onnx" in names
    assert "tokenizer.json" in names
    assert not {"model.onnx", "model.with_past.onnx", "model.int8.onnx"} & names
    split = [e for e in m["files"] if "parts" in e]
    assert split, "no file of tiny-llama is over 256 KiB: the test would check nothing"
    for entry in split:
        assert not (out / entry["name"]).exists(), "a split file is also served whole"
        whole = b""
        for part in entry["parts"]:
            data = (out / part["name"]).read_bytes()
            assert len(data) == part["bytes"] <= max_part
            assert hashlib.sha256(data).hexdigest() == part["sha256"]
            whole += data
        assert len(whole) == entry["bytes"]
        assert hashlib.sha256(whole).hexdigest() == entry["sha256"] == \
            hashlib.sha256((src / entry["name"]).read_bytes()).hexdigest()
    for entry in m["files"]:
        if "parts" not in entry:
            assert (out / entry["name"]).stat().st_size == entry["bytes"] <= max_part
    every = [p.stat().st_size for p in out.iterdir()]
    assert max(every) <= max_part
    assert json.loads((tmp_path / "index.json").read_text()) == {"models": ["tiny-llama"]}


def test_the_choice_of_files(tiny_bundles, tmp_path):
    def names(choice):
        site.build([tiny_bundles["tiny-gpt2"]], tmp_path / choice, choice=choice)
        m = json.loads((tmp_path / choice / "tiny-gpt2" / "manifest.json").read_text())
        return {e["name"] for e in m["files"] if e["kind"] == "onnx"}
    assert names("default") == {"model.with_past.int8.onnx"}
    assert names("int8") == {"model.with_past.int8.onnx", "model.with_past.ort-dynamic-qint8.onnx"}
    assert {"model.onnx", "model.with_past.onnx", "model.int8.onnx"} <= names("all")
    with pytest.raises(ValueError, match="expected one of"):
        site.build([tiny_bundles["tiny-gpt2"]], tmp_path / "x", choice="fp32")


def test_a_bundle_that_does_not_match_its_manifest_is_refused(tiny_bundles, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    m = json.loads((tiny_bundles["tiny-gpt2"] / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(m))
    for e in m["files"]:
        (bad / e["name"]).write_bytes(b"short")
    with pytest.raises(ValueError, match="its manifest says"):
        site.build([bad], tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="not a built bundle"):
        site.build([tmp_path / "missing"], tmp_path / "site")


def gguf_folder(path, model, data=b"GGUF" + bytes(range(256)) * 3000, source=None):
    """A folder as `python -m wasmlm_models gguf` writes it (the site step reads only its listing
    and copies the bytes, so any bytes do). `source`: the sha256 of what it was written from
    (the tiny bundles' provenance has none)."""
    path.mkdir(parents=True)
    (path / "model.q8_0.gguf").write_bytes(data)
    entry = {"name": "model.q8_0.gguf", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "type": "Q8_0"}
    listing = {"model": model, "files": [entry]}
    if source:
        listing["source"] = {"sha256": source}
    (path / "gguf.json").write_text(json.dumps(listing))
    return path


def test_the_wllama_peer_gets_the_gguf_of_its_model_in_parts(tiny_bundles, tmp_path):
    g = gguf_folder(tmp_path / "tiny-llama-gguf", "tiny-llama")
    max_part = 256 << 10
    site.build([tiny_bundles["tiny-llama"], tiny_bundles["tiny-gpt2"]], tmp_path / "site", max_part, gguf=[g])
    m = json.loads((tmp_path / "site" / "tiny-llama" / "manifest.json").read_text())
    peer = m["peers"]["wllama"]
    assert peer["type"] == "Q8_0" and len(peer["parts"]) == 3
    whole = b"".join((tmp_path / "site" / "tiny-llama" / p["name"]).read_bytes() for p in peer["parts"])
    assert whole == (g / "model.q8_0.gguf").read_bytes()
    assert hashlib.sha256(whole).hexdigest() == peer["sha256"] and len(whole) == peer["bytes"]
    assert "peers" not in json.loads((tmp_path / "site" / "tiny-gpt2" / "manifest.json").read_text())


def test_a_gguf_folder_that_does_not_fit_is_refused(tiny_bundles, tmp_path):
    other = gguf_folder(tmp_path / "other", "smollm2-135m")
    with pytest.raises(ValueError, match="GGUF folders of models the site does not hold"):
        site.build([tiny_bundles["tiny-llama"]], tmp_path / "a", gguf=[other])
    cut = gguf_folder(tmp_path / "cut", "tiny-llama")
    (cut / "model.q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="not the size gguf.json gives"):
        site.build([tiny_bundles["tiny-llama"]], tmp_path / "b", gguf=[cut])
    stale = gguf_folder(tmp_path / "stale", "tiny-llama", source="0" * 64)
    with pytest.raises(ValueError, match="written from another source"):
        site.build([tiny_bundles["tiny-llama"]], tmp_path / "d", gguf=[stale])
    with pytest.raises(FileNotFoundError, match="not a finished GGUF folder"):
        site.build([tiny_bundles["tiny-llama"]], tmp_path / "c", gguf=[tmp_path / "missing"])
