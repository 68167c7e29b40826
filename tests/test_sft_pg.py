"""SFT-PG: the policy-gradient estimator against the exact (reparameterised) gradient, the baseline's
variance reduction, the critic/baseline losses, the n_critic / n_generator schedule, determinism,
mid-cycle resume, and clear errors (a deterministic trained step is refused)."""
import copy
import math
from statistics import NormalDist

import pytest
import torch

from minialign.measure.lab import sft_pg_gradient_samples as gradient_samples
from minialign.layers import MLPCritic, StepBaseline
from minialign.methods.sft_pg import SFTPG, SFTPGConfig, fit, loss_fn
from minialign.metrics import denoising_error
from minialign.schedule import fastdpm_timesteps
from minialign.sampling import plan_full
from minialign.schedule import Schedule, timesteps
from minialign.toy.models import MLPDenoiser

T = 4  # a short chain with large steps: every step's term of the gradient matters


def _setup(min_sigma=0.1, baseline=True, dtype=torch.float64, seed=0, **cfg):
    torch.manual_seed(seed)
    sch = Schedule.make("linear", T, 0.05, 0.3)
    net = MLPDenoiser(T, hidden=16).to(dtype)
    critic = MLPCritic(2, hidden=16).to(dtype)
    data = torch.randn(256, 2, dtype=dtype) * 0.5 + 0.3
    config = SFTPGConfig(min_sigma=min_sigma, baseline=baseline, **cfg)
    return SFTPG(net, sch, timesteps(T, T), data, config, critic=critic,
                 baseline=StepBaseline(2, T, hidden=32).to(dtype) if baseline else None)


def _flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_policy_gradient_is_unbiased_and_the_baseline_lowers_its_variance():
    """With f fixed, N D x grad(mean_k A_k log p_k / D) estimates grad E[f(x_0)] without bias, with or without B.

    Oracle: on the same trajectories (same x_T and noises), the reparameterised full-backprop gradient
    of mean f(x_0) (plan_full) is an unbiased estimator of the same gradient. Over M independent groups
    of m trajectories both are projected onto K random directions, and the mean of the paired difference
    is z-tested per direction at 99.9% with a Bonferroni correction (|z| < z_{1 - 0.001 / 2K} = 3.76).
    Two deliberately biased estimators must be rejected by the same test (so it can fail): dropping the
    last step's term, and a baseline evaluated at the action x_{i+1} instead of the state x_i.
    Measured (M = 400, m = 50, min_sigma = 0.1, float64): max |z| 1.98 with B, 1.38 with B = 0; dropped last
    term 10.6, baseline at the action 65 (M = 200). Variance per trajectory (mean over the directions):
    4.1e-5 reparameterised, 1.1e-4 PG with the learned B, 1.1e-2 PG with B = 0 (~100x). It grows like
    1/sigma^2 of the last step: at min_sigma = 1e-2 / 1e-3 (the method's default) 1.9e-3 / 0.18 with B and
    0.60 / 59 with B = 0, while the reparameterised one stays 3.7e-5.
    """
    model = _setup()
    model.critic.requires_grad_(False)
    # learn B(x_i, i) ~ E[f(x_0) | x_i] with the method's own loss, on trajectories independent of the test's
    opt = torch.optim.Adam(model.baseline.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x0, traj = model.sample(256, g)
        loss, stats = model.critic_loss(model.data[:8], torch.stack(traj.states[:-1]), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.baseline.requires_grad_(False)
    assert stats["baseline_mse"] < 0.3 * model.critic(x0).var().item()

    params = list(model.denoiser.parameters())
    K, M, m, N, D = 6, 400, 50, T, 2
    U = torch.randn(K, sum(p.numel() for p in params), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    U /= U.norm(dim=1, keepdim=True)
    R = gradient_samples(model, M, m, U, torch.Generator().manual_seed(3))
    R0 = gradient_samples(model, M, m, U, torch.Generator().manual_seed(3), baseline=False)  # same trajectories
    torch.testing.assert_close(R0["rp"], R["rp"])
    R["pg_no_baseline"] = R0["pg"]
    # two biased estimators, on M // 2 further groups
    rows = {"rp": [], "drop_last": [], "baseline_at_action": []}
    g = torch.Generator().manual_seed(4)
    for _ in range(M // 2):
        x0, traj = model.sample(m, g)
        states, nxt = torch.cat(traj.states[:-1]), torch.cat(traj.states[1:])
        idx, final = torch.arange(N).repeat_interleave(m), x0.repeat(N, 1)
        x_rp, _ = model.sample(m, plan=plan_full(N), noises=traj.noises, x_T=traj.states[0])
        rows["rp"].append(U @ _flat_grad(model.critic(x_rp).mean(), params))
        keep = idx < N - 1
        loss, _ = model.policy_gradient_loss(states[keep], nxt[keep], idx[keep], final[keep])
        rows["drop_last"].append(U @ _flat_grad(loss * keep.double().mean(), params) * N * D)
        with torch.no_grad():
            adv_bad = model.critic(final) - model.baseline(nxt, idx)
        loss, _ = model.policy_gradient_loss(states, nxt, idx, final, adv_bad)
        rows["baseline_at_action"].append(U @ _flat_grad(loss, params) * N * D)
    B = {k: torch.stack(v) for k, v in rows.items()}
    z_crit = NormalDist().inv_cdf(1 - 0.001 / (2 * K))

    def z(samples, name):
        d = samples[name] - samples["rp"]
        return (d.mean(0) / (d.std(0) / math.sqrt(len(d)))).abs().max().item()

    var = {k: (v.var(0) * m).mean().item() for k, v in R.items()}  # per trajectory
    print({k: z(R, k) for k in ("pg", "pg_no_baseline")}, {k: z(B, k) for k in ("drop_last", "baseline_at_action")}, var)
    assert z(R, "pg") < z_crit
    assert z(R, "pg_no_baseline") < z_crit
    assert z(B, "drop_last") > z_crit  # the test has the power to see a missing term
    assert z(B, "baseline_at_action") > z_crit  # and an action-dependent baseline
    assert var["pg"] * 10 < var["pg_no_baseline"]


def test_policy_gradient_loss_matches_torch_normal():
    model = _setup(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x0, traj = model.sample(8, g)
    i = 1
    loss, adv = model.policy_gradient_loss(traj.states[i], traj.states[i + 1], torch.full((8,), i), x0)
    t, s = model.timesteps[i], model.timesteps[i + 1]
    from minialign.schedule import step_coefficients

    c = step_coefficients(model.schedule, t, s, 1.0)
    mean = c.a * traj.states[i] + c.b * model.denoiser(traj.states[i], torch.full((8,), t))
    log_prob = torch.distributions.Normal(mean, max(c.sigma, 0.1)).log_prob(traj.states[i + 1]).mean(1)
    want = (model.critic(x0) - model.baseline(traj.states[i], torch.full((8,), i))).detach()
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(loss, (want * log_prob).mean())


@pytest.mark.parametrize("baseline_reg", [0.0, 1.0])
def test_critic_loss_and_baseline_regularisation(baseline_reg):
    """lambda = 0: the critic sees only the IPM; lambda = 1: exactly the authors' joint (B - f)^2 backward."""
    model = _setup(dtype=torch.float32, baseline_reg=baseline_reg)
    x0, traj = model.sample(16, torch.Generator().manual_seed(0))
    states, real = torch.stack(traj.states[:-1]), model.data[:16]
    loss, stats = model.critic_loss(real, states, x0)
    crit = list(model.critic.parameters())
    got = _flat_grad(loss, crit)
    pred = model.baseline(states.flatten(0, 1), torch.arange(T).repeat_interleave(16))
    ipm_loss = model.critic(real).mean() - model.critic(x0).mean()
    joint = ipm_loss + baseline_reg * ((pred - model.critic(x0).repeat(T)) ** 2).mean()
    torch.testing.assert_close(got, _flat_grad(joint, crit))
    assert stats["ipm"] == pytest.approx(-ipm_loss.item(), rel=1e-5)
    # the baseline itself always regresses onto sg[f(x_0)]
    loss, _ = model.critic_loss(real, states, x0)
    base = list(model.baseline.parameters())
    want = _flat_grad(((pred - model.critic(x0).repeat(T).detach()) ** 2).mean(), base)
    torch.testing.assert_close(_flat_grad(loss, base), want)


def test_gradient_penalty_option_adds_a_term():
    model = _setup(dtype=torch.float32, gradient_penalty=10.0)
    _, stats = model.loss(0, torch.Generator().manual_seed(0))
    assert stats["gp"] > 0


def test_schedule_alternates_critic_and_generator_steps():
    """n_critic critic steps then n_generator generator steps; each touches only its own networks."""
    model = _setup(dtype=torch.float32, n_critic=3, n_generator=2, batch=8, gen_batch=16)
    assert [model.is_generator_step(s) for s in range(10)] == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 2
    opt = model.optimizer()
    assert [grp["max_norm"] for grp in opt.param_groups] == [0.1, None, None]
    assert [grp["lr"] for grp in opt.param_groups] == [5e-5, 1e-3, 1e-3]
    g = torch.Generator().manual_seed(0)
    for step in range(10):
        opt.zero_grad(set_to_none=True)
        loss, stats = loss_fn(model, step, g)
        loss.backward()
        gen = model.is_generator_step(step)
        assert all((p.grad is not None) == gen for p in model.denoiser.parameters())
        assert all((p.grad is not None) != gen for p in model.critic.parameters())
        assert ("pg_loss" in stats) == gen and ("ipm" in stats) != gen
        if gen:
            assert len(model._buffer) == (3 if step % 5 == 3 else 0)  # emptied after the phase's last step
        opt.step()


def test_gen_batch_none_uses_every_stored_transition():
    model = _setup(dtype=torch.float32, n_critic=2, batch=4)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        model.loss(step, g)
    model.loss(2, g)  # the generator step; the phase's transitions were all used
    assert model._phase is None and model._buffer == []
    calls = []
    model.policy_gradient_loss = lambda *a: (calls.append(len(a[0])), (torch.zeros((), requires_grad=True), torch.zeros(2)))[1]
    for step in range(3, 6):
        model.loss(step, g)
    assert calls == [2 * 4 * T]


def _run(tmp=None, steps=17, resume_at=None):
    model = _setup(dtype=torch.float32, n_critic=5, n_generator=2, batch=16, gen_batch=32, ema=0.9)
    from minialign.train import TrainConfig, train

    if resume_at is not None:  # interrupted mid-cycle, then a fresh process resumes from the checkpoint
        first = copy.deepcopy(model)
        train(first, loss_fn, TrainConfig(steps=resume_at, seed=4, out_dir=tmp, progress=False, grad_clip=None),
              optimizer=first.optimizer())
    hist = train(model, loss_fn, TrainConfig(steps=steps, seed=4, out_dir=tmp, progress=False, grad_clip=None),
                 optimizer=model.optimizer())
    return model, hist


def test_deterministic_under_a_seed_and_resumes_mid_cycle(tmp_path):
    a, ha = _run()
    b, hb = _run()
    c, hc = _run(str(tmp_path), resume_at=6)  # stopped between the two generator steps of a phase
    for x, y in [(a, b), (a, c)]:
        for p, q in zip(x.parameters(), y.parameters()):
            assert torch.equal(p, q)
        assert len(x._buffer) == len(y._buffer) == 3  # 17 steps = 2 cycles of 5 + 2, then 3 critic steps
        for (s1, x1), (s2, x2) in zip(x._buffer, y._buffer):
            assert torch.equal(s1, s2) and torch.equal(x1, x2)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(ha) == strip(hb) == strip(hc)


def test_ema_averages_the_generator_after_each_generator_step():
    model = _setup(dtype=torch.float32, n_critic=1, batch=4, ema=0.9)
    opt = model.optimizer()
    g = torch.Generator().manual_seed(0)
    w0 = model.denoiser.out.weight.detach().clone()
    for step in range(2):  # a critic step, then a generator step
        opt.zero_grad(set_to_none=True)
        model.loss(step, g)[0].backward()
        opt.step()
    assert torch.equal(model.ema.out.weight, w0)  # folded in at the next step
    model.loss(2, g)
    torch.testing.assert_close(model.ema.out.weight, 0.9 * w0 + 0.1 * model.denoiser.out.weight.detach())
    assert not any(p.requires_grad for p in model.ema.parameters())
    x_raw, _ = model.sample(8, torch.Generator().manual_seed(1))
    x_ema, _ = model.sample(8, torch.Generator().manual_seed(1), ema=True)
    assert not torch.equal(x_raw, x_ema)
    with pytest.raises(ValueError, match="ema"):
        _setup(dtype=torch.float32).sample(4, ema=True)


def test_fit_counts_critic_steps():
    model = _setup(dtype=torch.float32, batch=8, n_critic=2)
    hist = fit(model, critic_steps=4, seed=0, progress=False)
    assert len(hist) == 6 and sum("ipm" in r for r in hist) == 4


@pytest.mark.parametrize(
    "kwargs,argname",
    [
        (dict(eta=0.0), "eta"),  # DDIM: deterministic steps have no log-prob
        (dict(min_sigma=0.0), "min_sigma"),  # the last step of an eta = 1 chain would be deterministic
        (dict(n_critic=0), "n_critic"),
        (dict(n_generator=0), "n_generator"),
        (dict(batch=0), "batch"),
        (dict(gen_batch=0), "gen_batch"),
        (dict(lr=0.0), "lr"),
        (dict(max_norm=-1.0), "max_norm"),
        (dict(baseline_reg=-1.0), "baseline_reg"),
        (dict(gradient_penalty=-1.0), "gradient_penalty"),
        (dict(ema=1.0), "ema"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        SFTPGConfig(**kwargs)


def test_more_generator_transitions_than_stored_is_an_error():
    with pytest.raises(ValueError, match="gen_batch"):
        _setup(batch=2, n_critic=1, gen_batch=100)


def test_untrainable_denoiser_is_an_error():
    model = _setup(dtype=torch.float32)
    model.denoiser.requires_grad_(False)
    with pytest.raises(ValueError, match="denoiser"):
        model.optimizer()


def test_fastdpm_timesteps():
    assert fastdpm_timesteps(1000, 10, "linear") == list(range(900, -1, -100))
    assert fastdpm_timesteps(1000, 10) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    with pytest.raises(ValueError, match="kind"):
        fastdpm_timesteps(1000, 10, "cubic")


def test_denoising_error_is_the_pretraining_loss():
    sch = Schedule.make("linear", 10)
    x0 = torch.randn(64, 2)
    oracle = lambda x_t, t, c: (x_t - sch.abar(int(t[0])) ** 0.5 * x0) / (1 - sch.abar(int(t[0]))) ** 0.5  # noqa: E731
    assert max(denoising_error(oracle, sch, x0, [9, 5, 0], torch.Generator().manual_seed(0))) < 1e-8
    zero = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    assert denoising_error(zero, sch, x0, [5], torch.Generator().manual_seed(0))[0] == pytest.approx(1.0, abs=0.3)


def test_make_loss_front_trains_exactly_like_the_module_front():
    """SFT-PG through the method contract (train(denoiser, make_loss(...))) gives the same weights as the SFTPG
    module driven directly, and refuses to run without data."""
    from minialign.methods import build
    from minialign.train import TrainConfig, train

    torch.manual_seed(0)
    sch = Schedule.make("linear", T, 0.05, 0.3)
    net = MLPDenoiser(T, hidden=16)
    data = torch.randn(256, 2) * 0.5 + 0.3
    cfg = SFTPGConfig(batch=16, n_steps=T, n_critic=2, n_generator=1)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = SFTPG(net_a, sch, timesteps(T, T), data, cfg)
    tc = dict(steps=6, lr=cfg.lr, seed=1, grad_clip=None, progress=False)
    train(module, loss_fn, TrainConfig(**tc), optimizer=module.optimizer())
    loss_b, _ = build("sft_pg", sch, None, shape=(2,), config=cfg, extra={"data": data, "timesteps": timesteps(T, T)})
    train(net_b, loss_b, TrainConfig(**tc))
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(net.parameters()), next(net_b.parameters()))  # it did train
    with pytest.raises(ValueError, match="data: SFT-PG matches the data distribution"):
        build("sft_pg", sch, None, shape=(2,))
