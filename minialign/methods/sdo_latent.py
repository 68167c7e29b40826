"""Latent optimisation: change the starting noise (or an intermediate latent) of a frozen model's chain until its
sample maximises a differentiable reward. SDO (minialign.methods.sdo) makes one such step cost about one sampling
chain: only the first step's network call keeps its graph, the rest of the chain is the linear skip path.

    z, x0, history = optimize_latent(model, schedule, reward, shape=(1, 8, 8), batch=4, iters=50)

Works for any denoiser with the sampler's signature eps = model(x_t, t, cond) (the toy MLP, the digits UNet, a
Stable Diffusion adapter) and a reward on decode(x_0) (identity for the toys, the VAE decoder for SD).

    z_{i+1} = Adam step on  -(1/B) sum_b r(decode(chain(z_i)^b), c^b)      (z = x_{t_start}; the model is not trained)

With eta > 0 the injected noises are drawn once and replayed, so every iteration optimises the same function of z.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

import torch

from minialign.measure import replay
from minialign.methods import sdo
from minialign.methods.chain import resolve_cond
from minialign.rewards.base import check_reward_graph, require_differentiable
from minialign.sampling import plan_none, sample
from minialign.schedule import timesteps

PLANS = ("sdo", "sdo_skip", "full", "full_ckpt")
_OLD = {"full_bp": "full", "full_bp_ckpt": "full_ckpt", "sdo": "sdo", "sdo_skip": "sdo_skip"}  # method= -> plan=


def _check(plan, iters, lr, n_steps, start, seconds):
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < n_steps:
        raise ValueError(f"start (index of the optimised latent, 0 = x_T) must be an int in [0, {n_steps - 1}], got {start!r}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0 or None, got {seconds!r}")


def optimize_latent(model, schedule, reward, *, shape=None, x_T: Optional[torch.Tensor] = None, batch: int = 1,
                    cond=None, plan: str = "sdo", n_steps: int = 20, eta: float = 0.0, spacing: str = "trailing",
                    start: int = 0, iters: int = 50, lr: float = 0.05, seconds: Optional[float] = None, seed: int = 0,
                    decode: Optional[Callable] = None, progress: bool = False, method: Optional[str] = None):
    """Optimise the latent x_{t_start} of a frozen model's chain for `reward`; returns (z, x0, history).

    shape:    one sample's shape without the batch (needed unless x_T is given), e.g. (1, 8, 8)
    x_T:      the starting noise [B, ...] (default: N(0, I) from `seed`); start > 0 optimises x_{t_start}, the
              state the chain reaches from x_T after `start` no-graph steps
    plan:     the sampler plan through the chain (not a registered method): sdo (first optimised step keeps its
              graph, then the skip path) | sdo_skip (no network Jacobian: d x_0 / d z = prod a) | full (every step
              with graph) | full_ckpt (every step, checkpointed)
    method:   deprecated name of `plan` (its old values full_bp / full_bp_ckpt mean full / full_ckpt)
    seconds:  stop after this much optimisation wall time (equal-time comparisons), or after `iters`
    decode:   maps the sampler's space to the reward's (identity by default; a VAE decoder for latent diffusion)
    z:        the optimised latent [B, ...] (detached); x0: its sample decode(chain(z)) (no graph)
    history:  one dict per iteration {iter, reward (mean over the batch, of the sample before that update),
              seconds (optimisation time so far)} and a last one with the final sample's reward
    """
    if method is not None:
        warnings.warn("optimize_latent(method=...) is now plan=... (full_bp -> full, full_bp_ckpt -> full_ckpt)",
                      DeprecationWarning, stacklevel=2)
        if method not in _OLD:
            raise ValueError(f"method (deprecated: use plan) must be one of {tuple(_OLD)}, got {method!r}")
        plan = _OLD[method]
    _check(plan, iters, lr, n_steps, start, seconds)
    require_differentiable(reward, f"latent optimisation ({plan})")
    if x_T is None and shape is None:
        raise ValueError("shape: give one sample's shape (e.g. (2,) or (1, 8, 8)) or an x_T")
    decode = decode or (lambda x: x)
    p = next(model.parameters())
    g = torch.Generator(device=p.device).manual_seed(seed)
    if x_T is None:
        x_T = torch.randn((batch, *shape), generator=g, dtype=p.dtype, device=p.device)
    x_T = x_T.detach().to(p.device, p.dtype)
    c = resolve_cond(cond, x_T.shape[0], g, p.device)
    ts = timesteps(schedule.T, n_steps, spacing)
    with torch.no_grad():  # the path to z and (eta > 0) the noises every iteration replays
        _, traj = sample(model, schedule, x_T, ts, eta, plan_none(n_steps), cond=c, generator=g)
    z = traj.states[start].clone().requires_grad_(True)
    tail, noises = ts[start:], traj.noises[start:]
    steps_plan = sdo.latent_plan(len(tail), "full" if plan == "full_ckpt" else plan, checkpoint=plan == "full_ckpt")
    opt = torch.optim.Adam([z], lr=lr)
    history, elapsed = [], 0.0
    timed = seconds is not None
    logged = replay.replayed_count("optimize_latent") if timed else None
    if logged is not None:  # repeat a logged run's count, not its timing
        iters, seconds = logged, None
    steps = range(iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"latent ({plan})", leave=False)
    for i in steps:
        t0 = time.perf_counter()
        x0, _ = sample(model, schedule, z, tail, eta, steps_plan, cond=c, noises=noises)
        r = reward(decode(x0), c)
        check_reward_graph(r, reward, f"latent optimisation ({plan})")
        loss = -r.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reward is {-loss.item()} at iteration {i}: stopping")
        (grad,) = torch.autograd.grad(loss, [z])  # the model's own .grad is never touched
        z.grad = grad
        opt.step()
        elapsed += time.perf_counter() - t0
        history.append({"iter": i, "reward": -loss.item(), "seconds": elapsed})
        if seconds is not None and elapsed >= seconds:
            break
    if timed:
        replay.record_count("optimize_latent", len(history))
    with torch.no_grad():
        x0, _ = sample(model, schedule, z, tail, eta, plan_none(len(tail)), cond=c, noises=noises)
        x0 = decode(x0)
        history.append({"iter": len(history), "reward": reward(x0, c).mean().item(), "seconds": elapsed})
    return z.detach(), x0, history
