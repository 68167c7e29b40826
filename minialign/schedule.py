"""Noise schedules and the step coefficients of DDPM/DDIM samplers.

Notation (DESIGN 3). Timesteps run from noise x_T to data x_0; one step goes from t to the next
smaller timestep s (s = -1 after the last step, where abar = 1). Epsilon prediction:

    x0_hat  = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    sigma_t = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
    x_s     = sqrt(abar_s) * x0_hat + sqrt(1 - abar_s - sigma_t^2) * eps + sigma_t * z
            = a_t * x_t + b_t * eps + sigma_t * z

    a_t = sqrt(abar_s / abar_t)
    b_t = sqrt(1 - abar_s - sigma_t^2) - sqrt(abar_s * (1 - abar_t) / abar_t)

eta = 0 is DDIM (deterministic), eta = 1 is the DDPM posterior (ancestral sampling). These are the
formulas of diffusers' DDIMScheduler.step / DDPMScheduler.step (tests/test_schedule.py checks both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")


def make_betas(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Betas [T] in float64. `cosine` is Nichol & Dhariwal's (beta_start/end unused, betas <= 0.999)."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":  # Stable Diffusion's
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if name == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    if name == "sigmoid":  # SFT-PG's toy (and the classic 2-D DDPM demos)
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


@dataclass
class Schedule:
    """A T-step forward process. `abar(t)` is the cumulative alpha, with abar(-1) = 1."""

    name: str
    betas: torch.Tensor  # [T] float64
    beta_start: float = 1e-4
    beta_end: float = 2e-2

    @classmethod
    def make(cls, name: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        return cls(name, make_betas(name, T, beta_start, beta_end), beta_start, beta_end)

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, 0)

    def abar(self, t: int) -> float:
        """Cumulative alpha at integer timestep t in [-1, T-1] (a python float, float64 precision)."""
        t = int(t)
        if not -1 <= t < self.T:
            raise ValueError(f"timestep must be in [-1, {self.T - 1}], got {t}")
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def config(self) -> dict:
        """Arguments of Schedule.make that rebuild this schedule."""
        return {"name": self.name, "T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t is a LongTensor [B]."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [B] = {tuple(x0.shape[:1])}, got {tuple(t.shape)}")
    abar = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


@dataclass(frozen=True)
class StepCoefficients:
    """x_s = a * x_t + b * eps + sigma * z, and the pieces of the DDIM form."""

    t: int
    s: int
    abar_t: float
    abar_s: float
    a: float
    b: float
    sigma: float


def step_coefficients(schedule: Schedule, t: int, s: int, eta: float) -> StepCoefficients:
    """Coefficients of one step from timestep t to s < t (s = -1 for the last step)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM posterior; above 1 the variance exceeds "
                         f"1 - abar_s and the step's mean would be clamped), got {eta}")
    if not s < t:
        raise ValueError(f"a step must go down in time: got t={t}, s={s}")
    abar_t, abar_s = schedule.abar(t), schedule.abar(s)
    sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
    a = math.sqrt(abar_s / abar_t)
    b = math.sqrt(max(1 - abar_s - sigma**2, 0.0)) - math.sqrt(abar_s * (1 - abar_t) / abar_t)
    return StepCoefficients(int(t), int(s), abar_t, abar_s, a, b, sigma)


def timesteps(T: int, n: int, spacing: str = "leading", offset: int = 0) -> list[int]:
    """The n timesteps (descending) an n-step sampler visits on a T-step model, as diffusers spaces them.

    leading:  0, T//n, 2T//n, ... (+ offset);  trailing: T-1, T-1-T/n, ...;  linspace: n points over [0, T-1].
    With leading spacing and offset 0 the last step is at t = 0 (or 1 in SD's convention, offset 1).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of sampling steps) must be a positive int, got {n!r}")
    if n > T:
        raise ValueError(f"n (number of sampling steps) must be <= T = {T} training steps, got {n}")
    if spacing == "leading":
        ts = [i * (T // n) + offset for i in range(n)]
    elif spacing == "trailing":
        ts = [round(T - i * T / n) - 1 for i in range(n)][::-1]
    elif spacing == "linspace":
        ts = [round(i * (T - 1) / (n - 1)) if n > 1 else 0 for i in range(n)]
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if max(ts) >= T or min(ts) < 0:
        raise ValueError(f"offset={offset} puts timesteps outside [0, {T - 1}]")
    return sorted(ts, reverse=True)


def prev_timesteps(ts, final_timestep: int = -1) -> list[int]:
    """Where each step of a chain lands: step i goes from ts[i] to ts[i + 1], the last to `final_timestep`
    (-1: the data, abar = 1). The one previous-timestep rule of the project."""
    ts = [int(t) for t in ts]
    return ts[1:] + [int(final_timestep)]


def fastdpm_timesteps(T: int, n: int, kind: str = "quadratic") -> list[int]:
    """FastDPM's STEP selection (Kong & Ping 2021) of n of T timesteps, descending: "linear" = 0, T//n, 2T//n, ...
    (= leading spacing); "quadratic" = floor(linspace(0, sqrt(0.8 T), n)^2), denser near t = 0 (FastDPM's
    STEP-quadratic; SFT-PG's image experiments use FastDPM's VAR-quadratic selection instead, not implemented)."""
    import numpy as np

    if kind == "linear":
        return timesteps(T, n, "leading")
    if kind == "quadratic":
        ts = (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(int).tolist()
    else:
        raise ValueError(f"kind must be 'linear' or 'quadratic', got {kind!r}")
    if len(set(ts)) != n:
        raise ValueError(f"n: {n} steps of T = {T} give repeated timesteps {ts}")
    return sorted(ts, reverse=True)
