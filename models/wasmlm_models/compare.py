"""Tract native against ONNX Runtime on the same file, measured alternately: decode ms/token and
the prefill of the bench prompt.

This machine's memory bandwidth drifts within minutes (ONNX Runtime on one file: 3.2 ms/token,
then 4.0 a few minutes later), so two rows measured minutes apart carry the drift into their
ratio. Here each round measures ONNX Runtime's row, then tract's, back to back (each in its own
process, the baseline protocol: 32-token prompt, 64 new tokens, median over 5 runs), and the
ratio is taken within the round; the table gives every round's ratio and their median.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from . import baselines, files


def tract_row(tract: Path, bundle: Path, file: str, threads: int, text: Path) -> dict:
    proc = subprocess.run([str(tract), "bench-row", "--bundle", str(bundle), "--file", file, "--runs", "5",
                           "--text", str(text), "--threads", str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tract bench-row {file} x{threads}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build(bundles: list[Path], out: Path, tract: Path, text: Path, threads: list[int], rounds: int,
          only_files: list[str] | None) -> dict:
    results = []
    for bundle in map(Path.resolve, bundles):
        manifest = json.loads((bundle / "manifest.json").read_text())
        prompt = baselines.prompt_ids(bundle, text)
        for f in manifest["files"]:
            if f["kind"] != "onnx" or f["precision"] != "int8" or f["cache"] != "with_past":
                continue
            if only_files and f["name"] not in only_files:
                continue
            for t in threads:
                # the baselines' own ONNX Runtime row for this file (no PyTorch folder needed)
                spec = next(s for s in baselines.specs(bundle, manifest, None, prompt, [t])
                            if s["backend"] == "onnxruntime" and Path(s["file"]).name == f["name"])
                pairs = []
                for r in range(rounds):
                    ort = baselines.measure(spec)
                    if "error" in ort:
                        raise RuntimeError(f"onnxruntime {f['name']} x{t}: {ort['error']}")
                    ours = tract_row(tract, bundle, f["name"], t, text)
                    pair = {"at": time.strftime("%H:%M:%S"),
                            "onnxruntime": ort["decode_ms_per_token"]["median"],
                            "tract": ours["decode_ms_per_token"]["median"]}
                    pair["ratio"] = round(pair["tract"] / pair["onnxruntime"], 3)
                    pair["prefill"] = {"onnxruntime": ort["prefill_ms"]["median"], "tract": ours["prefill_ms"]["median"]}
                    pair["prefill"]["ratio"] = round(pair["prefill"]["tract"] / pair["prefill"]["onnxruntime"], 3)
                    pairs.append(pair)
                    baselines.log(f"{manifest['id']} {f['name']} x{t} round {r + 1}: decode tract {pair['tract']} ms, "
                                  f"onnxruntime {pair['onnxruntime']} ms, ratio {pair['ratio']}; prefill ratio "
                                  f"{pair['prefill']['ratio']}")
                results.append({"model": manifest["id"], "file": f["name"], "preset": f["preset"], "threads": t,
                                "int8_kernels": ours.get("int8_kernels"), "rounds": pairs,
                                "median_ratio": round(statistics.median(p["ratio"] for p in pairs), 3),
                                "median_prefill_ratio": round(statistics.median(p["prefill"]["ratio"] for p in pairs), 3)})
    table = {"what": "tract native / ONNX Runtime, decode ms/token and the bench prompt's prefill ms, measured "
                     "alternately (median of 5 runs each)",
             "machine": baselines.machine.cpu(), "versions": baselines.versions(), "results": results}
    files.write_json(out, table)
    files.write_text(out.with_suffix(".md"), render(table))
    return table


def render(table: dict) -> str:
    m = table["machine"]
    machine = f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB" if isinstance(m, dict) else m
    lines = [f"# {table['what']}", "", f"Machine: {machine}; {json.dumps(table['versions'])}", "",
             "| model | file | threads | decode, rounds: tract / ORT ms (ratio) | median | "
             "prefill, rounds: tract / ORT ms (ratio) | median |", "|---|---|---|---|---|---|---|"]
    for r in table["results"]:
        decode = "; ".join(f"{p['tract']} / {p['onnxruntime']} ({p['ratio']})" for p in r["rounds"])
        prefill = "; ".join(f"{p['prefill']['tract']} / {p['prefill']['onnxruntime']} ({p['prefill']['ratio']})"
                            for p in r["rounds"])
        lines.append(f"| {r['model']} | {r['file']} | {r['threads']} | {decode} | {r['median_ratio']} | {prefill} | "
                     f"{r['median_prefill_ratio']} |")
    return "\n".join(lines) + "\n"
