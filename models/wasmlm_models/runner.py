"""ONNX Runtime driving a with-past file the way an engine does (numpy only: no torch import,
so a baseline row's process holds only what it measures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .export_names import io_names


def session_options(threads: int, exact: bool = True) -> ort.SessionOptions:
    """`exact`: integer products that never saturate, as a reference needs. Without VNNI, ONNX
    Runtime's default U8S8 kernels on x86-64 (SSE4.1, AVX2, AVX-512) add two u8 x s8 products in
    a saturating i16 (`vpmaddubsw`): wrong sums for weights beyond [-64, 64] (every file
    quantized without `reduce_range`). `session.x64quantprecision` makes it use U8U8 there
    instead; on a CPU with VNNI it changes nothing. A baseline row (`exact=False`) times what a
    user of ONNX Runtime gets by default."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if exact:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return opts


def ort_session(path: Path, threads: int = 2, exact: bool = True) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads, exact), providers=["CPUExecutionProvider"])


class PastRunner:
    """Feeds a with-past file the way an engine does: prefill, then one token at a time. Our I/O
    names, or Optimum's (`past_key_values.<i>.key`, `present.<i>.key`), with the
    `attention_mask` (all ones over past + new) and `position_ids` its graph takes."""

    def __init__(self, path: Path, shape, threads: int = 2, exact: bool = True):
        self.sess, self.shape = ort_session(path, threads, exact), shape
        names = [i.name for i in self.sess.get_inputs()]
        outputs = {o.name for o in self.sess.get_outputs()}
        self.extra = [n for n in ("attention_mask", "position_ids") if n in names]
        if any(n.startswith("past_key_values.") for n in names):
            past = [n for n in names if n.startswith("past_key_values.")]
            present = [n.replace("past_key_values.", "present.", 1) for n in past]
            if not set(present) <= outputs:
                raise ValueError(f"{path.name}: no present output for each of {past}")
            self.ins, self.outs = ["input_ids", *past], ["logits", *present]
        else:
            self.ins, self.outs = io_names(shape.layers, past=True)
        self.reset()

    def reset(self, batch: int = 1) -> None:
        dims = (batch, self.shape.kv_heads, 0, self.shape.head_dim)
        self.past = [np.zeros(dims, np.float32) for _ in range(len(self.ins) - 1)]
        self.length = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch, seq) -> logits (batch, seq, vocab); the cache grows by seq."""
        feed = {"input_ids": ids, **dict(zip(self.ins[1:], self.past))}
        batch, seq = ids.shape
        total = self.length + seq
        if "attention_mask" in self.extra:
            feed["attention_mask"] = np.ones((batch, total), np.int64)
        if "position_ids" in self.extra:
            feed["position_ids"] = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, seq)).copy()
        out = self.sess.run(self.outs, feed)
        self.past, self.length = out[1:], total
        return out[0]


def greedy_ort(runner: PastRunner, prompt: np.ndarray, steps: int) -> list[int]:
    runner.reset()
    logits, tokens = runner(prompt[None]), []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = runner(np.array([[tokens[-1]]], dtype=np.int64))
    return tokens
