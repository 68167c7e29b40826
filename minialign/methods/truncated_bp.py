"""Truncated backprop through the last steps of the chain: DRaFT-K, AlignProp and DRaFT-LV.

All three run the chain and keep the network graph in the last K steps only.

DRaFT-K (Clark et al. 2023, Sec. 4.2): steps 1..N-K run without graph and the latent is cut before
the last K steps, which keep everything:

    x_K' = sg[chain_{N-K}(x_T)],   x_0 = last_K_steps(x_K'; theta),   loss = -(1/B) sum_b r(x_0^b)
    grad = -(1/B) sum_b (d r / d x_0) (d x_0 / d theta)|_{last K steps}     (biased: earlier steps ignored)

AlignProp (Prabhudesai et al. 2023, "Aligning text-to-image diffusion models with reward
backpropagation"): the network output eps is detached in the early steps but the latent path
x_s = a_t x_t + b_t sg[eps] stays connected (plan_truncated(keep_path=True)), and K is drawn at random
each iteration ("randomized truncated backpropagation", K ~ U{1..k} here). Note: with respect to the
parameters the kept latent path carries nothing (sg[eps] does not depend on theta), so for a given K
AlignProp's parameter gradient equals DRaFT-K's; the path matters only when x_T itself is optimised.
Deviation: the paper draws K ~ U(0, 50) where K = 0 trains nothing; here K >= 1. The TRL-based
AlignProp code can also draw the truncation point from a Gaussian; not implemented.

DRaFT-LV (Clark et al. 2023, Sec. 4.3, K = 1, lower variance): run the whole chain without graph,
take x_0 = sg[chain(x_T)], and n times re-noise it to the last step's timestep t_1 and denoise it with
one graph-carrying step (the same step the sampler's last step takes):

    x_{t_1}^(i) = sqrt(abar_{t_1}) x_0 + sqrt(1 - abar_{t_1}) e_i,   e_i ~ N(0, I),   i = 1..n
    x_0^(i)     = step(x_{t_1}^(i), t_1 -> -1; theta)
    loss        = -(1/(n B)) sum_b sum_i r(x_0^(i), c^b)

The n re-noised copies go through the network as one batch of n*B. The paper noises to t = 1 (the last
timestep of its sampler); here "the last timestep" is the chain's own last one, t_1 = timesteps[-1].
Only the re-noised copies carry gradient; the chain's own last step is run without graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import plan_full, plan_none, plan_truncated, sample
from minialign.schedule import q_sample
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start

VARIANTS = ("draft", "alignprop", "draft_lv")
_NAMES = {"draft": "DRaFT-K", "alignprop": "AlignProp", "draft_lv": "DRaFT-LV"}


@dataclass
class TruncatedBPConfig(ChainConfig):
    variant: str = "draft"   # draft (DRaFT-K) | alignprop | draft_lv
    k: Optional[int] = None  # steps with graph (the maximum of the random K if random_k); None: 1, or n_steps if random_k
    random_k: bool = False   # K ~ U{1..k} per iteration (AlignProp's randomized truncation)
    lv_samples: int = 2      # DRaFT-LV: re-noised copies n per sample
    checkpoint: bool = False # torch.utils.checkpoint on every graph step's network call

    def __post_init__(self):
        super().__post_init__()
        if self.k is None:
            self.k = self.n_steps if self.random_k else 1


def _check(cfg: TruncatedBPConfig):
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if not 1 <= cfg.k <= cfg.n_steps:
        raise ValueError(f"k must be in [1, n_steps={cfg.n_steps}], got {cfg.k}")
    if cfg.variant == "draft_lv" and (cfg.k != 1 or cfg.random_k):
        raise ValueError(f"DRaFT-LV is defined for K = 1 (k=1, random_k=False), got k={cfg.k}, random_k={cfg.random_k}")
    if cfg.variant == "draft_lv" and cfg.lv_samples < 1:
        raise ValueError(f"lv_samples must be >= 1, got {cfg.lv_samples}")


def make_loss(schedule, reward, cfg: TruncatedBPConfig, *, shape, cond=None):
    """loss_fn(model, step, generator) -> (-mean reward, stats) for the variant in cfg.

    stats: reward (mean reward of what the loss scores: the chain's samples, or DRaFT-LV's re-denoised
    copies), k (the number of graph-carrying steps this iteration).
    """
    _check(cfg)
    name = _NAMES[cfg.variant]
    require_differentiable(reward, name)
    ts = chain_timesteps(schedule, cfg)
    n = len(ts)

    def loss_fn(model, step: int, generator: torch.Generator):
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        if cfg.variant == "draft_lv":
            return _draft_lv(model, x_T, c, generator)
        k = int(torch.randint(1, cfg.k + 1, (1,), generator=generator).item()) if cfg.random_k else cfg.k
        plan = plan_truncated(n, k, keep_path=cfg.variant == "alignprop", checkpoint=cfg.checkpoint)
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan, cond=c, generator=generator, final_timestep=cfg.final_timestep)
        r = reward_with_graph(reward, x0, c, name)
        return -r.mean(), {"reward": r.mean().item(), "k": float(k)}

    def _draft_lv(model, x_T, c, generator):
        x0, _ = sample(model, schedule, x_T, ts, cfg.eta, plan_none(n), cond=c, generator=generator, final_timestep=cfg.final_timestep)
        m, t1 = cfg.lv_samples, ts[-1]
        x0_rep = x0.detach().repeat(m, *[1] * (x0.dim() - 1))          # [m*B, ...], copy i = rows i*B..(i+1)*B
        c_rep = None if c is None else c.repeat(m, *[1] * (c.dim() - 1))
        e = torch.randn(x0_rep.shape, generator=generator, dtype=x0.dtype, device=generator.device).to(x0.device)
        x_t1 = q_sample(schedule, x0_rep, torch.full((len(x0_rep),), t1, dtype=torch.long, device=x0.device), e)
        x0_i, _ = sample(model, schedule, x_t1, [t1], cfg.eta, plan_full(1, cfg.checkpoint), cond=c_rep,
                         generator=generator, final_timestep=cfg.final_timestep)
        r = reward_with_graph(reward, x0_i, c_rep, name)
        return -r.mean(), {"reward": r.mean().item(), "k": 1.0}

    return loss_fn
