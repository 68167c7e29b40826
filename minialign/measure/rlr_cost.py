"""What one RLR gradient step costs next to full backprop, per ZO option, side by side in one run (issue 19, item 12).

    python -m minialign.measure.rlr_cost --model digits --steps 50 --batch 32 --rounds 5 --json rlr_cost.json

One step = one call of the loss_fn and loss.backward() (as minialign.measure.bench counts it). Per variant:

    flops        torch.utils.flop_counter.FlopCounterMode over the step (forward, the backwards RLR runs inside its
                 loss, and the final backward); matrix products and convolutions, 2 per multiply-add. The main cost.
    live_bytes   the peak of autograd's saved tensors alive at once (measure.memory.peak_saved_bytes, parameters
                 left out): the activation memory the step needs. RLR's headline cost (the paper's claim).
    seconds      median over interleaved rounds (bench.interleaved_times), this process's CPU clock: a second axis.

Variants: full backprop (the reference), RLR's default (h = 2, inherent-noise ZO at every other step, one backward
per ZO step), RLR with zo_subsample = 5 (5 ZO steps, scaled |Z| / 5), the paired perturbation ZO (a second no-grad
chain), and the paper's one-chain perturbation ZO (no second chain, no ZO backward). Nothing is asserted.

Measured with the command above (shipped digits UNet, 1 thread, torch 2.x CPU, a shared 2-core machine):

    variant              GFLOP /full BP  live MB /full BP  time /full BP (min-max)
    full_bp              73.61     1.00   390.88    1.000   1.00
    rlr                  97.52     1.32    33.58    0.086   1.24 (1.22-1.26)
    rlr_zo5              35.94     0.49    33.58    0.086   0.46 (0.44-0.47)
    rlr_perturb          53.19     0.72    27.47    0.070   0.78 (0.75-0.85)
    rlr_perturb_chain    28.61     0.39    27.47    0.070   0.60 (0.59-0.64)

RLR's cost is its memory: 0.07-0.09x full backprop's live activations whatever the ZO. Its compute depends on the
ZO: the inherent-noise ZO runs a backward per ZO step (1.32x full backprop's FLOPs), subsampling 5 of 47 steps
brings it to 0.49x (at a variance cost: each kept term is scaled by 47 / 5), the one-chain perturbation to 0.39x
(one no-grad chain, FO, the HO sub-chain; its time, 0.60x, adds the parameter-sized noise drawn per ZO step, which
FLOPs do not count). The one-chain form's variance is O(Var r / s^2) (tests/test_rlr.py: test_variance_ordering).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from minialign import methods as registry
from minialign.measure import bench
from minialign.measure.memory import peak_saved_bytes
from minialign.methods import rlr

VARIANTS = {"rlr": {}, "rlr_zo5": dict(zo_subsample=5), "rlr_perturb": dict(zo="perturb"),
            "rlr_perturb_chain": dict(zo="perturb_chain")}


def losses(schedule, reward, shape, cond, n_steps: int, batch: int) -> dict:
    """{name: loss_fn}: nograd is left to bench; full_bp from the registry, the RLR variants from rlr.make_loss."""
    out = {registry.EXACT: registry.build(registry.EXACT, schedule, reward, shape=shape, cond=cond, n_steps=n_steps,
                                          batch=batch)[0]}
    for name, over in VARIANTS.items():
        out[name] = rlr.make_loss(schedule, reward, rlr.RLRConfig(n_steps=n_steps, batch=batch, **over), shape=shape,
                                  cond=cond)
    return out


def measure(model: str = "digits", n_steps: int = 50, batch: int = 32, rounds: int = 5) -> dict:
    net, schedule, reward, shape, cond, note = bench.setup(model)
    params = list(net.parameters())
    fns = losses(schedule, reward, shape, cond, n_steps, batch)

    def step_of(fn):
        def step(seed):
            loss = fn(net, 0, torch.Generator().manual_seed(seed))[0]
            loss.backward()
            net.zero_grad(set_to_none=True)
        return step

    steps = {k: step_of(f) for k, f in fns.items()}
    rows = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            steps[name](0)
        live = peak_saved_bytes(lambda: fn(net, 0, torch.Generator().manual_seed(0))[0], exclude=params)
        rows[name] = {"flops": counter.get_total_flops(), "live_bytes": live}
        steps[name](1)  # warm-up
    times = bench.interleaved_times(steps, rounds, clock=time.process_time)
    ref = rows[registry.EXACT]
    for name, row in rows.items():
        ratio = [t / f for t, f in zip(times[name], times[registry.EXACT])]
        row.update(seconds=statistics.median(times[name]), time_vs_full_bp=statistics.median(ratio),
                   time_vs_full_bp_range=[min(ratio), max(ratio)], flops_vs_full_bp=row["flops"] / ref["flops"],
                   live_vs_full_bp=row["live_bytes"] / ref["live_bytes"])
    return {"config": dict(model=model, weights=note, n_steps=n_steps, batch=batch, rounds=rounds, clock="cpu",
                           threads=torch.get_num_threads(), torch=torch.__version__), "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"one gradient step, {c['model']} ({c['weights']}), {c['n_steps']} steps, batch {c['batch']}, "
             f"{c['threads']} thread(s), {c['rounds']} interleaved rounds, CPU clock",
             f"{'variant':<19}{'GFLOP':>9}{'/full BP':>9}{'live MB':>9}{'/full BP':>9}{'time s':>8}{'/full BP (min-max)':>21}"]
    for name, r in result["rows"].items():
        lo, hi = r["time_vs_full_bp_range"]
        lines.append(f"{name:<19}{r['flops'] / 1e9:>9.2f}{r['flops_vs_full_bp']:>9.2f}{r['live_bytes'] / 2**20:>9.2f}"
                     f"{r['live_vs_full_bp']:>9.3f}{r['seconds']:>8.3f}{r['time_vs_full_bp']:>9.2f} ({lo:.2f}-{hi:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=bench.MODELS, default="digits")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    result = measure(a.model, a.steps, a.batch, a.rounds)
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
