"""A bundle's model as people who use transformers.js already have it: exported by Optimum
(`optimum-onnx`, `text-generation-with-past`: PyTorch's SDPA attention, `attention_mask` and
`position_ids` inputs, `past_key_values.<i>.key` names) and quantized as transformers.js's
repositories are: `q8` (`quantize_dynamic`, QInt8 per tensor: `model_quantized.onnx`) and `q4`
(ONNX Runtime's MatMulNBits, 4 bits, symmetric, blocks of 32: `model_q4.onnx`).

`build` writes a bundle folder beside the source one (its tokenizer files, a manifest listing
these files only), so that the benchmarks measure them beside this engine's own files, by the
same protocol.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .files import derived_bundle, file_entry, finish_derived_bundle

FORMS = {"q8": ("model_quantized.onnx", "int8", "optimum-q8"),
         "q4": ("model_q4.onnx", "int4", "optimum-q4")}


def build(bundle: Path, out: Path, hf: Path) -> list[str]:
    """`hf`: the model as a Hugging Face folder (baselines.hf_folder). Returns the files."""
    from optimum.exporters.onnx import main_export

    from . import matrix
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    main_export(str(hf), output=str(work), task="text-generation-with-past", do_validation=False)
    fp32 = work / "model.onnx"
    if not fp32.exists() or list(work.glob("*.onnx_data")):
        raise RuntimeError(f"Optimum wrote {sorted(p.name for p in work.iterdir())}, not one model.onnx")
    manifest, entries = derived_bundle(bundle, out)
    names = []
    for form, (name, precision, preset) in FORMS.items():
        if form == "q8":
            matrix.q8(fp32, out / name)
        else:
            matrix.nbits(fp32, out / name, 4, 32)
        entries.append({**file_entry(out / name), "kind": "onnx", "precision": precision,
                        "cache": "with_past", "preset": preset, "exporter": "optimum-onnx"})
        names.append(name)
    shutil.rmtree(work)
    finish_derived_bundle(out, manifest, entries, names)
    return names
