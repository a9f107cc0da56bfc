"""``harness bench``: the cost of one training step of each method on one backbone (random weights, random
images, nothing downloaded), measured in one run: step time (forward, backward and the optimiser step over exactly
what the method trains), images/s, forward GFLOPs per image, peak memory, and each method's step time relative to
finetune's and to the plain backbone forward on the same batch. The median of --repeats steps after --warmup steps.
Prints a table and writes a CSV (one row per method) and the same as a JSON record beside it; `harness table
--columns step` shows the newest record under <results>/bench/ for the suite's backbone.

Methods are built as trials build them; TOAST and its variants start from a random top-down module (no pre-tuned
checkpoint is resolved), which costs the same as a pre-tuned one. Every method is timed on images; a method with a
cacheable frozen part (the linear probe's backbone, TOAST's first pass) is also timed on that part's outputs computed
beforehand ("cached"), the step a trial takes where the feature cache applies (harness/features.py). Methods run one
after another, so time on a quiet machine: load from other processes skews the ratios.
"""

from __future__ import annotations

import argparse

from harness.commands import formatter
from harness.errors import HarnessError

EXAMPLES = """\
examples:
  harness bench                                              # ViT-B/16, the headline methods + PETL baselines
  harness bench --backbone vit_tiny_patch16_224 --batch 16   # a few minutes on a CPU
  harness bench --methods 'linear,toast*' --batch 64 --repeats 20 --out toast.csv
  harness bench --backbone vit_tiny_patch16_224 --image-size 32 --model-arg patch_size=8 --batch 8
  harness bench --set prompt_length=10                       # a hyperparameter for every method that has it
  harness bench --grid --suite demo --task demo-digits       # a linear search end to end, with/without the cache
  harness bench --grid --full-grid                           # ... over the linear probe's whole 40-point grid
  harness bench --grid --full-grid --epochs 100              # ... with VTAB-1k's 100 epochs per trial
  harness bench --trial --suite demo --method toast --task demo-digits   # one trial, its wall time by part
  harness bench --loader --suite vtab --task vtab-dtd --data-root D      # input pipeline images/s per worker count
"""


def add_parser(sub) -> None:
    from harness.bench import DEFAULT_BACKBONE, DEFAULT_GROUPS

    parser = sub.add_parser("bench", help="time one training step of each method on a backbone",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm model name (default: {DEFAULT_BACKBONE})")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="a timm.create_model argument of the backbone (e.g. depth=2); repeatable")
    parser.add_argument("--methods", help="comma list of methods, wildcards allowed (default: every registered "
                                          f"method of the groups {', '.join(DEFAULT_GROUPS)}; see harness ls methods)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--image-size", type=int, help="input size, also the backbone's img_size (default: its own)")
    parser.add_argument("--num-classes", type=int, default=100, help="classes of the task head (default: 100)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported (default: 5)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="a hyperparameter for every method that has it, e.g. prompt_length=10; repeatable")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: $HARNESS_DEVICE, else CUDA if present)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (train.compile); "
                                                               "give --warmup enough steps to compile")
    parser.add_argument("--fused", action="store_true", help="fused AdamW/SGD on CUDA (train.fused_optimizer)")
    parser.add_argument("--threads", type=int,
                        help="torch's CPU threads (default: torch's own; 1 on a machine other work shares, where "
                             "waiting threads slow every op)")
    parser.add_argument("--out", help="CSV path (default: <results>/bench/<backbone>-b<batch>-<device>.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    grid = parser.add_argument_group("--grid: a whole linear-probe search end to end, without and with cached "
                                     "features (--out, --no-progress apply)")
    grid.add_argument("--grid", action="store_true", help="time the search of one cell instead of single steps")
    grid.add_argument("--suite", default="demo", help="the suite whose linear grid and protocol run (default: demo)")
    grid.add_argument("--task", help="the task (default: the suite's first)")
    grid.add_argument("--grid-points", type=int, help="the first N points of the grid (default: all of them)")
    grid.add_argument("--full-grid", action="store_true",
                      help="the method's own full grid (the linear probe's 40 points) instead of the suite's")
    grid.add_argument("--epochs", type=int, help="epochs per trial (default: the suite's; VTAB-1k's schedule is 100)")
    grid.add_argument("--data-root", help="where the suite's datasets live")
    trial = parser.add_argument_group("--trial: one real trial of --suite/--method/--task end to end, its wall time "
                                      "split into parts (kept as cost.phases_s); --loader: the task's input "
                                      "pipelines' images/s per worker count, cold and warm")
    trial.add_argument("--trial", action="store_true", help="time one trial by part")
    trial.add_argument("--method", help="--trial: the method (default: the suite's first)")
    trial.add_argument("--weights", help="--trial: the backbone's weights instead of the suite's (none: random)")
    trial.add_argument("--no-cache", action="store_true",
                       help="--trial: no frozen-computation or decoded cache; --loader: not the decoded cache's "
                            "loaders (timed besides the images' by default, built first where missing)")
    trial.add_argument("--loader", action="store_true", help="time the task's input pipelines")
    trial.add_argument("--workers", help="--loader: comma list of worker counts (default: 0 .. the usable CPUs)")
    trial.add_argument("--limit", type=int, help="--loader: the first N images of each split")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.bench import BenchConfig, bench_table, default_csv_path, run_bench, write_csv, write_record
    from harness.store import default_results_dir
    from harness.sweep import parse_set

    import timm

    if args.threads is not None:
        if args.threads < 1:
            raise HarnessError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.grid:
        return _grid(args)
    if args.trial:
        return _trial(args)
    if args.loader:
        return _loader(args)
    if not timm.is_model(args.backbone):
        from harness.errors import UnknownNameError

        raise UnknownNameError("timm backbone", args.backbone, timm.list_models())
    if args.methods is None:
        from harness.bench import default_methods

        methods = default_methods()
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise HarnessError("--methods: give at least one method")
    for item in args.model_arg:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise HarnessError(f"--model-arg expects key=value (e.g. depth=2), got '{item}'")
    config = BenchConfig(backbone={"name": args.backbone, "model_args": parse_set(args.model_arg)},
                         methods=methods, batch=args.batch, image_size=args.image_size, warmup=args.warmup,
                         repeats=args.repeats, num_classes=args.num_classes, hparams=parse_set(args.set),
                         device=args.device, amp=not args.no_amp, progress=not args.no_progress,
                         compile=args.compile, fused_optimizer=args.fused)
    rows = run_bench(config)
    print(bench_table(rows))
    device = rows[0]["device"] if rows else (args.device or "cpu")
    path = Path(args.out) if args.out else default_csv_path(default_results_dir(), config, str(device))
    write_csv(rows, path)
    print(f"\nwrote {path} and {write_record(rows, path)}")
    return 1 if any(row["status"] != "ok" for row in rows) else 0


def _grid(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.bench import write_csv
    from harness.bench_grid import GRID_COLUMNS, grid_table, run_grid
    from harness.store import default_results_dir

    rows = run_grid(args.suite, task=args.task, grid_points=args.grid_points, data_root=args.data_root,
                    progress=not args.no_progress, full_grid=args.full_grid, epochs=args.epochs)
    print(grid_table(rows))
    name = f"grid-{rows[0]['suite']}-{rows[0]['task']}.csv"
    path = Path(args.out) if args.out else default_results_dir() / "bench" / name
    write_csv(rows, path, GRID_COLUMNS)
    print(f"\nwrote {path}")
    return 1 if any(row["failed"] for row in rows) else 0



def _trial(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from harness.bench_trial import phases_table, run_trial_bench
    from harness.store import default_results_dir
    from harness.sweep import load_suite, parse_set

    method = args.method or load_suite(args.suite, data_root=args.data_root).methods[0]
    record = run_trial_bench(args.suite, method, args.task, data_root=args.data_root, epochs=args.epochs,
                             sets=parse_set(args.set), device=args.device, feature_cache=not args.no_cache,
                             progress=not args.no_progress, weights=args.weights)
    spec = record["spec"]
    print(f"{spec['method']}/{spec['task']} {spec['stage']} on {record['provenance'].get('device', '?')}: "
          f"status {record['status']}, feature_cache {record.get('feature_cache')}, "
          f"decoded_cache {record.get('decoded_cache', '-')}")
    print(phases_table(record))
    path = Path(args.out) if args.out else default_results_dir() / "bench" / f"trial-{spec['task']}-{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {path}")
    return 0 if record["status"] == "ok" else 1


def _loader(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.bench import write_csv
    from harness.bench_trial import LOADER_COLUMNS, loader_table, run_loader_bench
    from harness.store import default_results_dir

    workers = None
    if args.workers:
        try:
            workers = [int(w) for w in args.workers.split(",") if w.strip()]
        except ValueError:
            raise HarnessError(f"--workers expects a comma list of integers, got {args.workers!r}") from None
    rows = run_loader_bench(args.suite, args.task, data_root=args.data_root, workers=workers,
                            batch=args.batch if args.batch != 32 else None, limit=args.limit,
                            decoded=not args.no_cache)
    print(loader_table(rows))
    path = Path(args.out) if args.out else default_results_dir() / "bench" / f"loader-{args.suite}-{args.task}.csv"
    write_csv(rows, path, LOADER_COLUMNS)
    print(f"\nwrote {path}")
    return 0
