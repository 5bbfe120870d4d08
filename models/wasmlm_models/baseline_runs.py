"""One baseline measurement, run in its own process (`python -m wasmlm_models row SPEC`).

Protocol (shared with the Rust engine's native bench): batch 1, the same 32 prompt tokens,
exactly 64 new tokens with EOS ignored, one warm-up run, then RUNS measured runs; a run's decode
ms/token is its 63 decode steps' mean (the first new token comes out of the prefill); rows give
the median and p90 over runs. Without cache, the measured thing is the distilgpt2 study's: the latency of
one inference over the 32-token prompt.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import machine

NEW_TOKENS = 64


class Shape:
    """The manifest's architecture block, as attributes (PastRunner needs layers, kv_heads...)."""
    def __init__(self, d: dict):
        self.__dict__.update(d)
RUNS = 5


def summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(arr)), 3), "p90": round(float(np.percentile(arr, 90)), 3),
            "runs": len(values)}


def time_runs(one_run, runs: int = RUNS) -> list:
    one_run()  # warm-up
    return [one_run() for _ in range(runs)]


def decode_stats(results: list[tuple[float, list[float]]]) -> dict:
    """results: per run (prefill ms, [decode step ms...])."""
    return {"prefill_ms": summary([p for p, _ in results]),
            "decode_ms_per_token": summary([float(np.mean(d)) for p, d in results]),
            "new_tokens": NEW_TOKENS}


# ONNX Runtime --------------------------------------------------------------------------------

def ort_row(spec: dict) -> dict:
    import onnxruntime as ort
    from .runner import PastRunner, session_options
    opts = session_options(spec["threads"], exact=False)
    prompt = np.asarray(spec["prompt_ids"], dtype=np.int64)[None]
    t0 = time.perf_counter()
    if spec["cache"] == "no_past":
        sess = ort.InferenceSession(spec["file"], opts, providers=["CPUExecutionProvider"])
        load_ms = (time.perf_counter() - t0) * 1e3

        def one_run():
            t = time.perf_counter()
            sess.run(["logits"], {"input_ids": prompt})
            return (time.perf_counter() - t) * 1e3
        return {"load_ms": round(load_ms, 1),
                "latency_ms": summary(time_runs(one_run, max(RUNS, 10))),
                "prompt_tokens": prompt.shape[1]}
    runner = PastRunner(Path(spec["file"]), Shape(spec["shape"]), spec["threads"], exact=False)
    load_ms = (time.perf_counter() - t0) * 1e3

    def one_run():
        runner.reset()
        t = time.perf_counter()
        logits = runner(prompt)
        prefill, steps = (time.perf_counter() - t) * 1e3, []
        for _ in range(NEW_TOKENS - 1):
            nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
            t = time.perf_counter()
            logits = runner(nxt)
            steps.append((time.perf_counter() - t) * 1e3)
        return prefill, steps
    return {"load_ms": round(load_ms, 1), **decode_stats(time_runs(one_run)),
            "prompt_tokens": prompt.shape[1]}


# PyTorch (FP32, dynamic INT8, bitsandbytes INT8) -------------------------------------------------

def torch_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(spec["threads"])
    if spec["backend"] == "bitsandbytes":
        from transformers import BitsAndBytesConfig
        return AutoModelForCausalLM.from_pretrained(
            spec["hf_folder"], quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map="cpu", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(spec["hf_folder"], dtype=torch.float32).eval()
    if spec["precision"] == "int8":
        model = dynamic_int8(model)
    return model


def dynamic_int8(model):
    """torch.ao dynamic INT8 on every nn.Linear. GPT-2's layers are transformers Conv1D, which
    quantize_dynamic does not touch (docs/decisions.md, "Python pipeline pins"): rewrite them as Linear first."""
    import torch
    from transformers.pytorch_utils import Conv1D
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(parent, name, lin)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def torch_row(spec: dict) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    t0 = time.perf_counter()
    model = torch_model(spec)
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = torch.tensor([spec["prompt_ids"]])

    class Clock(LogitsProcessor):
        """Called once per new token, right after the forward pass that made its logits."""
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def one_run():
        clock = Clock()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=True,
                           pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        stamps = [t] + clock.stamps
        ms = list(np.diff(stamps) * 1e3)
        return ms[0], ms[1:]
    return {"load_ms": round(load_ms, 1), **decode_stats(time_runs(one_run)),
            "prompt_tokens": prompt.shape[1]}


# llama.cpp (llama-cpp-python, built from source: ./build.sh baselines) ---------------------------

def llama_row(spec: dict) -> dict:
    """The same protocol on a GGUF of the same model: the prompt in one batch, then one token at
    a time, each the argmax of the last logits (llama.cpp's own sampler is not used, so the
    tokens are chosen as in every other row). The KV cache is cleared between runs."""
    import llama_cpp
    import llama_cpp.llama_cpp as low
    # A build for a CPU with AMX-INT8 puts the weights in llama.cpp's AMX buffer, whose product
    # crashed at the first token on an Intel Xeon VM with AMX (SIGSEGV in
    # ggml_backend_amx_mul_mat; ggml-org/llama.cpp issue 20824, open, reports it on other
    # Sapphire Rapids machines). Such a build loads the model without extra buffer types (AMX's,
    # and the repacked layouts), on llama.cpp's plain CPU kernels, and the version says so
    # (docs/decisions.md, "llama.cpp in the table").
    amx = b"AMX_INT8 = 1" in low.llama_print_system_info()
    defaults = low.llama_model_default_params
    if amx:
        def plain_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params
        low.llama_model_default_params = plain_buffers
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=spec["file"], n_ctx=256, n_batch=64, n_ubatch=64,
                              n_threads=spec["threads"], n_threads_batch=spec["threads"],
                              logits_all=False, verbose=False)
    finally:
        low.llama_model_default_params = defaults
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = list(spec["prompt_ids"])
    vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(vocab,))

    def one_run():
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill, steps = (time.perf_counter() - t) * 1e3, []
        for _ in range(NEW_TOKENS - 1):
            nxt = int(last_logits().argmax())
            t = time.perf_counter()
            llm.eval([nxt])
            steps.append((time.perf_counter() - t) * 1e3)
        return prefill, steps
    return {"load_ms": round(load_ms, 1), **decode_stats(time_runs(one_run)),
            "prompt_tokens": len(prompt),
            "llama_cpp": llama_cpp.__version__ + (" (AMX buffers off: llama.cpp issue 20824)" if amx else "")}


def run(spec: dict) -> dict:
    backend = spec["backend"]
    row = ort_row(spec) if backend == "onnxruntime" else llama_row(spec) if backend == "llama.cpp" else torch_row(spec)
    return {**row, "peak_rss_mib": machine.peak_rss_mib()}


def main(spec_json: str) -> None:
    print(json.dumps(run(json.loads(spec_json))))
