"""What an arena result says: the statistics along its curves, the tidy table, the figure and its fingerprint.

    analyse(result)        diverged seeds per method, and measure/stats.curves_verdicts on the kept seeds
    summarise(result)      one row per method (final reward, gain, AUC, drift, gold / feature MMD where the task scores
                           them, compute), diverged seeds counted apart
    format_table(result)   the table and, per pair of methods, the budget ranges where each is ahead
    plot(result)           reward vs compute (log axis for FLOPs and calls); Pareto panels: reward vs drift, and
                           reward vs gold where the task scores it
    plot_kl(sweep)         the KL regulariser's Pareto points: final reward vs drift and vs gold per coefficient
    fingerprint(result)    sha256 of the result without its wall-time entries
    to_metrics(result, prefix)  the flat headline metrics of a run, per-seed values included (kit/results reads them
                           back with seed_values and judges claims by measure/stats.compare)
    time_to, distinguishable (legacy helpers the notebooks use)

minialign.measure.arena re-exports all of these.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics

import torch

from minialign import methods as registry
from minialign.measure import stats

QUALITY = ("gold", "feature_mmd")  # scores a task may record that the reward does not see (measure/tasks.py)


def _diverged(r, limit) -> bool:
    c = r["curve"]
    return bool(r.get("diverged")) or stats.split_diverged(c["reward"], c["drift"], limit)[1] != []


def analyse(result: dict) -> dict:
    """curves (mean reward per budget over the seeds that did not diverge), ranking per budget, pairs (the rule of
    measure/stats.py at every budget, and the budget ranges where each method is ahead), diverged seeds per method."""
    names = list(result["budgets"])
    kept = {n: [r for r in result["runs"] if r["method"] == n and not _diverged(r, result["drift_limit"])] for n in names}
    values = {n: [[r["curve"]["reward"][i + 1] for r in kept[n]] for i in range(len(result["budgets"][n]))] for n in names}
    diverged = {n: [r["seed"] for r in result["runs"] if r["method"] == n and r not in kept[n]] for n in names}
    budgets = result["budgets"]
    if len({len(b) for b in budgets.values()}) > 1:  # step grids (seconds/steps budgets) of unequal length: the
        budgets = {n: b[-1:] for n, b in budgets.items()}  # methods meet at the end of the equal budget only
        values = {n: v[-1:] for n, v in values.items()}
    return {"diverged": diverged, **stats.curves_verdicts(budgets, values)}


def time_to(curve: dict, level: float, axis: str = "seconds") -> float:
    """First `axis` value (seconds, step, calls or flops) at which the evaluated reward reaches `level`, linearly
    interpolated between evaluations; NaN if it never does."""
    x, y = curve[axis], curve["reward"]
    for i in range(1, len(y)):
        if y[i] >= level:
            return x[i] if y[i] <= y[i - 1] else x[i - 1] + (x[i] - x[i - 1]) * (level - y[i - 1]) / (y[i] - y[i - 1])
    return float("nan")


def summarise(result: dict) -> list[dict]:
    """One row per method over its non-diverged seeds (NaN if none): final reward mean ± std, gain, AUC (mean
    reward over the fraction of steps done), drift, steps, seconds, calls, flops, and how many seeds diverged."""
    rows, nan = [], float("nan")
    mean = lambda v: statistics.mean(v) if v else nan  # noqa: E731
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0 if v else nan  # noqa: E731
    for name in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == name and not _diverged(r, result.get("drift_limit"))]
        final = [r["curve"]["reward"][-1] for r in rs]
        auc = []
        for r in rs:
            c = r["curve"]
            u = [s / max(c["step"][-1], 1) for s in c["step"]]
            auc.append(sum((u[i + 1] - u[i]) * (c["reward"][i + 1] + c["reward"][i]) / 2 for i in range(len(u) - 1)))
        last = lambda k: [r["curve"].get(k, [nan])[-1] for r in rs]  # noqa: E731
        rows.append({"method": name, "label": registry.get(name).label, "final": mean(final), "final_std": sd(final),
                     "gain": mean(final) - mean([r["pretrained"] for r in rs]), "auc": mean(auc), "auc_std": sd(auc),
                     "drift": mean(last("drift")), "drift_std": sd(last("drift")), "pretrained": mean([r["pretrained"] for r in rs]),
                     "steps": result["steps"][name], "seconds": mean(last("seconds")), "calls": mean(last("calls")),
                     "flops": mean(last("flops")), "seeds": len(rs),
                     **{k: mean(last(k)) for k in QUALITY if rs and k in rs[0]["curve"]},
                     **{f"{k}_std": sd(last(k)) for k in QUALITY if rs and k in rs[0]["curve"]},
                     "diverged": sum(r["method"] == name for r in result["runs"]) - len(rs)})
    return rows


def to_metrics(result: dict, prefix: str) -> dict:
    """Flat metrics of an arena run at its top budget, for a notebook's metrics JSON: f"{prefix}_{m}_final" (mean over
    kept seeds), "_std", "_final_s{seed}" (each kept seed's value: the Welch rule needs them), "_diverged" (seeds left
    out), "_drift", "_gold" / "_feature_mmd" where the task scores them, "_gflop" (compute spent); and
    f"{prefix}_pretrained" (and its gold / feature_mmd), f"{prefix}_top_budget" / "_low_budget" (the budget grid's
    ends, in the run's axis)."""
    out = {f"{prefix}_pretrained": result["pretrained"],
           f"{prefix}_top_budget": max(b[-1] for b in result["budgets"].values()),
           f"{prefix}_low_budget": min(b[0] for b in result["budgets"].values()),
           **{f"{prefix}_pretrained_{k}": v for k, v in result.get("at_start", {}).items() if k in QUALITY}}
    for row in result["rows"]:
        m = row["method"]
        kept = [r for r in result["runs"] if r["method"] == m and not _diverged(r, result.get("drift_limit"))]
        out.update({f"{prefix}_{m}_final": row["final"], f"{prefix}_{m}_std": row["final_std"],
                    f"{prefix}_{m}_diverged": row["diverged"], f"{prefix}_{m}_drift": row["drift"],
                    f"{prefix}_{m}_gflop": row["flops"] / 1e9})
        out.update({f"{prefix}_{m}_final_s{r['seed']}": r["curve"]["reward"][-1] for r in kept})
        out.update({f"{prefix}_{m}_{k}": row[k] for k in QUALITY if k in row})
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def distinguishable(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """Legacy (notebooks until they move to result["pairs"]): (a, b, whether their final-reward intervals
    mean ± std do NOT overlap) for every pair. The arena's rule is measure/stats.compare."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            lo, hi = sorted([a, b], key=lambda r: r["final"])
            out.append((a["method"], b["method"], lo["final"] + lo["final_std"] < hi["final"] - hi["final_std"]))
    return out


def format_table(result: dict) -> str:
    head = f"{'method':<28}{'final reward':>18}{'gain':>8}{'drift':>14}{'steps':>7}{'GFLOP':>9}{'diverged':>9}"
    lines = [f"task {result['task']} ({result['reward']}), seeds {result['seeds']}, budget axis {result['axis']}"
             + ("" if result.get("ranks", True) else " (a check: this task saturates and ranks nothing)"), head, "-" * len(head)]
    for r in sorted(result["rows"], key=lambda r: -r["final"] if math.isfinite(r["final"]) else math.inf):
        lines.append(f"{r['label']:<28}{r['final']:>10.3f} ± {r['final_std']:.3f}{r['gain']:>8.3f}"
                     f"{r['drift']:>8.3f} ± {r['drift_std']:.2f}{r['steps']:>7}{r['flops'] / 1e9:>9.2f}{r['diverged']:>9}"
                     + (f"   gold {r['gold']:.3f} ± {r['gold_std']:.3f}, feature MMD {r['feature_mmd']:.3f}" if "gold" in r else ""))
    for p in result.get("pairs", []):
        span = lambda lo, hi: f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"  # noqa: E731
        lines.append(f"  {p['a']} vs {p['b']}: " + "; ".join(
            f"{'ahead: ' + k if k in (p['a'], p['b']) else k} at {', '.join(span(*r) for r in v)}" for k, v in p["ahead"].items())
                     + (" (fewer than 5 seeds: not a headline)" if p.get("few_seeds") else ""))
    return "\n".join(lines)


def plot(result: dict, axes=None):
    """Reward against training compute (the budget axis; mean over seeds, band = ± std) and the Pareto panels:
    reward vs drift and, where the task scores it, reward vs gold (every budget's mean as a small dot joined per
    method, the top budget's seeds as faint dots and its mean ± std as a large marker)."""
    import matplotlib.pyplot as plt

    gold = any("gold" in r["curve"] for r in result["runs"])
    if axes is None:
        _, axes = plt.subplots(1, 3 if gold else 2, figsize=(16.5 if gold else 11, 3.8), dpi=100)
    key = result["axis"] if result.get("axis") in ("flops", "calls") else "flops"  # counted, whatever the budget
    from minialign.kit.style import color

    for row in result["rows"]:
        col = color(row["method"])  # one colour per method across every notebook
        rs = [r["curve"] for r in result["runs"] if r["method"] == row["method"] and not _diverged(r, result.get("drift_limit"))]
        if not rs:
            continue
        t, y = torch.tensor([c[key] for c in rs], dtype=torch.float64).mean(0), torch.tensor([c["reward"] for c in rs])
        axes[0].plot(t, y.mean(0), "o-", ms=3, color=col, label=row["label"])
        if len(rs) > 1:
            axes[0].fill_between(t, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=col, alpha=0.15)
        for ax, k in zip(axes[1:], ("drift", "gold") if gold else ("drift",)):  # a caller's 2 axes: no gold panel
            ax.plot(torch.tensor([c[k] for c in rs]).mean(0), y.mean(0), ".-", ms=4, lw=0.8, color=col, alpha=0.6)
            ax.scatter([c[k][-1] for c in rs], [c["reward"][-1] for c in rs], color=col, s=18, alpha=0.5)
            ax.errorbar(row[k], row["final"], xerr=row[f"{k}_std"], yerr=row["final_std"], fmt="o", color=col, ms=7,
                        capsize=3, label=row["label"])
    if "pretrained" in result:  # the log axis has no 0: the pretrained model's reward as a line instead
        axes[0].axhline(result["pretrained"], color="0.4", ls=":", lw=1, label="pretrained")
    axes[0].set(xlabel={"flops": "training FLOPs (counted, log scale)", "calls": "network calls (log scale)"}[key],
                ylabel="reward (evaluation chain)", title=f"{result['task_label']}: reward vs compute", xscale="log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes[0].xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # a grid often spans ~1 decade
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+", "e")))
    axes[0].xaxis.set_minor_formatter(NullFormatter())  # minor labels overprinted each other
    axes[1].set(xlabel="drift from the pretrained samples (sliced W2)", ylabel="reward", title="reward vs drift (dots: seeds)")
    if gold and len(axes) > 2:
        axes[2].set(xlabel="gold: p(target) by the independent classifier", ylabel="reward",
                    title="reward vs gold (a line: the budget grid)")
    axes[0].legend(fontsize=10, loc="best")
    return axes


def plot_kl(sweep: dict, axes=None):
    """measure/kl.sweep's runs as Pareto points: each method's final reward (mean over seeds) against its drift and,
    where the task scores it, its gold score, one point per KL coefficient, joined in coefficient order."""
    import matplotlib.pyplot as plt

    from minialign.kit.style import color

    keys = ["drift"] + (["gold"] if "gold" in sweep["results"][0]["rows"][0] else [])
    if axes is None:
        _, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), dpi=100, squeeze=False)
        axes = axes[0]
    for name in dict.fromkeys(r["method"] for r in sweep["results"][0]["rows"]):
        pts = [(c, next(r for r in res["rows"] if r["method"] == name)) for c, res in zip(sweep["coefs"], sweep["results"])]
        for ax, k in zip(axes, keys):
            ax.plot([r[k] for _, r in pts], [r["final"] for _, r in pts], "o-", color=color(name), label=pts[0][1]["label"])
            for c, r in pts:
                ax.annotate(f"{c:g}", (r[k], r["final"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    for ax, k in zip(axes, keys):
        ax.set(xlabel=k, ylabel="final reward", title=f"KL to the pretrained model: reward vs {k} (labels: coefficient)")
    axes[0].legend(fontsize=9)
    return axes


def without_wall_time(v):
    """The result without its wall-time entries ("seconds", the probe) and models: what two runs that trained and
    scored identically share, on any load."""
    if isinstance(v, dict):
        return {k: without_wall_time(x) for k, x in v.items() if k not in ("seconds", "probe", "models")}
    return [without_wall_time(x) for x in v] if isinstance(v, (list, tuple)) else v


def fingerprint(result: dict) -> str:
    """sha256 of the result's JSON without its wall-time entries: equal for two runs that trained and scored
    identically, on any load."""
    return hashlib.sha256(json.dumps(without_wall_time(result), sort_keys=True).encode()).hexdigest()
