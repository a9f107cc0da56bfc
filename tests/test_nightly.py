"""Nightly regression: runs of their own (--run-id), the baseline, `harness regress` and its reports (markdown, JSON,
and HTML rendered in a real headless browser), and `harness nightly` inline and on a real SLURM.

Most comparisons plant their values: a night's records are written directly (or a trained night is copied and
its records' metrics edited; a record's id hashes its spec, not its metrics), so no test trains more than a few
one-epoch trials of the tiny ViT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from harness import runs
from harness.cli import main
from harness.plan import Cell, final_specs, fixed_hparams
from harness.store import Store
from harness.sweep import load_suite

FIXED = {"protocol": {"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42, 44]},
         "fixed": {"linear": {"*": {"lr": 0.1, "weight_decay": 0.0}},
                   "finetune": {"*": {"lr": 0.001, "weight_decay": 0.0}}},
         "flaky": ["finetune:demo-position"]}
CELLS = [("linear", "demo-digits"), ("linear", "demo-position"), ("finetune", "demo-digits"),
         ("finetune", "demo-position")]
#: the planted baseline night: per cell its two seeds' values (std 5 -> tolerance max(1, 3 x 5) = 15 on the
#: first cell; std 0.5 -> max(1, 1.5) = 1.5 elsewhere)
BASE = {("linear", "demo-digits"): [60.0, 70.0], ("linear", "demo-position"): [40.0, 41.0],
        ("finetune", "demo-digits"): [80.0, 81.0], ("finetune", "demo-position"): [50.0, 51.0]}
COST = {"train_images_per_s": 1000.0, "peak_memory_bytes": 2**30, "peak_memory_kind": "cpu_tensor_peak"}
#: where a planted night ran (records' provenance): a device identity and an execution
XEON = {"device_identity": {"kind": "cpu", "model": "Intel(R) Xeon(R) Platinum 8481C", "threads": 1, "isa": "AVX512"},
        "execution": {"executor": "inline", "trial_in_process": 1, "shared_process": True}}
EPYC = {**XEON, "device_identity": {"kind": "cpu", "model": "AMD EPYC 7B13", "threads": 1, "isa": "AVX2"}}


@pytest.fixture
def nightly(make_suite):
    """A tiny nightly suite (fixed hyperparameters, 2 seeds, 1 epoch; finetune/demo-position is flaky)."""
    return str(make_suite("nightly", methods=["linear", "finetune"], **FIXED))


@pytest.fixture
def results(tmp_path) -> Path:
    return tmp_path / "results"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def plant(results: Path, suite_path: str, run_id: str, values: dict | None = None, cost: dict | None = None,
          commit: str = "c0ffee", created: str | None = None, failed: tuple | None = None,
          machine: dict | None = None, dirty: bool = False, throughputs: list | None = None) -> runs.Run:
    """A night whose records are written directly: ``values`` per (method, task) (default BASE; a cell left out is
    missing), the same ``cost`` for every record (``throughputs``: per seed instead), ``failed`` = (method, task)
    whose first seed failed, ``machine`` the provenance's device identity and execution (default XEON)."""
    suite = load_suite(suite_path)
    run = runs.start_run(results, run_id, suite.name, command=["test"])
    if created:
        info = json.loads((run.folder / "run.json").read_text())
        info["created"] = created
        (run.folder / "run.json").write_text(json.dumps(info))
    store = run.store
    for (method, task), seeds in (BASE if values is None else values).items():
        cell = Cell(method, task)
        for i, (spec, value) in enumerate(zip(final_specs(suite, cell, fixed_hparams(suite, cell)), seeds)):
            record = {"spec": spec, "status": "ok", "metrics": {"eval": value}, "curve": [],
                      "params": {"trainable": 1000, "head": 10, "total": 5000}, "wall_time_s": 2.0,
                      "provenance": {"git": {"commit": commit, "dirty": dirty}, "device": "cpu",
                                     **(machine or XEON)},
                      "cost": {"forward_flops": 2e9, **COST, **(cost or {})}}
            if throughputs:
                record["cost"]["train_images_per_s"] = throughputs[i]
            if failed == (method, task) and i == 0:
                record.update(status="failed", metrics={"eval": None},
                              error={"type": "ValueError", "message": "planted", "traceback": ""})
            store.write(record)
    return runs.read_run(run.folder)


def baseline_file(capsys, suite: str, results: Path, run_id: str = "base") -> Path:
    out = results.parent / "baseline.json"
    code, text, err = cli(capsys, "baseline", "--suite", suite, "--results", str(results), "--run-id", run_id,
                          "--out", str(out))
    assert code == 0, err
    return out


def regress(capsys, suite: str, results: Path, baseline: Path, *extra: str) -> tuple[int, dict, str]:
    report_dir = results.parent / "report"
    code, out, err = cli(capsys, "regress", "--suite", suite, "--results", str(results), "--baseline",
                         str(baseline), "--report-dir", str(report_dir), *extra)
    report = json.loads((report_dir / "report.json").read_text()) if (report_dir / "report.json").exists() else {}
    return code, report, out + err


def flagged(report: dict) -> dict[str, list[str]]:
    return {row["cell"]: [f["kind"] for f in row["flags"]] for row in report["cells"] if row["flags"]}


# --------------------------------------------------------------------------------------------------------- runs
def test_auto_run_ids_are_utc_minutes_and_bad_ids_are_refused():
    assert runs.new_run_id(datetime(2026, 11, 30, 3, 0, 59, tzinfo=timezone.utc)) == "2026-11-30T0300Z"
    assert runs.parse_time("2026-11-30T0300Z") == datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)
    assert runs.parse_time("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc)
    for bad in ("../x", "a/b", "", "latest", "auto", ".hidden"):
        with pytest.raises(runs.HarnessError):
            runs.check_run_id(bad)


def test_two_nights_are_both_kept_a_rerun_resumes_and_nightly_compares(nightly, results, capsys):
    """Real (one-epoch) training: two run ids train twice and both stay; the same id again is a no-op; the
    normal store never sees them; then a baseline and an inline `harness nightly` that finds nothing changed."""
    select = ["--suite", nightly, "--results", str(results), "--methods", "linear", "--tasks", "demo-digits",
              "--no-progress", "--no-table"]
    code, out, _ = cli(capsys, "run", *select, "--run-id", "night-1")
    assert code == 0 and "2 trials (2 to run)" in out and f"run night-1: records under {results}/_runs/night-1" in out
    code, out, _ = cli(capsys, "run", *select, "--run-id", "night-1")
    assert code == 0 and "all 2 trials are done; nothing to run" in out
    code, out, _ = cli(capsys, "run", *select, "--run-id", "night-2")
    assert code == 0 and "2 trials (2 to run)" in out

    listed = runs.list_runs(results, "nightly")
    assert [r.run_id for r in listed] == ["night-1", "night-2"]
    for run in listed:
        assert len(run.store.scan("nightly")) == 2
        assert run.info["git"]["commit"] and run.info["suites"] == ["nightly"]
    assert len(listed[0].info["invocations"]) == 2  # the resume is recorded too
    assert Store(results).scan() == [] and Store(results).problems == []  # runs never mix into normal tables
    code, out, _ = cli(capsys, "status", "--suite", nightly, "--results", str(results), "--run-id", "latest",
                       "--methods", "linear", "--tasks", "demo-digits")
    assert code == 0 and "1 cells: 2 done" in out
    code, out, _ = cli(capsys, "table", "--suite", nightly, "--results", str(results), "--run-id", "night-1",
                       "--methods", "linear", "--tasks", "demo-digits")
    assert code == 0 and "linear" in out and " ± " in out

    baseline = results.parent / "baseline.json"
    # --allow-dirty: these records come from the working tree under test, committed or not
    code, out, _ = cli(capsys, "baseline", *select[:8], "--run-id", "night-1", "--out", str(baseline), "--allow-dirty")
    assert code == 0 and "froze 1 cell(s)" in out
    report_dir = results.parent / "nightly-report"
    code, out, _ = cli(capsys, "nightly", *select, "--run-id", "night-3", "--baseline", str(baseline),
                       "--report-dir", str(report_dir), "--cost-tol", "inf")
    assert code == 0, out
    assert "clean: no regression" in out and (report_dir / "report.html").is_file()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["run"]["run_id"] == "night-3" and report["baseline"]["run_id"] == "night-1"
    assert report["verdict"] == "clean" and report["exit_code"] == 0
    assert report["cells"][0]["delta"] == 0.0  # same code, same seeds: the same numbers
    # beside the report: the night's suite page, linked from both reports, its table the night's records
    assert report["suite_page"] == "nightly.html"
    assert "href='nightly.html'" in (report_dir / "report.html").read_text()
    assert "](nightly.html)" in (report_dir / "report.md").read_text()
    assert f"<td>{report['cells'][0]['current']['mean']:.4f}</td>" in (report_dir / "nightly.html").read_text()
    assert [r.run_id for r in runs.list_runs(results, "nightly")] == ["night-1", "night-2", "night-3"]

    # a planted drop in a copy of a trained night: edit one record's metric (the id hashes the spec only)
    night = copy_night(results, "night-3", "night-4")
    record_path = next((night / "nightly").rglob("final-*.json"))
    record = json.loads(record_path.read_text())
    record["metrics"]["eval"] -= 30.0
    record_path.write_text(json.dumps(record))
    code, report, _ = regress(capsys, nightly, results, baseline, "--run-id", "night-4", "--methods", "linear",
                              "--tasks", "demo-digits", "--cost-tol", "inf")
    assert code == 1 and report["cells"][0]["cell"] == "linear/demo-digits"
    assert "drop" in flagged(report)["linear/demo-digits"]


def copy_night(results: Path, source: str, target: str) -> Path:
    """A copy of a night under another run id, started a minute after the latest run."""
    folder = results / "_runs" / target
    shutil.copytree(results / "_runs" / source, folder)
    info = json.loads((folder / "run.json").read_text())
    latest = max(r.time for r in runs.list_runs(results))
    info.update(run_id=target, created=datetime.fromtimestamp(latest.timestamp() + 60, timezone.utc).isoformat())
    (folder / "run.json").write_text(json.dumps(info))
    return folder


# ----------------------------------------------------------------------------------------------------- baseline
def test_the_baseline_holds_mean_std_n_and_cost_of_the_records(nightly, results, capsys):
    plant(results, nightly, "base", commit="abc123")
    path = baseline_file(capsys, nightly, results)
    baseline = json.loads(path.read_text())
    assert baseline["suite"] == "nightly" and baseline["run"]["run_id"] == "base"
    assert baseline["git"]["commit"] == "abc123" and baseline["settings"]["train"]["epochs"] == 1
    cell = baseline["cells"]["linear/demo-digits"]
    assert (cell["mean"], cell["std"], cell["n"]) == (65.0, 5.0, 2)  # the table's mean and (population) std
    assert cell["values"] == {"42": 60.0, "44": 70.0}
    assert cell["throughput"] == 1000.0 and cell["peak_memory_bytes"] == 2**30 and cell["wall_time_s"] == 2.0
    assert set(baseline["cells"]) == {f"{m}/{t}" for m, t in CELLS}


def test_without_a_run_or_records_there_is_nothing_to_freeze(nightly, results, capsys):
    code, _, err = cli(capsys, "baseline", "--suite", nightly, "--results", str(results), "--out",
                       str(results / "b.json"))
    assert code == 2 and "no run of suite 'nightly'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------ regress
def test_a_drop_beyond_tolerance_fails_and_comes_first(nightly, results, capsys):
    plant(results, nightly, "base", commit="abc123")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", {**BASE, ("linear", "demo-position"): [38.0, 39.0],  # -2 > 1.5: regression
                                      ("linear", "demo-digits"): [50.0, 52.0]},          # -14 < 15: within
          commit="def456", created="2099-01-01T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, baseline)
    assert code == 1 and report["exit_code"] == 1
    assert report["cells"][0]["cell"] == "linear/demo-position" and report["cells"][0]["verdict"] == "regression"
    assert flagged(report) == {"linear/demo-position": ["drop"]}
    within = next(r for r in report["cells"] if r["cell"] == "linear/demo-digits")
    assert within["verdict"] == "ok" and within["tolerance"] == 15.0 and within["delta"] == -14.0
    assert report["baseline"]["git"]["commit"] == "abc123" and report["run"]["git"]["commit"] == "def456"
    assert "REGRESSION" in out and "abc123" in out and "def456" in out
    md = (results.parent / "report" / "report.md").read_text()
    assert "abc123" in md and "def456" in md and md.index("linear/demo-position") < md.index("linear/demo-digits")


def test_a_drop_within_tolerance_is_clean(nightly, results, capsys):
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", {**BASE, ("linear", "demo-digits"): [52.0, 54.0],   # -12 < 15
                                      ("finetune", "demo-digits"): [79.0, 80.5]},         # -0.75 < 1.5
          created="2099-01-01T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, baseline)
    assert code == 0 and report["verdict"] == "clean" and not flagged(report) and "clean: no regression" in out
    assert report["cells"][0]["cell"] == "linear/demo-digits"  # the largest change first


def test_a_missing_cell_and_a_failed_trial_are_flagged(nightly, results, capsys):
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    night = {k: v for k, v in BASE.items() if k != ("finetune", "demo-digits")}
    plant(results, nightly, "night", night, failed=("linear", "demo-position"), created="2099-01-01T03:00:00+00:00")
    code, report, _ = regress(capsys, nightly, results, baseline)
    assert code == 1
    assert flagged(report) == {"finetune/demo-digits": ["missing"], "linear/demo-position": ["failed", "seeds"]}
    assert {r["cell"] for r in report["cells"][:2]} == {"finetune/demo-digits", "linear/demo-position"}


def test_a_flaky_cell_is_reported_but_never_fails(nightly, results, capsys):
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", {**BASE, ("finetune", "demo-position"): [10.0, 11.0]},
          created="2099-01-01T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, baseline)
    assert code == 0 and report["counts"]["flaky"] == 1
    assert report["cells"][0]["cell"] == "finetune/demo-position" and report["cells"][0]["verdict"] == "flaky"
    assert "flaky: finetune/demo-position: drop" in out


def test_cost_regressions_are_flagged(nightly, results, capsys):
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", cost={"train_images_per_s": 600.0, "peak_memory_bytes": 2**31},
          created="2099-01-01T03:00:00+00:00")
    code, report, _ = regress(capsys, nightly, results, baseline)
    assert code == 1 and set(flagged(report)) == {f"{m}/{t}" for m, t in CELLS}
    assert [r["verdict"] for r in report["cells"]] == ["regression"] * 3 + ["flaky"]
    assert flagged(report)["linear/demo-digits"] == ["throughput", "memory"]
    assert cli(capsys, "regress", "--suite", nightly, "--results", str(results), "--baseline", str(baseline),
               "--report-dir", str(results.parent / "r2"), "--cost-tol", "inf")[0] == 0


def test_cost_is_not_compared_with_a_baseline_of_another_machine(nightly, results, capsys):
    """A baseline frozen on a Xeon, a night on an EPYC with the same accuracies, 40% slower and with more memory:
    clean (exit 0), and the header says once that cost was not compared on each cell, naming both machines."""
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    assert json.loads(baseline.read_text())["device"].startswith("Intel(R) Xeon(R) Platinum 8481C, 1 thread, AVX512")
    plant(results, nightly, "night", cost={"train_images_per_s": 600.0, "peak_memory_bytes": 2**31}, machine=EPYC,
          created="2099-01-01T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, baseline)
    assert code == 0 and not flagged(report), out
    why = "baseline on Intel(R) Xeon(R) Platinum 8481C, AVX512; this run on AMD EPYC 7B13, AVX2"
    assert report["cost"]["throughput"] == {"compared": 0, "not_compared": {why: 4}}
    assert report["cost"]["memory"] == {"compared": 0, "not_compared": {
        "baseline on Intel(R) Xeon(R) Platinum 8481C, this run on AMD EPYC 7B13": 4}}
    assert f"cost: throughput compared on 0 of 4 cell(s); 4 on accuracy only: {why}" in out
    markdown = (results.parent / "report" / "report.md").read_text()
    assert f"- cost: throughput compared on 0 of 4 cell(s); 4 on accuracy only: {why}" in markdown


def test_an_executor_change_skips_throughput_but_memory_is_still_compared(nightly, results, capsys):
    """Tonight in fresh SLURM jobs on the baseline's machine: throughput is not compared (a process of its own
    runs at another speed), the CPU's tensor peak is (it does not depend on the process), and a doubled peak is
    flagged."""
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    slurm = {**XEON, "execution": {"executor": "slurm", "trial_in_process": 1, "shared_process": True}}
    plant(results, nightly, "night", cost={"train_images_per_s": 100.0, "peak_memory_bytes": 2**31}, machine=slurm,
          created="2099-01-01T03:00:00+00:00")
    code, report, _ = regress(capsys, nightly, results, baseline)
    assert code == 1 and flagged(report)["linear/demo-digits"] == ["memory"]
    assert report["cost"]["throughput"]["not_compared"] == {
        "baseline on inline executor; this run on slurm executor": 4}
    assert report["cost"]["memory"] == {"compared": 4, "not_compared": {}}


def test_the_throughput_tolerance_widens_with_the_baselines_own_spread(nightly, results, capsys):
    """Baseline seeds at 600 and 1400 img/s (±40%): a night at 700 (-30%) is within k x their spread; the same
    night against seeds at 1000 and 1000 is a throughput regression beyond the 25% floor."""
    only = {("linear", "demo-digits"): [60.0, 70.0]}
    plant(results, nightly, "base", values=only, throughputs=[600.0, 1400.0])
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", values=only, throughputs=[700.0, 700.0], created="2099-01-01T03:00:00+00:00")
    code, report, _ = regress(capsys, nightly, results, baseline, "--methods", "linear", "--tasks", "demo-digits")
    row = report["cells"][0]
    assert code == 0 and row["throughput_change"] == pytest.approx(-0.3)
    assert row["throughput_tolerance"] == pytest.approx(3 * 0.4)
    plant(results, nightly, "base2", values=only, throughputs=[1000.0, 1000.0])
    steady = baseline_file(capsys, nightly, results, run_id="base2")
    code, report, _ = regress(capsys, nightly, results, steady, "--methods", "linear", "--tasks", "demo-digits")
    assert code == 1 and flagged(report) == {"linear/demo-digits": ["throughput"]}
    assert report["cells"][0]["throughput_tolerance"] == pytest.approx(0.25)


def test_a_baseline_of_a_dirty_tree_is_refused_unless_allowed_and_then_said(nightly, results, capsys):
    """Records made with uncommitted changes: `harness baseline` refuses them (exit 2, one line naming the commit);
    with --allow-dirty it freezes them, marked, and every report says so. No path of the machine is stored."""
    plant(results, nightly, "base", dirty=True)
    out_file = results.parent / "baseline.json"
    argv = ["baseline", "--suite", nightly, "--results", str(results), "--run-id", "base", "--out", str(out_file)]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and not out_file.exists()
    assert "uncommitted changes (commit c0ffee + edits)" in err and "--allow-dirty" in err and "Traceback" not in err
    assert cli(capsys, *argv, "--allow-dirty")[0] == 0
    frozen = json.loads(out_file.read_text())
    assert frozen["git"]["dirty"] is True and str(results) not in out_file.read_text()
    plant(results, nightly, "night", created="2099-01-01T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, out_file)
    assert code == 0 and any("frozen from records of a tree with uncommitted changes" in n for n in report["notes"])


def test_could_not_compare_is_exit_2_with_one_clear_line(nightly, make_suite, results, capsys):
    base = ["regress", "--suite", nightly, "--results", str(results), "--report-dir", str(results.parent / "r")]
    code, _, err = cli(capsys, *base, "--baseline", str(results / "none.json"))
    assert code == 2 and "no baseline file" in err and "Traceback" not in err
    code, _, err = cli(capsys, "nightly", "--suite", nightly, "--results", str(results), "--baseline",
                       str(results / "none.json"), "--report-dir", str(results.parent / "r"))
    assert code == 2 and "no baseline file" in err and not results.exists()  # said before the night, not after
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    code, _, err = cli(capsys, "regress", "--suite", nightly, "--results", str(results.parent / "empty"),
                       "--baseline", str(baseline))
    assert code == 2 and "no run of suite 'nightly'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, *base, "--baseline", str(baseline), "--run-id", "night-9")
    assert code == 2 and "no run 'night-9'" in err
    other = str(make_suite("other", methods=["linear", "finetune"], **FIXED))
    code, _, err = cli(capsys, "regress", "--suite", other, "--results", str(results), "--baseline", str(baseline))
    assert code == 2 and "a baseline of suite 'nightly', not 'other'" in err


def test_since_prints_each_cells_history_and_the_html_draws_the_flagged_one(nightly, results, capsys):
    plant(results, nightly, "base", created="2026-10-30T03:00:00+00:00")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "2026-11-01T0300Z", created="2026-11-01T03:00:00+00:00")
    plant(results, nightly, "2026-11-02T0300Z", {**BASE, ("linear", "demo-position"): [30.0, 31.0]},
          created="2026-11-02T03:00:00+00:00")
    code, report, out = regress(capsys, nightly, results, baseline, "--since", "2026-11-01")
    assert code == 1 and report["run"]["run_id"] == "2026-11-02T0300Z"
    history = report["history"]["linear/demo-position"]
    assert [n["run_id"] for n in history] == ["2026-11-01T0300Z", "2026-11-02T0300Z"]  # 'base' is before --since
    assert [n["mean"] for n in history] == [40.5, 30.5]
    assert "2026-11-01T0300Z" in out and "30.50 ± 0.50 (n=2)" in out
    page = (results.parent / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "http://" not in page and "https://" not in page


def test_flaky_entries_are_validated_with_the_suite(make_suite, capsys):
    path = make_suite("nightly", methods=["linear"], **{**FIXED, "flaky": ["linear", "lineer:demo-digits"]})
    code, _, err = cli(capsys, "run", "--suite", str(path), "--dry-run")
    assert code == 2 and "flaky: expected 'method:task'" in err
    assert "unknown method 'lineer'; did you mean: linear?" in err and f"{path}:" in err


def test_the_nightly_suite_is_valid_and_small():
    suite = load_suite("nightly")
    assert suite.protocol["kind"] == "fixed" and len(suite.seeds) == 2 and len(suite.tasks) == 2
    assert set(suite.methods) == {"linear", "finetune", "vpt-deep", "lora", "toast", "toast-lite"}
    assert suite.raw["flaky"] == [] and suite.train["epochs"] <= 5


# ------------------------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does as root)")
def test_the_html_report_renders_in_a_headless_browser(nightly, results, capsys, tmp_path):
    plant(results, nightly, "base", created="2026-10-30T03:00:00+00:00")
    baseline = baseline_file(capsys, nightly, results)
    for day in (1, 2, 3):
        drop = {("linear", "demo-position"): [40.0 - 4 * day, 41.0 - 4 * day]} if day > 1 else {}
        plant(results, nightly, f"2026-11-0{day}T0300Z", {**BASE, **drop}, created=f"2026-11-0{day}T03:00:00+00:00",
              cost={"train_images_per_s": 500.0} if day == 3 else None)
    code, report, _ = regress(capsys, nightly, results, baseline, "--since", "2026-11-01")
    assert code == 1
    page = results.parent / "report" / "report.html"
    png = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={png}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 20_000
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("RGB").resize((120, 160)).getcolors(maxcolors=120 * 160)
        assert colours is None or len(colours) > 20  # text, tables and a figure, not a blank page
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for row in report["cells"]:
        if row["flags"]:
            assert row["cell"] in dom
    assert "REGRESSION" in dom and "<img" in dom


# ---------------------------------------------------------------------------------------------- on a real SLURM
def _slurm_down() -> str | None:
    from test_slurm import DOWN

    return DOWN


@pytest.mark.slurm
def test_a_night_on_slurm_submits_the_grid_and_a_report_job_that_runs_after_it(make_suite, results, capsys):
    down = _slurm_down()
    if down:
        pytest.skip(down)
    suite = str(make_suite("nightly", methods=["linear", "finetune"], tasks=["demo-digits"], **FIXED,
                           slurm={"time": 5, "cpus": 1}, executor={"code_check": "warn"}))
    select = ["--suite", suite, "--results", str(results), "--no-progress"]
    assert cli(capsys, "run", *select, "--run-id", "night-1", "--no-table")[0] == 0  # inline: the baseline night
    baseline = results.parent / "baseline.json"
    assert cli(capsys, "baseline", *select[:4], "--run-id", "night-1", "--out", str(baseline), "--allow-dirty")[0] == 0
    report_dir = results.parent / "report"
    code, out, err = cli(capsys, "nightly", *select, "--run-id", "night-2", "--executor", "slurm", "--baseline",
                         str(baseline), "--report-dir", str(report_dir), "--cost-tol", "inf")
    assert code == 0, err
    assert "submitted 2 cell(s) as SLURM job" in out and "starts after job(s)" in out
    jobs = results / "_runs" / "night-2" / "nightly" / "_jobs"
    array = json.loads((jobs / "submissions.jsonl").read_text().splitlines()[0])["job_id"].split("_")[0]
    report_job = out.split("report job ")[1].split(":")[0]
    try:
        show = subprocess.run(["scontrol", "show", "job", report_job], capture_output=True, text=True).stdout
        assert f"afterany:{array}" in show.replace("_*", "")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (report_dir / "report.json").exists():
            time.sleep(1)
        report = json.loads((report_dir / "report.json").read_text())
    finally:
        subprocess.run(["scancel", array, report_job], capture_output=True)
    assert report["verdict"] == "clean" and report["run"]["run_id"] == "night-2", report
    assert {row["current"]["n"] for row in report["cells"]} == {2}  # the array had ended when the report ran
    assert (report_dir / "report.md").is_file() and (report_dir / "report.html").is_file()
    recs = [json.loads(p.read_text()) for p in (results / "_runs" / "night-2").rglob("final-*.json")]
    assert len(recs) == 4 and all(r["provenance"]["slurm"] for r in recs)

    # planted on copies of the SLURM night: a drop beyond tolerance, one within, a missing cell
    def planted(name: str, delta: float | None) -> str:
        night = copy_night(results, "night-2", name)
        path = sorted((night / "nightly" / "linear").rglob("final-*.json"))[0]
        if delta is None:
            path.unlink()
            for other in (night / "nightly" / "linear").rglob("final-*.json"):
                other.unlink()
        else:
            record = json.loads(path.read_text())
            record["metrics"]["eval"] += delta
            path.write_text(json.dumps(record))
        return name

    tol = json.loads(baseline.read_text())["cells"]["linear/demo-digits"]
    beyond = -2 * 2 * max(1.0, 3 * tol["std"]) - 1  # one of two seeds: the mean moves by half of it
    code, rep, _ = regress(capsys, suite, results, baseline, "--run-id", planted("night-3", beyond), "--cost-tol", "inf")
    assert code == 1 and rep["cells"][0]["cell"] == "linear/demo-digits" and "drop" in flagged(rep)["linear/demo-digits"]
    code, rep, _ = regress(capsys, suite, results, baseline, "--run-id", planted("night-4", -0.5), "--cost-tol", "inf")
    assert code == 0 and not flagged(rep)
    code, rep, _ = regress(capsys, suite, results, baseline, "--run-id", planted("night-5", None), "--cost-tol", "inf")
    assert code == 1 and flagged(rep) == {"linear/demo-digits": ["missing"]}


def test_the_slurm_report_job_writes_the_report_and_fails_on_a_regression(nightly, results, capsys, tmp_path):
    """What the report job does once SLURM starts it (called here directly): a regression is written, then raised,
    so the job ends FAILED; a comparison that cannot be made still writes a report that says why."""
    from harness.executors.report import ReportJob
    from harness.regress import Tolerances

    suite = load_suite(nightly)
    plant(results, nightly, "base")
    baseline = baseline_file(capsys, nightly, results)
    plant(results, nightly, "night", {**BASE, ("linear", "demo-position"): [30.0, 31.0]},
          created="2099-01-01T03:00:00+00:00")
    job = ReportJob(suite, results, "night", baseline, tmp_path / "rep", Tolerances(), suite.methods, suite.tasks)
    with pytest.raises(RuntimeError, match="regression"):
        job()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["exit_code"] == 1
    job = ReportJob(suite, results, "night-9", baseline, tmp_path / "rep2", Tolerances(), suite.methods, suite.tasks)
    with pytest.raises(RuntimeError, match="could not compare"):
        job()
    assert "no run 'night-9'" in (tmp_path / "rep2" / "report.md").read_text()
