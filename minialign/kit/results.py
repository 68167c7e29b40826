"""The results side by side: read the committed notebooks' metrics (notebooks/metrics/*.json) and judge each
paper's headline claim by a stated rule (notebook 07_results).

    metrics = load_metrics()                 # {"02_reward_gradients": {...}, "04_sdo": {...}, ...}
    table = gather(metrics)                  # {quantity: {method: Value(value, std, source)}}
    rows = claims(metrics)                   # one dict per claim: measured numbers, verdict, score

A notebook that was not run leaves its quantities out and its claim "not measured": nothing here raises on a
missing metric. Verdicts score 1 (reproduced), 0.5 (partly), 0 (not); each rule counts the sub-checks that
hold: all of them -> reproduced, some -> partly, none -> not.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

from minialign.kit.repro import NOTEBOOKS

SCORE = {"reproduced": 1.0, "partly": 0.5, "not": 0.0}
BENCH = "bench"  # the one committed cost run, read beside the notebooks as if it were one (every cost figure's source)
BENCH_FILE = NOTEBOOKS.parent / "data" / "measured" / "bench_digits.json"
BENCH_KEYS = ("flops_vs_full_bp", "time_vs_full_bp", "time_vs_nograd", "saved_vs_full_bp", "peak_saved_vs_full_bp")
NB = {"sftpg": "01_sft_pg", "base": "02_reward_gradients", "rlr": "03_rlr", "sdo": "04_sdo", "shortft": "05_shortft"}
ANY = None  # in SOURCES: every registered method (minialign.methods), in registry order


class Value(NamedTuple):
    value: float
    std: Optional[float]
    source: str  # "notebook: key"


def load_bench(path=BENCH_FILE) -> dict:
    """{f"{quantity}_{method}": value} of one `python -m minialign.bench --json` run ({} when there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {f"{k}_{r['method']}": r[k] for r in rows for k in BENCH_KEYS if r.get(k) is not None}


def load_metrics(folder=None, bench: bool = True) -> dict:
    """{notebook name: {metric: value}} from every folder/*.json (default notebooks/metrics), plus, with bench, the
    committed cost run under the name BENCH (data/measured/bench_digits.json: one bench run is the source of every
    cost figure). ValueError naming the folder when it holds no *.json (e.g. notebooks/ of a non-editable install):
    pass the folder of a repro run."""
    folder = Path(folder) if folder is not None else NOTEBOOKS / "metrics"
    found = sorted(folder.glob("*.json"))
    if not found:
        raise ValueError(f"no metrics (*.json) in {folder}: give the folder of a run's metrics (metrics_dir, e.g. "
                         "runs/cpu/metrics from python -m minialign.repro, or a clone's notebooks/metrics)")
    out = {p.stem: json.loads(p.read_text()) for p in found}
    cost = load_bench() if bench else {}
    return {**out, BENCH: cost} if cost else out


def seed_values(metrics: dict, nb: str, key: str) -> list[float]:
    """The per-seed values a notebook recorded for `key` (f"{key}_s{seed}", measure/arena_report.to_metrics), in seed
    order; [] when it recorded none."""
    m, head = metrics.get(nb, {}), f"{key}_s"
    found = [(int(k[len(head):]), v) for k, v in m.items() if k.startswith(head) and k[len(head):].isdigit()]
    return [float(v) for _, v in sorted(found)]


def _get(metrics, nb, key, std_key=None) -> Optional[Value]:
    m = metrics.get(nb, {})
    if key not in m:
        return None
    return Value(float(m[key]), float(m[std_key]) if std_key and std_key in m else None, f"{nb}: {key}")


# quantity -> list of (notebook, key pattern with {m}, std pattern or None, methods); the first source found wins.
# A pattern with {m} is read for every registered method (ANY): a method added to the registry shows up wherever a
# notebook recorded it. A key without {m} is a notebook's measurement of the one method named beside it.
SOURCES = {
    "reward_digit3_tempered": [(NB["base"], "arena_digit3_tempered_{m}_final", "arena_digit3_tempered_{m}_std", ANY)],
    "reward_digit3_tempered_03": [(NB["rlr"], "arena_{m}_final", "arena_{m}_std", ANY)],
    "reward_digit_plus_one_04": [(NB["sdo"], "arena_digit_plus_one_{m}_final", "arena_digit_plus_one_{m}_std", ANY)],
    "reward_digit3_tempered_05": [(NB["shortft"], "arena_digit3_tempered_{m}_final", "arena_digit3_tempered_{m}_std", ANY)],
    "drift_digit3": [(NB["base"], "{m}_drift_final", None, ANY)],
    "gflop_to_09_digit3": [(NB["base"], "{m}_gflop_to_0.9", None, ANY)],
    "saved_mb_per_step": [(NB["base"], "{m}_saved_bytes_per_step", None, ANY)],
    "flops_vs_full_bp": [(BENCH, "flops_vs_full_bp_{m}", None, ANY)],
    "time_vs_full_bp": [(BENCH, "time_vs_full_bp_{m}", None, ANY)],
    "saved_vs_full_bp": [(BENCH, "saved_vs_full_bp_{m}", None, ANY)],
    "peak_saved_vs_full_bp": [(BENCH, "peak_saved_vs_full_bp_{m}", None, ANY)],
    "grad_cosine_one_estimate": [(NB["base"], "{m}_grad_cosine_to_exact", None, ANY)],
    "grad_cosine_of_mean": [(NB["rlr"], "bias_cosine_{m}", None, ANY),
                            (NB["rlr"], "bias_cosine_rlr_h2", None, ("rlr",))],
    "grad_variance": [(NB["rlr"], "variance_{m}", None, ANY),
                      (NB["rlr"], "variance_rlr_h2", None, ("rlr",))],
}


def gather(metrics: dict) -> dict:
    """{quantity: {method: Value}} for every quantity of SOURCES that the metrics hold (saved bytes in MB)."""
    from minialign.methods import names

    out = {}
    for q, sources in SOURCES.items():
        got = {}
        for nb, key, std_key, methods in sources:
            for m in (names(reward=False) if methods is ANY else methods):
                v = got.get(m) or _get(metrics, nb, key.format(m=m), std_key and std_key.format(m=m))
                if v is not None:
                    got[m] = v._replace(value=v.value / 2**20) if q == "saved_mb_per_step" else v
        if got:
            out[q] = got
    return out


def verdict(passed: int, total: int) -> str:
    """reproduced (every sub-check holds), partly (some do), not (none); ValueError on total < 1."""
    if total < 1 or not 0 <= passed <= total:
        raise ValueError(f"need 0 <= passed <= total and total >= 1, got passed={passed}, total={total}")
    return "reproduced" if passed == total else ("partly" if passed else "not")


def _claim(paper, claim, rule, checks):
    """checks: [(description, bool or None)]; None = a metric missing -> the claim is "not measured"."""
    if not checks or any(ok is None for _, ok in checks):
        return {"paper": paper, "claim": claim, "rule": rule, "measured": "not measured", "verdict": "not measured",
                "score": None}
    v = verdict(sum(bool(ok) for _, ok in checks), len(checks))
    measured = "; ".join(f"{d} ({'yes' if ok else 'no'})" for d, ok in checks)
    return {"paper": paper, "claim": claim, "rule": rule, "measured": measured, "verdict": v, "score": SCORE[v]}


def _m(metrics, nb, key):
    return metrics.get(nb, {}).get(key)


def beats(metrics: dict, nb: str, a_key: str, b_key: str, a_name: str, b_name: str):
    """(description, verdict) of measure/stats.compare on the per-seed values of two recorded results (seed_values):
    verdict "a" | "b" | "indistinguishable", or None when either side has fewer than 2 seeds (not measured)."""
    from minialign.measure import stats

    a, b = seed_values(metrics, nb, a_key), seed_values(metrics, nb, b_key)
    if min(len(a), len(b)) < 2:
        return "", None
    v = stats.compare(a, b)
    word = {"a": f"{a_name} beats {b_name}", "b": f"{b_name} beats {a_name}"}.get(v["verdict"],
                                                                             f"{a_name} ~ {b_name}")
    return (f"{word}: {a_name} - {b_name} = {v['diff']:+.3f}, 95% [{v['lo']:+.3f}, {v['hi']:+.3f}], "
            f"{v['n_a']} vs {v['n_b']} seeds{' (few)' if v['few_seeds'] else ''}"), v["verdict"]


def _wins(metrics, nb, a_key, b_key, a_name, b_name):
    """A sub-check "a beats b" by the rule: (description, True/False, or None when not measured)."""
    d, v = beats(metrics, nb, a_key, b_key, a_name, b_name)
    return d, None if v is None else v == "a"


RULE = "Welch 95% interval of the difference of mean final rewards over seeds excludes 0 (measure/stats.compare)"


def claims(metrics: dict) -> list[dict]:
    """The four headline claims, each judged by its rule (written in the row) from the metrics. Every comparison of
    methods is the one rule of measure/stats.py on the per-seed values the notebooks recorded."""
    rows = []
    s, f = _m(metrics, NB["sftpg"], "swd_after_over_many_step"), _m(metrics, NB["sftpg"], "swd_after_over_floor")
    rows.append(_claim("SFT-PG (Fan & Lee 2023)", "a fine-tuned 10-step sampler matches the many-step one",
                       "SWD(10-step tuned) / SWD(1000-step) <= 1.1, and / SWD(data vs data floor) <= 1.2", [
                           (f"SWD ratio to the many-step sampler {s:.2f}" if s is not None else "", None if s is None else s <= 1.1),
                           (f"SWD ratio to the floor {f:.2f}" if f is not None else "", None if f is None else f <= 1.2)]))
    checks = [_wins(metrics, NB["rlr"], "arena_rlr_final", f"arena_{k}_final", "RLR", name)
              for k, name in (("draft_1", "DRaFT-1"), ("alignprop", "AlignProp"), ("ddpo", "DDPO"))]
    checks += [_wins(metrics, NB["rlr"], "ablation_full", f"ablation_{k}", "full RLR", name)
               for k, name in (("without_ho", "without HO"), ("without_zo", "without ZO"), ("fo_only", "FO only"))]
    rows.append(_claim("RLR (Ren et al. 2025)", "RLR ranks above truncated BP and DDPO; each ablated piece costs reward",
                       "at equal FLOPs RLR beats DRaFT-1, AlignProp and DDPO (03's arena, digit3_tempered), and full RLR "
                       "beats each ablation (without HO, without ZO, FO only; 03's ablation on the bias task); 'beats': "
                       + RULE, checks))
    fl, t, mem = (_m(metrics, BENCH, f"{k}_sdo") for k in ("flops_vs_full_bp", "time_vs_full_bp", "saved_vs_full_bp"))
    d, v = beats(metrics, NB["sdo"], "arena_digit_plus_one_sdo_final", "arena_digit_plus_one_full_bp_final", "SDO",
                 "full BP")
    rows.append(_claim("SDO (Dou et al. 2025)", "about 90% cheaper than full backprop at equal quality",
                       "FLOPs per step <= 0.15 x full BP's (counted: the committed bench run, 50 steps); saved "
                       "activations <= 0.15 x full BP; at equal FLOPs full BP does not beat SDO (04's arena, "
                       "digit_plus_one; " + RULE + ")", [
                           (f"FLOP ratio {fl:.2f} (time {t:.2f})" if None not in (fl, t) else "", None if fl is None else fl <= 0.15),
                           (f"memory ratio {mem:.3f}" if mem is not None else "", None if mem is None else mem <= 0.15),
                           (d, None if v is None else v != "b")]))
    found = (re.fullmatch(r"arena_(.+)_shortft_final_s\d+", k) for k in metrics.get(NB["shortft"], {}))
    tasks = sorted({f.group(1) for f in found if f})
    checks = [_wins(metrics, NB["shortft"], f"arena_{t}_shortft_final", f"arena_{t}_draft_lv_final", f"ShortFT ({t})",
                    "DRaFT-LV") for t in tasks if seed_values(metrics, NB["shortft"], f"arena_{t}_draft_lv_final")]
    rows.append(_claim("ShortFT (Guo et al. 2025)", "ShortFT beats DRaFT-LV at equal compute",
                       "at equal FLOPs ShortFT beats DRaFT-LV on each ranking task 05 recorded; 'beats': " + RULE, checks))
    return rows
