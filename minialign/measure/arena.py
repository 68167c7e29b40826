"""The arena: registered methods on a task at equal compute, over seeds.

    python -m minialign.arena --task digit3_tempered --methods ddpo full_bp draft_1 --seconds 20 --seeds 0 1 2
    result = arena.run(["ddpo", "full_bp"], "digit_plus_one", seconds=20, seeds=[0, 1, 2])

Protocol. A time budget is first turned into a step count per method: each method's step is timed on a
throwaway copy of the model (one warm-up, then interleaved rounds) and steps = floor(seconds / seconds_per_step).
On the CPU, "seconds" are this process's CPU seconds (time.process_time): with one torch thread that is the wall
time of an idle machine, and other work on a shared machine does not shrink anybody's budget. On CUDA: wall time.
The counts are recorded (`result["steps"]`), so `run(..., steps=result["steps"])` repeats the comparison with
identical numbers on a machine of any speed or load. A network-call budget (`calls`: sample-evaluations of the
denoiser, i.e. rows through the network, counted by a forward hook) is turned into steps the same way.
Each (method, seed) run trains a fresh copy of the pretrained model with train() (AdamW, the task's lr), and
evaluates it `evals` times on fixed noise (and labels): reward on the method's own chain (its eta), and drift,
the sliced W2 to the pretrained model's samples from the same noise on the same chain.

Reported per method: final reward mean ± std over seeds, gain over the pretrained model, AUC (the mean reward
over the budget, the reward-vs-budget curve integrated over the fraction of steps done, pretrained at 0), drift.
Two methods are called indistinguishable when their mean ± std intervals of final reward overlap.
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
from minialign.metrics import sliced_wasserstein
from minialign.sampling import sample
from minialign.schedule import timesteps
from minialign.measure.tasks import get as get_task
from minialign.train import TrainConfig, train


def _check(method_names, task, seconds, calls, steps, seeds):
    budgets = [b for b in (seconds, calls, steps) if b is not None]
    if len(budgets) != 1:
        raise ValueError("give exactly one budget: seconds (CPU time on the CPU, wall time on CUDA), calls (network "
                         "evaluations) or steps (per method)")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if calls is not None and not calls > 0:
        raise ValueError(f"calls must be > 0, got {calls}")
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
    if steps is not None:
        missing = [n for n in method_names if n not in steps]
        bad = {n: s for n, s in steps.items() if not (isinstance(s, int) and s >= 1)}
        if missing or bad:
            raise ValueError(f"steps must give a positive int per method; missing {missing}, invalid {bad}")
    return reward


class _Counter:
    """Rows through the network (sample-evaluations), counted by a forward hook while `on`."""

    def __init__(self, model):
        self.rows, self.on = 0, False
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.on:
            self.rows += int(args[0].shape[0])

    def wrap(self, loss_fn):
        def counted(model, step, generator):
            self.on = True
            try:
                return loss_fn(model, step, generator)
            finally:
                self.on = False
        for attr in {"optimizer", "state_dict", "load_state_dict"} & set(dir(loss_fn)):
            setattr(counted, attr, getattr(loss_fn, attr))  # a method's own networks and state (SFT-PG)
        return counted


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
    """{method: (seconds per step, network rows per step)} on throwaway copies of the model: after one warm-up
    step each, `rounds` interleaved rounds (every method one step per round, the order rotated), median time.
    Interleaving makes a passing slowdown of the machine hit every method alike."""
    task = get_task(task)
    base, schedule = task.load(device)
    reward = task.reward()
    live = {}
    for name in method_names:
        model = copy.deepcopy(base).requires_grad_(True).train()
        loss_fn, _ = _setup(task, name, model, schedule, reward, overrides, batch)
        counter = _Counter(model)
        opt = loss_fn.optimizer(model) if hasattr(loss_fn, "optimizer") else torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr or task.lr, weight_decay=0.0)
        live[name] = dict(model=model, fn=counter.wrap(loss_fn), opt=opt, counter=counter,
                          g=torch.Generator().manual_seed(12345), step=0)

    def one_step(v):
        loss, _ = v["fn"](v["model"], v["step"], v["g"])
        v["opt"].zero_grad(set_to_none=True)
        loss.backward()
        v["opt"].step()
        v["step"] += 1

    for v in live.values():  # warm-up, not counted
        one_step(v)
        v["counter"].rows = 0
    times = interleaved_times({n: (lambda seed, v=v: one_step(v)) for n, v in live.items()}, rounds, str(device),
                              _clock(device))
    out = {}
    for name, v in live.items():
        v["counter"].handle.remove()
        out[name] = (statistics.median(times[name]), v["counter"].rows / rounds)
    return out


def _clock(device):
    """CPU seconds of this process on the CPU (immune to other processes), wall seconds on CUDA."""
    return time.perf_counter if str(device).startswith("cuda") else time.process_time


@torch.no_grad()
def _draw(model, schedule, x_T, ts, eta, cond, seed):
    return sample(model, schedule, x_T, ts, eta, cond=cond, generator=torch.Generator().manual_seed(seed))[0]


def run(method_names, task, *, seconds=None, calls=None, steps=None, seeds=(0,), evals: int = 6, overrides=None,
        batch=None, lr=None, device="cpu", progress: bool = True, keep_models: bool = False) -> dict:
    """Train every method on `task` under one budget, for each seed; see the module docstring for the protocol.
    keep_models: also return the tuned models in result["models"][(method, seed)] (not saved to JSON)."""
    task = get_task(task)
    method_names = list(method_names)
    reward = _check(method_names, task, seconds, calls, steps, list(seeds))
    base, schedule = task.load(device)
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if steps is None:
        steps = replay.replayed(task.name, method_names)
    probed = {} if steps is not None else probe(method_names, task, overrides=overrides, batch=batch, lr=lr, device=device)
    if steps is None:
        steps = {n: max(1, int(seconds / probed[n][0]) if seconds is not None else int(calls / probed[n][1]))
                 for n in method_names}
    replay.record(task.name, steps)
    x_eval = torch.randn((task.eval_batch, *task.shape), generator=torch.Generator().manual_seed(10**6),
                         dtype=next(base.parameters()).dtype).to(device)
    c_eval = task.eval_cond(task.eval_batch, device)
    reference, pretrained = {}, {}
    runs, models = [], {}
    for name in method_names:
        for seed in seeds:
            model = copy.deepcopy(base).requires_grad_(True)
            loss_fn, cfg = _setup(task, name, model, schedule, reward, overrides, batch)
            ts = timesteps(schedule.T, cfg.n_steps, cfg.spacing, cfg.offset)
            key = (cfg.eta, tuple(ts))
            if key not in reference:
                reference[key] = _draw(base, schedule, x_eval, ts, cfg.eta, c_eval, 7)
                pretrained[key] = reward(reference[key], c_eval).mean().item()
            ref = reference[key]

            def evaluate(model):
                x = _draw(model, schedule, x_eval, ts, cfg.eta, c_eval, 7)
                return reward(x, c_eval).mean().item(), sliced_wasserstein(x.flatten(1), ref.flatten(1))

            counter = _Counter(model)
            curve = {"step": [0], "seconds": [0.0], "calls": [0], "reward": [pretrained[key]], "drift": [0.0]}
            clock = _clock(device)
            spent = [clock(), 0.0]  # start, time spent evaluating

            def on_eval(step, row, model=model, curve=curve, counter=counter, spent=spent, evaluate=evaluate):
                t0 = clock()
                r, d = evaluate(model)
                curve["step"].append(step); curve["seconds"].append(t0 - spent[0] - spent[1])
                curve["calls"].append(counter.rows); curve["reward"].append(r); curve["drift"].append(d)
                spent[1] += clock() - t0

            n = steps[name]
            if progress:
                print(f"[arena] {task.name}: {name} seed {seed}, {n} steps", flush=True)
            train(model, counter.wrap(loss_fn), TrainConfig(steps=n, lr=lr or task.lr, seed=seed, batch=cfg.batch,
                  grad_clip=1.0, log_every=max(1, math.ceil(n / evals)), progress=False), callback=on_eval)
            counter.handle.remove()
            runs.append({"method": name, "seed": seed, "eta": cfg.eta, "pretrained": pretrained[key], "curve": curve})
            if keep_models:
                models[(name, seed)] = model.eval().requires_grad_(False)
    result = {"task": task.name, "task_label": task.label, "reward": reward.name, "ceiling": task.ceiling,
              "budget": {"seconds": seconds, "calls": calls}, "lr": lr or task.lr, "steps": steps, "seeds": list(seeds),
              "probe": {n: {"seconds_per_step": p[0], "rows_per_step": p[1]} for n, p in probed.items()},
              "runs": runs}
    result["rows"] = summarise(result)
    if keep_models:
        result["models"] = models
    return result


def time_to(curve: dict, level: float, axis: str = "seconds") -> float:
    """First `axis` value (seconds, step or calls) at which the evaluated reward reaches `level`, linearly
    interpolated between evaluations; NaN if it never does."""
    x, y = curve[axis], curve["reward"]
    for i in range(1, len(y)):
        if y[i] >= level:
            return x[i] if y[i] <= y[i - 1] else x[i - 1] + (x[i] - x[i - 1]) * (level - y[i - 1]) / (y[i] - y[i - 1])
    return float("nan")


def summarise(result: dict) -> list[dict]:
    """The tidy table: one row per method (final reward mean ± std over seeds, gain, AUC, drift, steps, seconds)."""
    rows = []
    for name in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == name]
        final = [r["curve"]["reward"][-1] for r in rs]
        auc = []
        for r in rs:
            c = r["curve"]
            u = [s / c["step"][-1] for s in c["step"]]
            auc.append(sum((u[i + 1] - u[i]) * (c["reward"][i + 1] + c["reward"][i]) / 2 for i in range(len(u) - 1)))
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        m = registry.get(name)
        rows.append({"method": name, "label": m.label, "final": statistics.mean(final), "final_std": sd(final),
                     "gain": statistics.mean(final) - statistics.mean(r["pretrained"] for r in rs),
                     "auc": statistics.mean(auc), "auc_std": sd(auc),
                     "drift": statistics.mean(r["curve"]["drift"][-1] for r in rs),
                     "drift_std": sd([r["curve"]["drift"][-1] for r in rs]),
                     "pretrained": statistics.mean(r["pretrained"] for r in rs), "steps": result["steps"][name],
                     "seconds": statistics.mean(r["curve"]["seconds"][-1] for r in rs),
                     "calls": statistics.mean(r["curve"]["calls"][-1] for r in rs), "seeds": len(rs)})
    return rows


def distinguishable(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """(a, b, whether their final-reward intervals mean ± std do NOT overlap) for every pair of methods."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            lo, hi = sorted([a, b], key=lambda r: r["final"])
            out.append((a["method"], b["method"], lo["final"] + lo["final_std"] < hi["final"] - hi["final_std"]))
    return out


def format_table(result: dict) -> str:
    head = f"{'method':<28}{'final reward':>18}{'gain':>8}{'AUC':>8}{'drift':>14}{'steps':>7}{'train s':>9}"
    lines = [f"task {result['task']} ({result['reward']}), seeds {result['seeds']}", head, "-" * len(head)]
    for r in sorted(result["rows"], key=lambda r: -r["final"]):
        lines.append(f"{r['label']:<28}{r['final']:>10.3f} ± {r['final_std']:.3f}{r['gain']:>8.3f}{r['auc']:>8.3f}"
                     f"{r['drift']:>8.3f} ± {r['drift_std']:.2f}{r['steps']:>7}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def plot(result: dict, axes=None):
    """Reward against training seconds (mean over seeds, band = ± std) and the reward-drift Pareto plot."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for i, row in enumerate(result["rows"]):
        rs = [r["curve"] for r in result["runs"] if r["method"] == row["method"]]
        t = torch.tensor([c["seconds"] for c in rs]).mean(0)
        y = torch.tensor([c["reward"] for c in rs])
        axes[0].plot(t, y.mean(0), "o-", ms=3, color=f"C{i}", label=row["label"])
        if len(rs) > 1:
            axes[0].fill_between(t, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=f"C{i}", alpha=0.15)
        d = [c["drift"][-1] for c in rs]
        f = [c["reward"][-1] for c in rs]
        axes[1].scatter(d, f, color=f"C{i}", s=18, alpha=0.5)
        axes[1].errorbar(row["drift"], row["final"], xerr=row["drift_std"], yerr=row["final_std"], fmt="o",
                         color=f"C{i}", ms=7, capsize=3, label=row["label"])
    axes[0].set(xlabel="training time (s; CPU seconds on the CPU)", ylabel="reward (evaluation chain)",
                title=f"{result['task_label']}: reward vs time")
    axes[1].set(xlabel="drift from the pretrained samples (sliced W2)", ylabel="final reward",
                title="reward vs drift (dots: seeds)")
    axes[0].legend(fontsize=10, loc="best")
    return axes


def save(result: dict, path) -> int:
    Path(path).write_text(json.dumps({k: v for k, v in result.items() if k != "models"}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--methods", nargs="+", default=["ddpo", "full_bp", "draft_k", "alignprop", "draft_lv", "refl"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--seconds", type=float, help="time budget per method and seed (CPU seconds on the CPU)")
    g.add_argument("--calls", type=float, help="network-evaluation budget (rows through the denoiser)")
    g.add_argument("--steps-from", metavar="JSON", help="repeat the step counts of an earlier result")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evals", type=int, default=6)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    steps = json.load(open(a.steps_from))["steps"] if a.steps_from else None
    result = run(a.methods, a.task, seconds=a.seconds, calls=a.calls, steps=steps, seeds=a.seeds, evals=a.evals)
    print(format_table(result))
    return save(result, a.json) if a.json else 0


if __name__ == "__main__":
    sys.exit(main())
