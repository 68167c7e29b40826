"""Estimator pieces several methods share: advantages, per-step log-probs, the surrogate <G, theta>.

A method file may import this module (as it imports `chain`): it is no method, it holds what DDPO, RLR and
SFT-PG would otherwise each write again.

    standardise(r)      A_b = (r_b - mean r) / (std r + 1e-8), over the batch or per condition (DDPO)
    advantages(r, kind) A_b = r_b - baseline_b: leave-one-out mean, none, or standardised (RLR)
    step_log_probs(...) log N(x^(m+1); mu_theta(sg[x^(m)], t_m), sigma_m^2 I) for several stored steps m of a
                        Trajectory, in ONE network call with a per-row timestep tensor [len(steps), B]
    param_grads(l, P)   d l / d P as a list (zeros where l does not reach a parameter)
    surrogate(G, P)     sum_p <sg[G_p], p>: a scalar whose gradient is G (a gradient taken inside a loss,
                        handed back to train(): RLR's grad-norm HO and chunked ZO, its perturbation ZO)
"""
from __future__ import annotations

import torch

from minialign.sampling import gaussian_log_prob
from minialign.schedule import step_coefficients

BASELINES = ("loo", "none", "standardise")


def standardise(reward: torch.Tensor, cond=None, per_condition: bool = False) -> torch.Tensor:
    """(r - mean) / (std + 1e-8), over the batch or within groups of equal cond (population std)."""
    adv = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
    if per_condition and cond is not None:
        keys = cond.reshape(len(reward), -1)
        _, group = torch.unique(keys, dim=0, return_inverse=True)
        for g in group.unique():
            m = group == g
            if m.sum() >= 2:
                r = reward[m]
                adv[m] = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    return adv


def advantages(reward: torch.Tensor, baseline: str) -> torch.Tensor:
    """A_b = r_b - baseline_b, without grad: 'loo' leave-one-out mean (exactly unbiased, needs B >= 2), 'none',
    'standardise' (r - mean) / (std + 1e-8)."""
    r = reward.detach()
    if baseline == "none":
        return r
    if baseline == "loo":
        if len(r) < 2:
            raise ValueError("baseline='loo' needs a batch of at least 2 (leave-one-out)")
        return r - (r.sum() - r) / (len(r) - 1)
    if baseline == "standardise":
        return standardise(r)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def step_log_probs(denoiser, schedule, traj, steps, eta: float, cond=None, reduce: str = "sum") -> torch.Tensor:
    """[len(steps), B]: log N(x^(m+1); a_m sg[x^(m)] + b_m eps_theta(sg[x^(m)], t_m), sigma_m^2 I) for each
    m in steps, x^(m) = traj.states[m] (sampling order), with graph to the parameters only. One network call on
    the concatenated batch: row block k carries timestep t_{steps[k]} (the denoiser must honour a per-row
    timestep tensor, as the toy nets and sd.LoRADenoiser do) and cond repeated per block. reduce: "sum" (the
    density, RLR) or "mean" over dimensions (DDPO's and the released RLR code's per-dimension log-prob)."""
    steps = [int(m) for m in steps]
    if not steps or min(steps) < 0 or max(steps) >= len(traj.timesteps):
        raise ValueError(f"steps must be a non-empty list of step indices in [0, {len(traj.timesteps) - 1}], got {steps}")
    B = traj.states[0].shape[0]
    x_t = torch.cat([traj.states[m] for m in steps])
    t = torch.cat([torch.full((B,), traj.timesteps[m], dtype=torch.long, device=x_t.device) for m in steps])
    c = None if cond is None else cond.repeat(len(steps), *[1] * (cond.dim() - 1))
    eps = denoiser(x_t, t, c).split(B)
    out = []
    for k, m in enumerate(steps):
        co = step_coefficients(schedule, traj.timesteps[m], traj.prev_timestep(m), eta)
        mean = co.a * traj.states[m] + co.b * eps[k]
        out.append(gaussian_log_prob(traj.states[m + 1], mean, co.sigma, reduce))
    return torch.stack(out)


def param_grads(loss: torch.Tensor, params) -> list:
    """d loss / d params, one tensor per parameter (zeros where the loss does not reach it)."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def surrogate(grads, params) -> torch.Tensor:
    """sum_p <sg[G_p], p>: its gradient with respect to each parameter p is G_p (G detached)."""
    return sum((g.detach() * p).sum() for g, p in zip(grads, params))
