"""The native baseline table: the distilgpt2 study's rows, re-measured on our bundles, one process per row.

baselines.json = {schema, machine, protocol, models: {id: prompt}, rows: [row...]}; a row is keyed
by (model, backend, precision, preset, cache, threads), so the Rust bench can append or replace
its own rows ("tract native") in the same file. baselines.md renders it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import baseline_runs, files, machine, sources

SCHEMA = 1
PROMPT_TOKENS = 32
KEY = ("model", "backend", "precision", "preset", "cache", "threads")


def log(msg: str) -> None:
    print(f"[baselines {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompt_ids(bundle: Path, text: Path) -> list[int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tok.encode(text.read_text(encoding="utf-8")[:2000], add_special_tokens=False).ids
    return ids[:PROMPT_TOKENS]


def hf_folder(manifest: dict, cache_dir: Path) -> Path:
    """The bundle's model as an FP32 Hugging Face folder, saved once, for the PyTorch rows."""
    out = cache_dir / manifest["id"]
    if (out / "config.json").exists():
        return out
    src = sources.load(manifest["id"], torch=True)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    src.model.save_pretrained(str(staging))
    src.tokenizer.save_pretrained(str(staging))
    staging.rename(out)
    return out


def specs(bundle: Path, manifest: dict, hf: Path, prompt: list[int], threads: list[int],
          gguf: Path | None = None, llama_python: str | None = None) -> list:
    """Every row of one bundle; with `gguf` (a folder of gguf_files.py for the same model), the
    llama.cpp rows too, each run by `llama_python` (the venv with llama-cpp-python)."""
    ggufs = []
    if gguf is not None:
        listing = json.loads((gguf / "gguf.json").read_text())
        if listing["model"] != manifest["id"]:
            raise ValueError(f"{gguf} holds {listing['model']}, not {manifest['id']}")
        ggufs = listing["files"]
    base = {"model": manifest["id"], "real_weights": manifest["real_weights"], "prompt_ids": prompt,
            "shape": manifest["architecture"], "hf_folder": str(hf)}
    out = []
    for t in threads:
        for backend, precision in (("pytorch", "fp32"), ("pytorch", "int8"), ("bitsandbytes", "int8")):
            out.append({**base, "backend": backend, "precision": precision, "cache": "with_past",
                        "preset": {"fp32": None, "int8": "torch dynamic qint8"}[precision]
                        if backend == "pytorch" else "LLM.int8 (load_in_8bit)", "threads": t})
        for f in manifest["files"]:
            if f["kind"] == "onnx":
                out.append({**base, "backend": "onnxruntime", "precision": f["precision"],
                            "preset": f["preset"], "cache": f["cache"], "threads": t,
                            "file": str(bundle / f["name"]), "file_bytes": f["bytes"]})
        for g in ggufs:
            out.append({**base, "backend": "llama.cpp", "precision": GGUF_PRECISION[g["type"]],
                        "preset": f"{g['type']} GGUF", "cache": "with_past", "threads": t,
                        "file": str(gguf / g["name"]), "file_bytes": g["bytes"],
                        "python": llama_python or sys.executable})
    return out


GGUF_PRECISION = {"Q8_0": "int8", "Q4_1": "int4"}


def measure(spec: dict) -> dict:
    """Run one row in a fresh process; a failure becomes a row that says why, not a number."""
    python = spec.pop("python", None) or sys.executable
    proc = subprocess.run([python, "-m", "wasmlm_models", "row", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    row = {k: spec.get(k) for k in (*KEY, "real_weights", "file_bytes")}
    row["file"] = Path(spec["file"]).name if "file" in spec else None
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {**row, "error": err[-1] if err else f"exit code {proc.returncode}"}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


def versions() -> dict:
    """The versions of what measured the rows (PyTorch and bitsandbytes where installed: the
    first command's table has only ONNX Runtime and tract rows, measured without them)."""
    import importlib.metadata
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": sys.version.split()[0], **{k: version(k) for k in
            ("torch", "transformers", "onnxruntime", "bitsandbytes")}}


def merge(path: Path, new_rows: list[dict], header: dict) -> dict:
    """Replace rows with the same key, keep the others (e.g. the Rust bench's)."""
    table = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keys = {tuple(r.get(k) for k in KEY) for r in new_rows}
    kept = [r for r in table.get("rows", []) if tuple(r.get(k) for k in KEY) not in keys]
    models = {**table.get("models", {}), **header.pop("models")}
    # what measured the kept rows stays named (a llama.cpp run does not know PyTorch's version)
    versions = {**table.get("versions", {}), **{k: v for k, v in header.pop("versions").items() if v}}
    return {"schema": SCHEMA, **header, "versions": versions, "models": models, "rows": kept + new_rows}


def build(bundles: list[Path], out: Path, text: Path, threads: list[int], cache_dir: Path,
          backends: list[str] | None = None, only_files: list[str] | None = None,
          gguf: Path | None = None, llama_python: str | None = None) -> dict:
    rows, models = [], {}
    for bundle in map(Path.resolve, bundles):
        manifest = json.loads((bundle / "manifest.json").read_text())
        prompt = prompt_ids(bundle, text)
        models[manifest["id"]] = {"prompt_ids": prompt, "prompt_source": f"first tokens of {text.name}",
                                  "real_weights": manifest["real_weights"]}
        # the PyTorch rows' model folder (not needed when only ONNX files are measured)
        wants_torch = not backends or {"pytorch", "bitsandbytes"} & set(backends)
        hf = hf_folder(manifest, cache_dir) if wants_torch and not only_files else None
        for spec in specs(bundle, manifest, hf, prompt, threads, gguf, llama_python):
            if backends and spec["backend"] not in backends:
                continue
            if only_files and Path(spec.get("file") or "").name not in only_files:
                continue
            log(f"{spec['model']}: {spec['backend']} {spec['precision']} {spec.get('preset') or ''} "
                f"{spec['cache']} x{spec['threads']} thread(s)")
            rows.append(measure(spec))
            log(f"  -> {summary_of(rows[-1])}")
    llama = sorted({r["llama_cpp"] for r in rows if r.get("llama_cpp")})
    header = {"machine": machine.cpu(), "versions": {**versions(), "llama-cpp-python": ", ".join(llama)},
              "models": models,
              "protocol": {"batch": 1, "prompt_tokens": PROMPT_TOKENS,
                           "new_tokens": baseline_runs.NEW_TOKENS, "eos": "ignored",
                           "warmup_runs": 1, "runs": baseline_runs.RUNS,
                           "statistics": "median and p90 over runs; a run's decode ms/token is "
                                         "the mean of its 63 decode steps",
                           "no_past": "latency of one inference over the prompt",
                           "peak_rss": "whole process, Python and libraries included",
                           "wasm_memory": "the wasm module's memory after the runs (it never shrinks: "
                                          "the load's peak)"}}
    table = merge(out, rows, header)
    files.write_json(out, table)
    files.write_text(out.with_suffix(".md"), render(table))
    return table


def summary_of(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    if "latency_ms" in row:
        return f"{row['latency_ms']['median']} ms per {row['prompt_tokens']}-token inference"
    return (f"decode {row['decode_ms_per_token']['median']} ms/token, "
            f"prefill {row['prefill_ms']['median']} ms")


def render(table: dict) -> str:
    m = table["machine"]
    lines = [f"# Native baselines\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, SIMD {' '.join(m['simd'])}. "
             f"Protocol: {json.dumps(table['protocol'])}\n",
             "| model | backend | precision | preset | cache | threads | decode ms/token (median / p90) "
             "| prefill or no-cache ms (median / p90) | file MiB | peak RSS MiB | wasm memory MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        real = table.get("models", {}).get(r["model"], {}).get("real_weights", r.get("real_weights"))
        label = r["model"] + (" (random weights)" if real is False else "")
        head = f"| {label} | {r['backend']} | {r['precision']} | {r.get('preset') or ''} | " \
               f"{r['cache']} | {r['threads']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | |")
            continue
        dec = r.get("decode_ms_per_token")
        pre = r.get("prefill_ms") or r.get("latency_ms")
        size = files.mib(r["file_bytes"]) if r.get("file_bytes") else ""
        decode = f"{dec['median']} / {dec['p90']}" if dec else "-"
        first = f"{pre['median']} / {pre['p90']}" if pre else "-"
        lines.append(f"{head} {decode} | {first} | {size} | "
                     f"{r.get('peak_rss_mib', '')} | {r.get('wasm_memory_mib', '')} |")
    return "\n".join(lines) + "\n"


def render_page(table: dict, command: str, measured: float) -> str:
    """docs/benchmarks.md: the table with what it was measured on, when (`measured`: the table
    file's time, as seconds since the epoch) and by which command."""
    import datetime
    m = table["machine"]
    when = datetime.datetime.fromtimestamp(measured, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(table)
    body = text[text.index("| model |"):]  # the table, without render's own title and machine line
    versions = ", ".join(f"{k} {v}" for k, v in sorted(table.get("versions", {}).items()))
    return (f"# Benchmarks\n\nMeasured by `{command}`, its table written {when}; generated from it, do "
            f"not edit by hand.\n\n"
            f"- Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB, "
            f"SIMD {' '.join(m['simd'])}, {m.get('os', '')}.\n"
            f"- Versions: {versions}.\n"
            f"- Protocol: {json.dumps(table['protocol'])}.\n"
            f"- Rows: one process each, measured one after another in that run; compare rows of one "
            f"run only. tract wasm and onnxruntime-web rows ran in Node's V8.\n{saturating_note(m)}\n{body}")


def saturating_note(m: dict) -> str:
    """A bullet for an x86-64 CPU without VNNI, where ONNX Runtime's rows time products that
    saturate on full-range weights (docs/decisions.md), else nothing."""
    simd = set(m.get("simd", []))
    if not simd & {"sse4_2", "avx2"} or simd & {"avx512_vnni", "avx_vnni"}:
        return ""
    return ("- This CPU has no VNNI: on files quantized without `reduce_range` (Optimum's q8), ONNX Runtime's "
            "rows time its default u8 x s8 products, which saturate there and give wrong sums (docs/decisions.md, "
            "\"ONNX Runtime as a reference on CPUs without VNNI\").\n")
