"""The README's result tables are generated from the committed metrics and agree with them."""
import json
import shutil

import pytest

from minialign.kit import readme
from minialign.kit.results import load_metrics


def test_the_readme_tables_agree_with_the_committed_metrics():
    new, changed = readme.render(readme.README.read_text(), load_metrics())
    assert not changed, f"README blocks {changed} disagree with notebooks/metrics: run python -m minialign.kit.readme --write"
    assert readme.main([]) == 0


def test_every_block_is_in_the_readme_once():
    names = [m["name"] for m in readme.BLOCK.finditer(readme.README.read_text())]
    assert sorted(names) == sorted(readme.BLOCKS), names


def test_a_changed_metric_is_caught(tmp_path):
    """The check can fail: one metric moved in a copy of the metrics makes its block disagree."""
    folder = tmp_path / "metrics"
    shutil.copytree(readme.NOTEBOOKS / "metrics", folder)
    path = folder / "04_sdo.json"
    m = json.loads(path.read_text())
    m["cos_latent_first"] = m.get("cos_latent_first", 0.0) + 0.5
    path.write_text(json.dumps(m))
    _, changed = readme.render(readme.README.read_text(), load_metrics(folder))
    assert "sdo" in changed
    assert readme.main(["--metrics", str(folder)]) == 1


def test_a_missing_metric_prints_a_dash_not_an_error():
    text = "<!-- results: sdo -->\nold\n<!-- /results -->\n"
    new, changed = readme.render(text, {})
    assert changed == ["sdo"] and "| — |" in new


def test_an_unknown_block_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        readme.render("<!-- results: nope -->\n<!-- /results -->\n", {})
