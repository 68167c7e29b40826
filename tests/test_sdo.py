"""SDO against oracles: full backprop (one-step chain), the unrolled skip form (autograd of the formula), the closed
form of the skip product, DRaFT-1 (k = last), and saved-for-backward bytes that do not grow with the chain."""
import math

import pytest
import torch

from minialign.measure.bench import saved_bytes
from minialign.methods.sdo_latent import optimize_latent
from minialign.methods import full_bp, get, sdo, truncated_bp
from minialign.methods.chain import chain_timesteps
from minialign.rewards import component_log_density, jpeg_compressibility
from minialign.sampling import plan_full, sample
from minialign.schedule import Schedule, timesteps
from minialign.toy.models import DigitsUNet, MLPDenoiser

SHAPE = (2,)
REWARD = component_log_density(2, std=0.7)


def _toy(T=50, seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(T, hidden=16).double(), Schedule.make("linear", T, 1e-3, 5e-2)


def _flat_grad(loss, net):
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, net.parameters())])


def _param_grad(make, cfg, net, sch, seed=3):
    loss, stats = make(sch, REWARD, cfg, shape=SHAPE)(net, 0, torch.Generator().manual_seed(seed))
    return loss, stats, _flat_grad(loss, net)


def _x_T(B=4, seed=1):
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _latent_grad(net, sch, ts, plan, eta=0.0, x_T=None):
    x_T = (_x_T() if x_T is None else x_T).clone().requires_grad_(True)
    x0, traj = sample(net, sch, x_T, ts, eta, plan, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad(REWARD(x0).sum(), [x_T])[0], traj


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("retained", ["first", "last", "random", 0])
def test_one_step_chain_sdo_equals_full_backprop(eta, retained):
    net, sch = _toy()
    l_full, _, g_full = _param_grad(full_bp.make_loss, full_bp.FullBPConfig(batch=4, n_steps=1, eta=eta), net, sch)
    l_sdo, stats, g_sdo = _param_grad(sdo.make_loss, sdo.SDOConfig(batch=4, n_steps=1, eta=eta, retained=retained), net, sch)
    assert stats["k"] == 0.0
    if retained != "random":  # random draws k from the generator: same k, but a different noise stream
        assert l_sdo.item() == l_full.item()
        torch.testing.assert_close(g_sdo, g_full, rtol=1e-12, atol=1e-14)
    assert g_sdo.abs().sum() > 0
    # latent optimisation with one step: the same gradient w.r.t. x_T
    ts = timesteps(sch.T, 1, "trailing")
    g_lat = _latent_grad(net, sch, ts, sdo.latent_plan(1, "sdo"), eta)[0]
    g_ref = _latent_grad(net, sch, ts, plan_full(1), eta)[0]
    torch.testing.assert_close(g_lat, g_ref, rtol=1e-12, atol=1e-14)


def test_saved_bytes_do_not_depend_on_chain_length():
    net, sch = _toy(T=200)
    params = list(net.parameters())

    def saved(make, cfg):
        fn = make(sch, REWARD, cfg, shape=SHAPE)
        return saved_bytes(lambda: fn(net, 0, torch.Generator().manual_seed(0))[0], exclude=params)

    for retained in ("first", "last"):
        s10, s100 = (saved(sdo.make_loss, sdo.SDOConfig(batch=8, n_steps=n, retained=retained)) for n in (10, 100))
        assert s10 > 0 and abs(s100 - s10) <= 0.10 * s10, (retained, s10, s100)
    # the measure itself sees chain length: full backprop grows ~linearly
    f10, f100 = (saved(full_bp.make_loss, full_bp.FullBPConfig(batch=8, n_steps=n)) for n in (10, 100))
    assert f100 > 8 * f10
    assert s100 < 0.05 * f100


@pytest.mark.parametrize("schedule", [("linear", 1000, 1e-4, 2e-2), ("cosine", 400, 0, 0), ("sigmoid", 1000, 1e-5, 1e-2)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_skip_product_matches_its_closed_form(schedule, spacing):
    sch = Schedule.make(*schedule)
    ts = timesteps(sch.T, 17, spacing)
    for final in (-1, ts[-1] - 1 if ts[-1] > 0 else -1):
        P = sdo.skip_products(sch, ts, final)
        closed = [math.sqrt(sch.abar(final) / sch.abar(t)) for t in ts] + [1.0]
        assert P == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_output_is_the_unrolled_skip_form(eta):
    """x_0 = A x_T + sum_i c_i eps_i + sum_i d_i z_i, with eps_i re-evaluated on the recorded states."""
    net, sch = _toy()
    ts = timesteps(sch.T, 7, "trailing")
    x_T = _x_T()
    x0, traj = sample(net, sch, x_T, ts, eta, generator=torch.Generator().manual_seed(2))
    A, c, d = sdo.unrolled_coefficients(sch, ts, eta)
    with torch.no_grad():
        eps = [net(x, torch.full((4,), t), None) for x, t in zip(traj.states, ts)]
    unrolled = A * x_T + sum(ci * e for ci, e in zip(c, eps)) + sum(di * z for di, z in zip(d, traj.noises))
    torch.testing.assert_close(x0, unrolled, rtol=1e-10, atol=1e-12)
    if eta == 0:  # DDIM: c_i = lambda_{s} - lambda_{t}, lambda = sqrt((1 - abar) / abar) (an independent formula)
        lam = lambda u: math.sqrt((1 - sch.abar(u)) / sch.abar(u))  # noqa: E731
        assert c == pytest.approx([lam(s) - lam(t) for t, s in zip(ts, ts[1:] + [-1])], rel=1e-10)


def test_latent_gradient_is_autograd_of_the_skip_formula():
    """eta = 0: SDO's d r / d x_T = d/dx_T r(A x_T + c_0 eps(x_T) + sum_{i>0} c_i sg[eps_i]); the skip-only
    ablation is A d r / d x_0; and both differ from the exact gradient."""
    net, sch = _toy()
    n = 8
    ts = timesteps(sch.T, n, "trailing")
    g_sdo, traj = _latent_grad(net, sch, ts, sdo.latent_plan(n, "sdo"))
    A, c, _ = sdo.unrolled_coefficients(sch, ts)
    x_T = traj.states[0].clone().requires_grad_(True)
    with torch.no_grad():
        rest = sum(ci * net(x, torch.full((4,), t), None) for ci, x, t in zip(c[1:], traj.states[1:], ts[1:]))
    formula = A * x_T + c[0] * net(x_T, torch.full((4,), ts[0]), None) + rest
    torch.testing.assert_close(formula, traj.states[-1], rtol=1e-10, atol=1e-12)
    g_formula = torch.autograd.grad(REWARD(formula).sum(), [x_T])[0]
    torch.testing.assert_close(g_sdo, g_formula, rtol=1e-10, atol=1e-12)
    g_skip = _latent_grad(net, sch, ts, sdo.latent_plan(n, "sdo_skip"))[0]
    x0 = traj.states[-1].clone().requires_grad_(True)
    torch.testing.assert_close(g_skip, A * torch.autograd.grad(REWARD(x0).sum(), [x0])[0], rtol=1e-10, atol=1e-12)
    g_exact = _latent_grad(net, sch, ts, plan_full(n))[0]
    assert (g_exact - g_sdo).norm() > 1e-4 * g_exact.norm()


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("k", [0, 3, 5])
def test_parameter_gradient_is_the_retained_step_through_the_skip_path(k, eta):
    """d x_0 / d theta = c_k d eps(sg[x_k], t_k) / d theta, c_k = (prod_{j>k} a_j) b_k, b_k at the chain's eta (with
    eta > 0 the injected noises are the loss's own: the same generator stream)."""
    net, sch = _toy()
    cfg = sdo.SDOConfig(batch=4, n_steps=6, retained=k, eta=eta)
    loss, stats, g = _param_grad(sdo.make_loss, cfg, net, sch)
    assert stats["k"] == k
    ts = chain_timesteps(sch, cfg)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    _, traj = sample(net, sch, x_T, ts, eta, generator=gen)
    _, c, _ = sdo.unrolled_coefficients(sch, ts, eta)
    eps_k = net(traj.states[k], torch.full((4,), ts[k]), None)
    x0 = traj.states[-1] + c[k] * (eps_k - eps_k.detach())
    hand = -REWARD(x0).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, _flat_grad(hand, net), rtol=1e-10, atol=1e-12)


def test_retained_last_is_draft_1():
    net, sch = _toy()
    _, _, g_sdo = _param_grad(sdo.make_loss, sdo.SDOConfig(batch=4, n_steps=6, eta=1.0, retained="last"), net, sch)
    _, _, g_d1 = _param_grad(truncated_bp.make_loss, truncated_bp.TruncatedBPConfig(batch=4, n_steps=6, eta=1.0, k=1),
                             net, sch)
    torch.testing.assert_close(g_sdo, g_d1, rtol=1e-12, atol=1e-14)


def test_random_retained_step_covers_the_chain_and_is_deterministic():
    net, sch = _toy()
    cfg = sdo.SDOConfig(batch=2, n_steps=5)  # retained = "random" by default
    fn = sdo.make_loss(sch, REWARD, cfg, shape=SHAPE)
    g = torch.Generator().manual_seed(0)
    assert {fn(net, i, g)[1]["k"] for i in range(40)} == {0.0, 1.0, 2.0, 3.0, 4.0}
    runs = [_param_grad(sdo.make_loss, cfg, net, sch, seed=11) for _ in range(2)]
    assert runs[0][0].item() == runs[1][0].item() and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


def test_registered_and_refuses_a_non_differentiable_reward():
    assert get("sdo").make_config(n_steps=4).retained == "random"
    net, sch = _toy()
    with pytest.raises(ValueError, match="not differentiable"):
        sdo.make_loss(sch, jpeg_compressibility(), sdo.SDOConfig(), shape=(1, 8, 8))
    torch.manual_seed(0)
    unet = DigitsUNet(50, base=8, num_classes=0)
    with pytest.raises(ValueError, match="not differentiable"):
        optimize_latent(unet, sch, jpeg_compressibility(), shape=(1, 8, 8), n_steps=2, iters=1)


@pytest.mark.parametrize("bad, match", [
    (dict(retained="middle"), "retained must be one of"), (dict(retained=5), r"retained must be an int step index in \[0, 4\]"),
    (dict(retained=-1), "retained"), (dict(retained=True), "retained"), (dict(retained=1.0), "retained"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        sdo.SDOConfig(n_steps=5, **bad)


@pytest.mark.parametrize("bad, match", [
    (dict(plan="exact"), "plan must be one of"), (dict(method="exact"), "method .deprecated"), (dict(iters=0), "iters must be"), (dict(lr=0.0), "lr must be"),
    (dict(start=4), r"start .* \[0, 3\]"), (dict(shape=None), "shape"), (dict(seconds=0), "seconds"),
])
def test_optimize_latent_bad_input(bad, match):
    net, sch = _toy()
    kw = {**dict(shape=SHAPE, n_steps=4, iters=2), **bad}
    with pytest.raises(ValueError, match=match):
        optimize_latent(net, sch, REWARD, **kw)
    with pytest.raises(ValueError, match="plan must be one of"):
        sdo.latent_plan(3, "full_bp")  # a registered method's name, not a sampler plan


@pytest.mark.parametrize("plan", ["sdo", "sdo_skip", "full", "full_ckpt"])
def test_optimize_latent_raises_the_reward_on_the_toy(plan):
    net, sch = _toy()
    net.requires_grad_(False)
    z, x0, hist = optimize_latent(net, sch, REWARD, shape=SHAPE, batch=8, n_steps=10, iters=30, lr=0.1, plan=plan)
    assert z.shape == (8, 2) and x0.shape == (8, 2) and not z.requires_grad
    assert len(hist) == 31 and hist[-1]["reward"] > hist[0]["reward"] + 0.5
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(hist, hist[1:]))
    again = optimize_latent(net, sch, REWARD, shape=SHAPE, batch=8, n_steps=10, iters=30, lr=0.1, plan=plan)
    assert torch.equal(again[0], z)  # deterministic under the seed
    with torch.no_grad():  # x0 is the chain's sample from z
        ref, _ = sample(net, sch, z, timesteps(sch.T, 10, "trailing"), 0.0)
    torch.testing.assert_close(x0, ref, rtol=1e-12, atol=1e-12)


def test_optimize_latent_intermediate_latent_and_digits_model():
    from minialign.rewards import classifier_reward
    from minialign.toy import store

    net, sch, _ = store.load("digits")
    reward = classifier_reward(3)
    z, x0, hist = optimize_latent(net, sch, reward, shape=(1, 8, 8), batch=2, n_steps=8, start=3, iters=6, lr=0.2,
                                  eta=1.0, cond=None)
    assert z.shape == x0.shape == (2, 1, 8, 8)
    assert hist[-1]["reward"] > hist[0]["reward"]
    assert all(p.grad is None for p in net.parameters())


def test_optimize_latent_old_method_keyword_warns_and_means_the_same_plan():
    """method="full_bp" (notebook 04's spelling) is the plan "full": the same latent, with a DeprecationWarning."""
    net, sch = _toy()
    net.requires_grad_(False)
    kw = dict(shape=SHAPE, batch=4, n_steps=4, iters=3, lr=0.1)
    with pytest.warns(DeprecationWarning, match="plan="):
        z_old = optimize_latent(net, sch, REWARD, method="full_bp", **kw)[0]
    assert torch.equal(z_old, optimize_latent(net, sch, REWARD, plan="full", **kw)[0])
