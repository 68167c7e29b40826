"""What one gradient step costs: wall time, bytes saved for backward, peak memory, per method.

    python -m minialign.bench --model digits --steps 50 --json bench.json
    python -m minialign.bench --model toy2d --steps 50 --methods nograd full_bp draft_1 refl

One gradient step = draw a batch, run the method's chain (forward), score it, backward: exactly one
call of the method's loss_fn followed by loss.backward() (DDPO: one sampling round + its first PPO
update). Every method is measured in the same run, on the same model, batch and chain length:

    seconds      median wall time of `--repeats` steps after three warm-up steps
    saved_bytes  sum of numel * element_size over the tensors autograd saves for backward
                 (torch.autograd.graph.saved_tensors_hooks), each saved view counted once and the
                 model's own parameters left out: the activations a backward pass has to keep.
                 A checkpointed step saves only its inputs (the rest is recomputed in backward).
    peak_mb      from the command line (unless --in-process) each method runs in a fresh subprocess and
                 reports its peak RSS (resource.getrusage's ru_maxrss, which only ever grows) minus its
                 RSS just before the first step, so one method's peak cannot hide another's. In-process
                 (run(isolate=False), as the notebooks and tests call it) it is not measured on CPU (None).
                 On CUDA: torch.cuda.max_memory_allocated, reset before each method.

Ratios are printed against full backprop and against one no-grad sampling chain (`nograd`), both
measured side by side here; nothing is asserted about them (see README's table).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from .methods import ddpo, full_bp, refl, truncated_bp
from .sampling import plan_none, sample
from .schedule import Schedule, timesteps


def _factories(n: int, batch: int, k: int) -> dict[str, tuple[str, Callable]]:
    """name -> (description, make(schedule, reward, shape, cond) -> loss_fn); `nograd` has none."""
    tb = lambda **kw: lambda s, r, shape, cond: truncated_bp.make_loss(  # noqa: E731
        s, r, truncated_bp.TruncatedBPConfig(batch=batch, n_steps=n, **kw), shape=shape, cond=cond)
    return {
        "nograd": ("one sampling chain, no graph", None),
        "full_bp": ("full backprop", lambda s, r, shape, cond: full_bp.make_loss(
            s, r, full_bp.FullBPConfig(batch=batch, n_steps=n), shape=shape, cond=cond)),
        "full_bp_ckpt": ("full backprop, checkpoint per step", lambda s, r, shape, cond: full_bp.make_loss(
            s, r, full_bp.FullBPConfig(batch=batch, n_steps=n, checkpoint=True), shape=shape, cond=cond)),
        "draft_1": ("DRaFT-1", tb(k=1)),
        "draft_k": (f"DRaFT-K, K={min(k, n)}", tb(k=min(k, n))),
        "alignprop": (f"AlignProp, K={max(1, n // 2)} (mean of K~U(0,N))", tb(k=max(1, n // 2), variant="alignprop")),
        "draft_lv": ("DRaFT-LV, n=2", tb(variant="draft_lv", lv_samples=2)),
        "refl": ("ReFL", lambda s, r, shape, cond: refl.make_loss(
            s, r, refl.ReFLConfig(batch=batch, n_steps=n), shape=shape, cond=cond)),
        "ddpo": ("DDPO (sampling + 1st PPO update)", lambda s, r, shape, cond: ddpo.make_loss(
            s, r, ddpo.DDPOConfig(batch=batch, n_steps=n), shape=shape, cond=cond)),
    }


METHODS = tuple(_factories(1, 1, 1))
MODELS = ("toy2d", "digits")


def setup(model_name: str, device: str = "cpu"):
    """(trainable model copy, schedule, reward, sample shape, cond, note). Shipped weights when present;
    otherwise random weights of the same architecture (the cost does not depend on the weights)."""
    from .rewards import classifier_reward, component_log_density
    from .toy import store
    from .toy.models import DigitsUNet, MLPDenoiser

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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def saved_bytes(fn: Callable[[], torch.Tensor], exclude=()) -> int:
    """Bytes autograd saves for backward while running fn (each storage view once; `exclude`d tensors'
    storages, e.g. the parameters, left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key[0] not in skip and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0]


def measure(method: str, model_name: str = "toy2d", n_steps: int = 50, batch: int = 32, repeats: int = 3,
            k: int = 5, device: str = "cpu") -> dict:
    """Cost of one gradient step of `method` (see the module docstring), in this process."""
    model, schedule, reward, shape, cond, note = setup(model_name, device)
    desc, make = _factories(n_steps, batch, k)[method]
    params = list(model.parameters())
    ts = timesteps(schedule.T, n_steps, "trailing")  # the methods' default spacing

    def step(seed: int):
        g = torch.Generator(device=device).manual_seed(seed)  # the sampler draws noise on the model's device
        if make is None:
            x_T = torch.randn((batch, *shape), generator=g, device=device)
            with torch.no_grad():
                return sample(model, schedule, x_T, ts, plan=plan_none(n_steps), generator=g)[0]
        loss, _ = make(schedule, reward, shape, cond)(model, 0, g)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    def timed(seed):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(seed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rss_before = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    saved = 0
    if make is not None:
        forward = lambda: make(schedule, reward, shape, cond)(model, 0, torch.Generator(device=device).manual_seed(0))[0]  # noqa: E731
        saved = saved_bytes(forward, exclude=params)
    for _ in range(3):  # warm-up (allocator, kernel caches): the first calls of a fresh process are slow
        timed(0)
    times = [timed(1 + r) for r in range(repeats)]
    out = {"method": method, "description": desc, "seconds": statistics.median(times), "times": times,
           "saved_bytes": saved, "peak_mb": None, "model": model_name, "n_steps": n_steps, "batch": batch,
           "weights": note, "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["rss_before_mb"] = rss_before
    return out


def _measure_isolated(method: str, **kw) -> dict:
    """measure() in a fresh python process; adds peak_mb = peak RSS - RSS before the first step (CPU)."""
    cmd = [sys.executable, "-m", "minialign.bench", "--worker", json.dumps({"method": method, **kw})]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench worker for {method!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _worker(spec: str) -> None:
    kw = json.loads(spec)
    out = measure(**kw)
    if not kw.get("device", "cpu").startswith("cuda"):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        out["peak_mb"] = peak - out["rss_before_mb"]
    print(json.dumps(out))


def run(model: str = "toy2d", n_steps: int = 50, methods=None, batch: int = 32, repeats: int = 3, k: int = 5,
        device: str = "cpu", isolate: bool = False) -> dict:
    """Measure every method side by side; returns {"rows": [...], "config": {...}} with ratios filled in."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
    # the two references of the ratios are always measured, first
    methods = [m for m in ("nograd", "full_bp") if m not in methods] + methods
    kw = dict(model_name=model, n_steps=n_steps, batch=batch, repeats=repeats, k=k, device=device)
    rows = [(_measure_isolated(m, **kw) if isolate else measure(m, **kw)) for m in methods]
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["time_vs_full_bp"] = r["seconds"] / by["full_bp"]["seconds"]
        r["time_vs_nograd"] = r["seconds"] / by["nograd"]["seconds"]
        r["saved_vs_full_bp"] = r["saved_bytes"] / max(by["full_bp"]["saved_bytes"], 1)
        fb = by["full_bp"]["peak_mb"]
        r["peak_vs_full_bp"] = None if r["peak_mb"] is None or not fb else r["peak_mb"] / fb
    return {"config": {**kw, "isolate": isolate, "torch": torch.__version__}, "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    head = (f"one gradient step, model={c['model_name']} ({result['rows'][0]['weights']}), {c['n_steps']} steps, "
            f"batch {c['batch']}, {c['device']}, {result['rows'][0]['threads']} thread(s), median of {c['repeats']}")
    cols = f"{'method':<14}{'description':<36}{'time s':>9}{'/fullBP':>9}{'/nograd':>9}{'saved MB':>10}{'/fullBP':>9}{'peak MB':>9}"
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{r['method']:<14}{r['description'][:35]:<36}{r['seconds']:>9.3f}{r['time_vs_full_bp']:>9.2f}"
                     f"{r['time_vs_nograd']:>9.2f}{r['saved_bytes'] / 2**20:>10.2f}{r['saved_vs_full_bp']:>9.3f}{peak:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="toy2d")
    p.add_argument("--steps", type=int, default=50, help="sampling steps N of the chain")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=5, help="K of draft_k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-process", action="store_true",
                   help="measure every method in this process (faster; peak memory not measured on CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = p.parse_args(argv)
    result = run(args.model, args.steps, args.methods, args.batch, args.repeats, args.k, args.device,
                 isolate=not args.in_process)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
