"""The shared sampler: plans, gradients against finite differences, log-probs, determinism, errors."""
import math

import pytest
import torch

from minialign.sampling import (
    gaussian_log_prob, plan_full, plan_none, plan_one_step, plan_truncated, predict_x0, sample, transition_log_prob,
)
from minialign.schedule import Schedule, timesteps
from minialign.toy.models import DigitsUNet, MLPDenoiser


def _toy(T=50, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = MLPDenoiser(T, hidden=16).to(dtype)
    return net, Schedule.make("linear", T, 1e-3, 5e-2)


def _scalar(x0):  # a smooth nonlinear "reward" of the final sample
    return (x0.sin() * torch.tensor([1.0, -0.5], dtype=x0.dtype)).sum() + 0.1 * (x0**2).sum()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_plan_gradient_matches_finite_differences(eta, checkpoint):
    net, sch = _toy()
    ts = timesteps(sch.T, 5)
    x_T = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def run():
        g = torch.Generator().manual_seed(7)  # the same noises every call
        return _scalar(sample(net, sch, x_T, ts, eta, plan_full(len(ts), checkpoint), generator=g)[0])

    params = [net.l1.lin.weight, net.l2.embed.weight, net.out.bias]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(run(), [x_T, *params])
    h = 1e-6
    for tensor, grad in zip([x_T, *params], grads):
        flat, gflat = tensor.data.view(-1), grad.reshape(-1)
        for idx in torch.randperm(flat.numel())[:6].tolist():
            old = flat[idx].item()
            flat[idx] = old + h
            up = run().item()
            flat[idx] = old - h
            down = run().item()
            flat[idx] = old
            fd = (up - down) / (2 * h)
            assert math.isclose(gflat[idx].item(), fd, rel_tol=1e-5, abs_tol=1e-8), (idx, gflat[idx].item(), fd)


def _count_saved(fn):
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return n[0]


def test_no_graph_plan_saves_nothing_for_backward():
    net, sch = _toy(dtype=torch.float32)
    net.requires_grad_(True)
    ts = timesteps(sch.T, 10)
    x_T = torch.randn(8, 2)
    assert _count_saved(lambda: sample(net, sch, x_T, ts, 1.0, plan_none(10), log_probs=True, min_sigma=1e-3)) == 0
    assert _count_saved(lambda: sample(net, sch, x_T, ts, 1.0, plan_full(10))) > 0
    x0, _ = sample(net, sch, x_T, ts, 1.0, plan_none(10))
    assert not x0.requires_grad


def test_log_prob_equals_torch_normal():
    x, mean = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    for sigma in [1e-3, 0.3, 2.0]:
        ref = torch.distributions.Normal(mean, sigma).log_prob(x).flatten(1)
        torch.testing.assert_close(gaussian_log_prob(x, mean, sigma), ref.sum(1))
        torch.testing.assert_close(gaussian_log_prob(x, mean, sigma, "mean"), ref.mean(1))


def test_recorded_and_recomputed_log_probs_agree():
    net, sch = _toy(dtype=torch.float32)
    ts = timesteps(sch.T, 8)
    _, traj = sample(net, sch, torch.randn(16, 2), ts, eta=1.0, min_sigma=1e-3, log_probs=True,
                     generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ts):
        s = traj.prev_timestep(i)
        lp = transition_log_prob(net, sch, traj.states[i], traj.states[i + 1], t, s, 1.0, min_sigma=1e-3)
        torch.testing.assert_close(lp, traj.log_probs[i], rtol=1e-4, atol=1e-3)
    # the last step has sigma = 0 under eta = 1 (abar_s = 1): its log-prob exists only through min_sigma
    assert traj.sigmas[-1] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="deterministic"):
        transition_log_prob(net, sch, traj.states[-2], traj.states[-1], ts[-1], -1, 1.0)


def test_same_seed_gives_bit_identical_trajectories():
    torch.manual_seed(0)
    net = DigitsUNet(100, base=8)
    sch = Schedule.make("linear", 100)
    ts = timesteps(100, 10)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        x_T = torch.randn(4, 1, 8, 8, generator=g)
        runs.append(sample(net, sch, x_T, ts, 0.7, generator=g, cond=torch.arange(4), log_probs=True, min_sigma=1e-3)[1])
    for a, b in zip(runs[0].states + runs[0].noises + runs[0].log_probs, runs[1].states + runs[1].noises + runs[1].log_probs):
        assert torch.equal(a, b)


def test_reusing_stored_noises_reproduces_the_chain():
    net, sch = _toy(dtype=torch.float32)
    ts = timesteps(sch.T, 6)
    x0, traj = sample(net, sch, torch.randn(4, 2), ts, 1.0, generator=torch.Generator().manual_seed(3))
    again, _ = sample(net, sch, traj.states[0], ts, 1.0, noises=traj.noises)
    assert torch.equal(x0, again)
    # a sub-chain restarted at stored x_{t_2} lands on the same x_0
    sub, _ = sample(net, sch, traj.states[2], ts[2:], 1.0, noises=traj.noises[2:])
    assert torch.equal(sub, x0)


def test_truncated_with_k_equal_n_is_full():
    net, sch = _toy()
    ts = timesteps(sch.T, 5)
    x_T = torch.randn(3, 2, dtype=torch.float64)

    def grad(plan):
        net.zero_grad()
        _scalar(sample(net, sch, x_T, ts, 1.0, plan, generator=torch.Generator().manual_seed(1))[0]).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    net.requires_grad_(True)
    torch.testing.assert_close(grad(plan_truncated(5, 5)), grad(plan_full(5)), rtol=0, atol=1e-12)


def test_one_step_plan_is_the_skip_path_formula():
    """SDO: d x_0 / d theta = (prod_{s after k} a_s) b_k d eps(sg[x_k], t_k) / d theta (eta = 0)."""
    from minialign.schedule import step_coefficients

    net, sch = _toy()
    net.requires_grad_(True)
    ts = timesteps(sch.T, 6)
    k = 2
    x_T = torch.randn(3, 2, dtype=torch.float64)
    x0, traj = sample(net, sch, x_T, ts, 0.0, plan_one_step(6, k))
    w = torch.randn_like(x0)
    got = torch.autograd.grad((w * x0).sum(), net.out.weight)[0]
    coefs = [step_coefficients(sch, t, traj.prev_timestep(i), 0.0) for i, t in enumerate(ts)]
    scale = math.prod(c.a for c in coefs[k + 1:]) * coefs[k].b
    eps = net(traj.states[k], torch.full((3,), ts[k]))
    want = torch.autograd.grad((w * scale * eps).sum(), net.out.weight)[0]
    torch.testing.assert_close(got, want)


def test_predict_x0_inverts_q_sample():
    from minialign.schedule import q_sample

    sch = Schedule.make("linear", 100)
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    oracle = lambda x, t, c: noise  # noqa: E731  a denoiser that knows the noise
    x_t = q_sample(sch, x0, torch.full((5,), 40), noise)
    torch.testing.assert_close(predict_x0(oracle, sch, x_t, 40), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,argname",
    [
        (dict(eta=-1.0), "eta"),
        (dict(timesteps=list(range(60, 0, -1))), "timesteps"),
        (dict(timesteps=[10, 20]), "timesteps"),
        (dict(plan=plan_none(3)), "plan"),
        (dict(min_sigma=-1.0), "min_sigma"),
        (dict(eta=1.0, log_probs=True), "min_sigma > 0"),
        (dict(x_T=torch.randn(2)), "x_T"),
        (dict(x_T=torch.randn(4, 3)), "x must have shape"),
    ],
)
def test_bad_sampler_arguments(kwargs, argname):
    net, sch = _toy(dtype=torch.float32)
    args = dict(denoiser=net, schedule=sch, x_T=torch.randn(4, 2), timesteps=timesteps(sch.T, 5), eta=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argname):
        sample(**args)


def test_plan_constructors_check_k():
    with pytest.raises(ValueError, match="k must be"):
        plan_truncated(5, 6)
    with pytest.raises(ValueError, match="k must be"):
        plan_one_step(5, 5)


def test_final_timestep_stops_the_chain_early():
    """Stopping at t_j = running the first j steps of the longer chain (same noises)."""
    net, sch = _toy(dtype=torch.float32)
    ts = timesteps(sch.T, 10)
    _, full = sample(net, sch, torch.randn(4, 2), ts, 1.0, generator=torch.Generator().manual_seed(5))
    part, traj = sample(net, sch, full.states[0], ts[:6], 1.0, noises=full.noises[:6], final_timestep=ts[6])
    assert torch.equal(part, full.states[6]) and traj.prev_timestep(5) == ts[6]
    with pytest.raises(ValueError, match="final_timestep"):
        sample(net, sch, full.states[0], ts[:6], 1.0, final_timestep=ts[5])
