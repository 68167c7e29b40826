"""Reward fine-tuning methods, one file each, on top of the shared sampler (minialign.sampling).

Every method is a choice of which sampling steps keep a graph and how the pieces become a loss. The contract
(methods/chain.py): a config dataclass inheriting `ChainConfig` (the notebook's knobs) and

    make_loss(schedule, reward, cfg, *, shape, cond=None) -> loss_fn(model, step, generator) -> (loss, stats)

for minialign.train.train. The registry below is the one list of methods: the benches, the arena, the plan figure,
the results table and the notebooks read it and never re-list methods or special-case one. Adding a method is one
file plus one entry here; what it needs beyond make_loss is declared in its entry (`Method`'s hooks), and
`setup` applies them for every front end.

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
from minialign.methods import ddpo, full_bp, refl, rlr, sdo, sft_pg, shortft, truncated_bp  # noqa: F401
from minialign.methods.plan_rows import (critic_row, full_row, likelihood_row, refl_row, rlr_row, sdo_row,
                                         shortft_row, truncated_row)

KINDS = ("toy", "sd")  # the model kinds an `extra` hook is asked for


@dataclass(frozen=True)
class Method:
    """One registered method: `config(**defaults, **overrides)` and `make_loss` build its loss_fn.

    grad_reward: it backpropagates through the reward (a non-differentiable reward is refused)
    needs_data:  it matches a data distribution (SFT-PG) instead of maximising a given reward
    chain:       chain(n_steps, batch) -> config overrides that chain needs (e.g. DRaFT-K's k <= n_steps); a
                 caller's own overrides win over them
    prepare:     prepare(model, cfg) -> None: changes the model in place before the optimiser is built (T-LoRA's
                 adapters); a front end calls it on the model it trains
    extra:       extra(kind, **context) -> further make_loss keywords; kind "toy" (context: model_name, the shipped
                 checkpoint) or "sd" (context: pipe, guidance_scale, shortcut = a caller's distilled shortcut or
                 None, frozen = a frozen undistilled copy of the denoiser or None); `setup` adds cfg and schedule
    row:         row(cfg, example) -> (cells, drawn, note): the method's gradient plan for the plan figure
                 (minialign.kit.figures), cells = the sampler's StepPlans or figure kinds, one per step; example:
                 the step shown for a random draw (None: the middle of its range); drawn: that draw's cell or None
    cost_class:  cost_class(stats) -> hashable: the step's cost class from its own stats (steps of one class cost the
                 same FLOPs and network calls; measure/flops.Ledger counts one and charges the rest); default: one
                 class; None: the cost cannot be keyed, every step is counted
    """

    name: str
    label: str                 # a human name for tables and figures
    config: type
    make_loss: Callable
    description: str
    grad_reward: bool = True
    needs_data: bool = False
    defaults: dict = field(default_factory=dict)
    chain: Optional[Callable] = None
    prepare: Optional[Callable] = None
    extra: Optional[Callable] = None
    row: Optional[Callable] = None
    cost_class: Optional[Callable] = lambda stats: "every step"

    def make_config(self, **overrides):
        unknown = set(overrides) - set(self.config.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{self.name}: unknown config field(s) {sorted(unknown)}; "
                             f"{self.config.__name__} has {sorted(self.config.__dataclass_fields__)}")
        return self.config(**{**self.defaults, **overrides})

    def chain_overrides(self, n_steps: int, batch: int) -> dict:
        """The config fields this method needs on a chain of n_steps with `batch` samples ({} if none)."""
        return dict(self.chain(n_steps, batch)) if self.chain is not None else {}

    def extras(self, kind: str, **context) -> dict:
        """make_loss keywords for a model of `kind` ({} for a method that needs none)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return dict(self.extra(kind, **context)) if self.extra is not None else {}


def _keyed(*names):
    """cost_class reading the step's stats `names` (a method whose step cost varies with what it drew)."""
    return lambda stats: tuple(stats.get(n) for n in names)


def _k_at_most(n_steps, batch, k):
    return {"k": min(k, n_steps)}


def _loo_needs_two(n_steps, batch):
    """RLR's leave-one-out baseline needs batch >= 2; with one sample there is no baseline (its cost is negligible)."""
    return {"baseline": "none"} if batch == 1 else {}


def _shortcut(kind, *, model_name=None, shortcut=None, frozen=None, cfg=None, schedule=None, **context):
    """ShortFT's frozen shortcut: a caller's; the shipped one of a toy model; on SD an undistilled frozen copy of the
    denoiser holding the jumps this chain needs (the cost of a shortcut, not its fidelity) when one is given."""
    from minialign.methods import shortcut as sc

    if shortcut is not None:
        return {"shortcut": shortcut}
    if kind == "toy":
        return sc.shipped(model_name)
    if frozen is None:
        raise ValueError("shortcut: ShortFT needs a frozen shortcut distilled from this pipeline (distil_shortcut)")
    segs = shortft.jumps(shortft.layout(chain.chain_timesteps(schedule, cfg), cfg.anchors, schedule.T,
                                        cfg.final_timestep))
    return {"shortcut": sc.Shortcut(frozen, dict(segs))}


def _tlora(model, cfg):
    """T-LoRA: one peft adapter per ShortFT segment (shortft.prepare), before the optimiser sees the model; on a
    model that carries LoRA already (an SD UNet after sd.add_lora), on the layers that LoRA targets."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = sorted(n for n, mod in model.named_modules() if isinstance(mod, BaseTunerLayer))
    shortft.prepare(model, cfg, target_modules=targets or None)


_TB = truncated_bp.TruncatedBPConfig
REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("ddpo", "DDPO", ddpo.DDPOConfig, ddpo.make_loss,
           "PPO-clip on the denoising MDP, eta = 1 (Black et al. 2023)", grad_reward=False, row=likelihood_row,
           cost_class=_keyed("resampled")),
    Method("full_bp", "full backprop", full_bp.FullBPConfig, full_bp.make_loss,
           "backprop through every step: the exact pathwise gradient", row=full_row),
    Method("full_bp_ckpt", "full backprop (checkpointed)", full_bp.FullBPConfig, full_bp.make_loss,
           "full backprop, each step's network call checkpointed", defaults=dict(checkpoint=True), row=full_row),
    Method("draft_1", "DRaFT-1", _TB, truncated_bp.make_loss, "graph on the last step only (Clark et al. 2023)",
           defaults=dict(k=1), chain=lambda n, b: _k_at_most(n, b, 1), row=truncated_row),
    Method("draft_k", "DRaFT-K", _TB, truncated_bp.make_loss, "graph on the last K = 5 steps, latent cut before",
           defaults=dict(k=5), chain=lambda n, b: _k_at_most(n, b, 5), row=truncated_row, cost_class=_keyed("k")),
    Method("alignprop", "AlignProp", _TB, truncated_bp.make_loss,
           "last K ~ U{1..N} steps with graph, latent path kept (Prabhudesai et al. 2023)",
           defaults=dict(variant="alignprop", random_k=True), row=truncated_row, cost_class=_keyed("k")),
    Method("draft_lv", "DRaFT-LV", _TB, truncated_bp.make_loss, "K = 1, the final sample re-noised n = 2 times",
           defaults=dict(variant="draft_lv", lv_samples=2), row=truncated_row),
    Method("refl", "ReFL", refl.ReFLConfig, refl.make_loss, "one graph step at a random late t, reward on x0_hat (Xu et al. 2023)",
           row=refl_row, cost_class=_keyed("t")),
    Method("shortft", "ShortFT", shortft.ShortFTConfig, shortft.make_loss,
           "trainable base steps alternating with frozen shortcut jumps, end-to-end backprop (Guo et al. 2025)",
           extra=_shortcut, row=shortft_row, cost_class=_keyed("anchors_trained")),
    Method("shortft_tlora", "ShortFT (T-LoRA)", shortft.ShortFTConfig, shortft.make_loss,
           "ShortFT training one stacked LoRA per segment, routed by timestep (Guo et al. 2025)",
           defaults=dict(tlora="stacked"), prepare=_tlora, extra=_shortcut, row=shortft_row,
           cost_class=_keyed("anchors_trained")),
    Method("sdo", "SDO", sdo.SDOConfig, sdo.make_loss, "one retained graph step (random k), the linear skip path elsewhere (Dou et al. 2025)",
           row=sdo_row),
    Method("rlr", "RLR", rlr.RLRConfig, rlr.make_loss, "FO last step + HO sub-chain (h = 2) + inherent-noise ZO elsewhere (Ren et al. 2025)",
           chain=_loo_needs_two, row=rlr_row),  # one cost class: every j re-runs h steps, ZO the other n - 1 - h
    Method("rlr_released", "RLR (released code)", rlr.RLRConfig, rlr.make_loss, "the authors' released code: FO x 0.05 + 2 single-step PPO terms x 0.001 at ratio 1, eta 0.05, no ZO",
           defaults=dict(variant="released"), chain=_loo_needs_two, row=rlr_row,
           cost_class=_keyed("ho_dropped")),
    Method("sft_pg", "SFT-PG", sft_pg.SFTPGConfig, sft_pg.make_loss,
           "policy gradient against a learned critic of the data (Fan & Lee 2023)", grad_reward=False, needs_data=True,
           row=critic_row, cost_class=None),  # its trajectory buffer lives in the model, outside its state_dict
]}


EXACT = "full_bp"                    # the exact pathwise gradient: the reference of cost ratios and estimator checks
EXACT_CHECKPOINTED = "full_bp_ckpt"  # the same gradient, checkpointed: the reference where full backprop does not fit


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def names(*, reward: bool = True) -> list[str]:
    """Registered method names in registry order; reward=True leaves out the data-matching ones (SFT-PG), which
    have no reward to maximise (the benches and the arena)."""
    return [n for n, m in REGISTRY.items() if not (reward and m.needs_data)]


def build(name: str, schedule, reward, *, shape, cond=None, config=None, extra=None, **overrides):
    """(loss_fn, cfg) of a registered method: its defaults, then `overrides` (or a full `config`).
    extra: further keywords of that method's make_loss (SFT-PG's `data`, ShortFT's `shortcut`)."""
    m = get(name)
    cfg = config if config is not None else m.make_config(**overrides)
    if config is not None and overrides:
        cfg = replace(config, **overrides)
    return m.make_loss(schedule, reward, cfg, shape=shape, cond=cond, **(extra or {})), cfg


def make_config(name: str, **overrides):
    """A registered method's config: its defaults < its chain overrides for (n_steps, batch) < `overrides`."""
    m = get(name)
    fields = m.config.__dataclass_fields__
    pick = lambda k: overrides.get(k, m.defaults.get(k, fields[k].default))  # noqa: E731
    return m.make_config(**{**m.chain_overrides(pick("n_steps"), pick("batch")), **overrides})


def setup(name: str, schedule, reward, *, shape, cond=None, kind: str = "toy", context: Optional[dict] = None,
          model=None, extra: Optional[dict] = None, config=None, **overrides):
    """(loss_fn, cfg) of a registered method with everything its entry declares, for every front end (bench,
    SD bench, arena, build_sd): `config`, or make_config(name, **overrides); then, if a `model` is given,
    `prepare(model, cfg)` (before any optimiser sees the model); then its extra objects for a model of `kind` given
    `context` (updated by the caller's own `extra`), and build."""
    m = get(name)
    cfg = config if config is not None else make_config(name, **overrides)
    if model is not None and m.prepare is not None:
        m.prepare(model, cfg)
    more = m.extras(kind, cfg=cfg, schedule=schedule, **(context or {}))
    return build(name, schedule, reward, shape=shape, cond=cond, config=cfg, extra={**more, **(extra or {})})
