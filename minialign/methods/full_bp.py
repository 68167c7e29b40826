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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import plan_full, sample
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start


@dataclass
class FullBPConfig(ChainConfig):
    checkpoint: bool = False   # torch.utils.checkpoint on every step's network call


def make_loss(schedule, reward, cfg: FullBPConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-mean reward, stats) with every step keeping its graph.

    shape: one sample's shape without the batch, e.g. (2,) or (1, 8, 8). cond: see chain.resolve_cond.
    """
    require_differentiable(reward, "full backprop")
    ts = chain_timesteps(schedule, cfg)
    plan = plan_full(len(ts), cfg.checkpoint)

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan, cond=c, generator=generator, final_timestep=cfg.final_timestep)
        r = reward_with_graph(reward, x0, c, "full backprop")
        return -r.mean(), {"reward": r.mean().item()}

    return loss_fn
