"""Each method's row of the gradient-plan figure (minialign.kit.figures), built from its own config and plan.

A row is `row(cfg, example) -> (cells, drawn, note)` with one cell per sampling step (x_T first): a
sampler `StepPlan` where the method samples through one (the figure reads what the step contributes from it), or
a figure kind where it does not ("likelihood", "likelihood+graph", "input only", "no graph", "not run").
`example` is the step shown for a method that draws a step at random (None: the middle of the allowed range;
clamped into that range), and `drawn` the cell of that example draw (None for a method that draws nothing). The registry (methods/__init__.py) names each method's row; this module, like the
registry, may import every method file.
"""
from __future__ import annotations

import math
from typing import Optional

from minialign.methods import sdo, shortft
from minialign.sampling import plan_full, plan_one_step, plan_truncated
from minialign.schedule import timesteps


def _pick(example: Optional[int], lo: int, hi: int) -> int:
    """The example step: `example` clamped into [lo, hi], or the middle of that range."""
    return (lo + hi) // 2 if example is None else min(max(int(example), lo), hi)


def full_row(cfg, example=None):
    """Full backprop: every step keeps its graph (checkpointed when cfg.checkpoint)."""
    return plan_full(cfg.n_steps, cfg.checkpoint), None, None


def truncated_row(cfg, example=None):
    """DRaFT-K / AlignProp / DRaFT-LV: the last K steps with graph (K at one example draw when random)."""
    n = cfg.n_steps
    if cfg.variant == "draft_lv":
        return plan_truncated(n, 1, checkpoint=cfg.checkpoint), n - 1, f"x0 re-noised and denoised {cfg.lv_samples} times"
    k = n - _pick(example, n - cfg.k, n - 1) if cfg.random_k else cfg.k
    plan = plan_truncated(n, k, keep_path=cfg.variant == "alignprop", checkpoint=cfg.checkpoint)
    return plan, (n - k if cfg.random_k else None), ("K random" if cfg.random_k else None)


def refl_row(cfg, example=None):
    """ReFL: no graph down to a random late step j, one graph call there, nothing after (x0_hat is scored)."""
    n = cfg.n_steps
    late = max(1, math.ceil(cfg.late_fraction * n))
    j = _pick(example, n - late, n - 1)
    return ["no graph"] * j + ["graph"] + ["not run"] * (n - j - 1), j, "reward on x0_hat at a random late step"


def sdo_row(cfg, example=None):
    """SDO: one retained call k, the linear path a_t x_t kept after it."""
    n = cfg.n_steps
    if cfg.retained == "random":
        k = _pick(example, 0, n - 1)
        return plan_one_step(n, k), k, "k random"
    return plan_one_step(n, sdo.retained_index(cfg.retained, n)), None, None


def rlr_row(cfg, example=None):
    """RLR: FO on the last step; HO over steps j..j+h-1 with the likelihood ratio at j+h-1; inherent-noise ZO (a
    likelihood ratio) at every other step. The released variant: FO plus single-step PG terms at random steps."""
    n = cfg.n_steps
    if cfg.variant == "released":
        j = _pick(example, 0, n - 1 - cfg.released_terms)
        cells = ["no graph"] * n
        cells[j:j + cfg.released_terms] = ["likelihood"] * cfg.released_terms
        cells[-1] = "graph"
        return cells, j, f"FO last + {cfg.released_terms} single-step PG terms at random steps"
    cells = ["likelihood" if cfg.zo == "inherent" else "no graph"] * n
    note, j = "FO last" + (", ZO elsewhere" if cfg.zo == "inherent" else ""), None
    if cfg.h > 0:
        j = _pick(example, 0, n - 1 - cfg.h)
        cells[j:j + cfg.h] = ["graph"] * cfg.h
        cells[j + cfg.h - 1] = "likelihood+graph"
        note = f"j random; FO last, HO j..j+{cfg.h}" + (", ZO elsewhere" if cfg.zo == "inherent" else "")
    cells[-1] = "graph"
    if cfg.zo == "perturb":
        note += ", ZO by parameter perturbation"
    return cells, j, note


def shortft_row(cfg, example=None):
    """ShortFT: shortft.layout on a 1000-step schedule: the head without graph, each trainable base step with
    graph, each frozen shortcut jump differentiated through its input over the chain steps it skips."""
    ts = timesteps(1000, cfg.n_steps, cfg.spacing, cfg.offset)
    pieces = shortft.layout(ts, cfg.anchors, 1000)
    cells = []
    for p in pieces:
        if p.kind == "head":
            cells += ["no graph"] * len(p.steps)
        elif p.kind == "base":
            cells.append("checkpointed" if cfg.checkpoint else "graph")
        else:
            cells += ["input only"] * sum(p.land < t <= p.steps[0] for t in ts)
    bases = sum(p.kind == "base" for p in pieces)
    jumps = len(shortft.jumps(pieces))
    note = f"{bases} trainable steps, {jumps} frozen jumps" + ("" if cfg.tlora == "off" else f", T-LoRA {cfg.tlora}")
    return cells, None, note


def likelihood_row(cfg, example=None):
    """A policy gradient on the denoising MDP: every step's log-probability in a likelihood-ratio term."""
    return ["likelihood"] * cfg.n_steps, None, None


def critic_row(cfg, example=None):
    """SFT-PG: a policy gradient at every step against a learned critic of the data."""
    return ["likelihood"] * cfg.n_steps, None, "reward = a learned critic"
