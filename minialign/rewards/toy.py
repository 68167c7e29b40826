"""Rewards on 2-D points x [B, 2] (the toy laboratory). Both are smooth almost everywhere and cheap.

    target_region:          r(x) = -max(|x - c| - radius, 0)    (negative distance to a disc)
    component_log_density:  r(x) = log N(x; mu_k, std^2 I)      (one component of the 8-Gaussian ring)
"""
from __future__ import annotations

import math

import torch

from minialign.toy.data import gmm_centres
from minialign.rewards.base import Reward


def _check_points(x: torch.Tensor):
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"2-D rewards take points [B, 2], got shape {tuple(x.shape)}")


def target_region(centre=(1.0, 0.0), radius: float = 0.0) -> Reward:
    """Negative Euclidean distance to the disc of `radius` around `centre` (0 inside it)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    c = torch.tensor(centre, dtype=torch.float64)

    def fn(x, cond=None):
        _check_points(x)
        return -((x - c.to(x)).norm(dim=1) - radius).clamp_min(0)

    return Reward(fn, f"region({centre[0]:g},{centre[1]:g};r={radius:g})", differentiable=True)


def component_log_density(component: int = 0, k: int = 8, radius: float = 1.0, std: float = 0.08) -> Reward:
    """log N(x; mu_component, std^2 I) with mu on the ring of `k` centres (minialign.toy.data.gmm_centres).
    With the data's std (0.08) the reward is steep; a wider std gives a gentler pull towards the mode."""
    if not 0 <= component < k:
        raise ValueError(f"component must be in [0, {k - 1}], got {component}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    mu = gmm_centres(k, radius)[component].double()

    def fn(x, cond=None):
        _check_points(x)
        d2 = ((x - mu.to(x)) ** 2).sum(1)
        return -d2 / (2 * std**2) - 2 * math.log(std) - math.log(2 * math.pi)

    return Reward(fn, f"logp(component {component}, std={std:g})", differentiable=True)
