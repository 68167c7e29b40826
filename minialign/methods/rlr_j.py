"""How RLR draws j, the first step of its HO sub-chain (sampling order, 0 = the noisiest step).

With J = N - h possible starts (j + h - 1 <= N - 2: the last step is FO's):

    uniform     p_j = 1 / J
    range       p_j = 1 / (b - a + 1) on j in [a, b] (the paper's "prompt technique" restricts j to a step range)
    weighted    p_j proportional to given weights (e.g. gradient norms measured beforehand)
    grad_norm   proportional-with-floor, p_j = (1 - f) n_j / sum_k n_k + f / J (f = j_floor): THIS PROJECT'S form,
                a deviation from the paper. It keeps every p_j >= f / J by construction
    softmax     the paper's form, p_j = exp(n_j / tau) / sum_k exp(n_k / tau) (tau = j_temperature)

n_j is an exponential moving average (decay j_decay) of |g_HO| (the L2 norm over all trainable parameters of the
HO estimate, advantage noise included) over the past draws of j; a start not yet drawn gets the mean of the others
(1 before any draw: uniform for both forms). p is fixed before each draw from past draws only, and the estimate
is unbiased given j, so no 1/(J p_j) importance weight is applied (it would bias it: tests/test_rlr.py).
"""
from __future__ import annotations

import math

import torch


class GradNormJ:
    """The gradient-norm distribution of j over J starts: probs(), update(j, norm); form "floor" or "softmax"."""

    def __init__(self, n_starts: int, floor: float, decay: float, form: str = "floor", temperature: float = 1.0):
        if form not in ("floor", "softmax"):
            raise ValueError(f"form must be 'floor' or 'softmax', got {form!r}")
        self.norms, self.floor, self.decay = [None] * n_starts, floor, decay
        self.form, self.temperature = form, temperature

    def _filled(self) -> torch.Tensor:
        seen = [v for v in self.norms if v is not None]
        fill = sum(seen) / len(seen) if seen else 1.0
        return torch.tensor([fill if v is None else v for v in self.norms], dtype=torch.float64)

    def probs(self) -> torch.Tensor:
        n = self._filled()
        if self.form == "softmax":
            return torch.softmax(n / self.temperature, 0)
        uniform = torch.full_like(n, 1 / len(n))
        return uniform if n.sum() <= 0 else (1 - self.floor) * n / n.sum() + self.floor * uniform

    def update(self, j: int, norm: float):
        if not math.isfinite(norm):  # never averaged away: train() stops on the NaN loss this step produces
            return
        old = self.norms[j]
        self.norms[j] = norm if old is None else self.decay * old + (1 - self.decay) * norm


def grad_norm_j(cfg, n_steps: int):
    """The GradNormJ of a config (j_dist "grad_norm" or "softmax" with h > 0), else None."""
    if cfg.h == 0 or cfg.j_dist not in ("grad_norm", "softmax"):
        return None
    form = "softmax" if cfg.j_dist == "softmax" else "floor"
    return GradNormJ(n_steps - cfg.h, cfg.j_floor, cfg.j_decay, form, cfg.j_temperature)


def draw_j(cfg, generator, adaptive=None) -> tuple[int, float]:
    """(j, p_j): the sub-chain's first step and the probability it was drawn with (-1, 1.0 without HO)."""
    top = cfg.n_steps - 1 - cfg.h
    if cfg.h == 0:
        return -1, 1.0
    if adaptive is not None:
        p = adaptive.probs()
    elif cfg.j_dist == "range":
        a, b = cfg.j_range
        p = torch.zeros(top + 1, dtype=torch.float64)
        p[a:b + 1] = 1 / (b - a + 1)
        return int(torch.randint(a, b + 1, (1,), generator=generator)), float(p[a])
    elif cfg.j_dist == "weighted":
        p = torch.tensor(cfg.j_weights, dtype=torch.float64)
        p = p / p.sum()
    else:
        return int(torch.randint(0, top + 1, (1,), generator=generator)), 1 / (top + 1)
    j = int(torch.multinomial(p, 1, generator=generator))
    return j, float(p[j])
