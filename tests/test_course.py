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


@pytest.mark.notebook  # runs notebook cells in a kernel: out of the inner loop (-m 'not notebook')
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
    "00_toy_diffusion_ex3": "x = x_T\n"
                            "    for t, s, z in zip(ts, list(ts[1:]) + [-1], noises):\n"
                            "        c, c0 = step_coefficients(schedule, t, s, eta), step_coefficients(schedule, t, s, 0.0)\n"
                            "        x = c0.a * x + c0.b * model(x, torch.full((x.shape[0],), t)) + c.sigma * z\n"
                            "    return x",
    "02_reward_gradients_ex1": "return [StepPlan(grad=False, path=True)] * (n - k) + [StepPlan(grad=True)] * k",
    "02_reward_gradients_ex2": "adv = (reward - reward.mean()) / (reward.std() + 1e-8)\n"
                               "    return -(adv.detach() * log_prob).mean()",
    "02_reward_gradients_ex3": "ts = timesteps(schedule.T, n_steps, 'trailing')\n"
                               "    def loss_fn(model, step, generator):\n"
                               "        x = torch.randn((batch, *shape), generator=generator, dtype=next(model.parameters()).dtype)\n"
                               "        cut = max(n_steps - k - 1, 0)\n"
                               "        if cut:\n"
                               "            with torch.no_grad():\n"
                               "                x, _ = sample(model, schedule, x, ts[:cut], 0.0, final_timestep=ts[cut])\n"
                               "        x0, _ = sample(model, schedule, x.detach(), ts[cut:], 0.0, plan_full(n_steps - cut))\n"
                               "        return -reward(x0).mean(), {'reward': reward(x0).mean().item()}\n"
                               "    return loss_fn",
    "03_rlr_ex3": "prev = prev_timesteps(ts)\n"
                  "    total = ho_surrogate(model, schedule, traj, ts, j, h, eta, advantage)\n"
                  "    for m in range(len(ts) - 1):\n"
                  "        lp = transition_log_prob(model, schedule, traj.states[m], traj.states[m + 1], ts[m], prev[m], eta)\n"
                  "        total = total + (advantage * lp).mean()\n"
                  "    return total",
    "04_sdo_ex1": "return [StepPlan(grad=i == k, input_grad=input_grad, path=i >= k) for i in range(n)]",
    "04_sdo_ex2": "prev = prev_timesteps(list(ts))\n"
                  "    carry = 1.0\n"
                  "    for j in range(k, len(ts)):\n"
                  "        carry *= step_coefficients(schedule, ts[j], prev[j], 0.0).a\n"
                  "    return carry * step_coefficients(schedule, ts[k], prev[k], 0.0).b",
    "04_sdo_ex3": "z = z.detach().requires_grad_(True)\n"
                  "    x = z\n"
                  "    for t, s in zip(ts, prev_timesteps(list(ts))):\n"
                  "        c = step_coefficients(schedule, t, s, 0.0)\n"
                  "        x = c.a * x + c.b * model(x, torch.full((x.shape[0],), t))\n"
                  "    (g,) = torch.autograd.grad(reward(x).mean(), [z])\n"
                  "    return (z + lr * g).detach()",
    "07_results_ex1": "ma, mb = statistics.mean(a), statistics.mean(b)\n"
                      "    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))\n"
                      "    return ma - mb - 1.96 * se, ma - mb + 1.96 * se",
    "07_results_ex2": "return statistics.median(times) / statistics.median(reference_times)",
    "05_shortft_ex1": "return [(a, b) for a, b in zip(anchor_ts, list(anchor_ts[1:]) + [-1])]",
    "05_shortft_ex2": "ts = [int(t) for t in ts]\n"
                      "    nxt = dict(zip(ts, ts[1:] + [-1]))\n"
                      "    def step(net, x, t, s):\n"
                      "        c = step_coefficients(schedule, t, s, 0.0)\n"
                      "        return c.a * x + c.b * net(x, torch.full((x.shape[0],), t))\n"
                      "    x = x_T\n"
                      "    for t in [t for t in ts if t > anchor_ts[0]]:\n"
                      "        with torch.no_grad():\n"
                      "            x = step(model, x, t, nxt[t])\n"
                      "    for i, a in enumerate(anchor_ts):\n"
                      "        x = step(model, x, a, nxt[a])\n"
                      "        target = anchor_ts[i + 1] if i + 1 < len(anchor_ts) else -1\n"
                      "        if nxt[a] != target:\n"
                      "            x = step(shortcut, x.detach(), nxt[a], target)\n"
                      "    return x",
    "05_shortft_ex3": "i = max([j for j, a in enumerate(anchor_ts) if a >= t], default=0)\n"
                      "    return [f'seg{j}' for j in range(i, len(anchor_ts) if stacked else i + 1)]",
    "06_stable_diffusion_ex1": "return eps_c + w * (eps_c - eps_u)",
    "06_stable_diffusion_ex2": "return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)",
    "06_stable_diffusion_ex3": "tb = torch.full((z_t.shape[0],), t)\n"
                               "    eps_u = pipe.unet(z_t, tb, encoder_hidden_states=cond[:, 0]).sample\n"
                               "    eps_c = pipe.unet(z_t, tb, encoder_hidden_states=cond[:, 1]).sample\n"
                               "    c = step_coefficients(schedule, t, s, 0.0)\n"
                               "    return reward(pipe.vae.decode(c.a * z_t + c.b * (eps_u + w * (eps_c - eps_u))).sample, None)",
}


OWNED = ["00_toy_diffusion", "01_sft_pg", "02_reward_gradients", "03_rlr", "04_sdo", "05_shortft", "06_stable_diffusion",
         "07_results"]

# answers that delegate to the library's reference: each passes when the test cells run again with the guard off,
# and must fail with it on. 07_results_ex2 has none to delegate to (bench.run computes the median of its per-round
# ratios inline, from its own timings): None.
DELEGATE = {
    "00_toy_diffusion_ex1": "import types\n"
                            "    sch = types.SimpleNamespace(abar=lambda t: abar_t if t == 1 else (abar_s if t == 0 else 1.0))\n"
                            "    c = step_coefficients(sch, 1, 0 if abar_s < 1 else -1, eta)\n"
                            "    return c.a, c.b, c.sigma",
    "00_toy_diffusion_ex2": "return gaussian_log_prob(x_s, a * x_t + b * eps, sigma)",
    "00_toy_diffusion_ex3": "return sample(model, schedule, x_T, ts, eta, noises=noises)[0]",
    "01_sft_pg_ex1": "import types\n"
                     "    me = types.SimpleNamespace(critic=lambda _: f_x0, baseline=lambda *_: baseline)\n"
                     "    return (SFTPG.advantage(me, None, None, None) * log_prob).mean()",
    "01_sft_pg_ex2": "import types\n"
                     "    me = types.SimpleNamespace(critic=critic, baseline=baseline, config=SFTPGConfig(baseline_reg=lam))\n"
                     "    return SFTPG.critic_loss(me, real, states, x0)[0]",
    "02_reward_gradients_ex1": "return plan_truncated(n, k)",
    "02_reward_gradients_ex2": "return ddpo_method.ppo_clip_loss(log_prob, log_prob.detach(), ddpo_method.standardise(reward), "
                               "clip_range=3e-3, adv_clip=5.0)[0]",
    "02_reward_gradients_ex3": "from minialign.methods import truncated_bp\n"
                               "    cfg = truncated_bp.TruncatedBPConfig(batch=batch, n_steps=n_steps, k=k)\n"
                               "    return truncated_bp.make_loss(schedule, reward, cfg, shape=shape)",
    "03_rlr_ex1": "from minialign.methods import rlr_parts\n"
                  "    return rlr_parts.ho_part(model, schedule, traj, j, h, eta, advantage)",
    "03_rlr_ex2": "return __import__('minialign.methods.rlr_budget', fromlist=['h_star']).h_star(budget, b_h, b_z, n_steps)",
    "03_rlr_ex3": "from minialign.methods import rlr_parts\n"
                  "    Z = [m for m in range(len(ts) - 1) if not j <= m < j + h]\n"
                  "    return (rlr_parts.ho_part(model, schedule, traj, j, h, eta, advantage)\n"
                  "            + rlr_parts.zo_inherent(model, schedule, traj, Z, eta, advantage, chunk=0))",
    "04_sdo_ex1": "return plan_one_step(n, k, input_grad=input_grad)",
    "04_sdo_ex2": "return sdo.unrolled_coefficients(schedule, ts)[1][k]",
    "04_sdo_ex3": "z = z.detach().requires_grad_(True)\n"
                  "    x0, _ = sample(model, schedule, z, ts, 0.0, sdo.latent_plan(len(ts), 'sdo'))\n"
                  "    return (z + lr * torch.autograd.grad(reward(x0).mean(), [z])[0]).detach()",
    "07_results_ex1": "from minialign.measure import stats\n"
                      "    v = stats.compare(a, b)\n"
                      "    return v['lo'], v['hi']",
    "07_results_ex2": None,
    "05_shortft_ex1": "from minialign.methods import shortft\n"
                      "    return shortft.jumps(shortft.layout(ts, anchor_ts, 1000))",
    "05_shortft_ex2": "return shortft.short_chain(model, shortcut, schedule, shortft.layout(ts, anchor_ts, 1000), x_T)",
    "05_shortft_ex3": "from minialign.methods import shortft_tlora\n"
                      "    ts = sorted({int(t), *anchor_ts}, reverse=True)\n"
                      "    return shortft_tlora.routes_snapped(ts, anchor_ts, 'stacked' if stacked else 'separate')[int(t)]",
    "06_stable_diffusion_ex1": "import types\n"
                               "    unet = lambda x, t, encoder_hidden_states, return_dict: (torch.cat([eps_u, eps_c]) "
                               "if x.shape[0] == 2 * eps_u.shape[0] else eps_c,)\n"
                               "    fake = types.SimpleNamespace(unet=unet)\n"
                               "    return SDDenoiser(fake, w)(eps_u, torch.zeros(len(eps_u)), torch.zeros(len(eps_u), 2, 1, 1))",
    "06_stable_diffusion_ex2": "import types\n"
                               "    return ((decode(types.SimpleNamespace(vae=vae), z) + 1) / 2).clamp(0, 1)",
    "06_stable_diffusion_ex3": "z_s, _ = sample(SDDenoiser(pipe, w), schedule, z_t, [t], 0.0, plan_full(1), cond=cond, final_timestep=s)\n"
                               "    return latent_reward(pipe, reward)(z_s, None)",
}


def with_answers(nb, answers):
    """The exercise notebook of nb with each solution region replaced by answers[grade id]."""
    nb = course.exercise_notebook(nb)
    for ex in course.exercises(nb):
        answer = answers[ex.name] or "raise NotImplementedError()"
        nb.cells[ex.solution].source = re.sub(r"### BEGIN SOLUTION.*### END SOLUTION", lambda _: "### BEGIN SOLUTION\n    "
                                              + answer + "\n    ### END SOLUTION", nb.cells[ex.solution].source, flags=re.S)
    return nb


@pytest.mark.notebook  # runs notebook cells in a kernel: out of the inner loop (-m 'not notebook')
@pytest.mark.parametrize("notebook", OWNED)
def test_wrong_answers_fail(notebook):
    """Each test cell rejects a known-wrong variant (named in a comment in the cell). 00: the DDIM b without sigma; a
    log-prob without its normaliser; the DDIM b with DDPM noise in the loop. 01: the advantage left in the graph; the
    baseline regularisation without its stop-gradients. 02: AlignProp's plan; the sample std; the graph in k + 1 steps.
    03: the HO term on the stored x_L; h* with B_z T; ZO counting the sub-chain twice. 04: the path cut; the product
    with a_k; full backprop. 05: jumps from the anchors; the jump's input detached; stacking on the later adapters.
    06: guidance from the conditional side; decoding without the scaling factor (twice). 07: |difference| > max std;
    the ratio of medians."""
    nb = with_answers(course.read(repro.NOTEBOOKS / f"{notebook}.ipynb"), WRONG)
    results = course.grade(course.run(nb, repro.NOTEBOOKS))
    assert sorted(r["name"] for r in results) == sorted(k for k in WRONG if k.startswith(notebook))
    assert not any(r["passed"] for r in results), results
    assert all(r["solution_error"] is None for r in results), "the wrong answers themselves run"


@pytest.mark.notebook  # runs notebook cells in a kernel: out of the inner loop (-m 'not notebook')
@pytest.mark.parametrize("notebook", OWNED)
def test_an_answer_that_delegates_to_the_reference_fails(notebook):
    """A student answer that calls the library's reference fails every exercise (grading.forbid refuses it), and the
    same answer passes when the test cells run again with the guard off: the failure is the guard's, not the answer's."""
    nb = course.read(repro.NOTEBOOKS / f"{notebook}.ipynb")
    names = [ex.name for ex in course.exercises(nb)]
    assert set(names) <= set(DELEGATE), f"give every exercise of {notebook} a delegating answer in DELEGATE"
    nb = with_answers(nb, DELEGATE)
    tests = [nb.cells[ex.test].source for ex in course.exercises(nb)]
    guard_off = "import contextlib\nimport minialign.kit.grading as _g\n_g.forbid = lambda *f: contextlib.nullcontext()"
    nb.cells += [new_code_cell(guard_off)] + [new_code_cell(t) for t in tests]
    ran = course.run(nb, repro.NOTEBOOKS)
    for name, r, rerun in zip(names, course.grade(ran), ran.cells[-len(tests):]):
        if DELEGATE[name] is not None:
            assert not r["passed"] and "library's reference" in r["test_error"], (name, r)
            assert course._error(rerun) is None, f"{name}: the delegating answer fails without the guard: {course._error(rerun)}"


@pytest.mark.parametrize("notebook", OWNED)
def test_reference_source_comes_after_the_test_cells(notebook):
    """Every test cell refuses a reference (but 07-ex2's, which has none), and no cell before it prints its source."""
    nb = course.read(repro.NOTEBOOKS / f"{notebook}.ipynb")
    for ex in course.exercises(nb):
        refused = re.findall(r"forbid\(([^)]*)\)", nb.cells[ex.test].source)
        names = {a.strip().split(".")[-1] for args in refused for a in args.split(",") if a.strip()}
        assert names, f"{ex.name}: its test cell refuses no reference"
        for c in nb.cells[:ex.test]:
            for n in names:
                assert not re.search(rf"getsource\([^)]*\b{n}\b", c.source), f"{ex.name}: {n}'s source is printed before its test"


@pytest.mark.parametrize("notebook", OWNED)
def test_answer_keys_are_instructor_only(notebook):
    nb = course.read(repro.NOTEBOOKS / f"{notebook}.ipynb")
    keys = [c for c in nb.cells if course.ANSWER_TAG in c.metadata.get("tags", [])]
    assert keys and all("Answer key" in c.source for c in keys), f"{notebook} needs an answer-key cell"
    student = course.student_version(nb)
    assert not any("Answer key" in c.source or course.ANSWER_TAG in c.metadata.get("tags", []) for c in student.cells)
    assert len(student.cells) == len(nb.cells) - len(keys)


def test_forbid_refuses_every_alias_and_restores():
    from minialign.kit.grading import forbid
    from minialign.methods import sdo
    from minialign.sampling import plan_one_step as alias

    want = alias(4, 1, input_grad=True)
    with forbid(alias):
        with pytest.raises(AssertionError, match="library's reference minialign.sampling.plan_one_step"):
            sdo.latent_plan(4, "sdo")  # called from inside another library function
        with pytest.raises(AssertionError):
            alias(4, 1)
    assert alias(4, 1, input_grad=True) == want and alias(3, 0) == [alias(3, 0)[0]] + alias(3, 0)[1:]
    with pytest.raises(ValueError, match="plain Python functions"):
        forbid(len)


def test_class_version_sets_the_class_profile_and_writes_no_metrics(tmp_path):
    written = course.build(tmp_path / "class", ["00_toy_diffusion", "07_results"])
    for path in written:
        params = next(c for c in course.read(path).cells if "parameters" in c.metadata.get("tags", []))
        assert re.search(rf'^profile = "{repro.CLASS_PROFILE}"', params.source, re.M)
        assert re.search(r"^metrics_out = None", params.source, re.M)
    p07 = next(c for c in course.read(written[1]).cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(rf'^metrics_dir = "{course.RESULTS_METRICS}"', p07.source, re.M)
    assert (tmp_path / "class" / course.RESULTS_METRICS / "04_sdo.json").exists()
    assert not (tmp_path / "class" / course.RESULTS_METRICS / "07_results.json").exists(), "07's own metrics are no input"
    assert repro.save_metrics({"a": 1}, None) == {"a": 1.0}
    nb = fixture()
    nb.cells[2].source = "seed = 0"
    with pytest.raises(ValueError, match="fx: no cell tagged `parameters` with a `profile = ...` line"):
        course.class_version(nb, "fx")


def test_missing_metrics_folder_is_a_clear_error(tmp_path):
    from minialign.kit import results
    with pytest.raises(ValueError, match=f"no metrics .* in {re.escape(str(tmp_path))}"):
        results.load_metrics(tmp_path)


@pytest.mark.notebook  # runs notebook cells in a kernel: out of the inner loop (-m 'not notebook')
def test_nbgrader_real_workflow(tmp_path):
    """An instructor's round (minialign.kit.nbgrader_trial): nbgrader-source, `nbgrader generate_assignment`, students
    submit, `nbgrader autograde`: the solution scores full marks, the blank release 0; the release holds no answer key
    and no metrics/ folder."""
    pytest.importorskip("nbgrader")
    from minialign.kit import nbgrader_trial

    rows = nbgrader_trial.trial(tmp_path, ["07_results"])
    assert [(r["solver"], r["blank"], r["max"]) for r in rows] == [(2.0, 0.0, 2.0)], rows
    assert (tmp_path / "nbgrader_config.py").exists()
    release = tmp_path / "release" / "ps_07_results"
    released = nbformat.read(release / "07_results.ipynb", as_version=4)
    assert not any(course.ANSWER_TAG in c.metadata.get("tags", []) for c in released.cells), "answer keys are released"
    assert (release / course.RESULTS_METRICS).is_dir() and not (release / "metrics").exists()
    assert not (tmp_path / "autograded" / "solver" / "ps_07_results" / "metrics").exists(), "autograde wrote a metrics/ folder"
