"""RLR's pieces, one function each (the equations are in rlr.py's docstring; step indices in sampling order).

    rollout            the chain: steps 0..N-2 without graph (optionally through a perturbed denoiser), then the
                       last step with graph from sg[x^(N-1)] and its reward (FO)
    ho_part            A * log N(sg[x^(L+1)]; mu_theta(x^(L)(theta)), sigma_L^2), the sub-chain j..L re-run with graph
    zo_inherent        sum_{m in Z} A * log N(sg[x^(m+1)]; mu_theta(sg[x^(m)]), sigma_m^2), zo_chunk steps per backward
    Perturbed          a denoiser that runs the ZO steps with theta + delta_m (or +/- delta_m, antithetic halves)
    zo_perturb_paired  G = mean_b(r_b - r0_b) / s^2 sum_m delta_m: a second chain, the unperturbed one as baseline
    zo_perturb_chain   G = (mean_+ r - mean_- r) / (2 s^2) sum_m delta_m: the one chain the FO / HO parts use
    released_terms     the authors' code: A * (per-dimension log p) at uniformly picked steps

Every delta_m is drawn once, while the chain runs, and summed on the spot: the ZO gradient is one scalar times
sum_m delta_m, so nothing is regenerated and nothing parameter-sized is kept per step.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from minialign.methods.estimators import param_grads, step_log_probs, surrogate
from minialign.rewards.base import reward_with_graph
from minialign.sampling import Trajectory, plan_full, sample, transition_log_prob


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def rollout(model, schedule, reward, x_T, ts, eta, cond, generator, final_timestep=-1, last_eta=None, denoiser=None):
    """(traj, r, noises): traj = steps 0..N-2 sampled without graph by `denoiser` (default: the model), ending at
    x^(N-1) (traj.final_timestep = ts[-1]); r [B] = reward of the last step run by the model with graph from
    sg[x^(N-1)] at eta `last_eta` (default eta); noises = the N injected noises."""
    if len(ts) > 1:
        with torch.no_grad():
            _, traj = sample(denoiser or model, schedule, x_T, ts[:-1], eta, cond=cond, generator=generator,
                             final_timestep=ts[-1])
    else:
        traj = Trajectory(states=[x_T.detach()], timesteps=[], noises=[], sigmas=[], final_timestep=ts[-1])
    x0, last = sample(model, schedule, traj.states[-1], ts[-1:], eta if last_eta is None else last_eta, plan_full(1),
                      cond=cond, generator=generator, final_timestep=final_timestep)
    return traj, reward_with_graph(reward, x0, cond, "RLR (FO)"), traj.noises + last.noises


def ho_part(model, schedule, traj, j: int, h: int, eta: float, advantage, cond=None) -> torch.Tensor:
    """mean_b A_b log N(sg[x^(L+1)]; mu_theta(x^(L)(theta)), sigma_L^2 I), L = j + h - 1, where x^(L)(theta)
    re-runs steps j..L-1 with graph from sg[x^(j)] with the stored noises (h = 1: DDPO's per-step term)."""
    L, ts = j + h - 1, traj.timesteps
    x_L = traj.states[j]
    if h > 1:
        x_L, _ = sample(model, schedule, x_L, ts[j:L], eta, plan_full(L - j), cond=cond, noises=traj.noises[j:L],
                        final_timestep=ts[L])
    lp = transition_log_prob(model, schedule, x_L, traj.states[L + 1], ts[L], traj.prev_timestep(L), eta, cond)
    return (advantage * lp).mean()


def zo_inherent(model, schedule, traj, steps, eta: float, advantage, cond=None, chunk: int = 1, scale: float = 1.0):
    """scale * sum_{m in steps} mean_b A_b log p_theta(x^(m+1) | sg[x^(m)]). chunk = 0: one graph for all steps
    (the value itself); chunk >= 1: backpropagated inside, `chunk` steps at a time, returned as <G, theta>."""
    if chunk == 0:
        return scale * (advantage * step_log_probs(model, schedule, traj, steps, eta, cond)).mean(1).sum()
    params = trainable(model)
    G = [torch.zeros_like(p) for p in params]
    for k in range(0, len(steps), chunk):
        lp = step_log_probs(model, schedule, traj, steps[k:k + chunk], eta, cond)
        for g, d in zip(G, param_grads(scale * (advantage * lp).mean(1).sum(), params)):
            g.add_(d)
    return surrogate(G, params)


class Perturbed:
    """A denoiser: step m in `steps` runs with theta + delta_m, delta_m ~ N(0, sigma^2 I) over the trainable
    parameters, drawn once from its own generator (seeded by `seed`) when the step runs; `antithetic`: the first
    half of the batch uses theta + delta_m, the second half theta - delta_m. `total` = sum of the deltas drawn."""

    def __init__(self, model, ts, steps, sigma: float, seed: int, antithetic: bool = False):
        self.model, self.steps, self.sigma, self.antithetic = model, set(steps), sigma, antithetic
        self.step_of = {int(t): m for m, t in enumerate(ts)}
        self.named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.total = [torch.zeros_like(p) for _, p in self.named]
        self.generator = torch.Generator().manual_seed(seed)

    def _call(self, sign, deltas, x, t, cond):
        return functional_call(self.model, {k: p + sign * d for (k, p), d in zip(self.named, deltas)}, (x, t, cond))

    def __call__(self, x, t, cond):
        if self.step_of[int(t[0])] not in self.steps:
            return self.model(x, t, cond)
        deltas = [self.sigma * torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
                  for _, p in self.named]
        for acc, d in zip(self.total, deltas):
            acc.add_(d)
        if not self.antithetic:
            return self._call(1.0, deltas, x, t, cond)
        half = x.shape[0] // 2
        c = (None, None) if cond is None else (cond[:half], cond[half:])
        return torch.cat([self._call(1.0, deltas, x[:half], t[:half], c[0]),
                          self._call(-1.0, deltas, x[half:], t[half:], c[1])])


def zo_perturb_paired(pert: Perturbed, schedule, reward, x_T, ts, eta, cond, noises, reward0, final_timestep=-1,
                      scale: float = 1.0):
    """(<G, theta>, mean perturbed reward): a second no-grad chain with the same x_T and noises whose ZO steps run
    through `pert`; G = scale * mean_b(r_b - r0_b) / s^2 * sum_m delta_m (r0: the unperturbed chain's rewards)."""
    with torch.no_grad():
        x0, _ = sample(pert, schedule, x_T, ts, eta, cond=cond, noises=noises, final_timestep=final_timestep)
        r = reward(x0, cond)
    coef = scale * (r - reward0).mean() / pert.sigma**2
    return surrogate([coef * d for d in pert.total], [p for _, p in pert.named]), r.mean().item()


def zo_perturb_chain(pert: Perturbed, reward0, scale: float = 1.0) -> torch.Tensor:
    """<G, theta> with G = scale * (mean_+ r - mean_- r) / (2 s^2) * sum_m delta_m: the antithetic central
    difference on the one chain `pert` ran (first half of the batch theta + delta, second half theta - delta)."""
    half = len(reward0) // 2
    coef = scale * (reward0[:half].mean() - reward0[half:].mean()) / (2 * pert.sigma**2)
    return surrogate([coef * d for d in pert.total], [p for _, p in pert.named])


def released_terms(model, schedule, traj, picks, eta: float, advantage, cond=None) -> torch.Tensor:
    """sum_k mean_b A_b (1/D) log N(x^(m_k+1); mu_theta(sg[x^(m_k)]), sigma^2 I) over the picked steps m_k: the
    released code's PPO terms at ratio 1 (trl's per-dimension log-prob). All picks must be before the last step."""
    return (advantage * step_log_probs(model, schedule, traj, picks, eta, cond, reduce="mean")).mean(1).sum()
