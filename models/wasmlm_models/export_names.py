"""Our I/O names (`past_key_<i>`) and a model's shape: a module of its own, without PyTorch, so
that numpy-only code (gguf_export.py, the site, the baselines' ONNX rows) can use them."""
from __future__ import annotations

import dataclasses

OPSET = 17


@dataclasses.dataclass
class Shape:
    arch: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int

    @staticmethod
    def of(config) -> "Shape":
        if config.model_type == "gpt2":
            heads = config.n_head
            return Shape("gpt2", config.n_layer, heads, heads, config.n_embd // heads,
                         config.n_embd, config.vocab_size, config.n_positions)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Shape(config.model_type, config.num_hidden_layers, heads,
                     config.num_key_value_heads, head_dim, config.hidden_size,
                     config.vocab_size, config.max_position_embeddings)


def io_names(layers: int, past: bool) -> tuple[list[str], list[str]]:
    if not past:
        return ["input_ids"], ["logits"]
    ins = ["input_ids"] + [f"past_key_{i}" for i in range(layers)] + \
        [f"past_value_{i}" for i in range(layers)]
    outs = ["logits"] + [f"present_key_{i}" for i in range(layers)] + \
        [f"present_value_{i}" for i in range(layers)]
    return ins, outs
