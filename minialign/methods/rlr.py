"""RLR: the Recursive Likelihood Ratio optimizer (Ren et al. 2025, ICLR 2026), on the shared sampler.

Notation (sampling order): step i = 0..N-1 maps x^(i) to x^(i+1) = mu_theta(x^(i), t_i) + sigma_i z_i, x^(0) = x_T,
x^(N) = x_0, reward r(x_0). theta is used once per step, so grad E[r] = sum_i g_i with g_i the part due to step i's
use of theta. Each g_i can be estimated pathwise (backprop from x_0 down to step i) or by a likelihood ratio
(needs sigma_i > 0). RLR spends its memory on a mix that covers every step exactly once (rlr_parts.py, one
function per piece):

  FO  (first order, the last step N-1):  g_FO = d/dtheta r(mu_theta(sg[x^(N-1)]) + sigma_{N-1} z_{N-1})   pathwise
  HO  (half order, a sub-chain of h steps j..L, L = j+h-1 <= N-2, j drawn at random: rlr_j.py):
        x^(L)(theta) = re-run steps j..L-1 from the stored sg[x^(j)] with the stored noises z_j..z_{L-1}
        g_HO = A * d/dtheta log N(sg[x^(L+1)]; mu_theta(x^(L)(theta)), sigma_L^2 I)
      Unbiased for g_j + ... + g_L: with V(x) = E[r | x^(L) = x], grad_x V(x) = E[r grad_x log p(x^(L+1) | x)]
      (score of the transition w.r.t. its input), times the pathwise d x^(L) / d theta_m for m < L; the direct
      theta-dependence of log p gives the likelihood ratio for step L itself. h = 1 is DDPO's per-step term.
  ZO  (zeroth order, every remaining step m in Z = {0..N-2} minus {j..L}):
      inherent (default): g_ZO = sum_{m in Z} A * d/dtheta log N(sg[x^(m+1)]; mu_theta(sg[x^(m)]), sigma_m^2 I),
        the likelihood ratio of the sampler's own noise: unbiased for the stochastic sampler actually used.
      perturb: step m runs with theta + delta_m, delta_m ~ N(0, s^2 I) (s = zo_sigma), g_ZO = sum_m (r - r0) delta_m
        / s^2, in a SECOND no-grad chain with the same x_T and noises; r0 = the unperturbed chain's reward (paired
        baseline, common random numbers), FO and HO on the unperturbed chain.
      perturb_chain (the paper's one-chain form): the ONE chain runs its ZO steps perturbed and FO / HO use it;
        g_ZO = (mean_+ r - mean_- r) / (2 s^2) sum_m delta_m, the first half of the batch at theta + delta_m, the
        second at theta - delta_m (antithetic pairs: a deviation, the paper has no baseline; batch must be even).
      Both perturbation forms are unbiased for the Gaussian-smoothed objective only (bias O(s^2)).
      zo_subsample = m > 0: m of the |Z| steps, uniformly without replacement, each term scaled by |Z| / m
        (unbiased: every step is kept with probability m / |Z|); 0 = all.
  g_RLR = c_FO g_FO + c_HO g_HO + c_ZO g_ZO; with all c = 1 it is unbiased for every fixed j, hence for any
  distribution of j. A = r - baseline (leave-one-out by default), averaged over the batch.

The loss is -(c_FO FO + c_HO HO + c_ZO ZO) (the surrogates' gradients are the estimates); the logged "loss"
statistic is the FO part -c_FO mean r alone (the surrogates' values mean nothing).

Why the chain is stochastic: HO and the inherent ZO are likelihood ratios and need sigma_m > 0 at steps 0..N-2
(eta > 0; default eta = 1, DDPM). The last step of an eta = 1 chain into abar = 1 is deterministic (sigma = 0); it
is the FO step, which is pathwise and needs no density, so no min_sigma floor is used.

Deviations from the paper, named:
- indexing: the paper counts in time (re-run x_{j+h} -> x_j, likelihood ratio at x_j -> x_{j-1}); here j is the
  sub-chain's first step in sampling order (0 = the noisiest), so j_range=(a, b) names sampling steps.
- h counts the graph-carrying steps of the sub-chain, the likelihood-ratio step included (h = 1: DDPO's term);
  h = 0 drops HO (the "without HO" ablation), zo="none" drops ZO ("without ZO", biased).
- the default ZO is the inherent-noise likelihood ratio, not parameter perturbation (see above).
- j_dist="grad_norm" is proportional-with-floor (rlr_j.py); the paper's softmax over norms is j_dist="softmax".
- baselines: "loo" (leave-one-out batch mean, exactly unbiased; default), "none", "standardise" (DDPO's
  (r - mean) / std: it rescales the LR parts against FO, biased, for training only).
- inherent ZO memory: zo_chunk steps are backpropagated at a time inside the loss and handed back as
  <G, theta> (estimators.surrogate): one chunk's graph alive at once; zo_chunk = 0 keeps them all in one graph.
- a NaN/inf reward or loss is never replaced: train() stops and names the step.

variant="released" (registry name "rlr_released"): the authors' public code (github.com/RTkenny/RLR-Opimtizer,
code/rlr_trainer_v_b.py at aff15b1, the "RLR" branch of step(); read, not copied), with its aesthetic script's
values: chain eta 0.05 with a deterministic last step (eta 0 there), FO coefficient 0.05 (loss_coeff), HO
coefficient 0.001 (ho_loss_coeff), released_terms = 2 (chain_len) PPO terms at steps drawn uniformly from all N
(with replacement), advantages standardised over the batch, per-dimension log-probs. FO and HO are summed into ONE
backward and one optimiser step (the lines that would step on FO first are commented out there), so the PPO ratio
is exactly 1 and its 1e-4 clip never binds: each term's gradient is -c_HO A grad log p / D. A pick of the last
step has no density there (their stored log-prob is NaN) and their guard then zeroes the whole HO loss; here that
batch's HO terms are dropped by rule, visibly (stats["ho_dropped"] = 1), and no NaN is ever zeroed. Unset eta,
coef_fo, coef_ho (None) take these values for "released" and 1.0 for "paper". Biased by design (tests/test_rlr.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start
from minialign.methods.estimators import BASELINES, advantages, param_grads, standardise, surrogate
from minialign.methods.rlr_j import GradNormJ, draw_j, grad_norm_j  # noqa: F401  (GradNormJ: re-exported)
from minialign.methods.rlr_parts import (Perturbed, ho_part, released_terms, rollout, trainable, zo_inherent,
                                         zo_perturb_chain, zo_perturb_paired)
from minialign.rewards.base import require_differentiable
from minialign.schedule import prev_timesteps, step_coefficients

ZO = ("inherent", "perturb", "perturb_chain", "none")
J_DISTS = ("uniform", "range", "weighted", "grad_norm", "softmax")
VARIANTS = ("paper", "released")
RELEASED = dict(eta=0.05, coef_fo=0.05, coef_ho=0.001)  # the authors' aesthetic script and config defaults


@dataclass
class RLRConfig(ChainConfig):
    eta: Optional[float] = None           # None: 1.0 (paper: stochastic chain, the LR parts need sigma > 0), 0.05 (released)
    h: int = 2                            # HO sub-chain length (graph steps incl. the LR step); 0 = no HO
    zo: str = "inherent"                  # inherent | perturb | perturb_chain | none
    zo_sigma: float = 1e-2                # std of the parameter perturbation (zo="perturb" / "perturb_chain")
    zo_subsample: int = 0                 # m > 0: m random ZO steps, scaled by |Z| / m; 0 = every ZO step
    j_dist: str = "uniform"               # uniform | range | weighted | grad_norm | softmax (rlr_j.py)
    j_range: Optional[tuple] = None       # (a, b): j ~ U{a..b} (j_dist="range"), 0 = the first, noisiest step
    j_weights: Optional[tuple] = None     # one weight per j in 0..N-1-h (j_dist="weighted", e.g. gradient norms)
    j_floor: float = 0.2                  # grad_norm: share of the uniform distribution mixed in (0, 1]
    j_decay: float = 0.9                  # grad_norm / softmax: decay of the moving average of |g_HO|, [0, 1)
    j_temperature: float = 1.0            # softmax: p_j proportional to exp(n_j / j_temperature), > 0
    coef_fo: Optional[float] = None       # None: 1.0 (paper), 0.05 (released)
    coef_ho: Optional[float] = None       # None: 1.0 (paper), 0.001 (released)
    coef_zo: float = 1.0
    baseline: str = "loo"                 # loo | none | standardise (advantage of the LR parts; released: standardise)
    zo_chunk: int = 1                     # inherent ZO: steps per internal backward (0 = all in the loss's graph)
    variant: str = "paper"                # paper | released
    released_terms: int = 2               # variant="released": single-step PPO terms per batch (their chain_len)

    def __post_init__(self):
        for name in ("eta", "coef_fo", "coef_ho"):
            if getattr(self, name) is None:
                setattr(self, name, RELEASED[name] if self.variant == "released" else 1.0)
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
    for name in ("zo_chunk", "zo_subsample"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            bad(name, "an int >= 0 (0: " + ("one graph for all ZO steps)" if name == "zo_chunk" else "every ZO step)"))
    for name in ("zo_sigma", "j_temperature"):
        if not getattr(cfg, name) > 0:
            bad(name, "> 0")
    if not 0 < cfg.j_floor <= 1:
        bad("j_floor", "in (0, 1] (every start keeps p_j >= j_floor / J)")
    if not 0 <= cfg.j_decay < 1:
        bad("j_decay", "in [0, 1)")
    if cfg.baseline == "loo" and cfg.batch < 2:
        bad("baseline", "'none' or 'standardise' with batch = 1 (leave-one-out needs batch >= 2)")
    if cfg.zo == "perturb_chain" and cfg.batch % 2:
        bad("batch", "even with zo='perturb_chain' (antithetic halves: theta + delta, theta - delta)")
    if cfg.variant == "released" and cfg.released_terms not in (1, 2):
        bad("released_terms", "1 or 2")
    lr_parts = cfg.h > 0 or cfg.zo == "inherent" or cfg.variant == "released"
    if lr_parts and not cfg.eta > 0:
        bad("eta", "> 0 when HO or ZO is on (likelihood ratios need a stochastic chain)")
    _check_j(cfg, bad)


def _check_j(cfg: RLRConfig, bad):
    top = cfg.n_steps - 1 - cfg.h  # the largest start j with j + h - 1 <= N - 2
    if cfg.j_dist == "range":
        r = cfg.j_range
        if r is None or len(r) != 2 or not (isinstance(r[0], int) and isinstance(r[1], int) and 0 <= r[0] <= r[1] <= top):
            bad("j_range", f"(a, b) ints with 0 <= a <= b <= n_steps - 1 - h = {top}")
    if cfg.j_dist == "weighted":
        w = cfg.j_weights
        if w is None or len(w) != top + 1 or min(w) < 0 or sum(w) <= 0:
            bad("j_weights", f"{top + 1} weights >= 0 (one per start j in 0..{top}) with a positive sum")


def _draw_j(cfg: RLRConfig, generator) -> int:
    """j drawn as make_parts draws it for a fixed distribution (uniform, range, weighted)."""
    return draw_j(cfg, generator)[0]


def _zo_steps(cfg: RLRConfig, n: int, ho_steps, generator) -> tuple[list, float]:
    """(the ZO steps this estimate uses, their scale |Z| / m): all of Z, or m drawn without replacement."""
    Z = [m for m in range(n - 1) if m not in ho_steps] if cfg.zo != "none" else []
    if not 0 < cfg.zo_subsample < len(Z):
        return Z, 1.0
    keep = torch.randperm(len(Z), generator=generator)[:cfg.zo_subsample].sort().values.tolist()
    return [Z[k] for k in keep], len(Z) / cfg.zo_subsample


def make_parts(schedule, reward, cfg: RLRConfig, *, shape, cond=None):
    """parts_fn(model, generator) -> ({part: surrogate scalar}, stats): the surrogates whose gradients are the
    FO / HO / ZO estimates, unscaled by the c's (variant="released": fo and ho). Used by make_loss, the tests and
    the notebook. parts_fn.j_dist is the GradNormJ (j_dist grad_norm / softmax) or None."""
    _check(cfg)
    require_differentiable(reward, "RLR (its FO part)")
    ts = chain_timesteps(schedule, cfg)
    n, prev = len(ts), prev_timesteps(ts, cfg.final_timestep)
    if cfg.eta > 0 and any(step_coefficients(schedule, ts[m], prev[m], cfg.eta).sigma <= 0 for m in range(n - 1)):
        raise ValueError(f"eta={cfg.eta}: a step before the last is deterministic (sigma = 0) in timesteps {ts}")
    jn = grad_norm_j(cfg, n) if cfg.variant == "paper" else None

    def released(model, x_T, c, generator):
        picks = torch.randint(0, n, (cfg.released_terms,), generator=generator).tolist()
        traj, r, _ = rollout(model, schedule, reward, x_T, ts, cfg.eta, c, generator, cfg.final_timestep, last_eta=0.0)
        if n - 1 in picks:  # the last step has no density: the released code's NaN guard voids all HO terms
            ho = surrogate([torch.zeros_like(p) for p in trainable(model)], trainable(model))  # a zero gradient
        else:
            ho = released_terms(model, schedule, traj, picks, cfg.eta, standardise(r.detach()), c)
        return {"fo": r.mean(), "ho": ho}, {"reward": r.mean().item(), "ho_dropped": float(n - 1 in picks)}

    def parts_fn(model, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        if cfg.variant == "released":
            return released(model, x_T, c, generator)
        j, p_j = draw_j(cfg, generator, jn)
        ho_steps = list(range(j, j + cfg.h)) if j >= 0 else []
        zo_steps, scale = _zo_steps(cfg, n, ho_steps, generator)
        pert = None
        if cfg.zo in ("perturb", "perturb_chain") and zo_steps:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            pert = Perturbed(model, ts, zo_steps, cfg.zo_sigma, seed, antithetic=cfg.zo == "perturb_chain")
        # FO: the last step with graph from its detached input (the chain before it: no graph)
        chain_denoiser = pert if cfg.zo == "perturb_chain" else None
        traj, r, noises = rollout(model, schedule, reward, x_T, ts, cfg.eta, c, generator, cfg.final_timestep,
                                  denoiser=chain_denoiser)
        out, stats = {"fo": r.mean()}, {"reward": r.mean().item(), "j": float(j)}
        A = advantages(r, cfg.baseline)
        if ho_steps:
            out["ho"] = ho_part(model, schedule, traj, j, cfg.h, cfg.eta, A, c)
            if jn is not None:  # take g_HO here, record its norm for later draws, hand back <G_HO, theta>
                G = param_grads(out["ho"], trainable(model))
                jn.update(j, math.sqrt(sum(float((d * d).sum()) for d in G)))
                out["ho"], stats["p_j"] = surrogate(G, trainable(model)), p_j
        if not zo_steps:
            return out, stats
        if cfg.zo == "inherent":
            out["zo"] = zo_inherent(model, schedule, traj, zo_steps, cfg.eta, A, c, cfg.zo_chunk, scale)
        elif cfg.zo == "perturb":
            out["zo"], stats["reward_perturbed"] = zo_perturb_paired(pert, schedule, reward, x_T, ts, cfg.eta, c, noises,
                                                                     r.detach(), cfg.final_timestep, scale)
        else:
            out["zo"] = zo_perturb_chain(pert, r.detach(), scale)
        return out, stats

    parts_fn.j_dist = jn
    return parts_fn


def make_loss(schedule, reward, cfg: RLRConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-(c_FO FO + c_HO HO + c_ZO ZO), stats); stats: loss (the FO part,
    -c_FO mean r: what train() logs as "loss"), reward (mean reward of the chain), j (the sub-chain's first step,
    -1 without HO), reward_perturbed (zo="perturb"), p_j (grad_norm / softmax: the probability j was drawn with;
    loss_fn.j_dist is the GradNormJ), ho_dropped (released: 1 when a pick hit the last step)."""
    parts_fn = make_parts(schedule, reward, cfg, shape=shape, cond=cond)
    coef = {"fo": cfg.coef_fo, "ho": cfg.coef_ho, "zo": cfg.coef_zo}

    def loss_fn(model, step: int, generator: torch.Generator):
        out, stats = parts_fn(model, generator)
        return -sum(coef[k] * v for k, v in out.items()), {"loss": -cfg.coef_fo * out["fo"].item(), **stats}

    if parts_fn.j_dist is not None:  # its moving averages travel with train()'s checkpoints
        loss_fn.j_dist = parts_fn.j_dist
        loss_fn.state_dict = lambda: {"j_norms": list(parts_fn.j_dist.norms)}
        loss_fn.load_state_dict = lambda state: setattr(parts_fn.j_dist, "norms", list(state["j_norms"]))
    return loss_fn
