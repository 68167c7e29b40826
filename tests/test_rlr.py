"""RLR against the exact full-backprop gradient (Monte-Carlo z-tests), its parts' variances, the parameter-
perturbation bias as a function of sigma, the HO re-run, the memory budget h*, determinism, NaN and clear errors."""
import math
from statistics import NormalDist

import pytest
import torch

from minialign.methods import rlr_budget as budget
from minialign.measure.lab import flat_grad
from minialign.methods import build, full_bp, rlr
from minialign.rewards import Reward, component_log_density
from minialign.sampling import sample
from minialign.schedule import Schedule
from minialign.toy.models import MLPDenoiser
from minialign.train import TrainConfig, train

T, SHAPE = 4, (2,)  # a short chain with large steps: every step's share of the gradient matters
REWARD = component_log_density(2, std=0.7)
BUMP = Reward(lambda x, c=None: torch.exp(-((x - torch.tensor([1.0, 0.0], dtype=x.dtype)) ** 2).sum(1)), "bump")
CONF = 0.999  # two-sided confidence of every z-test, Bonferroni-corrected over the K projections


def _toy(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(T, hidden=8).double(), Schedule.make("linear", T, 0.05, 0.3)


def _exact(net, sch, reward, U, params, batch=40000, reps=2):
    """grad E[r(x_0)] projected on U: full backprop, a large batch (mean and its standard error)."""
    loss_fn = full_bp.make_loss(sch, reward, full_bp.FullBPConfig(batch=batch, n_steps=T, eta=1.0), shape=SHAPE)
    g = torch.stack([U @ flat_grad(-loss_fn(net, 0, torch.Generator().manual_seed(100 + s))[0], params) for s in range(reps)])
    return g.mean(0), g.std(0) / math.sqrt(reps)


def _samples(net, sch, reward, U, params, M=300, m=16, seed=7, **kw):
    """M independent RLR estimates (batch m each), per part, projected on U: {part: [M, K]}."""
    parts_fn = rlr.make_parts(sch, reward, rlr.RLRConfig(batch=m, n_steps=T, **kw), shape=SHAPE)
    g, rows = torch.Generator().manual_seed(seed), {}
    for _ in range(M):
        out, _ = parts_fn(net, g)
        for k, v in out.items():
            rows.setdefault(k, []).append(U @ flat_grad(v, params))
    return {k: torch.stack(v) for k, v in rows.items()}


def _z(total, exact):
    mean, se = exact
    return ((total.mean(0) - mean) / torch.sqrt(total.var(0) / len(total) + se**2)).abs().max().item()


@pytest.fixture(scope="module")
def lab():
    net, sch = _toy()
    params = list(net.parameters())
    K = 4
    U = torch.randn(K, sum(p.numel() for p in params), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    U /= U.norm(dim=1, keepdim=True)
    return dict(net=net, sch=sch, params=params, U=U, K=K, exact=_exact(net, sch, REWARD, U, params))


def test_rlr_is_unbiased_and_biased_variants_fail(lab):
    """The mean of M = 300 RLR estimates (batch 16) equals grad E[r] projected on K = 4 random directions: |z| <
    z_{1 - 0.001 / 2K} = 3.66 per direction (99.9%, Bonferroni), for h = 1 and h = 2 with the inherent-noise ZO.
    The same test rejects RLR without ZO, FO only, and the released-code variant (the test has power).
    Measured: max |z| h=1 1.69, h=2 1.72; without ZO (h=1) 5.7, FO only 55, released 17.6. Part variances per
    estimate (batch 16, mean over directions): FO 2.7e-3, HO(h=1) 0.30, HO(h=2) 1.67, ZO inherent (h=1: 3 steps)
    0.69, ZO inherent (h=2: 2 steps) 0.36 — HO(h=2) > ZO inherent here (see test_variance_ordering)."""
    z_crit = NormalDist().inv_cdf(1 - (1 - CONF) / (2 * lab["K"]))
    args = (lab["net"], lab["sch"], REWARD, lab["U"], lab["params"])
    z = {}
    for name, kw in {"h1": dict(h=1), "h2": dict(h=2), "no_zo": dict(h=1, zo="none"), "fo_only": dict(h=0, zo="none"),
                     "released": dict(variant="released", baseline="standardise")}.items():
        S = _samples(*args, M=100 if name in ("fo_only", "released") else 300, **kw)
        z[name] = _z(sum(S.values()), lab["exact"])
        lab[name] = S
    print(z, {n: {k: v.var(0).mean().item() for k, v in lab[n].items()} for n in ("h1", "h2")})
    assert z["h1"] < z_crit and z["h2"] < z_crit
    assert z["no_zo"] > z_crit and z["fo_only"] > z_crit and z["released"] > z_crit


def test_variance_ordering(lab):
    """FO <= HO <= ZO with the paper's parameter-perturbation ZO (sigma = 1e-2): measured 2.4e-3 <= 0.30 <= 12.6
    (h = 1). With the inherent-noise ZO, FO <= HO(h=1) <= ZO (0.30 <= 0.69) holds too, but HO(h=2) = 1.67 exceeds
    ZO(2 steps) = 0.36: the input score (x' - mu) / sigma^2 . d mu / dx of the sub-chain is noisier than the
    direct likelihood ratio on this toy. Both HO estimates are still unbiased (above)."""
    if "h1" not in lab:
        pytest.skip("runs after test_rlr_is_unbiased_and_biased_variants_fail (shares its samples)")
    var = lambda S, k: S[k].var(0).mean().item()  # noqa: E731
    P = _samples(lab["net"], lab["sch"], REWARD, lab["U"], lab["params"], M=100, h=1, zo="perturb", zo_sigma=1e-2)
    print({k: var(P, k) for k in P})
    assert var(lab["h1"], "fo") <= var(lab["h1"], "ho") <= var(lab["h1"], "zo")
    assert var(P, "fo") <= var(P, "ho") <= var(P, "zo")
    assert var(lab["h2"], "ho") > var(lab["h1"], "ho")  # a longer sub-chain adds input-score terms


def test_parameter_perturbation_bias_shrinks_with_sigma():
    """zo="perturb" estimates the gradient of the Gaussian-smoothed objective: bias O(sigma^2). Only the output
    bias is trained (2 parameters, bounded reward, so large sigmas stay finite) and h = 0 so that ZO covers
    every step but the last. Same seeds at every sigma (common random numbers). Measured |mean - exact| (M = 300,
    batch 64): sigma 2: 0.059 (z = 12.0), 1: 0.028 (z = 4.8), 0.5: 0.0084 (z = 1.2); roughly x4 per halving."""
    net, sch = _toy()
    net.requires_grad_(False)
    net.out.bias.requires_grad_(True)
    params, U = [net.out.bias], torch.eye(2, dtype=torch.float64)
    exact = _exact(net, sch, BUMP, U, params, batch=100000)
    z_crit = NormalDist().inv_cdf(1 - (1 - CONF) / 4)
    bias, z = {}, {}
    for sigma in (2.0, 1.0, 0.5):
        S = sum(_samples(net, sch, BUMP, U, params, m=64, h=0, zo="perturb", zo_sigma=sigma).values())
        bias[sigma], z[sigma] = (S.mean(0) - exact[0]).norm().item(), _z(S, exact)
    print(bias, z)
    assert bias[2.0] > bias[1.0] > bias[0.5]
    assert z[2.0] > z_crit and z[0.5] < z_crit


def test_ho_rerun_reproduces_the_stored_chain_and_h1_is_ddpo(lab):
    """The sub-chain re-run from sg[x^(j)] with the stored noises lands exactly on the stored x^(L)."""
    net, sch = lab["net"], lab["sch"]
    cfg = rlr.RLRConfig(batch=8, n_steps=T, h=3)
    ts = [3, 2, 1, 0]
    x_T = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0, traj = sample(net, sch, x_T, ts, cfg.eta, generator=torch.Generator().manual_seed(1))
    x_L, _ = sample(net, sch, traj.states[0], ts[0:2], cfg.eta, noises=traj.noises[0:2], final_timestep=ts[2])
    torch.testing.assert_close(x_L, traj.states[2], rtol=0, atol=1e-14)
    # h = 1 without ZO: FO + A * grad log p at the drawn step, A = r - leave-one-out mean
    parts_fn = rlr.make_parts(sch, REWARD, rlr.RLRConfig(batch=8, n_steps=T, h=1, zo="none"), shape=SHAPE)
    out, stats = parts_fn(net, torch.Generator().manual_seed(3))
    assert set(out) == {"fo", "ho"} and 0 <= stats["j"] <= T - 2
    r = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(rlr.advantages(r, "loo"), torch.tensor([-3.0, -1.5, 4.5]))


def test_j_range_and_weights_are_respected():
    net, sch = _toy()
    for kw, allowed in ((dict(j_dist="range", j_range=(1, 1)), {1}), (dict(j_dist="weighted", j_weights=(0, 0, 1)), {2})):
        loss_fn = rlr.make_loss(sch, REWARD, rlr.RLRConfig(batch=4, n_steps=T, h=1, **kw), shape=SHAPE)
        g = torch.Generator().manual_seed(0)
        assert {loss_fn(net, 0, g)[1]["j"] for _ in range(5)} == allowed


def test_grad_norm_j_stays_unbiased_and_an_importance_weight_would_bias_it(lab):
    """j_dist="grad_norm": the estimate is unbiased given j, so drawing j from any p (fixed before the draw) keeps
    it unbiased with NO 1/(J p_j) weight. (1) All parameters, h = 2 (for h = 1 the total does not depend on j: HO
    at one step is the inherent ZO term there), default floor/decay: |z| < 3.66 as above. (2) Only the per-step
    embedding tables trained (step m's gradient lives on rows t_m: the per-step gradients are orthogonal, so a
    misweighting shows), h = 1, p started skewed (0.85 on j = 0) and held (decay 0.999): unweighted passes, while
    FO + ZO + HO / (J p_j) has mean sum_m g_m (1 + 1/J - p_m) and fails (K = 3 per-step directions, 99.9%).
    Measured: (1) max |z| 0.34; (2) unweighted 0.79, importance-weighted 5.14."""
    z_crit = NormalDist().inv_cdf(1 - (1 - CONF) / (2 * lab["K"]))
    S = _samples(lab["net"], lab["sch"], REWARD, lab["U"], lab["params"], h=2, j_dist="grad_norm")
    z_gn = _z(sum(S.values()), lab["exact"])
    net, sch = _toy()
    net.requires_grad_(False)
    params = [net.l1.embed.weight, net.l2.embed.weight, net.l3.embed.weight]
    for q in params:
        q.requires_grad_(True)
    g, rows = torch.Generator().manual_seed(2), []
    for t in (3, 2, 1):  # the timesteps of steps 0, 1, 2 of the T = 4 chain
        u = [torch.zeros_like(q) for q in params]
        for x in u:
            x[t] = torch.randn(x.shape[1], generator=g, dtype=x.dtype)
        rows.append(torch.cat([x.flatten() for x in u]))
    U = torch.stack(rows) / torch.stack(rows).norm(dim=1, keepdim=True)
    exact = _exact(net, sch, REWARD, U, params)
    parts_fn = rlr.make_parts(sch, REWARD, rlr.RLRConfig(batch=64, n_steps=T, h=1, j_dist="grad_norm", j_floor=0.05,
                                                         j_decay=0.999), shape=SHAPE)
    parts_fn.j_dist.norms = [19.0, 1.0, 1.0]
    g, plain, weighted = torch.Generator().manual_seed(7), [], []
    for _ in range(600):
        out, stats = parts_fn(net, g)
        v = {k: U @ flat_grad(x, params) for k, x in out.items()}
        plain.append(v["fo"] + v["ho"] + v["zo"])
        weighted.append(v["fo"] + v["ho"] / ((T - 1) * stats["p_j"]) + v["zo"])
    z = {"plain": _z(torch.stack(plain), exact), "weighted": _z(torch.stack(weighted), exact)}
    print(z_gn, z, parts_fn.j_dist.probs())
    assert z_gn < z_crit
    z_crit3 = NormalDist().inv_cdf(1 - (1 - CONF) / 6)
    assert parts_fn.j_dist.probs()[0] > 0.8 and z["plain"] < z_crit3 < z["weighted"]


def test_grad_norm_p_j_is_what_it_claims():
    """p_j = (1 - f) n_j / sum n + f / J with n_j the moving average of |g_HO| over past draws of j (unseen: the
    mean of the seen ones), recomputed here from the HO surrogates' gradients; the drawn j follow p (counts
    against sum_t p_t(j), |z| < 3.3); the state round-trips through loss_fn.state_dict()."""
    net, sch = _toy()
    params = list(net.parameters())
    f, decay, J = 0.3, 0.5, T - 2
    cfg = rlr.RLRConfig(batch=8, n_steps=T, h=2, j_dist="grad_norm", j_floor=f, j_decay=decay)
    parts_fn = rlr.make_parts(sch, REWARD, cfg, shape=SHAPE)
    norms, counts, expected, var = [None] * J, torch.zeros(J), torch.zeros(J), torch.zeros(J)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        seen = [v for v in norms if v is not None]
        n = torch.tensor([(sum(seen) / len(seen) if seen else 1.0) if v is None else v for v in norms], dtype=torch.float64)
        p = (1 - f) * n / n.sum() + f / J
        out, stats = parts_fn(net, g)
        j = int(stats["j"])
        assert stats["p_j"] == pytest.approx(p[j].item(), rel=1e-12) and p.min() >= f / J
        gn = flat_grad(out["ho"], params).norm().item()
        norms[j] = gn if norms[j] is None else decay * norms[j] + (1 - decay) * gn
        counts[j] += 1
        expected += p.float()
        var += (p * (1 - p)).float()
    torch.testing.assert_close(parts_fn.j_dist.norms, norms, rtol=1e-10, atol=0)
    assert ((counts - expected).abs() / var.sqrt()).max() < 3.3
    loss_fn = rlr.make_loss(sch, REWARD, cfg, shape=SHAPE)
    loss_fn.load_state_dict({"j_norms": norms})
    torch.testing.assert_close(loss_fn.j_dist.probs(), parts_fn.j_dist.probs())
    assert loss_fn.state_dict() == {"j_norms": norms}


def test_budget_h_star():
    """h* = floor((B - B_z (T - 1)) / (B_h - B_z)), refusals, and B_h, B_z measured with bench.saved_bytes."""
    assert budget.h_star(30, b_h=8, b_z=0.24, n_steps=50) == 2  # the authors' SD1.4 numbers (GB): h = 2
    assert budget.h_star(100, b_h=8, b_z=0.24, n_steps=50) == 11
    with pytest.raises(ValueError, match="budget"):
        budget.h_star(10, b_h=8, b_z=0.24, n_steps=50)  # below one chain of perturbation steps (11.8)
    with pytest.raises(ValueError, match="b_h"):
        budget.h_star(30, b_h=0.2, b_z=0.24, n_steps=50)
    assert budget.h_star(1e9, b_h=8, b_z=0.24, n_steps=50) == 49  # capped: the last step is FO's
    net, sch = _toy()
    b = budget.measure(net.float(), sch, shape=SHAPE, batch=32, n_steps=T)
    # a perturbation step saves nothing for backward; an inherent-noise ZO step saves about what a backprop step
    # does (measured 13056 vs 12800 bytes here), so h* is a choice for the perturbation ZO only
    assert b["b_h"] > 0 and b["b_z_perturb"] == 0 and b["b_z_inherent"] > 0.5 * b["b_h"]
    assert b["b_h"] == budget.measure(net.float(), sch, shape=SHAPE, batch=32, n_steps=T)["b_h"]


def test_chunked_inherent_zo_equals_one_graph_and_holds_less_memory():
    """zo_chunk backpropagates the ZO terms inside the loss (one chunk alive at once): the same gradient as one graph
    (float64), and the peak of live saved bytes is a fraction of full backprop's (N = 20: FO + HO hold 3 steps)."""
    torch.manual_seed(0)
    net, sch = MLPDenoiser(20, hidden=8).double(), Schedule.make("linear", 20, 1e-3, 5e-2)
    params = list(net.parameters())
    grads, peak = [], {}
    for chunk in (0, 1, 3):
        loss_fn = rlr.make_loss(sch, REWARD, rlr.RLRConfig(batch=16, n_steps=20, zo_chunk=chunk), shape=SHAPE)
        grads.append(flat_grad(loss_fn(net, 0, torch.Generator().manual_seed(0))[0], params))
        peak[chunk] = budget.peak_saved_bytes(lambda: loss_fn(net, 0, torch.Generator().manual_seed(0))[0], params)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-10, atol=1e-12)
    full = full_bp.make_loss(sch, REWARD, full_bp.FullBPConfig(batch=16, n_steps=20, eta=1.0), shape=SHAPE)
    peak_full = budget.peak_saved_bytes(lambda: full(net, 0, torch.Generator().manual_seed(0))[0], params)
    print(peak, peak_full)
    # measured (bytes): one graph 262784, chunks of 3 78208, of 1 51840; full backprop 253696
    assert peak[1] < peak[3] < peak[0] and peak[1] < 0.4 * peak_full and peak[0] > 0.9 * peak_full


def test_registry_training_is_deterministic_and_nan_stops_training():
    net, sch = _toy()
    for name in ("rlr", "rlr_released"):
        runs = []
        for _ in range(2):
            model = MLPDenoiser(T, hidden=8)
            model.load_state_dict(net.float().state_dict())
            loss_fn, cfg = build(name, sch, REWARD, shape=SHAPE, batch=8, n_steps=T)
            hist = train(model, loss_fn, TrainConfig(steps=3, lr=1e-3, seed=5, progress=False))
            runs.append(([r["loss"] for r in hist], [p.detach().clone() for p in model.parameters()]))
        assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    nan = Reward(lambda x, c=None: x.sum(1) * float("nan"), "nan")
    loss_fn, _ = build("rlr", sch, nan, shape=SHAPE, batch=8, n_steps=T)
    with pytest.raises(Exception, match="step"):
        train(net.float(), loss_fn, TrainConfig(steps=2, seed=0, progress=False))


@pytest.mark.parametrize("kwargs,argname", [
    (dict(h=T), "h"), (dict(h=-1), "h"), (dict(zo="mezo"), "zo"), (dict(zo_sigma=0.0), "zo_sigma"),
    (dict(j_dist="normal"), "j_dist"), (dict(j_dist="range", j_range=(0, 3)), "j_range"),
    (dict(j_dist="weighted", j_weights=(1, 1, 1)), "j_weights"), (dict(baseline="mean"), "baseline"),
    (dict(j_dist="grad_norm", j_floor=0.0), "j_floor"), (dict(j_floor=1.5), "j_floor"), (dict(j_decay=1.0), "j_decay"),
    (dict(batch=1), "baseline"), (dict(eta=0.0), "eta"), (dict(variant="ppo"), "variant"),
    (dict(variant="released", released_terms=3), "released_terms"),
])
def test_bad_config_is_a_clear_error(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        rlr.RLRConfig(**{"n_steps": T, **kwargs})


def test_fo_only_runs_deterministic_chain_and_refuses_a_non_differentiable_reward():
    net, sch = _toy()
    rlr.RLRConfig(n_steps=T, eta=0.0, h=0, zo="none")  # FO only needs no stochastic step
    with pytest.raises(ValueError, match="differentiable"):
        rlr.make_loss(sch, Reward(lambda x, c=None: x.sum(1), "flat", differentiable=False), rlr.RLRConfig(n_steps=T),
                      shape=SHAPE)
