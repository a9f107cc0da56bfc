"""``harness report``: one self-contained page per suite whose numbers are the table's, whose figures are real
images, and whose search heat map and cell counts come from the records."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest

from harness.cli import main
from harness.plan import Cell, final_specs, search_specs
from harness.store import Store
from harness.sweep import load_suite

GRID = {"linear": {"lr": [1.0, 0.1], "weight_decay": [0.01, 0.0]}}
SEARCH = (40.0, 70.0, 55.0, None)  # in ParameterGrid order; None: the trial diverged


def record(spec, value, status="ok", curve=()):
    return {"spec": spec, "status": status, "metrics": {"eval": value} if value is not None else {},
            "curve": list(curve), "params": {"trainable": 1000, "head": 10, "total": 5000},
            "provenance": {"git": {"commit": "abcdef1234567890", "dirty": False}, "hostname": "node7",
                           "packages": {"torch": "2.5.1"}},
            "cost": {"forward_flops": 2e9, "train_images_per_s": 100.0}}


@pytest.fixture
def filled(make_suite, tmp_path):
    """linear on demo-digits searched over 2 x 2 points (one diverged) with the winner's two finals written;
    finetune on it with nothing yet."""
    path = make_suite(grids=GRID)
    suite, store = load_suite(str(path)), Store(tmp_path / "results")
    cell = Cell("linear", "demo-digits")
    points = search_specs(suite, cell)
    for spec, value in zip(points, SEARCH):
        store.write(record(spec, value) if value is not None else record(spec, None, status="diverged"))
    winner = points[SEARCH.index(70.0)]
    for spec, value in zip(final_specs(suite, cell, winner.hparams), (71.0, 75.0)):
        store.write(record(spec, value, curve=[{"epoch": 1, "eval": value - 10}, {"epoch": 2, "eval": value}]))
    return path, suite, store, points, winner


def make_page(capsys, path, store, tmp_path) -> str:
    assert main(["report", "--suite", str(path), "--methods", "linear,finetune", "--tasks", "demo-digits",
                 "--results", str(store.root), "--out", str(tmp_path / "page")]) == 0
    written = capsys.readouterr().out.strip()
    return open(written).read()


def test_the_page_holds_the_tables_numbers_and_the_cells_counts(filled, capsys, tmp_path):
    path, suite, store, points, winner = filled
    page = make_page(capsys, path, store, tmp_path)
    first_table = page.split("<h2>Table</h2>", 1)[1].split("</table>", 1)[0]
    rows = {cells[0]: cells[1:] for cells in (re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", row)
                                              for row in first_table.split("<tr>")[1:])}
    assert rows["linear"][:3] == ["73.0000", "2.0000", "2"]  # the csv table: mean, std, seeds of the finals
    assert rows["finetune"][0] == ""  # no record: an empty cell, not a number
    cells = page.split("<h2>Cells</h2>", 1)[1].split("</table>", 1)[0]
    linear_row = re.findall(r"<td[^>]*>([^<]*)</td>", cells.split("linear/demo-digits", 1)[1].split("</tr>")[0])
    assert linear_row[:4] == ["2 of 2", "0", "1", "0"]  # finals counted, missing, diverged, failed
    assert "abcdef123456 (2)" in page and "node7 (2)" in page  # the two counted finals' provenance
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained


def test_every_figure_is_a_png_and_the_search_heat_map_marks_the_winner(filled, capsys, tmp_path):
    from PIL import Image

    path, suite, store, points, winner = filled
    page = make_page(capsys, path, store, tmp_path)
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'>", page)
    captions = [alt for alt, _ in images]
    assert len(images) == 4, captions  # per-task bars, trade-off, learning curves, linear's search
    for _, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
    assert captions[-1].startswith("linear/demo-digits: validation metric")

    from harness.suite_report import search_figure

    fig = search_figure(suite, store, "linear", "demo-digits")
    ax = fig.axes[0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["40.0", "55.0", "70.0", "div"]
    outline = [p for p in ax.patches if not p.get_fill()]
    assert len(outline) == 1
    lrs = [float(t.get_text()) for t in ax.get_yticklabels()]
    wds = [float(t.get_text()) for t in ax.get_xticklabels()]
    x, y = outline[0].get_xy()
    assert (lrs[round(y + 0.5)], wds[round(x + 0.5)]) == (winner.hparams["lr"], winner.hparams["weight_decay"])
    assert search_figure(suite, store, "finetune", "demo-digits") is None  # a grid with nothing run yet


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does as root)")
def test_the_page_renders_in_a_headless_browser(filled, capsys, tmp_path):
    """No console message, and every image decoded by the browser itself (a copy of the page counts, after load,
    the images with no natural width: the page has no script of its own)."""
    path, suite, store, points, winner = filled
    page = make_page(capsys, path, store, tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                                              "'data-broken', [...document.images].filter(i => !i.naturalWidth)"
                                              ".length))</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
             "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []
    assert 'data-broken="0"' in done.stdout and done.stdout.count("<img") == 4
    assert "73.0000" in done.stdout
