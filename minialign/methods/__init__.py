"""Reward fine-tuning methods, one file each, on top of the shared sampler (minialign.sampling).

Every method is a choice of which sampling steps keep a graph and how the pieces become a loss. The contract
(methods/chain.py): a config dataclass inheriting `ChainConfig` (the notebook's knobs) and

    make_loss(schedule, reward, cfg, *, shape, cond=None) -> loss_fn(model, step, generator) -> (loss, stats)

for minialign.train.train. The registry below is the one list of methods: bench.py, the arena and the
notebooks read it and never re-list methods. Adding a method is one file plus one line here.

    ddpo          policy gradient (PPO-clip) on the denoising MDP; any reward (Black et al. 2023)
    full_bp       backprop through every step: the exact pathwise gradient
    truncated_bp  DRaFT-K, DRaFT-LV (Clark et al. 2023), AlignProp (Prabhudesai et al. 2023)
    refl          one graph step at a random late timestep, reward on x0_hat (Xu et al. 2023)
    sft_pg        shortcut fine-tuning with policy gradient against a learned critic (Fan & Lee 2023)
    rlr           recursive likelihood ratio: first-, half- and zeroth-order pieces in one unbiased estimator (Ren et al. 2025)
    sdo           one retained network call plus the linear skip path (Dou et al. 2025)
    shortft       end-to-end backprop through a short chain with a frozen distilled shortcut (Guo et al. 2025)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from minialign.methods import chain  # noqa: F401  (first: the method files import it)
from minialign.methods import ddpo, full_bp, refl, rlr, sdo, sft_pg, shortft, truncated_bp


@dataclass(frozen=True)
class Method:
    """One registered method: `config(**defaults, **overrides)` and `make_loss` build its loss_fn.

    grad_reward: it backpropagates through the reward (a non-differentiable reward is refused)
    needs_data:  it matches a data distribution (SFT-PG) instead of maximising a given reward
    extra:       extra(model_name) -> further make_loss keywords for a shipped model (e.g. ShortFT's shortcut)
    """

    name: str
    label: str                 # a human name for tables and figures
    config: type
    make_loss: Callable
    description: str
    grad_reward: bool = True
    needs_data: bool = False
    defaults: dict = field(default_factory=dict)
    extra: Optional[Callable] = None

    def make_config(self, **overrides):
        unknown = set(overrides) - set(self.config.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{self.name}: unknown config field(s) {sorted(unknown)}; "
                             f"{self.config.__name__} has {sorted(self.config.__dataclass_fields__)}")
        return self.config(**{**self.defaults, **overrides})


_TB = truncated_bp.TruncatedBPConfig
REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("ddpo", "DDPO", ddpo.DDPOConfig, ddpo.make_loss,
           "PPO-clip on the denoising MDP, eta = 1 (Black et al. 2023)", grad_reward=False),
    Method("full_bp", "full backprop", full_bp.FullBPConfig, full_bp.make_loss,
           "backprop through every step: the exact pathwise gradient"),
    Method("full_bp_ckpt", "full backprop (checkpointed)", full_bp.FullBPConfig, full_bp.make_loss,
           "full backprop, each step's network call checkpointed", defaults=dict(checkpoint=True)),
    Method("draft_1", "DRaFT-1", _TB, truncated_bp.make_loss, "graph on the last step only (Clark et al. 2023)",
           defaults=dict(k=1)),
    Method("draft_k", "DRaFT-K", _TB, truncated_bp.make_loss, "graph on the last K = 5 steps, latent cut before",
           defaults=dict(k=5)),
    Method("alignprop", "AlignProp", _TB, truncated_bp.make_loss,
           "last K ~ U{1..N} steps with graph, latent path kept (Prabhudesai et al. 2023)",
           defaults=dict(variant="alignprop", random_k=True)),
    Method("draft_lv", "DRaFT-LV", _TB, truncated_bp.make_loss, "K = 1, the final sample re-noised n = 2 times",
           defaults=dict(variant="draft_lv", lv_samples=2)),
    Method("refl", "ReFL", refl.ReFLConfig, refl.make_loss, "one graph step at a random late t, reward on x0_hat (Xu et al. 2023)"),
    Method("shortft", "ShortFT", shortft.ShortFTConfig, shortft.make_loss,
           "trainable base steps alternating with frozen shortcut jumps, end-to-end backprop (Guo et al. 2025)",
           extra=lambda model: __import__("minialign.methods.shortcut", fromlist=["shipped"]).shipped(model)),
    Method("sdo", "SDO", sdo.SDOConfig, sdo.make_loss, "one retained graph step (random k), the linear skip path elsewhere (Dou et al. 2025)"),
    Method("rlr", "RLR", rlr.RLRConfig, rlr.make_loss, "FO last step + HO sub-chain (h = 2) + inherent-noise ZO elsewhere (Ren et al. 2025)"),
    Method("rlr_released", "RLR (released code)", rlr.RLRConfig, rlr.make_loss, "FO + 2 single-step PG terms, no HO/ZO", defaults=dict(variant="released")),
    Method("sft_pg", "SFT-PG", sft_pg.SFTPGConfig, sft_pg.make_loss,
           "policy gradient against a learned critic of the data (Fan & Lee 2023)", grad_reward=False, needs_data=True),
]}


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, schedule, reward, *, shape, cond=None, config=None, extra=None, **overrides):
    """(loss_fn, cfg) of a registered method: its defaults, then `overrides` (or a full `config`).
    extra: further keywords of that method's make_loss (SFT-PG's `data`, ShortFT's `shortcut`)."""
    m = get(name)
    cfg = config if config is not None else m.make_config(**overrides)
    if config is not None and overrides:
        cfg = replace(config, **overrides)
    return m.make_loss(schedule, reward, cfg, shape=shape, cond=cond, **(extra or {})), cfg
