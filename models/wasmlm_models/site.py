"""Built bundles -> the models of a static site: what the page offers, in parts a host accepts.

Free static hosts cap a file's size (Cloudflare Pages: 25 MiB; GitHub Pages: 100 MiB), so each
file larger than `max_part` is written as `<name>.part-<k>` files of at most that size. The
site's manifest.json is the bundle's, with only the files the site holds and, for a file in
parts, `parts: [{name, bytes, sha256}]` in order; the file's own `bytes` and `sha256` stay, so
the page checks each part and the engine the whole (docs/decisions.md, "Static hosting").
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
# file (the site then stays under 400 MB with every wasm build); `int8`, every INT8 file with a
# KV cache (the ort-dynamic-qint8 file alone is 238 MiB for SmolLM2); `all`, FP32 and no-cache too.
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


def bundle_into(bundle: Path, out: Path, max_part: int = MAX_PART, choice: str = "default") -> dict:
    """One bundle folder -> `out` (created); returns the site's manifest."""
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
    files.write_json(out / "manifest.json", site_manifest)
    return site_manifest


def build(bundles: list[Path], out: Path, max_part: int = MAX_PART, choice: str = "default") -> list[str]:
    """Bundles -> `out/<id>/` each, and `out/index.json` listing them; returns the ids."""
    ids = []
    for bundle in bundles:
        if not (bundle / "manifest.json").is_file():
            raise FileNotFoundError(f"{bundle}/manifest.json: not a built bundle (./build.sh models)")
        if choice not in CHOICES:
            raise ValueError(f"files: {choice!r}, expected one of {', '.join(CHOICES)}")
        ids.append(bundle_into(bundle, out / bundle.name, max_part, choice)["id"])
    files.write_json(out / "index.json", {"models": [b.name for b in bundles]})
    return ids
