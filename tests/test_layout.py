"""The package's layout rules, read from the source with ast (moved here from test_arena.py, and made able to fail):

(a) no module outside minialign/methods/ names a registered method in a string literal (docstrings aside): the
    registry's hooks carry whatever a method needs, so nothing special-cases one;
(b) a method file imports only the contract and the core (minialign.methods.chain / estimators, sampling, schedule,
    rewards, layers, lora) and its own private helpers (`<method>_*.py`, and shortcut.py for ShortFT), never a
    sibling method; relative and absolute imports alike, at module level or inside a function;
(c) no file in minialign/ is longer than 300 lines.
Each exception is listed below with its reason.
"""
import ast
from pathlib import Path

import pytest

from minialign.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1] / "minialign"
METHODS = ROOT / "methods"
MAX_LINES = 300
CORE = {"minialign.methods.chain", "minialign.methods.estimators", "minialign.sampling", "minialign.schedule",
        "minialign.rewards", "minialign.layers", "minialign.lora"}
REGISTRY_FILES = {"__init__", "plan_rows"}   # the registry itself imports every method
HELPER_OF = {"shortcut": "shortft"}         # helpers not named <method>_*.py
IMPORT_EXCEPTIONS = {  # (file stem, imported module): why
    ("sft_pg", "minialign.train"): "sft_pg.fit runs the training loop for notebook 01 (not part of the loss)",
    ("shortcut", "minialign.toy.store"): "the shipped shortcut is a checkpoint of the toy store (load/save)",
    ("sdo_latent", "minialign.measure.replay"): "a time budget's iteration count is logged and replayed (--replay-steps)",
    ("rlr_budget", "minialign.measure.memory"): "RLR's memory budget is made of measured saved bytes",
}
NAME_EXCEPTIONS = {  # module (relative to minialign/): the literals it may use, and why
    "kit/results.py": (set(REGISTRY), "the claims judge the seed papers' own methods and read their notebooks' keys"),
    "kit/readme.py": ({"rlr", "sdo"}, "README block names (the notebook sections), not methods"),
    "sd/sft_pg.py": ({"sft_pg"}, "SFT-PG's own experiment on Stable Diffusion (notebook 06)"),
    "measure/rlr_cost.py": ({"rlr"}, "RLR's own ZO options measured side by side: 'rlr' names its default variant"),
}


def _method_stems():
    """Stems of the files that hold a registered method's make_loss."""
    return {m.make_loss.__module__.rsplit(".", 1)[1] for m in REGISTRY.values()
            if m.make_loss.__module__.startswith("minialign.methods.")}


def _family(stem, method_stems):
    if stem in method_stems:
        return stem
    if stem in HELPER_OF:
        return HELPER_OF[stem]
    owners = [m for m in method_stems if stem.startswith(m + "_")]
    return max(owners, key=len) if owners else None


def _imports(path: Path):
    """Every minialign module `path` imports (absolute, or relative resolved against minialign.methods)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("minialign"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = "minialign.methods".split(".")[:len("minialign.methods".split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if not module.startswith("minialign"):
                continue
            for a in node.names:  # from minialign.measure import replay: the submodule, if it is one
                sub = ROOT.parent.joinpath(*f"{module}.{a.name}".split("."))
                yield f"{module}.{a.name}" if sub.with_suffix(".py").exists() or sub.is_dir() else module


def _allowed(stem, module, method_stems):
    if any(module == c or module.startswith(c + ".") for c in CORE) or (stem, module) in IMPORT_EXCEPTIONS:
        return True
    if module.startswith("minialign.methods."):
        other = module.split(".")[2]
        return _family(other, method_stems) == _family(stem, method_stems) is not None
    return False


@pytest.mark.parametrize("path", sorted(p for p in METHODS.glob("*.py") if p.stem not in REGISTRY_FILES),
                         ids=lambda p: p.name)
def test_method_files_import_only_the_contract_and_their_own_helpers(path):
    stems = _method_stems()
    bad = sorted({m for m in _imports(path) if not _allowed(path.stem, m, stems)})
    assert not bad, f"{path.name} imports {bad}: method files import only {sorted(CORE)} and their own helpers"


def test_the_import_rule_can_fail():
    """The rule sees absolute, relative and function-level imports of a sibling or of a front end."""
    stems = _method_stems()
    assert not _allowed("sdo", "minialign.methods.rlr", stems)            # a sibling method
    assert not _allowed("rlr_budget", "minialign.methods.sdo_latent", stems)  # another method's helper
    assert not _allowed("ddpo", "minialign.measure.bench", stems)         # a front end
    assert _allowed("sdo_latent", "minialign.methods.sdo", stems) and _allowed("shortcut", "minialign.methods.shortft", stems)
    src = "from .rlr import make_loss\ndef f():\n    from minialign.methods import truncated_bp\nimport minialign.train\n"
    tmp = METHODS.parent.parent / "tests" / "_layout_probe.py"
    try:
        tmp.write_text(src)
        assert set(_imports(tmp)) == {"minialign.methods.rlr", "minialign.methods.truncated_bp", "minialign.train"}
    finally:
        tmp.unlink()


def _literals(path: Path):
    """(line, value) of every str constant in `path` that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.lineno, n.value


def test_no_module_outside_methods_names_a_registered_method():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("methods/"):
            continue
        allowed = NAME_EXCEPTIONS.get(rel, (set(), ""))[0]
        found += [f"{rel}:{line} {value!r}" for line, value in _literals(path) if value in REGISTRY and value not in allowed]
    assert not found, "name methods through the registry (hooks, methods.names(), EXACT), not literals: " + ", ".join(found)


def test_no_library_file_is_longer_than_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
