"""python -m wasmlm_models bundle REF --out DIR | baselines BUNDLE... --out FILE (README.md).

Imports stay inside the commands: a baseline row's process must hold only what it measures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .files import DEFAULT_TEXT

PRESETS = ("ort-dynamic-qint8", "q8b32", "pc8", "wo8")  # quantize.PRESETS, without importing onnx here
DEFAULT_PRESETS = ["ort-dynamic-qint8", "q8b32"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m wasmlm_models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="export, quantize, check: model reference -> bundle folder")
    b.add_argument("ref", help="smollm2-135m | distilgpt2-shape | tiny-gpt2 | tiny-llama | "
                               "a .gguf file | a Hugging Face folder | a hub id")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                   help="text for the INT8 fidelity check (default: tinyshakespeare)")
    b.add_argument("--presets", nargs="+", choices=PRESETS, default=DEFAULT_PRESETS)
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--torch", action="store_true",
                   help="smollm2-135m: trace the model in PyTorch (torch.onnx.export) instead of "
                        "writing the graph from its GGUF with numpy")
    t = sub.add_parser("baselines", help="measure the native baseline rows of built bundles")
    t.add_argument("bundles", nargs="+", type=Path)
    t.add_argument("--out", type=Path, required=True, help="baselines.json (rows are merged in)")
    t.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompt source")
    t.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    t.add_argument("--backends", nargs="+", choices=["pytorch", "bitsandbytes", "onnxruntime", "llama.cpp"])
    t.add_argument("--files", nargs="+", help="only these ONNX files (ONNX Runtime rows only)")
    t.add_argument("--cache-dir", type=Path, default=Path("build/hf"),
                   help="where the FP32 Hugging Face copies for the PyTorch rows are kept")
    t.add_argument("--gguf", type=Path, help="llama.cpp rows on this folder's GGUF files (made by the "
                                             "gguf command from the one bundle given)")
    t.add_argument("--llama-python", help="the Python with llama-cpp-python that runs those rows "
                                          "(default: this one)")
    g = sub.add_parser("gguf", help="the bundle's model as llama.cpp GGUF files, Q8_0 and Q4_1")
    g.add_argument("bundle", type=Path)
    g.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("reference", help="ONNX Runtime reference logits and greedy tokens (JSON)")
    f.add_argument("bundle", type=Path)
    f.add_argument("--file", required=True)
    f.add_argument("--prompt", type=int, nargs="+", required=True, help="token ids")
    f.add_argument("--decode", type=int, default=3, help="decode steps whose logits are given")
    f.add_argument("--greedy", type=int, default=32)
    k = sub.add_parser("tokenize", help="token ids of a text by the Python tokenizers (JSON)")
    k.add_argument("bundle", type=Path)
    k.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    k.add_argument("--chars", type=int, default=200_000)
    q = sub.add_parser("fidelity", help="INT8 vs FP32 no-past files of a bundle on a text (JSON)")
    q.add_argument("bundle", type=Path)
    q.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    q.add_argument("--tokens", type=int, default=4096)
    c = sub.add_parser("compare", help="tract native vs ONNX Runtime on the with-past INT8 files, decode and "
                                       "prefill, measured alternately (JSON + .md)")
    c.add_argument("bundles", nargs="+", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tract", type=Path, required=True, help="the wasmlm CLI")
    c.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompt source")
    c.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--files", nargs="+", help="only these ONNX files")
    s = sub.add_parser("site", help="bundles -> a static site's models folder (files in parts)")
    s.add_argument("bundles", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True, help="the site's models/ folder (created)")
    s.add_argument("--max-part-mib", type=int, default=25, help="largest file the host accepts")
    s.add_argument("--files", choices=["default", "int8", "all"], default="default",
                   help="each bundle's default file (default), every INT8 file with a cache, or all")
    s.add_argument("--gguf", type=Path, nargs="*", default=[],
                   help="folders of `gguf`: the Q8_0 file goes with its model's bundle, for wllama")
    m = sub.add_parser("render", help="rewrite baselines.md from baselines.json")
    m.add_argument("table", type=Path)
    m.add_argument("--docs", type=Path, help="also write this page (docs/benchmarks.md): the table "
                                             "with the machine, the date and --command")
    m.add_argument("--command", default="./build.sh benchmarks", help="the command named on that page")
    n = sub.add_parser("nbits", help="ONNX Runtime's MatMulNBits forms of a bundle's FP32 with-past "
                                     "file, as a bundle of their own")
    n.add_argument("bundle", type=Path)
    n.add_argument("--out", type=Path, required=True)
    n.add_argument("--form", nargs="+", default=["8:32", "4:32"],
                   help="bits:block, :asym for zero points (e.g. 4:128:asym)")
    n.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="ONNX Runtime's compute type for the products (4: int8; default: none, float)")
    h = sub.add_parser("hub-layout", help="a bundle laid out as a transformers.js repository on the "
                                          "Hugging Face hub (config.json, onnx/model*.onnx), to load by id")
    h.add_argument("bundle", type=Path)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--external", action="store_true",
                   help="onnx/model.onnx with its weights in onnx/model.onnx_data (external data)")
    h.add_argument("--dtype", nargs="+", choices=["fp32", "q8"], default=["fp32", "q8"],
                   help="which files: fp32 (onnx/model.onnx), q8 (onnx/model_quantized.onnx)")
    o = sub.add_parser("optimum", help="a bundle's model exported by Optimum and quantized as transformers.js's "
                                       "q8 and q4 files, as a bundle of its own (for the benchmarks)")
    o.add_argument("bundle", type=Path)
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--cache-dir", type=Path, default=Path("build/hf"),
                   help="where the FP32 Hugging Face copy is kept (as for the PyTorch rows)")
    x = sub.add_parser("matrix", help="the compatibility matrix's files: tiny random decoders by "
                                      "family, exporter and form, with ONNX Runtime's greedy tokens")
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer.json")
    x.add_argument("--families", nargs="+", help="only these (default: all)")
    x.add_argument("--exporters", nargs="+", help="only these (default: all)")
    r = sub.add_parser("row", help=argparse.SUPPRESS)  # one measurement, in its own process
    r.add_argument("spec")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "row":
        from . import baseline_runs
        baseline_runs.main(args.spec)
        return 0
    if args.cmd in ("reference", "tokenize"):
        import json
        from . import reference
        out = (reference.reference(args.bundle, args.file, args.prompt, args.decode, args.greedy)
               if args.cmd == "reference" else reference.tokenize(args.bundle, args.text, args.chars))
        print(json.dumps(out))
        return 0
    if args.cmd == "fidelity":
        import json
        from tokenizers import Tokenizer
        from . import fidelity
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
        ids = fidelity.text_ids(tok, args.text, args.tokens)
        window = min(fidelity.WINDOW, manifest["architecture"]["context"])
        for f in manifest["files"]:
            if f["kind"] == "onnx" and f["precision"] == "int8" and f["cache"] == "no_past":
                got = fidelity.compare(args.bundle / "model.onnx", args.bundle / f["name"], ids, window)
                print(json.dumps({"preset": f["preset"], "file": f["name"], "mib": round(f["bytes"] / 2**20, 1),
                                  "text": args.text.name, **got}))
        return 0
    if args.cmd == "nbits":
        from . import nbits
        try:
            forms = []
            for form in args.form:
                bits, block, *rest = form.split(":")
                if int(bits) not in (4, 8) or rest not in ([], ["asym"]):
                    raise ValueError(f"--form {form}: bits:block with bits 4 or 8, then :asym or nothing")
                forms.append((int(bits), int(block), not rest))
            for name in nbits.build(args.bundle, args.out, forms, args.accuracy_level):
                print(name)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "optimum":
        import json
        from . import baselines, optimum_bundle
        try:
            manifest = json.loads((args.bundle / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            print(f"error: {args.bundle} is not a bundle: {e}", file=sys.stderr)
            return 2
        try:
            hf = baselines.hf_folder(manifest, args.cache_dir.resolve())
            names = optimum_bundle.build(args.bundle, args.out, hf)
        except (OSError, RuntimeError, ValueError) as e:
            print(f"error: {args.bundle}: {e}", file=sys.stderr)
            return 2
        for name in names:
            print(name)
        return 0
    if args.cmd == "matrix":
        import json
        from . import matrix
        families, exporters = args.families or matrix.FAMILIES, args.exporters or matrix.EXPORTERS
        for name, given, known in (("family", families, matrix.FAMILIES), ("exporter", exporters, matrix.EXPORTERS)):
            if unknown := [g for g in given if g not in known]:
                print(f"error: no {name} named {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
                return 2
        if not (args.tokenizer / "tokenizer.json").is_file():
            print(f"error: {args.tokenizer} has no tokenizer.json", file=sys.stderr)
            return 2
        index = matrix.build(args.out, args.tokenizer, families, exporters)
        print(json.dumps({"cells": len(index["cells"]), "made": sum("file" in c for c in index["cells"])}))
        return 0
    if args.cmd == "hub-layout":
        from . import hub_layout
        try:
            for name in hub_layout.build(args.bundle, args.out, args.external, args.dtype):
                print(name)
        except (FileNotFoundError, KeyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "compare":
        from . import compare
        try:
            compare.build(args.bundles, args.out, args.tract.resolve(), args.text.resolve(), args.threads,
                          args.rounds, args.files)
        except (RuntimeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "site":
        from . import site
        try:
            site.build(args.bundles, args.out, args.max_part_mib << 20, args.files, args.gguf)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "gguf":
        from . import gguf_files, sources
        try:
            names = gguf_files.build(args.bundle, args.out)
        except (OSError, ValueError, gguf_files.GgufError, sources.SourceError) as e:
            print(f"error: {args.bundle}: {e}", file=sys.stderr)
            return 2
        for name in names:
            print(name)
        return 0
    if args.cmd == "render":
        import json
        from . import baselines, files
        table = json.loads(args.table.read_text())
        files.write_text(args.table.with_suffix(".md"), baselines.render(table))
        if args.docs:
            files.write_text(args.docs, baselines.render_page(table, args.command, args.table.stat().st_mtime))
        return 0
    from . import baselines, bundle, sources
    try:
        if args.cmd == "bundle":
            bundle.build(args.ref, args.out, args.text, args.presets, args.force, args.torch)
        else:
            if args.backends and "llama.cpp" in args.backends and not args.gguf:
                raise ValueError("llama.cpp rows need --gguf DIR (python -m wasmlm_models gguf makes it)")
            if args.gguf and len(args.bundles) != 1:
                raise ValueError("--gguf goes with one bundle, the one its files were made from")
            baselines.build(args.bundles, args.out, args.text, args.threads, args.cache_dir.resolve(),
                            args.backends, args.files, args.gguf and args.gguf.resolve(),
                            args.llama_python and str(Path(args.llama_python).absolute()))
    except (sources.SourceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
