"""``harness run``: plan the grid, then run (or submit) what is missing, then print the table."""

from __future__ import annotations

import argparse
import sys

from harness.api import TASKS
from harness.commands import add_suite_args, cache_dir, formatter, store_from_args, suite_from_args
from harness.errors import HarnessError
from harness.plan import plan_cells, planned_trial_count, select_names
from harness.runner import cell_status
from harness.train import TrialEnv

EXAMPLES = """\
examples:
  harness run --suite demo                                   # the demo's default methods and tasks
  harness run --suite demo --methods 'linear,vpt*' --tasks demo-digits
  harness run --suite demo --epochs 2 --seeds 1 --grid-points 1      # a smoke run (kept apart from full runs)
  harness run --suite vtab --tasks vtab-paper --data-root ~/data/vtab-1k --dry-run
  harness run --suite demo --set train.batch_size=32 --set grids.linear.lr=[1.0,0.1]
  harness run --suite demo --executor local --workers 2               # cells as parallel local processes
  harness run --suite fgvc --methods toast,lora --executor slurm --partition gpu --gpus 1 --time 600
  harness run --suite vtab --executor slurm --sbatch constraint=a100 --setup 'module load cuda'
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run or submit a suite's grid", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the planned cells and trial counts; run nothing")
    parser.add_argument("--executor", default="inline",
                        help="where cells run: inline (default, this process), local (parallel processes, waits), "
                             "slurm (job arrays; submits and returns)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="save each trial's trained (trainable) weights next to its record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    add_cluster_args(parser)
    parser.set_defaults(func=main)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Job settings for --executor local/slurm; each overrides the suite's slurm:/executor: section."""
    group = parser.add_argument_group("jobs (--executor local / slurm; override the suite's slurm: section)")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--time", type=int, metavar="MIN", help="time limit per job (one cell), minutes (default 240)")
    group.add_argument("--gpus", type=int, help="GPUs per job")
    group.add_argument("--cpus", type=int, help="CPUs per job (also torch's thread count in the job)")
    group.add_argument("--mem-gb", type=float, help="memory per job, GB")
    group.add_argument("--array-parallelism", type=int, metavar="N", help="at most N array jobs running at once")
    group.add_argument("--sbatch", action="append", metavar="KEY=VALUE", default=[],
                       help="extra #SBATCH line, e.g. gres=gpu:a100:1 or hold=true; repeatable")
    group.add_argument("--setup", action="append", metavar="LINE", default=[],
                       help="shell line run before the job (e.g. 'module load cuda'); repeatable")
    group.add_argument("--workers", type=int, metavar="N", help="--executor local: processes at once")
    group.add_argument("--code-check", choices=("refuse", "warn"),
                       help="a job whose code changed since submission refuses to run (default) or warns")


def plan_summary(suite, cells, store) -> tuple[list[dict], int]:
    rows, pending = [], 0
    for cell in cells:
        counts = cell_status(suite, cell, store)
        n_search, n_final = planned_trial_count(suite, cell)
        rows.append({"cell": cell.key, "search": n_search, "final": n_final, **counts})
        pending += counts["pending"] + counts["failed"]
    return rows, pending


def main(args: argparse.Namespace) -> int:
    from harness.executors import EXECUTORS
    from harness.errors import did_you_mean

    if args.executor not in EXECUTORS:
        raise HarnessError(f"unknown executor '{args.executor}'{did_you_mean(args.executor, EXECUTORS)}")
    suite = suite_from_args(args)
    method_names, task_names = select_names(suite, args.methods, args.tasks)
    store = store_from_args(args)
    env = TrialEnv(cache_dir=cache_dir(), data_root=suite.data_root, progress=not args.no_progress,
                   keep_weights=args.keep_weights, results_root=store.root)
    _preflight(suite, task_names, env)
    cells = plan_cells(method_names, task_names)
    rows, pending = plan_summary(suite, cells, store)
    for problem in store.problems:
        print(f"warning: {problem}", file=sys.stderr)

    from tabulate import tabulate

    total = sum(r["search"] + r["final"] for r in rows)
    header = (f"suite {suite.name}: {len(method_names)} methods x {len(task_names)} tasks = {len(cells)} cells, "
              f"{total} trials ({pending} to run)")
    if suite.overrides:
        header += f"; overrides {suite.overrides}"
    print(header)
    if args.dry_run:
        print(tabulate(rows, headers="keys", tablefmt="simple"))
        return 0
    if pending == 0:
        print(f"all {total} trials are done; nothing to run")
        code = 0
    else:
        code = EXECUTORS[args.executor](suite, cells, store, env, args, total_pending=pending)
    if not args.no_table and not getattr(EXECUTORS[args.executor], "returns_before_done", False):
        from harness.table import build_table

        print()
        print(build_table(suite, store, methods=method_names, tasks=task_names))
    return code


def _preflight(suite, task_names: list[str], env: TrialEnv) -> None:
    """Cheap data checks before anything runs: refuse with the same messages as ``harness data check``."""
    problems: list[str] = []
    for name in task_names:
        task = TASKS.get(name)
        ctx = env.data_context({"data": {k: v for k, v in suite.data.items() if k != "root"}})
        problems += task.check(ctx, deep=False)
    if problems:
        raise HarnessError("the data is not ready:\n  " + "\n  ".join(problems))
