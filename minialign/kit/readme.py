"""The README's result tables, generated from the committed metrics (notebooks/metrics/*.json).

    python -m minialign.kit.readme            # check: exit 1 naming every block that differs from the metrics
    python -m minialign.kit.readme --write    # rewrite those blocks in README.md

A block is the text between `<!-- results: NAME -->` and `<!-- /results -->` in README.md; NAME is a key of
`BLOCKS`. Prose around the blocks carries no number that a rerun of a notebook changes: the numbers live here.
Method rows come from the metric keys and the registry (a method's label), so a new method needs no edit here.
A metric a notebook did not record prints as "—".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from minialign.kit.repro import NOTEBOOKS
from minialign.kit.readme_measured import MEASURED_BLOCKS, _label, _table
from minialign.kit.results import claims, gather, load_metrics, seed_values

README = NOTEBOOKS.parent / "README.md"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _num(x: Optional[float], fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _pm(m: dict, key: str, fmt: str = ".3f", std: Optional[str] = None) -> str:
    """'mean ± std' of key (std under `std`, default key + '_std', when recorded)."""
    v, s = m.get(key), m.get(std or key + "_std")
    return _num(v, fmt) + ("" if s is None or v is None else f" ± {s:{fmt}}")


def _methods_with(m: dict, *patterns: str) -> list[str]:
    """Registered method names n such that pattern.format(m=n) is a metric key for some pattern, in registry order."""
    from minialign import methods

    return [n for n in methods.REGISTRY if any(p.format(m=n) in m for p in patterns)]


def _toy(M: dict) -> str:
    m = M.get("00_toy_diffusion", {})
    steps = ("1000", "100", "10")
    return _table(["sampler (2-D swiss roll, T = 1000 model)", "1000 steps (2k points)", "100 steps", "10 steps"], [
        ["DDPM (eta = 1), SWD"] + [_num(m.get(f"swd_ddpm_{n}"), ".4f") for n in steps],
        ["DDIM (eta = 0), SWD"] + [_num(m.get(f"swd_ddim_{n}"), ".4f") for n in steps],
        ["data vs data floor at that sample size", _num(m.get("swd_floor_many"), ".4f")] + [_num(m.get("swd_floor"), ".4f")] * 2,
        ["SFT-PG's toy (trained with T = 10), SWD", "", "", _num(m.get("swd_sftpg_toy_10"), ".4f")],
        ["digits, class-conditional accuracy", "", _num(m.get("digits_accuracy_100")),
         f"{_num(m.get('digits_accuracy_10'))} (5 steps: {_num(m.get('digits_accuracy_5'))})"],
        ["digits, unconditional feature MMD", _num(m.get("digits_uncond_feature_mmd_1000"), ".4f"),
         _num(m.get("digits_uncond_feature_mmd_100"), ".4f"),
         f"{_num(m.get('digits_uncond_feature_mmd_10'), '.4f')} (5 steps: {_num(m.get('digits_uncond_feature_mmd_5'), '.4f')})"],
    ])


def _sft_pg(M: dict) -> str:
    m = M.get("01_sft_pg", {})
    return _table(["10-step sampler", "SWD (mean ± std over seeds)", "worst seed", "/ data floor", "/ 1000-step sampler"], [
        ["before fine-tuning", _num(m.get("swd_before"), ".4f"), "", "", ""],
        ["after SFT-PG, moving average of the weights", _pm(m, "swd_after", ".4f"), _num(m.get("swd_after_worst"), ".4f"),
         _num(m.get("swd_after_over_floor"), ".2f"), _num(m.get("swd_after_over_many_step"), ".2f")],
        ["after SFT-PG, raw weights", _pm(m, "swd_after_raw", ".4f"), _num(m.get("swd_after_raw_worst"), ".4f"),
         _num(m.get("swd_after_raw_over_floor"), ".2f"), _num(m.get("swd_after_raw_over_many_step"), ".2f")],
        ["T = 1000 model, 1000 steps", _num(m.get("swd_many_step"), ".4f"), "", "", ""],
        ["T = 1000 model, 10 steps", _num(m.get("swd_many_step_10"), ".4f"), "", "", ""],
        ["data vs data", _pm(m, "swd_floor", ".4f"), "", "", ""],
    ])


def _baselines(M: dict) -> str:
    m = M.get("02_reward_gradients", {})
    return _table(["method", "reward after", "GFLOP to p = 0.9", "drift after", "feature MMD to real 3s",
                   "saved MB / step", "cosine to exact (2-D)"],
                  [[_label(n), _num(m.get(f"{n}_reward_final")), _num(m.get(f"{n}_gflop_to_0.9"), ".0f"),
                    _num(m.get(f"{n}_drift_final"), ".2f"), _num(m.get(f"{n}_feature_mmd"), ".2f"),
                    _num(None if m.get(f"{n}_saved_bytes_per_step") is None else m[f"{n}_saved_bytes_per_step"] / 2**20, ".0f"),
                    _num(m.get(f"{n}_grad_cosine_to_exact"))] for n in _methods_with(m, "{m}_reward_final")])


def arenas(M: dict) -> list[tuple[str, str]]:
    """(notebook, prefix) of every arena a notebook recorded with measure/arena_report.to_metrics."""
    return [(nb, k[:-len("_top_budget")]) for nb, m in sorted(M.items()) for k in sorted(m)
            if k.startswith("arena") and k.endswith("_top_budget")]  # check_* runs (a saturating task) rank nothing


def _seeds(m: dict, key: str) -> int:
    return len(seed_values({"nb": m}, "nb", key))


def _arena(nb: str) -> Callable[[dict], str]:
    """Every arena notebook nb recorded: its task, budget grid and pretrained reward, then one row per method (final
    reward mean ± std over the seeds kept, gold, drift, diverged seeds)."""
    def block(M: dict) -> str:
        m, out = M.get(nb, {}), []
        for _, pre in arenas({nb: m}):
            names = _methods_with(m, f"{pre}_{{m}}_final")
            out.append(f"`{pre}`: training FLOPs {_num(m.get(f'{pre}_low_budget'), '.3g')} to "
                       f"{_num(m.get(f'{pre}_top_budget'), '.3g')}, pretrained reward {_num(m.get(f'{pre}_pretrained'))}"
                       f", gold {_num(m.get(f'{pre}_pretrained_gold'), '.2f')}\n")
            out.append(_table(["method", "reward at the top budget (seeds)", "gold", "drift", "diverged"], [
                [_label(n), f"{_pm(m, f'{pre}_{n}_final', std=f'{pre}_{n}_std')} ({_seeds(m, f'{pre}_{n}_final')})",
                 _num(m.get(f"{pre}_{n}_gold"), ".2f"), _num(m.get(f"{pre}_{n}_drift"), ".2f"),
                 _num(m.get(f"{pre}_{n}_diverged"), ".0f")] for n in names]))
        return "\n".join(out) if out else "(no FLOP-budget arena recorded)\n"
    return block


def _ranking_tasks(M: dict) -> str:
    """One row per arena: pretrained reward, the best mean reached and by whom, the compute range, the gold measure."""
    rows = []
    for nb, pre in arenas(M):
        m = M[nb]
        names = _methods_with(m, f"{pre}_{{m}}_final")
        if not names:
            continue
        best = max(names, key=lambda n: m[f"{pre}_{n}_final"])
        rows.append([f"{nb[:2]}: `{pre}`", _num(m.get(f"{pre}_pretrained")), f"{m[f'{pre}_{best}_final']:.3f} ({_label(best)})",
                     f"{_num(m.get(f'{pre}_low_budget'), '.2g')} - {_num(m.get(f'{pre}_top_budget'), '.2g')}",
                     f"{_num(m.get(f'{pre}_pretrained_gold'), '.2f')} -> {_num(m.get(f'{pre}_{best}_gold'), '.2f')}",
                     str(max(_seeds(m, f"{pre}_{n}_final") for n in names))])
    return _table(["notebook: arena", "pretrained reward", "best mean reached (method)", "training FLOPs (curve)",
                   "gold: pretrained -> best method", "seeds"], rows)


# RLR's estimator variants that are no registered method (notebook 03's metric suffixes)
VARIANTS = {"reinforce": "REINFORCE (DDPO's first update)", "rlr_h1": "RLR h = 1", "rlr_h2": "RLR h = 2",
            "rlr_h4": "RLR h = 4", "rlr_h1_no_zo": "RLR h = 1 without ZO", "rlr_h2_no_zo": "RLR h = 2 without ZO",
            "rlr_h4_no_zo": "RLR h = 4 without ZO", "rlr_h2_perturb": "RLR h = 2, parameter-perturbation ZO",
            "rlr_h2_grad_norm": "RLR h = 2, j by gradient norm"}


def _rlr(M: dict) -> str:
    m = M.get("03_rlr", {})
    found = {k[len("bias_cosine_"):] for k in m if k.startswith("bias_cosine_")}
    order = [n for n in _methods_with(m, "bias_cosine_{m}")] + [k for k in VARIANTS if k in found]
    order += sorted(found - set(order))
    rows = [[VARIANTS.get(k) or _label(k), _num(m.get(f"bias_cosine_{k}")), _num(m.get(f"variance_{k}"), ".2f")]
            for k in order]
    return _table(["estimator", "cosine of the mean estimate to exact", "relative variance"], rows)


def _rlr_ablation(M: dict) -> str:
    m = M.get("03_rlr", {})
    names = {"fo_only": "FO only (h = 0, no ZO)", "without_ho": "without HO (h = 0)", "without_zo": "without ZO (h = 2)",
             "full": "full RLR (h = 2 + ZO)"}
    return _table([f"ablation on the bias task (pretrained {_num(m.get('ablation_pretrained'), '.1f')})",
                   "reward at the FLOP budget (seeds)", "steps"],
                  [[lab, f"{_pm(m, f'ablation_{k}', '.1f')} ({_seeds(m, f'ablation_{k}')})", _num(m.get(f"ablation_{k}_steps"), ".0f")]
                   for k, lab in names.items() if f"ablation_{k}" in m])


def _sdo(M: dict) -> str:
    m = M.get("04_sdo", {})
    rows = [["gradient cosine to exact, parameters (first / last / random step retained)",
             " / ".join(_num(m.get(f"cos_param_{k}"), ".2f") for k in ("first", "last", "random"))],
            ["gradient cosine to exact, latent", _num(m.get("cos_latent_first"), ".2f")],
            ["latent optimisation: start / SDO / full backprop (equal FLOPs)",
             f"{_num(m.get('latent_reward_start'))} / {_pm(m, 'latent_reward_sdo')} / {_pm(m, 'latent_reward_full_bp')}"]]
    return _table(["quantity", "measured"], rows)


def _shortft(M: dict) -> str:
    m = M.get("05_shortft", {})
    variants = sorted({k[len("ablation_"):-len("_std")] for k in m if k.startswith("ablation_") and k.endswith("_std")})
    rows = [[v.replace("_", " "), _pm(m, f"ablation_{v}"), _num(m.get(f"ablation_{v}_cpu_s"), ".0f")] for v in variants]
    return _table(["T-LoRA / progressive variant (equal FLOPs)", "reward", "CPU s"], rows)


def _sd(M: dict) -> str:
    m = M.get("06_stable_diffusion", {})
    return _table(["method", "reward before", "after", "gain",
                   f"digit accuracy after (pretrained {_num(m.get('minisd_digit_accuracy'), '.2f')})",
                   f"colour accuracy after (pretrained {_num(m.get('minisd_colour_accuracy'), '.2f')})", "training s"],
                  [[_label(n), _num(m.get(f"{n}_reward_before")), _num(m.get(f"{n}_reward_after")),
                    _num(m.get(f"{n}_reward_gain")), _num(m.get(f"quality_{n}_digit_accuracy"), ".2f"),
                    _num(m.get(f"quality_{n}_colour_accuracy"), ".2f"), _num(m.get(f"{n}_seconds"), ".0f")]
                   for n in _methods_with(m, "{m}_reward_gain")])


def _sd_sft_pg(M: dict) -> str:
    m, pre = M.get("06_stable_diffusion", {}), "sft_pg_"
    rows = [(k, lab) for k, lab in (("before", "4-step chain, before SFT-PG"), ("after", "4-step chain, after SFT-PG"),
                                    ("ddim_25", "DDIM, 25 steps"), ("ddim_50", "DDIM, 50 steps"),
                                    ("data_floor", "real images (held out)"))]
    return _table(["sampler", "feature MMD", "sliced W2", "digit accuracy", "colour accuracy"],
                  [[lab, _pm(m, f"{pre}{k}_mmd"), _pm(m, f"{pre}{k}_swd"), _num(m.get(f"{pre}{k}_digit_accuracy"), ".2f"),
                    _num(m.get(f"{pre}{k}_colour_accuracy"), ".2f")] for k, lab in rows])


MAP = [("time_vs_full_bp", "time / full backprop", ".2f"), ("saved_vs_full_bp", "saved activations / full backprop", ".3f"),
       ("grad_cosine_of_mean", "bias: cosine of the mean estimate to exact", ".3f"),
       ("grad_cosine_one_estimate", "one estimate's cosine to exact", ".3f"),
       ("grad_variance", "relative variance", ".2f")]


def _map(M: dict) -> str:
    """One row per method: cost, memory, bias and variance, as kit.results gathers them (with the source notebook)."""
    from minialign import methods

    g = gather(M)
    names = [n for n in methods.REGISTRY if any(n in g.get(q, {}) for q, _, _ in MAP)]

    def cell(q, n, fmt):
        v = g.get(q, {}).get(n)
        return "—" if v is None else f"{v.value:{fmt}} ({v.source.split(':')[0][:2]})"
    return _table(["method"] + [h for _, h, _ in MAP], [[_label(n)] + [cell(q, n, f) for q, _, f in MAP] for n in names])


def _claims(M: dict) -> str:
    return _table(["paper", "claim", "rule", "measured", "verdict"],
                  [[r["paper"], r["claim"], r["rule"], r["measured"] or "—", f"**{r['verdict']}**"] for r in claims(M)])



BLOCKS: dict[str, Callable[[dict], str]] = {
    "toy": _toy, "sft-pg": _sft_pg, "baselines": _baselines, "arena": _arena("02_reward_gradients"),
    "ranking-tasks": _ranking_tasks, "rlr": _rlr, "rlr-arena": _arena("03_rlr"), "rlr-ablation": _rlr_ablation, "sdo": _sdo,
    "sdo-arena": _arena("04_sdo"), "shortft-ablation": _shortft, "shortft-equal": _arena("05_shortft"), "sd": _sd, "sd-sft-pg": _sd_sft_pg, "claims": _claims, "map": _map, **MEASURED_BLOCKS,
}


def render(text: str, metrics: dict) -> tuple[str, list[str]]:
    """(text with every block regenerated, names of the blocks that changed). Unknown block names raise."""
    changed = []

    def sub(match):
        name = match["name"]
        if name not in BLOCKS:
            raise ValueError(f"README block {name!r} is unknown; known: {sorted(BLOCKS)}")
        body = BLOCKS[name](metrics)
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minialign.kit.readme", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the blocks (default: check only)")
    p.add_argument("--readme", default=str(README))
    p.add_argument("--metrics", default=None, help="metrics folder (default notebooks/metrics)")
    args = p.parse_args(argv)
    path = Path(args.readme)
    new, changed = render(path.read_text(), load_metrics(args.metrics))
    if args.write:
        path.write_text(new)
        print(f"rewrote {len(changed)} block(s): {', '.join(changed) or 'none'}")
        return 0
    if changed:
        print(f"README blocks that disagree with the metrics: {', '.join(changed)}; run python -m minialign.kit.readme --write")
        return 1
    print("README result blocks agree with the metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
