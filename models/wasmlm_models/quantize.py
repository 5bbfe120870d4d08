"""INT8 presets. Each maps an FP32 ONNX file to an INT8 one; the manifest records which is which.

ort-dynamic-qint8
         ONNX Runtime's quantize_dynamic with QInt8 weights per tensor and reduce_range (7-bit),
         MatMul and Gemm, dynamic uint8 activations: the distilgpt2 study's call, unchanged
         (docs/decisions.md, "Where this comes from"). It is applied to the export as the study
         had it (tied embedding stored twice), so its file reproduces the study's size.
q8b32    the default (chosen by measurement: docs/presets.md): every weight matrix and the
         embedding as symmetric INT8 in blocks of 32 along the reduction axis with an FP16 scale
         per block (GGML's Q8_0 layout), weight-only; the embedding is stored once and shared by
         the LM head. Activations stay FP32, so no activation outlier is clipped.
pc8      per-output-channel INT8 weights run as dynamic-quantized MatMulInteger (integer kernels),
         the MLP output projections weight-only, embedding as q8b32's but per row: measured, and
         kept because an integer path matters to engines; it misses the accuracy goal.
wo8      weight-only INT8 with one scale per output channel (q8b32 without blocks): measured.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from . import onnx_graph

PRESETS = ("ort-dynamic-qint8", "q8b32", "pc8", "wo8")
BLOCK = {"pc8": 1 << 30, "wo8": 1 << 30, "q8b32": 32}
DEFAULT_PRESET = "q8b32"
# Node names from the exporter carry module paths: /model/layers.3/mlp/down_proj/MatMul (Llama),
# /transformer/h.3/mlp/c_proj/Gemm (GPT-2).
MLP_OUT = re.compile(r"mlp/(down_proj|c_proj)/")


def describe(preset: str) -> dict:
    return {
        "ort-dynamic-qint8": {"weights": "int8 per-tensor, reduce_range (7-bit)",
                   "activations": "dynamic uint8 per-tensor", "ops": "MatMulInteger",
                   "embedding": "fp32, stored twice (as the distilgpt2 study)"},
        "q8b32": {"weights": "int8, blocks of 32 along the reduction axis, fp16 scale (Q8_0)",
                  "activations": "fp32 (weight-only)", "ops": "Cast, Mul, Reshape -> MatMul",
                  "embedding": "int8 as the weights, stored once, shared with the LM head"},
        "pc8": {"weights": "int8 per output channel", "activations": "dynamic uint8 per-tensor",
                "ops": "MatMulInteger (MLP output projections weight-only)",
                "embedding": "int8 per row, stored once, shared with the LM head"},
        "wo8": {"weights": "int8 per output channel", "activations": "fp32 (weight-only)",
                "ops": "Cast, Mul, Reshape -> MatMul",
                "embedding": "int8 per row, stored once, shared with the LM head"},
    }[preset]


def quantize(src: Path, dst: Path, preset: str, vocab: int) -> None:
    """`src`: for 'ort-dynamic-qint8' the export with duplicated embedding, otherwise the FP32 bundle file."""
    if preset == "ort-dynamic-qint8":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=False,
                         reduce_range=True)
        return
    model = onnx.load(str(src))
    tables = onnx_graph.embedding_initializers(model, vocab)
    onnx_graph.weight_only_int8(model, tables, axis=1, block=BLOCK[preset])
    weights = onnx_graph.matmul_weights(model)
    chosen = {w: ax for node, (w, ax) in weights.items()
              if preset in ("wo8", "q8b32") or MLP_OUT.search(node)}
    for axis in (0, 1):
        names = sorted(w for w, ax in chosen.items() if ax == axis)
        onnx_graph.weight_only_int8(model, names, axis=axis, block=BLOCK[preset])
    if preset in ("wo8", "q8b32"):
        onnx.save(model, str(dst))
        return
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "staged.onnx"
        onnx.save(model, str(staged))
        # MatMulConstBOnly: the LM head's B is Transpose(embedding), not a constant; leave it be.
        quantize_dynamic(str(staged), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         reduce_range=False, extra_options={"MatMulConstBOnly": True})
