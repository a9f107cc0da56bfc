"""``harness run``: plan the grid, check everything that can be checked before the first trial, then run (or
submit) what is missing, then print the table.

Exit status: 0 every planned trial has a record and every cell has its final trials; 1 some trials failed or a
cell could not finish (e.g. every search trial diverged, so there is no winner to retrain); 2 usage or data errors
(unknown names, a bad suite file, missing data, weights or pre-tuned checkpoints), found before anything runs.
With ``--executor slurm`` the jobs are submitted and the status is 0 once they are: follow with ``harness status``.
"""

from __future__ import annotations

import argparse
import os
import sys

from harness.api import METHODS, TASKS
from harness.commands import (add_suite_args, cache_dir, formatter, start_run_from_args, store_from_args,
                              suite_from_args)
from harness.errors import HarnessError
from harness.plan import (Cell, cell_state, final_specs, fixed_hparams, plan_cells, planned_trial_count,
                          search_specs, select_names)

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
  harness run --suite nightly --run-id auto          # a run of its own (<results>/_runs/<UTC time>/): trains again
  harness run --suite demo --methods finetune --tasks demo-digits --devices 2   # each trial on 2 processes
  harness run --suite vtab --executor slurm --gpus 1 --devices 4 --nodes 2      # each trial on 8 GPUs
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run or submit a suite's grid", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    add_suite_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned cells, trial counts and estimated GPU-hours; run nothing (what "
                             "would stop a run, such as missing data, is listed as warnings)")
    parser.add_argument("--gpus-available", type=int, default=1, metavar="N",
                        help="--dry-run: the wall time estimate spreads the GPU-hours over N GPUs (default 1)")
    parser.add_argument("--executor", default="inline",
                        help="where cells run: inline (default, this process), local (parallel processes, waits), "
                             "slurm (job arrays; submits and returns)")
    parser.add_argument("--keep-weights", action="store_true",
                        help="save each trial's trained (trainable) weights next to its record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-cache", action="store_true",
                        help="no frozen-computation cache: the linear probe runs its frozen backbone and TOAST its "
                             "first pass on every batch")
    parser.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help="also log each trial to tensorboard, mlflow or wandb (repeatable; adds to the suite's "
                             "log: list); needs pip install 'harness[TRACKER]'")
    add_cluster_args(parser)
    add_parallel_args(parser)
    parser.set_defaults(func=main)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """``--devices`` / ``--nodes``: data-parallel trials (harness/distributed.py); shared with ``harness
    pretune``."""
    group = parser.add_argument_group("data-parallel trials (docs/protocol.md §5.7; default: the suite's "
                                      "executor.devices / executor.nodes, else 1)")
    group.add_argument("--devices", type=int, metavar="N",
                       help="processes per trial on each node, one per GPU (gloo CPU processes without GPUs); "
                            "the suite's batch size stays the global batch")
    group.add_argument("--nodes", type=int, metavar="M", help="nodes per trial (--executor slurm only)")


def pinned_run_id(argv: list[str], run_id: str | None) -> list[str]:
    """``argv`` with ``--run-id auto`` replaced by the id it became, so every rank opens the same run."""
    out = list(argv)
    for i, item in enumerate(out):
        if run_id and item == "--run-id" and i + 1 < len(out):
            out[i + 1] = run_id
        elif run_id and item.startswith("--run-id="):
            out[i] = f"--run-id={run_id}"
    return out


def parallel_request(args: argparse.Namespace, suite) -> tuple[int, int]:
    """(processes per node, nodes) of each trial: the flags, else the suite's ``executor:`` section, else 1."""
    section = dict(suite.raw.get("executor") or {})
    devices = args.devices if getattr(args, "devices", None) is not None else section.get("devices") or 1
    nodes = args.nodes if getattr(args, "nodes", None) is not None else section.get("nodes") or 1
    for flag, value in (("--devices", devices), ("--nodes", nodes)):
        if int(value) < 1:
            raise HarnessError(f"{flag}: expected 1 or more, got {value}")
    return int(devices), int(nodes)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Job settings for --executor local/slurm; each overrides the suite's slurm:/executor: section."""
    group = parser.add_argument_group("jobs (--executor local / slurm; override the suite's slurm: section)")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--time", type=int, metavar="MIN", help="time limit per job (one cell), minutes (default 240)")
    group.add_argument("--gpus", type=int, help="GPUs per job (with --devices N: jobs have GPUs, one per task, N per "
                                                 "node)")
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
        state = cell_state(suite, cell, store, stale=False)
        n_search, n_final = planned_trial_count(suite, cell)
        counts = state.counts
        rows.append({"cell": cell.key, "search": n_search, "final": n_final, **counts})
        pending += counts["pending"] + counts["failed"]
    return rows, pending


def describe_inputs(suite, env, task_names: list[str]) -> str:
    """One line: the backbone, its weights, the training input size each task asks for (a segmentation task's
    crop, else the suite's image size) and the input normalisation trials will use."""
    from harness.api import TASKS
    from harness.inputs import suite_data_context

    ctx = suite_data_context(suite, env.cache_dir)
    backbone = suite.backbone
    mode = suite.data.get("normalize", "backbone")
    stats = f"mean {_fmt(ctx.mean)} std {_fmt(ctx.std)}"
    sizes = {name: tuple(TASKS.get(name).input_size(ctx)) for name in task_names}
    if len(set(sizes.values())) <= 1:
        height, width = next(iter(sizes.values()), (ctx.image_size, ctx.image_size))
        inputs = f"{height}px" if height == width else f"{height}x{width}"
    else:
        inputs = ", ".join(f"{name} {h}x{w}" for name, (h, w) in sizes.items())
    return (f"backbone {backbone['name']} (weights: {backbone.get('weights', 'timm')}); inputs {inputs}, "
            f"normalize: {mode} ({stats})")


def describe_cache(suite, env, method_names: list[str], task_names: list[str]) -> str:
    """One line: which of the run's methods and tasks the frozen-computation cache can serve (harness/features.py;
    what it cannot know before a trial, such as drop-path, each record says), and where it lives."""
    from harness.features import method_refusal, setting_refusal, storage_dtype, task_refusal

    off = setting_refusal(suite.train, env.feature_cache)
    if off is not None:
        return f"frozen-computation cache: off ({off})"
    users = [m for m in method_names if method_refusal(METHODS.get(m)) is None]
    able = [t for t in task_names if task_refusal(TASKS.get(t)) is None]
    if not users or not able:
        why = "no method here declares a frozen part" if not users else \
            "no task here has deterministic training transforms"
        return f"frozen-computation cache: not used ({why})"
    tasks = "every task" if len(able) == len(task_names) else f"{len(able)} of {len(task_names)} tasks"
    return (f"frozen-computation cache: {', '.join(users)} on {tasks} ({storage_dtype(suite.train)}, "
            f"{env.cache_dir / 'features'}; --no-cache turns it off)")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def main(args: argparse.Namespace) -> int:
    from harness.errors import did_you_mean
    from harness.executors import EXECUTORS
    from harness.train import TrialEnv

    if args.executor not in EXECUTORS:
        raise HarnessError(f"unknown executor '{args.executor}'{did_you_mean(args.executor, EXECUTORS)}")
    suite = suite_from_args(args)
    method_names, task_names = select_names(suite, args.methods, args.tasks)
    store = store_from_args(args, suite, start=True)
    from harness.trackers import check_trackers

    trackers = check_trackers(suite.raw.get("log") or [], where=f"{suite.line_of('log')}: log")
    trackers += check_trackers([name for name in getattr(args, "log", []) if name not in trackers])
    env = TrialEnv.for_suite(suite, cache_dir(), progress=not args.no_progress, keep_weights=args.keep_weights,
                             results_root=store.root, feature_cache=not getattr(args, "no_cache", False),
                             trackers=trackers)
    cells = plan_cells(method_names, task_names)
    devices, nodes = parallel_request(args, suite)
    if args.dry_run:
        warnings = dry_run_problems(suite, cells, env)
    else:
        preflight(suite, cells, env)
        if args.executor == "slurm":
            from harness.executors.settings import settings_from
            from harness.launch import preflight as parallel_preflight

            if devices * nodes > 1:  # the jobs' GPUs are the allocation's: only what SLURM cannot check
                parallel_preflight(devices, nodes, "cuda" if settings_from(suite, args).gpus else "cpu",
                                   {"train.batch_size": int(suite.train["batch_size"])}, slurm=True)
        elif devices * nodes > 1 or os.environ.get("WORLD_SIZE"):
            if args.executor != "inline":
                raise HarnessError(f"--devices/--nodes: data-parallel trials run with --executor inline (this "
                                   f"machine) or slurm, not {args.executor}")
            from harness.executors.ledger import jobs_dir
            from harness.launch import start_or_launch

            got = start_or_launch(pinned_run_id(args.argv, args.run_id), devices, nodes, env.device,
                                  {"train.batch_size": int(suite.train["batch_size"])})
            if isinstance(got, int):  # this process launched the ranks, which have done the work
                return got
            env.world, env.device, env.checkpoint_dir = got, got.device, jobs_dir(store, suite) / "checkpoints"
            if not got.main:
                env.progress = False
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
    print(describe_inputs(suite, env, task_names))
    print(describe_cache(suite, env, method_names, task_names))
    if args.dry_run:
        from harness.estimate import estimate
        from harness.commands import results_dir

        print(tabulate(rows, headers="keys", tablefmt="simple"))
        if args.gpus_available < 1:
            raise HarnessError(f"--gpus-available: expected 1 or more, got {args.gpus_available}")
        refused = refused_methods(suite, cells)  # warned about below; not built for the estimate
        runnable = [c for c in cells if c.method not in refused]
        for line in estimate(suite, runnable, store, results_dir(args), gpus=args.gpus_available,
                             feature_cache=env.feature_cache).lines():
            print(line)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    if env.world.main:
        start_run_from_args(args, suite)
    executor = EXECUTORS[args.executor]
    ran = pending > 0
    if not ran:
        print(f"all {total} trials are done; nothing to run")
    else:
        code = executor(suite, cells, store, env, args, total_pending=pending)
        if getattr(executor, "returns_before_done", False):
            return code
    if not args.no_table:
        from harness.table import build_table

        print()
        print(build_table(suite, store, methods=method_names, tasks=task_names))
    return exit_code(suite, cells, store, report=not ran)


def exit_code(suite, cells: list[Cell], store, report: bool = True) -> int:
    """0 when every cell has all its final trials, else 1 (docs/protocol.md §6.4). With ``report``, say which
    cells did not finish and why (an executor that ran has said so already)."""
    from harness.executors import unfinished

    lines = [line for cell in cells if (line := unfinished(cell_state(suite, cell, store, stale=False)))]
    if report:
        for line in lines:
            print(line)
    return 1 if lines else 0


def dry_run_problems(suite, cells: list[Cell], env) -> list[str]:
    """What the pre-flight would refuse, as warnings for a plan printed anyway: the data and the backbone, each
    kind of problem once however many tasks share it (:func:`group_problems`). Artifacts are not made."""
    from harness.inputs import check_backbone_spec, suite_data_context

    problems: list[str] = []
    try:
        check_backbone_spec(suite.backbone)
    except HarnessError as err:
        problems.append(f"backbone: {err}")
    else:
        problems += backbone_problems(suite, cells)
    ctx = suite_data_context(suite, env.cache_dir)
    for name in dict.fromkeys(c.task for c in cells):
        problems += TASKS.get(name).check(ctx, deep=False)
    return group_problems(problems)


def refused_methods(suite, cells: list[Cell]) -> dict[str, str]:
    """The selected methods that cannot run on the suite's backbone family (``Method.backbones``), each with its
    one line."""
    from harness.backbone import unsupported_backbone

    names = dict.fromkeys(c.method for c in cells)
    lines = {name: unsupported_backbone(METHODS.get(name), suite.backbone) for name in names}
    return {name: line for name, line in lines.items() if line}


def backbone_problems(suite, cells: list[Cell]) -> list[str]:
    return list(refused_methods(suite, cells).values())


def group_problems(problems: list[str]) -> list[str]:
    """Problems that differ only in a few words (the task's name, its folder) as one line: the words they share,
    ``<…>`` where they differ, and how many there were (VTAB's 19 "no data root" lines become one)."""
    groups: list[list[list[str]]] = []
    for problem in problems:
        words = problem.split(" ")
        for group in groups:
            first = group[0]
            if len(first) == len(words) and sum(a != b for a, b in zip(first, words)) <= max(1, len(words) // 4):
                group.append(words)
                break
        else:
            groups.append([words])
    lines = []
    for group in groups:
        if len(group) == 1:
            lines.append(" ".join(group[0]))
            continue
        template = [w if all(g[i] == w for g in group) else "<…>" for i, w in enumerate(group[0])]
        lines.append(f"{len(group)} alike: " + " ".join(template))
    return lines


def preflight(suite, cells: list[Cell], env, resolve_artifacts: bool = True) -> None:
    """Everything that can be known before the first trial, checked before it, so a run never stops halfway on
    a problem it could have named at the start: the data (the cheap part of ``harness data check``), the backbone
    name and weights file, and every artifact a selected method needs (e.g. TOAST's pre-tuned checkpoint; an
    artifact the suite makes by itself, such as the demo backbone, is made now)."""
    from harness.inputs import check_backbone_spec, suite_data_context

    check_backbone_spec(suite.backbone)
    refused = backbone_problems(suite, cells)
    if refused:
        raise HarnessError("\n".join(refused))
    ctx = suite_data_context(suite, env.cache_dir)
    problems: list[str] = []
    for name in dict.fromkeys(c.task for c in cells):
        problems += TASKS.get(name).check(ctx, deep=False)
    if problems:
        raise HarnessError("the data is not ready:\n  " + "\n  ".join(problems))
    if not resolve_artifacts:
        return
    checked: set[str] = set()
    for cell in cells:
        method = METHODS.get(cell.method)
        weights = str(suite.backbone.get("weights") or "")
        names = list(method.needs) + ([weights.split(":", 1)[1]] if weights.startswith("artifact:") else [])
        if not names or cell.method in checked:
            continue
        checked.add(cell.method)
        specs = search_specs(suite, cell) or final_specs(suite, cell, fixed_hparams(suite, cell))
        resolve = env.resolver(specs[0])
        for name in names:
            resolve(name)
