"""bench.py: it runs, produces the expected keys, and counts saved bytes correctly (no timing assertions)."""
import json

import torch

from minialign import bench

KEYS = {"method", "description", "seconds", "times", "saved_bytes", "peak_mb", "time_vs_full_bp", "time_vs_nograd",
        "saved_vs_full_bp", "n_steps", "batch"}


def test_saved_bytes_counts_each_storage_once_and_skips_excluded_tensors():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    assert bench.saved_bytes(lambda: (a.exp() * 2).sum()) == 40  # exp saves its float32 result
    assert bench.saved_bytes(lambda: (a * a).sum()) == 40        # the same tensor saved twice counts once
    assert bench.saved_bytes(lambda: (a * b).sum()) == 80
    assert bench.saved_bytes(lambda: (a * b).sum(), exclude=[b]) == 40
    with torch.no_grad():
        assert bench.saved_bytes(lambda: (a * b).sum()) == 0


def test_bench_in_process_on_toy2d_has_every_method_and_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "toy2d", "--steps", "4", "--batch", "8", "--repeats", "1", "--k", "2",
                       "--in-process", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(bench.METHODS)
    for name, r in rows.items():
        assert KEYS <= set(r), name
        assert name in table
        assert r["seconds"] > 0 and r["peak_mb"] is None  # peak memory needs isolation on CPU
    assert rows["full_bp"]["time_vs_full_bp"] == 1.0 and rows["nograd"]["time_vs_nograd"] == 1.0
    # memory facts (not timings): no graph saves nothing, checkpointing and truncation save less than full BP
    assert rows["nograd"]["saved_bytes"] == 0
    for name in ("full_bp_ckpt", "draft_1", "draft_k", "draft_lv", "refl"):
        assert 0 < rows[name]["saved_bytes"] < rows["full_bp"]["saved_bytes"], name
    assert rows["draft_1"]["saved_bytes"] < rows["draft_k"]["saved_bytes"]


def test_bench_isolated_reports_peak_memory():
    result = bench.run("toy2d", n_steps=3, methods=["draft_1"], batch=8, repeats=1, isolate=True)
    assert [r["method"] for r in result["rows"]] == ["nograd", "full_bp", "draft_1"]
    for r in result["rows"]:
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0


def test_bench_rejects_an_unknown_method():
    import pytest

    with pytest.raises(ValueError, match="methods: unknown"):
        bench.run("toy2d", methods=["sdo"])
