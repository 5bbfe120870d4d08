"""A Llama GGUF -> ONNX, with numpy and the `onnx` package: no PyTorch, no tracing.

The first command builds the default model's bundle this way, so that it needs neither
PyTorch (900 MB and ~2.6 GB of CUDA libraries from PyPI) nor its minutes of tracing; the way
onnxruntime-genai's model builder writes its graphs. The graph is the one `export.py` traces
from transformers (same I/O names and layouts, same ops in the same order on the paths that
matter: RMSNorm, the rotary embedding, the cache's Concat, grouped-query attention's repeat,
the attention core, SiLU, the tied LM head), so the engine's rewrites find the same patterns;
`tests/models/test_gguf_export.py` holds the two exporters' logits equal on the same weights.

Weights: GGUF stores a Linear weight as (out, in) rows, like PyTorch; llama.cpp's converter
permutes the rows of Q and K for its own RoPE layout, which `_unpermute` undoes (as
transformers' GGUF loader does). ONNX MatMul takes (in, out).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .export_names import OPSET, Shape, io_names

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


@dataclasses.dataclass
class Llama:
    shape: Shape
    weights: dict[str, np.ndarray]   # transformers' names and layouts, float32
    rope_theta: float
    rms_eps: float
    tied: bool
    meta: dict                       # GGUF metadata: tokens' ids, chat template


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read(path: Path) -> Llama:
    """A Llama-family GGUF's weights, dequantized to float32, in transformers' names."""
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture '{arch}': the GGUF builder writes Llama graphs only")
    get = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    heads, kv_heads = int(get("attention.head_count")), int(get("attention.head_count_kv"))
    hidden = int(get("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(tensors["token_embd.weight"].shape[1])
    shape = Shape("llama", int(get("block_count")), heads, kv_heads, hidden // heads, hidden, vocab,
                  int(get("context_length")))
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    weights = {}
    for name, t in tensors.items():
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name == "token_embd.weight":
            weights["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            weights["model.norm.weight"] = w
        elif name == "output.weight":
            weights["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv_heads)
            weights[f"model.layers.{layer}.{names[kind]}.weight"] = w
    meta = {k: _field(reader, f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    meta["chat_template"] = _field(reader, "tokenizer.chat_template")
    return Llama(shape, weights, float(get("rope.freq_base", 10000.0)),
                 float(get("attention.layer_norm_rms_epsilon", 1e-6)), "lm_head.weight" not in weights, meta)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order -> transformers' (each head's two halves interleaved back)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class _Graph:
    """Nodes and initializers, with names in the traced exporter's style."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def ints(self, *values) -> str:
        self.n += 1
        return self.const(f"/const_{self.n}", list(values), np.int64)

    def scalar(self, value) -> str:
        self.n += 1
        return self.const(f"/const_{self.n}", value, np.int64)


def build(m: Llama, past: bool, tied_twice: bool = False) -> onnx.ModelProto:
    """The FP32 graph, with a KV cache (`past`) or without. `tied_twice`: the LM head as its own
    initializer, as the traced exporter writes it before `store_tied_once` (the study's layout)."""
    s, g = m.shape, _Graph()
    ins, outs = io_names(s.layers, past)
    for name, w in m.weights.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            g.const(name, w.T)                                     # MatMul's (in, out)
        else:
            g.const(name, w)
    hidden = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")
    cos, sin, mask = _positions_and_mask(g, m, past)
    for i in range(s.layers):
        hidden = _layer(g, m, i, hidden, cos, sin, mask, past)
    hidden = _rms_norm(g, m, hidden, "model.norm.weight", "/model/norm")
    if m.tied and not tied_twice:
        head = g.op("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
    else:
        head = "lm_head.weight"
        if m.tied:
            g.const(head, m.weights["model.embed_tokens.weight"].T)
    g.op("MatMul", [hidden, head], "/lm_head/MatMul", out="logits")
    cache = lambda n, length: helper.make_tensor_value_info(  # noqa: E731
        n, F32, ["batch", s.kv_heads, length, s.head_dim])
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch", "sequence"])]
    inputs += [cache(n, "past_sequence") for n in ins[1:]]
    outputs = [helper.make_tensor_value_info("logits", F32, ["batch", "sequence", s.vocab])]
    outputs += [cache(n, "total_sequence") for n in outs[1:]]
    graph = helper.make_graph(g.nodes, "wasmlm-llama", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="wasmlm gguf_export")
    model.ir_version = 8
    return model


def _positions_and_mask(g: _Graph, m: Llama, past: bool):
    """cos, sin (1, 1, seq, head_dim) and the additive causal mask (1, 1, seq, past + seq)."""
    s = m.shape
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], "/Shape"), g.scalar(1)], "/Gather", axis=0)
    neg = np.finfo(np.float32).min
    if past:
        plen = g.op("Gather", [g.op("Shape", ["past_key_0"], "/Shape_1"), g.scalar(2)], "/Gather_1", axis=0)
        total = g.op("Add", [plen, seq], "/Add")
        q_pos = g.op("Range", [plen, total, g.const("/one", 1, np.int64)], "/Range")          # (seq,)
        k_pos = g.op("Range", [g.const("/zero", 0, np.int64), total, "/one"], "/Range_1")  # (total,)
        allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.ints(0)], "/Unsqueeze"),
                                       g.op("Unsqueeze", [q_pos, g.ints(1)], "/Unsqueeze_1")], "/LessOrEqual")
    else:
        # lower-triangular, not two Ranges: with no past both would be the same node, which
        # tract 0.23.9 mis-evaluates (export.py, NoPast)
        square = g.op("Concat", [g.op("Unsqueeze", [seq, g.ints(0)], "/Unsqueeze"),
                                 g.op("Unsqueeze", [seq, g.ints(0)], "/Unsqueeze_1")], "/Concat", axis=0)
        ones = g.op("ConstantOfShape", [square], "/ConstantOfShape",
                    value=numpy_helper.from_array(np.array([True])))
        allowed = g.op("Trilu", [ones], "/Trilu", upper=0)
        q_pos = g.op("Range", [g.const("/zero", 0, np.int64), seq, g.const("/one", 1, np.int64)], "/Range")
    mask = g.op("Where", [allowed, g.const("/mask_zero", 0.0), g.const("/mask_min", neg)], "/Where")
    mask = g.op("Unsqueeze", [mask, g.ints(0, 1)], "/Unsqueeze_2")                       # (1, 1, seq, total)
    dim = s.head_dim
    inv_freq = 1.0 / (np.float32(m.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    pos = g.op("Cast", [g.op("Unsqueeze", [q_pos, g.ints(1)], "/rotary/Unsqueeze")], "/rotary/Cast", to=F32)
    freqs = g.op("Mul", [pos, g.const("/rotary/inv_freq", inv_freq.astype(np.float32))], "/rotary/Mul")
    emb = g.op("Concat", [freqs, freqs], "/rotary/Concat", axis=-1)                      # (seq, dim)
    cos = g.op("Unsqueeze", [g.op("Cos", [emb], "/rotary/Cos"), g.ints(0, 1)], "/rotary/Unsqueeze_1")
    sin = g.op("Unsqueeze", [g.op("Sin", [emb], "/rotary/Sin"), g.ints(0, 1)], "/rotary/Unsqueeze_2")
    return cos, sin, mask


def _rms_norm(g: _Graph, m: Llama, x: str, weight: str, at: str) -> str:
    var = g.op("ReduceMean", [g.op("Pow", [x, g.const(f"{at}/two", 2.0)], f"{at}/Pow")], f"{at}/ReduceMean",
               axes=[-1], keepdims=1)
    root = g.op("Sqrt", [g.op("Add", [var, g.const(f"{at}/eps", m.rms_eps)], f"{at}/Add")], f"{at}/Sqrt")
    inv = g.op("Div", [g.const(f"{at}/one", 1.0), root], f"{at}/Div")
    return g.op("Mul", [weight, g.op("Mul", [x, inv], f"{at}/Mul")], f"{at}/Mul_1")


def _heads(g: _Graph, x: str, heads: int, dim: int, at: str) -> str:
    """(batch, seq, heads * dim) -> (batch, heads, seq, dim)"""
    x = g.op("Reshape", [x, g.ints(0, 0, heads, dim)], f"{at}/Reshape")
    return g.op("Transpose", [x], f"{at}/Transpose", perm=[0, 2, 1, 3])


def _rope(g: _Graph, x: str, cos: str, sin: str, dim: int, at: str) -> str:
    """x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)."""
    half = dim // 2
    x1 = g.op("Slice", [x, g.ints(0), g.ints(half), g.ints(3), g.ints(1)], f"{at}/Slice")
    x2 = g.op("Slice", [x, g.ints(half), g.ints(np.iinfo(np.int64).max), g.ints(3), g.ints(1)], f"{at}/Slice_1")
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{at}/Neg"), x1], f"{at}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{at}/Mul"), g.op("Mul", [rotated, sin], f"{at}/Mul_1")], f"{at}/Add")


def _repeat_kv(g: _Graph, x: str, group: int, at: str) -> str:
    """(batch, kv, total, dim) -> (batch, kv * group, total, dim), as transformers' repeat_kv."""
    if group == 1:
        return x
    dims = g.op("Shape", [x], f"{at}/Shape")
    b = g.op("Slice", [dims, g.ints(0), g.ints(1)], f"{at}/Slice")
    kv = g.op("Slice", [dims, g.ints(1), g.ints(2)], f"{at}/Slice_1")
    t_d = g.op("Slice", [dims, g.ints(2), g.ints(4)], f"{at}/Slice_2")
    wide = g.op("Concat", [b, kv, g.ints(group), t_d], f"{at}/Concat", axis=0)       # (b, kv, group, t, d)
    x = g.op("Expand", [g.op("Unsqueeze", [x, g.ints(2)], f"{at}/Unsqueeze"), wide], f"{at}/Expand")
    merged = g.op("Concat", [b, g.ints(-1), t_d], f"{at}/Concat_1", axis=0)          # (b, kv * group, t, d)
    return g.op("Reshape", [x, merged], f"{at}/Reshape")


def _layer(g: _Graph, m: Llama, i: int, x: str, cos: str, sin: str, mask: str, past: bool):
    s, p, at = m.shape, f"model.layers.{i}", f"/model/layers.{i}"
    h = _rms_norm(g, m, x, f"{p}.input_layernorm.weight", f"{at}/input_layernorm")
    proj = lambda name, inp: g.op("MatMul", [inp, f"{p}.{name}.weight"], f"{at}/{name.replace('.', '/')}/MatMul")  # noqa: E731
    a = f"{at}/self_attn"
    q = _rope(g, _heads(g, proj("self_attn.q_proj", h), s.heads, s.head_dim, f"{a}/q"), cos, sin, s.head_dim, f"{a}/q_rope")
    k = _rope(g, _heads(g, proj("self_attn.k_proj", h), s.kv_heads, s.head_dim, f"{a}/k"), cos, sin, s.head_dim, f"{a}/k_rope")
    v = _heads(g, proj("self_attn.v_proj", h), s.kv_heads, s.head_dim, f"{a}/v")
    if past:
        # the cache's Concats write the graph outputs themselves (the engine takes them in there)
        k = g.op("Concat", [f"past_key_{i}", k], f"{a}/Concat_5", out=f"present_key_{i}", axis=-2)
        v = g.op("Concat", [f"past_value_{i}", v], f"{a}/Concat_6", out=f"present_value_{i}", axis=-2)
    group = s.heads // s.kv_heads
    keys = g.op("Transpose", [_repeat_kv(g, k, group, f"{a}/repeat_k")], f"{a}/Transpose_3", perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, keys], f"{a}/MatMul"), g.const(f"{a}/scale", s.head_dim ** -0.5)], f"{a}/Mul_8")
    probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{a}/Add_2")], f"{a}/Softmax", axis=-1)
    out = g.op("MatMul", [probs, _repeat_kv(g, v, group, f"{a}/repeat_v")], f"{a}/MatMul_1")
    out = g.op("Reshape", [g.op("Transpose", [out], f"{a}/Transpose_4", perm=[0, 2, 1, 3]), g.ints(0, 0, -1)], f"{a}/Reshape_7")
    x = g.op("Add", [x, proj("self_attn.o_proj", out)], f"{at}/Add")
    h = _rms_norm(g, m, x, f"{p}.post_attention_layernorm.weight", f"{at}/post_attention_layernorm")
    gate = proj("mlp.gate_proj", h)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{at}/mlp/act_fn/Sigmoid")], f"{at}/mlp/act_fn/Mul")
    return g.op("Add", [x, proj("mlp.down_proj", g.op("Mul", [act, proj("mlp.up_proj", h)], f"{at}/mlp/Mul"))],
                f"{at}/Add_1")
