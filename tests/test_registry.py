"""A method added to the registry alone is picked up everywhere: bench, arena, SD bench, plan figure, results.

The fixture registers a DUMMY method (its own make_loss: full backprop through the sampler's full plan, written
here) with every hook a method can declare, and removes it afterwards. Nothing outside this file names it.
"""
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from minialign import methods  # noqa: E402
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start  # noqa: E402
from minialign.rewards import target_region  # noqa: E402
from minialign.sampling import plan_full, sample  # noqa: E402

NAME = "dummy_full_plan"


@dataclass
class DummyConfig(ChainConfig):
    k: int = 99  # refused above n_steps: the chain hook must cap it


def _make_loss(schedule, reward, cfg, *, shape, cond=None, tag=None):
    """-mean reward of the chain's x_0 with every step's graph kept (the exact pathwise gradient)."""
    if cfg.k > cfg.n_steps:
        raise ValueError(f"k must be <= n_steps={cfg.n_steps}, got {cfg.k} (the chain hook was not applied)")
    if tag not in ("toy", "sd"):
        raise ValueError(f"tag: the extra hook was not applied (got {tag!r})")
    ts = chain_timesteps(schedule, cfg)

    def loss_fn(model, step, generator):
        if not getattr(model, "prepared", False):
            raise RuntimeError("the prepare hook did not run on the trained model")
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan_full(len(ts)), cond=c, generator=generator,
                       final_timestep=cfg.final_timestep)
        r = reward(x0, c)
        return -r.mean(), {"reward": r.mean().item()}

    return loss_fn


def _prepare(model, cfg):
    model.prepared = True


@pytest.fixture
def dummy():
    seen = []

    def extra(kind, **context):
        seen.append((kind, sorted(context)))
        return {"tag": kind}

    m = methods.Method(NAME, "Dummy (full plan)", DummyConfig, _make_loss, "a test's own full backprop",
                       chain=lambda n, b: {"k": min(99, n)}, prepare=_prepare, extra=extra,
                       row=lambda cfg, example: (plan_full(cfg.n_steps), None, "the test's dummy"))
    methods.REGISTRY[NAME] = m
    try:
        yield seen
    finally:
        del methods.REGISTRY[NAME]


def test_setup_applies_every_hook_and_the_callers_overrides_win(dummy):
    from minialign.toy import store

    net, sch, _ = store.load("gmm")
    net = net.double()
    _, cfg = methods.setup(NAME, sch, target_region((0.0, 0.0), 0.15), shape=(2,), model=net, n_steps=4, batch=2)
    assert cfg.k == 4 and net.prepared and dummy[-1][0] == "toy" and {"cfg", "schedule"} <= set(dummy[-1][1])
    assert methods.make_config(NAME, n_steps=4, k=2).k == 2  # a caller's override beats the chain hook
    with pytest.raises(ValueError, match="kind must be one of"):
        methods.setup(NAME, sch, None, shape=(2,), kind="video", n_steps=4)


def test_bench_measures_the_dummy_as_full_backprop(dummy):
    """bench.run with the dummy: built through the registry, one cost measurement; its saved bytes equal full
    backprop's (the same computation), which the bench always measures as its reference."""
    from minialign.measure import bench

    assert NAME in bench.bench_methods()
    res = bench.run("toy2d", n_steps=3, methods=[NAME], batch=4, rounds=1)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"nograd", methods.EXACT, NAME}
    assert rows[NAME]["saved_bytes"] == rows[methods.EXACT]["saved_bytes"] > 0


def test_the_arena_trains_the_dummy(dummy):
    from minialign.measure import arena, tasks

    task = tasks.Task("tiny", "tiny", "gmm", lambda: target_region((0.0, 0.0), 0.15), (2,), n_steps=3, batch=8,
                      eval_batch=32, lr=1e-3)
    res = arena.run([NAME], task, steps={NAME: 2}, seeds=[0], evals=1, progress=False, keep_models=True)
    assert res["steps"][NAME] == 2 and res["models"][(NAME, 0)].prepared
    assert any(kind == "toy" for kind, _ in dummy)


def test_the_sd_bench_measures_the_dummy(dummy):
    from minialign.measure import sd_bench

    res = sd_bench.run(model="tiny", n_steps=3, batch=1, methods=[NAME], rounds=1)
    rows = {r["method"]: r for r in res["rows"]}
    assert NAME in rows and rows[NAME]["saved_bytes"] > 0 and rows[NAME]["label"] == "Dummy (full plan)"
    kind, context = dummy[-1]
    assert kind == "sd" and {"pipe", "guidance_scale", "cfg", "schedule"} <= set(context)


def test_the_plan_figure_draws_the_dummy_and_no_picture_without_a_row(dummy):
    from minialign.kit import figures

    assert figures.rows(8)[NAME] == (["graph"] * 8, None, "the test's dummy")
    ax = figures.plan_figure([NAME, methods.EXACT], n_steps=8)
    assert "Dummy (full plan)" in [t.get_text() for t in ax.texts] and len(ax.patches) == 2 * 8
    methods.REGISTRY[NAME] = replace(methods.REGISTRY[NAME], row=None)
    assert figures.rows(8, methods=[NAME])[NAME] is None
    ax = figures.plan_figure([NAME], n_steps=8)
    assert any("no picture" in t.get_text() for t in ax.texts) and not ax.patches


def test_results_gather_the_dummy(dummy):
    from minialign.kit import results

    t = results.gather({"02_reward_gradients": {f"arena_digit3_tempered_{NAME}_final": 0.7,
                                                f"arena_digit3_tempered_{NAME}_std": 0.1},
                        results.BENCH: {f"time_vs_full_bp_{NAME}": 0.5}})
    assert t["reward_digit3_tempered"][NAME].value == 0.7 and t["time_vs_full_bp"][NAME].value == 0.5
