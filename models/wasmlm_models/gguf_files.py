"""`python -m wasmlm_models gguf BUNDLE --out DIR`: the bundle's model as llama.cpp's GGUF files,
for the llama.cpp rows of the table (`./build.sh baselines`).

The default bundle is written from a Q4_1 GGUF (sources.py); that file is the model itself, so
it is copied as it is (`model.q4_1.gguf`). `model.q8_0.gguf` is the same weights in llama.cpp's
8-bit form: every Q4_1 tensor dequantized and quantized to Q8_0 by gguf-py (`gguf.quants`, the
numpy port of llama.cpp's reference quantizer), 1-D tensors (the norms) left in FP32, as
llama.cpp's own `llama-quantize --allow-requantize ... Q8_0` does. The tied embedding stays one
tensor: the GGUF has no `output.weight`, and none is added.

`gguf.json` lists the files with their sha256 and the source's, written last: a folder without
it is not finished.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import files, sources

FORMS = {"q4_1": "Q4_1", "q8_0": "Q8_0"}


class GgufError(Exception):
    pass


def source_of(manifest: dict) -> Path:
    """The GGUF the bundle was written from, checked by its sha256."""
    prov = manifest.get("provenance", {})
    if manifest.get("id") != "smollm2-135m" or not str(prov.get("path", "")).endswith(".gguf"):
        raise GgufError(f"{manifest.get('id')}: only a bundle written from a GGUF (the default "
                        "model) has llama.cpp files of the same weights")
    path = sources.smollm2_gguf()
    if files.sha256_of(path) != prov.get("sha256"):
        raise GgufError(f"{path} is not the GGUF the bundle was written from (sha256 differs)")
    return path


def requantize(src: Path, dst: Path, qtype_name: str) -> None:
    """`src` with every quantized matrix re-quantized to `qtype_name` (metadata copied, the file
    type updated); written to `dst` atomically."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V
    qtype = Q[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with files.atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(gguf.LlamaFileType[f"MOSTLY_{qtype_name}"])
            main = field.types[0]
            writer.add_key_value(field.name, value, main, sub_type=field.types[-1] if main == V.ARRAY else None)
        for t in reader.tensors:
            if t.tensor_type in (Q.F32, Q.F16) and len(t.shape) == 1 or t.tensor_type == qtype:
                writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
                continue
            weights = gguf.quants.dequantize(t.data, t.tensor_type)
            if weights.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                raise GgufError(f"{t.name}: rows of {weights.shape[-1]} do not fill {qtype_name} blocks")
            writer.add_tensor(t.name, gguf.quants.quantize(weights.astype(np.float32), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def build(bundle: Path, out: Path) -> list[str]:
    """Writes out/model.<form>.gguf for each of FORMS and out/gguf.json; returns the names."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    src = source_of(manifest)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf.json").unlink(missing_ok=True)
    import gguf
    src_type = gguf.GGUFReader(src).fields[gguf.Keys.General.FILE_TYPE].contents()
    entries = []
    for form, qtype in FORMS.items():
        dst = out / f"model.{form}.gguf"
        if int(src_type) == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]):
            with files.atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            how = "the source GGUF, as shipped"
        else:
            requantize(src, dst, qtype)
            how = f"the source's tensors dequantized and quantized to {qtype} by gguf-py"
        entries.append({**files.file_entry(dst), "type": qtype, "made": how})
    files.write_json(out / "gguf.json", {"model": manifest["id"], "architecture": manifest["architecture"],
                                         "source": {"path": src.name, "sha256": manifest["provenance"]["sha256"]},
                                         "files": entries})
    return [e["name"] for e in entries]
