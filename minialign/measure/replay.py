"""Replaying budgets: a time budget becomes a count (the arena's step counts, optimize_latent's iterations) by
timing, so two runs of a notebook differ by those counts. A run with $MINIALIGN_STEPS_LOG set logs every count
(one JSON line each, tagged by its kind); a run with $MINIALIGN_STEPS_REPLAY pointing at that log takes the n-th
logged count of each kind instead of timing, and repeats the first run's numbers exactly
(`python -m minialign.repro --replay-steps RUN_DIR`, then `--compare`).

Only time budgets need this: the arena's FLOP and network-call budgets (measure/flops.py) are counted step by step,
so their step counts follow from (method, config, seed) alone and a run repeats exactly with no log at all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

STEPS_LOG, STEPS_REPLAY = "MINIALIGN_STEPS_LOG", "MINIALIGN_STEPS_REPLAY"
_calls: dict = {}  # kind -> how many counts of that kind this process has recorded


def replayed(task_name: str, method_names) -> dict | None:
    """The step counts of this process's n-th arena.run() as a previous run logged them; None without
    $MINIALIGN_STEPS_REPLAY."""
    entry = _entry("arena")
    if entry is None:
        return None
    if entry["task"] != task_name or set(entry["steps"]) != set(method_names):
        raise ValueError(f"{STEPS_REPLAY}: its arena entry {_calls.get('arena', 0)} ({entry['task']}, {sorted(entry['steps'])}) "
                         f"does not match run({list(method_names)}, {task_name!r}); replay a log of the same notebook and profile")
    return entry["steps"]


def record(task_name: str, steps: dict) -> None:
    """Log this arena.run()'s step counts (if $MINIALIGN_STEPS_LOG is set)."""
    _log("arena", {"task": task_name, "steps": steps})


def replayed_count(kind: str) -> int | None:
    """The n-th count of `kind` (e.g. "optimize_latent": iterations done within a time budget) from the replayed
    log; None without $MINIALIGN_STEPS_REPLAY."""
    entry = _entry(kind)
    return None if entry is None else int(entry["count"])


def record_count(kind: str, count: int) -> None:
    _log(kind, {"count": int(count)})


def _entry(kind: str) -> dict | None:
    path = os.environ.get(STEPS_REPLAY)
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"{STEPS_REPLAY}={path}: no such log; the run to replay must have logged its counts there")
    entries = [e for e in (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
               if e.get("kind", "arena") == kind]
    i = _calls.get(kind, 0)
    if i >= len(entries):
        raise ValueError(f"{STEPS_REPLAY}={path}: it logged {len(entries)} {kind} count(s), this run asks for entry {i}; "
                         "replay a log of the same notebook and profile")
    return entries[i]


def _log(kind: str, entry: dict) -> None:
    _calls[kind] = _calls.get(kind, 0) + 1
    path = os.environ.get(STEPS_LOG)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **entry}) + "\n")
