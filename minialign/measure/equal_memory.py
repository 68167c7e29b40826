"""The equal-memory comparison (RLR's own claim): every method under one live-activation budget, then equal FLOPs.

    python -m minialign.measure.equal_memory --task digit3_tempered --fraction 0.3 --flops 5e11 \
        --methods full_bp draft_k=k rlr=h draft_1 sdo ddpo
    table = equal_memory(["full_bp", "draft_k=k", "rlr=h"], "digit3_tempered", budget_bytes=..., flops=5e11)

A method is named with the config field that sets how much of the chain keeps a graph, if it has one ("NAME=FIELD").

Live bytes of a method = measure/memory.peak_saved_bytes of its loss_fn call (the peak of the tensors autograd holds
for backward at once, each storage once, the parameters left out), the maximum over `draws` calls (a method whose
graph is random, as AlignProp's K, must fit at its worst draw). Under the budget B each method runs with the largest
setting that fits:

    registry.EXACT  plain full backprop if it fits, else every call checkpointed (registry.EXACT_CHECKPOINTED),
                    else it drops out
    NAME=h          RLR's sub-chain length: h from methods.rlr_budget.h_star(B, b_h, b_z, T), b_h = one graph step's
                    saved bytes (rlr_budget.measure), b_z = 0 (the inherent-noise ZO steps are backpropagated a chunk
                    at a time inside the loss, so their memory does not add up over the chain; one chunk is held at
                    once); h* is then lowered until the measured live bytes fit (the FO step and the ZO chunk are not
                    in the paper's formula): both are recorded
    NAME=FIELD      any other integer field (DRaFT-K's k): the largest value from T down to 1 that fits
    NAME            its registry setting: it fits or drops out

The methods that fit train with the arena (arena.run) to `flops` training FLOPs on `seeds`; the table gives, per
method: the setting used, its live bytes, whether it fitted, the reward at the FLOP budget (mean ± std over seeds)
and the stats rule (measure/stats.compare, Welch 95%) against the best method at that budget.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from minialign import methods as registry
from minialign.measure import arena, stats
from minialign.measure.memory import peak_saved_bytes
from minialign.measure.tasks import get as get_task
from minialign.methods import rlr_budget


def live_bytes(name: str, task, overrides: dict, draws: int = 4) -> int:
    """The peak live saved bytes of `draws` loss_fn calls of method `name` (with `overrides`) on the task's chain."""
    task = get_task(task)
    base, schedule = task.load()
    model = copy.deepcopy(base).requires_grad_(True)
    loss_fn, _ = arena._setup(task, name, model, schedule, task.reward(), {name: overrides}, None)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    return max(peak_saved_bytes(lambda: loss_fn(model, step, g)[0], exclude=params) for step in range(draws))


def _largest(name, task, budget, settings, draws):
    """(overrides, live bytes, fitted): the first of `settings` (largest first) whose live bytes fit, else the last."""
    for overrides in settings:
        live = live_bytes(name, task, overrides, draws)
        if live <= budget:
            return overrides, live, True
    return overrides, live, False


def fit(method_specs, task, budget_bytes: float, draws: int = 4) -> list[dict]:
    """Per "NAME" or "NAME=FIELD": {"method" (the registry name that runs), "asked", "setting", "live_bytes",
    "fitted", and for FIELD h "h_star", "b_h"} under the live-activation budget (see the module docstring)."""
    task = get_task(task)
    n = task.n_steps
    out = []
    for spec in method_specs:
        name, _, knob = spec.partition("=")
        row = {"asked": spec}
        if knob and knob not in registry.get(name).config.__dataclass_fields__:
            raise ValueError(f"{spec}: {name}'s config has no field {knob!r}")
        if name == registry.EXACT:
            for run_as in (registry.EXACT, registry.EXACT_CHECKPOINTED):
                live = live_bytes(run_as, task, {}, draws)
                if live <= budget_bytes:
                    break
            row.update(method=run_as, setting={"checkpoint": run_as != registry.EXACT}, live_bytes=live,
                       fitted=live <= budget_bytes)
        elif knob == "h":
            base, schedule = task.load()
            b_h = rlr_budget.measure(base, schedule, shape=task.shape, batch=task.batch, n_steps=n,
                                     eta=registry.make_config(name).eta)["b_h"]
            h = int(rlr_budget.h_star(budget_bytes, b_h, 0, n))
            s, live, ok = _largest(name, task, budget_bytes, [{"h": v} for v in range(min(h, n - 1), 0, -1)] or [{"h": 1}],
                                   draws)
            row.update(method=name, setting=s, live_bytes=live, fitted=ok and h >= 1, h_star=h, b_h=b_h)
        elif knob:
            s, live, ok = _largest(name, task, budget_bytes, [{knob: v} for v in range(n, 0, -1)], draws)
            row.update(method=name, setting=s, live_bytes=live, fitted=ok)
        else:
            live = live_bytes(name, task, {}, draws)
            row.update(method=name, setting={}, live_bytes=live, fitted=live <= budget_bytes)
        out.append(row)
    return out


def equal_memory(method_specs, task, *, budget_bytes: float, flops: float, seeds=(0, 1, 2, 3, 4), draws: int = 4,
                 grad_clip=1.0, progress: bool = True) -> dict:
    """fit() under budget_bytes, then the methods that fitted trained to `flops` by arena.run; the table (see the
    module docstring) in result["table"], the arena's result in result["arena"]."""
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    task = get_task(task)
    rows = fit(method_specs, task, budget_bytes, draws)
    runs = [r for r in rows if r["fitted"]]
    if not runs:
        raise ValueError(f"no method fits in {budget_bytes} bytes: {[(r['asked'], r['live_bytes']) for r in rows]}")
    names = [r["method"] for r in runs]
    result = arena.run(names, task, flops=flops, seeds=seeds, evals=1, overrides={r["method"]: r["setting"] for r in runs},
                       grad_clip=grad_clip, progress=progress)
    finals = {n: [r["curve"]["reward"][-1] for r in result["runs"] if r["method"] == n and n in result["budgets"]
                  and r["seed"] not in result["diverged"][n]] for n in names}
    best = max(names, key=lambda n: sum(finals[n]) / max(len(finals[n]), 1))
    for row in rows:
        v = finals.get(row["method"]) if row["fitted"] else None
        if v:
            m = sum(v) / len(v)
            row.update(reward=m, reward_std=(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5, seeds=len(v))
            if row["method"] != best:  # this method minus the best: Welch 95% interval, "behind" when it excludes 0
                c = stats.compare(v, finals[best])
                row["vs_best"] = {"verdict": {"a": "ahead", "b": "behind"}.get(c["verdict"], c["verdict"]),
                                  **{k: c[k] for k in ("diff", "lo", "hi", "few_seeds")}}
    return {"task": task.name, "budget_bytes": budget_bytes, "flops": flops, "seeds": list(seeds), "best": best,
            "table": rows, "arena": {k: v for k, v in result.items() if k != "models"}}


def format_table(result: dict) -> str:
    head = f"{'method':<16}{'setting':<22}{'live MiB':>9}{'fits':>6}{'reward at budget':>22}  vs best ({result['best']})"
    lines = [f"{result['task']}: live budget {result['budget_bytes'] / 2**20:.2f} MiB, {result['flops']:.3g} FLOPs, "
             f"seeds {result['seeds']}", head, "-" * len(head)]
    for r in result["table"]:
        s = ", ".join(f"{k}={v}" for k, v in r["setting"].items()) or "-"
        rew = f"{r['reward']:.3f} ± {r['reward_std']:.3f}" if "reward" in r else "dropped out"
        v = r.get("vs_best")
        verdict = (f"{v['verdict']}: {v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" if v
                   else "best" if "reward" in r else "")
        lines.append(f"{r['method']:<16}{s:<22}{r['live_bytes'] / 2**20:>9.2f}{'yes' if r['fitted'] else 'no':>6}"
                     f"{rew:>22}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digit3_tempered")
    p.add_argument("--methods", nargs="+", required=True, metavar="NAME[=FIELD]")
    p.add_argument("--fraction", type=float, default=0.3, help="the budget as a fraction of full backprop's live bytes")
    p.add_argument("--flops", type=float, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    budget = a.fraction * live_bytes(registry.EXACT, a.task, {})
    result = equal_memory(a.methods, a.task, budget_bytes=budget, flops=a.flops, seeds=a.seeds)
    result["command"] = "python -m minialign.measure.equal_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
