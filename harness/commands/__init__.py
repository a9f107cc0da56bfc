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


def store_from_args(args: argparse.Namespace) -> Store:
    return Store(args.results if args.results is not None else default_results_dir())


def cache_dir() -> Path:
    return default_cache_dir()
