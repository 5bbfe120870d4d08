"""The report's I/O names (a module of its own so that numpy-only code can use them)."""
from __future__ import annotations


def io_names(layers: int, past: bool) -> tuple[list[str], list[str]]:
    if not past:
        return ["input_ids"], ["logits"]
    ins = ["input_ids"] + [f"past_key_{i}" for i in range(layers)] + \
        [f"past_value_{i}" for i in range(layers)]
    outs = ["logits"] + [f"present_key_{i}" for i in range(layers)] + \
        [f"present_value_{i}" for i in range(layers)]
    return ins, outs
