"""ShortFT's two refinements: timestep-aware LoRA (T-LoRA) and progressive training (Guo et al., ICCV 2025, Sec. 3).

Segments. With the anchors snapped onto the chain, t^(0) > ... > t^(m-1), segment i is anchor i's base step plus
the steps its shortcut jump skips: the chain timesteps t with t^(i) >= t > t^(i+1); the head before the first
anchor (t > t^(0)) joins segment 0 (our choice). Segment 0 is next to the noise, segment m-1 next to the data.

T-LoRA (`tlora`). One LoRA adapter per segment, peft named adapters "seg0".."seg{m-1}" (`add_tlora`). A call of
the base network at timestep t in segment i, in training and at inference alike, runs with W(t) = W_0 +
sum_{j in A(t)} (alpha / r) B_j A_j:

    "stacked"        A(t) = {seg_0, ..., seg_i}        the paper: LoRA i is stacked on LoRA i - 1 (the earlier ones)
    "separate"       A(t) = {seg_i}                    one LoRA per segment, nothing shared
    "stacked_later"  A(t) = {seg_i, ..., seg_{m-1}}    this project's first reading (each LoRA on the LATER ones);
                                                       kept as a named option, not the paper's

Progressive training (`progressive` = P optimiser steps per stage, `progressive_order`). Stage k =
min(step // P, m - 1); a stage whose first trained anchor is f runs the base chain WITHOUT graph down to anchor f
(segments before f: the original chain, with their adapters routed as above), then base steps and shortcut jumps
from anchor f on, and trains the adapters seg_f..seg_{m-1} only (every other adapter is frozen in that stage's
calls, even where it is routed):

    "paper"    f = k           stage 0 trains every LoRA through the full shortcut chain; the last stage trains
                               LoRA m-1 through one jump at most: the fewest shortcuts, the smallest gap to the
                               full inference chain, at the end of training
    "reverse"  f = m - 1 - k   this project's first reading: starts next to the data, ends with the full chain

Both refinements are reconstructions of the paper's description (no code was released); the stage length P is ours.

Gradient checkpointing inside the network (diffusers' `enable_gradient_checkpointing`) recomputes its blocks in
backward with whichever adapters were switched on last: wrong gradients and no error. `refuse_block_checkpointing`
refuses it. ShortFT's own `checkpoint=True` is safe: it recomputes the whole routed call (`TimestepLoRA.__call__`,
which switches the adapters again), so the routing happens inside the recomputed region.
"""
from __future__ import annotations

import torch

from minialign.lora import add_lora, linear_layer_names

TLORA = ("off", "stacked", "separate", "stacked_later")
ORDERS = ("paper", "reverse")


def segment_of(ts, snapped) -> dict[int, int]:
    """{chain timestep: its segment index}: the last anchor at or above t (the head joins segment 0)."""
    return {int(t): max([i for i, a in enumerate(snapped) if a >= t], default=0) for t in ts}


def routes_snapped(ts, snapped, mode: str = "stacked") -> dict[int, list[str]]:
    """T-LoRA table {chain timestep: active adapters} for anchors already snapped onto the chain (module docstring)."""
    if mode not in TLORA[1:]:
        raise ValueError(f"mode must be one of {TLORA[1:]}, got {mode!r}")
    m = len(snapped)
    span = {"stacked": lambda i: range(0, i + 1), "separate": lambda i: range(i, i + 1),
            "stacked_later": lambda i: range(i, m)}[mode]
    return {t: [f"seg{j}" for j in span(i)] for t, i in segment_of(ts, snapped).items()}


def stage_first_anchor(step: int, n_anchors: int, progressive: int, order: str = "paper") -> int:
    """Progressive training: the index f of the first anchor trained at optimiser step `step` (0 when off).
    Stage k = min(step // progressive, n_anchors - 1); "paper": f = k, "reverse": f = n_anchors - 1 - k."""
    if order not in ORDERS:
        raise ValueError(f"progressive_order must be one of {ORDERS}, got {order!r}")
    if progressive == 0:
        return 0
    k = min(step // progressive, n_anchors - 1)
    return k if order == "paper" else n_anchors - 1 - k


def add_tlora(model: torch.nn.Module, n_segments: int, r: int = 4, target_modules=None, alpha=None, seed: int = 0):
    """Inject n_segments LoRA adapters "seg0".. (rank r each, identity at start: B = 0) into `model` in place with
    the one injector `minialign.lora.add_lora` (adapter i drawn under seed + i); freeze everything else; returns the
    LoRA parameters. target_modules as in add_lora (default: every Linear layer)."""
    if not isinstance(n_segments, int) or isinstance(n_segments, bool) or n_segments < 1:
        raise ValueError(f"n_segments must be an int >= 1 (one adapter per anchor), got {n_segments!r}")
    if target_modules is None:  # once, before the first adapter adds Linear layers of its own
        target_modules = linear_layer_names(model)
    params = []
    for i in range(n_segments):
        params = add_lora(model, r, target_modules, alpha, seed + i, adapter_name=f"seg{i}")
    return params


def block_checkpointing(model: torch.nn.Module) -> list[str]:
    """Names of submodules that checkpoint internally (diffusers/transformers `gradient_checkpointing` = True)."""
    return [n or type(model).__name__ for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]


def refuse_block_checkpointing(model: torch.nn.Module) -> None:
    on = block_checkpointing(model)
    if on:
        raise ValueError(f"model: T-LoRA cannot run with gradient checkpointing inside the network ({on[:3]}"
                         f"{' ...' if len(on) > 3 else ''}): its blocks are recomputed in backward with whichever "
                         "adapters were switched on last, which gives wrong gradients; turn it off "
                         "(unet.disable_gradient_checkpointing()) and use ShortFTConfig(checkpoint=True), which "
                         "recomputes each routed call whole")


class TimestepLoRA:
    """A denoiser that calls `model` with the adapters of t's segment active (`table`); same signature.

    trainable: adapter names that may receive a gradient (None: all); the others are frozen during the call."""

    def __init__(self, model, table: dict, trainable=None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model, self.table = model, table
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        need = sorted({a for names in table.values() for a in names})
        have = set(self.layers[0].lora_A) if self.layers and hasattr(self.layers[0], "lora_A") else set()
        if not set(need) <= have:
            raise ValueError(f"model: T-LoRA needs the LoRA adapters {need}, the model has {sorted(have)}; "
                             f"call shortft.add_tlora(model, {len(need) if need else 'n'}) first")
        self.lora = [(p, _adapter(n)) for n, p in model.named_parameters() if "lora_" in n]
        self.trainable = None if trainable is None else set(trainable)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x_t, t, cond=None):
        t0 = int(t.flatten()[0])
        if not bool((t == t0).all()) or t0 not in self.table:
            raise ValueError(f"t: T-LoRA routes one chain timestep per call (one of {sorted(self.table)}), got {t}")
        keep = [p.requires_grad for p, _ in self.lora]  # peft's set_adapter also toggles requires_grad: restore it
        for layer in self.layers:
            layer.set_adapter(self.table[t0])
        for (p, name), g in zip(self.lora, keep):
            p.requires_grad_(g and (self.trainable is None or name in self.trainable))
        try:
            return self.model(x_t, t, cond)
        finally:
            for (p, _), g in zip(self.lora, keep):
                p.requires_grad_(g)


def _adapter(param_name: str) -> str:
    """The adapter of a peft LoRA parameter: "...lora_A.seg2.weight" -> "seg2"."""
    parts = param_name.split(".")
    return next(parts[i + 1] for i, s in enumerate(parts) if s.startswith("lora_"))
