"""ShortFT: backprop end to end through a short chain built from a frozen shortcut (Guo et al., ICCV 2025).

Full backprop through an N-step chain is costly (N graph-carrying network calls) and truncating it (DRaFT-K)
drops the early steps' contribution. ShortFT keeps an end-to-end path from the reward back to an early
timestep but SHORTENS it: a frozen, trajectory-preserving few-step model (the "shortcut", the authors use
Hyper-SD's 4-step LoRA for SD1.5; here `minialign.methods.shortcut` distils one from the base model) jumps over
whole segments of the base chain in one step, and only a few base steps in between are trainable.

The training chain (a reconstruction: no code was released). With anchors t^(1) > ... > t^(m) (timesteps of
the chain) and s^(i) the chain's timestep after t^(i) (after the last one: cfg.final_timestep, -1 = the data):

    x_{t^(1)}  = sg[ base chain from x_T to t^(1) ]                            (no graph, "truncation point")
    x_{s^(i)}  = a x_{t^(i)} + b eps_theta(x_{t^(i)}, t^(i))                   (trainable base step, i = 1..m)
    x_{t^(i+1)} = a' x_{s^(i)} + b' eps_phi(x_{s^(i)}, s^(i))                  (frozen shortcut jump, DDIM, eta = 0)
    loss       = -(1/B) sum_b r(x_0^b, c^b),   x_0 = x_{s^(m)} (or one more jump to the final timestep)

Backprop runs through every piece: the jumps are differentiated with respect to their INPUT only (phi is frozen),
so the gradient reaches theta at every anchor through the shortcut's Jacobians d x_{t^(i+1)} / d x_{s^(i)} —
about 2m graph-carrying calls instead of N. The default anchors are the paper's layout on a 1000-step scale,
761 / 741->501 / 501 / 481->261 / 261 / 241->1 / 1 (anchors 761, 501, 261, 1 on SD's 50-step chain, leading
spacing, offset 1: `ShortFTConfig(n_steps=50, spacing="leading", offset=1)`). Anchors snap to the nearest
timestep of the configured chain (on the arena's 20-step trailing chain: 749, 499, 249, 49), and the
shortcut must have been distilled for exactly the jumps this produces (`shortcut.segments`).

Inference is the ordinary chain of the tuned base model (`inference`; it takes no shortcut). What is trained
(LoRA through peft, `minialign.lora.add_lora` or `add_tlora`, or any subset of parameters) is whatever of
`model` requires grad.

Deviations from the paper, named:
- the shortcut is distilled here (minialign.methods.shortcut), not Hyper-SD; its jumps are one DDIM step of a
  fine-tuned copy of the base network, valid only for the segments it was distilled on;
- the jumps are deterministic (eta = 0) whatever cfg.eta says (the shortcut imitates the DDIM ODE).

Refinements (minialign.methods.shortft_tlora, where the equations are): timestep-aware LoRA (`tlora`: "stacked",
the paper's LoRA i on LoRA i - 1, the default when on; "separate"; "stacked_later", this project's first reading) and
progressive training (`progressive` = P optimiser steps per stage; `progressive_order` "paper": stage i trains LoRA
i..m-1 with the original chain, without graph, before anchor i and shortcuts only from there on, so the last stage
has the fewest shortcuts; "reverse", this project's first reading, runs the stages the other way round).
`prepare(model, cfg)` adds the T-LoRA adapters (a model-preparation hook). T-LoRA refuses a network that
checkpoints its blocks internally (diffusers' gradient checkpointing): the recomputed blocks would run with the
wrong adapters.

The chain ends where cfg.final_timestep says: -1 (abar = 1, the data) or, e.g., 0 (SD 1.x's abar_0); the last
piece (a base step or the last jump) lands there, and the shortcut must hold that last jump.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from minialign.rewards.base import require_differentiable, reward_with_graph
from minialign.sampling import StepPlan, plan_none, sample
from minialign.methods.chain import ChainConfig, chain_timesteps, draw_start
from minialign.methods.shortft_tlora import (ORDERS, TLORA, TimestepLoRA, add_tlora, block_checkpointing,  # noqa: F401
                                             refuse_block_checkpointing, routes_snapped, stage_first_anchor)

PAPER_ANCHORS = (761, 501, 261, 1)  # the paper's trainable base steps, on a 1000-step scale
HOW_TO_MAKE = ("make one with `python -m minialign.methods.shortcut NAME` (NAME = the base checkpoint, e.g. digits or gmm) "
               "and load it with `minialign.methods.shortcut.load(NAME)`")


@dataclass
class ShortFTConfig(ChainConfig):
    anchors: tuple = PAPER_ANCHORS  # trainable base steps, on a 1000-step scale, snapped to the chain's timesteps
    checkpoint: bool = False        # torch.utils.checkpoint on the trainable base steps' network calls
    tlora: str = "off"              # timestep-aware LoRA: off | stacked (paper) | separate | stacked_later (add_tlora)
    progressive: int = 0            # optimiser steps per stage of progressive training (0: off, every anchor always)
    progressive_order: str = "paper"  # paper: stage i trains anchors i.. (all first) | reverse: the last anchor first

    def __post_init__(self):
        super().__post_init__()
        a = tuple(self.anchors)
        if not a or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 1000 for t in a) \
                or any(u <= v for u, v in zip(a, a[1:])):
            raise ValueError(f"anchors must be a non-empty, strictly decreasing tuple of ints in [0, 999] "
                             f"(a 1000-step scale), got {self.anchors!r}")
        self.anchors = a
        if self.tlora not in TLORA:
            raise ValueError(f"tlora must be one of {TLORA}, got {self.tlora!r}")
        if not isinstance(self.progressive, int) or isinstance(self.progressive, bool) or self.progressive < 0:
            raise ValueError(f"progressive must be an int >= 0 (optimiser steps per stage; 0 = off), "
                             f"got {self.progressive!r}")
        if self.progressive_order not in ORDERS:
            raise ValueError(f"progressive_order must be one of {ORDERS}, got {self.progressive_order!r}")


class Piece(NamedTuple):
    kind: str        # "head" (no-graph base steps), "base" (one trainable base step) or "jump" (shortcut)
    steps: tuple     # the chain timesteps this piece visits (one for base and jump)
    land: int        # where it lands (a chain timestep, or the chain's final_timestep: -1 = the data)


def snap(ts, anchors, T: int) -> list[int]:
    """Each anchor (1000-step scale) as the chain timestep nearest to round(a T / 1000); refuses a collision."""
    ts = [int(t) for t in ts]
    snapped = [min(ts, key=lambda u: (abs(u - round(a * T / 1000)), u)) for a in anchors]
    if len(set(snapped)) != len(snapped):
        raise ValueError(f"anchors {tuple(anchors)} snap to {snapped} on the chain {ts}: two anchors share a "
                         "timestep; use fewer anchors or a longer chain (n_steps)")
    return snapped


def layout(ts, anchors, T: int, final_timestep: int = -1) -> list[Piece]:
    """The training chain over the descending chain timesteps ts: head, then base step / jump alternating.

    Each anchor a (1000-step scale) becomes the chain timestep nearest to round(a T / 1000); the base step
    at anchor i lands on the chain's next timestep s_i (after the chain's last timestep: final_timestep); a jump
    carries s_i to anchor i+1 (or to final_timestep after the last anchor) whenever they differ. final_timestep:
    -1 (abar = 1, the data) or a timestep below the chain's last, e.g. 0 for SD 1.x (ChainConfig.final_timestep)."""
    ts = [int(t) for t in ts]
    if not isinstance(final_timestep, int) or isinstance(final_timestep, bool) or not -1 <= final_timestep < ts[-1]:
        raise ValueError(f"final_timestep must be an int in [-1, {ts[-1] - 1}] (below the chain's last timestep "
                         f"{ts[-1]}), got {final_timestep!r}")
    snapped = snap(ts, anchors, T)
    nxt = dict(zip(ts, ts[1:] + [final_timestep]))
    pieces = []
    head = tuple(t for t in ts if t > snapped[0])
    if head:
        pieces.append(Piece("head", head, snapped[0]))
    for i, a in enumerate(snapped):
        pieces.append(Piece("base", (a,), nxt[a]))
        target = snapped[i + 1] if i + 1 < len(snapped) else final_timestep
        if nxt[a] != target:
            pieces.append(Piece("jump", (nxt[a],), target))
    return pieces


def jumps(pieces) -> list[tuple[int, int]]:
    """The (t_a, t_b) shortcut jumps of a layout: the segments the shortcut must have been distilled on."""
    return [(p.steps[0], p.land) for p in pieces if p.kind == "jump"]


def routes(ts, anchors, T: int, mode: str = "stacked") -> dict[int, list[str]]:
    """T-LoRA: {chain timestep: the adapters active there} (shortft_tlora): segment i = anchor_i >= t > anchor_{i+1}
    (the head joins segment 0); "stacked": [seg_0..seg_i], "separate": [seg_i], "stacked_later": [seg_i..seg_{m-1}]."""
    if mode not in TLORA[1:]:
        raise ValueError(f"mode must be one of {TLORA[1:]}, got {mode!r}")
    return routes_snapped([int(t) for t in ts], snap(ts, anchors, T), mode)


def stage_anchors(step: int, n_anchors: int, progressive: int, order: str = "paper") -> int:
    """Progressive training: the index of the first anchor trained at optimiser step `step` (0 when off);
    stage k = min(step // progressive, n_anchors - 1) starts at anchor k ("paper") or n_anchors - 1 - k ("reverse")."""
    return stage_first_anchor(step, n_anchors, progressive, order)


def prepare(model: torch.nn.Module, cfg: ShortFTConfig, r: int = 4, target_modules=None, alpha=None, seed: int = 0):
    """Model-preparation hook: with cfg.tlora != "off", add one LoRA adapter per anchor (`add_tlora`) unless the
    model has them already; refuses a model that checkpoints its blocks internally. Returns the model."""
    if cfg.tlora == "off":
        return model
    refuse_block_checkpointing(model)
    have = {n.split("lora_A.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A." in n}
    want = {f"seg{i}" for i in range(len(cfg.anchors))}
    if not want <= have:
        add_tlora(model, len(cfg.anchors), r, target_modules, alpha, seed)
    return model


def check_shortcut(shortcut, pieces) -> None:
    """Refuse a missing shortcut, one with trainable parameters, or one not distilled for these jumps."""
    if shortcut is None:
        raise ValueError(f"shortcut: ShortFT needs a frozen shortcut model (got None); {HOW_TO_MAKE}")
    if not callable(shortcut):
        raise ValueError(f"shortcut must be a denoiser eps = shortcut(x_t, t, cond), got {type(shortcut)}")
    params = list(shortcut.parameters()) if isinstance(shortcut, torch.nn.Module) else []
    if any(p.requires_grad for p in params):
        raise ValueError("shortcut has parameters that require grad; ShortFT's shortcut is frozen (differentiated "
                         "with respect to its input only): call shortcut.requires_grad_(False)")
    segments = getattr(shortcut, "segments", None)
    if segments is None:
        raise ValueError("shortcut has no `segments` ({t_a: t_b} jumps it was distilled on); " + HOW_TO_MAKE)
    missing = [(a, b) for a, b in jumps(pieces) if segments.get(a) != b]
    if missing:
        raise ValueError(f"shortcut was distilled for the jumps {sorted(segments.items(), reverse=True)}, but this "
                         f"chain and anchors need {missing}; distil one for this chain (minialign.methods.shortcut) or "
                         "change anchors / n_steps / spacing / offset")


def short_chain(model, shortcut, schedule, pieces, x_T, eta: float = 0.0, cond=None, generator=None,
                graph: bool = True, checkpoint: bool = False):
    """x_0 of the training chain (`layout`), each piece one `sample` call chained through x.
    graph=False evaluates everything without graph (to measure the chain's reward)."""
    x = x_T
    for p in pieces:
        if p.kind == "head":
            x, _ = sample(model, schedule, x, p.steps, eta, plan_none(len(p.steps)), cond=cond, generator=generator,
                          final_timestep=p.land)
        elif p.kind == "base":
            x, _ = sample(model, schedule, x, p.steps, eta, [StepPlan(grad=graph, checkpoint=checkpoint)], cond=cond,
                          generator=generator, final_timestep=p.land)
        else:  # frozen shortcut: a graph to its input only (its parameters do not require grad)
            x, _ = sample(shortcut, schedule, x, p.steps, 0.0, [StepPlan(grad=graph, input_grad=True)], cond=cond,
                          final_timestep=p.land)
    return x


def make_loss(schedule, reward, cfg: ShortFTConfig, *, shape, cond=None, shortcut=None):
    """loss_fn(model, step, generator) -> (-mean reward on the short chain's x_0, stats).

    shortcut: the frozen few-step model (required; `minialign.methods.shortcut.load(NAME)`), a denoiser with a
    `segments` dict {t_a: t_b} covering this layout's jumps. With cfg.tlora the model must carry `add_tlora`'s
    adapters (`prepare`) and must not checkpoint its blocks internally; with cfg.progressive the layout at `step`
    starts at anchor f = `stage_anchors(step, m, P, cfg.progressive_order)` and only the adapters seg_f.. train.
    stats: reward (on the short training chain), graph_calls (network calls that keep a graph: trainable base
    steps + jumps), anchors_trained (how many anchors this step trains).
    """
    require_differentiable(reward, "ShortFT")
    ts = chain_timesteps(schedule, cfg)
    m = len(cfg.anchors)
    # stages[i]: the original chain without graph down to anchor i, shortcuts and trainable base steps from there on
    stages = [layout(ts, cfg.anchors[i:], schedule.T, cfg.final_timestep) for i in range(m)]
    check_shortcut(shortcut, stages[0])
    table = routes(ts, cfg.anchors, schedule.T, cfg.tlora) if cfg.tlora != "off" else None

    def loss_fn(model, step: int, generator: torch.Generator):
        first = stage_anchors(step, m, cfg.progressive, cfg.progressive_order)
        pieces = stages[first]
        x_T, c = draw_start(model, cfg.batch, shape, cond, generator)
        if table:
            refuse_block_checkpointing(model)
        net = TimestepLoRA(model, table, trainable=[f"seg{j}" for j in range(first, m)]) if table else model
        x0 = short_chain(net, shortcut, schedule, pieces, x_T, cfg.eta, c, generator, checkpoint=cfg.checkpoint)
        r = reward_with_graph(reward, x0, c, "ShortFT")
        calls = float(sum(p.kind in ("base", "jump") for p in pieces))
        return -r.mean(), {"reward": r.mean().item(), "graph_calls": calls, "anchors_trained": float(m - first)}

    return loss_fn


@torch.no_grad()
def inference(model, schedule, cfg: ShortFTConfig, x_T, cond=None, generator=None):
    """What a ShortFT-tuned model samples with: the ordinary full chain of the base model (no shortcut); with
    cfg.tlora every step runs with its segment's adapters (`routes`), as in training."""
    ts = chain_timesteps(schedule, cfg)
    net = TimestepLoRA(model, routes(ts, cfg.anchors, schedule.T, cfg.tlora)) if cfg.tlora != "off" else model
    return sample(net, schedule, x_T, ts, cfg.eta, plan_none(len(ts)), cond=cond, generator=generator,
                  final_timestep=cfg.final_timestep)[0]
