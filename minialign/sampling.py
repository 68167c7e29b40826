"""THE sampler: one loop for every method, driven by a per-step gradient plan.

Every method in minialign is a choice of which steps of this loop keep a graph and how the
resulting pieces are turned into a loss. One step from t to s (see schedule.py):

    x_s = a_t * x_t + b_t * eps_theta(x_t, t, cond) + sigma_t * z,     z ~ N(0, I)

A `StepPlan` says, for one step:
    grad        evaluate the network with a graph to its parameters (else eps is a constant, sg[eps])
    input_grad  with grad, also differentiate eps through its input x_t (else eps(sg[x_t]))
    path        keep x_t connected to the earlier steps (else x_t is detached before this step)
    checkpoint  recompute the network call in backward instead of saving its activations

    full backprop            grad, input_grad, path everywhere
    truncated (DRaFT-K)      no graph, then path cut before the last K steps which keep everything
    AlignProp                eps detached early, latent path kept, last K steps with graph
    one retained step (SDO)  eps detached everywhere but step k; the linear path a_t x_t is kept
    no graph                 nothing keeps a graph (sampling for policy gradients)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from minialign.schedule import Schedule, prev_timesteps, step_coefficients

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class StepPlan(NamedTuple):
    grad: bool = False
    input_grad: bool = True
    path: bool = True
    checkpoint: bool = False


NO_GRAPH = StepPlan(grad=False)
FULL = StepPlan(grad=True)


def plan_none(n: int) -> list[StepPlan]:
    """No step keeps a graph."""
    return [NO_GRAPH] * n


def plan_full(n: int, checkpoint: bool = False) -> list[StepPlan]:
    """Every step keeps its graph: the exact pathwise gradient (full backprop)."""
    return [StepPlan(grad=True, checkpoint=checkpoint)] * n


def plan_truncated(n: int, k: int, keep_path: bool = False, checkpoint: bool = False) -> list[StepPlan]:
    """The last k steps keep the network graph.

    keep_path=False is DRaFT-K (the latent is cut before those k steps); keep_path=True is AlignProp's
    pattern (earlier eps detached, linear latent path kept, which matters when x_T itself is optimised).
    """
    _check_index("k", k, 0, n)
    head = [StepPlan(grad=False, path=keep_path)] * (n - k)
    tail = [StepPlan(grad=True, checkpoint=checkpoint)] * k
    if k and not keep_path:
        tail[0] = tail[0]._replace(path=False)
    return head + tail


def plan_one_step(n: int, k: int, input_grad: bool = False) -> list[StepPlan]:
    """Only step k (0-based, in sampling order) evaluates the network with graph; the linear path
    a_t x_t stays in the graph everywhere (SDO). input_grad=False differentiates eps(sg[x_k]) w.r.t.
    the parameters only; input_grad=True also through x_k (latent optimisation)."""
    _check_index("k", k, 0, n - 1)
    plan = [StepPlan(grad=False)] * n
    plan[k] = StepPlan(grad=True, input_grad=input_grad)
    return plan


def _check_index(name, value, lo, hi):
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


@dataclass
class Trajectory:
    """What one run of the sampler produced (all detached).

    states:    [x_T, x_{t_1}, ..., x_0], N+1 tensors of the sample shape
    timesteps: the N timesteps t visited; step i goes from timesteps[i] to timesteps[i+1] (or -1)
    noises:    the N noises z injected (zeros where sigma = 0)
    sigmas:    the N noise scales actually used
    log_probs: N tensors [B], log N(x_s; mu_theta(x_t), sigma^2 I) summed over dimensions (if asked)
    """

    states: list[torch.Tensor]
    timesteps: list[int]
    noises: list[torch.Tensor]
    sigmas: list[float]
    log_probs: Optional[list[torch.Tensor]] = None
    final_timestep: int = -1

    def prev_timestep(self, i: int) -> int:
        return prev_timesteps(self.timesteps, self.final_timestep)[i]


def _t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _eps(denoiser: Denoiser, x: torch.Tensor, t: int, cond, plan: StepPlan) -> torch.Tensor:
    tb = _t_batch(t, x)
    if not plan.grad:
        with torch.no_grad():
            return denoiser(x.detach(), tb, cond)
    x_in = x if plan.input_grad else x.detach()
    if plan.checkpoint:
        return _checkpoint(lambda xi: denoiser(xi, tb, cond), x_in, use_reentrant=False)
    return denoiser(x_in, tb, cond)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(ref_mean, sigma^2 I)) per sample [B]: |mean - ref_mean|^2 / (2 sigma^2), summed over
    dimensions. The one KL of a tuned to a reference sampling step (DDPO's kl_coef, the arena's regulariser)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 for a KL of two steps (a deterministic step has none), got {sigma}")
    return (mean - ref_mean).pow(2).flatten(1).sum(1) / (2 * sigma**2)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float, reduce: str = "sum") -> torch.Tensor:
    """log N(x; mean, sigma^2 I) per sample [B], summed (a density) or averaged over dimensions."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 for a log-prob (a deterministic step has none), got {sigma}")
    lp = -((x - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    if reduce == "sum":
        return lp.sum(1)
    if reduce == "mean":
        return lp.mean(1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def _check_sample_args(schedule, x_T, timesteps, eta, plan, min_sigma, noises, final_timestep):
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if min_sigma < 0:
        raise ValueError(f"min_sigma must be >= 0, got {min_sigma}")
    if len(timesteps) == 0:
        raise ValueError("timesteps must hold at least one timestep")
    if len(timesteps) > schedule.T:
        raise ValueError(f"timesteps: {len(timesteps)} sampling steps > T = {schedule.T} training steps")
    ts = [int(t) for t in timesteps]
    if any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.T or ts[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing within [0, {schedule.T - 1}], got {ts}")
    if not isinstance(final_timestep, int) or not -1 <= final_timestep < ts[-1]:
        raise ValueError(f"final_timestep must be an int in [-1, {ts[-1] - 1}] (below the last timestep), got {final_timestep!r}")
    if plan is not None and len(plan) != len(ts):
        raise ValueError(f"plan must have one StepPlan per step ({len(ts)}), got {len(plan)}")
    if noises is not None and len(noises) != len(ts):
        raise ValueError(f"noises must have one tensor per step ({len(ts)}), got {len(noises)}")
    if x_T.dim() < 2:
        raise ValueError(f"x_T must be batched, [B, ...], got shape {tuple(x_T.shape)}")
    return ts


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    eta: float = 0.0,
    plan: Optional[Sequence[StepPlan]] = None,
    cond=None,
    generator: Optional[torch.Generator] = None,
    min_sigma: float = 0.0,
    noises: Optional[Sequence[torch.Tensor]] = None,
    log_probs: bool = False,
    progress: bool = False,
    final_timestep: int = -1,
) -> tuple[torch.Tensor, Trajectory]:
    """Run the chain from x_T through `timesteps` (descending) and return (x_0, Trajectory).

    eta:       0 = DDIM, 1 = DDPM posterior; sigma_t as in schedule.py
    plan:      one StepPlan per step (default: no graph anywhere)
    min_sigma: the noise actually injected is max(sigma_t, min_sigma) around the same mean; SFT-PG and
               RLR give the last step (where sigma_t = 0) a tiny sigma so its log-prob exists
    noises:    reuse these z's instead of drawing new ones (re-running stored sub-chains)
    log_probs: record log N(x_s; mu, sigma^2) per step (needs sigma > 0 at every step)
    final_timestep: where the last step lands (-1: the data, abar = 1); stop a chain early at x_{t_j}
    generator: the noise is drawn on the generator's device and moved to x's (a CPU generator works on GPU)
    The returned x_0 carries whatever graph the plan asked for; Trajectory states are detached.
    """
    ts = _check_sample_args(schedule, x_T, timesteps, eta, plan, min_sigma, noises, final_timestep)
    plan = list(plan) if plan is not None else plan_none(len(ts))
    x = x_T
    traj = Trajectory(states=[x_T.detach()], timesteps=ts, noises=[], sigmas=[], log_probs=[] if log_probs else None,
                      final_timestep=final_timestep)
    prev = prev_timesteps(ts, final_timestep)  # once: the loop below is every method's hot path
    steps = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        t, s = ts[i], prev[i]
        c = step_coefficients(schedule, t, s, eta)
        p = plan[i]
        if not p.path:
            x = x.detach()
        eps = _eps(denoiser, x, t, cond, p)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)}")
        mean = c.a * x + c.b * eps
        sigma = max(c.sigma, min_sigma)
        if noises is not None:
            z = noises[i]
        elif sigma > 0:
            where = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
        else:
            z = torch.zeros_like(x)
        x = mean + sigma * z if sigma > 0 else mean
        if log_probs and sigma == 0:
            raise ValueError(
                f"log_probs=True but step {i} (t={t} -> s={s}, eta={eta}) is deterministic (sigma = 0); "
                "use eta > 0 and min_sigma > 0 (the last step of an eta = 1 chain has sigma = 0)"
            )
        if log_probs:
            traj.log_probs.append(gaussian_log_prob(x.detach(), mean.detach(), sigma))
        traj.states.append(x.detach())
        traj.noises.append(z)
        traj.sigmas.append(sigma)
    return x, traj


def step_mean(denoiser: Denoiser, schedule: Schedule, x_t, t: int, s: int, eta: float, cond=None):
    """mu_theta(x_t) = a_t x_t + b_t eps_theta(x_t, t), with graph; also returns sigma_t."""
    c = step_coefficients(schedule, t, s, eta)
    return c.a * x_t + c.b * denoiser(x_t, _t_batch(t, x_t), cond), c.sigma


def transition_log_prob(
    denoiser: Denoiser,
    schedule: Schedule,
    x_t: torch.Tensor,
    x_s: torch.Tensor,
    t: int,
    s: int,
    eta: float,
    cond=None,
    min_sigma: float = 0.0,
    reduce: str = "sum",
) -> torch.Tensor:
    """log p_theta(x_s | x_t) = log N(x_s; mu_theta(x_t), sigma^2 I) [B], with graph to the network."""
    mean, sigma = step_mean(denoiser, schedule, x_t, t, s, eta, cond)
    sigma = max(sigma, min_sigma)
    if sigma <= 0:
        raise ValueError(
            f"step t={t} -> s={s} with eta={eta} is deterministic (sigma = 0): it has no log-prob; "
            "use eta > 0 and give the last step min_sigma > 0"
        )
    return gaussian_log_prob(x_s, mean, sigma, reduce)


def predict_x0(denoiser: Denoiser, schedule: Schedule, x_t: torch.Tensor, t: int, cond=None) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), with graph (ReFL scores this)."""
    abar = schedule.abar(t)
    eps = denoiser(x_t, _t_batch(t, x_t), cond)
    return (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
