"""Model reference -> bundle folder: the ONNX files, the tokenizer, and manifest.json.

The whole folder is built under a temporary name and renamed into place at the end, so an
interrupted run never leaves a bundle that looks finished. A bundle whose manifest records the
same input key (model identity, this code, the pinned packages, the text) and whose files still
match their sha256 is kept as it is.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from . import files, fidelity, onnx_graph, parity, quantize, sources
from .export_names import OPSET, io_names

MANIFEST_VERSION = 1
FIDELITY_TOKENS = 4096
DEFAULT_TEXT = files.DEFAULT_TEXT
CHECK_PROMPT = "What is the capital of France?"


def log(msg: str) -> None:
    print(f"[bundle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def file_names(preset: str) -> dict[str, str]:
    """(cache) -> file name for one precision; the manifest, not the name, is what readers use."""
    # ort-dynamic-qint8 says int8 already; the other presets get the suffix
    tag = {"fp32": "", quantize.DEFAULT_PRESET: ".int8"}.get(
        preset, f".{preset}" if "int8" in preset else f".{preset}-int8")
    return {"no_past": f"model{tag}.onnx", "with_past": f"model.with_past{tag}.onnx"}


def input_key(ref: str, text: Path, presets: list[str], torch: bool = False) -> str:
    here = Path(__file__).parent
    code = {p.name: files.sha256_of(p) for p in sorted(here.glob("*.py"))}
    lock = here.parent / "requirements.lock"
    return files.sha256_of_text(json.dumps({
        "ref": sources.identity(ref), "code": code, "presets": presets, "torch": torch,
        "lock": files.sha256_of(lock) if lock.exists() else None,
        "text": files.sha256_of(text)}, sort_keys=True))


def up_to_date(out: Path, key: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("input_key") != key:
        return False
    return all((out / f["name"]).is_file() and files.sha256_of(out / f["name"]) == f["sha256"]
               for f in manifest["files"])


def build(ref: str, out: Path, text: Path = DEFAULT_TEXT, presets: list[str] | None = None,
          force: bool = False, torch: bool = False) -> dict:
    """`torch`: export the default model by tracing it in PyTorch rather than from its GGUF."""
    presets = presets or ["ort-dynamic-qint8", quantize.DEFAULT_PRESET]
    key = input_key(ref, text, presets, torch)
    if not force and up_to_date(out, key):
        log(f"{out} is up to date (inputs unchanged, files match their sha256): skipped")
        return json.loads((out / "manifest.json").read_text())
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "work").mkdir(parents=True)
    try:
        manifest = _build_into(ref, staging, text, presets, torch)
        manifest["input_key"] = key
        shutil.rmtree(staging / "work")
        files.write_json(staging / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log(f"bundle ready: {out}")
    return manifest


def _build_into(ref: str, dst: Path, text: Path, presets: list[str], torch: bool) -> dict:
    log(f"loading {ref}")
    src = sources.load(ref, torch=torch)
    shape = src.shape
    roles = _export_fp32(src, shape, dst)
    for preset in presets:
        roles += _quantize(preset, shape, dst)
    tok_files = _save_tokenizer(src, dst)
    prompt = check_prompt(src)
    files_ = (dst / "model.onnx", dst / "model.with_past.onnx")
    if src.model is not None:
        log("parity: ONNX Runtime on the FP32 files vs PyTorch")
        checks = parity.check(src.model, shape, *files_, prompt)
    else:
        log("parity: ONNX Runtime, with-past file vs no-past file (the exporter is held to PyTorch's "
            "by tests/models/test_gguf_export.py)")
        checks = parity.check_onnx(shape, *files_, prompt)
    checks["chat_answer"] = _chat_answer(src, shape, dst, presets, prompt)
    measured = _fidelity(src, dst, text, presets, min(fidelity.WINDOW, shape.context))
    return _manifest(src, shape, dst, roles, tok_files, checks, measured, text)


def check_prompt(src) -> np.ndarray:
    """CHECK_PROMPT's token ids, through the chat template if the model has one."""
    if src.tokenizer.chat_template:
        ids = src.tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}],
                                                add_generation_prompt=True)
    else:
        ids = src.tokenizer(CHECK_PROMPT)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _chat_answer(src, shape, dst: Path, presets: list[str], prompt, steps: int = 16) -> dict:
    """Greedy answer of each with-past file to the check prompt, cut at the first EOS."""
    stop, answers = set(eos_ids(src)), {}
    for preset in ["fp32", *presets]:
        runner = parity.PastRunner(dst / file_names(preset)["with_past"], shape)
        tokens = parity.greedy_ort(runner, prompt, steps)
        cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
        answers[preset] = src.tokenizer.decode(tokens[:cut])
    log(f"greedy answers to {CHECK_PROMPT!r}: {answers}")
    return {"prompt": CHECK_PROMPT, "steps": steps, "answers": answers}


def _export_fp32(src, shape, dst: Path) -> list[dict]:
    """The FP32 files, the tied embedding stored once, and (in work/) the layout the traced
    exporter writes, with it stored twice: the ort-dynamic-qint8 preset's input."""
    roles = []
    for cache, past in (("no_past", False), ("with_past", True)):
        raw = dst / "work" / f"{cache}.tied-twice.onnx"
        if src.gguf is not None:
            from . import gguf_export
            log(f"writing FP32 {cache} from the GGUF (gguf_export, opset {OPSET})")
            onnx.save(gguf_export.build(src.gguf, past, tied_twice=True), str(raw))
            model = gguf_export.build(src.gguf, past)
            tied = ["lm_head.weight"] if src.gguf.tied else []
        else:
            from . import export
            log(f"exporting FP32 {cache} (legacy exporter, opset {OPSET})")
            export.export(src.model, shape, raw, past)
            model = onnx.load(str(raw))
            tied = onnx_graph.store_tied_once(model)
        final = dst / file_names("fp32")[cache]
        with files.atomic_path(final) as tmp:
            onnx.save(model, str(tmp))
        roles.append({**files.file_entry(final), "kind": "onnx", "precision": "fp32", "cache": cache,
                      "preset": None, "tied_weights_stored_once": tied,
                      "tied_twice_bytes": raw.stat().st_size})
    return roles


def _quantize(preset: str, shape, dst: Path) -> list[dict]:
    roles = []
    for cache in ("no_past", "with_past"):
        source = (dst / "work" / f"{cache}.tied-twice.onnx" if preset == "ort-dynamic-qint8"
                  else dst / file_names("fp32")[cache])
        final = dst / file_names(preset)[cache]
        log(f"quantizing {cache} with preset {preset}")
        with files.atomic_path(final) as tmp:
            quantize.quantize(source, tmp, preset, shape.vocab)
        roles.append({**files.file_entry(final), "kind": "onnx", "precision": "int8",
                      "cache": cache, "preset": preset})
    return roles


def _save_tokenizer(src, dst: Path) -> list[dict]:
    """The tokenizer's files as transformers saves them. Its chat template is in
    chat_template.jinja (transformers no longer writes it into tokenizer_config.json): kept, so
    that the bundle's own files, picked in the page or given to the CLI, chat too."""
    src.tokenizer.save_pretrained(str(dst / "work" / "tokenizer"))
    out = []
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        path = dst / "work" / "tokenizer" / name
        if path.exists():
            shutil.copy(path, dst / name)
            out.append({**files.file_entry(dst / name), "kind": "tokenizer"})
    return out


def _fidelity(src, dst: Path, text: Path, presets: list[str], window: int) -> dict:
    ids = fidelity.text_ids(src.tokenizer, text, FIDELITY_TOKENS)
    measured = {}
    for preset in presets:
        log(f"fidelity: {preset} INT8 vs FP32 on {FIDELITY_TOKENS} tokens of {text.name}")
        measured[preset] = fidelity.compare(dst / "model.onnx", dst / file_names(preset)["no_past"],
                                            ids, window)
    return {"text": text.name, "text_sha256": files.sha256_of(text), "by_preset": measured}


def eos_ids(src) -> list[int]:
    ids = set()
    for value in (*src.config_eos(), src.tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    # Instruct models end a turn with <|im_end|>, which the chat template writes.
    template = src.tokenizer.chat_template or ""
    end = src.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if "<|im_end|>" in template and isinstance(end, int):
        ids.add(end)
    return sorted(ids)


def _manifest(src, shape, dst, roles, tok_files, checks, measured, text) -> dict:
    import onnxruntime, transformers  # noqa: E401 (versions only)
    torch = None
    if src.model is not None:
        import torch
    ins, outs = io_names(shape.layers, past=True)
    return {
        "manifest_version": MANIFEST_VERSION,
        "id": src.name, "real_weights": src.real_weights, "provenance": src.provenance,
        "architecture": vars(shape),
        "tokens": {"eos_ids": eos_ids(src), "bos_id": src.tokenizer.bos_token_id,
                   "chat_template": src.tokenizer.chat_template},
        "io": {"with_past": {"inputs": ins, "outputs": outs,
                             "past_layout": "(batch, kv_heads, past_sequence, head_dim)",
                             "first_step": "past of length 0"},
               "no_past": {"inputs": ["input_ids"], "outputs": ["logits"]}},
        "default": {"precision": "int8", "preset": quantize.DEFAULT_PRESET, "cache": "with_past",
                    "file": file_names(quantize.DEFAULT_PRESET)["with_past"]},
        "presets": {p: quantize.describe(p) for p in measured["by_preset"]},
        "files": roles + tok_files,
        "parity": checks, "fidelity": measured,
        "versions": {"python": platform.python_version(), "torch": torch.__version__ if torch else None,
                     "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "opset": OPSET},
    }
