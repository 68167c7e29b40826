"""Replaying budgets: the arena turns a time budget into step counts by timing, so two runs of a notebook differ
by their step counts. A run with $MINIALIGN_STEPS_LOG set logs each arena.run()'s counts (one JSON line per call);
a run with $MINIALIGN_STEPS_REPLAY pointing at that log uses them instead of timing, and repeats the first run's
numbers exactly (`python -m minialign.repro --replay-steps RUN_DIR`, then `--compare`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

STEPS_LOG, STEPS_REPLAY = "MINIALIGN_STEPS_LOG", "MINIALIGN_STEPS_REPLAY"  # see replayed
_calls = {"n": 0}


def replayed(task_name: str, method_names) -> dict | None:
    """The step counts of this process's n-th arena.run() as a previous run logged them (JSON lines in the file
    $MINIALIGN_STEPS_REPLAY; `repro --replay-steps`), so a rerun of a notebook repeats its budgets exactly; None
    without that variable."""
    path = os.environ.get(STEPS_REPLAY)
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"{STEPS_REPLAY}={path}: no such log; the run to replay must have logged its step counts there")
    entries = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    i = _calls["n"]
    if i >= len(entries) or entries[i]["task"] != task_name or set(entries[i]["steps"]) != set(method_names):
        raise ValueError(f"{STEPS_REPLAY}={path}: its entry {i} does not match run({list(method_names)}, {task_name!r}); "
                         "replay a log of the same notebook and profile")
    return entries[i]["steps"]


def record(task_name: str, steps: dict) -> None:
    """Append this run's step counts to $MINIALIGN_STEPS_LOG (one JSON line per run() call), if set."""
    _calls["n"] += 1
    path = os.environ.get(STEPS_LOG)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"task": task_name, "steps": steps}) + "\n")
