"""Full backpropagation through the sampling chain: the exact pathwise gradient of the reward.

DRaFT (Clark et al. 2023, "Directly fine-tuning diffusion models on differentiable rewards") with
K = N: every one of the N steps keeps its graph, x_0 = chain(x_T; theta), and

    loss(theta) = -(1/B) sum_b r(x_0^b(theta), c^b)
    grad        = -(1/B) sum_b (d r / d x_0^b) (d x_0^b / d theta)       (backprop through all N steps)

For a fixed batch of starting noises x_T (and, with eta > 0, fixed injected noises) this is the exact
gradient of the batch's reward; averaged over batches it is unbiased for grad E[r(x_0)]. It is the
reference every estimator is compared with, and the cost every shortcut is measured against: its
activations grow linearly with N unless each step is checkpointed (`checkpoint=True`, which recomputes
each network call in backward: about one extra forward pass, a fraction of the memory).

This file also holds the small helpers the pathwise methods share (truncated_bp, refl): the
timesteps of the chain, drawing x_T and the conditioning of a batch, and the reward-with-graph check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rewards.base import check_reward_graph, require_differentiable
from ..sampling import plan_full, sample
from ..schedule import timesteps


@dataclass
class FullBPConfig:
    batch: int = 32            # samples per gradient step
    n_steps: int = 20          # sampling steps N of the chain
    eta: float = 0.0           # 0 = DDIM (deterministic), 1 = DDPM posterior noise
    spacing: str = "trailing"  # timestep spacing (schedule.timesteps); trailing keeps the last step at t > 0
    offset: int = 0            # added to "leading" timesteps (1 = Stable Diffusion's steps_offset)
    checkpoint: bool = False   # torch.utils.checkpoint on every step's network call


def chain_timesteps(schedule, cfg) -> list[int]:
    """The N descending timesteps of the sampling chain described by cfg (n_steps, spacing, offset)."""
    return timesteps(schedule.T, cfg.n_steps, cfg.spacing, cfg.offset)


def resolve_cond(cond, batch: int, generator: torch.Generator, device):
    """Conditioning of one batch. cond: None (unconditional), an int label (the same for all), a tensor
    [batch], or a callable (batch, generator) -> one of those (e.g. random labels per step)."""
    if callable(cond):
        cond = cond(batch, generator)
    if cond is None:
        return None
    if isinstance(cond, int):
        return torch.full((batch,), cond, dtype=torch.long, device=device)
    if isinstance(cond, torch.Tensor):
        if cond.shape[:1] != (batch,):
            raise ValueError(f"cond must have batch size {batch} as its first dimension, got shape {tuple(cond.shape)}")
        return cond.to(device)
    raise ValueError(f"cond must be None, an int, a tensor [B] or a callable (batch, generator) -> cond, got {type(cond)}")


def draw_start(model, batch: int, shape, cond, generator: torch.Generator):
    """(x_T [batch, *shape] ~ N(0, I) in the model's dtype/device, the batch's cond)."""
    p = next(model.parameters())
    where = generator.device if generator is not None else p.device
    x_T = torch.randn((batch, *shape), generator=generator, dtype=p.dtype, device=where).to(p.device)
    return x_T, resolve_cond(cond, batch, generator, p.device)


def reward_with_graph(reward, x0: torch.Tensor, cond, method: str) -> torch.Tensor:
    """r(x0, cond) [B], refusing a result that carries no graph to the parameters."""
    if not x0.requires_grad:
        raise ValueError(
            f"{method}: the sample carries no graph (does the model have trainable parameters? "
            "call model.requires_grad_(True) on a copy of the pretrained model)"
        )
    r = reward(x0, cond)
    check_reward_graph(r, reward, method)
    return r


def make_loss(schedule, reward, cfg: FullBPConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-mean reward, stats) with every step keeping its graph.

    shape: one sample's shape without the batch, e.g. (2,) or (1, 8, 8). cond: see resolve_cond.
    """
    require_differentiable(reward, "full backprop")
    ts = chain_timesteps(schedule, cfg)
    plan = plan_full(len(ts), cfg.checkpoint)

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan, cond=c, generator=generator)
        r = reward_with_graph(reward, x0, c, "full backprop")
        return -r.mean(), {"reward": r.mean().item()}

    return loss_fn
