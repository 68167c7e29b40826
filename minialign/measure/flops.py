"""Compute counted, not timed: what every training step cost, and the model at each budget of a grid.

    ledger = Ledger(model, axis="flops", budgets=[1e9, 2e9, 4e9], evaluate=lambda: score(model))
    train(model, ledger.wrap(loss_fn), TrainConfig(steps=10**6, log_every=1, ...),
          accelerator=ledger.accelerator(), callback=ledger.callback)
    ledger.points   # one evaluation per budget: {"budget", "step", "flops", "calls", "seconds", **evaluate()}

What is counted, per train() step:
    flops    torch.utils.flop_counter.FlopCounterMode around the method's loss_fn (its forward, and any backward a
             method runs inside its loss, as RLR's chunked zeroth-order part does) and around train()'s
             `accelerator.backward(loss)` (so checkpoint recomputation, which happens inside backward, is counted).
             FlopCounterMode counts matrix products, convolutions and attention (2 FLOPs per multiply-add);
             elementwise work (the sampler's a_t x_t + b_t eps, the optimiser) counts 0.
    calls    rows through the model's forward while the loss_fn runs (sample-evaluations of the denoiser; a
             checkpoint's recomputation in backward is not a new evaluation)
    steps    1 per optimiser step
    seconds  this process's clock over the loss_fn and the backward (a reported second axis, never a budget)

Each step is counted as it happens, so a method whose step cost is random (AlignProp's K, ReFL's step, DDPO's
sample-then-update cycle) is charged for what that step did; the counts depend on (method, config, seed) only, not
on the machine or its load. Cost: FlopCounterMode dispatches every tensor op through Python; measured on the digits
UNet (20 steps, batch 32, 1 thread) it takes a step 2.1-2.4x the uncounted time (DRaFT-1 0.13 -> 0.28 s, full
backprop 0.36 -> 0.79-0.88 s).

Cost classes (the cheap exact count). A step's FLOPs and calls depend only on its cost class, a key the method
reads off the step's own stats (`cost_class(stats)`, the registry's Method.cost_class: AlignProp its K, ReFL its t,
DDPO collect vs update, RLR its j). With cost_class given, the first step of each class is counted and later steps
of that class are charged the cached (flops, calls). The class is known only after the loss_fn returned, so a step
runs uncounted first; when its class is new, the loss_fn's inputs are put back (the torch, numpy and python RNGs,
the train() generator and the loss_fn's own state_dict(), which train() checkpoints for the same reason) and it runs
again under the counter: the same computation, whose loss train() then differentiates (counted too). The first step
is counted directly. Measured (digits UNet, 20 steps, batch 32, 16 steps, 1 thread, CPU seconds per step, every step
counted -> cost classes): DRaFT-1 0.376 -> 0.160, full backprop 0.998 -> 0.494, DDPO 1.08 -> 0.53 (2 classes), RLR
1.31 -> 0.62; the same FLOPs to the digit. AlignProp (K ~ U{1..20}: 14 of its first 16 steps open a new class, each
paying one more uncounted forward) 0.66 -> 0.71: a many-class method gains only once its classes are seen (at most
20 counted steps per run). cost_class=None counts every step (for a method whose cost cannot be keyed, or whose state
lives outside its state_dict, as SFT-PG's buffer lives in the model).

The model at budget b is the one after the last step whose cumulative cost (on `axis`) is <= b. A step's cost is
known only after it ran, so the parameters before each step are kept (a copy of the trainable ones) and the
evaluation at b uses them when that step took the total past b; a step that lands exactly on b is evaluated
after it. Training stops (callback returns True) once every budget is evaluated.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from minialign.train import _rng_state, _set_rng_state  # the RNGs train() checkpoints: a re-run needs the same

AXES = ("flops", "calls", "steps")


def log_grid(top: float, points: int = 6, span: float = 32.0) -> list[float]:
    """`points` budgets spaced evenly in log from top / span to top (ascending)."""
    if not top > 0 or points < 1 or not span >= 1:
        raise ValueError(f"need top > 0, points >= 1 and span >= 1, got top={top}, points={points}, span={span}")
    if points == 1:
        return [float(top)]
    return [float(top) * span ** (i / (points - 1) - 1) for i in range(points)]


class Ledger:
    """Counts each train() step of one run (see the module docstring) and evaluates the model at `budgets`.

    evaluate() -> dict of numbers for the model as it is (called in eval mode under no_grad by the caller's code);
    params: what the step changes (default: the model's parameters with requires_grad).
    cost_class: cost_class(stats) -> a hashable key, or None: count every step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, axis: str, budgets, evaluate: Callable[[], dict], params=None,
                 clock: Callable[[], float] = time.process_time, cost_class: Optional[Callable[[dict], object]] = None):
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        self.budgets = sorted(float(b) for b in budgets)
        if not self.budgets or self.budgets[0] <= 0:
            raise ValueError(f"budgets must be a non-empty list of numbers > 0, got {budgets}")
        self.axis, self.evaluate, self.clock = axis, evaluate, clock
        self.params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
        self.total = {"step": 0, "flops": 0, "calls": 0, "seconds": 0.0}
        self.before, self.snapshot = dict(self.total), None
        self.pending, self.points, self.costs = list(self.budgets), [], []
        self.diverged: Optional[str] = None
        self.capped = False
        self._rows_on = False
        self.cost_class, self.cache, self.counted = cost_class, {}, 0  # cache: class -> {"flops", "calls"}
        self._key, self._count = None, True
        self._handle = model.register_forward_hook(self._count_rows)

    def _count_rows(self, module, args, out):
        if self._rows_on:
            self.total["calls"] += int(args[0].shape[0])

    @contextmanager
    def _counting(self, rows: bool, count: bool = True):
        t0, self._rows_on = self.clock(), rows and count
        mode = FlopCounterMode(display=False) if count else None
        try:
            if mode is None:
                yield
            else:
                with mode:
                    yield
        finally:
            self._rows_on = False
            self.total["flops"] += int(mode.get_total_flops()) if mode is not None else 0
            self.total["seconds"] += self.clock() - t0

    def _classify(self, stats: dict):
        key = self.cost_class(stats)
        try:
            hash(key)
        except TypeError:
            raise ValueError(f"cost_class must return a hashable key, got {key!r}") from None
        return key

    def wrap(self, loss_fn):
        """loss_fn, counted; each call starts a step (the trainable parameters before it are kept)."""
        def counted(model, step, generator):
            self.before = dict(self.total)
            self.snapshot = [p.detach().clone() for p in self.params]
            self._count = self.cost_class is None or not self.cache
            if self._count:
                with self._counting(rows=True):
                    out = loss_fn(model, step, generator)
                self._key = self._classify(out[1]) if self.cost_class is not None else None
                return out
            inputs = _inputs(loss_fn, generator)
            with self._counting(rows=False, count=False):
                out = loss_fn(model, step, generator)
            self._key = self._classify(out[1])
            self._count = self._key not in self.cache
            if self._count:  # a new class: the same step again from the same inputs, counted
                del out
                _put_back(loss_fn, generator, inputs)
                with self._counting(rows=True):
                    out = loss_fn(model, step, generator)
                if self._classify(out[1]) != self._key:
                    raise RuntimeError(f"step {step}: re-run from the same inputs gave cost class "
                                       f"{self._classify(out[1])!r}, not {self._key!r} (state outside state_dict?)")
            return out
        for attr in {"optimizer", "state_dict", "load_state_dict"} & set(dir(loss_fn)):
            setattr(counted, attr, getattr(loss_fn, attr))  # a method's own networks and state (SFT-PG)
        return counted

    def accelerator(self, acc=None):
        """An accelerate.Accelerator whose backward() is counted (train() calls acc.backward(loss))."""
        if acc is None:
            from accelerate import Accelerator
            acc = Accelerator(cpu=not torch.cuda.is_available())
        return _CountedAccelerator(acc, self)

    def _value(self, totals) -> float:
        return totals["step"] if self.axis == "steps" else totals[self.axis]

    def _point(self, budget, totals, state=None):
        if state is not None:  # evaluate the kept parameters, then put the current ones back
            now = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, s in zip(self.params, state):
                    p.copy_(s)
        try:
            out = self.evaluate()
        finally:
            if state is not None:
                with torch.no_grad():
                    for p, s in zip(self.params, now):
                        p.copy_(s)
        self.points.append({"budget": budget, **{k: totals[k] for k in ("step", "flops", "calls", "seconds")}, **out})

    def callback(self, step: int, row: dict) -> bool:
        """train()'s callback (log_every=1): settle the budgets this step crossed; True once none is left."""
        self.total["step"] = step
        if self.cost_class is not None and self._count:
            self.cache[self._key] = {k: self.total[k] - self.before[k] for k in ("flops", "calls")}
        elif self.cost_class is not None:
            for k, v in self.cache[self._key].items():
                self.total[k] += v
        self.counted += bool(self._count)
        cost = self._value(self.total) - self._value(self.before)
        if not cost > 0:
            raise ValueError(f"step {step} cost {cost} on axis {self.axis!r}: a budget needs every step to cost > 0")
        self.costs.append({k: self.total[k] - self.before[k] for k in ("flops", "calls")})
        value = self._value(self.total)
        while self.pending and self.pending[0] < value:
            self._point(self.pending.pop(0), self.before, self.snapshot)
        while self.pending and self.pending[0] == value:
            self._point(self.pending.pop(0), self.total)
        return not self.pending

    def fail(self, message: str) -> None:
        """The run stopped (a non-finite loss or reward): budgets not yet reached get NaN points, flagged."""
        self.diverged = message
        keys = [k for k in (self.points[0] if self.points else {}) if k not in ("budget",) + tuple(self.total)]
        for b in self.pending:
            self.points.append({"budget": b, **{k: self.before[k] for k in ("step", "flops", "calls", "seconds")},
                                **{k: float("nan") for k in keys or ("reward", "drift")}})
        self.pending = []

    def finish(self) -> None:
        """After training: budgets the step cap never reached are evaluated on the final model (flagged)."""
        if self.pending:
            self.capped = True
            while self.pending:
                self._point(self.pending.pop(0), self.total)
        self._handle.remove()


class _CountedAccelerator:
    """Delegates to an accelerate.Accelerator; backward() runs under the ledger's FLOP counter."""

    def __init__(self, acc, ledger: Ledger):
        self._acc, self._ledger = acc, ledger

    def __getattr__(self, name):
        return getattr(self._acc, name)

    def backward(self, loss, **kwargs):
        with self._ledger._counting(rows=False, count=self._ledger._count):
            self._acc.backward(loss, **kwargs)


def _inputs(loss_fn, generator) -> dict:
    """What a loss_fn call depends on besides the model: the RNGs (train()'s checkpoint set, and CUDA's) and its own
    state_dict() (copied)."""
    state = loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None
    return {"rng": _rng_state(generator), "state": copy.deepcopy(state),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _put_back(loss_fn, generator, inputs: dict) -> None:
    _set_rng_state(inputs["rng"], generator)
    if inputs["cuda"] is not None:
        torch.cuda.set_rng_state_all(inputs["cuda"])
    if inputs["state"] is not None:
        loss_fn.load_state_dict(copy.deepcopy(inputs["state"]))
