"""The course kit: student versions of the notebooks (with nbgrader) and a self-check for learners.

    python -m minialign.course build OUT [--notebooks 00_toy_diffusion 01_sft_pg]   # student versions
    python -m minialign.course nbgrader-source COURSE [--assignment ps1] [--notebooks ...]  # an nbgrader course
    python -m minialign.course check NOTEBOOK [--full] [--timeout S]                # self-learners

An exercise is nbgrader's own format: a *solution* cell (metadata nbgrader.solution = true, its answer between
`### BEGIN SOLUTION` and `### END SOLUTION`) followed by an autograded *test* cell (nbgrader.grade = true, asserts
that compare the answer with the library). `build` runs nbgrader's preprocessors (ClearSolutions: the solution
region becomes `raise NotImplementedError()`; ClearOutput; LockCells: test cells cannot be edited or deleted) on
every notebook and writes the student versions into OUT; `nbgrader generate_assignment` does the same through
its database, which a course without one does not need. Student versions are set to the class profile
(`repro.CLASS_PROFILE`: each notebook's Run-All in minutes on a laptop) and write no metrics (`metrics_out = None`);
cells tagged `answer-key` (the answers to "Check your understanding") are removed.

`nbgrader-source` writes what an instructor puts under nbgrader: COURSE/source/<assignment>/<name>.ipynb in the
class profile (answer keys kept: the nbgrader_config.py written next to them removes them from the release), and
COURSE/nbgrader_config.py (a cell timeout that fits the class profile) unless one exists. Then, in COURSE:
`nbgrader generate_assignment ps1`, hand out release/ps1, collect into submitted/<student>/ps1, `nbgrader autograde ps1`.
Notebook 07 reads the committed metrics: both commands copy them next to it (results_metrics/) and point it there.

Test cells run the student's answer inside `grading.forbid(reference, ...)`: an answer that calls the library's reference
(or anything that calls it) fails, so an exercise cannot be passed by delegating; the reference's source is printed
only after the test cell.

`check` runs a notebook's exercises and reports, per exercise, pass or FAIL. By default it runs only what the
exercises need: the first code cell (imports, seed), the `parameters` cell, any cell tagged `exercise-setup`,
and each solution cell with its test cell, so it takes seconds. An exercise's test cell therefore needs nothing
from the notebook's heavier cells (the convention every notebook follows). `--full` executes the whole notebook.
Every cell runs even after a failure, so one unanswered exercise does not hide the others.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat

from minialign.kit.kernel import kernel_options, no_widget_sync
from minialign.kit.repro import CLASS_PROFILE, NOTEBOOKS, notebook_names

SETUP_TAG = "exercise-setup"
ANSWER_TAG = "answer-key"  # instructor-only cells (answers to "Check your understanding"), removed for students
RESULTS_METRICS = "results_metrics"  # the committed metrics copied next to notebook 07 in a class folder
NBGRADER_CONFIG = Path(__file__).with_name("nbgrader_config.py")
INSTALL = 'the course kit needs nbgrader: pip install -e ".[course]"'


@dataclass
class Exercise:
    """One exercise: the grade id of its solution cell and the indices of its solution and test cells."""

    name: str
    solution: int
    test: int


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def exercises(nb) -> list[Exercise]:
    """The exercises of a notebook, in order: each graded test cell paired with the solution cell before it.
    Raises ValueError on a test cell with no solution cell before it, or a solution cell without a test."""
    found, pending = [], None
    for i, cell in enumerate(nb.cells):
        meta = _nbgrader(cell)
        if cell.cell_type != "code" or not meta:
            continue
        if meta.get("solution"):
            if pending is not None:
                raise ValueError(f"solution cell {pending[0]!r} (cell {pending[1]}) has no autograded test cell after it")
            pending = (meta.get("grade_id", f"cell {i}"), i)
        elif meta.get("grade"):
            if pending is None:
                raise ValueError(f"test cell {meta.get('grade_id')!r} (cell {i}) follows no solution cell")
            found.append(Exercise(pending[0], pending[1], i))
            pending = None
    if pending is not None:
        raise ValueError(f"solution cell {pending[0]!r} (cell {pending[1]}) has no autograded test cell after it")
    return found


def read(path) -> nbformat.NotebookNode:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"notebook {str(path)!r} does not exist (give a path to an .ipynb file)")
    return nbformat.read(path, as_version=4)


def class_version(nb, name: str) -> nbformat.NotebookNode:
    """The notebook as a class runs it: its parameters cell set to `profile = CLASS_PROFILE` and `metrics_out = None`
    (no metrics/ folder written next to it), notebook 07 pointed at RESULTS_METRICS/. ValueError when the notebook
    has no parameters cell with a `profile = ...` line."""
    nb = copy.deepcopy(nb)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None or not re.search(r"^profile = ", cell.source, re.M):
        raise ValueError(f"{name}: no cell tagged `parameters` with a `profile = ...` line")
    new = {"profile": f'"{CLASS_PROFILE}"  # the class profile (repro.CLASS_PROFILE); cpu: the committed runs',
           "metrics_out": "None  # a path writes the headline metrics there as JSON; None writes nothing"}
    if name == "07_results":
        new["metrics_dir"] = f'"{RESULTS_METRICS}"  # the committed runs\' metrics, copied next to this notebook'
    for key, value in new.items():
        cell.source = re.sub(rf"^{key} = .*$", f"{key} = {value}", cell.source, flags=re.M)
    return nb


def _copy_data(names, folder: Path) -> None:
    """What the class notebooks read besides the library: notebook 07 the committed metrics."""
    if "07_results" in names:
        found = sorted((NOTEBOOKS / "metrics").glob("*.json"))
        if not found:
            raise ValueError(f"notebook 07 reads the committed metrics, but {NOTEBOOKS / 'metrics'} holds none")
        (folder / RESULTS_METRICS).mkdir(exist_ok=True)
        for p in found:
            if p.stem != "07_results":
                shutil.copy(p, folder / RESULTS_METRICS / p.name)


def without_answer_keys(nb) -> nbformat.NotebookNode:
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if ANSWER_TAG not in c.get("metadata", {}).get("tags", [])]
    return nb


def student_version(nb) -> nbformat.NotebookNode:
    """The notebook without its answer-key cells, with solutions stripped, outputs cleared and test cells locked
    (nbgrader's preprocessors)."""
    try:
        from nbgrader.preprocessors import ClearOutput, ClearSolutions, LockCells
    except ImportError as e:
        raise ImportError(INSTALL) from e
    nb = without_answer_keys(nb)
    resources = {}
    for pre in (ClearSolutions(), ClearOutput(), LockCells()):
        nb, resources = pre.preprocess(nb, resources)
    return nb


def exercise_notebook(nb) -> nbformat.NotebookNode:
    """Only what the exercises need: the first code cell, the parameters cell, cells tagged `exercise-setup`,
    and every solution and test cell, in their order."""
    keep = {i for ex in exercises(nb) for i in (ex.solution, ex.test)}
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    if code:
        keep.add(code[0])
    for i in code:
        tags = nb.cells[i].get("metadata", {}).get("tags", [])
        if "parameters" in tags or SETUP_TAG in tags:
            keep.add(i)
    out = copy.deepcopy(nb)
    out.cells = [copy.deepcopy(nb.cells[i]) for i in sorted(keep)]
    return out


def _prepare(out, names):
    """(names, {name: notebook}, out as a Path): checked, nothing written yet."""
    names = list(names or notebook_names())
    known = notebook_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"notebooks must be names from {known}, got unknown {unknown}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out {str(out)!r} is not a writable folder ({e.strerror})") from e
    notebooks = {name: read(NOTEBOOKS / f"{name}.ipynb") for name in names}
    for name, nb in notebooks.items():  # all checked before anything is written
        if not exercises(nb):
            raise ValueError(f"no exercises found in {name}: it needs nbgrader solution cells with autograded test "
                             "cells after them (see minialign/course.py)")
    return names, {name: class_version(nb, name) for name, nb in notebooks.items()}, out


def build(out, names=None) -> list[Path]:
    """Write the student version of each notebook (default: every notebook in notebooks/) into `out`, in the class
    profile, with the data notebook 07 reads."""
    names, notebooks, out = _prepare(out, names)
    written = []
    for name, nb in notebooks.items():
        written.append(out / f"{name}.ipynb")
        nbformat.write(student_version(nb), written[-1])
    _copy_data(names, out)
    return written


def nbgrader_source(course, assignment: str = "ps1", names=None) -> list[Path]:
    """Write nbgrader's source notebooks (solutions, answer keys, class profile) into course/source/<assignment>/,
    with the data notebook 07 reads, and course/nbgrader_config.py unless the course already has one."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", assignment):
        raise ValueError(f"assignment must be a folder name of letters, digits, _ and -, got {assignment!r}")
    names, notebooks, course = _prepare(course, names)
    folder = course / "source" / assignment
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, nb in notebooks.items():
        written.append(folder / f"{name}.ipynb")
        nbformat.write(nb, written[-1])
    _copy_data(names, folder)
    if not (course / "nbgrader_config.py").exists():
        shutil.copy(NBGRADER_CONFIG, course / "nbgrader_config.py")
    return written


def run(nb, cwd, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute a notebook in a fresh kernel, every cell even after errors; returns it with outputs."""
    from nbclient import NotebookClient

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    nb = copy.deepcopy(nb)
    with tempfile.TemporaryDirectory(prefix="minialign-kernel-") as sockets:  # the kernel's IPC sockets
        with no_widget_sync():
            NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, startup_timeout=120,
                           resources={"metadata": {"path": str(cwd)}}, **kernel_options(sockets)).execute()
    return nb


def _error(cell) -> str | None:
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            return f"{o.get('ename')}: {o.get('evalue')}".strip()
    return None


def grade(nb) -> list[dict]:
    """Per exercise of an executed notebook: {name, passed, solution_error, test_error}. An unanswered exercise's
    solution cell runs (it defines the function); its test cell fails with the NotImplementedError it raises."""
    return [{"name": ex.name, "passed": _error(nb.cells[ex.test]) is None,
             "solution_error": _error(nb.cells[ex.solution]), "test_error": _error(nb.cells[ex.test])}
            for ex in exercises(nb)]


def check(path, full: bool = False, timeout: int = 600) -> list[dict]:
    """Run a notebook's exercises (or, full=True, the whole notebook) and grade each one."""
    nb = read(path)
    if not exercises(nb):
        raise ValueError(f"no exercises found in {path}: no nbgrader solution cell with a test cell after it")
    return grade(run(nb if full else exercise_notebook(nb), Path(path).resolve().parent, timeout))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minialign.course", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="student versions of the notebooks (nbgrader) into OUT")
    b.add_argument("out")
    b.add_argument("--notebooks", nargs="+", help=f"names (default: all of {notebook_names()})")
    n = sub.add_parser("nbgrader-source", help="nbgrader source notebooks (class profile) into COURSE/source/ASSIGNMENT")
    n.add_argument("course")
    n.add_argument("--assignment", default="ps1")
    n.add_argument("--notebooks", nargs="+", help=f"names (default: all of {notebook_names()})")
    c = sub.add_parser("check", help="run a notebook's exercises and report pass/FAIL per exercise")
    c.add_argument("notebook")
    c.add_argument("--full", action="store_true", help="execute the whole notebook, not only the exercises")
    c.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            for path in build(args.out, args.notebooks):
                print(f"{path}: {len(exercises(read(path)))} exercises, solutions stripped, profile {CLASS_PROFILE}")
            return 0
        if args.command == "nbgrader-source":
            for path in nbgrader_source(args.course, args.assignment, args.notebooks):
                print(f"{path}: {len(exercises(read(path)))} exercises, profile {CLASS_PROFILE}")
            print(f"next, in {args.course}: nbgrader generate_assignment {args.assignment}")
            return 0
        results = check(args.notebook, args.full, args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        error = r["solution_error"] or r["test_error"] or ""
        why = "" if r["passed"] else "  (not answered yet)" if error.startswith("NotImplementedError") else f"  ({error})"
        print(f"{r['name']:<32} {'pass' if r['passed'] else 'FAIL'}{why}")
    passed = sum(r["passed"] for r in results)
    print(f"{passed} of {len(results)} exercises pass")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
