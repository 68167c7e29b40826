"""One statistical rule for every comparison of methods over seeds (the arena, the notebooks, kit/results.py).

The rule (`compare`): the difference of two methods' means over seeds, d = mean(a) - mean(b), with a 95% interval
from Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom; the seeds of a and b are treated as
independent samples, not paired):

    se = sqrt(s_a^2 / n_a + s_b^2 / n_b),   df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1))
    interval = d -+ t_{0.975, df} * se

"a beats b" only when the interval lies above 0, "b beats a" when below; otherwise "indistinguishable".
A headline needs >= 5 seeds per method (HEADLINE_SEEDS); 3 or 4 are allowed but the result says `few_seeds`
(say so wherever it is shown); fewer than 2 finite values cannot give an interval: the verdict is
"insufficient seeds". Values from diverged seeds must be removed first (`split_diverged`) and reported apart:
`compare` refuses NaN and inf rather than averaging them in.

Diverged (`split_diverged`): a seed whose value is non-finite, or whose drift exceeds a stated threshold.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

HEADLINE_SEEDS = 5   # seeds per method for a headline comparison
MIN_SEEDS = 3        # allowed when a seed is costly, and then flagged (few_seeds)
CONFIDENCE = 0.95


def _mean_var(v: Sequence[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, sum((x - m) ** 2 for x in v) / (len(v) - 1)


def compare(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """The rule above for seed values a and b (higher is better). Returns
    {diff, lo, hi, df, n_a, n_b, verdict: "a" | "b" | "indistinguishable" | "insufficient seeds", few_seeds}."""
    from scipy.stats import t as student_t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a, b = [float(x) for x in a], [float(x) for x in b]
    bad = [x for x in a + b if not math.isfinite(x)]
    if bad:
        raise ValueError(f"a, b: non-finite seed values {bad[:3]}; take diverged seeds out first (split_diverged) "
                         "and report them apart")
    out = {"n_a": len(a), "n_b": len(b), "few_seeds": min(len(a), len(b)) < HEADLINE_SEEDS, "confidence": confidence}
    if min(len(a), len(b)) < 2:
        return {**out, "diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "df": float("nan"),
                "verdict": "insufficient seeds"}
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    ua, ub = va / len(a), vb / len(b)
    se = math.sqrt(ua + ub)
    diff = ma - mb
    if se == 0:  # both constant over seeds: the difference is exact
        lo = hi = diff
        df = float("inf")
    else:
        df = se**4 / ((ua**2 / (len(a) - 1) if ua else 0.0) + (ub**2 / (len(b) - 1) if ub else 0.0))
        half = float(student_t.ppf(0.5 + confidence / 2, df)) * se
        lo, hi = diff - half, diff + half
    verdict = "a" if lo > 0 else "b" if hi < 0 else "indistinguishable"
    return {**out, "diff": diff, "lo": lo, "hi": hi, "df": df, "verdict": verdict}


def split_diverged(values: Sequence[float], drifts: Optional[Sequence[float]] = None,
                   drift_limit: Optional[float] = None) -> tuple[list[int], list[int]]:
    """(indices of kept seeds, indices of diverged seeds): diverged = a non-finite value, or (with drift_limit) a
    drift that is non-finite or above drift_limit."""
    if drift_limit is not None and not drift_limit > 0:
        raise ValueError(f"drift_limit must be > 0 or None, got {drift_limit}")
    if drifts is not None and len(drifts) != len(values):
        raise ValueError(f"drifts must have one value per seed ({len(values)}), got {len(drifts)}")
    kept, diverged = [], []
    for i, v in enumerate(values):
        bad = not math.isfinite(v)
        if drift_limit is not None and drifts is not None:
            bad = bad or not (math.isfinite(drifts[i]) and drifts[i] <= drift_limit)
        (diverged if bad else kept).append(i)
    return kept, diverged


def ahead_ranges(budgets: Sequence[float], verdicts: Sequence[str]) -> dict:
    """Budget ranges over which each side of a comparison is ahead: {"a": [[lo, hi], ...], "b": [...],
    "indistinguishable": [...]}, contiguous runs of equal verdicts over the (ascending) budget grid."""
    if len(budgets) != len(verdicts):
        raise ValueError(f"verdicts must have one entry per budget ({len(budgets)}), got {len(verdicts)}")
    out: dict = {"a": [], "b": [], "indistinguishable": [], "insufficient seeds": []}
    prev = None
    for x, v in zip(budgets, verdicts):
        if v == prev:
            out[v][-1][1] = x
        else:
            out[v].append([x, x])
        prev = v
    return {k: v for k, v in out.items() if v}


def curves_verdicts(budgets: dict, values: dict, confidence: float = CONFIDENCE) -> dict:
    """The rule applied along reward-vs-budget curves.

    budgets: {method: [b_1 < ... < b_K]}; values: {method: [[the seeds' values at b_k] for k = 1..K]} with diverged
    seeds already taken out. Methods on different grids (per-method step budgets) are compared point by point (the
    k-th evaluation of each). Returns
        curves:  {method: {"budget", "mean", "std", "n"}}     (NaN where no seed is left)
        ranking: [{"budget", "order"}] per k, methods by mean, best first (methods without seeds left out)
        pairs:   [{"a", "b", "few_seeds", "verdicts", "intervals", "ahead"}], `ahead` = ahead_ranges with the methods'
                 names; few_seeds: fewer than HEADLINE_SEEDS on either side at some budget (say so where it is shown)
    """
    names = list(budgets)
    if any(len(values[n]) != len(budgets[n]) for n in names) or len({len(b) for b in budgets.values()}) > 1:
        raise ValueError("values must hold one list of seed values per budget, and every method the same number of budgets")
    nan = float("nan")
    curves = {}
    for n in names:
        mv = [_mean_var(v) if len(v) > 1 else (v[0], nan) if v else (nan, nan) for v in values[n]]
        curves[n] = {"budget": list(budgets[n]), "mean": [m for m, _ in mv], "std": [math.sqrt(v) for _, v in mv],
                     "n": [len(v) for v in values[n]]}
    shared = all(budgets[n] == budgets[names[0]] for n in names)
    ranking = []
    for k in range(len(budgets[names[0]])):
        order = sorted((n for n in names if values[n][k]), key=lambda n: -curves[n]["mean"][k])
        ranking.append({"budget": budgets[names[0]][k] if shared else k, "order": order})
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            res = [compare(va, vb, confidence) for va, vb in zip(values[a], values[b])]
            verdicts = [r["verdict"] for r in res]
            grid = budgets[a] if shared else list(range(len(verdicts)))
            ahead = ahead_ranges(grid, verdicts)
            pairs.append({"a": a, "b": b, "few_seeds": any(r["few_seeds"] for r in res),
                          "verdicts": [{"a": a, "b": b}.get(v, v) for v in verdicts],
                          "intervals": [[r["lo"], r["hi"]] for r in res],
                          "ahead": {{"a": a, "b": b}.get(k, k): v for k, v in ahead.items()}})
    return {"curves": curves, "ranking": ranking, "pairs": pairs}
