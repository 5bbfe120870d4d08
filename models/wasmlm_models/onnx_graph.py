"""Graph passes on exported ONNX files: store tied weights once; weight-only INT8 for chosen weights.

The distilgpt2 study's 82M-parameter file weighed 461 MiB because the exporter folded the LM
head's Transpose(embedding) into a second initializer. `store_tied_once` finds initializers that
equal another one (or its transpose) and replaces them by a reference (or a Transpose node).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _replace_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def store_tied_once(model: onnx.ModelProto) -> list[str]:
    """Dedupe equal and transposed-equal initializers in place; returns what was replaced."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    big = [t for t in graph.initializer if np.prod(t.dims) >= 4096]
    arrays = {t.name: numpy_helper.to_array(t) for t in big}
    replaced, new_nodes = [], []
    for i, a in enumerate(big):
        if a.name not in arrays:
            continue
        for b in big[i + 1:]:
            if b.name not in arrays or a.data_type != b.data_type:
                continue
            A, B = arrays[a.name], arrays[b.name]
            if A.shape == B.shape and np.array_equal(A, B):
                _replace_uses(graph, b.name, a.name)
            elif A.ndim == 2 and A.shape == B.shape[::-1] and np.array_equal(A.T, B):
                new_nodes.append(helper.make_node("Transpose", [a.name], [b.name],
                                                  name=f"{b.name}_tied", perm=[1, 0]))
            else:
                continue
            replaced.append(b.name)
            del arrays[b.name]
            graph.initializer.remove(inits[b.name])
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return replaced


def consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def weight_only_int8(model: onnx.ModelProto, names: list[str], axis: int, block: int = 32) -> None:
    """Store each named FP32 initializer as symmetric INT8 in blocks of `block` consecutive values
    along `axis` (the reduction axis of the product it feeds), one FP16 scale per block: GGML's
    Q8_0 layout. Dequantized in the graph by Cast, Mul and Reshape: ops every runtime has, and
    constant, so an optimizer can fold them (or map them onto a block-quantized kernel)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for name in names:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        ax = axis % w.ndim
        b = block if w.shape[ax] % block == 0 else w.shape[ax]
        blocked = w.reshape(w.shape[:ax] + (w.shape[ax] // b, b) + w.shape[ax + 1:])
        scale = (np.abs(blocked).max(axis=ax + 1, keepdims=True) / 127.0).astype(np.float16)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocked / scale.astype(np.float32)), -127, 127).astype(np.int8)
        graph.initializer.remove(inits[name])
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}_q8"),
            numpy_helper.from_array(scale, f"{name}_q8_scale"),
            numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}_q8_shape")])
        f32 = onnx.TensorProto.FLOAT
        nodes = [
            helper.make_node("Cast", [f"{name}_q8"], [f"{name}_q8_f"], to=f32, name=f"{name}_q8_cast"),
            helper.make_node("Cast", [f"{name}_q8_scale"], [f"{name}_q8_scale_f"], to=f32,
                             name=f"{name}_q8_scale_cast"),
            helper.make_node("Mul", [f"{name}_q8_f", f"{name}_q8_scale_f"], [f"{name}_q8_blocks"],
                             name=f"{name}_q8_mul"),
            helper.make_node("Reshape", [f"{name}_q8_blocks", f"{name}_q8_shape"], [name],
                             name=f"{name}_q8_reshape")]
        for node in reversed(nodes):
            graph.node.insert(0, node)


def embedding_initializers(model: onnx.ModelProto, vocab: int) -> list[str]:
    """The FP32 tables that Gather nodes read: the token embedding (vocab, hidden) first, then
    any other (GPT-2's positions)."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT \
                and t.name not in found:
            found.append(t.name)
    return sorted(found, key=lambda n: inits[n].dims[0] != vocab)


def matmul_weights(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """node name -> (weight initializer, its reduction axis), for every MatMul and Gemm whose B
    input is a 2-D initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for n in model.graph.node:
        t = inits.get(n.input[1]) if n.op_type in ("MatMul", "Gemm") else None
        if t is None or len(t.dims) != 2:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
        found[n.name] = (t.name, 1 if trans_b else 0)
    return found
