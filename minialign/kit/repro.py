"""Execute the notebooks with papermill and check their headline metrics.

    python -m minialign.repro --profile smoke --out runs/smoke            # every notebook, CI-sized
    python -m minialign.repro --profile cpu --out runs/cpu --only 00_toy_diffusion
    python -m minialign.repro --profile cpu --out runs/cpu --inplace      # refresh the committed outputs

Each notebook has a cell tagged `parameters` with `profile`, `device`, `seed` and `metrics_out`; its last
cell calls `save_metrics`. Results land in OUT/<name>.ipynb and OUT/metrics/<name>.json; the tolerances
in data/expected/<name>.json (per profile, {"key": {"min": a, "max": b}}) are checked, and
OUT/report.json sums it up, with OUT/report.md and OUT/report.html for people (see minialign.kit.report: versions,
hardware, wall times, every metric against its tolerance, the figures under OUT/figures/). While a notebook
runs, a line every HEARTBEAT seconds gives its elapsed time and, when OUT/report.json holds a previous run of it
in the same profile, that run's time as the estimate. The exit status is non-zero if any notebook fails or
misses a tolerance, and the console and the report name the metric.

Two runs of the same profile and seed give identical metrics except measured durations: the arena's time budgets
become step counts by timing, so `--replay-steps RUN` repeats the step counts the run in folder RUN logged, and
`--compare RUN_A RUN_B` lists every metric that differs (timing metrics aside; exit 1 if any):

    python -m minialign.repro --profile cpu --out runs/a && python -m minialign.repro --profile cpu --out runs/b --replay-steps runs/a
    python -m minialign.repro --compare runs/a runs/b

Kernels talk to papermill over IPC sockets on POSIX (ipykernel warns about unencrypted TCP otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from minialign.kit.kernel import kernel_options, no_widget_sync, set_env
from minialign.measure import replay
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ROOT / "data" / "expected"
PROFILES = ("smoke", "cpu", "gpu")
CLASS_PROFILE = "smoke"  # what students run (python -m minialign.course build / nbgrader-source): Run-All in minutes
HEARTBEAT = 60.0  # seconds between the "still running" lines of main()


def environment() -> str:
    """One line per fact: versions and hardware this run used (cell 1 of every notebook prints it)."""
    import torch

    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    for name in ("torch", "numpy", "diffusers", "transformers", "peft", "accelerate", "sklearn", "papermill"):
        try:
            lines.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            lines.append(f"{name} not installed")
    lines.append(f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    else:
        lines.append("gpu: none")
    from minialign import __version__
    lines.append(f"minialign {__version__}")
    return "\n".join(lines)


def save_metrics(metrics: dict, path: str | os.PathLike | None) -> dict:
    """Write a flat dict of numbers (NaN/inf refused) as JSON to `path`; None (notebooks' default) writes nothing."""
    out = {}
    for k, v in metrics.items():
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"metric {k!r} is {v}: a headline metric must be finite")
        out[k] = v
    if path is not None:  # metrics land only where the caller (repro) asks
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def tolerances(name: str, profile: str) -> dict:
    """data/expected/<name>.json[profile]: {metric: {"min": a, "max": b}} ({} when there is none)."""
    path = EXPECTED / f"{name}.json"
    return json.loads(path.read_text()).get(profile, {}) if path.exists() else {}


def check_tolerances(name: str, profile: str, metrics: dict) -> list[str]:
    """Failures (as sentences) of metrics against data/expected/<name>.json[profile]."""
    failures = []
    for key, bound in tolerances(name, profile).items():
        if key not in metrics:
            failures.append(f"{key}: missing from the metrics")
            continue
        v = metrics[key]
        if "min" in bound and v < bound["min"]:
            failures.append(f"{key} = {v:.6g} < min {bound['min']}")
        if "max" in bound and v > bound["max"]:
            failures.append(f"{key} = {v:.6g} > max {bound['max']}")
    return failures


def commit_copy(executed: Path, dest: Path) -> None:
    """Copy an executed notebook for committing, without papermill's `injected-parameters` cell (which would
    re-set the knobs right after the `parameters` cell, so a reader editing `profile` would see no effect) and
    without the machine paths papermill records (metadata.papermill input_path / output_path, and the
    metrics_out parameter repro passed)."""
    nb = json.loads(Path(executed).read_text())
    nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    pm = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        pm.pop(key, None)
    pm.get("parameters", {}).pop("metrics_out", None)  # where this run wrote its metrics: a path of this machine
    Path(dest).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(name: str, profile: str, out: Path, device: str = "cpu", inplace: bool = False,
                 parameters: dict | None = None, replay_from=None) -> dict:
    """Execute one notebook; returns {name, profile, seconds, ok, error, failures, metrics, tolerances}.
    parameters: further papermill parameters (e.g. {"lr": 1e-12} to check that a notebook that learns nothing fails).
    replay_from: an earlier run's folder whose arena step counts (OUT/steps/<name>.jsonl) this run repeats."""
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = (out / "metrics" / f"{name}.json").resolve()
    metrics_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = {"name": name, "profile": profile, "ok": False, "error": None, "failures": [], "metrics": {},
              "tolerances": tolerances(name, profile)}
    log = (out / "steps" / f"{name}.jsonl").resolve()  # the arena's step counts (minialign.measure.replay)
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline",  # the kernel inherits it; Agg hides figures
           "TQDM_DISABLE": "1",  # no progress bars frozen at 0% in a committed notebook (tqdm reads it; Jupyter keeps them)
           replay.STEPS_LOG: str(log), replay.STEPS_REPLAY: str((Path(replay_from) / "steps" / f"{name}.jsonl").resolve())
           if replay_from else None}
    saved = {k: os.environ.get(k) for k in env}
    sockets = tempfile.TemporaryDirectory(prefix="minialign-kernel-")
    try:
        set_env(env)
        with no_widget_sync():
            pm.execute_notebook(
                str(NOTEBOOKS / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                parameters={**(parameters or {}), "profile": profile, "device": device, "metrics_out": str(metrics_path)},
                kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False, **kernel_options(sockets.name),
            )
    except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
        result["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    finally:
        set_env(saved)
        sockets.cleanup()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if result["error"] is None:
        if not metrics_path.exists():
            result["error"] = f"the notebook wrote no metrics to {metrics_path} (its last cell must call save_metrics)"
        else:
            result["metrics"] = json.loads(metrics_path.read_text())
            result["failures"] = check_tolerances(name, profile, result["metrics"])
            result["ok"] = not result["failures"]
    if inplace and result["error"] is None:
        commit_copy(out / f"{name}.ipynb", NOTEBOOKS / f"{name}.ipynb")
        (NOTEBOOKS / "metrics").mkdir(exist_ok=True)
        shutil.copy(metrics_path, NOTEBOOKS / "metrics" / f"{name}.json")
    return result


TIMING = ("seconds", "time", "backward_fraction")  # metric names holding a duration or a ratio of durations


def _differ(a, b, rtol: float) -> bool:
    if rtol and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
    return a != b


def compare(run_a, run_b, rtol: float = 0.0) -> tuple[list[str], int, int]:
    """(differences as sentences, metrics compared, timing metrics skipped) between two runs' OUT/metrics/*.json.
    Timing metrics (a name containing one of TIMING) are measurements of the clock and are skipped. rtol = 0: equal
    to the bit; rtol > 0: numbers within that relative tolerance count as equal (float32 sums in another order, as
    with another thread count, differ in the 7th digit)."""
    diffs, same, timed = [], 0, 0
    a_dir, b_dir = Path(run_a) / "metrics", Path(run_b) / "metrics"
    names = sorted({p.name for p in a_dir.glob("*.json")} | {p.name for p in b_dir.glob("*.json")})
    if not names:
        raise ValueError(f"no metrics under {a_dir} or {b_dir}: pass two --out folders of repro runs")
    for fname in names:
        if not (a_dir / fname).exists() or not (b_dir / fname).exists():
            diffs.append(f"{fname}: only in {'the second' if (b_dir / fname).exists() else 'the first'} run")
            continue
        a, b = json.loads((a_dir / fname).read_text()), json.loads((b_dir / fname).read_text())
        for key in sorted(set(a) | set(b)):
            if any(word in key for word in TIMING):
                timed += 1
            elif _differ(a.get(key), b.get(key), rtol):
                diffs.append(f"{fname[:-5]}.{key}: {a.get(key)} vs {b.get(key)}")
            else:
                same += 1
    return diffs, same, timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=PROFILES, default="smoke")
    p.add_argument("--out", default="runs/latest", help="folder for executed notebooks and metrics")
    p.add_argument("--only", nargs="+", metavar="NAME", help="notebook names (e.g. 00_toy_diffusion)")
    p.add_argument("--device", default="cpu", help="passed to the notebooks (cpu, cuda)")
    p.add_argument("--inplace", action="store_true", help="write executed notebooks back into notebooks/")
    p.add_argument("--list", action="store_true", help="list the notebooks and exit")
    p.add_argument("--replay-steps", metavar="RUN", help="repeat the arena step counts of the run in folder RUN")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two runs' metrics and exit")
    p.add_argument("--rtol", type=float, default=0.0, help="with --compare: relative tolerance (default 0: bit-equal)")
    args = p.parse_args(argv)
    if args.compare:
        diffs, same, timed = compare(*args.compare, rtol=args.rtol)
        print(f"[repro] {same} metrics identical{f' (to rtol {args.rtol:g})' if args.rtol else ''}, {len(diffs)} "
              f"different, {timed} timing metrics not compared")
        print("\n".join(f"    {d}" for d in diffs))
        return 1 if diffs else 0
    names = notebook_names()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"--only: unknown notebook(s) {unknown}; have {names}")
        names = args.only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = Path(args.out)
    previous = previous_seconds(out, args.profile)
    known = [previous[n] for n in names if n in previous]
    print(f"[repro] {len(names)} notebook(s), profile {args.profile}, out {out}"
          + (f"; previous runs took {sum(known):.0f} s for {len(known)} of them" if known else ""), flush=True)
    started = datetime.now(timezone.utc)
    results = []
    for i, name in enumerate(names, 1):
        estimate = previous.get(name)
        print(f"[repro] ({i}/{len(names)}) {name} ({args.profile}) started at {time.strftime('%H:%M:%S')}"
              + (f", last run took {estimate:.0f} s" if estimate else ""), flush=True)
        with _heartbeat(name, estimate):
            r = run_notebook(name, args.profile, out, args.device, args.inplace, replay_from=args.replay_steps)
        status = "ok" if r["ok"] else ("ERROR" if r["error"] else "OUT OF TOLERANCE")
        print(f"[repro] {name}: {status} in {r['seconds']} s", flush=True)
        for line in ([r["error"]] if r["error"] else []) + r["failures"]:
            print(f"    {line}", flush=True)
        results.append(r)
    from minialign.kit import report
    meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "profile": args.profile, "device": args.device,
            "command": "python -m minialign.repro " + " ".join(argv if argv is not None else sys.argv[1:]),
            "environment": environment()}
    md, page = report.write(results, out, meta)
    (out / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    bad = [r["name"] for r in results if not r["ok"]]
    print(f"[repro] {len(results) - len(bad)} passed, {len(bad)} failed" + (f": {bad}" if bad else "")
          + f"; report: {md} and {page}", flush=True)
    return 1 if bad else 0


def previous_seconds(out: Path, profile: str) -> dict:
    """{name: seconds} of the notebooks in OUT/report.json that ran in this profile (the estimates)."""
    try:
        old = json.loads((Path(out) / "report.json").read_text())
        return {r["name"]: float(r["seconds"]) for r in old if r.get("profile") == profile}
    except (OSError, ValueError, KeyError, TypeError):  # no previous run, or a report we cannot read
        return {}


class _heartbeat:
    """Context manager: prints "<name>: 60 s elapsed (last run took 655 s)" every HEARTBEAT seconds."""

    def __init__(self, name: str, estimate: float | None):
        self.name, self.estimate, self.stop = name, estimate, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        t0 = time.perf_counter()
        while not self.stop.wait(HEARTBEAT):
            elapsed = time.perf_counter() - t0
            left = f", about {max(self.estimate - elapsed, 0):.0f} s left" if self.estimate else ""
            print(f"[repro]   {self.name}: {elapsed:.0f} s elapsed{left}", flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


if __name__ == "__main__":
    sys.exit(main())
