"""Figures are drawn from the table's own summary: `harness plot` writes valid PNG and PDF files whose bars are the
table's means, the trade-off's points its mean over tasks and parameters; the nightly history figure draws the
baseline and its tolerance band."""

from __future__ import annotations

import pytest
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle

from harness.cli import main
from harness.figures import figure_to_png_bytes, history_figure, save, task_bars, tradeoff
from harness.store import Store
from harness.sweep import load_suite
from harness.table import build_table, suite_summary
from records import put

PNG, PDF = b"\x89PNG\r\n\x1a\n", b"%PDF-"
TASKS = ["demo-digits", "demo-textures", "demo-position"]


@pytest.fixture
def recorded(fixed_suite, tmp_path):
    """A three-task suite with linear on every task and finetune on two (its mean over tasks is missing)."""
    path = fixed_suite(tasks=TASKS)
    suite, store = load_suite(path), Store(tmp_path / "results")
    put(store, suite, "linear", "demo-digits", [60.0, 70.0])
    put(store, suite, "linear", "demo-textures", [50.0, 52.0])
    put(store, suite, "linear", "demo-position", [30.0, 40.0])
    put(store, suite, "finetune", "demo-digits", [90.0, 80.0], trainable=250_000)
    put(store, suite, "finetune", "demo-textures", [55.0], trainable=250_000)
    return path, suite, store


def bars(fig) -> dict[str, Rectangle]:
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle) and p.get_gid()}


def test_plot_writes_png_and_pdf(recorded, tmp_path, capsys):
    path, suite, store = recorded
    out = tmp_path / "figures"
    assert main(["plot", "--suite", path, "--results", str(store.root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [out / f"tiny-{kind}.{ext}" for kind in ("tasks", "tradeoff") for ext in ("png", "pdf")]
    assert sorted(printed) == sorted(str(p) for p in expected)
    for file in expected:
        assert file.read_bytes().startswith(PNG if file.suffix == ".png" else PDF), file


def test_plot_defaults_to_the_results_folder(recorded, capsys):
    path, suite, store = recorded
    assert main(["plot", "--suite", path, "--results", str(store.root), "--methods", "linear"]) == 0
    assert (store.root / "figures" / "tiny-tasks.png").exists()
    assert (store.root / "figures" / "tiny-tradeoff.pdf").exists()


def test_plot_without_records_is_an_error(fixed_suite, tmp_path, capsys):
    assert main(["plot", "--suite", fixed_suite(), "--results", str(tmp_path / "empty")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_bars_are_the_tables_means(recorded):
    path, suite, store = recorded
    summary = suite_summary(suite, store)
    fig = task_bars(summary)
    drawn = bars(fig)
    assert set(drawn) == {"linear/demo-digits", "linear/demo-textures", "linear/demo-position",
                          "finetune/demo-digits", "finetune/demo-textures"}  # finetune/demo-position: no bar
    csv = build_table(suite, store, fmt="csv").splitlines()
    header = csv[0].split(",")
    for line in csv[1:]:
        row = dict(zip(header, line.split(",")))
        for task in TASKS:
            if row[task]:
                assert drawn[f"{row['method']}/{task}"].get_height() == pytest.approx(float(row[task]), abs=1e-4)
    assert drawn["linear/demo-digits"].get_height() == 65.0
    assert drawn["finetune/demo-textures"].get_hatch() == "///"  # 1 of 2 seeds
    assert drawn["linear/demo-digits"].get_hatch() is None
    # one panel per task, titled by it, in the table's order
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["demo-digits", "demo-textures",
                                                                       "demo-position"]
    # the error bar spans mean ± std (65 ± 5)
    digits = next(ax for ax in fig.axes if ax.get_title() == "demo-digits")
    segments = [seg for coll in digits.collections for seg in coll.get_segments()]
    assert any(sorted(y for _, y in seg) == pytest.approx([60.0, 70.0]) for seg in segments)
    assert figure_to_png_bytes(fig).startswith(PNG)


def test_tradeoff_points_are_the_mean_over_tasks_against_parameters(recorded, fixed_suite, tmp_path):
    path, suite, store = recorded
    fig = tradeoff(suite_summary(suite, store))
    ax = fig.axes[0]
    points = [c.get_offsets()[0] for c in ax.collections if isinstance(c, PathCollection)]
    # linear: (65 + 51 + 35) / 3 = 50.33 at (1000 + 10 head) params; finetune lacks demo-position: no point
    assert len(points) == 1
    assert points[0][0] == pytest.approx(1010 / 1e6) and points[0][1] == pytest.approx(151 / 3)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["linear"]
    assert any("finetune" in t.get_text() for t in fig.texts)  # named as not shown

    put(store, suite, "finetune", "demo-position", [45.0, 45.0], trainable=250_000)
    fig = tradeoff(suite_summary(suite, store))
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["finetune", "linear"]
    assert len(ax.lines) == 1  # the Pareto front: linear (small) then finetune (better)


def test_history_figure_draws_nights_and_the_baseline_band(tmp_path):
    nights = [{"run_id": f"r{i}", "time": f"2024-05-0{i + 1}T02:00:00Z", "mean": mean, "std": 0.5, "n": 3}
              for i, mean in enumerate([70.0, 70.4, 69.8, 66.0])]
    nights.append({"run_id": "r9", "time": "2024-05-06T02:00:00+00:00", "mean": None, "std": None, "n": 0})
    fig = history_figure(nights, {"mean": 70.0, "tolerance": 1.5}, "linear / demo-digits")
    ax = fig.axes[0]
    assert ax.get_title() == "linear / demo-digits"
    band = [p for p in ax.patches if p.get_label().startswith("baseline ±")]
    assert len(band) == 1
    ys = ([band[0].get_y(), band[0].get_y() + band[0].get_height()] if isinstance(band[0], Rectangle)
          else band[0].get_xy()[:, 1])  # a Rectangle since matplotlib 3.9, a Polygon before
    assert min(ys) == pytest.approx(68.5) and max(ys) == pytest.approx(71.5)
    assert any(line.get_label() == "baseline 70.0" and set(line.get_ydata()) == {70.0} for line in ax.lines)
    red = [line for line in ax.lines if line.get_color() == "#C44E52" and line.get_marker() == "o"]
    assert len(red) == 1 and list(red[0].get_ydata()) == [66.0]  # the night outside the band
    assert figure_to_png_bytes(fig).startswith(PNG)
    paths = save(fig, tmp_path / "deep" / "history")
    assert [p.name for p in paths] == ["history.png", "history.pdf"]
    assert paths[1].read_bytes().startswith(PDF)


@pytest.mark.parametrize("baseline", [None, {"mean": 50.0}])
def test_history_figure_without_band_or_nights(baseline):
    fig = history_figure([], baseline, "empty")
    assert figure_to_png_bytes(fig).startswith(PNG)
    one = history_figure([{"run_id": "a", "time": "2024-05-01T02:00:00", "mean": 50.0, "std": 0.0, "n": 1}],
                         baseline, "one night")
    assert not [p for p in one.axes[0].patches if p.get_label().startswith("baseline ±")]
    assert figure_to_png_bytes(one).startswith(PNG)


def test_harness_help_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys; from harness.cli import build_parser; build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
