"""RLR: the Recursive Likelihood Ratio optimizer (Ren et al. 2025, ICLR 2026), on the shared sampler.

Notation (sampling order): step i = 0..N-1 maps x^(i) to x^(i+1) = mu_theta(x^(i), t_i) + sigma_i z_i, x^(0) = x_T,
x^(N) = x_0, reward r(x_0). theta is used once per step, so grad E[r] = sum_i g_i with g_i the part due to step i's
use of theta. Each g_i can be estimated pathwise (backprop from x_0 down to step i) or by a likelihood ratio
(needs sigma_i > 0). RLR spends its memory on a mix that covers every step exactly once:

  FO  (first order, the last step N-1; paper's "first-order" term):
        g_FO = d/dtheta r(mu_theta(sg[x^(N-1)]) + sigma_{N-1} z_{N-1})                         exact, pathwise
  HO  (half order, a sub-chain of h steps j..j+h-1, L = j+h-1 <= N-2, j drawn at random):
        x^(L)(theta) = re-run steps j..L-1 from the stored sg[x^(j)] with the stored noises z_j..z_{L-1}
        g_HO = A * d/dtheta log N(sg[x^(L+1)]; mu_theta(x^(L)(theta)), sigma_L^2 I)
      Unbiased for g_j + ... + g_L: with V(x) = E[r | x^(L) = x], grad_x V(x) = E[r grad_x log p(x^(L+1) | x)]
      (score of the transition w.r.t. its input), times the pathwise d x^(L) / d theta_m for m < L; the direct
      theta-dependence of log p gives the likelihood ratio for step L itself. h = 1 is DDPO's per-step term.
  ZO  (zeroth order, every remaining step m in Z = {0..N-2} minus {j..L}), two variants:
      inherent (default): g_ZO = sum_{m in Z} A * d/dtheta log N(sg[x^(m+1)]; mu_theta(sg[x^(m)]), sigma_m^2 I)
        the likelihood ratio of the sampler's own noise: unbiased for the stochastic sampler actually used.
      perturb (the paper's form): step m runs with theta + delta_m, delta_m ~ N(0, s^2 I) (s = zo_sigma), and
        g_ZO = sum_{m in Z} mean_b (r_b - r0_b) delta_m / s^2
        unbiased only for the Gaussian-smoothed objective (bias O(s^2), variance O(1/s^2) without a baseline; with
        the paired baseline below it stays bounded as s -> 0 but grows with the number of perturbed parameters P).
  g_RLR = c_FO g_FO + c_HO g_HO + c_ZO g_ZO; with all c = 1 it is unbiased for every fixed j, hence for any
  distribution of j (uniform, restricted to [a, b], weighted). A = r - baseline, averaged over the batch.

j_dist="grad_norm" (the paper's gradient-norm weighting, made automatic): p_j = (1 - f) n_j / sum_k n_k + f / J
over the J = N - h starts, f = j_floor (so every p_j >= f / J > 0), n_j = an exponential moving average (decay
j_decay) of |g_HO| (the L2 norm over all trainable parameters of the HO estimate, advantage noise included) over
the past draws of j; a start not yet drawn gets the mean of the others (1 before any draw: uniform). The HO
gradient is taken inside the loss (one autograd.grad, the cost HO's backward had anyway) and handed back as the
surrogate <G_HO, theta>. p is fixed before each draw from past draws only, and the estimate is unbiased given j,
so NO 1/(J p_j) importance weight is applied: it would bias it, E = g_FO + sum_m g_m (1 + 1/J - p_m) for h = 1
(tests/test_rlr.py shows it). loss_fn.state_dict() carries the n_j, so train()'s resume stays bit-exact.

The loss is -(c_FO FO + c_HO HO + c_ZO ZO) with the surrogates above (their gradients are the estimates).

Why the chain is stochastic: the HO and inherent-noise ZO terms are likelihood ratios and need sigma_m > 0 at
steps 0..N-2 (eta > 0; the default eta = 1 is DDPM). The last step of an eta = 1 chain into abar = 1 is
deterministic (sigma = 0); it is the FO step, which is pathwise and needs no density, so no min_sigma floor
is used (unlike DDPO / SFT-PG here): every likelihood ratio is of the sampler's own transitions.

Deviations from the paper, named:
- indexing: the paper counts in time (re-run x_{j+h} -> x_j, likelihood ratio at x_j -> x_{j-1}); here j is the
  sub-chain's first step in sampling order (0 = the noisiest), so j_range=(a, b) names sampling steps.
- h counts the graph-carrying steps of the sub-chain, the likelihood-ratio step included (h = 1: DDPO's term);
  h = 0 drops HO (the "without HO" ablation), zo="none" drops ZO ("without ZO", biased).
- the default ZO is the inherent-noise likelihood ratio, not parameter perturbation (see above).
- perturb: the perturbed chain is a second no-grad chain with the same x_T and noises; FO and HO use the
  unperturbed one (so they are exact) and its rewards r0 are the ZO baseline (common random numbers). The
  paper runs one chain with the perturbations in it and no such baseline.
- baselines: "loo" (leave-one-out batch mean, exactly unbiased; default), "none", "standardise" (DDPO's
  (r - mean) / std, which rescales the LR parts against FO: biased, for training only).
- inherent ZO memory: the loss_fn backpropagates the ZO terms itself, `zo_chunk` steps at a time, and hands back
  a surrogate sum_p <G_p, theta_p> with G the accumulated ZO gradient (detached): only one chunk's graph is alive
  at once. zo_chunk = 0 keeps all ZO steps in the loss's graph (as DDPO here): memory grows with N.
- a NaN/inf reward or loss is never replaced: train() stops and names the step.

variant="released" (name "rlr_released"): the authors' released code as described in DESIGN.md 4.3 (not
checked against their code here): FO on the last step plus `released_terms` independent single-step PPO terms at
uniformly drawn steps, no sub-chain, no ZO, DDPO-standardised advantages, per-dimension log-probs. One update per
sampled batch makes PPO's ratio exactly 1, so each term's gradient is -A grad log p / D. Biased: most steps are
never credited. The released code also zeroes a NaN at the last step; this one does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.func import functional_call

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import gaussian_log_prob, plan_full, sample, transition_log_prob
from minialign.schedule import prev_timesteps, step_coefficients
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start
from minialign.methods.estimators import BASELINES, advantages

ZO = ("inherent", "perturb", "none")
J_DISTS = ("uniform", "range", "weighted", "grad_norm")
VARIANTS = ("paper", "released")


@dataclass
class RLRConfig(ChainConfig):
    eta: float = 1.0                      # stochastic chain (the LR parts need sigma > 0)
    h: int = 2                            # HO sub-chain length (graph steps incl. the LR step); 0 = no HO
    zo: str = "inherent"                  # inherent | perturb | none
    zo_sigma: float = 1e-2                # std of the parameter perturbation (zo="perturb")
    j_dist: str = "uniform"               # uniform | range | weighted: how the sub-chain's first step j is drawn
    j_range: Optional[tuple] = None       # (a, b): j ~ U{a..b} (j_dist="range"), 0 = the first, noisiest step
    j_weights: Optional[tuple] = None     # one weight per j in 0..N-1-h (j_dist="weighted", e.g. gradient norms)
    j_floor: float = 0.2                  # grad_norm: share of the uniform distribution mixed in (0, 1]
    j_decay: float = 0.9                  # grad_norm: decay of the moving average of |g_HO| per start, [0, 1)
    coef_fo: float = 1.0
    coef_ho: float = 1.0
    coef_zo: float = 1.0
    baseline: str = "loo"                 # loo | none | standardise (advantage of the LR parts)
    zo_chunk: int = 1                     # inherent ZO: steps per internal backward (0 = all in the loss's graph)
    variant: str = "paper"                # paper | released
    released_terms: int = 2               # variant="released": single-step PPO terms per batch

    def __post_init__(self):
        super().__post_init__()
        _check(self)


def _check(cfg: RLRConfig):
    def bad(name, allowed):
        raise ValueError(f"{name} must be {allowed}, got {getattr(cfg, name)!r}")

    for name, allowed in (("zo", ZO), ("j_dist", J_DISTS), ("baseline", BASELINES), ("variant", VARIANTS)):
        if getattr(cfg, name) not in allowed:
            bad(name, f"one of {allowed}")
    n = cfg.n_steps
    if not isinstance(cfg.h, int) or not 0 <= cfg.h <= n - 1:
        bad("h", f"an int in [0, n_steps - 1 = {n - 1}] (the last step is FO's)")
    if not isinstance(cfg.zo_chunk, int) or cfg.zo_chunk < 0:
        bad("zo_chunk", "an int >= 0 (0: one graph for all ZO steps)")
    if not cfg.zo_sigma > 0:
        bad("zo_sigma", "> 0")
    if not 0 < cfg.j_floor <= 1:
        bad("j_floor", "in (0, 1] (every start keeps p_j >= j_floor / J)")
    if not 0 <= cfg.j_decay < 1:
        bad("j_decay", "in [0, 1)")
    if cfg.baseline == "loo" and cfg.batch < 2:
        bad("baseline", "'none' or 'standardise' with batch = 1 (leave-one-out needs batch >= 2)")
    if cfg.variant == "released" and cfg.released_terms not in (1, 2):
        bad("released_terms", "1 or 2")
    lr_parts = cfg.h > 0 or cfg.zo == "inherent" or cfg.variant == "released"
    if lr_parts and not cfg.eta > 0:
        bad("eta", "> 0 when HO or ZO is on (likelihood ratios need a stochastic chain)")
    top = n - 1 - cfg.h  # the largest start j with j + h - 1 <= N - 2
    if cfg.j_dist == "range":
        r = cfg.j_range
        if r is None or len(r) != 2 or not (isinstance(r[0], int) and isinstance(r[1], int) and 0 <= r[0] <= r[1] <= top):
            bad("j_range", f"(a, b) ints with 0 <= a <= b <= n_steps - 1 - h = {top}")
    if cfg.j_dist == "weighted":
        w = cfg.j_weights
        if w is None or len(w) != top + 1 or min(w) < 0 or sum(w) <= 0:
            bad("j_weights", f"{top + 1} weights >= 0 (one per start j in 0..{top}) with a positive sum")


class GradNormJ:
    """The grad_norm distribution of j over J starts (see the module docstring): probs(), update(j, norm)."""

    def __init__(self, n_starts: int, floor: float, decay: float):
        self.norms, self.floor, self.decay = [None] * n_starts, floor, decay

    def probs(self) -> torch.Tensor:
        seen = [v for v in self.norms if v is not None]
        fill = sum(seen) / len(seen) if seen else 1.0
        n = torch.tensor([fill if v is None else v for v in self.norms], dtype=torch.float64)
        uniform = torch.full_like(n, 1 / len(n))
        return uniform if n.sum() <= 0 else (1 - self.floor) * n / n.sum() + self.floor * uniform

    def update(self, j: int, norm: float):
        if not math.isfinite(norm):  # never averaged away: train() stops on the NaN loss this step produces
            return
        old = self.norms[j]
        self.norms[j] = norm if old is None else self.decay * old + (1 - self.decay) * norm


def _draw_j(cfg: RLRConfig, generator) -> int:
    top = cfg.n_steps - 1 - cfg.h
    if cfg.j_dist == "range":
        a, b = cfg.j_range
        return int(torch.randint(a, b + 1, (1,), generator=generator))
    if cfg.j_dist == "weighted":
        return int(torch.multinomial(torch.tensor(cfg.j_weights, dtype=torch.float64), 1, generator=generator))
    return int(torch.randint(0, top + 1, (1,), generator=generator))


def _step_log_probs(model, schedule, ts, prev, eta, traj, steps, cond):
    """log N(x^(m+1); mu_theta(sg[x^(m)]), sigma_m^2 I) [len(steps), B] for the given steps, in ONE network
    call on the concatenated batch (graph to the parameters only)."""
    B = traj.states[0].shape[0]
    x_t = torch.cat([traj.states[m] for m in steps])
    t = torch.cat([torch.full((B,), ts[m], dtype=torch.long, device=x_t.device) for m in steps])
    c = None if cond is None else cond.repeat(len(steps), *[1] * (cond.dim() - 1))
    eps = model(x_t, t, c)
    coef = [step_coefficients(schedule, ts[m], prev[m], eta) for m in steps]
    shape = (len(steps), B, *[1] * (x_t.dim() - 1))
    col = lambda v: torch.tensor(v, dtype=x_t.dtype, device=x_t.device).repeat_interleave(B).view(-1, *shape[2:])  # noqa: E731
    mean = col([k.a for k in coef]) * x_t + col([k.b for k in coef]) * eps
    x_s = torch.cat([traj.states[m + 1] for m in steps])
    lp = -((x_s - mean) ** 2) / (2 * col([k.sigma for k in coef]) ** 2) - col([math.log(k.sigma) for k in coef])
    return (lp.flatten(1).sum(1) - 0.5 * math.log(2 * math.pi) * x_s[0].numel()).view(len(steps), B)


def _perturbed(model, ts, zo_steps, seeds, sigma):
    """A denoiser that runs step m in zo_steps with theta + delta_m, delta_m ~ N(0, sigma^2 I) regenerated
    from seeds[m] (nothing parameter-sized is kept per step)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    step_of = {t: m for m, t in enumerate(ts)}

    def denoiser(x, t, cond):
        m = step_of[int(t[0])]
        if m not in zo_steps:
            return model(x, t, cond)
        return functional_call(model, {k: p + d for (k, p), d in zip(named, _deltas(named, seeds[m], sigma))}, (x, t, cond))

    return denoiser, named


def _deltas(named, seed: int, sigma: float):
    g = torch.Generator().manual_seed(seed)
    return [sigma * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for _, p in named]


def make_parts(schedule, reward, cfg: RLRConfig, *, shape, cond=None):
    """parts_fn(model, generator) -> ({part: surrogate scalar}, stats): the surrogates whose gradients are the
    FO / HO / ZO estimates (variant="released": fo and pg). Used by make_loss, the tests and the notebook."""
    _check(cfg)
    require_differentiable(reward, "RLR (its FO part)")
    ts = chain_timesteps(schedule, cfg)
    prev = prev_timesteps(ts, cfg.final_timestep)
    n = len(ts)
    if cfg.eta > 0 and any(step_coefficients(schedule, ts[m], prev[m], cfg.eta).sigma <= 0 for m in range(n - 1)):
        raise ValueError(f"eta={cfg.eta}: a step before the last is deterministic (sigma = 0) in timesteps {ts}")
    dim = math.prod(shape)

    jn = GradNormJ(n - cfg.h, cfg.j_floor, cfg.j_decay) if cfg.j_dist == "grad_norm" and cfg.h > 0 else None

    def parts_fn(model, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        if jn is not None and cfg.variant == "paper":
            p = jn.probs()
            j = int(torch.multinomial(p, 1, generator=generator))
        else:
            j = _draw_j(cfg, generator) if cfg.h > 0 and cfg.variant == "paper" else -1
        ho_steps = list(range(j, j + cfg.h)) if j >= 0 else []
        zo_steps = [m for m in range(n - 1) if m not in ho_steps] if cfg.zo != "none" and cfg.variant == "paper" else []
        with torch.no_grad():
            x0, traj = sample(model, schedule, x_T, ts, cfg.eta, cond=c, generator=generator, final_timestep=cfg.final_timestep)
            r0 = reward(x0, c)
        # FO: the last step with graph from its detached input, with its stored noise
        x0_fo, _ = sample(model, schedule, traj.states[n - 1], ts[n - 1:], cfg.eta, plan_full(1), cond=c,
                          noises=traj.noises[n - 1:], final_timestep=cfg.final_timestep)
        r = reward_with_graph(reward, x0_fo, c, "RLR (FO)")
        out, stats = {"fo": r.mean()}, {"reward": r0.mean().item(), "j": float(j)}
        if cfg.variant == "released":
            A = advantages(r0, "standardise")
            picks = torch.randint(0, n - 1, (cfg.released_terms,), generator=generator).tolist()
            out["pg"] = (A * _step_log_probs(model, schedule, ts, prev, cfg.eta, traj, picks, c) / dim).mean(1).sum()
            return out, stats
        A = advantages(r0, cfg.baseline)
        if ho_steps:
            L = ho_steps[-1]
            x_L = traj.states[j]
            if cfg.h > 1:  # re-run steps j..L-1 with graph, landing on ts[L], with the stored noises
                x_L, _ = sample(model, schedule, x_L, ts[j:L], cfg.eta, plan_full(L - j), cond=c,
                                noises=traj.noises[j:L], final_timestep=ts[L])
            lp = transition_log_prob(model, schedule, x_L, traj.states[L + 1], ts[L], prev[L], cfg.eta, c)
            out["ho"] = (A * lp).mean()
            if jn is not None:  # take g_HO here, record its norm for later draws, hand back <G_HO, theta>
                named = [q for q in model.parameters() if q.requires_grad]
                G = [torch.zeros_like(q) if d is None else d
                     for q, d in zip(named, torch.autograd.grad(out["ho"], named, allow_unused=True))]
                jn.update(j, math.sqrt(sum(float((d * d).sum()) for d in G)))
                out["ho"] = sum((d * q).sum() for d, q in zip(G, named))
                stats["p_j"] = float(p[j])
        if cfg.zo == "inherent" and zo_steps and cfg.zo_chunk == 0:
            out["zo"] = (A * _step_log_probs(model, schedule, ts, prev, cfg.eta, traj, zo_steps, c)).mean(1).sum()
        elif cfg.zo == "inherent" and zo_steps:  # backprop zo_chunk steps at a time: one chunk's graph alive at once
            named = [p for p in model.parameters() if p.requires_grad]
            G = [torch.zeros_like(p) for p in named]
            for k in range(0, len(zo_steps), cfg.zo_chunk):
                lp = _step_log_probs(model, schedule, ts, prev, cfg.eta, traj, zo_steps[k:k + cfg.zo_chunk], c)
                for g, d in zip(G, torch.autograd.grad((A * lp).mean(1).sum(), named, allow_unused=True)):
                    if d is not None:
                        g.add_(d)
            out["zo"] = sum((g * p).sum() for g, p in zip(G, named))
        elif cfg.zo == "perturb" and zo_steps:
            seeds = {m: int(torch.randint(0, 2**62, (1,), generator=generator)) for m in zo_steps}
            denoiser, named = _perturbed(model, ts, set(zo_steps), seeds, cfg.zo_sigma)
            with torch.no_grad():
                x0_p, _ = sample(denoiser, schedule, x_T, ts, cfg.eta, cond=c, noises=traj.noises, final_timestep=cfg.final_timestep)
                adv = (reward(x0_p, c) - r0).mean()  # the unperturbed chain's reward as baseline (paired)
                G = [torch.zeros_like(p) for _, p in named]
                for m in zo_steps:
                    for g, d in zip(G, _deltas(named, seeds[m], cfg.zo_sigma)):
                        g.add_(d, alpha=adv.item() / cfg.zo_sigma**2)
            out["zo"] = sum((g * p).sum() for g, (_, p) in zip(G, named))
            stats["reward_perturbed"] = adv.item() + r0.mean().item()
        return out, stats

    parts_fn.j_dist = jn
    return parts_fn


def make_loss(schedule, reward, cfg: RLRConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-(c_FO FO + c_HO HO + c_ZO ZO), stats); stats: reward (mean reward of
    the sampled chain), j (the sub-chain's first step, -1 without HO), reward_perturbed (zo="perturb"), p_j
    (grad_norm: the probability j was drawn with; loss_fn.j_dist is the GradNormJ)."""
    parts_fn = make_parts(schedule, reward, cfg, shape=shape, cond=cond)
    coef = {"fo": cfg.coef_fo, "ho": cfg.coef_ho, "zo": cfg.coef_zo, "pg": 1.0}

    def loss_fn(model, step: int, generator: torch.Generator):
        out, stats = parts_fn(model, generator)
        return -sum(coef[k] * v for k, v in out.items()), stats

    if parts_fn.j_dist is not None:  # grad_norm: its moving averages travel with train()'s checkpoints
        loss_fn.j_dist = parts_fn.j_dist
        loss_fn.state_dict = lambda: {"j_norms": list(parts_fn.j_dist.norms)}
        loss_fn.load_state_dict = lambda state: setattr(parts_fn.j_dist, "norms", list(state["j_norms"]))
    return loss_fn
