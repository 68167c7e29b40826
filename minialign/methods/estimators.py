"""Estimator pieces several methods share: advantages, per-step log-probs, the surrogate <G, theta>.

A method file may import this module (as it imports `chain`): it is no method, it holds what DDPO, RLR and
SFT-PG would otherwise each write again.

    standardise(r)      A_b = (r_b - mean r) / (std r + 1e-8), over the batch or per condition (DDPO)
    advantages(r, kind) A_b = r_b - baseline_b: leave-one-out mean, none, or standardised (RLR)
"""
from __future__ import annotations

import torch

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
