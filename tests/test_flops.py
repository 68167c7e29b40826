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
