"""PyTorch -> ONNX with the distilgpt2 study's I/O convention, through the legacy (TorchScript) exporter.

with past:  input_ids (batch, sequence), past_key_0..L-1, past_value_0..L-1
                                          each (batch, kv_heads, past_sequence, head_dim)
         -> logits (batch, sequence, vocab), present_key_0.., present_value_0..
                                          each (batch, kv_heads, past_sequence + sequence, head_dim)
no past:    input_ids -> logits
The first step feeds a past of length 0.

The wrapper builds the causal mask and the positions itself, from shape-generic ops: HF's own
mask builder bakes the dummy length into a Reshape when traced (see the brief).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache

from .export_names import OPSET, Shape, io_names  # noqa: F401 (re-exported)

def causal_mask(seq: int, past: torch.Tensor, dtype) -> torch.Tensor:
    """(1, 1, seq, past + seq) additive mask: query i (at position past + i) sees keys <= it."""
    q_pos = torch.arange(seq) + past                       # (seq,)
    k_pos = torch.arange(past + seq)                       # (total,)
    allowed = k_pos[None, :] <= q_pos[:, None]             # (seq, total)
    zero = torch.zeros((), dtype=dtype)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[None, None], q_pos


class WithPast(torch.nn.Module):
    """Flat tensors in, flat tensors out: the distilgpt2 study's convention around an HF causal LM."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, *past):
        keys, values = past[: self.layers], past[self.layers:]
        seq = input_ids.shape[1]
        past_len = keys[0].shape[2]
        mask, positions = causal_mask(seq, past_len, keys[0].dtype)
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(keys[i], values[i], i)
        out = self.model(input_ids=input_ids, attention_mask=mask,
                         position_ids=positions[None].expand(input_ids.shape[0], -1),
                         cache_position=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        presents_k = [cache.layers[i].keys for i in range(self.layers)]
        presents_v = [cache.layers[i].values for i in range(self.layers)]
        return (out.logits, *presents_k, *presents_v)


class NoPast(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        # Lower-triangular (Trilu), not the two-Range comparison of causal_mask: with no past
        # both Ranges are the same node, and tract 0.23.9 then mis-evaluates the comparison
        # ("Can not broadcast 7 against 2" at run time).
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), torch.finfo(torch.float32).min))[None, None]
        positions = torch.arange(seq)
        out = self.model(input_ids=input_ids, attention_mask=mask,
                         position_ids=positions[None].expand(input_ids.shape[0], -1),
                         cache_position=positions, use_cache=False)
        return out.logits


def empty_past(shape: Shape, batch: int = 1, past: int = 0) -> list[torch.Tensor]:
    dims = (batch, shape.kv_heads, past, shape.head_dim)
    return [torch.zeros(dims) for _ in range(2 * shape.layers)]


def export(model, shape: Shape, out: Path, past: bool) -> None:
    """Write one ONNX file (single file, no external data) at `out` (caller makes it atomic)."""
    ins, outs = io_names(shape.layers, past)
    # Batch 2, sequence 3, past 4: no dummy dimension equals another or 1, so none is baked in.
    ids = torch.randint(0, shape.vocab, (2, 3))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    if past:
        args = (ids, *[t.normal_() for t in empty_past(shape, batch=2, past=4)])
        for name in ins[1:]:
            axes[name] = {0: "batch", 2: "past_sequence"}
        for name in outs[1:]:
            axes[name] = {0: "batch", 2: "total_sequence"}
        wrapper = WithPast(model, shape.layers)
    else:
        args, wrapper = (ids,), NoPast(model)
    # A new wrapper is in training mode, and the exporter restores that mode on exit, which
    # would switch the wrapped model's dropout on for everything after the export.
    wrapper.eval()
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(out), input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
                          dynamo=False)
