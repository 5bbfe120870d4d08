"""Artifacts on disk: atomic writes (temporary name, then rename) and sha256.

An interrupted run must leave no file that looks finished, so every output is written under
a temporary name in the same folder and renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

# The text for prompts and accuracy checks, kept in the repository (models/data/README.md).
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_of_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_entry(path: Path) -> dict:
    """What the manifest says of one file: its name, bytes and sha256."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def mib(n_bytes: int) -> float:
    return round(n_bytes / (1 << 20), 1)


def derived_bundle(bundle: Path, out: Path) -> tuple[dict, list[dict]]:
    """Starts a bundle `out` made from `bundle` (nbits.py, optimum_bundle.py): `bundle`'s files
    but its ONNX ones copied, another run's ONNX files removed. Returns the source manifest and
    the copied files' entries."""
    import json
    import shutil
    manifest = json.loads((bundle / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    # another run's manifest goes first: until finish_derived_bundle writes the new one, the
    # folder is plainly not a bundle, whatever stops the run
    (out / "manifest.json").unlink(missing_ok=True)
    for f in out.glob("*.onnx"):  # another run's forms
        f.unlink()
    for f in bundle.iterdir():
        if f.is_file() and f.suffix != ".onnx" and f.name != "manifest.json":
            shutil.copyfile(f, out / f.name)
    return manifest, [dict(f) for f in manifest["files"] if f["kind"] != "onnx"]


def finish_derived_bundle(out: Path, manifest: dict, entries: list[dict], names: list[str]) -> None:
    """Writes `out`'s manifest: `entries`, the first of `names` the default file."""
    first = next(e for e in entries if e["name"] == names[0])
    manifest = {**manifest, "files": entries,
                "default": {**manifest["default"], "file": names[0], "preset": first["preset"],
                            "precision": first["precision"]}}
    manifest.pop("fidelity", None)  # both measured the source bundle's files
    manifest.pop("parity", None)
    write_json(out / "manifest.json", manifest)
