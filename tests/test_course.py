"""The course kit: nbgrader student versions and the exercises' round trip.

Solution versions pass every autograded test cell; student versions (nbgrader's ClearSolutions) fail exactly at
the exercises: the solution cell still runs (it defines the function, whose body now raises NotImplementedError),
its test cell fails with that error, and every other cell runs. On small fixture notebooks built here, and on the real
notebooks' exercise cells (with only the cells they need, so it stays fast)."""
import re
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minialign.kit import course, repro
NAMES = repro.notebook_names()


def solution_cell(grade_id, src):
    c = new_code_cell(src)
    c.metadata["nbgrader"] = {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3,
                              "solution": True, "task": False}
    return c


def autograded_cell(grade_id, src):
    c = new_code_cell(src)
    c.metadata["nbgrader"] = {"grade": True, "grade_id": grade_id, "locked": True, "points": 1, "schema_version": 3,
                              "solution": False, "task": False}
    return c


def fixture(answer1="return abar_t ** 0.5", answer2="return x - x.mean()"):
    """A small notebook: setup, parameters, two exercises with a cell between them, and a cell after them."""
    params = new_code_cell('profile = "smoke"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[
        new_markdown_cell("# fixture"),
        new_code_cell("import math\nimport torch"),
        params,
        new_markdown_cell("### Exercise 1"),
        solution_cell("fx_ex1", f"def signal_scale(abar_t):\n    ### BEGIN SOLUTION\n    {answer1}\n    ### END SOLUTION"),
        autograded_cell("fx_ex1_test", "for a in (0.1, 0.5, 0.9):\n    assert abs(signal_scale(a) - math.sqrt(a)) < 1e-9\n"
                                 "print('ex1 passed')"),
        new_code_cell("between = math.pi"),
        solution_cell("fx_ex2", f"def centre(x):\n    ### BEGIN SOLUTION\n    {answer2}\n    ### END SOLUTION"),
        autograded_cell("fx_ex2_test", "torch.testing.assert_close(centre(torch.arange(4.)), torch.tensor([-1.5, -.5, .5, 1.5]))\n"
                                 "print('ex2 passed')"),
        new_code_cell("after = between * 2"),
    ])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def errors(nb):
    return {i for i, c in enumerate(nb.cells) if c.cell_type == "code" and course._error(c)}


def assert_round_trip(nb, tmp_path):
    """Solutions pass everything; the student version fails exactly at the solution and test cells."""
    ran = course.run(nb, tmp_path)
    assert not errors(ran), [course._error(ran.cells[i]) for i in errors(ran)]
    assert all(r["passed"] for r in course.grade(ran))
    student = course.student_version(nb)
    for ex in course.exercises(student):
        src = student.cells[ex.solution].source
        assert "raise NotImplementedError()" in src and "BEGIN SOLUTION" not in src
        assert student.cells[ex.test].source == nb.cells[ex.test].source, "test cells are kept as they are"
        assert student.cells[ex.test].metadata["editable"] is False
    ran = course.run(student, tmp_path)
    tests = {ex.test for ex in course.exercises(student)}
    assert errors(ran) == tests, "every cell but the exercises' test cells runs"
    results = course.grade(ran)
    assert results and not any(r["passed"] for r in results)
    assert all(r["solution_error"] is None and r["test_error"].startswith("NotImplementedError") for r in results)


def test_fixture_round_trip(tmp_path):
    nb = fixture()
    assert [(e.name, e.solution, e.test) for e in course.exercises(nb)] == [("fx_ex1", 4, 5), ("fx_ex2", 7, 8)]
    assert_round_trip(nb, tmp_path)
    assert all(not c.get("outputs") for c in course.student_version(course.run(nb, tmp_path)).cells
               if c.cell_type == "code"), "the student version has no outputs"


def test_a_wrong_answer_fails_only_its_exercise(tmp_path):
    ran = course.run(fixture(answer1="return abar_t"), tmp_path)
    assert [r["passed"] for r in course.grade(ran)] == [False, True]
    assert errors(ran) == {5}


def test_exercise_notebook_keeps_only_what_exercises_need():
    nb = fixture()
    nb.cells.insert(3, new_code_cell("raise RuntimeError('a heavy cell')"))
    setup = new_code_cell("helper = 1")
    setup.metadata["tags"] = [course.SETUP_TAG]
    nb.cells.insert(3, setup)
    kept = [c.source for c in course.exercise_notebook(nb).cells]
    assert "helper = 1" in kept and 'profile = "smoke"' in kept and kept[0] == "import math\nimport torch"
    assert not any("heavy" in s or "between" in s for s in kept)
    assert len(course.exercises(course.exercise_notebook(nb))) == 2


def test_badly_paired_exercises_are_refused():
    nb = fixture()
    del nb.cells[5]  # exercise 1 loses its test cell
    with pytest.raises(ValueError, match="fx_ex1.*no autograded test cell"):
        course.exercises(nb)
    nb = fixture()
    del nb.cells[7]  # exercise 2's test follows exercise 1's test
    with pytest.raises(ValueError, match="fx_ex2_test.*follows no solution cell"):
        course.exercises(nb)


def test_build_writes_student_versions(tmp_path):
    written = course.build(tmp_path / "student", ["00_toy_diffusion"])
    assert [p.name for p in written] == ["00_toy_diffusion.ipynb"]
    nb = nbformat.read(written[0], as_version=4)
    assert "### BEGIN SOLUTION" not in "".join(c.source for c in nb.cells)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert course.main(["build", str(tmp_path / "cli"), "--notebooks", "00_toy_diffusion", "01_sft_pg"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["00_toy_diffusion.ipynb", "01_sft_pg.ipynb"]


def test_build_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out .* is not a writable folder"):
        course.build(blocker / "out", ["00_toy_diffusion"])
    with pytest.raises(ValueError, match="notebooks must be names from .*'99_nope'"):
        course.build(tmp_path / "x", ["99_nope"])
    nb = fixture()
    nb.cells = nb.cells[:3]
    nbformat.write(nb, tmp_path / "00_plain.ipynb")
    monkeypatch.setattr(repro, "NOTEBOOKS", tmp_path)
    monkeypatch.setattr(course, "NOTEBOOKS", tmp_path)
    nbformat.write(fixture(), tmp_path / "01_fine.ipynb")
    with pytest.raises(ValueError, match="no exercises found in 00_plain"):
        course.build(tmp_path / "out")
    assert not list((tmp_path / "out").iterdir()), "nothing is written when one notebook lacks exercises"
    assert course.main(["check", str(tmp_path / "00_plain.ipynb")]) == 2
    with pytest.raises(ValueError, match="does not exist"):
        course.check(tmp_path / "missing.ipynb")


def test_without_nbgrader_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nbgrader.preprocessors", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[course\]"'):
        course.student_version(fixture())


def test_check_reports_per_exercise(tmp_path, capsys):
    nbformat.write(fixture(answer2="return x"), tmp_path / "mine.ipynb")
    assert course.main(["check", str(tmp_path / "mine.ipynb")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"fx_ex1\s+pass", out) and re.search(r"fx_ex2\s+FAIL", out) and "1 of 2 exercises pass" in out


# --- the real notebooks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_notebook_has_two_exercises(name):
    nb = course.read(repro.NOTEBOOKS / f"{name}.ipynb")
    found = course.exercises(nb)
    assert len(found) >= 2, f"{name} has {len(found)} exercises (nbgrader solution + test cells); the course needs >= 2"
    assert len({e.name for e in found}) == len(found), "grade ids must be unique"
    for ex in found:
        src = nb.cells[ex.solution].source
        assert "### BEGIN SOLUTION" in src and "### END SOLUTION" in src, ex.name
        fn = re.search(r"^def (\w+)\(", src, re.M)
        assert fn, f"{ex.name}: a solution cell defines one function"
        later = [c.source for c in nb.cells[ex.test + 1:] if c.cell_type == "code" and not course._nbgrader(c)]
        assert not any(re.search(rf"(?<![\w.]){fn.group(1)}\(", s) for s in later), \
            f"{ex.name}: a later cell calls {fn.group(1)}(), which raises in the student version"


@pytest.mark.parametrize("name", NAMES)
def test_real_exercises_round_trip(name, tmp_path):
    nb = course.read(repro.NOTEBOOKS / f"{name}.ipynb")
    if not course.exercises(nb):
        pytest.skip(f"{name} has no exercises yet (test_every_notebook_has_two_exercises fails for it)")
    assert_round_trip(course.exercise_notebook(nb), repro.NOTEBOOKS)


WRONG = {  # typical mistakes; each must fail its test cell
    "00_toy_diffusion_ex1": "sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))\n"
                            "    return math.sqrt(abar_s / abar_t), math.sqrt(1 - abar_s) - math.sqrt(abar_s * (1 - abar_t) / abar_t), sigma",
    "00_toy_diffusion_ex2": "mean = a * x_t + b * eps\n"
                            "    return -((x_s - mean) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)",
    "01_sft_pg_ex1": "return ((f_x0 - baseline) * log_prob).mean()",
    "01_sft_pg_ex2": "f_real, f_gen = critic(real), critic(x0)\n"
                     "    n, b = states.shape[:2]\n"
                     "    pred = baseline(states.flatten(0, 1), torch.arange(n).repeat_interleave(b))\n"
                     "    return f_real.mean() - f_gen.mean() + (1 + lam) * ((pred - f_gen.repeat(n)) ** 2).mean()",
    "03_rlr_ex1": "L = j + h - 1\n"
                  "    log_prob = transition_log_prob(model, schedule, traj.states[L], traj.states[L + 1], ts[L], "
                  "prev_timesteps(ts)[L], eta)\n"
                  "    return (advantage * log_prob).mean()",
    "03_rlr_ex2": "return min(math.floor((budget - b_z * n_steps) / (b_h - b_z)), n_steps)",
}


@pytest.mark.parametrize("notebook", ["00_toy_diffusion", "01_sft_pg", "03_rlr"])
def test_wrong_answers_fail(notebook, tmp_path):
    """00: the DDIM b without sigma; a log-prob without its normaliser. 01: the advantage left in the graph; the
    baseline regularisation without its stop-gradients. 03: the HO term on the stored (detached) x_L instead of the
    re-run sub-chain; h* with B_z (T) instead of B_z (T - 1)."""
    nb = course.exercise_notebook(course.read(repro.NOTEBOOKS / f"{notebook}.ipynb"))
    for ex in course.exercises(nb):
        cell = nb.cells[ex.solution]
        cell.source = re.sub(r"### BEGIN SOLUTION.*### END SOLUTION", "### BEGIN SOLUTION\n    " + WRONG[ex.name]
                             + "\n    ### END SOLUTION", cell.source, flags=re.S)
    ran = course.run(nb, repro.NOTEBOOKS)
    results = course.grade(ran)
    assert [r["name"] for r in results] == sorted(k for k in WRONG if k.startswith(notebook))
    assert not any(r["passed"] for r in results), results
    assert all(r["solution_error"] is None for r in results), "the wrong answers themselves run"
