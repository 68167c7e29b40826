"""The gradient-plan picture is each method's own plan (minialign.kit.figures): rows are checked against the
sampler's plan functions, ShortFT's layout and the methods' configs, never against hand-written rows."""
import math

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402

from minialign.kit import figures  # noqa: E402
from minialign.methods import REGISTRY, make_config, shortft  # noqa: E402
from minialign.sampling import plan_full, plan_one_step, plan_truncated  # noqa: E402
from minialign.schedule import timesteps  # noqa: E402

N = 10


def test_kinds_follow_the_sampler_plans():
    assert figures.from_plan(plan_full(4)) == ["graph"] * 4
    assert figures.from_plan(plan_full(3, checkpoint=True)) == ["checkpointed"] * 3
    assert figures.from_plan(plan_truncated(5, 2)) == ["no graph"] * 3 + ["graph"] * 2
    # SDO: the linear path carries step k's graph on to x_0; before k nothing matters for the parameters
    assert figures.from_plan(plan_one_step(5, 1)) == ["no graph", "graph"] + ["path only"] * 3
    cut = plan_one_step(5, 1)
    cut[3] = cut[3]._replace(path=False)  # a detached latent ends what the graph step can reach
    assert figures.from_plan(cut) == ["no graph", "graph", "path only", "no graph", "no graph"]


def test_every_registered_method_has_a_row_of_its_own_chain():
    r = figures.rows(N)
    assert set(r) == set(REGISTRY)
    for name, (kinds, drawn, _) in r.items():
        assert len(kinds) == N and set(kinds) <= figures.CELLS, name
        assert drawn is None or kinds[drawn] in ("graph", "likelihood", "likelihood+graph"), name


def test_sampler_plan_rows_are_the_methods_configured_plans():
    """full BP / checkpointed, DRaFT-K with the registry's own K (min(5, N)), DRaFT-1, AlignProp at the example
    draw, SDO's one retained step: each row equals from_plan of the sampler plan its config describes."""
    r = figures.rows(N, example=4)
    cfg = {n: make_config(n, n_steps=N) for n in REGISTRY}
    assert r["full_bp"][0] == figures.from_plan(plan_full(N))
    assert r["full_bp_ckpt"][0] == figures.from_plan(plan_full(N, checkpoint=cfg["full_bp_ckpt"].checkpoint))
    assert r["draft_k"][0] == figures.from_plan(plan_truncated(N, cfg["draft_k"].k))
    assert r["draft_k"][0].count("graph") == cfg["draft_k"].k == 5
    assert r["draft_1"][0] == figures.from_plan(plan_truncated(N, 1))
    assert r["alignprop"][0] == figures.from_plan(plan_truncated(N, N - 4, keep_path=True)) and r["alignprop"][1] == 4
    assert r["sdo"][0] == figures.from_plan(plan_one_step(N, 4)) and r["sdo"][1] == 4
    # overrides reach the method's config: DRaFT-K with K = 3
    assert figures.rows(N, methods=["draft_k"], overrides={"draft_k": {"k": 3}})["draft_k"][0].count("graph") == 3


def test_refl_and_rlr_rows_follow_their_configs():
    cfg_refl, cfg_rlr = make_config("refl", n_steps=N), make_config("rlr", n_steps=N)
    late = math.ceil(cfg_refl.late_fraction * N)
    for example in range(N):  # the ReFL step is always one of its late steps; nothing after it runs
        kinds, j, _ = figures.rows(N, example=example, methods=["refl"])["refl"]
        assert N - late <= j <= N - 1 and kinds == ["no graph"] * j + ["graph"] + ["not run"] * (N - j - 1)
    kinds, j, _ = figures.rows(N, example=3, methods=["rlr"])["rlr"]
    h = cfg_rlr.h
    assert j == 3 and kinds[j:j + h - 1] == ["graph"] * (h - 1) and kinds[j + h - 1] == "likelihood+graph"
    assert kinds[-1] == "graph" and kinds.count("likelihood") == N - h - 1  # inherent-noise ZO elsewhere
    no_ho = figures.rows(N, methods=["rlr"], overrides={"rlr": {"h": 0, "zo": "none"}})["rlr"]
    assert no_ho[0] == ["no graph"] * (N - 1) + ["graph"] and no_ho[1] is None


@pytest.mark.parametrize("n", [6, 10, 20])
def test_shortft_row_is_its_layout(n):
    """One graph cell per trainable base step, the skipped steps of every jump "input only", the head without
    graph: counted from shortft.layout on the same chain (10 steps: 4 base steps and 3 jumps)."""
    cfg = make_config("shortft", n_steps=n)
    pieces = shortft.layout(timesteps(1000, n, cfg.spacing, cfg.offset), cfg.anchors, 1000)
    kinds, drawn, note = figures.rows(n, methods=["shortft"])["shortft"]
    bases = sum(p.kind == "base" for p in pieces)
    head = sum(len(p.steps) for p in pieces if p.kind == "head")
    assert kinds.count("graph") == bases and kinds[:head] == ["no graph"] * head
    assert kinds.count("input only") == n - head - bases and drawn is None
    assert note.startswith(f"{bases} trainable steps, {len(shortft.jumps(pieces))} frozen jumps")
    if n == 10:
        assert (bases, len(shortft.jumps(pieces))) == (4, 3)


def test_rows_refuse_bad_sizes():
    with pytest.raises(ValueError, match="n_steps"):
        figures.rows(3)
    with pytest.raises(ValueError, match="example"):
        figures.rows(10, example=10)


def test_plan_figure_draws_and_refuses_unknown_methods():
    ax = figures.plan_figure(["full_bp", "sdo"], highlight="sdo")
    labels = [t.get_text() for t in ax.texts]
    assert "full backprop" in labels and "SDO" in labels  # human names from the registry
    assert len(ax.patches) == 2 * 10
    with pytest.raises(ValueError, match="methods"):
        figures.plan_figure(["no_such_method"])
    with pytest.raises(ValueError, match="highlight"):
        figures.plan_figure(["full_bp"], highlight="sdo")
