"""The chain every method samples: its config fields, its timesteps, x_T and the batch's conditioning.

This is the method contract (the arena's): every method's config inherits `ChainConfig`, and every
method file exposes

    make_loss(schedule, reward, cfg, *, shape, cond=None) -> loss_fn(model, step, generator) -> (loss, stats)

with `stats["reward"]` the mean reward of what the loss scored. A method file imports this module,
`sampling`, `schedule`, `rewards` and `layers` (torch layers) — never a sibling method — and joins the
registry in `minialign/methods/__init__.py` with one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minialign.schedule import SPACINGS, timesteps


@dataclass
class ChainConfig:
    """The sampling chain a method trains through (the notebook's and the arena's knobs)."""

    batch: int = 32            # samples per gradient step
    n_steps: int = 20          # sampling steps N of the chain
    eta: float = 0.0           # 0 = DDIM (deterministic), 1 = DDPM posterior noise
    spacing: str = "trailing"  # timestep spacing (schedule.timesteps); trailing keeps the last step at t > 0
    offset: int = 0            # added to "leading" timesteps (1 = Stable Diffusion's steps_offset)
    final_timestep: int = -1   # where the last step lands: -1 = abar 1 (the data); 0 = abar_0, as SD 1.x's
                               # pipelines end (set_alpha_to_one=False; sd.final_timestep_of(pipe) gives it)

    def __post_init__(self):
        check_fields(self, positive_int=("batch", "n_steps"))
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM; above 1 the step's variance exceeds the "
                             f"posterior's and the mean has no real coefficient), got {self.eta}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {self.offset!r}")
        if not isinstance(self.final_timestep, int) or isinstance(self.final_timestep, bool) or self.final_timestep < -1:
            raise ValueError(f"final_timestep must be an int >= -1 (-1: the data, abar = 1; 0: SD 1.x's abar_0), "
                             f"got {self.final_timestep!r}")


def check_fields(cfg, *, positive_int=(), optional_positive_int=(), positive=(), nonnegative=()):
    """Raise ValueError naming the first field of `cfg` outside its range: positive_int (an int >= 1),
    optional_positive_int (None or an int >= 1), positive (> 0), nonnegative (>= 0)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name in positive_int:
        if not (is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1):
            raise ValueError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    for name in optional_positive_int:
        v = getattr(cfg, name)
        if v is not None and not (is_int(v) and v >= 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in nonnegative:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def chain_timesteps(schedule, cfg: ChainConfig) -> list[int]:
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
