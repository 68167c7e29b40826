"""What one gradient step costs: wall time, bytes saved for backward, peak memory, per registered method.

    python -m minialign.bench --model digits --steps 50 --rounds 9 --json bench.json
    python -m minialign.bench --model toy2d --steps 50 --methods full_bp draft_1 refl

One gradient step = draw a batch, run the method's chain (forward), score it, backward: exactly one call of the
method's loss_fn (built from the registry, minialign.methods) followed by loss.backward() (DDPO: one sampling round
+ its first PPO update). `nograd` is one sampling chain without graph: the floor of any method that samples a
fresh chain.

    seconds      measured in interleaved ROUNDS: every round runs every method once, in an order rotated from round
                 to round, after two warm-up steps each. A ratio is computed within its round (against that round's
                 no-grad chain and full backprop), so a machine that slows down for a while slows both sides of a
                 ratio; reported: the median ratio over rounds and its spread (min-max). `seconds` is the median.
    saved_bytes  sum of numel * element_size over the tensors autograd saves for backward
                 (torch.autograd.graph.saved_tensors_hooks), each saved view counted once and the model's own
                 parameters left out: the activations a backward pass has to keep. A checkpointed step saves
                 only its inputs (the rest is recomputed in backward).
    peak_saved   the peak of those bytes alive at once (a saved tensor counts until its graph is released):
                 differs from saved_bytes for a method that backpropagates pieces inside its loss (RLR's ZO).
    flops        FLOPs of one step (forward and backward, checkpoint recomputation included), counted with
                 torch.utils.flop_counter.FlopCounterMode over FLOP_SEEDS steps (mean, and min-max for a method whose
                 step cost is random: AlignProp's K, ReFL's t): the machine-independent cost, the same on every run.
    peak_mb      (--peak, or run(peak=True)) each method alone in a fresh subprocess: its peak RSS
                 (VmHWM, reset before the first step: a child inherits its parent's ru_maxrss) minus its RSS
                 before the first step, so one method's peak cannot hide another's. On CUDA:
                 torch.cuda.max_memory_allocated.

Nothing is asserted about the times (see README's table); they are measured side by side in one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from minialign import methods as registry
from minialign.measure.memory import peak_rss_mb, peak_saved_bytes, reset_peak_rss, rss_mb, saved_bytes  # noqa: F401  (re-exported)
from minialign.sampling import plan_none, sample
from minialign.schedule import timesteps

MODELS = ("toy2d", "digits")
FLOP_SEEDS = (0, 1, 2)  # steps whose FLOPs are counted per method (a random-cost method's spread shows)


def count_flops(step: Callable[[int], torch.Tensor], seeds=FLOP_SEEDS) -> list[int]:
    """FLOPs of step(seed) for each seed: forward and backward under FlopCounterMode (matrix products and
    convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = []
    for seed in seeds:
        with FlopCounterMode(display=False) as counter:
            step(seed)
        out.append(counter.get_total_flops())
    return out


def bench_methods() -> list[str]:
    """`nograd` plus every registered method that maximises a reward (SFT-PG matches data: not benched)."""
    return ["nograd"] + registry.names(reward=True)


def setup(model_name: str, device: str = "cpu"):
    """(trainable model copy, schedule, reward, sample shape, cond, note). Shipped weights when present;
    otherwise random weights of the same architecture (the cost does not depend on the weights)."""
    from minialign.rewards import classifier_reward, component_log_density
    from minialign.toy import store
    from minialign.toy.models import DigitsUNet, MLPDenoiser
    from minialign.schedule import Schedule

    name = {"toy2d": "gmm", "digits": "digits"}.get(model_name)
    if name is None:
        raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")
    try:
        model, schedule, _ = store.load(name)
        note = f"shipped checkpoint {name!r}"
    except FileNotFoundError:
        torch.manual_seed(0)
        if model_name == "toy2d":
            model, schedule = MLPDenoiser(1000), Schedule.make("sigmoid", 1000, 1e-5, 1e-2)
        else:
            model, schedule = DigitsUNet(1000), Schedule.make("linear", 1000, 1e-4, 2e-2)
        note = f"random weights (no checkpoint {name!r} under data/)"
    model = model.to(device).requires_grad_(True).train()
    if model_name == "toy2d":
        return model, schedule, component_log_density(0, std=0.25), (2,), None, note
    return model, schedule, classifier_reward(0), (1, 8, 8), None, note


def make_step(method: str, model, schedule, reward, shape, cond, n_steps: int, batch: int, model_name: str,
              device: str = "cpu") -> tuple[str, Callable[[int], torch.Tensor], Callable]:
    """(description, step(seed) -> loss after backward, forward(seed) -> loss with graph) for one method."""
    if method == "nograd":
        ts = timesteps(schedule.T, n_steps, "trailing")  # the methods' default spacing

        def nograd(seed):
            g = torch.Generator(device=device).manual_seed(seed)
            x_T = torch.randn((batch, *shape), generator=g, device=device)
            with torch.no_grad():
                return sample(model, schedule, x_T, ts, plan=plan_none(n_steps), generator=g)[0]

        return "one sampling chain, no graph", nograd, None
    m = registry.get(method)
    if m.prepare is not None:  # it changes the model it trains (T-LoRA's adapters): its own copy
        model = copy.deepcopy(model)
    loss_fn, _ = registry.setup(method, schedule, reward, shape=shape, cond=cond, kind="toy",
                                context={"model_name": model_name}, model=model, n_steps=n_steps, batch=batch)

    def forward(seed):
        return loss_fn(model, 0, torch.Generator(device=device).manual_seed(seed))[0]

    def step(seed):
        loss = forward(seed)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    forward.params = list(model.parameters())  # the model's own tensors, left out of the saved bytes
    return f"{m.label}: {m.description}", step, forward


def _measure_isolated(method: str, **kw) -> float:
    """_peak() in a fresh python process (peak RSS cannot be reset within one)."""
    cmd = [sys.executable, "-m", "minialign.measure.bench", "--worker", json.dumps({"method": method, **kw})]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench worker for {method!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def _worker(spec: str) -> None:
    kw = json.loads(spec)
    print(json.dumps({"peak_mb": _peak(kw.pop("method"), **kw)}))


def _timed(fn, seed, device, clock=time.perf_counter) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = clock()
    fn(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - t0


def interleaved_times(steps: dict, rounds: int, device: str = "cpu", clock=time.perf_counter) -> dict:
    """{name: [seconds of steps[name](seed) in each round]}: every round runs every step once, the order rotated
    from round to round, so a passing slowdown of the machine hits every method alike (bench and arena use it)."""
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(_timed(steps[n], 100 + r, device, clock))
    return times


def _peak(method: str, **kw) -> float:
    """Peak memory (MB) of one method's steps, alone in this process (the worker's job)."""
    model, schedule, reward, shape, cond, _ = setup(kw["model_name"], kw["device"])
    _, step, _ = make_step(method, model, schedule, reward, shape, cond, kw["n_steps"], kw["batch"], kw["model_name"],
                           kw["device"])
    if kw["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    before = rss_mb()
    for seed in range(2):
        step(seed)
    if kw["device"].startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb() - before


def run(model: str = "toy2d", n_steps: int = 50, methods=None, batch: int = 32, rounds: int = 5,
        device: str = "cpu", peak: bool = False, clock: str = "wall") -> dict:
    """Measure every method side by side in interleaved rounds; returns {"rows": [...], "config": {...}}.
    clock: "wall" (perf_counter) or "cpu" (this process's CPU time: on a machine shared with other work, and with
    one torch thread, the time an idle machine would take)."""
    known = bench_methods()
    methods = list(methods or known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {known}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    ref = registry.EXACT
    methods = [m for m in ("nograd", ref) if m not in methods] + methods  # the ratios' references
    net, schedule, reward, shape, cond, note = setup(model, device)
    params = list(net.parameters())
    steps, saved, live, desc, flops = {}, {}, {}, {}, {}
    for m in methods:
        desc[m], steps[m], forward = make_step(m, net, schedule, reward, shape, cond, n_steps, batch, model, device)
        own = params + getattr(forward, "params", [])
        saved[m] = saved_bytes(lambda: forward(0), exclude=own) if forward is not None else 0
        live[m] = peak_saved_bytes(lambda: forward(0), exclude=own) if forward is not None else 0
        for w in range(2):  # warm-up (allocator, kernel caches)
            steps[m](w)
        flops[m] = count_flops(steps[m])
    times = interleaved_times(steps, rounds, device, time.process_time if clock == "cpu" else time.perf_counter)
    kw = dict(model_name=model, n_steps=n_steps, batch=batch, device=device)
    rows = []
    for m in methods:
        vs_nograd = [t / n for t, n in zip(times[m], times["nograd"])]
        vs_full = [t / f for t, f in zip(times[m], times[ref])]
        rows.append({"method": m, "description": desc[m], "seconds": statistics.median(times[m]), "times": times[m],
                     "time_vs_nograd": statistics.median(vs_nograd), "time_vs_nograd_range": [min(vs_nograd), max(vs_nograd)],
                     "time_vs_full_bp": statistics.median(vs_full), "time_vs_full_bp_range": [min(vs_full), max(vs_full)],
                     "flops": statistics.mean(flops[m]), "flops_range": [min(flops[m]), max(flops[m])],
                     "flops_vs_full_bp": statistics.mean(flops[m]) / max(statistics.mean(flops[ref]), 1),
                     "saved_bytes": saved[m], "saved_vs_full_bp": saved[m] / max(saved[ref], 1),
                     "peak_saved_bytes": live[m], "peak_saved_vs_full_bp": live[m] / max(live[ref], 1),
                     "peak_mb": _measure_isolated(m, **kw) if peak else None, "n_steps": n_steps, "batch": batch,
                     "weights": note, "threads": torch.get_num_threads()})
    fb = next(r for r in rows if r["method"] == ref)["peak_mb"]
    for r in rows:
        r["peak_vs_full_bp"] = None if r["peak_mb"] is None or not fb else r["peak_mb"] / fb
    return {"config": {**kw, "rounds": rounds, "clock": clock, "torch": torch.__version__}, "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    head = (f"one gradient step, model={c['model_name']} ({result['rows'][0]['weights']}), {c['n_steps']} steps, "
            f"batch {c['batch']}, {c['device']}, {result['rows'][0]['threads']} thread(s), {c['rounds']} interleaved rounds, "
            f"{c['clock']} clock")
    cols = (f"{'method':<14}{'GFLOP':>8}{'/full BP':>9}{'time s':>8}{'/nograd (min-max)':>20}{'/full BP (min-max)':>21}{'saved MB':>10}"
            f"{'/full BP':>9}{'live MB':>9}{'/full BP':>9}{'peak MB':>9}")
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        a, b = r["time_vs_nograd_range"], r["time_vs_full_bp_range"]
        lines.append(f"{r['method']:<14}{r['flops'] / 1e9:>8.1f}{r['flops_vs_full_bp']:>9.2f}{r['seconds']:>8.3f}{r['time_vs_nograd']:>8.2f} ({a[0]:.2f}-{a[1]:.2f})"
                     f"{r['time_vs_full_bp']:>9.2f} ({b[0]:.2f}-{b[1]:.2f}){r['saved_bytes'] / 2**20:>10.2f}"
                     f"{r['saved_vs_full_bp']:>9.3f}{r['peak_saved_bytes'] / 2**20:>9.2f}{r['peak_saved_vs_full_bp']:>9.3f}{peak:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="toy2d")
    p.add_argument("--steps", type=int, default=50, help="sampling steps N of the chain")
    p.add_argument("--methods", nargs="+", choices=bench_methods(), default=bench_methods())
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every method once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (robust to other work on the machine; use one thread)")
    p.add_argument("--peak", action="store_true", help="also measure peak memory, each method in its own process")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = p.parse_args(argv)
    result = run(args.model, args.steps, args.methods, args.batch, args.rounds, args.device, peak=args.peak,
                 clock=args.clock)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
