"""The reproducibility report of `python -m minialign.repro`, on a tiny 3-cell notebook (a few seconds of papermill)."""
import json

import nbformat
import pytest

from minialign.kit import repro, report
NAME = "00_tiny"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A notebook folder with one notebook (code cells: parameters, a figure, save_metrics) and its tolerances."""
    notebooks, expected = tmp_path / "notebooks", tmp_path / "expected"
    notebooks.mkdir()
    expected.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [
        nbformat.v4.new_code_cell('profile = "cpu"\ndevice = "cpu"\nseed = 0\nmetrics_out = "m.json"\nscale = 1.0',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("# Tiny\n## A line to look at\nText."),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [0, scale])\nplt.show()"),
        nbformat.v4.new_code_cell("from minialign.kit.repro import save_metrics\n"
                                  'save_metrics({"gain": 2.0 * scale, "loss": 0.5, "extra": 7.0}, metrics_out)'),
    ]
    nbformat.write(nb, notebooks / f"{NAME}.ipynb")
    monkeypatch.setattr(repro, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(repro, "EXPECTED", expected)

    def set_tolerances(smoke):
        (expected / f"{NAME}.json").write_text(json.dumps({"smoke": smoke, "cpu": {"gain": {"min": 100}}}))
    return tmp_path / "out", set_tolerances


@pytest.mark.notebook  # ~10-25 s here: the kernel imports torch for save_metrics
def test_report_lists_every_metric_and_links_the_figure(tiny, capfd):
    out, set_tolerances = tiny
    set_tolerances({"gain": {"min": 1.5, "max": 2.5, "why": "seeds 0-4: 1.9-2.1"}, "loss": {"max": 1.0}})
    assert repro.main(["--profile", "smoke", "--out", str(out), "--only", NAME]) == 0
    console = capfd.readouterr()
    assert "without encryption" not in console.out + console.err, "the kernel's TCP warning is back"
    assert f"(1/1) {NAME} (smoke) started" in console.out
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.startswith("# Reproducibility report: PASS")
    assert "| 00_tiny | gain | 2 | 1.5 | 2.5 | pass | seeds 0-4: 1.9-2.1 |" in md
    assert "| 00_tiny | loss | 0.5 |  | 1 | pass |" in md
    assert "| 00_tiny | extra | 7 |  |  | unchecked |" in md
    nb_row = next(line for line in md.splitlines() if line.startswith("| 00_tiny | ok |"))
    assert nb_row.endswith("| 2/2 | 1 |"), nb_row  # tolerances met, figures
    for text in (md, page):
        assert "profile" in text and "torch" in text and "cpu:" in text and "total wall time" in text
    png = out / "figures" / f"{NAME}_1.png"
    assert png.read_bytes().startswith(b"\x89PNG"), "the figure of the executed notebook was not extracted"
    assert f"**Figure 1**: A line to look at\n\n![00_tiny figure 1](figures/{NAME}_1.png)" in md
    assert f'src="figures/{NAME}_1.png"' in page and "<figcaption>Figure 1: A line to look at" in page
    results = json.loads((out / "report.json").read_text())
    assert results[0]["figures"] == [{"path": f"figures/{NAME}_1.png", "caption": "A line to look at"}]
    assert results[0]["tolerances"]["loss"] == {"max": 1.0}


@pytest.mark.notebook
def test_a_perturbed_tolerance_fails_and_is_named(tiny, capfd):
    out, set_tolerances = tiny
    set_tolerances({"gain": {"min": 2.5}, "loss": {"max": 1.0}, "absent": {"max": 1.0}})  # gain is 2.0
    out.mkdir()  # a previous run of this notebook: its time is the estimate, and a heartbeat line shows up
    (out / "report.json").write_text(json.dumps([{"name": NAME, "profile": "smoke", "seconds": 123.0}]))
    repro_heartbeat = repro.HEARTBEAT
    repro.HEARTBEAT = 0.2
    try:
        assert repro.main(["--profile", "smoke", "--out", str(out), "--only", NAME]) == 1
    finally:
        repro.HEARTBEAT = repro_heartbeat
    console = capfd.readouterr().out
    assert "gain = 2 < min 2.5" in console and "absent: missing from the metrics" in console
    assert "last run took 123 s" in console and "s elapsed, about" in console
    md = (out / "report.md").read_text()
    assert md.startswith("# Reproducibility report: FAIL (1 of 1 notebooks: 00_tiny)")
    assert "| 00_tiny | gain | 2 | 2.5 |  | FAIL |" in md and "| 00_tiny | absent |  |  | 1 | missing |" in md
    assert "00_tiny: gain = 2 < min 2.5" in md.split("## Failures")[1]
    assert "| 00_tiny | loss | 0.5 |  | 1 | pass |" in md
    assert '<td class="bad">FAIL</td>' in (out / "report.html").read_text()


def test_metric_rows_match_check_tolerances(tmp_path, monkeypatch):
    """report's pass/fail agrees with check_tolerances (the exit status) at and around the bounds."""
    monkeypatch.setattr(repro, "EXPECTED", tmp_path)
    tol = {"a": {"min": 1.0}, "b": {"max": 2.0}, "c": {"min": 0.0, "max": 1.0}, "d": {"min": 0.0}}
    (tmp_path / "nb.json").write_text(json.dumps({"smoke": tol}))
    for metrics in ({"a": 1.0, "b": 2.0, "c": 0.5, "d": 0.0}, {"a": 0.99, "b": 2.01, "c": 1.5, "x": 3.0}):
        rows = report.metric_rows(metrics, repro.tolerances("nb", "smoke"))
        failed = {r["metric"] for r in rows if r["status"] in (report.FAIL, report.MISSING)}
        named = {f.split(" ")[0].rstrip(":") for f in repro.check_tolerances("nb", "smoke", metrics)}
        assert failed == named
        assert [r["metric"] for r in rows if r["status"] == report.UNCHECKED] == sorted(set(metrics) - set(tol))


def test_html_escapes_and_figures_of_a_failed_run(tmp_path):
    """An error message with markup stays text in the HTML and loses its terminal colours; a run without an
    executed notebook has no figures."""
    results = [{"name": "01_x", "ok": False, "error": "ValueError: <b>bad</b> | \x1b[0;31mx\x1b[0m", "failures": [],
                "seconds": 1.0, "metrics": {}, "tolerances": {"m": {"min": 0}}}]
    meta = {"date": "d", "profile": "smoke", "device": "cpu", "command": "c", "environment": "torch 2"}
    md, page = report.write(results, tmp_path, meta)
    assert "&lt;b&gt;bad&lt;/b&gt;" in page.read_text() and "<b>bad</b>" not in page.read_text()
    text = md.read_text()
    assert "01_x: ValueError: <b>bad</b> | x\n" in text, "the error, without ANSI colour codes"
    assert "| 01_x | ERROR |" in text and "| 01_x | m |  | 0 |  | missing |" in text and "(none)" in text


def test_compare_names_each_differing_metric_and_skips_timing(tmp_path):
    for run, value in (("a", 0.5), ("b", 0.6)):
        (tmp_path / run / "metrics").mkdir(parents=True)
        (tmp_path / run / "metrics" / "nb.json").write_text(json.dumps(
            {"reward": value, "same": 1.0, "seconds": value * 100, "time_ratio_vs_full_bp": value}))
    diffs, same, timed = repro.compare(tmp_path / "a", tmp_path / "b")
    assert diffs == ["nb.reward: 0.5 vs 0.6"] and same == 1 and timed == 2
    assert repro.main(["--compare", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert repro.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_output_widgets_are_left_to_the_cell_while_a_notebook_runs():
    """repro.no_widget_sync: nbclient's Output-widget handler (which talks to the kernel on the shell channel mid-cell)
    is off inside the context and back afterwards."""
    from nbclient.client import NotebookClient

    msg = {"content": {"comm_id": "c", "data": {"state": {"_model_module": "@jupyter-widgets/output",
                                                           "_model_name": "OutputModel", "outputs": []}}}}
    client = NotebookClient(nbformat.v4.new_notebook())
    with repro.no_widget_sync():
        assert client.on_comm_open_jupyter_widget(msg) is None
    assert client.on_comm_open_jupyter_widget(msg) is not None


def test_compare_with_a_relative_tolerance(tmp_path):
    for run, v in (("a", 0.015954535124544256), ("b", 0.015954477846819273)):
        (tmp_path / run / "metrics").mkdir(parents=True)
        (tmp_path / run / "metrics" / "nb.json").write_text(json.dumps({"swd": v, "label": 1}))
    assert len(repro.compare(tmp_path / "a", tmp_path / "b")[0]) == 1            # bit-equal by default
    assert repro.compare(tmp_path / "a", tmp_path / "b", rtol=1e-5)[0] == []      # 3.6e-6 apart
    assert len(repro.compare(tmp_path / "a", tmp_path / "b", rtol=1e-6)[0]) == 1
