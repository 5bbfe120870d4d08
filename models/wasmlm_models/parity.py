"""ONNX Runtime on the exported FP32 files vs PyTorch transformers on the same weights.

The goal is 1e-4 on the logits; where FP32 itself cannot be that exact (PyTorch's FP32 logits
are further than that from its own FP64 ones), the tolerance is twice that measured floor.

Measured: the largest logit difference of ONNX Runtime (no-past file, with-past file) against
PyTorch over a prefill and 3 decode steps; with-past against no-past; and whether 32 greedy
tokens are identical (PyTorch's own KV-cache generation vs ONNX Runtime's with-past loop).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .export_names import Shape
from .runner import PastRunner, greedy_ort, ort_session


def greedy_torch(model, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy tokens from transformers' own forward and KV cache (EOS not special here either)."""
    import torch
    tokens, past, ids = [], None, torch.tensor(prompt[None])
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


def _onnx_logits(shape: Shape, no_past: Path, with_past: Path, prompt: np.ndarray, decode_steps: int):
    """The with-past file's logits over a prefill and `decode_steps` greedy steps, the no-past
    file's over the same tokens, the tokens, and the with-past runner."""
    full = prompt.copy()
    runner = PastRunner(with_past, shape)
    chunks = [runner(prompt[None])]
    for _ in range(decode_steps):
        nxt = np.array([[int(chunks[-1][0, -1].argmax())]], dtype=np.int64)
        full = np.concatenate([full, nxt[0]])
        chunks.append(runner(nxt))
    past_logits = np.concatenate(chunks, axis=1)                    # (1, prompt + steps, vocab)
    nopast_logits = ort_session(no_past).run(["logits"], {"input_ids": full[None]})[0]
    return past_logits, nopast_logits, full, runner


def check_onnx(shape: Shape, no_past: Path, with_past: Path, prompt: np.ndarray,
               decode_steps: int = 3, greedy_steps: int = 32) -> dict:
    """Without a PyTorch model: the two files against each other, and the greedy tokens."""
    past_logits, nopast_logits, _, runner = _onnx_logits(shape, no_past, with_past, prompt, decode_steps)
    return {
        "prompt_tokens": int(len(prompt)), "decode_steps": decode_steps,
        "reference": "none here: exported from the GGUF without PyTorch; tests/models/"
                     "test_gguf_export.py holds that exporter to the traced one",
        "max_abs_logit_diff_with_past_vs_no_past": float(np.abs(past_logits - nopast_logits).max()),
        "tolerance": 1e-4, "greedy_steps": greedy_steps,
        "greedy_tokens_onnxruntime": greedy_ort(runner, prompt, greedy_steps),
    }


def check(model, shape: Shape, no_past: Path, with_past: Path, prompt: np.ndarray,
          decode_steps: int = 3, greedy_steps: int = 32) -> dict:
    """Prefill `prompt`, then `decode_steps` tokens (the greedy ones), compared at every step."""
    import torch
    past_logits, nopast_logits, full, runner = _onnx_logits(shape, no_past, with_past, prompt, decode_steps)
    with torch.no_grad():
        ref = model(torch.tensor(full[None])).logits.numpy()
    floor = fp32_noise_floor(model, full, ref)
    g_ref = greedy_torch(model, prompt, greedy_steps)
    g_ort = greedy_ort(runner, prompt, greedy_steps)
    return {
        "prompt_tokens": int(len(prompt)), "decode_steps": decode_steps,
        "max_abs_logit_diff_with_past_vs_torch": float(np.abs(past_logits - ref).max()),
        "max_abs_logit_diff_no_past_vs_torch": float(np.abs(nopast_logits - ref).max()),
        "max_abs_logit_diff_with_past_vs_no_past": float(np.abs(past_logits - nopast_logits).max()),
        "fp32_noise_floor": floor,
        "tolerance": max(1e-4, 2 * floor),
        "greedy_steps": greedy_steps,
        "greedy_identical_steps": _common_prefix(g_ref, g_ort),
        "greedy_tokens_torch": g_ref, "greedy_tokens_onnxruntime": g_ort,
    }


def fp32_noise_floor(model, ids: np.ndarray, ref32: np.ndarray) -> float:
    """How far PyTorch's own FP32 logits are from its FP64 ones on these tokens: two correct FP32
    implementations cannot be expected to agree more closely than about this (measured on
    SmolLM2 with a 37-token prompt: 9.8e-5, logits up to 37)."""
    import torch
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = m64(torch.tensor(ids[None])).logits.numpy()
    return float(np.abs(ref32 - ref64).max())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
