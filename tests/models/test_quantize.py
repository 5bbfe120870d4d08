"""INT8 presets and the fidelity measure."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import manifest_of
from wasmlm_models import fidelity, onnx_graph, quantize, sources


def big_initializers(path) -> dict[str, np.dtype]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).dtype for t in m.graph.initializer if np.prod(t.dims) >= 4096}


def test_ort_dynamic_qint8_is_per_tensor_matmulinteger(tiny_bundles):
    m = onnx.load(str(tiny_bundles["tiny-gpt2"] / "model.with_past.ort-dynamic-qint8.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    inits = {t.name: t for t in m.graph.initializer}
    scales = [inits[n.input[3]] for n in m.graph.node if n.op_type == "MatMulInteger" and n.input[3] in inits]
    assert scales and all(np.prod(s.dims) == 1 for s in scales)      # zero points: per-tensor


def test_default_preset_stores_every_big_weight_as_int8(tiny_bundles):
    for folder in tiny_bundles.values():
        kinds = big_initializers(folder / "model.with_past.int8.onnx")
        fp32 = [n for n, k in kinds.items() if k == np.float32]
        assert fp32 == [], fp32
        sizes = {f["name"]: f["bytes"] for f in manifest_of(folder)["files"]}
        assert sizes["model.with_past.int8.onnx"] < 0.3 * sizes["model.with_past.onnx"]


def test_block_quantization_round_trips_within_half_a_step():
    w = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")]), ir_version=9, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx_graph.weight_only_int8(model, ["w"], axis=0, block=32)
    import onnxruntime as ort
    got = ort.InferenceSession(model.SerializeToString()).run(["y"], {})[0]
    blocks = np.abs(w.reshape(2, 32, 48)).max(axis=1, keepdims=True) / 127
    assert got.shape == w.shape
    assert np.all(np.abs(got - w).reshape(2, 32, 48) <= blocks * 0.51 + 1e-6)


def test_fidelity_of_a_file_with_itself_is_perfect(tiny_bundles):
    folder = tiny_bundles["tiny-llama"]
    ids = np.random.default_rng(3).integers(0, 49152, 300)
    r = fidelity.compare(folder / "model.onnx", folder / "model.onnx", ids, window=128)
    assert r["top1_agreement"] == 1.0 and r["ppl_ratio"] == 1.0 and abs(r["kl_mean"]) < 1e-9


def test_fidelity_sees_damage(tiny_bundles, tmp_path):
    """A copy whose weight matrices carry noise as large as the weights must score clearly worse."""
    folder = tiny_bundles["tiny-llama"]
    m = onnx.load(str(folder / "model.onnx"))
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim == 2:
            noisy = a + np.random.default_rng(4).normal(0, a.std(), a.shape)
            t.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    src = sources.load("tiny-llama")
    ids = fidelity.text_ids(src.tokenizer, fidelity_text(), 300)
    r = fidelity.compare(folder / "model.onnx", tmp_path / "bad.onnx", ids, window=128)
    assert r["top1_agreement"] < 0.9 and r["kl_mean"] > 0.01


def test_manifest_has_fidelity_for_each_preset(tiny_bundles):
    f = manifest_of(tiny_bundles["tiny-gpt2"])["fidelity"]
    assert set(f["by_preset"]) == {"ort-dynamic-qint8", quantize.DEFAULT_PRESET}
    for r in f["by_preset"].values():
        assert r["tokens"] >= 4000 and 0 <= r["top1_agreement"] <= 1 and r["ppl_fp32"] > 1


def fidelity_text():
    from wasmlm_models.files import DEFAULT_TEXT
    return DEFAULT_TEXT


def test_fidelity_command_reports_each_int8_file(tiny_bundles, capsys):
    import json
    from wasmlm_models.__main__ import main
    assert main(["fidelity", str(tiny_bundles["tiny-gpt2"]), "--tokens", "600"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["preset"] for r in rows} == {"ort-dynamic-qint8", quantize.DEFAULT_PRESET}
    # windows of 256 (tiny-gpt2's context): 255 + 255 + 87 predicted tokens
    assert all(r["tokens"] == 597 and 0 < r["top1_agreement"] <= 1 for r in rows)


def _matmulinteger(w: np.ndarray, x_zero_point: int):
    from onnx import TensorProto, helper
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(x_zero_point, np.uint8), "xz"),
         numpy_helper.from_array(np.array(0, np.int8), "wz")])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_reference_sessions_multiply_full_range_int8_weights_exactly(tmp_path):
    """ONNX Runtime's default u8 x s8 products saturate on an x86-64 CPU without VNNI (two
    products summed in an i16); the sessions the references run in must not (runner.py)."""
    from wasmlm_models.matrix import _has_s8_products
    from wasmlm_models.runner import ort_session
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (256, 64)).astype(np.int8)
    x = rng.integers(0, 256, (8, 256)).astype(np.uint8)
    path = tmp_path / "mm.onnx"
    onnx.save(_matmulinteger(w, 3), str(path))
    exact = (x.astype(np.int64) - 3) @ w.astype(np.int64)
    got = ort_session(path, threads=1).run(["y"], {"x": x})[0]
    assert np.array_equal(got, exact), np.abs(got - exact).max()
    assert _has_s8_products(path)
