"""bench.py: it runs, produces the expected keys, and counts saved bytes correctly (no timing assertions)."""
import json

import torch

from minialign.measure import bench
from minialign.methods import REGISTRY, build

KEYS = {"method", "description", "seconds", "times", "saved_bytes", "peak_saved_bytes", "peak_mb", "time_vs_full_bp", "time_vs_nograd",
        "time_vs_nograd_range", "time_vs_full_bp_range", "saved_vs_full_bp", "n_steps", "batch"}


def test_saved_bytes_counts_each_storage_once_and_skips_excluded_tensors():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    assert bench.saved_bytes(lambda: (a.exp() * 2).sum()) == 40  # exp saves its float32 result
    assert bench.saved_bytes(lambda: (a * a).sum()) == 40        # the same tensor saved twice counts once
    assert bench.saved_bytes(lambda: (a * b).sum()) == 80
    assert bench.saved_bytes(lambda: (a * b).sum(), exclude=[b]) == 40
    with torch.no_grad():
        assert bench.saved_bytes(lambda: (a * b).sum()) == 0


def test_peak_saved_bytes_counts_what_is_alive_at_once():
    a = torch.randn(1000, requires_grad=True)

    def two_graphs_one_at_a_time():
        for _ in range(2):
            (a.exp() * 2).sum().backward()  # each graph (4000 saved bytes) is released before the next
        return (a.exp() * 2).sum()

    assert bench.peak_saved_bytes(two_graphs_one_at_a_time) == 4000
    assert bench.saved_bytes(lambda: (a.exp().sum() + (a * 3).exp().sum())) == 8000
    assert bench.peak_saved_bytes(lambda: (a.exp().sum() + (a * 3).exp().sum())) == 8000


def test_bench_on_toy2d_has_every_registered_method_and_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # a method that needs a shipped artefact for its chain (ShortFT's shortcut, distilled for given jumps) is
    # benched on the chains it was made for; every other registered method runs on this tiny chain
    plain = [n for n in bench.bench_methods() if n == "nograd" or REGISTRY[n].extra is None]
    assert bench.main(["--model", "toy2d", "--steps", "8", "--batch", "8", "--rounds", "2", "--json", str(out),
                       "--methods", *plain]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(plain)
    assert set(bench.bench_methods()) == {"nograd"} | {n for n, m in REGISTRY.items() if not m.needs_data}
    for name, r in rows.items():
        assert KEYS <= set(r), name
        assert name in table
        assert len(r["times"]) == 2 and r["seconds"] > 0 and r["peak_mb"] is None  # peak memory only with --peak
        lo, hi = r["time_vs_nograd_range"]
        assert lo <= r["time_vs_nograd"] <= hi
    assert rows["full_bp"]["time_vs_full_bp"] == 1.0 and rows["nograd"]["time_vs_nograd"] == 1.0
    # memory facts (not timings): no graph saves nothing, checkpointing and truncation save less than full BP
    assert rows["nograd"]["saved_bytes"] == 0
    for name in ("full_bp_ckpt", "draft_1", "draft_k", "draft_lv", "refl"):
        assert 0 < rows[name]["saved_bytes"] < rows["full_bp"]["saved_bytes"], name
    assert rows["draft_1"]["saved_bytes"] < rows["draft_k"]["saved_bytes"]


def test_bench_builds_each_method_as_the_registry_and_the_arena_do():
    """The same config gives the same loss on the same seed, whichever front built it."""
    from minialign.measure import arena, tasks
    net, schedule, reward, shape, cond, _ = bench.setup("toy2d")
    net = net.double()
    task = tasks.Task("t", "t", "gmm", lambda: reward, shape, n_steps=4, batch=8)
    for name in bench.bench_methods()[1:]:
        if REGISTRY[name].extra is not None:
            continue  # needs a shipped artefact for its model; checked in its own tests
        _, _, forward = bench.make_step(name, net, schedule, reward, shape, cond, 4, 8, "toy2d")
        loss_reg, _ = build(name, schedule, reward, shape=shape, cond=cond, n_steps=4, batch=8,
                            **({"k": 4} if name == "draft_k" else {}))
        loss_arena, _ = arena._setup(task, name, net, schedule, reward, {"draft_k": {"k": 4}}, None)
        values = [float(f(net, 0, torch.Generator().manual_seed(3))[0].detach()) for f in (loss_reg, loss_arena)]
        values.append(float(forward(3).detach()))
        assert values[0] == values[1] == values[2], (name, values)


def test_bench_isolated_reports_peak_memory():
    result = bench.run("toy2d", n_steps=3, methods=["draft_1"], batch=8, rounds=1, peak=True)
    assert [r["method"] for r in result["rows"]] == ["nograd", "full_bp", "draft_1"]
    for r in result["rows"]:
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0


def test_bench_rejects_an_unknown_method_and_bad_rounds():
    import pytest

    with pytest.raises(ValueError, match="methods: unknown"):
        bench.run("toy2d", methods=["no_such_method"])
    with pytest.raises(ValueError, match="rounds must be"):
        bench.run("toy2d", methods=["draft_1"], rounds=0)
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        bench.run("toy2d", methods=["draft_1"], clock="gpu")


def test_flops_are_counted_per_step_and_repeat_exactly():
    """FLOPs are the machine-independent cost: the same numbers on every run, and full backprop > DRaFT-1."""
    a = bench.run("toy2d", n_steps=6, methods=["full_bp", "draft_1"], batch=4, rounds=1)
    b = bench.run("toy2d", n_steps=6, methods=["full_bp", "draft_1"], batch=4, rounds=1)
    fa = {r["method"]: (r["flops"], r["flops_range"]) for r in a["rows"]}
    assert fa == {r["method"]: (r["flops"], r["flops_range"]) for r in b["rows"]}
    assert fa["full_bp"][0] > fa["draft_1"][0] > fa["nograd"][0] > 0
