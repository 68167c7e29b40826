"""The one training loop every method uses.

A method supplies `loss_fn(model, step, generator) -> (loss, stats)`; this file does the rest:
optimiser, per-group gradient clipping, accelerate (so `accelerate launch --num_processes N` works:
gradients are averaged across processes, so parameters stay identical), a tqdm bar, the batch
arithmetic printed once, a metrics history (CSV + JSON), checkpoint/resume that is bit-exact on CPU,
and a hard stop with the step number on NaN/inf in the loss, any `reward*` statistic or a param group's
gradient norm (checked before the optimiser step, clipping or not: a norm that overflows would otherwise clip
the gradients to zeros, and one inf entry would make every parameter NaN).

    history = train(model, loss_fn, TrainConfig(steps=200, lr=1e-4, batch=64))
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from minialign.lora import add_lora  # noqa: F401  (re-exported: minialign.train.add_lora)

LossFn = Callable[[torch.nn.Module, int, torch.Generator], "tuple[torch.Tensor, dict]"]


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-4
    seed: int = 0
    batch: int = 0  # samples per step per process (informational: printed in the batch arithmetic)
    grad_clip: Optional[float] = 1.0  # max grad norm per optimizer param group; a group's "max_norm" overrides
    weight_decay: float = 0.0
    log_every: int = 1
    ckpt_every: int = 0  # 0: only at the end (when out_dir is set)
    out_dir: Optional[str] = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0, got {self.ckpt_every}")


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _check_finite(step: int, loss: torch.Tensor, stats: dict):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: stopping (nothing is zeroed or skipped)")
    for k, v in stats.items():
        if k.startswith("reward") and not math.isfinite(float(v)):
            raise FloatingPointError(f"{k} is {v} at step {step}: stopping (nothing is zeroed or skipped)")


def _clip(optimizer: torch.optim.Optimizer, default: Optional[float], step: int) -> float:
    """Clip each param group to its own max norm (a group's "max_norm", else `default`; None or 0: no clipping);
    returns the largest pre-clip group norm. A non-finite group norm stops training before the optimiser step:
    clipping by it would turn overflowing gradients into zeros (max_norm / inf) or every entry into NaN."""
    worst = 0.0
    for i, group in enumerate(optimizer.param_groups):
        max_norm = group.get("max_norm", default)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm.item()} (param group {i}) at step {step}: stopping "
                                     f"before the optimiser step (nothing is zeroed or skipped)")
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        worst = max(worst, float(norm))
    return worst


def _build_optimizer(model, loss_fn, cfg: TrainConfig, params, optimizer):
    """The given optimiser; else the loss_fn's own (a method that trains networks of its own, SFT-PG's critic);
    else AdamW(lr, weight_decay) over `params` (default: the model's parameters that require grad)."""
    if optimizer is None and hasattr(loss_fn, "optimizer"):
        optimizer = loss_fn.optimizer(model)
    if optimizer is not None:
        return optimizer
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("params: nothing to train (no parameter requires grad)")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _restore(path: Path, model, loss_fn, optimizer, generator, device) -> tuple[int, list[dict]]:
    """Load checkpoint.pt into everything that _save wrote; returns (steps done, history)."""
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    if "loss_fn" in state:
        loss_fn.load_state_dict(state["loss_fn"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], generator)
    return state["step"], state["history"]


def _save(path: Path, model, loss_fn, optimizer, generator, step, history):
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(generator),
             "step": step, "history": history}
    if hasattr(loss_fn, "state_dict"):  # a method's own state (networks, buffers) travels with the checkpoint
        state["loss_fn"] = loss_fn.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)


def _write_history(out: Path, history: list[dict]):
    (out / "history.json").write_text(json.dumps(history, indent=1))
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _checkpoint(out: Path, cfg: TrainConfig, model, loss_fn, optimizer, generator, step: int, history: list[dict]):
    _save(out / "checkpoint.pt", model, loss_fn, optimizer, generator, step, history)
    _write_history(out, history)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))


def _one_step(model, loss_fn, optimizer, acc, step: int, generator, grad_clip) -> tuple[torch.Tensor, dict, float]:
    """loss_fn, finiteness checks, backward, the cross-process gradient mean, clipping, the optimiser step."""
    model.train()
    loss, stats = loss_fn(model, step, generator)
    _check_finite(step, loss, stats)
    # set_to_none matters: a parameter without a gradient this step (e.g. SFT-PG's generator on a critic
    # step) is skipped by Adam; zeroed gradients would let momentum move it anyway
    optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    if acc.num_processes > 1:  # average gradients by hand: works for any module layout, no DDP wrapper
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
    grad_norm = _clip(optimizer, grad_clip, step)
    optimizer.step()
    return loss, stats, grad_norm


def _log(model, step: int, loss, stats: dict, grad_norm: float, seconds: float, callback, history, bar) -> bool:
    """Append the history row of `step` (1-based); returns True when the callback asks to stop."""
    row = {"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm,
           **{k: float(v) for k, v in stats.items()}, "seconds": seconds}
    stop = False
    if callback is not None:
        model.eval()
        stop = callback(step, row) is True
    history.append(row)
    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "reward")})
    return stop


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    params=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    accelerator=None,
    callback: Optional[Callable[[int, dict], None]] = None,
) -> list[dict]:
    """Run cfg.steps optimiser steps of loss_fn; returns the history (one dict per logged step).

    params:    what to train (default: the model's parameters with requires_grad); ignored with `optimizer`
    optimizer: your own (e.g. param groups with different lrs and per-group "max_norm"); without it, a loss_fn
               that has `optimizer(model)` (a method that trains networks of its own) supplies it
    callback:  callback(step, row) after each logged step (evaluate during training); may add keys to row;
               returning True stops training after this step (an early stop: "the target is reached")
    With out_dir set, writes history.csv/json and checkpoint.pt there, and resumes from checkpoint.pt. A loss_fn
    with `state_dict()` / `load_state_dict()` (SFT-PG's networks, DDPO's PPO cycle and KL reference, RLR's j
    statistics) has that state saved and restored with the model's (tests/test_resume.py: every method).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    optimizer = _build_optimizer(model, loss_fn, cfg, params, optimizer)
    model.to(acc.device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + acc.process_index)
    torch.manual_seed(cfg.seed * 1000 + acc.process_index)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    start, history = 0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and (out / "checkpoint.pt").exists():
            start, history = _restore(out / "checkpoint.pt", model, loss_fn, optimizer, generator, acc.device)
            acc.print(f"resumed from {out / 'checkpoint.pt'} at step {start}")
    if cfg.progress:  # the batch arithmetic, once per run (runs driven by the arena or a lab keep quiet)
        n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        batch = (f": {cfg.batch} samples/step/process x {acc.num_processes} process(es) = effective batch "
                 f"{cfg.batch * acc.num_processes}" if cfg.batch else "")
        acc.print(f"training {n_params:,} parameters for {cfg.steps} steps{batch}; {cfg.steps - start} updates to go")
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (cfg.progress and acc.is_local_main_process))
    for step in bar:
        loss, stats, grad_norm = _one_step(model, loss_fn, optimizer, acc, step, generator, cfg.grad_clip)
        done = step + 1
        stop = False
        if done % cfg.log_every == 0 or done == cfg.steps:
            stop = _log(model, done, loss, stats, grad_norm, time.perf_counter() - t0, callback, history, bar)
        if out is not None and acc.is_main_process and (
                (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or stop):
            _checkpoint(out, cfg, model, loss_fn, optimizer, generator, done, history)
        if stop:
            if cfg.progress:
                acc.print(f"stopped at step {done} by the callback")
            break
    model.eval()
    return history
