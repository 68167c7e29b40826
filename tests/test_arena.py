"""The method contract, the registry and the arena: import rules, one construction path, equal-budget runs that
repeat exactly, and clear errors before any training."""
import ast
import json
from pathlib import Path

import pytest
import torch

from minialign.measure import arena, tasks

from minialign import methods
from minialign.rewards import Reward, jpeg_compressibility, target_region

ROOT = Path(__file__).resolve().parents[1] / "minialign"
ALLOWED = {"chain", "sampling", "schedule", "rewards", "layers"}


def _relative_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node.level, (node.module or ""), [a.name for a in node.names]


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "methods").glob("*.py") if p.name != "__init__.py"),
                         ids=lambda p: p.name)
def test_method_files_import_only_the_contract_never_a_sibling(path):
    siblings = {p.stem for p in (ROOT / "methods").glob("*.py")} - {"__init__", "chain"}
    for level, module, names in _relative_imports(path):
        top = module.split(".")[0]
        if level == 1:  # from .x import ...  (inside methods/)
            assert top == "chain" and not set(names) & siblings, f"{path.name} imports .{module} {names}"
        else:           # from ..x import ...
            # the one exception: sft_pg.fit runs the training loop (not a method) for notebook 01's convenience
            ok = top in ALLOWED or (path.name == "sft_pg.py" and top == "train")
            assert ok, f"{path.name} imports ..{module}: method files import only {sorted(ALLOWED)}"


def test_no_library_file_is_longer_than_about_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 320}
    assert not long, long


def test_registry_entries_are_complete_and_build():
    for name, m in methods.REGISTRY.items():
        assert m.name == name and m.label and m.description
        cfg = m.make_config()
        assert isinstance(cfg, methods.chain.ChainConfig), f"{name}'s config must inherit ChainConfig"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")
    with pytest.raises(ValueError, match="unknown config field"):
        methods.REGISTRY["full_bp"].make_config(not_a_field=1)


def _tiny_task(reward=None, **kw):
    return tasks.Task("tiny", "tiny", "gmm", lambda: reward or target_region((0.0, 0.0), 0.15), (2,),
                      n_steps=3, batch=8, eval_batch=64, lr=1e-3, **kw)


def test_arena_repeats_exactly_and_records_its_step_counts(tmp_path):
    task = _tiny_task()
    a = arena.run(["full_bp", "ddpo"], task, seconds=0.3, seeds=[0, 1], evals=2, progress=False)
    assert set(a["steps"]) == {"full_bp", "ddpo"} and all(s >= 1 for s in a["steps"].values())
    b = arena.run(["full_bp", "ddpo"], task, steps=a["steps"], seeds=[0, 1], evals=2, progress=False)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["curve"]["reward"] == rb["curve"]["reward"] and ra["curve"]["drift"] == rb["curve"]["drift"]
        assert ra["curve"]["calls"] == rb["curve"]["calls"]
    row = {r["method"]: r for r in a["rows"]}["full_bp"]
    assert row["seeds"] == 2 and row["steps"] == a["steps"]["full_bp"]
    arena.save(a, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text())["steps"] == a["steps"]
    # a network-call budget becomes steps through the measured rows per step (3 steps x 8 rows for full BP)
    c = arena.run(["full_bp"], task, calls=24 * 5, seeds=[0], evals=1, progress=False)
    assert c["probe"]["full_bp"]["rows_per_step"] == 24 and c["steps"]["full_bp"] == 5


def test_arena_refuses_what_cannot_work_before_training():
    task = _tiny_task()
    with pytest.raises(ValueError, match="seconds must be > 0"):
        arena.run(["full_bp"], task, seconds=0)
    with pytest.raises(ValueError, match="exactly one budget"):
        arena.run(["full_bp"], task, seconds=1, steps={"full_bp": 1})
    with pytest.raises(ValueError, match="unknown method 'fullbp'"):
        arena.run(["fullbp"], task, seconds=1)
    with pytest.raises(ValueError, match="not an arena method"):
        arena.run(["sft_pg"], task, seconds=1)
    with pytest.raises(ValueError, match="steps must give a positive int per method"):
        arena.run(["full_bp", "ddpo"], task, steps={"full_bp": 2})
    digits_jpeg = tasks.Task("jpeg", "jpeg", "digits", jpeg_compressibility, (1, 8, 8))
    with pytest.raises(ValueError, match="not differentiable"):
        arena.run(["ddpo", "draft_1"], digits_jpeg, seconds=1)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("no_task")


def test_summary_auc_and_distinguishability():
    flat = {"step": [0, 5, 10], "seconds": [0, 1, 2], "calls": [0, 1, 2], "reward": [0.5, 0.5, 0.5], "drift": [0, 0, 0]}
    rise = dict(flat, reward=[0.0, 1.0, 1.0])
    result = {"steps": {"full_bp": 10, "ddpo": 10}, "runs": [
        {"method": "full_bp", "seed": 0, "pretrained": 0.5, "curve": flat},
        {"method": "ddpo", "seed": 0, "pretrained": 0.0, "curve": rise}]}
    rows = {r["method"]: r for r in arena.summarise(result)}
    assert rows["full_bp"]["auc"] == pytest.approx(0.5) and rows["ddpo"]["auc"] == pytest.approx(0.75)
    assert rows["ddpo"]["gain"] == pytest.approx(1.0)
    assert arena.distinguishable(list(rows.values())) == [("full_bp", "ddpo", True)]


def test_tasks_load_and_their_rewards_score_the_pretrained_model():
    for name, task in tasks.TASKS.items():
        model, schedule = task.load()
        assert not any(p.requires_grad for p in model.parameters())
        r = task.reward()
        assert isinstance(r, Reward) and task.why
        x = torch.zeros(4, *task.shape)
        assert r(x, task.eval_cond(4)).shape == (4,)


def test_a_logged_budget_replays_to_identical_numbers(tmp_path, monkeypatch):
    """repro --replay-steps: the second run takes the first run's step counts from the log, not from its own timing."""
    from minialign.measure import replay
    task, log = _tiny_task(), tmp_path / "steps.jsonl"
    monkeypatch.setenv(replay.STEPS_LOG, str(log))
    monkeypatch.setattr(replay, "_calls", {})
    a = arena.run(["full_bp", "ddpo"], task, seconds=0.3, seeds=[0], evals=2, progress=False)
    assert [json.loads(line)["steps"] for line in log.read_text().splitlines()] == [a["steps"]]
    monkeypatch.setenv(replay.STEPS_LOG, str(tmp_path / "second.jsonl"))
    monkeypatch.setenv(replay.STEPS_REPLAY, str(log))
    monkeypatch.setattr(replay, "_calls", {})
    monkeypatch.setattr(arena, "probe", lambda *a, **k: pytest.fail("a replayed run must not time its methods"))
    b = arena.run(["full_bp", "ddpo"], task, seconds=99.0, seeds=[0], evals=2, progress=False)
    assert b["steps"] == a["steps"]
    assert [r["curve"]["reward"] for r in a["runs"]] == [r["curve"]["reward"] for r in b["runs"]]
    with pytest.raises(ValueError, match="logged 1 arena count"):  # the log holds one run, this is a second
        arena.run(["full_bp"], task, seconds=0.3, seeds=[0], evals=1, progress=False)


def test_a_time_budgeted_latent_optimisation_replays_its_iteration_count(tmp_path, monkeypatch):
    from minialign.measure import replay
    from minialign.methods.sdo_latent import optimize_latent
    from minialign.rewards import target_region
    from minialign.toy import store

    net, sch, _ = store.load("gmm")
    kw = dict(shape=(2,), batch=8, n_steps=5, method="sdo", iters=1000, seconds=0.05, seed=0)
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv(replay.STEPS_LOG, str(log))
    monkeypatch.setattr(replay, "_calls", {})
    _, _, h1 = optimize_latent(net, sch, target_region((0.0, 0.0), radius=0.15), **kw)
    assert json.loads(log.read_text())["count"] == len(h1) - 1  # the iterations done, the final evaluation aside
    monkeypatch.setenv(replay.STEPS_REPLAY, str(log))
    monkeypatch.setenv(replay.STEPS_LOG, str(tmp_path / "second.jsonl"))
    monkeypatch.setattr(replay, "_calls", {})
    _, _, h2 = optimize_latent(net, sch, target_region((0.0, 0.0), radius=0.15), **{**kw, "seconds": 1e-9})
    assert [r["reward"] for r in h2] == [r["reward"] for r in h1]  # the count, not the (tiny) budget, decided
