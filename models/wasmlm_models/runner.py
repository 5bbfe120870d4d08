"""ONNX Runtime driving a with-past file the way an engine does (numpy only: no torch import,
so a baseline row's process holds only what it measures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .export_names import io_names


def ort_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class PastRunner:
    """Feeds a with-past file the way an engine does: prefill, then one token at a time."""

    def __init__(self, path: Path, shape, threads: int = 2):
        self.sess, self.shape = ort_session(path, threads), shape
        self.ins, self.outs = io_names(shape.layers, past=True)
        self.reset()

    def reset(self, batch: int = 1) -> None:
        dims = (batch, self.shape.kv_heads, 0, self.shape.head_dim)
        self.past = [np.zeros(dims, np.float32) for _ in range(2 * self.shape.layers)]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (batch, seq) -> logits (batch, seq, vocab); the cache grows by seq."""
        out = self.sess.run(self.outs, {"input_ids": ids, **dict(zip(self.ins[1:], self.past))})
        self.past = out[1:]
        return out[0]


def greedy_ort(runner: PastRunner, prompt: np.ndarray, steps: int) -> list[int]:
    runner.reset()
    logits, tokens = runner(prompt[None]), []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = runner(np.array([[tokens[-1]]], dtype=np.int64))
    return tokens
