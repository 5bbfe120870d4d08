"""Built bundles -> the models of a static site: what the page offers, in parts a host accepts.

Free static hosts cap a file's size (Cloudflare Pages: 25 MiB; GitHub Pages: 100 MiB), so each
file larger than `max_part` is written as `<name>.part-<k>` files of at most that size. The
site's manifest.json is the bundle's, with only the files the site holds and, for a file in
parts, `parts: [{name, bytes, sha256}]` in order; the file's own `bytes` and `sha256` stay, so
the page checks each part and the engine the whole (docs/decisions.md, "Static hosting").

With `gguf` folders (gguf_files.py), a bundle of the same model also gets the Q8_0 GGUF of its
weights, in parts too, as the manifest's `peers.wllama`: the file the benchmark mode's wllama peer
(llama.cpp in wasm) runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from . import files

MAX_PART = 25 << 20


# Which model files a site holds, besides the tokenizer files: `default`, each bundle's default
# file (the site then stays under build.sh's cap with every wasm build); `int8`, every INT8 file
# with a KV cache (the ort-dynamic-qint8 file alone is 238 MiB for SmolLM2); `all`, FP32 and
# no-cache too.
CHOICES = ("default", "int8", "all")


def offered(entry: dict, manifest: dict, choice: str) -> bool:
    if entry.get("kind") != "onnx":
        return True
    if choice == "default":
        return entry["name"] == manifest["default"]["file"]
    return choice == "all" or (entry.get("precision") == "int8" and entry.get("cache") == "with_past")


def split(src: Path, dst_dir: Path, max_part: int) -> list[dict]:
    """Write `src` as parts of at most `max_part` bytes into `dst_dir`; their manifest entries."""
    parts = []
    with open(src, "rb") as f:
        for k in range(10_000):
            block = f.read(max_part)
            if not block:
                break
            part = dst_dir / f"{src.name}.part-{k:03d}"
            with files.atomic_path(part) as tmp:
                tmp.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def place(src: Path, dst: Path) -> None:
    """A file that needs no split: a hard link where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# The GGUF form the wllama peer runs: llama.cpp's 8-bit blocks of 32, the same format as the
# default `q8b32` file's weights.
PEER_GGUF = "Q8_0"


def gguf_listing(gguf_dir: Path) -> dict:
    """A gguf folder's gguf.json (written last: without it the folder is not finished)."""
    listing = gguf_dir / "gguf.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing}: not a finished GGUF folder (python -m wasmlm_models gguf)")
    return json.loads(listing.read_text())


def peer_gguf(gguf_dir: Path, manifest: dict) -> tuple[Path, dict]:
    """The Q8_0 file of a gguf folder written from the bundle's source, checked, and its entry."""
    meta = gguf_listing(gguf_dir)
    model_id = manifest["id"]
    if meta.get("model") != model_id:
        raise ValueError(f"{gguf_dir} holds {meta.get('model')}'s GGUF files, not {model_id}'s")
    if meta.get("source", {}).get("sha256") != manifest.get("provenance", {}).get("sha256"):
        raise ValueError(f"{gguf_dir} was written from another source than {model_id}'s bundle: "
                         "rebuild it (./build.sh models)")
    entry = next((e for e in meta["files"] if e.get("type") == PEER_GGUF), None)
    if entry is None:
        raise ValueError(f"{gguf_dir / 'gguf.json'}: no {PEER_GGUF} file")
    src = gguf_dir / entry["name"]
    if not src.is_file() or src.stat().st_size != entry["bytes"]:
        raise ValueError(f"{src}: missing or not the size gguf.json gives: rebuild it")
    return src, {k: entry[k] for k in ("name", "bytes", "sha256", "type")}


def bundle_into(bundle: Path, out: Path, max_part: int = MAX_PART, choice: str = "default",
                gguf_dir: Path | None = None) -> dict:
    """One bundle folder -> `out` (created), with the wllama peer's GGUF from `gguf_dir` if
    given; returns the site's manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    for entry in manifest["files"]:
        if not offered(entry, manifest, choice):
            continue
        src = bundle / entry["name"]
        if src.stat().st_size != entry["bytes"]:
            raise ValueError(f"{src}: {src.stat().st_size} bytes, its manifest says {entry['bytes']}: rebuild the bundle")
        if entry["bytes"] > max_part:
            entry = {**entry, "parts": split(src, out, max_part)}
        else:
            place(src, out / entry["name"])
        kept.append(entry)
    if manifest["default"]["file"] not in {e["name"] for e in kept}:
        raise ValueError(f"{bundle}: the default file {manifest['default']['file']} is not among the site's files")
    site_manifest = {**manifest, "files": kept}
    if gguf_dir is not None:
        src, entry = peer_gguf(gguf_dir, manifest)
        if entry["bytes"] > max_part:
            entry["parts"] = split(src, out, max_part)
        else:
            place(src, out / entry["name"])
        site_manifest["peers"] = {"wllama": entry}
    files.write_json(out / "manifest.json", site_manifest)
    return site_manifest


def build(bundles: list[Path], out: Path, max_part: int = MAX_PART, choice: str = "default",
          gguf: list[Path] = ()) -> list[str]:
    """Bundles -> `out/<id>/` each, and `out/index.json` listing them; returns the ids. Each
    `gguf` folder goes with the bundle of its model, which must be among `bundles`."""
    ids = []
    ggufs = {}
    for g in gguf:
        ggufs[gguf_listing(g).get("model")] = g
    for bundle in bundles:
        if not (bundle / "manifest.json").is_file():
            raise FileNotFoundError(f"{bundle}/manifest.json: not a built bundle (./build.sh models)")
        if choice not in CHOICES:
            raise ValueError(f"files: {choice!r}, expected one of {', '.join(CHOICES)}")
        model_id = json.loads((bundle / "manifest.json").read_text())["id"]
        ids.append(bundle_into(bundle, out / bundle.name, max_part, choice, ggufs.pop(model_id, None))["id"])
    if ggufs:
        raise ValueError(f"GGUF folders of models the site does not hold: {', '.join(map(str, ggufs.values()))}")
    files.write_json(out / "index.json", {"models": [b.name for b in bundles]})
    return ids
