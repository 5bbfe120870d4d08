"""The GGUF exporter (numpy, no PyTorch) against the traced one, on the same weights.

tiny-llama's random weights are written as a llama.cpp-style GGUF (F32, Q and K rows permuted as
llama.cpp's converter does), read back by gguf_export.read and written as ONNX; ONNX Runtime's
logits on that file must equal those on the traced export of the same model, and PyTorch's."""
from __future__ import annotations

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wasmlm_models import gguf_export, runner, sources

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            kind = NAMES[".".join(rest[:-1])]
            if kind == "attn_q":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif kind == "attn_k":
                a = llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{kind}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def exported(tiny_bundles, tmp_path_factory):
    src = sources.load("tiny-llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(src.model, path)
    llama = gguf_export.read(path)
    files = {}
    for past in (False, True):
        files[past] = path.with_name(f"past-{past}.onnx")
        model = gguf_export.build(llama, past)
        onnx.checker.check_model(model)
        onnx.save(model, str(files[past]))
    return src, llama, files, tiny_bundles["tiny-llama"]


def test_the_gguf_reader_gives_the_models_shape_and_weights(exported):
    src, llama, _, _ = exported
    assert llama.shape == src.shape and llama.tied and llama.rope_theta == src.model.config.rope_theta
    for name, t in src.model.state_dict().items():
        mine = llama.weights["model.embed_tokens.weight" if name == "lm_head.weight" else name]  # tied
        assert np.array_equal(mine, t.numpy()), f"{name}: Q/K rows not restored?"


def test_logits_equal_the_traced_export_and_pytorch(exported):
    src, llama, files, traced = exported
    ids = np.random.default_rng(3).integers(0, llama.shape.vocab, (1, 11))
    ours = ort.InferenceSession(str(files[False])).run(["logits"], {"input_ids": ids})[0]
    theirs = ort.InferenceSession(str(traced / "model.onnx")).run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        ref = src.model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4 and np.abs(ours - ref).max() < 1e-4
    # with a cache: a prefill, then three steps, against the traced with-past file
    a, b = runner.PastRunner(files[True], llama.shape), runner.PastRunner(traced / "model.with_past.onnx", llama.shape)
    for step in (ids[:, :8], ids[:, 8:9], ids[:, 9:10], ids[:, 10:11]):
        assert np.abs(a(step) - b(step)).max() < 1e-4


def test_io_names_and_layouts_are_the_traced_exports(exported):
    _, _, files, traced = exported
    for past, name in ((False, "model.onnx"), (True, "model.with_past.onnx")):
        mine, theirs = onnx.load(str(files[past])).graph, onnx.load(str(traced / name)).graph
        assert [i.name for i in mine.input] == [i.name for i in theirs.input]
        assert [o.name for o in mine.output] == [o.name for o in theirs.output]


def test_other_architectures_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="Llama graphs only"):
        gguf_export.read(tmp_path / "x.gguf")
