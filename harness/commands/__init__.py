"""Subcommands of the ``harness`` CLI, one module each, plus the options they share."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.store import Store, default_cache_dir, default_results_dir
from harness.sweep import Suite, load_suite, parse_set


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_results_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder (default: $HARNESS_RESULTS or ./results)")


def add_suite_args(parser: argparse.ArgumentParser, overrides: bool = True) -> None:
    """--suite and the selection/override flags shared by run, table and status (the same flags select the
    same records)."""
    parser.add_argument("--suite", default="demo", help="suite name (sweeps/<suite>.yaml) or a suite file path")
    parser.add_argument("--methods", help="comma list of methods, wildcards allowed (default: the suite's)")
    parser.add_argument("--tasks", help="comma list of tasks or task lists, wildcards allowed (default: the suite's)")
    add_results_arg(parser)
    parser.add_argument("--run-id", metavar="ID",
                        help="the records of run ID, a store of its own under <results>/_runs/ID/ (run: 'auto' "
                             "names a new run by the UTC time, the same ID resumes; elsewhere: 'latest' is the "
                             "suite's most recent run)")
    if not overrides:
        return
    group = parser.add_argument_group("overrides (part of every trial spec: they never mix with full-protocol records)")
    group.add_argument("--epochs", type=int, help="training epochs per trial")
    group.add_argument("--seeds", type=int, help="use the first N of the protocol's seeds")
    group.add_argument("--grid-points", type=int, help="use the first N points of each method's search grid")
    group.add_argument("--backbone", help="timm model name (weights from --weights, else timm's own)")
    group.add_argument("--weights", help="backbone weights: a local .pth/.safetensors/.npz, 'timm', or 'none'")
    group.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override any suite key, dotted (e.g. train.batch_size=32); repeatable")
    parser.add_argument("--data-root", help="where the suite's datasets live (not part of the trial spec)")


def suite_from_args(args: argparse.Namespace) -> Suite:
    suite = _load_suite_from_args(args)
    if getattr(args, "data_root", None) is not None:
        note_unused_data_root(suite, args.data_root)
    return suite


def note_unused_data_root(suite: Suite, data_root: str) -> None:
    """Say on stderr that ``--data-root`` changes nothing when none of the suite's tasks reads data files (the
    demo makes its own), instead of accepting it silently."""
    import sys

    from harness.api import TASKS

    if not any(TASKS.get(name).reads_data for name in TASKS.match(suite.tasks)):
        print(f"note: --data-root {data_root} is ignored: the tasks of suite {suite.name} read no data files "
              "(they make their own)", file=sys.stderr)


def _load_suite_from_args(args: argparse.Namespace) -> Suite:
    return load_suite(
        args.suite,
        epochs=getattr(args, "epochs", None),
        seeds=getattr(args, "seeds", None),
        grid_points=getattr(args, "grid_points", None),
        backbone=getattr(args, "backbone", None),
        weights=getattr(args, "weights", None),
        data_root=getattr(args, "data_root", None),
        sets=parse_set(getattr(args, "set", None)),
    )


def results_dir(args: argparse.Namespace) -> Path:
    return args.results if args.results is not None else default_results_dir()


def store_from_args(args: argparse.Namespace, suite: Suite | None = None, start: bool = False) -> Store:
    """The results store, or with ``--run-id`` that run's own store (:mod:`harness.runs`). ``start`` (``harness
    run``): the run may be new (``auto`` becomes a new id, written back to ``args.run_id``); otherwise it must
    exist (``latest``: the suite's most recent run)."""
    results = results_dir(args)
    run_id = getattr(args, "run_id", None)
    if not run_id:
        return Store(results)
    from harness import runs

    if start or getattr(args, "dry_run", False):  # the run's store; start_run_from_args records the run
        if run_id == "auto":
            args.run_id = run_id = runs.new_run_id()
        return Store(runs.run_folder(results, run_id))
    suite = suite or suite_from_args(args)
    return runs.open_run(results, run_id, suite.name).store


def start_run_from_args(args: argparse.Namespace, suite: Suite) -> None:
    """With ``--run-id``: create or resume the run (its folder and ``run.json``: commit, time, command line). Called
    by ``harness run`` once everything was checked, so a refused run leaves no empty night behind."""
    if not getattr(args, "run_id", None):
        return
    from harness import runs

    run = runs.start_run(results_dir(args), args.run_id, suite.name, executor=getattr(args, "executor", None))
    print(f"run {run.run_id}: records under {run.folder}")


def cache_dir() -> Path:
    return default_cache_dir()
