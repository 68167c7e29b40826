"""ReFL, reward feedback learning (Xu et al. 2023, "ImageReward", Sec. 4 and Alg. 1).

Run the chain without graph down to a randomly chosen late step j, then make one graph-carrying
network call at x_{t_j} and score its one-step prediction of the clean sample:

    j ~ U{N - L, ..., N - 1}                 (L = late steps; ImageReward: 40 DDIM steps, j in [30, 39])
    x_{t_j} = sg[chain_j(x_T)]               (the first j steps, no graph)
    x0_hat  = (x_{t_j} - sqrt(1 - abar_{t_j}) eps_theta(x_{t_j}, t_j)) / sqrt(abar_{t_j})
    loss    = -(1/B) sum_b r(x0_hat^b)       (or, as the authors' code, mean relu(margin - r))

Biased (x0_hat is not a sample, and earlier steps get no credit) and cheap: j no-graph calls and one
graph call. The paper's regulariser (the pretraining denoising loss on a dataset, alternated with the
reward loss) is not included: these baselines are compared on the reward alone.

Implementation note: the no-graph prefix is `sample` over the timesteps t_0..t_{j-1} with
final_timestep = t_j, so it stops at x_{t_j}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import plan_none, predict_x0, sample
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start


@dataclass
class ReFLConfig(ChainConfig):
    late_fraction: float = 0.25           # L = ceil(late_fraction * N) last steps to choose j from (10/40)
    relu_margin: Optional[float] = None   # the authors' code: loss = relu(margin - r) (margin 2 for ImageReward)


def make_loss(schedule, reward, cfg: ReFLConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (loss, stats); stats: reward (of x0_hat), t (the graph step's timestep)."""
    if not 0 < cfg.late_fraction <= 1:
        raise ValueError(f"late_fraction must be in (0, 1], got {cfg.late_fraction}")
    require_differentiable(reward, "ReFL")
    ts = chain_timesteps(schedule, cfg)
    n = len(ts)
    late = max(1, math.ceil(cfg.late_fraction * n))

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        j = int(torch.randint(n - late, n, (1,), generator=generator).item())
        if j == 0:
            x_t = x_T
        else:
            x_t, _ = sample(model, schedule, x_T, ts[:j], cfg.eta, plan_none(j), cond=c, generator=generator,
                            final_timestep=ts[j])
        x0_hat = predict_x0(model, schedule, x_t, ts[j], c)
        r = reward_with_graph(reward, x0_hat, c, "ReFL")
        loss = -r.mean() if cfg.relu_margin is None else torch.relu(cfg.relu_margin - r).mean()
        return loss, {"reward": r.mean().item(), "t": float(ts[j])}

    return loss_fn
