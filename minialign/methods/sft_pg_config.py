"""SFT-PG's knobs (minialign.methods.sft_pg): the authors' toy defaults, checked on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minialign.methods.chain import ChainConfig, check_fields


@dataclass
class SFTPGConfig(ChainConfig):
    """Authors' toy defaults (Fan & Lee 2023, Sec. 5 and their code). Fields are the notebook's knobs; the chain
    fields (n_steps, spacing, offset) are used by `make_loss` (an SFTPG built by hand takes its timesteps)."""

    batch: int = 128  # trajectories (and real samples) per critic step
    n_steps: int = 10  # steps of the few-step chain
    lr: float = 5e-5  # generator (Adam)
    critic_lr: float = 1e-3
    baseline_lr: float = 1e-3
    n_critic: int = 5  # critic steps per generator phase
    n_generator: int = 1  # generator steps per phase (authors: 1 on the toy, 10 on images)
    gen_batch: Optional[int] = None  # transitions per generator step; None: all stored / n_generator
    max_norm: float = 0.1  # generator gradient clipping (authors' 0.1)
    critic_max_norm: Optional[float] = None  # critic/baseline clipping (authors: none)
    baseline: bool = True  # False: B = 0 (plain REINFORCE on f(x_0))
    baseline_hidden: int = 256  # width of B(x_i, i) (authors: 256)
    baseline_reg: float = 1.0  # lambda: how much of the baseline's squared error reaches the critic
    gradient_penalty: float = 0.0  # WGAN-GP weight on the critic (0: off, as the authors)
    eta: float = 1.0  # DDIM eta of the trained chain; must be > 0
    min_sigma: float = 1e-3  # noise floor of every step (the last step of an eta = 1 chain has sigma 0)
    ema: Optional[float] = None  # decay of a moving average of the denoiser's weights per generator step (None: off)

    def __post_init__(self):
        super().__post_init__()
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 for SFT-PG (eta = 0 is DDIM: its steps are deterministic and have "
                             f"no log-prob, so there is no policy gradient), got {self.eta}")
        if not self.min_sigma > 0:
            raise ValueError(f"min_sigma must be > 0 for SFT-PG (the last step of an eta = 1 chain has sigma = 0; "
                             f"it needs a tiny sigma such as 1e-3 to be a stochastic, trainable step), got {self.min_sigma}")
        check_fields(self, positive_int=("n_critic", "n_generator", "baseline_hidden"), optional_positive_int=("gen_batch",),
                     positive=("lr", "critic_lr", "baseline_lr", "max_norm"), nonnegative=("baseline_reg", "gradient_penalty"))
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be None (off) or a decay in (0, 1), got {self.ema}")
