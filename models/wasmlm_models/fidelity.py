"""INT8 vs FP32 on a text: perplexity of each, mean KL(FP32 || INT8), top-1 agreement.

Both files are the no-past graphs, run by ONNX Runtime over consecutive windows of the text;
every position but a window's first is predicted (teacher forcing), so both see the same input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .runner import ort_session

WINDOW = 512


def text_ids(tokenizer, path: Path, n_tokens: int) -> np.ndarray:
    """The first n_tokens ids of a text, by a transformers tokenizer or a tokenizers.Tokenizer."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    # Tokenize a prefix long enough for n_tokens (a token is at least one character).
    encoded = tokenizer.encode(text[: n_tokens * 8], add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"{path} gives only {len(ids)} tokens, {n_tokens} asked")
    return np.asarray(ids, dtype=np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(fp32: Path, int8: Path, ids: np.ndarray, window: int = WINDOW) -> dict:
    ref, test = ort_session(fp32), ort_session(int8)
    nll_ref = nll_test = kl = agree = n = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        feed = {"input_ids": chunk[None]}
        lp_ref = log_softmax(ref.run(["logits"], feed)[0][0, :-1])    # (window - 1, vocab)
        lp_test = log_softmax(test.run(["logits"], feed)[0][0, :-1])
        target = chunk[1:]
        rows = np.arange(len(target))
        nll_ref -= lp_ref[rows, target].sum()
        nll_test -= lp_test[rows, target].sum()
        kl += (np.exp(lp_ref) * (lp_ref - lp_test)).sum()
        agree += (lp_ref.argmax(-1) == lp_test.argmax(-1)).sum()
        n += len(target)
    ppl_ref, ppl_test = float(np.exp(nll_ref / n)), float(np.exp(nll_test / n))
    return {"tokens": int(n), "window": window, "ppl_fp32": round(ppl_ref, 4),
            "ppl_int8": round(ppl_test, 4), "ppl_ratio": round(ppl_test / ppl_ref, 4),
            "kl_mean": round(float(kl / n), 5), "top1_agreement": round(float(agree / n), 4)}
