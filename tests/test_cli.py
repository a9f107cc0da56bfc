"""End to end through the CLI on a tiny suite: run, table, status, resume after a kill, clear errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))]


def test_run_prints_a_table_and_a_second_run_is_a_no_op(make_suite, tmp_path, capsys):
    suite = str(make_suite())
    results = tmp_path / "results"
    assert main(["run", "--suite", suite, "--results", str(results), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 methods x 2 tasks = 4 cells, 16 trials (16 to run)" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "method"
    assert {row.split("|")[1].strip() for row in table[1:]} == {"linear", "finetune"}
    assert all(" ± " in row for row in table[1:])  # mean ± std over the two seeds
    recs = records(results)
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    assert {r["status"] for r in recs} == {"ok"}
    rec = next(r for r in recs if r["spec"]["stage"] == "final")
    assert rec["params"]["trainable"] >= 0 and rec["params"]["total"] > rec["params"]["head"] > 0
    assert rec["provenance"]["packages"]["torch"] and "commit" in rec["provenance"]["git"]
    assert len(rec["curve"]) == 1 and rec["data_fingerprint"]["test"]

    assert main(["run", "--suite", suite, "--results", str(results), "--no-progress"]) == 0
    assert "all 16 trials are done; nothing to run" in capsys.readouterr().out
    assert len(records(results)) == 16

    assert main(["status", "--suite", suite, "--results", str(results)]) == 0
    assert "4 cells: 16 done, 0 diverged, 0 failed, 0 pending" in capsys.readouterr().out


def test_dry_run_plans_without_running(make_suite, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", "--suite", str(make_suite()), "--results", str(results), "--dry-run", "--methods", "lin*",
                 "--grid-points", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 methods x 2 tasks = 2 cells, 6 trials (6 to run)" in out
    assert "linear/demo-digits" in out and "finetune" not in out
    assert not results.exists()


def test_unknown_method_is_one_clear_line_and_exit_2(capsys):
    assert main(["run", "--methods", "linar", "--suite", "demo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "harness: error: unknown method 'linar'; did you mean: linear?"


def test_malformed_sweep_names_file_and_key(make_suite, capsys):
    path = make_suite(protocol={"kind": "grid-and-pray"})
    assert main(["run", "--suite", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "protocol.kind: expected one of search-then-final, fixed" in err
    assert "Traceback" not in err


def test_diverged_trials_are_recorded_and_skipped_by_selection(make_suite, tmp_path, capsys):
    suite = str(make_suite(methods=["linear"], tasks=["demo-digits"],
                           grids={"linear": {"lr": [1e38, 0.1], "weight_decay": [0.0]}}))
    results = tmp_path / "results"
    assert main(["run", "--suite", suite, "--results", str(results), "--no-progress", "--seeds", "1"]) == 0
    recs = records(results)
    diverged = [r for r in recs if r["status"] == "diverged"]
    finals = [r for r in recs if r["spec"]["stage"] == "final"]
    assert len(diverged) == 1 and diverged[0]["spec"]["hparams"]["lr"] == 1e38
    assert diverged[0]["metrics"]["eval"] is None
    assert [f["spec"]["hparams"]["lr"] for f in finals] == [0.1]


def test_killed_run_resumes_with_no_lost_or_duplicated_records(make_suite, tmp_path):
    suite = str(make_suite(train={"epochs": 2}))
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--suite", suite, "--results", str(results),
           "--no-progress", "--no-table"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(results.rglob("*.json"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in results.rglob("*.json")}
    assert 5 <= len(done_before) < 16, "the run must be killed mid-grid"

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = records(results)
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    assert done_before <= {p.name for p in results.rglob("*.json")}
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]


def help_examples(capsys, command: str) -> list[list[str]]:
    """The argument lists of the ``harness ...`` example lines under a subcommand's ``examples:``."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out.split("examples:", 1)[1]
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("harness ")]


def test_every_example_in_runs_help_parses_and_the_demo_ones_plan(capsys, tmp_path):
    """Each example of ``harness run --help`` is accepted by the real parser; those on the demo suite also plan
    (names, --set paths and overrides checked against the suite) with --dry-run, exit 0."""
    from harness.cli import build_parser

    examples = help_examples(capsys, "run")
    assert len(examples) >= 5
    parser = build_parser()
    for argv in examples:
        args = parser.parse_args(argv)
        assert args.command == "run" and args.suite
    demo = [argv for argv in examples if argv[argv.index("--suite") + 1] == "demo" and "--executor" not in argv]
    assert len(demo) >= 3
    for argv in demo:
        assert main([*argv, "--dry-run", "--results", str(tmp_path / "r")]) == 0, argv


# ----------------------------------------------------------------------- known before the first trial, exit codes
def test_a_missing_weights_file_is_refused_before_any_trial(make_suite, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", "--suite", str(make_suite()), "--results", str(results), "--no-progress",
                 "--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "missing.pth")])
    assert code == 2 and not results.exists()
    err = capsys.readouterr().err
    assert f"backbone weights file not found: {tmp_path / 'missing.pth'}" in err and "Traceback" not in err


def test_an_unknown_timm_backbone_is_refused_before_any_trial(make_suite, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", "--suite", str(make_suite()), "--results", str(results), "--backbone", "vit_tiny_patch16_2244"])
    assert code == 2 and not results.exists()
    assert "unknown timm backbone 'vit_tiny_patch16_2244'; did you mean: vit_tiny_patch16_224" in capsys.readouterr().err


def test_a_missing_toast_checkpoint_stops_the_run_before_the_linear_cells(make_suite, tmp_path, capsys):
    """TOAST needs a pre-tuned module the suite cannot make by itself: the run names the problem before any
    trial, instead of training the linear cells first and stopping halfway."""
    suite = make_suite(methods=["linear", "toast"], pretune={"image_folder": None, "checkpoint": None},
                       grids={"linear": {"lr": [1.0], "weight_decay": [0.0]}, "toast": {"lr": [1.0], "weight_decay": [0.0]}})
    results = tmp_path / "results"
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 2
    assert not list(results.rglob("*.json"))
    assert "harness pretune --suite" in capsys.readouterr().err


def test_a_cell_whose_search_all_diverged_makes_the_run_exit_1(make_suite, tmp_path, capsys):
    suite = make_suite(methods=["finetune"], tasks=["demo-digits"],
                       grids={"finetune": {"lr": [1.0e30], "weight_decay": [0.0]}})
    argv = ["run", "--suite", str(suite), "--results", str(tmp_path / "results"), "--no-progress", "--no-table"]
    dead_end = "no result: finetune/demo-digits: no search trial finished (all diverged); final trials not run"
    assert main(argv) == 1
    assert capsys.readouterr().out.count(dead_end) == 1
    assert main(argv) == 1  # still not finished on a second run: said again, once
    assert capsys.readouterr().out.count(dead_end) == 1


def test_data_loader_workers_are_capped_at_usable_cpus():
    from harness.train import loader_workers, usable_cpus

    assert loader_workers(8) == min(8, usable_cpus()) and loader_workers(0) == 0
    assert loader_workers(10_000) == usable_cpus()
