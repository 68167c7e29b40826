"""The arena: registered methods on a task at equal compute, over seeds: reward-vs-compute curves and one rule.

    python -m minialign.arena --task bias --flops 4e10 --seeds 0 1 2 3 4
    result = arena.run(["ddpo", "full_bp"], "digit3_tempered", flops=2e11, seeds=range(5))

Protocol.
- Budget, one of: `flops` (training FLOPs, counted step by step with FlopCounterMode, forward and backward with
  checkpoint recomputation: measure/flops.py; THE budget), `calls` (rows through the network, counted per step),
  `steps` ({method: n}) or `seconds` (legacy: CPU seconds, turned into step counts by timing each method's step on a
  throwaway copy; replay.py repeats those counts). FLOP and call budgets need no timing and no replay file: the steps
  they allow follow from (method, config, seed), the same on an idle and on a loaded machine.
- Curves: each (method, seed) trains once (train(), AdamW) up to the largest budget and is evaluated at `evals`
  budgets, on a log grid from top / span to top (flops, calls) or at evenly spaced step counts (steps, seconds). The
  model at budget b is the one after the last step whose cumulative cost is <= b. Wall time is recorded as a
  second axis ("seconds"), never a budget.
- One evaluation chain per task (Task.eval_chain: its steps and spacing, eta = task.eval_eta, fixed noise and
  conditioning) for every method, whatever chain it trains on: reward, drift = the sliced W2 to the pretrained
  model's samples from the same noise, and the task's quality scores the reward does not see (digits: "gold" and
  "feature_mmd", measure/tasks.digit_quality), at every budget.
- Settings, recorded per method (result["settings"]): the learning rate (task.lr or `lr`, or picked from `lr_grid` on
  `tuning_seed`, which must not be a reported seed: each value trains once to the top budget and the best mean
  reward over the budget grid wins; what the tuning cost is in result["tuning"]) and gradient clipping (`grad_clip`:
  a max norm, None = none, or {method: either}; default 1.0). kl_coef > 0 adds kl_coef x the KL of the tuned to the
  pretrained steps on the evaluation chain's states to every method's loss (measure/kl.py; its FLOPs are counted).
- Statistics (measure/stats.py): at each budget the ranking by mean reward, and for each pair of methods the Welch 95%
  interval of the difference over seeds; "a beats b" only when it excludes 0. result["pairs"] gives the budget ranges
  over which each is ahead. A seed is diverged when its training stopped on a non-finite loss or reward, or any
  evaluation is non-finite or drifts beyond task.drift_limit: flagged, counted and left out of every mean.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from minialign import methods as registry
from minialign.measure import replay
from minialign.measure.bench import interleaved_times
from minialign.measure.arena_report import (_diverged, analyse, distinguishable, fingerprint, format_table, plot,  # noqa: F401
                                            plot_kl, summarise, time_to, to_metrics, without_wall_time)
from minialign.measure.flops import Ledger, log_grid
from minialign.measure.kl import KLRegularised
from minialign.measure.tasks import get as get_task
from minialign.metrics import sliced_wasserstein
from minialign.sampling import sample
from minialign.schedule import timesteps
from minialign.train import TrainConfig, train

BUDGETS = ("flops", "calls", "steps", "seconds")


def _check(method_names, task, budgets, seeds):
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one budget: flops (training FLOPs), calls (network evaluations), steps (per "
                         "method) or seconds (CPU time on the CPU, wall time on CUDA)")
    for k in ("flops", "calls", "seconds"):
        if k in given and not given[k] > 0:
            raise ValueError(f"{k} must be > 0, got {given[k]}")
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    reward = task.reward()
    for name in method_names:
        m = registry.get(name)  # unknown names raise here, before any training
        if m.needs_data:
            raise ValueError(f"{name} matches a data distribution (it has no reward to maximise): not an arena method")
        if m.grad_reward and not getattr(reward, "differentiable", True):
            raise ValueError(f"{name} backpropagates through the reward, but task {task.name!r}'s reward "
                             f"{reward.name!r} is not differentiable; use a policy-gradient method (ddpo)")
    steps = given.get("steps")
    if steps is not None:
        missing = [n for n in method_names if n not in steps]
        bad = {n: s for n, s in steps.items() if not (isinstance(s, int) and s >= 1)}
        if missing or bad:
            raise ValueError(f"steps must give a positive int per method; missing {missing}, invalid {bad}")
    return reward


def _setup(task, name, model, schedule, reward, overrides, batch):
    """(loss_fn, cfg) through the registry (methods.setup): the task's chain, the method's own chain overrides and
    extras for this kind of model, then the caller's overrides; prepares `model` (e.g. T-LoRA's adapters) before
    any optimiser is built from its trainable parameters."""
    from minialign.measure.tasks import SDTask

    chain = dict(n_steps=task.n_steps, batch=batch or task.batch, **task.chain)
    kind = "sd" if isinstance(task, SDTask) else "toy"
    return registry.setup(name, schedule, reward, shape=task.shape, cond=task.train_cond(), kind=kind,
                          context={"model_name": task.model}, model=model,
                          **{**chain, **(overrides or {}).get(name, {})})


def probe(method_names, task, *, overrides=None, batch=None, lr=None, rounds: int = 4, device="cpu") -> dict:
    """{method: seconds per step} on throwaway copies of the model (for a `seconds` budget only): after one warm-up
    step each, `rounds` interleaved rounds (every method one step per round, the order rotated), median time."""
    task = get_task(task)
    base, schedule = task.load(device)
    reward = task.reward()
    live = {}
    for name in method_names:
        model = copy.deepcopy(base).requires_grad_(True).train()
        loss_fn, _ = _setup(task, name, model, schedule, reward, overrides, batch)
        opt = loss_fn.optimizer(model) if hasattr(loss_fn, "optimizer") else torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr or task.lr, weight_decay=0.0)
        live[name] = dict(model=model, fn=loss_fn, opt=opt, g=torch.Generator().manual_seed(12345), step=0)

    def one_step(v):
        loss, _ = v["fn"](v["model"], v["step"], v["g"])
        v["opt"].zero_grad(set_to_none=True)
        loss.backward()
        v["opt"].step()
        v["step"] += 1

    for v in live.values():  # warm-up, not counted
        one_step(v)
    times = interleaved_times({n: (lambda seed, v=v: one_step(v)) for n, v in live.items()}, rounds, str(device),
                              _clock(device))
    return {name: statistics.median(times[name]) for name in live}


def _clock(device):
    """CPU seconds of this process on the CPU (immune to other processes), wall seconds on CUDA."""
    return time.perf_counter if str(device).startswith("cuda") else time.process_time


def _train(task, name, base, schedule, reward, ctx, *, seed, lr, clip, axis, budgets):
    """One (method, seed) run: train to the top budget, evaluated at every budget (measure/flops.Ledger)."""
    model = copy.deepcopy(base).requires_grad_(True)
    loss_fn, cfg = _setup(task, name, model, schedule, reward, ctx["overrides"], ctx["batch"])
    if ctx["kl_coef"]:  # loss + coef * KL to the pretrained steps on the evaluation chain's states (measure/kl.py)
        loss_fn = KLRegularised(loss_fn, base, schedule, ctx["ts"], ctx["kl_coef"], shape=task.shape, batch=cfg.batch,
                                cond=task.eval_cond(256), final_timestep=task.eval_chain()["final_timestep"])
    ledger = Ledger(model, axis, budgets, lambda: ctx["evaluate"](model), clock=_clock(ctx["device"]),
                    cost_class=registry.get(name).cost_class)
    try:
        train(model, ledger.wrap(loss_fn), TrainConfig(steps=ctx["max_steps"], lr=lr, seed=seed, batch=cfg.batch,
              grad_clip=clip, log_every=1, progress=False), callback=ledger.callback, accelerator=ledger.accelerator())
    except FloatingPointError as e:  # a non-finite loss or reward: the seed diverged (reported apart)
        ledger.fail(str(e))
    ledger.finish()
    curve = {k: [0.0 if k == "seconds" else 0] + [p[k] for p in ledger.points]
             for k in ("budget", "step", "flops", "calls", "seconds")}
    curve.update({k: [v] + [p.get(k, math.nan) for p in ledger.points] for k, v in ctx["at_start"].items()})  # reward, drift, quality
    return {"method": name, "seed": seed, "eta": cfg.eta, "lr": lr, "grad_clip": clip, "pretrained": ctx["pretrained"],
            "steps": ledger.total["step"], "spent": {k: ledger.total[k] for k in ("flops", "calls", "step")},
            "diverged": ledger.diverged, "capped": ledger.capped, "curve": curve}, model


def run(method_names, task, *, flops=None, calls=None, steps=None, seconds=None, seeds=(0,), evals: int = 6,
        span: float = 32.0, overrides=None, batch=None, lr=None, lr_grid=None, tuning_seed=None, grad_clip=1.0,
        drift_limit=None, max_steps: int = 10**6, device="cpu", progress: bool = True, keep_models: bool = False,
        kl_coef: float = 0.0) -> dict:
    """Train every method on `task` under one budget, for each seed; see the module docstring for the protocol.
    keep_models: also return the tuned models in result["models"][(method, seed)] (not saved to JSON)."""
    task, method_names, seeds = get_task(task), list(method_names), list(seeds)
    budget = dict(flops=flops, calls=calls, steps=steps, seconds=seconds)
    reward = _check(method_names, task, budget, seeds)
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0 (0: no KL regulariser), got {kl_coef}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if lr_grid is not None and (not lr_grid or tuning_seed is None or tuning_seed in seeds
                                or not all(v > 0 for v in lr_grid)):
        raise ValueError(f"lr_grid needs values > 0 and a tuning_seed that is not a reported seed {seeds}; got "
                         f"lr_grid={lr_grid}, tuning_seed={tuning_seed}")
    clips = grad_clip if isinstance(grad_clip, dict) else {n: grad_clip for n in method_names}
    if set(method_names) - set(clips) or any(c is not None and not c > 0 for c in clips.values()):
        raise ValueError(f"grad_clip must give every method a max norm > 0 or None (no clipping), got {grad_clip}")
    if not isinstance(evals, int) or evals < 1:
        raise ValueError(f"evals must be a positive int (budgets on the grid), got {evals!r}")
    base, schedule = task.load(device)
    probed = {}
    if seconds is not None:
        steps = replay.replayed(task.name, method_names)
        if steps is None:
            probed = probe(method_names, task, overrides=overrides, batch=batch, lr=lr, device=device)
            steps = {n: max(1, int(seconds / probed[n])) for n in method_names}
        replay.record(task.name, steps)
    axis = "flops" if flops is not None else "calls" if calls is not None else "steps"
    if axis == "steps":
        grids = {n: sorted({min(steps[n], math.ceil(steps[n] / evals) * i) for i in range(1, evals + 1)})
                 for n in method_names}
    else:
        grids = {n: log_grid(flops or calls, evals, span) for n in method_names}
    ec = task.eval_chain()
    ts = timesteps(schedule.T, ec["n_steps"], ec["spacing"], ec["offset"])
    x_eval = torch.randn((task.eval_batch, *task.shape), generator=torch.Generator().manual_seed(10**6),
                         dtype=next(base.parameters()).dtype).to(device)
    c_eval = task.eval_cond(task.eval_batch, device)

    @torch.no_grad()
    def draw(model):
        return sample(model, schedule, x_eval, ts, ec["eta"], cond=c_eval, final_timestep=ec["final_timestep"],
                      generator=torch.Generator().manual_seed(7))[0]

    reference = draw(base)

    quality = task.quality() if task.quality is not None else None

    def evaluate(model):
        x = draw(model)
        return {"reward": reward(x, c_eval).mean().item(), "drift": sliced_wasserstein(x.flatten(1), reference.flatten(1)),
                **(quality(x, c_eval) if quality is not None else {})}

    at_start = evaluate(base)
    ctx = dict(overrides=overrides, batch=batch, device=device, max_steps=max_steps, evaluate=evaluate,
               pretrained=at_start["reward"], at_start=at_start, kl_coef=kl_coef, ts=ts)
    lrs, tuning = {n: lr or task.lr for n in method_names}, {}
    limit = drift_limit if drift_limit is not None else task.drift_limit
    for name in method_names if lr_grid else []:
        scores, spent = {}, {"flops": 0, "calls": 0, "step": 0}
        for value in lr_grid:
            r, _ = _train(task, name, base, schedule, reward, ctx, seed=tuning_seed, lr=value, clip=clips.get(name),
                          axis=axis, budgets=grids[name])
            rewards = r["curve"]["reward"][1:]  # a diverged run (non-finite, or beyond the drift limit) never wins
            scores[value] = float("-inf") if _diverged(r, limit) else sum(rewards) / len(rewards)
            spent = {k: spent[k] + r["spent"][k] for k in spent}
        lrs[name] = max(scores, key=lambda v: scores[v])
        tuning[name] = {"seed": tuning_seed, "scores": scores, "chosen": lrs[name], "spent": spent}
    runs, models = [], {}
    for name in method_names:
        for seed in seeds:
            if progress:
                print(f"[arena] {task.name}: {name} seed {seed}, {axis} up to {grids[name][-1]:.4g}", flush=True)
            r, model = _train(task, name, base, schedule, reward, ctx, seed=seed, lr=lrs[name], clip=clips.get(name),
                              axis=axis, budgets=grids[name])
            runs.append(r)
            if keep_models:
                models[(name, seed)] = model.eval().requires_grad_(False)
    result = {"task": task.name, "task_label": task.label, "reward": reward.name, "ceiling": task.ceiling,
              "ranks": task.ranks, "budget": {k: v for k, v in budget.items() if k != "steps"}, "axis": axis,
              "budgets": grids, "eval_chain": ec, "lr": lr or task.lr, "seeds": seeds, "pretrained": ctx["pretrained"],
              "drift_limit": limit, "at_start": ctx["at_start"],
              "kl_coef": kl_coef,
              "settings": {n: {"lr": lrs[n], "grad_clip": clips.get(n)} for n in method_names}, "tuning": tuning,
              "steps": {n: max(r["steps"] for r in runs if r["method"] == n) for n in method_names},
              "probe": {n: {"seconds_per_step": s} for n, s in probed.items()}, "runs": runs}
    result.update(analyse(result))
    result["rows"] = summarise(result)
    if keep_models:
        result["models"] = models
    return result


def save(result: dict, path, wall_time: bool = True) -> int:
    """Write the result as JSON (without models); wall_time=False leaves out its wall-time entries, so that two runs
    with the same (methods, settings, seeds) write byte-identical files on any machine load."""
    out = {k: v for k, v in result.items() if k != "models"}
    Path(path).write_text(json.dumps(out if wall_time else without_wall_time(out), indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--methods", nargs="+", help="default: every registered method that can run on the task")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=float, help="training FLOPs per method and seed (the top of the budget grid)")
    g.add_argument("--calls", type=float, help="network-evaluation budget (rows through the denoiser)")
    g.add_argument("--seconds", type=float, help="legacy time budget per method and seed (CPU seconds on the CPU)")
    g.add_argument("--steps-from", metavar="JSON", help="repeat the step counts of an earlier result")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--evals", type=int, default=6, help="budgets on the grid")
    p.add_argument("--span", type=float, default=32.0, help="the grid runs from top / span to top")
    p.add_argument("--lr-grid", type=float, nargs="+")
    p.add_argument("--tuning-seed", type=int)
    p.add_argument("--grad-clip", nargs="+", default=["1.0"], metavar="[METHOD=]NORM|none")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--no-wall-time", action="store_true",
                   help="leave wall-time entries out of the JSON: two runs then write identical files on any load")
    a = p.parse_args(argv)
    task = get_task(a.task)
    differentiable = getattr(task.reward(), "differentiable", True)
    names = a.methods or [n for n, m in registry.REGISTRY.items() if not m.needs_data and (differentiable or not m.grad_reward)]
    norm = lambda s: None if s.lower() == "none" else float(s)  # noqa: E731
    clip = {n: norm(a.grad_clip[0]) for n in names} if "=" not in a.grad_clip[0] else {}
    clip.update({k: norm(v) for k, v in (c.split("=", 1) for c in a.grad_clip if "=" in c)})
    steps = json.load(open(a.steps_from))["steps"] if a.steps_from else None
    result = run(names, task, flops=a.flops, calls=a.calls, seconds=a.seconds, steps=steps, seeds=a.seeds, evals=a.evals,
                 span=a.span, lr_grid=a.lr_grid, tuning_seed=a.tuning_seed, grad_clip={n: clip.get(n, 1.0) for n in names})
    print(format_table(result))
    print("fingerprint", fingerprint(result))
    return save(result, a.json, wall_time=not a.no_wall_time) if a.json else 0


if __name__ == "__main__":
    sys.exit(main())
