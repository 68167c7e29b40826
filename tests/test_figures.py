"""The gradient-plan picture follows the sampler's plans (minialign.kit.figures)."""
import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402

from minialign.kit import figures  # noqa: E402
from minialign.sampling import plan_full, plan_one_step, plan_truncated  # noqa: E402


def test_kinds_follow_the_sampler_plans():
    assert figures.from_plan(plan_full(4)) == ["graph"] * 4
    assert figures.from_plan(plan_full(3, checkpoint=True)) == ["checkpointed"] * 3
    assert figures.from_plan(plan_truncated(5, 2)) == ["no graph"] * 3 + ["graph"] * 2
    # SDO: the linear path carries step k's graph on to x_0; before k nothing matters for the parameters
    assert figures.from_plan(plan_one_step(5, 1)) == ["no graph", "graph"] + ["path only"] * 3
    cut = plan_one_step(5, 1)
    cut[3] = cut[3]._replace(path=False)  # a detached latent ends what the graph step can reach
    assert figures.from_plan(cut) == ["no graph", "graph", "path only", "no graph", "no graph"]


def test_rows_are_consistent_with_the_methods():
    r = figures.rows(10, k=3, h=2)
    assert r["draft_k"][0].count("graph") == 3 and r["draft_1"][0][-1] == "graph"
    rlr, random = r["rlr"]
    assert random and rlr[5] == "graph" and rlr[6] == "likelihood+graph" and rlr[-1] == "graph"
    assert rlr.count("likelihood") == 10 - 2 - 1
    assert r["refl"][0].count("graph") == 1 and r["refl"][0][-1] == "not run"
    assert all(len(kinds) == 10 for kinds, _ in r.values())
    with pytest.raises(ValueError, match="n_steps"):
        figures.rows(3)
    with pytest.raises(ValueError, match="example"):
        figures.rows(10, example=9)


def test_plan_figure_draws_and_refuses_unknown_methods():
    ax = figures.plan_figure(["full_bp", "sdo"], highlight="sdo")
    labels = [t.get_text() for t in ax.texts]
    assert "full backprop" in labels and "SDO" in labels  # human names from the registry
    assert len(ax.patches) == 2 * 10
    with pytest.raises(ValueError, match="methods"):
        figures.plan_figure(["no_such_method"])
    with pytest.raises(ValueError, match="highlight"):
        figures.plan_figure(["full_bp"], highlight="sdo")
