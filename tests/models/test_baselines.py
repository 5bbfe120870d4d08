"""The baseline table on a tiny model: every backend's row measured in its own process."""
from __future__ import annotations

import json

from wasmlm_models import baselines


def test_rows_for_every_backend_with_measured_numbers(tiny_bundles, tmp_path):
    out = tmp_path / "baselines.json"
    foreign = {"model": "tiny-llama", "backend": "tract native", "precision": "int8",
               "preset": "q8b32", "cache": "with_past", "threads": 1,
               "decode_ms_per_token": {"median": 1.0, "p90": 1.0, "runs": 5}}
    out.write_text(json.dumps({"rows": [foreign]}))          # a row the Rust bench appended
    table = baselines.build([tiny_bundles["tiny-llama"]], out, baselines.files.DEFAULT_TEXT,
                            threads=[1], cache_dir=tmp_path / "hf")
    rows = table["rows"]
    assert foreign in rows                                    # kept: another backend's row
    ours = [r for r in rows if r is not foreign and r["backend"] != "tract native"]
    kinds = {(r["backend"], r["precision"], r.get("preset"), r["cache"]) for r in ours}
    assert kinds == {
        ("pytorch", "fp32", None, "with_past"),
        ("pytorch", "int8", "torch dynamic qint8", "with_past"),
        ("bitsandbytes", "int8", "LLM.int8 (load_in_8bit)", "with_past"),
        *{("onnxruntime", p, s, c) for p, s in (("fp32", None), ("int8", "ort-dynamic-qint8"), ("int8", "q8b32"))
          for c in ("no_past", "with_past")}}
    for r in ours:
        assert "error" not in r, r
        stat = r.get("decode_ms_per_token") or r["latency_ms"]
        assert 0 < stat["median"] <= stat["p90"] and stat["runs"] >= 5
        assert r["peak_rss_mib"] > 10 and r["threads"] == 1
    assert table["models"]["tiny-llama"]["prompt_ids"].__len__() == 32
    assert table["machine"]["cores"] >= 1 and table["machine"]["cpu"]
    md = out.with_suffix(".md").read_text()
    assert md.count("| tiny-llama (random weights) |") == len(ours) + 1


def test_dynamic_int8_rewrites_gpt2_conv1d(tiny_bundles):
    """docs/decisions.md, "Python pipeline pins": torch's quantize_dynamic skips GPT-2's Conv1D unless rewritten as Linear."""
    import torch
    from wasmlm_models import baseline_runs, sources
    model = baseline_runs.dynamic_int8(sources.load("tiny-gpt2").model)
    dynamic = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(dynamic) == 2 * 4 + 1      # 4 per layer (c_attn, c_proj, c_fc, mlp c_proj) + LM head
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_compare_alternates_rounds_and_takes_each_rounds_ratio(tiny_bundles, tmp_path):
    """`./build.sh compare`: ONNX Runtime's row then tract's, per round; the ratio within each
    round. tract is a stand-in here (the CLI is built after these tests): a script that prints a
    row as `wasmlm bench-row` does and logs its arguments."""
    import stat
    import statistics
    import sys
    from wasmlm_models import compare
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "wasmlm"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    "print(json.dumps({'decode_ms_per_token': {'median': 2.0}, 'prefill_ms': {'median': 3.0}, 'int8_kernels': 'stand-in'}))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "compare.json"
    table = compare.build([tiny_bundles["tiny-llama"]], out, fake, baselines.files.DEFAULT_TEXT, [1], 2, None)
    files = {r["file"] for r in table["results"]}
    assert files == {"model.with_past.ort-dynamic-qint8.onnx", "model.with_past.int8.onnx"}
    for r in table["results"]:
        assert len(r["rounds"]) == 2 and r["threads"] == 1
        for p in r["rounds"]:
            assert p["tract"] == 2.0 and p["onnxruntime"] > 0
            assert p["ratio"] == round(2.0 / p["onnxruntime"], 3)
            assert p["prefill"]["tract"] == 3.0 and p["prefill"]["ratio"] == round(3.0 / p["prefill"]["onnxruntime"], 3)
        assert r["median_prefill_ratio"] == round(statistics.median(p["prefill"]["ratio"] for p in r["rounds"]), 3)
    assert calls.read_text().count("bench-row") == 4
    assert "--threads 1" in calls.read_text()
    assert out.with_suffix(".md").read_text().count("| tiny-llama |") == 2


def test_llama_cpp_rows_run_in_their_own_python_and_keep_the_table_versions(tiny_bundles, tmp_path):
    """A gguf folder of the same model gives llama.cpp rows, each run by the Python given (here
    one without llama-cpp-python, so each row says why it failed rather than holding a number);
    the versions that measured earlier rows stay."""
    bundle = tiny_bundles["tiny-llama"]
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    files = [{"name": "model.q8_0.gguf", "bytes": 10, "type": "Q8_0"}, {"name": "model.q4_1.gguf", "bytes": 7, "type": "Q4_1"}]
    (gguf / "gguf.json").write_text(json.dumps({"model": "tiny-llama", "files": files}))
    out = tmp_path / "baselines.json"
    out.write_text(json.dumps({"versions": {"llama-cpp-python": "0.3.0"}, "rows": []}))
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: no llama_cpp here' >&2\nexit 1\n")
    python.chmod(0o755)
    table = baselines.build([bundle], out, baselines.files.DEFAULT_TEXT, threads=[1, 2], cache_dir=tmp_path / "hf",
                            backends=["llama.cpp"], gguf=gguf, llama_python=str(python))
    rows = table["rows"]
    assert [(r["backend"], r["precision"], r["preset"], r["threads"], r["file"]) for r in rows] == [
        ("llama.cpp", "int8", "Q8_0 GGUF", 1, "model.q8_0.gguf"), ("llama.cpp", "int4", "Q4_1 GGUF", 1, "model.q4_1.gguf"),
        ("llama.cpp", "int8", "Q8_0 GGUF", 2, "model.q8_0.gguf"), ("llama.cpp", "int4", "Q4_1 GGUF", 2, "model.q4_1.gguf")]
    assert all(r["error"] == "ModuleNotFoundError: no llama_cpp here" and "python" not in r for r in rows)
    assert table["versions"]["llama-cpp-python"] == "0.3.0"  # no row of this run measured one


def test_the_page_warns_of_onnx_runtimes_saturating_rows_on_a_cpu_without_vnni():
    table = {"machine": {"cpu": "c", "cores": 2, "simd": ["sse4_2", "avx2", "fma"]}, "protocol": {}, "rows": []}
    page = baselines.render_page(table, "cmd", 0)
    assert "This CPU has no VNNI" in page and page.index("no VNNI") < page.index("| model |")
    for simd in (["sse4_2", "avx2", "avx512f", "avx512_vnni"], ["avx2", "avx_vnni"], []):
        table["machine"]["simd"] = simd
        assert "no VNNI" not in baselines.render_page(table, "cmd", 0), simd
