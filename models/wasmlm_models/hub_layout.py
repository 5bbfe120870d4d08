"""A bundle laid out as a Hugging Face repository made for transformers.js, which is what the
page, the client module and the CLI load by repository id (www/hub.js, src/hub.rs):

    config.json  tokenizer.json  tokenizer_config.json  special_tokens_map.json
    chat_template.jinja         the chat template, where transformers writes it since 4.43
    onnx/model.onnx             the FP32 file with a cache (with --external: its weights in
    onnx/model.onnx_data        model.onnx_data, and config.json's "transformers.js_config" says so)
    onnx/model_quantized.onnx   the ort-dynamic-qint8 file with a cache ("q8")

Pushed to a repository, the folder loads with `?hub=<owner>/<name>` (dtype fp32 or q8). The
graphs keep this engine's I/O names (`past_key_<i>`); transformers.js itself expects Optimum's.
The tests serve such a folder from a local server with the hub's URL layout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# dtype -> (the repository's path, the bundle's file)
FILES = {"fp32": ("onnx/model.onnx", "model.with_past.onnx"),
         "q8": ("onnx/model_quantized.onnx", "model.with_past.ort-dynamic-qint8.onnx")}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def config(manifest: dict, external: bool) -> dict:
    """config.json as transformers writes it, with what the loaders read: the family and the
    context (GPT-2 names it n_positions)."""
    a = manifest["architecture"]
    gpt2 = a["arch"] == "gpt2"
    out = {"model_type": a["arch"], "vocab_size": a["vocab"],
           ("n_positions" if gpt2 else "max_position_embeddings"): a["context"],
           ("n_layer" if gpt2 else "num_hidden_layers"): a["layers"],
           ("n_head" if gpt2 else "num_attention_heads"): a["heads"]}
    if not gpt2:
        out["num_key_value_heads"] = a["kv_heads"]
    if external:
        out["transformers.js_config"] = {"use_external_data_format": {"model.onnx": True}}
    return out


def build(bundle: Path, out: Path, external: bool, dtypes: list[str] = tuple(FILES)) -> list[str]:
    """Writes the folder (whole or not at all: into `<out>.partial`, renamed at the end) with the
    files of `dtypes`; returns its files."""
    import onnx
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    for dtype in dtypes:
        if FILES[dtype][1] not in names:
            raise FileNotFoundError(f"{bundle}: no {FILES[dtype][1]} (dtype {dtype}) in its manifest")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "onnx").mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config(manifest, external), indent=2) + "\n")
    for name in TOKENIZER:
        if name in names:
            shutil.copyfile(bundle / name, tmp / name)
    # the chat template where a newer hub repository keeps it (a bundle's manifest carries it;
    # the loaders also read it from tokenizer_config.json, where older repositories keep it)
    template = manifest.get("tokens", {}).get("chat_template")
    if template:
        (tmp / "chat_template.jinja").write_text(template)
    for path, source in (FILES[d] for d in dtypes):
        if path == "onnx/model.onnx" and external:
            model = onnx.load(str(bundle / source))
            onnx.save(model, str(tmp / path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx_data", size_threshold=0)
        else:
            shutil.copyfile(bundle / source, tmp / path)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
