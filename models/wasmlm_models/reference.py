"""Reference outputs for the Rust engine's tests, from ONNX Runtime on the same file (a runtime
nobody here wrote), and token ids from the Python tokenizers library.

reference: the last-position logits after the prompt and after each of `decode` greedy steps,
and `greedy` greedy tokens (with-past files: one token at a time; no-past: the whole sequence).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .baseline_runs import Shape
from .runner import PastRunner, ort_session


def reference(bundle: Path, file: str, prompt: list[int], decode: int, greedy: int) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["name"] == file)
    ids = np.asarray(prompt, dtype=np.int64)
    if entry["cache"] == "with_past":
        runner = PastRunner(bundle / file, Shape(manifest["architecture"]), threads=1)
        step = lambda toks: runner(np.asarray([toks], dtype=np.int64))[0, -1]  # noqa: E731
        runner.reset()
    else:
        sess, seq = ort_session(bundle / file, threads=1), []

        def step(toks):
            seq.extend(toks)
            return sess.run(["logits"], {"input_ids": np.asarray([seq], dtype=np.int64)})[0][0, -1]
    logits = step(list(ids))
    rows, tokens = [logits.tolist()], []
    for _ in range(max(greedy, decode)):
        tokens.append(int(logits.argmax()))
        logits = step([tokens[-1]])
        if len(rows) <= decode:
            rows.append(logits.tolist())
    return {"file": file, "prompt": prompt, "logits": rows, "greedy": tokens[:greedy]}


def tokenize(bundle: Path, text: Path, chars: int) -> dict:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    body = text.read_text(encoding="utf-8")[:chars]
    ids = tok.encode(body, add_special_tokens=False).ids
    return {"chars": chars, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)}
