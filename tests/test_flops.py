"""Compute counted, not timed (minialign.measure.flops): FLOPs against a hand count, checkpoint recomputation charged,
a random step cost charged for what each step did, and the model at each budget is the right one."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minialign.measure.flops import Ledger, log_grid
from minialign.methods import build
from minialign.rewards import target_region
from minialign.schedule import Schedule
from minialign.toy.models import MLPDenoiser
from minialign.train import TrainConfig, train


def _run(model, loss_fn, axis="flops", budgets=(1e12,), evaluate=lambda: {}, steps=None):
    ledger = Ledger(model, axis, budgets, evaluate)
    history = train(model, ledger.wrap(loss_fn), TrainConfig(steps=steps or 10**6, lr=1e-2, log_every=1, progress=False),
                    callback=ledger.callback, accelerator=ledger.accelerator())
    ledger.finish()
    return ledger, history


def test_a_step_is_charged_its_forward_and_backward_flops_by_hand_count():
    """y = W x with W [m, n] trainable, x [B, n] a constant: forward 2 B n m, backward (dW only) 2 B n m."""
    B, n, m = 16, 8, 4
    lin = torch.nn.Linear(n, m, bias=False)
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(0))
    ledger, _ = _run(lin, lambda model, step, g: (model(x).pow(2).mean(), {}), steps=3)
    assert ledger.costs == [{"flops": 4 * B * n * m, "calls": B}] * 3
    assert ledger.total["flops"] == 12 * B * n * m and ledger.total["step"] == 3


def _toy():
    torch.manual_seed(0)
    return MLPDenoiser(6, hidden=16), Schedule.make("linear", 6, 0.05, 0.3)


def test_checkpoint_recomputation_is_counted():
    """Full backprop with every call checkpointed costs N recomputed network forwards (batch B) more than without.
    torch's non-reentrant checkpoint stops recomputing once it has every tensor backward needs, so the output
    layer's product (2 B hidden dim FLOPs), whose result backward does not need, is not redone."""
    net, sch = _toy()
    reward, n, batch = target_region((0.0, 0.0), 0.15), 6, 8
    cost = {}
    for ckpt in (False, True):
        loss_fn, _ = build("full_bp", sch, reward, shape=(2,), n_steps=n, batch=batch, checkpoint=ckpt)
        ledger, _ = _run(net, loss_fn, steps=2)
        cost[ckpt] = ledger.costs[0]["flops"]
    with FlopCounterMode(display=False) as mode:
        net(torch.zeros(batch, 2), torch.zeros(batch, dtype=torch.long))
    assert cost[True] - cost[False] == n * (mode.get_total_flops() - 2 * batch * 16 * 2) > 0


def test_a_random_step_cost_is_charged_for_what_the_step_did():
    """AlignProp draws K ~ U{1..N} per step: each step's charge is a + b K exactly (b: one graph-carrying step's
    forward and backward), so two steps are charged alike iff they drew the same K."""
    net, sch = _toy()
    loss_fn, _ = build("alignprop", sch, target_region((0.0, 0.0), 0.15), shape=(2,), n_steps=6, batch=8)
    ledger, history = _run(net, loss_fn, steps=12)
    ks = [int(h["k"]) for h in history]
    flops = [c["flops"] for c in ledger.costs]
    assert len(set(ks)) >= 3
    (k1, f1), (k2, f2) = sorted({k: f for k, f in zip(ks, flops)}.items())[:2]
    slope = (f2 - f1) // (k2 - k1)
    assert all(f == f1 + slope * (k - k1) for k, f in zip(ks, flops)) and slope > 0


def test_the_model_at_a_budget_is_the_one_after_the_last_step_that_fits():
    """Steps cost 3, 5, 7, ... FLOPs-like units (calls: rows); the point at budget b is taken after the last step
    whose cumulative cost is <= b, and shows that step's parameters; a budget hit exactly is evaluated after it."""
    p = torch.nn.Parameter(torch.zeros(()))
    model = torch.nn.Module()
    model.p = p
    model.forward = lambda x: x
    seen = []  # the parameter at the start of each step = after the previous one

    def loss_fn(m, step, g):
        seen.append(p.item())
        m(torch.zeros(3 + 2 * step, 1))  # rows: this step's cost on the "calls" axis
        return -p, {}

    ledger, _ = _run(model, loss_fn, axis="calls", budgets=[2, 3, 10, 14], evaluate=lambda: {"p": p.item()})
    # cumulative calls after steps 1, 2, 3, 4: 3, 8, 15, 24
    assert [(pt["budget"], pt["step"], pt["calls"]) for pt in ledger.points] == [(2, 0, 0), (3, 1, 3), (10, 2, 8), (14, 2, 8)]
    assert [pt["p"] for pt in ledger.points] == [seen[0], seen[1], seen[2], seen[2]]
    assert ledger.total["step"] == 3  # stopped once the last budget was settled


def test_bad_arguments_are_refused():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="axis must be one of"):
        Ledger(lin, "seconds", [1.0], dict)
    with pytest.raises(ValueError, match="budgets must be"):
        Ledger(lin, "flops", [], dict)
    with pytest.raises(ValueError, match="top > 0"):
        log_grid(0.0)
    grid = log_grid(64.0, 4, span=8.0)
    assert grid[-1] == 64.0 and grid[0] == pytest.approx(8.0) and grid[1] / grid[0] == pytest.approx(2.0)


def _charges(name, cost_class, steps):
    """Per-step charges and final parameters of `steps` train() steps of a registered method on the shipped gmm
    model (the arena's 20-step chain, batch 8), with the given cost_class (None: every step counted)."""
    from minialign import methods as registry
    from minialign.toy import store

    model, schedule, _ = store.load("gmm")
    model.requires_grad_(True)
    loss_fn, _ = registry.setup(name, schedule, target_region((0.0, 0.0), 0.15), shape=(2,), kind="toy",
                                context={"model_name": "gmm"}, model=model, n_steps=20, batch=8)
    start = [p.detach().clone() for p in model.parameters()]
    ledger = Ledger(model, "flops", [1e15], dict, cost_class=cost_class)
    train(model, ledger.wrap(loss_fn), TrainConfig(steps=steps, lr=1e-3, seed=3, log_every=1, progress=False),
          callback=ledger.callback, accelerator=ledger.accelerator())
    ledger.finish()
    return ledger, [(p.detach() - p0).clone() for p, p0 in zip(model.parameters(), start)]


@pytest.mark.parametrize("name", [n for n in __import__("minialign.methods", fromlist=["names"]).names()])
def test_cached_cost_classes_charge_every_step_what_counting_it_would(name):
    """Every registered reward method, 12 steps twice: every step counted vs the registry's cost_class (first step of
    a class counted, the rest charged the cache). The charges are equal step by step (a cost class that misses what
    the step's cost depends on fails here), and so are the trained parameters (the re-run of a step whose class is
    new leaves no trace: same RNGs, same loss_fn state; a trace would change the draws and move them far)."""
    from minialign import methods as registry

    cost_class = registry.get(name).cost_class
    exact, p_exact = _charges(name, None, 12)
    cached, p_cached = _charges(name, cost_class, 12)
    assert cached.costs == exact.costs
    # the re-run leaves no trace; equal up to float rounding only: FlopCounterMode's dispatch changes some ops'
    # rounding (full backprop's parameters differ by 6e-8 after 2 steps counted vs uncounted, same draws), which Adam
    # grows (4e-6 after 12 steps); other draws would move them by the size of the updates (~1e-3)
    moved = max(d.abs().max().item() for d in p_exact)
    assert max((a - b).abs().max().item() for a, b in zip(p_exact, p_cached)) <= 0.01 * moved
    if cost_class is not None:
        assert cached.counted == len(cached.cache) < 12  # some steps were charged from the cache


def test_a_method_whose_cost_cannot_be_keyed_is_counted_every_step():
    from minialign import methods as registry

    assert registry.get("sft_pg").cost_class is None  # its buffer lives in the model, outside its state_dict
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="hashable"):
        ledger = Ledger(lin, "flops", [1e9], dict, cost_class=lambda stats: [1])
        _run_step = ledger.wrap(lambda m, s, g: (m(torch.ones(1, 2)).sum(), {}))
        _run_step(lin, 0, torch.Generator())


def test_a_cost_class_that_misses_what_the_cost_depends_on_is_caught():
    """AlignProp's cost depends on its K: one class for every step charges the wrong FLOPs (the test above would fail)."""
    exact, _ = _charges("alignprop", None, 6)
    wrong, _ = _charges("alignprop", lambda stats: "every step", 6)
    assert wrong.costs != exact.costs and wrong.counted == 1
