"""An instructor's nbgrader round, tried on every notebook and timed: what `course nbgrader-source` promises, checked.

    python -m minialign.kit.nbgrader_trial COURSE_DIR [--notebooks 00_toy_diffusion 07_results] [--json FILE]

For each notebook, in its own assignment (`ps_<name>`): `course nbgrader-source` (class profile, solutions, answer
keys), `nbgrader generate_assignment`, two submissions (the solution source, "solver"; the blank release, "blank"),
`nbgrader autograde` of each, timed. Prints per notebook: solver's and blank's scores out of the maximum, and the
seconds each autograde took (wall clock: on a shared machine an upper bound). Exit 1 when a solution is not full
marks or a blank scores above 0. Needs nbgrader (`pip install -e ".[course]"`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from minialign.kit.course import nbgrader_source, notebook_names


def _nbgrader(course: Path, *args: str) -> float:
    """Run one nbgrader command in the course folder; its wall seconds. RuntimeError with its output on failure."""
    exe = Path(sys.executable).parent / "nbgrader"
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([str(exe), *args], cwd=course, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def trial(course, names=None) -> list[dict]:
    """One row per notebook: {notebook, assignment, solver, blank, max, seconds_solver, seconds_blank}."""
    from nbgrader.api import Gradebook

    course = Path(course)
    rows = []
    for name in names or notebook_names():
        ps = f"ps_{name}"
        nbgrader_source(course, ps, [name])
        _nbgrader(course, "generate_assignment", ps, "--force")
        for student, src in (("solver", course / "source" / ps), ("blank", course / "release" / ps)):
            dest = course / "submitted" / student / ps
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest)
        row = {"notebook": name, "assignment": ps}
        for student in ("solver", "blank"):
            row[f"seconds_{student}"] = _nbgrader(course, "autograde", ps, "--student", student, "--force")
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            for student in ("solver", "blank"):
                sub = gb.find_submission(ps, student)
                row[student], row["max"] = sub.score, sub.max_score
        print(f"{name:<24} solver {row['solver']:g}/{row['max']:g}  blank {row['blank']:g}/{row['max']:g}  "
              f"autograde {row['seconds_solver']:.0f} s (solver), {row['seconds_blank']:.0f} s (blank)", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("course", help="an empty or new folder: the nbgrader course")
    p.add_argument("--notebooks", nargs="+", help=f"names (default: all of {notebook_names()})")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    a = p.parse_args(argv)
    try:
        rows = trial(a.course, a.notebooks)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps({"command": "python -m minialign.kit.nbgrader_trial " + " ".join(argv or sys.argv[1:]),
                                            "rows": rows}, indent=1) + "\n")
    ok = all(r["solver"] == r["max"] and r["blank"] == 0 for r in rows)
    print("every solution full marks, every blank 0" if ok else "FAIL: a solution below full marks or a blank above 0")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
