"""The compatibility matrix's files: tiny random decoders of six families, exported by three
exporters, in the forms people publish, each with ONNX Runtime's greedy tokens on that very file.

`python -m wasmlm_models matrix --out build/matrix --tokenizer BUNDLE` writes
`<out>/<family>/<exporter>/<form>.onnx` (the genai builder's: `<form>/model.onnx` with its
external data), each with `<file>.ort-logits.f32`, and `<out>/index.json`: one cell per (family,
exporter, form), with the file and ORT's greedy tokens, or why the file could not be made (the
exporter does not take the family, or the quantizer failed), or why ORT could not run it.
tests/matrix.rs runs the engine on every file and holds it to those tokens and logits;
README.md's matrix is what that test wrote. The index is reused while its inputs (this code,
the packages' versions, the tokenizer) are the same.

- families: Llama, Qwen2, Phi-3, Gemma, GPT-2, Mistral (configs below; a weight scale of 0.1
  instead of 0.02 makes the logits peaked enough that a greedy choice is not a coin toss);
- exporters: ours (export.py, the engine's own I/O names), Optimum (`optimum-onnx`,
  `text-generation-with-past`: attention_mask, position_ids, `past_key_values.<i>.key`) and the
  onnxruntime-genai model builder (GroupQueryAttention, its own MatMulNBits; no GPT-2);
- forms, as transformers.js's repositories name them: fp32, fp16 (ONNX Runtime's float16
  converter, the cache in FP16 too), q8 (`quantize_dynamic`, QInt8 per tensor: transformers.js's
  "quantized"), MatMulNBits 4 and 8 bits, symmetric, blocks of 32 and 128 (q4 is 4 bits in 32),
  and q4f16 (q4, then FP16). genai's forms are its builder's own: fp32, fp16, int4 b32 and b128.

The reference is ONNX Runtime on the file, with one exception. A `MatMulNBits` with
`accuracy_level` 2-4 lets ONNX Runtime compute at lower precision (the genai builder writes 4:
its activations quantized to INT8 in each weight block, which moves its logits by ~1e-2 of their
range from its own FP32 product). Such a cell's reference is ONNX Runtime on a copy of the file
with `accuracy_level` 0: the same weights in the arithmetic the operator defines
(`"reference"` in the cell says so).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np

from .files import atomic_path, write_json

PROMPT = [1, 504, 3458, 282, 4649, 314, 2317, 260]
GREEDY = 16
ROWS = 4  # logits kept: after the prompt, and after each of the first three greedy tokens
SEED = 0


def _configs() -> dict:
    from transformers import (GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config)
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        "phi3": lambda: Phi3Config(**common, original_max_position_embeddings=256),
        # Gemma scales the embedding by sqrt(hidden) and ties the head: at small weights its
        # greedy token is the last input token, again and again
        "gemma": lambda: GemmaConfig(**{**common, "num_key_value_heads": 1, "initializer_range": 0.3},
                                     head_dim=16),
        "gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=49152, n_positions=256,
                                   initializer_range=0.1, bos_token_id=1, eos_token_id=2),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
    }


FAMILIES = ("llama", "qwen2", "phi3", "gemma", "gpt2", "mistral")
EXPORTERS = ("ours", "optimum", "genai")
FORMS = ("fp32", "fp16", "q8", "nbits4-b32", "nbits4-b128", "nbits8-b32", "nbits8-b128", "q4f16")
GENAI_FORMS = {"fp32": ("fp32", {}), "fp16": ("fp16", {}),
               "nbits4-b32": ("int4", {"int4_block_size": "32"}),
               "nbits4-b128": ("int4", {"int4_block_size": "128"})}
OURS = ("gpt2", "llama")  # export.py's wrapper; sources.SUPPORTED_ARCHS
GENAI = ("llama", "qwen2", "phi3", "gemma", "mistral")


def hf_model(family: str, out: Path, tokenizer: Path) -> Path:
    """A random model of `family` saved with SmolLM2's tokenizer files (the genai builder reads
    them)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(_configs()[family]()).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copyfile(tokenizer / name, out / name)
    return out


def export_ours(hf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    import onnx

    from . import export, onnx_graph
    from .export_names import Shape
    from .sources import load_args
    config = AutoConfig.from_pretrained(hf)
    if config.model_type not in OURS:
        raise Unsupported(f"this exporter takes {' and '.join(OURS)}")
    model = AutoModelForCausalLM.from_pretrained(hf, **load_args()).eval()  # as `bundle` does
    tmp = out.with_suffix(".traced.onnx")
    export.export(model, Shape.of(config), tmp, past=True)
    m = onnx.load(str(tmp))
    onnx_graph.store_tied_once(m)
    onnx.save(m, str(out))
    tmp.unlink()


def export_optimum(hf: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export
    work = out.parent / "optimum-export"
    shutil.rmtree(work, ignore_errors=True)
    main_export(str(hf), output=str(work), task="text-generation-with-past", do_validation=False)
    files = list(work.glob("*.onnx"))
    if [f.name for f in files] != ["model.onnx"] or list(work.glob("*.onnx_data")):
        raise RuntimeError(f"expected one model.onnx, got {sorted(p.name for p in work.iterdir())}")
    shutil.move(str(files[0]), out)
    shutil.rmtree(work)


def export_genai(hf: Path, out: Path, form: str) -> Path:
    """The builder's folder for one form, `out`: model.onnx with its weights in model.onnx.data
    (external data), genai_config.json and the tokenizer. Returns model.onnx."""
    precision, extra = GENAI_FORMS[form]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    if extra:
        cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    run = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out.parent / "cache", ignore_errors=True)
    if run.returncode != 0 or not (out / "model.onnx").is_file():
        raise RuntimeError(_last_line(run.stderr or run.stdout))
    return out / "model.onnx"


def fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
    onnx.save(m, str(dst))


def q8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=False)


def nbits(src: Path, dst: Path, bits: int, block: int) -> None:
    from . import nbits as nb
    nb.quantize(src, dst, bits, block, symmetric=True, accuracy_level=None)


class Unsupported(Exception):
    """The exporter does not take this family: the cell is "not made", not a failure."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no message)"


# ONNX Runtime on any of these graphs ----------------------------------------------------------

NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
      "tensor(int32)": np.int32}


def ort_greedy(path: Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from ONNX Runtime, fed as each exporter's own runtime feeds it: the cache
    from empty, attention_mask all ones over past + new, position_ids counting on; and the
    last position's logits (float32) of the first ROWS runs."""
    import onnxruntime as ort

    from .runner import session_options
    opts = session_options(1)
    # Basic optimizations only (constant folding, dead nodes): the graph's own arithmetic. ORT
    # 1.23's extended fusions fail on FP16 RMSNorm graphs ("InsertedPrecisionFreeCast_... does not
    # exist"), and with none at all its FP16 casts do not type-check. A file of s8 integer
    # products (MatMulInteger, q8) needs the extended level: that is where ORT applies
    # `session.x64quantprecision` (a graph rewrite to u8 weights), without which its products
    # saturate on an x86-64 CPU without VNNI (runner.session_options; docs/decisions.md).
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if _has_s8_products(path)
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    past_names = [n for n in ins if n not in ("input_ids", "attention_mask", "position_ids")]

    def present(name: str) -> str:
        for a, b in (("past_key_values", "present"), ("past_", "present_")):
            if name.startswith(a) and name.replace(a, b, 1) in outs:
                return name.replace(a, b, 1)
        raise ValueError(f"no output for the cache input {name}")

    past = {}
    for n in past_names:
        dims = ins[n].shape
        if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
            raise ValueError(f"cache input {n} has shape {dims}")
        past[n] = np.zeros((1, dims[1], 0, dims[3]), NP[ins[n].type])
    length, tokens, rows, feed_ids = 0, [], [], list(prompt)
    for _ in range(steps):
        ids = np.asarray([feed_ids], np.int64)
        feed = {"input_ids": ids.astype(NP[ins["input_ids"].type]), **past}
        total = length + len(feed_ids)
        if "attention_mask" in ins:
            feed["attention_mask"] = np.ones((1, total), NP[ins["attention_mask"].type])
        if "position_ids" in ins:
            feed["position_ids"] = np.arange(length, total, dtype=NP[ins["position_ids"].type])[None]
        wanted = ["logits", *[present(n) for n in past_names]]
        got = sess.run(wanted, feed)
        past = dict(zip(past_names, got[1:]))
        length = total
        last = np.asarray(got[0][0, -1], np.float32)
        if len(rows) < ROWS:
            rows.append(last)
        tokens.append(int(last.argmax()))
        feed_ids = [tokens[-1]]
    return tokens, np.stack(rows)


def _has_s8_products(path: Path) -> bool:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for n in model.graph.node)


def _defined_precision(path: Path) -> tuple[Path, int] | None:
    """If a MatMulNBits node of `path` lets ONNX Runtime lower its precision (`accuracy_level`
    2-4), a copy beside it (so its external data still resolves) with every `accuracy_level` 0,
    and the highest level the file asked for; otherwise None."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    levels = [a for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    asked = max((a.i for a in levels), default=0)
    if asked < 2:
        return None
    for a in levels:
        a.i = 0
    copy = path.with_name(path.stem + ".accuracy0.onnx")
    onnx.save(model, str(copy))
    return copy, asked


def reference(path: Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray, str | None]:
    """`ort_greedy` on the file, or on its defined-precision copy (module doc); with a note of
    which."""
    lowered = _defined_precision(path)
    if lowered is None:
        return (*ort_greedy(path, prompt, steps), None)
    copy, asked = lowered
    try:
        return (*ort_greedy(copy, prompt, steps),
                f"ONNX Runtime with MatMulNBits' accuracy_level set to 0 (the file asks for {asked}: "
                f"{ {2: 'FP16', 3: 'BF16', 4: 'INT8'}.get(asked, 'lower-precision')} activations)")
    finally:
        copy.unlink(missing_ok=True)


# The matrix -----------------------------------------------------------------------------------

def _make(family: str, exporter: str, form: str, hf: Path, folder: Path, made: dict) -> Path:
    out = folder / f"{form}.onnx"
    if exporter == "genai":
        if family not in GENAI:
            raise Unsupported("the builder does not take this family")
        if form not in GENAI_FORMS:
            raise Unsupported(f"the builder makes {', '.join(GENAI_FORMS)}")
        return export_genai(hf, folder / form, form)
    if form == "fp32":
        (export_ours if exporter == "ours" else export_optimum)(hf, out)
        return out
    base = made.get("fp32")
    if base is None:
        raise Unsupported("no fp32 file to derive it from")
    if form == "fp16":
        fp16(base, out)
    elif form == "q8":
        q8(base, out)
    elif form.startswith("nbits"):
        bits, block = form[len("nbits"):].split("-b")
        nbits(base, out, int(bits), int(block))
    elif form == "q4f16":
        q4 = made.get("nbits4-b32")
        if q4 is None:
            raise Unsupported("no q4 file to derive it from")
        fp16(q4, out)
    return out


def _stamp(families, exporters, tokenizer: Path) -> dict:
    """What the files depend on: this code, the exporters' and quantizers' versions, the
    tokenizer. An index with the same stamp is reused."""
    from importlib.metadata import version

    from .files import sha256_of
    here = Path(__file__).parent
    return {"code": [sha256_of(here / f) for f in ("matrix.py", "runner.py", "export.py", "nbits.py", "onnx_graph.py")],
            "versions": {p: version(p) for p in ("torch", "transformers", "optimum-onnx", "onnxruntime",
                                                 "onnxruntime-genai", "onnx")},
            "tokenizer": sha256_of(tokenizer / "tokenizer.json"),
            "families": list(families), "exporters": list(exporters)}


def build(out: Path, tokenizer: Path, families=FAMILIES, exporters=EXPORTERS) -> dict:
    stamp = _stamp(families, exporters, tokenizer)
    try:
        index = json.loads((out / "index.json").read_text())
        if index.get("stamp") == stamp:
            return index
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    cells = []
    for family in families:
        hf = hf_model(family, out / family / "hf", tokenizer)
        for exporter in exporters:
            folder = out / family / exporter
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            made: dict[str, Path] = {}
            for form in FORMS:
                cell = {"family": family, "exporter": exporter, "form": form}
                try:
                    path = _make(family, exporter, form, hf, folder, made)
                    made[form] = path
                    cell["file"] = str(path.relative_to(out))
                    cell["bytes"] = path.stat().st_size
                    side = [p.name for p in path.parent.glob(path.name + ".data")]
                    if side:
                        cell["external"] = side
                except Unsupported as e:
                    cell["not_made"] = str(e)
                except Exception as e:  # noqa: BLE001 - the cell says why it could not be made
                    cell["not_made"] = f"{type(e).__name__}: {_last_line(str(e)) or ''}"
                    traceback.print_exc(file=sys.stderr)
                if "file" in cell:
                    try:
                        cell["ort_greedy"], rows, note = reference(out / cell["file"], PROMPT, GREEDY)
                        if note:
                            cell["reference"] = note
                        logits = Path(cell["file"] + ".ort-logits.f32")
                        with atomic_path(out / logits) as tmp:
                            rows.astype("<f4").tofile(tmp)
                        cell["ort_logits"] = {"file": str(logits), "rows": len(rows)}
                    except Exception as e:  # noqa: BLE001
                        cell["ort_error"] = f"{type(e).__name__}: {_last_line(str(e))}"
                print(f"{family:8} {exporter:8} {form:12} "
                      f"{cell.get('not_made') or cell.get('ort_error') or cell['ort_greedy'][:6]}",
                      file=sys.stderr, flush=True)
                cells.append(cell)
    index = {"stamp": stamp, "prompt": PROMPT, "greedy": GREEDY, "families": list(families), "exporters": list(exporters),
             "forms": list(FORMS), "cells": cells}
    write_json(out / "index.json", index)
    return index
