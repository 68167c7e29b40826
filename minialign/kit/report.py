"""The reproducibility report that `python -m minialign.repro` writes next to report.json.

    OUT/report.md      header (date, profile, versions, hardware, total wall time), one row per notebook
                       (status, wall time), one row per metric against its tolerance, the failures, the figures
    OUT/report.html    the same, as a self-contained page (plain HTML, no template engine)
    OUT/figures/<name>_<k>.png   the k-th image/png output (k = 1, 2, ...) of the executed OUT/<name>.ipynb,
                       captioned with the markdown heading above its cell

A tolerance may carry a "why" next to its bounds ({"min": 0.04, "why": "seeds 0-4 gave 0.05-0.07"}): the
measured spread that justifies it; the metrics table shows it.

Input: the list of results of `repro.run_notebook` (each with metrics, tolerances, failures, error, seconds).
A metric row is `pass` when min <= value <= max (either bound may be absent), `FAIL` otherwise, `missing`
when a tolerance names a metric the notebook did not record (a failure too), and `unchecked` when the
notebook recorded a metric that has no tolerance in this profile.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

PASS, FAIL, MISSING, UNCHECKED = "pass", "FAIL", "missing", "unchecked"


def metric_rows(metrics: dict, tolerances: dict) -> list[dict]:
    """[{metric, value, min, max, status, why}]: every tolerance first (in its file's order), then unchecked metrics."""
    rows = []
    for key, bound in tolerances.items():
        lo, hi, why = bound.get("min"), bound.get("max"), bound.get("why", "")
        if key not in metrics:
            rows.append({"metric": key, "value": None, "min": lo, "max": hi, "status": MISSING, "why": why})
            continue
        v = metrics[key]
        ok = (lo is None or v >= lo) and (hi is None or v <= hi)
        rows.append({"metric": key, "value": v, "min": lo, "max": hi, "status": PASS if ok else FAIL, "why": why})
    for key in sorted(set(metrics) - set(tolerances)):
        rows.append({"metric": key, "value": metrics[key], "min": None, "max": None, "status": UNCHECKED, "why": ""})
    return rows


def extract_figures(executed: Path, figures: Path) -> list[tuple[Path, str]]:
    """Write every image/png output of an executed notebook to figures/<stem>_<k>.png (k from 1), in cell order;
    returns [(path, caption)], the caption being the last markdown heading above the figure's cell ("" if none)."""
    executed = Path(executed)
    if not executed.exists():
        return []
    for old in figures.glob(f"{executed.stem}_*.png"):  # a rerun may draw fewer figures
        old.unlink()
    nb = json.loads(executed.read_text())
    paths, heading = [], ""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            src = cell.get("source", "")
            src = "".join(src) if isinstance(src, list) else src
            heading = next((h.lstrip("#").strip() for h in reversed(src.splitlines()) if h.startswith("#")), heading)
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png is None:
                continue
            png = "".join(png) if isinstance(png, list) else png
            figures.mkdir(parents=True, exist_ok=True)
            path = figures / f"{executed.stem}_{len(paths) + 1}.png"
            path.write_bytes(base64.b64decode(png))
            paths.append((path, heading))
    return paths


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"


def _status(r: dict) -> str:
    return "ok" if r["ok"] else ("ERROR" if r["error"] else "OUT OF TOLERANCE")


def _tables(results: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """(notebook rows, metric rows) as strings, shared by the markdown and the HTML writers."""
    nbs, mets = [], []
    for r in results:
        rows = metric_rows(r.get("metrics", {}), r.get("tolerances", {}))
        checked = [m for m in rows if m["status"] != UNCHECKED]
        passed = sum(m["status"] == PASS for m in checked)
        nbs.append([r["name"], _status(r), f"{r['seconds']:.1f}", f"{passed}/{len(checked)}",
                    str(len(r.get("figures", [])))])
        mets += [[r["name"], m["metric"], _num(m["value"]), _num(m["min"]), _num(m["max"]), m["status"], m["why"]]
                 for m in rows]
    return nbs, mets


NB_HEAD = ["notebook", "status", "wall time (s)", "tolerances met", "figures"]
MET_HEAD = ["notebook", "metric", "value", "min", "max", "result", "why this tolerance"]


def _header(results: list[dict], meta: dict) -> tuple[str, list[tuple[str, str]]]:
    bad = [r["name"] for r in results if not r["ok"]]
    verdict = "PASS" if not bad else f"FAIL ({len(bad)} of {len(results)} notebooks: {', '.join(bad)})"
    total = sum(r["seconds"] for r in results)
    facts = [("date", meta["date"]), ("profile", meta["profile"]), ("device", meta["device"]),
             ("command", meta["command"]), ("total wall time", f"{total:.1f} s ({total / 60:.1f} min)")]
    return verdict, facts


def _problems(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        lines += [f"{r['name']}: {f}" for f in r["failures"]]
        if r["error"]:
            lines.append(f"{r['name']}: " + re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", r["error"]))  # no ANSI colours
    return lines


def markdown(results: list[dict], meta: dict) -> str:
    """report.md; figures are linked relative to OUT (figures/<name>_<k>.png)."""
    verdict, facts = _header(results, meta)
    nbs, mets = _tables(results)
    out = [f"# Reproducibility report: {verdict}", ""]
    out += [f"- **{k}**: {v}" for k, v in facts] + ["", "## Environment", "", "```", meta["environment"], "```", ""]

    def table(head, rows):
        cells = [head, ["---"] * len(head)] + [[c.replace("|", "\\|") for c in row] for row in rows]
        return ["| " + " | ".join(row) + " |" for row in cells] + [""]

    out += ["## Notebooks", ""] + table(NB_HEAD, nbs)
    out += ["## Metrics against `data/expected/<notebook>.json`", ""] + table(MET_HEAD, mets)
    problems = _problems(results)
    if problems:
        out += ["## Failures", "", "```"] + problems + ["```", ""]
    out += ["## Figures", ""]
    for r in results:
        out += [f"### {r['name']}", ""]
        for k, f in enumerate(r.get("figures", []), 1):
            out += [f"**Figure {k}**{': ' + f['caption'] if f['caption'] else ''}", "",
                    f"![{r['name']} figure {k}]({f['path']})", ""]
        out += [] if r.get("figures") else ["(none)", ""]
    return "\n".join(out)


def _css(status: str) -> str:
    if status in (PASS, "ok"):
        return "good"
    return "bad" if status in (FAIL, MISSING, "ERROR", "OUT OF TOLERANCE") else ""


def to_html(results: list[dict], meta: dict) -> str:
    """report.html: the same content as report.md, one page, figures as <img> links into figures/."""
    e = html.escape
    verdict, facts = _header(results, meta)
    nbs, mets = _tables(results)

    def table(head, rows, status_col):
        body = "".join("<tr>" + "".join(
            f'<td class="{_css(c)}">{e(c)}</td>' if i == status_col else f"<td>{e(c)}</td>" for i, c in enumerate(row))
            + "</tr>\n" for row in rows)
        return f"<table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>\n{body}</table>\n"

    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:.2em .6em}td.bad{background:#fcc}td.good{background:#cfc}"
             "img{max-width:100%}")
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Reproducibility report</title>"
             f"<style>{style}</style></head><body>\n<h1>Reproducibility report: {e(verdict)}</h1>\n<ul>"]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts]
    parts += [f"</ul>\n<h2>Environment</h2>\n<pre>{e(meta['environment'])}</pre>\n<h2>Notebooks</h2>",
              table(NB_HEAD, nbs, 1), "<h2>Metrics against data/expected/&lt;notebook&gt;.json</h2>",
              table(MET_HEAD, mets, 5)]
    problems = _problems(results)
    if problems:
        parts.append(f"<h2>Failures</h2>\n<pre>{e(chr(10).join(problems))}</pre>")
    parts.append("<h2>Figures</h2>")
    for r in results:
        parts.append(f"<h3>{e(r['name'])}</h3>")
        imgs = [f'<figure><a href="{e(f["path"])}"><img src="{e(f["path"])}" alt="{e(r["name"])} figure {k}"></a>'
                f'<figcaption>Figure {k}{": " + e(f["caption"]) if f["caption"] else ""}</figcaption></figure>'
                for k, f in enumerate(r.get("figures", []), 1)]
        parts += imgs or ["<p>(none)</p>"]
    return "\n".join(parts) + "\n</body></html>\n"


def write(results: list[dict], out: Path, meta: dict) -> tuple[Path, Path]:
    """Extract the figures of each executed notebook, then write OUT/report.md and OUT/report.html.
    meta: date, profile, device, command, environment (strings).
    Adds r["figures"] = [{"path": relative to OUT, "caption": ...}] to each result."""
    out = Path(out)
    for r in results:
        r["figures"] = [{"path": p.relative_to(out).as_posix(), "caption": caption}
                        for p, caption in extract_figures(out / f"{r['name']}.ipynb", out / "figures")]
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown(results, meta))
    page.write_text(to_html(results, meta))
    return md, page
