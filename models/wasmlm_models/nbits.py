"""ONNX Runtime's own weight-only form of a bundle's model: `MatMulNBits` (com.microsoft), made by
`onnxruntime.quantization.matmul_nbits_quantizer` from the bundle's FP32 with-past file.

`build` writes a bundle folder beside the source one: its tokenizer files, a manifest listing the
MatMulNBits files only, and the files, one per form, e.g.
`model.with_past.nbits8-b32.onnx`. A tied LM head (`MatMul(x, Transpose(embedding))`) is given
a weight of its own first, as Optimum's exports have it, so that the quantizer takes it too: the
head quantized, the embedding's table FP32, as ONNX Runtime's own best weight-only form. The engine runs those products on its block kernels
(src/qmatmul/nbits.rs); the tests hold it to ONNX Runtime on the same files.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_path, derived_bundle, file_entry, finish_derived_bundle

SOURCE = "model.with_past.onnx"


def form_name(bits: int, block: int, symmetric: bool) -> str:
    return f"nbits{bits}-b{block}" + ("" if symmetric else "-asym")


def constant_heads(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer (a tied LM head) -> MatMul(x, Wᵀ), Wᵀ an
    initializer of its own, as Optimum's exports have it: ORT's quantizer takes constant weights
    only, so this is what lets it quantize the head. Returns how many."""
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    count = 0
    for node in g.node:
        t = made.get(node.input[1]) if node.op_type == "MatMul" else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        w = numpy_helper.to_array(inits[t.input[0]])
        if w.ndim != 2 or perm != [1, 0]:
            continue
        name = f"{t.input[0]}.transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(w.T.copy(), name)
            g.initializer.append(inits[name])
        node.input[1] = name
        count += 1
    return count


def quantize(src: Path, dst: Path, bits: int, block: int, symmetric: bool, accuracy_level: int | None) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb
    model = onnx.load(str(src))
    constant_heads(model)
    config = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                              accuracy_level=accuracy_level, bits=bits)
    q = mnb.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, algo_config=config)
    q.process()
    if not any(n.op_type == "MatMulNBits" for n in q.model.model.graph.node):
        raise ValueError(f"{src.name}: ONNX Runtime's quantizer found no MatMul with a constant weight "
                         "(it does not take Gemm, which GPT-2's exports use)")
    with atomic_path(dst) as tmp:
        onnx.save(q.model.model, str(tmp))


def build(bundle: Path, out: Path, forms: list[tuple[int, int, bool]], accuracy_level: int | None) -> list[str]:
    """The MatMulNBits bundle of `bundle` in `out`; returns the files written."""
    if not any(f["name"] == SOURCE for f in json.loads((bundle / "manifest.json").read_text())["files"]):
        raise FileNotFoundError(f"{bundle / 'manifest.json'} lists no {SOURCE}")
    manifest, entries = derived_bundle(bundle, out)
    names = []
    for bits, block, symmetric in forms:
        name = f"model.with_past.{form_name(bits, block, symmetric)}.onnx"
        quantize(bundle / SOURCE, out / name, bits, block, symmetric, accuracy_level)
        entries.append({**file_entry(out / name), "kind": "onnx", "precision": f"int{bits}",
                        "cache": "with_past", "preset": f"ort-matmul{form_name(bits, block, symmetric)}",
                        "accuracy_level": accuracy_level})
        names.append(name)
    finish_derived_bundle(out, manifest, entries, names)
    return names
