"""Baselines against oracles: finite differences, full BP, hand computations of each estimator."""
import math

import pytest
import torch

from minialign.methods import ddpo, estimators, full_bp, refl, truncated_bp
from minialign.methods.chain import chain_timesteps
from minialign.rewards import Reward, component_log_density, jpeg_compressibility
from minialign.sampling import plan_none, sample
from minialign.schedule import Schedule, step_coefficients
from minialign.toy.models import DigitsUNet, MLPDenoiser

SHAPE = (2,)


def _toy(T=50, seed=0):
    torch.manual_seed(seed)
    net = MLPDenoiser(T, hidden=16).double()
    return net, Schedule.make("linear", T, 1e-3, 5e-2)


REWARD = component_log_density(2, std=0.7)


def _grads(loss_fn, net, seed=3):
    loss, stats = loss_fn(net, 0, torch.Generator().manual_seed(seed))
    return loss, stats, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)


def _flat(grads, net):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, net.parameters())])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_full_bp_gradient_matches_finite_differences(eta):
    net, sch = _toy()
    cfg = full_bp.FullBPConfig(batch=4, n_steps=6, eta=eta)
    loss_fn = full_bp.make_loss(sch, REWARD, cfg, shape=SHAPE)
    loss, _, grads = _grads(loss_fn, net)
    h = 1e-5  # central differences: truncation ~h^2, round-off ~1e-16 |loss| / h
    params = dict(net.named_parameters())
    for name in ("l1.lin.weight", "l3.embed.weight", "out.bias"):
        p, g = params[name], grads[list(params).index(name)]
        flat, gflat = p.data.view(-1), g.reshape(-1)
        nonzero = gflat.nonzero().flatten()  # embeddings: only the visited timesteps' rows get gradient
        for idx in nonzero[torch.randperm(len(nonzero))[:4]].tolist():
            old = flat[idx].item()
            flat[idx] = old + h
            up = loss_fn(net, 0, torch.Generator().manual_seed(3))[0].item()
            flat[idx] = old - h
            down = loss_fn(net, 0, torch.Generator().manual_seed(3))[0].item()
            flat[idx] = old
            fd = (up - down) / (2 * h)
            assert math.isclose(gflat[idx].item(), fd, rel_tol=1e-5, abs_tol=1e-10 * abs(loss.item()) / h), (name, idx, gflat[idx].item(), fd)


@pytest.mark.parametrize("variant", ["draft", "alignprop"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncated_with_k_equal_n_is_full_bp(variant, checkpoint):
    net, sch = _toy()
    n = 5
    full = full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=4, n_steps=n, eta=1.0), shape=SHAPE)
    trunc = truncated_bp.make_loss(
        sch, REWARD, truncated_bp.TruncatedBPConfig(batch=4, n_steps=n, eta=1.0, k=n, variant=variant, checkpoint=checkpoint),
        shape=SHAPE)
    l_full, _, g_full = _grads(full, net)
    l_trunc, _, g_trunc = _grads(trunc, net)
    assert l_full.item() == l_trunc.item()
    torch.testing.assert_close(_flat(g_trunc, net), _flat(g_full, net), rtol=1e-12, atol=1e-14)


def test_alignprop_parameter_gradient_equals_draft_k_for_the_same_k():
    """The kept latent path carries no parameter gradient (eps is detached there)."""
    net, sch = _toy()
    cfg = dict(batch=4, n_steps=6, k=2)
    g = [_flat(_grads(truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(variant=v, **cfg), shape=SHAPE),
                      net)[2], net) for v in ("draft", "alignprop")]
    torch.testing.assert_close(g[0], g[1], rtol=1e-12, atol=1e-14)
    assert g[0].abs().sum() > 0


def test_truncated_k_less_than_n_differs_from_full_bp():
    net, sch = _toy()
    g_full = _flat(_grads(full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=4, n_steps=6), shape=SHAPE), net)[2], net)
    g_k1 = _flat(_grads(truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(batch=4, n_steps=6, k=1),
                                               shape=SHAPE), net)[2], net)
    assert (g_full - g_k1).norm() > 1e-3 * g_full.norm()


def test_alignprop_random_k_stays_in_range():
    net, sch = _toy()
    loss_fn = truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(
        batch=2, n_steps=6, k=4, variant="alignprop", random_k=True), shape=SHAPE)
    g = torch.Generator().manual_seed(0)
    ks = {loss_fn(net, i, g)[1]["k"] for i in range(30)}
    assert ks <= {1.0, 2.0, 3.0, 4.0} and len(ks) >= 3


def test_draft_lv_matches_a_hand_computation():
    net, sch = _toy()
    n, m, B = 5, 3, 4
    cfg = truncated_bp.TruncatedBPConfig(batch=B, n_steps=n, variant="draft_lv", lv_samples=m)
    loss, _, grads = _grads(truncated_bp.make_loss(sch, REWARD, cfg, shape=SHAPE), net)
    # by hand: the same random draws in the same order
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(B, 2, generator=g, dtype=torch.float64)
    ts = chain_timesteps(sch, cfg)
    x0, _ = sample(net, sch, x_T, ts, 0.0, plan_none(n))
    e = torch.randn(m * B, 2, generator=g, dtype=torch.float64)
    t1 = ts[-1]
    abar = sch.abar(t1)
    x_t1 = math.sqrt(abar) * x0.repeat(m, 1) + math.sqrt(1 - abar) * e
    c = step_coefficients(sch, t1, -1, 0.0)
    x0_i = c.a * x_t1 + c.b * net(x_t1, torch.full((m * B,), t1), None)
    hand = -REWARD(x0_i).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    hand_grads = torch.autograd.grad(hand, list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(_flat(grads, net), _flat(hand_grads, net), rtol=1e-10, atol=1e-12)


def test_refl_matches_a_hand_computation():
    net, sch = _toy()
    B, n = 4, 8
    cfg = refl.ReFLConfig(batch=B, n_steps=n, late_fraction=0.5)
    loss, stats, grads = _grads(refl.make_loss(sch, REWARD, cfg, shape=SHAPE), net)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(B, 2, generator=g, dtype=torch.float64)
    j = int(torch.randint(n - 4, n, (1,), generator=g))
    ts = chain_timesteps(sch, cfg)
    assert stats["t"] == ts[j] and ts[j] <= ts[n - 4]
    _, traj = sample(net, sch, x_T, ts, 0.0, plan_none(n))
    x_t, abar = traj.states[j], sch.abar(ts[j])
    x0_hat = (x_t - math.sqrt(1 - abar) * net(x_t, torch.full((B,), ts[j]), None)) / math.sqrt(abar)
    hand = -REWARD(x0_hat).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat(grads, net), _flat(torch.autograd.grad(hand, list(net.parameters())), net),
                               rtol=1e-10, atol=1e-12)


def test_ppo_clip_loss_matches_a_hand_computation():
    log_prob = torch.tensor([0.0, 0.1, -0.1, 5e-5])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 2.0, -1.0, 7.0])
    loss, ratio = ddpo.ppo_clip_loss(log_prob, old, adv, clip_range=0.05, adv_clip=5.0)
    # per sample max(-A r, -A clip(r, 0.95, 1.05)), A clipped to [-5, 5]:
    #   r = 1        A = 1  -> -1
    #   r = e^0.1    A = 2  -> max(-2.2103, -2.1)   = -2.1        (clipped side binds)
    #   r = e^-0.1   A = -1 -> max(0.9048, 0.95)    = 0.95        (clipped side binds)
    #   r = e^5e-5   A = 5  -> -5 e^5e-5            = -5.00025    (inside the range; A clipped 7 -> 5)
    hand = (-1.0 - 2.1 + 0.95 - 5 * math.exp(5e-5)) / 4
    assert math.isclose(loss.item(), hand, rel_tol=1e-6)
    torch.testing.assert_close(ratio, log_prob.exp())


def test_ddpo_first_inner_step_has_ratio_exactly_one_and_reinforce_gradient():
    net, sch = _toy()
    B, n = 6, 5
    cfg = ddpo.DDPOConfig(batch=B, n_steps=n, inner_epochs=2, clip_range=1e-4)
    loss_fn = ddpo.make_loss(sch, REWARD, cfg, shape=SHAPE)
    gen = torch.Generator().manual_seed(3)
    loss, stats = loss_fn(net, 0, gen)
    assert stats["ratio_dev"] == 0.0 and stats["resampled"] == 1.0
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    # REINFORCE by hand: -mean over stochastic steps and samples of A * log p, on the same trajectory
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(B, 2, generator=g, dtype=torch.float64)
    ts = chain_timesteps(sch, cfg)
    x0, traj = sample(net, sch, x_T, ts, 1.0, generator=g, min_sigma=cfg.min_sigma)
    r = REWARD(x0)
    adv = ((r - r.mean()) / (r.std(unbiased=False) + 1e-8)).clamp(-5, 5)
    terms = []
    for i in range(n - 1):  # the last step is deterministic (sigma = 0) and not trained
        s = ts[i + 1]
        c = step_coefficients(sch, ts[i], s, 1.0)
        x_t = traj.states[i]
        mean = c.a * x_t + c.b * net(x_t, torch.full((B,), ts[i]), None)
        log_p = (-((traj.states[i + 1] - mean) ** 2) / (2 * c.sigma**2) - math.log(c.sigma) - 0.5 * math.log(2 * math.pi)).mean(1)
        terms.append((-adv * log_p).mean())
    hand = torch.stack(terms).mean()
    hand_grads = torch.autograd.grad(hand, list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(_flat(grads, net), _flat(hand_grads, net), rtol=1e-9, atol=1e-12)
    # after an update the second inner step sees ratio != 1, on the same stored batch
    with torch.no_grad():
        for p, gr in zip(net.parameters(), grads):
            if gr is not None:
                p -= 1e-3 * gr
    _, stats2 = loss_fn(net, 1, gen)
    assert stats2["resampled"] == 0.0 and stats2["reward"] == stats["reward"]
    assert stats2["ratio_dev"] > 0 and stats2["clip_frac"] > 0
    _, stats3 = loss_fn(net, 2, gen)  # inner_epochs * minibatches = 2 updates per batch: resample
    assert stats3["resampled"] == 1.0


def test_ddpo_kl_is_zero_at_the_pretrained_model_and_per_condition_standardisation():
    net, sch = _toy()
    loss_fn = ddpo.make_loss(sch, REWARD, ddpo.DDPOConfig(batch=4, n_steps=4, kl_coef=0.5), shape=SHAPE)
    assert loss_fn(net, 0, torch.Generator().manual_seed(0))[1]["kl"] == 0.0
    r = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0])
    cond = torch.tensor([0, 0, 1, 1, 2])
    adv = estimators.standardise(r, cond, per_condition=True)
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=1e-6, atol=1e-6)
    batch_adv = estimators.standardise(r)
    assert adv[4] == batch_adv[4]  # a group of one falls back to the batch statistics


def test_ddpo_accepts_a_non_differentiable_reward_on_digits():
    torch.manual_seed(0)
    unet = DigitsUNet(1000, base=8)
    sch = Schedule.make("linear", 1000)
    loss_fn = ddpo.make_loss(sch, jpeg_compressibility(), ddpo.DDPOConfig(batch=4, n_steps=3, advantage="per_condition"),
                             shape=(1, 8, 8), cond=lambda b, g: torch.randint(0, 2, (b,), generator=g))
    loss, stats = loss_fn(unet, 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert stats["reward"] < 0 and unet.inp.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda s, r: full_bp.make_loss(s, r, full_bp.FullBPConfig(), shape=SHAPE),
    lambda s, r: truncated_bp.make_loss(s, r, truncated_bp.TruncatedBPConfig(variant="draft"), shape=SHAPE),
    lambda s, r: truncated_bp.make_loss(s, r, truncated_bp.TruncatedBPConfig(variant="alignprop"), shape=SHAPE),
    lambda s, r: truncated_bp.make_loss(s, r, truncated_bp.TruncatedBPConfig(variant="draft_lv"), shape=SHAPE),
    lambda s, r: refl.make_loss(s, r, refl.ReFLConfig(), shape=SHAPE),
], ids=["full_bp", "draft", "alignprop", "draft_lv", "refl"])
def test_gradient_methods_refuse_a_non_differentiable_reward(make):
    _, sch = _toy()
    with pytest.raises(ValueError, match=r"jpeg\(q=95\).*not differentiable"):
        make(sch, jpeg_compressibility())


def test_a_reward_that_detaches_is_refused_at_run_time():
    net, sch = _toy()
    sneaky = Reward(lambda x, c: -(x.detach() ** 2).sum(1), "sneaky", differentiable=True)
    loss_fn = full_bp.make_loss(sch, sneaky, full_bp.FullBPConfig(batch=2, n_steps=3), shape=SHAPE)
    with pytest.raises(ValueError, match="sneaky.*no graph"):
        loss_fn(net, 0, torch.Generator().manual_seed(0))


def test_bad_configs_raise_naming_the_argument():
    _, sch = _toy()
    with pytest.raises(ValueError, match="variant"):
        truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(variant="draft-k"), shape=SHAPE)
    with pytest.raises(ValueError, match="k must be"):
        truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(n_steps=4, k=5), shape=SHAPE)
    with pytest.raises(ValueError, match="DRaFT-LV is defined for K = 1"):
        truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(variant="draft_lv", k=2), shape=SHAPE)
    with pytest.raises(ValueError, match="eta"):
        ddpo.make_loss(sch, REWARD, ddpo.DDPOConfig(eta=0.0), shape=SHAPE)
    with pytest.raises(ValueError, match="minibatches"):
        ddpo.make_loss(sch, REWARD, ddpo.DDPOConfig(batch=6, minibatches=4), shape=SHAPE)
    with pytest.raises(ValueError, match="late_fraction"):
        refl.make_loss(sch, REWARD, refl.ReFLConfig(late_fraction=0.0), shape=SHAPE)


@pytest.mark.parametrize("name", ["full_bp", "draft", "draft_lv", "refl", "ddpo"])
def test_each_loss_is_deterministic_under_a_seed(name):
    net, sch = _toy()
    make = {
        "full_bp": lambda: full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=3, n_steps=4, eta=1.0), shape=SHAPE),
        "draft": lambda: truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(batch=3, n_steps=4, eta=1.0),
                                                shape=SHAPE),
        "draft_lv": lambda: truncated_bp.make_loss(sch, REWARD, truncated_bp.TruncatedBPConfig(
            batch=3, n_steps=4, variant="draft_lv"), shape=SHAPE),
        "refl": lambda: refl.make_loss(sch, REWARD, refl.ReFLConfig(batch=3, n_steps=4), shape=SHAPE),
        "ddpo": lambda: ddpo.make_loss(sch, REWARD, ddpo.DDPOConfig(batch=3, n_steps=4), shape=SHAPE),
    }[name]
    a = make()(net, 0, torch.Generator().manual_seed(5))[0]
    b = make()(net, 0, torch.Generator().manual_seed(5))[0]
    c = make()(net, 0, torch.Generator().manual_seed(6))[0]
    assert a.item() == b.item() and a.item() != c.item()


def test_ddpo_kl_reference_is_the_pretrained_model_and_only_what_trains_is_saved():
    """Issue 19 item 5: the KL reference travels in loss_fn.state_dict() as the parameters that train (here LoRA's;
    the frozen base is the model's own) and is rebuilt from the resumed model, so it stays the pretrained model.
    A fresh KL loss_fn first called at a later step cannot know that model and refuses."""
    from minialign.lora import add_lora

    net, sch = _toy()
    add_lora(net, r=2, target_modules=["lin"])
    cfg = ddpo.DDPOConfig(batch=4, n_steps=4, kl_coef=0.5)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 30)
    with torch.no_grad():
        for n, p in net.named_parameters():  # a non-identity pretrained adapter, so the reference must keep it
            if "lora_B" in n:
                p.fill_(0.1)
        pretrained = net(x, t)
    loss_fn = ddpo.make_loss(sch, REWARD, cfg, shape=SHAPE)
    loss_fn(net, 0, torch.Generator().manual_seed(0))
    state = loss_fn.state_dict()
    assert state["ref"] and all("lora_" in k for k in state["ref"])
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.add_(0.5)  # "training" moved the adapters
    resumed = ddpo.make_loss(sch, REWARD, cfg, shape=SHAPE)
    resumed.load_state_dict(state)
    _, stats = resumed(net, 1, torch.Generator().manual_seed(1))
    assert stats["kl"] > 0 and stats["resampled"] == 0.0  # the stored batch, against the pretrained reference
    torch.testing.assert_close(resumed.ref(x, t), pretrained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="step: a fresh DDPO loss_fn with kl_coef > 0 first called at step 5"):
        ddpo.make_loss(sch, REWARD, cfg, shape=SHAPE)(net, 5, torch.Generator().manual_seed(0))
