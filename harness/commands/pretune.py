"""``harness pretune``: run the preparation stage a method declares (its ``needs``: artifacts made once per suite and
reused by every trial, e.g. a top-down module pre-tuned on upstream data with the backbone frozen).

For each selected method, each artifact it needs is asked for with ``make=True``: the method's provider runs the
stage now (configured by the suite sections the method reads, on the inputs the suite's trials see: image size and
normalisation) and prints its own summary. Without ``--output`` the result goes where the suite's trials look for it,
so ``harness run`` finds it with no further step; with ``--output``, the provider says how to point the suite at it.
An existing result is kept unless ``--force``.

``--executor slurm`` checks the suite, the job settings and each stage's settings and data
(:meth:`harness.api.Method.check_stage`), then submits this command as one SLURM job (:mod:`harness.executors.stage`)
and returns, printing the job id and where each result will land; the job writes where an inline run would.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.commands import cache_dir, formatter
from harness.errors import HarnessError

EXAMPLES = """\
examples:
  harness pretune --suite demo                          # every stage the suite's methods need (the demo also
                                                        # does this by itself on first use)
  harness pretune --suite vtab --set pretune.image_folder=~/data/imagenet/train
  harness pretune --suite fgvc --method NAME            # one method's stage (NAME: harness ls methods)
  harness pretune --suite demo --method NAME --output stage.pt --set pretune.epochs=1
  harness pretune --suite vtab --set pretune.image_folder=~/data/imagenet/train --devices 8   # 8 GPUs
  harness pretune --suite vtab --set pretune.image_folder=~/data/imagenet/train --executor slurm --gpus 1 \\
    --devices 4 --nodes 2 --time 720         # one SLURM job on 2 nodes x 4 GPUs; prints its id and returns
"""

#: where ``harness pretune`` runs the stage
STAGE_EXECUTORS = {"inline": "this process (and --devices ranks on this machine); waits",
                   "slurm": "one SLURM job (--devices tasks per node on --nodes nodes); submits and returns"}


def add_parser(sub) -> None:
    parser = sub.add_parser("pretune", help="run the preparation stage a method needs (e.g. pre-tuning) for a suite",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--suite", default="demo", help="suite name (sweeps/<suite>.yaml) or a suite file path")
    parser.add_argument("--method",
                        help="comma list of methods, wildcards allowed (default: the suite's methods that need a "
                             "stage); methods sharing a stage share its result")
    parser.add_argument("--output", type=Path, help="where to write the result (one method and artifact only; "
                                                    "default: the path the suite's trials look up)")
    parser.add_argument("--force", action="store_true", help="run the stage again even if its result exists")
    parser.add_argument("--backbone", help="timm model name (as for harness run)")
    parser.add_argument("--weights", help="backbone weights (as for harness run)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a suite key, dotted (e.g. pretune.epochs=1); repeatable")
    parser.add_argument("--data-root", help="where the suite's datasets live")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="pre-tune data-parallel on N processes on this machine (one per GPU; gloo CPU "
                             "processes without GPUs); the stage's batch size stays the global batch (default: the "
                             "suite's executor.devices, else 1)")
    parser.add_argument("--nodes", type=int, metavar="M",
                        help="nodes: with --executor slurm (the job gets --devices tasks on each of M nodes), or "
                             "inside a SLURM job whose tasks each run this command (srun); every task reads its rank "
                             "from SLURM")
    parser.add_argument("--executor", default="inline",
                        help="where the stage runs: " + "; ".join(f"{k}: {v}" for k, v in STAGE_EXECUTORS.items()))
    from harness.commands.run import add_cluster_args

    add_cluster_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from harness.api import METHODS
    from harness.errors import did_you_mean

    if args.executor not in STAGE_EXECUTORS:
        raise HarnessError(f"unknown executor '{args.executor}'{did_you_mean(args.executor, STAGE_EXECUTORS)} "
                           f"(harness pretune runs on: {', '.join(STAGE_EXECUTORS)})")
    from harness.inputs import artifact_resolver, suite_data_context
    from harness.sweep import load_suite, parse_set

    suite = load_suite(args.suite, backbone=args.backbone, weights=args.weights, data_root=args.data_root,
                       sets=parse_set(args.set))
    staged = [name for name in METHODS.match(suite.methods) if METHODS.get(name).needs]
    if args.method:
        names = METHODS.match(args.method)
        for name in names:
            if not METHODS.get(name).needs:
                raise HarnessError(f"method {name} has no stage to prepare (it declares no needed artifacts); "
                                   f"methods of suite '{suite.name}' that do: {', '.join(staged) or 'none'}")
    else:
        names = staged
        if not names:
            raise HarnessError(f"no method of suite '{suite.name}' ({', '.join(suite.methods)}) has a stage to "
                               "prepare; name one with --method")
    jobs = [(name, need) for name in names for need in METHODS.get(name).needs]
    if args.output and len(jobs) > 1:
        raise HarnessError(f"--output names one file, but {len(jobs)} artifacts would be made "
                           f"({', '.join(f'{need} for {name}' for name, need in jobs)}); pick one with --method")
    if args.force and len(names) > 1:
        raise HarnessError(f"--force with several methods ({', '.join(names)}) would redo a stage they share once "
                           "per method; pick one with --method")
    from harness.commands.run import parallel_request
    from harness.launch import start_or_launch
    from harness.loop import pick_device

    devices, nodes = parallel_request(args, suite)
    if args.executor == "slurm":
        return submit(args, suite, names, devices, nodes)
    world = start_or_launch(getattr(args, "argv", []), devices, nodes, pick_device(), {})
    if isinstance(world, int):  # the ranks ran the stage
        return world
    cache = cache_dir()
    data = suite_data_context(suite, cache)
    for name in names:
        method = METHODS.get(name)
        resolve = artifact_resolver(
            suite=suite.name, backbone=suite.backbone, cache_dir=cache, method=name,
            sections={section: suite.raw.get(section) for section in method.suite_sections}, data=data,
            overrides=suite.overrides, data_root=suite.data_root,
            make=True, force=args.force, output=args.output, progress=not args.no_progress and world.main,
            world=world if world.distributed else None)
        for need in method.needs:
            path = resolve(need)
            if world.main:
                print(f"{name}: {need} -> {path}")
    return 0


def submit(args: argparse.Namespace, suite, names: list[str], devices: int, nodes: int) -> int:
    """``--executor slurm``: check what can be checked here (the executor's settings, each stage's settings and
    data, through :meth:`harness.api.Method.check_stage`), then submit this command as one job and say where its
    result will land."""
    from harness.api import METHODS, ArtifactRequest
    from harness.executors.settings import settings_from
    from harness.inputs import suite_data_context
    from harness.launch import preflight as parallel_preflight

    settings = settings_from(suite, args)
    settings.devices, settings.nodes = devices, nodes
    settings.signal_delay()  # a time limit too short for the pre-timeout signal: refused now
    if devices * nodes > 1:
        parallel_preflight(devices, nodes, "cuda" if settings.gpus else "cpu", {}, slurm=True)
    cache = cache_dir()
    data = suite_data_context(suite, cache)
    targets: list[tuple[str, str, Path | None]] = []
    for name in names:
        method = METHODS.get(name)
        for need in method.needs:
            request = ArtifactRequest(
                name=need, suite=suite.name, cache_dir=cache, backbone=suite.backbone, method=name,
                sections={section: suite.raw.get(section) for section in method.suite_sections}, data=data,
                overrides=suite.overrides, data_root=suite.data_root, make=True, force=args.force,
                output=args.output)
            path = method.check_stage(request)
            targets.append((name, need, Path(os.path.abspath(path)) if path is not None else None))
    if not args.force and targets and all(path is not None and path.exists() for _, _, path in targets):
        for name, need, path in targets:
            print(f"already made: {name}: {need} -> {path} (--force to redo); nothing submitted")
        return 0
    from harness.executors.stage import submit_stage

    job_id, logs = submit_stage(suite, list(getattr(args, "argv", [])), settings, cache)
    ranks = devices * nodes
    print(f"submitted the stage of {', '.join(names)} as SLURM job {job_id}"
          + (f" ({devices} task(s) x {nodes} node(s) = {ranks} ranks"
             + (", one GPU each)" if settings.gpus else ")") if ranks > 1 else
             f" ({settings.gpus} GPU(s))" if settings.gpus else "")
          + f", time limit {settings.time_min} min")
    for name, need, path in targets:
        print(f"{name}: {need} -> {path if path is not None else '(where the stage decides)'}")
    print(f"logs: {logs}/")
    print(f"follow with: squeue -j {job_id}; once it has finished, `harness run --suite {args.suite}` with the "
          "same --set/--backbone/--weights finds the result")
    return 0
