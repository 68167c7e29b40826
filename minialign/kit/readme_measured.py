"""README blocks read from the committed one-off runs of the measuring commands (data/measured/*.json, each holding the
command that made it): the cost bench, SD 1.5 at full size, the bias task's curves, RLR's ZO options, equal memory,
the KL sweep. Used by minialign.kit.readme, which owns the block syntax and the check."""
from __future__ import annotations

import json

from minialign.kit.repro import NOTEBOOKS
from minialign.kit.results import BENCH_FILE

MEASURED = NOTEBOOKS.parent / "data" / "measured"


def _label(name: str) -> str:
    from minialign.kit.style import label

    return label(name)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _measured(name: str) -> dict:
    path = MEASURED / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _arena_curves(M: dict) -> str:
    """The bias task's reward-vs-FLOPs curves (mean ± std over seeds) and, per pair, where one is ahead by the rule."""
    d = _measured("arena_bias")
    if not d:
        return "(not measured)\n"
    names = list(d["curves"])
    budgets = d["curves"][names[0]]["budget"]
    rows = [[f"{_label(n)} ({d['steps'][n]} steps)"] +
            [f"{m:.1f} ± {sd:.1f}" for m, sd in zip(d["curves"][n]["mean"], d["curves"][n]["std"])] for n in names]
    out = _table(["method (steps at the top budget)"] + [f"{b:.0e} FLOPs" for b in budgets], rows)
    ties = [f"{_label(q['a'])} vs {_label(q['b'])}" for q in d["pairs"] if q["verdicts"][-1] not in (q["a"], q["b"])]
    return (out + f"\nPretrained {d['pretrained']:.1f}, ceiling {d['ceiling']:.2f}; {len(d['seeds'])} seeds; "
            f"indistinguishable at the top budget: {', '.join(ties) or 'none'}. `{d['command']}`\n")


def _rlr_cost(M: dict) -> str:
    d = _measured("rlr_cost")
    if not d:
        return "(not measured)\n"
    rows = [[k, f"{r['flops'] / 1e9:.1f}", f"{r['flops_vs_full_bp']:.2f}", f"{r['live_bytes'] / 2**20:.1f}",
             f"{r['live_vs_full_bp']:.3f}", f"{r['time_vs_full_bp']:.2f}"] for k, r in d["rows"].items()]
    return _table(["variant", "GFLOP / step", "/ full BP", "live MB", "/ full BP", "time / full BP"], rows) + f"\n`{d['command']}`\n"


def _cost(M: dict) -> str:
    """The one committed bench run (every cost figure in this README and in notebook 07 comes from it)."""
    if not BENCH_FILE.exists():
        return "(not measured)\n"
    d = json.loads(BENCH_FILE.read_text())
    c = d["config"]

    def rng(r, k):
        a, b = r[f"{k}_range"]
        return f"{r[k]:.2f} ({a:.2f}-{b:.2f})"
    rows = [[_label(r["method"]) if r["method"] != "nograd" else "no-grad chain", f"{r['flops'] / 1e9:.1f}",
             f"{r['flops_vs_full_bp']:.2f}", rng(r, "time_vs_full_bp"), rng(r, "time_vs_nograd"),
             f"{r['saved_vs_full_bp']:.3f}", f"{r['peak_saved_vs_full_bp']:.3f}",
             "—" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"] for r in d["rows"]]
    return (_table(["method", "GFLOP / step", "/ full BP", "time / full BP (min-max)", "time / no-grad chain",
                    "saved activations / full BP", "live at once / full BP", "peak MB"], rows)
            + f"\n{c['model_name']}, {c['n_steps']} steps, batch {c['batch']}, {c['rounds']} interleaved rounds, "
              f"{c['clock']} clock, torch {c['torch']}: `{d.get('command', '')}`\n")


def _sd15(M: dict) -> str:
    """One gradient step of every reward method on SD 1.5's full-width architecture on the CPU (sd/sd15.py)."""
    d = _measured("sd15_cpu")
    if not d:
        return "(not measured)\n"
    c = d["config"]
    rows = [[r["label"], "yes" if r["loss_finite"] else "NO", r["lora_b_moved"], "yes" if r["base_unchanged"] else "NO",
             f"{r['gflops']:.0f}", f"{r['cpu_seconds']:.1f}", f"{r['seconds']:.1f}", f"{r['peak_rss_mb'] / 1024:.1f}"]
            for r in d["rows"]]
    params = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in c["parameters"].items())
    return (_table(["method", "loss finite", "LoRA B moved", "base weights kept", "GFLOP", "CPU s", "wall s",
                    "peak RSS GB"], rows)
            + f"\n{params}; {c['latent']}x{c['latent']} latents ({c['image']}x{c['image']} images), {c['n_steps']} steps, "
              f"batch {c['batch']}, CFG {c['guidance_scale']}, {c['threads']} thread(s), torch {c['torch']}; step times "
              f"include FLOP counting: `{d.get('command', '')}`\n")


def _equal_memory(M: dict) -> str:
    """Every method under one live-activation budget, at equal FLOPs (measure/equal_memory.py)."""
    d = _measured("equal_memory_digit3")
    if not d:
        return "(not measured)\n"

    def setting(r):
        s = ", ".join(f"{k} = {v}" for k, v in r["setting"].items() if k != "checkpoint")
        s = ("checkpointed" if r["setting"].get("checkpoint") else "") + (("; " if s and r["setting"].get("checkpoint") else "") + s)
        return s + (f" (h* = {r['h_star']})" if "h_star" in r else "") or "—"
    rows = []
    for r in d["table"]:
        vs = r.get("vs_best")
        rows.append([_label(r["method"]), setting(r), f"{r['live_bytes'] / 2**20:.1f}", "yes" if r["fitted"] else "no",
                     f"{r['reward']:.3f} ± {r['reward_std']:.3f}" if r["fitted"] else "—",
                     "best" if r["method"] == d["best"] else
                     ("—" if not vs else f"{vs['verdict']}: {vs['diff']:+.3f} [{vs['lo']:+.3f}, {vs['hi']:+.3f}]")])
    return (_table(["method", "setting that fits", "live MiB", "fits", "reward at the FLOP budget",
                    "against the best (Welch 95%)"], rows)
            + f"\n`{d['task']}`, budget {d['budget_bytes'] / 2**20:.1f} MiB of live activations, {d['flops']:.0e} FLOPs, "
              f"{len(d['seeds'])} seeds: `{d['command']}`\n")


def _kl(M: dict) -> str:
    """The KL-to-pretrained regulariser swept (measure/kl.py): reward, drift and gold per coefficient."""
    d = _measured("arena_kl_digit3")
    if not d:
        return "(not measured)\n"
    rows = [[_label(r["method"]), f"{res['kl_coef']:g}", f"{r['final']:.3f} ± {r['final_std']:.3f}", f"{r['drift']:.3f}",
             f"{r['gold']:.3f}"] for res in d["results"] for r in res["rows"]]
    rows.sort(key=lambda row: (row[0], float(row[1])))
    return _table(["method", "KL coefficient", "reward", "drift", "gold"], rows) + f"\n`{d['command']}`\n"


MEASURED_BLOCKS = {"arena-bias": _arena_curves, "rlr-cost": _rlr_cost, "cost": _cost, "sd15": _sd15,
                   "equal-memory": _equal_memory, "kl": _kl}
