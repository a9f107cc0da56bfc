"""``harness ls``: the registered methods, tasks and suites (fnmatch wildcards). ``harness ls suites --schema``
prints the suite-file schema instead: every section and key, with its type and meaning.

With ``--backbone``, ``ls methods`` also builds every listed method on that timm backbone with random weights
(nothing is downloaded, pre-tuned checkpoints are not resolved) and prints its parameter counts and forward GFLOPs
per image. '# trainable (M)' excludes the task head, as the tables' '# params (M)' column does.
"""

from __future__ import annotations

import argparse
import fnmatch
from typing import Any

from tabulate import tabulate

from harness.api import METHODS, TASKS
from harness.commands import formatter
from harness.errors import HarnessError, UnknownNameError
from harness.sweep import available_suites, load_suite, parse_set

EXAMPLES = """\
examples:
  harness ls                    # everything
  harness ls methods 'toast*'
  harness ls tasks 'demo-*'
  harness ls suites
  harness ls suites --schema    # every section and key of a suite file, with types and meanings
  harness ls methods --backbone vit_base_patch16_224                  # + parameter counts and GFLOPs
  harness ls methods --backbone vit_base_patch16_224 --num-classes 200 --set prompt_length=100
  harness ls methods 'vpt*' --backbone vit_base_patch16_224 --task vtab-cifar   # the task's defaults
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("ls", help="list methods, tasks and suites", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "methods", "tasks", "suites"))
    parser.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on names (default: *)")
    parser.add_argument("--schema", action="store_true",
                        help="with 'suites': print the suite-file schema (sections, keys, types, meanings)")
    cost = parser.add_argument_group("methods: cost on a reference backbone (random weights, no download)")
    cost.add_argument("--backbone", help="timm model name, e.g. vit_base_patch16_224: adds parameter counts")
    cost.add_argument("--num-classes", type=int, default=100, help="classes of the task head (default: 100)")
    cost.add_argument("--task", help="build with this task's class count and per-task defaults (e.g. prompt length)")
    cost.add_argument("--image-size", type=int, help="input size for FLOPs (default: the backbone's)")
    cost.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                      help="a hyperparameter for every method that has it, e.g. prompt_length=100; repeatable")
    cost.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.set_defaults(func=main)


#: backbone names already checked against timm in this process
_CHECKED: set[str] = set()


def _pick(names: list[str], pattern: str) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


#: the headings of ``ls methods``, in order (a method's ``group``; harness.api.Method)
METHOD_GROUPS = {"headline": "headline", "petl": "PETL baseline", "toast-variant": "TOAST variant",
                 "plug-in": "plug-in", "other": "other"}


def method_group(name: str, facts: dict[str, Any]) -> str:
    """The method's ``group``; a method from an installed package without one is a ``plug-in``."""
    group = str(facts.get("group") or "")
    if not group:
        group = "plug-in" if METHODS.origin(name) else "other"
    return group


def list_methods(pattern: str, args: argparse.Namespace | None = None) -> str:
    backbone = getattr(args, "backbone", None)
    rows = []
    order = list(METHOD_GROUPS)
    named = [(name, METHODS.static(name)) for name in _pick(METHODS.names(), pattern)]
    named.sort(key=lambda nf: (order.index(g) if (g := method_group(*nf)) in order else len(order), g))
    for name, facts in named:
        # the listing reads each method's declared facts from its source (no torch import); only the cost
        # columns build the method
        group = method_group(name, facts)
        origin = METHODS.origin(name)
        label = METHOD_GROUPS.get(group, group)
        if origin:
            label += f" ({origin['distribution']} {origin['version']})"
        row: dict[str, Any] = {"method": name, "group": label, "version": facts.get("version", 1),
                               "family": facts.get("family", ""), "optimizer": facts.get("optimizer", "sgd"),
                               "needs": ", ".join(facts.get("needs", ())) or "-"}
        if backbone:
            row.update(_cost_row(METHODS.get(name), args))
        row["description"] = facts.get("description", "")
        rows.append(row)
    text = tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True)
    if backbone:
        classes = args.num_classes if not args.task else f"{TASKS.get(args.task).num_classes} ({args.task})"
        text += (f"\n\non {backbone} with random weights, {classes} classes; '# trainable' excludes the head; "
                 "the paper's '# Params' is trainable + head")
    return text


def _cost_row(method, args: argparse.Namespace) -> dict[str, Any]:
    """Counts of one method on ``args.backbone`` (from the cost cache when counted before: :mod:`harness.cost_cache`);
    a method that cannot build says why instead of failing."""
    from harness.commands import cache_dir
    from harness.cost_cache import cached_cost, cost_key, method_cost_cached

    num_classes, hparams = args.num_classes, {}
    if args.task:
        task = TASKS.get(args.task)
        num_classes, hparams = task.num_classes, method.defaults_for(task)
    for key, value in parse_set(args.set).items():
        if key in method.defaults or key in hparams:
            hparams[key] = value
    spec = {"name": args.backbone, "weights": None}
    key = cost_key(method, spec, num_classes, hparams, args.image_size, not args.no_flops)
    if cached_cost(cache_dir(), key) is None:
        _check_backbone(args.backbone)  # an unknown name is one clear error (importing timm: on a miss only)
    if getattr(method, "backbones", ()):
        from harness.backbone import backbone_family, unsupported_backbone

        if unsupported_backbone(method, spec):
            row = {"# trainable (M)": f"not for {backbone_family(args.backbone)} backbones (supports "
                                      f"{', '.join(method.backbones)})", "head (M)": "", "total (M)": ""}
            return row if args.no_flops else dict(row, GFLOPs="")
    try:
        cost = method_cost_cached(method, spec, num_classes, cache_dir(), hparams=hparams,
                                  image_size=args.image_size, flops=not args.no_flops)
    except Exception as err:  # noqa: BLE001 - one broken method must not hide the others
        message = " ".join(str(err).split())
        row = {"# trainable (M)": f"cannot build: {type(err).__name__}: {message[:120]}", "head (M)": "",
               "total (M)": ""}
        return row if args.no_flops else dict(row, GFLOPs="")
    row = {"# trainable (M)": f"{cost['trainable'] / 1e6:.3f}", "head (M)": f"{cost['head'] / 1e6:.3f}",
           "total (M)": f"{cost['total'] / 1e6:.2f}"}
    if not args.no_flops:
        row["GFLOPs"] = f"{cost['flops'] / 1e9:.2f}" if cost["flops"] is not None else "–"
    return row


def _check_backbone(name: str) -> None:
    import timm

    if name in _CHECKED:
        return
    _CHECKED.add(name)
    if not timm.is_model(name):
        raise UnknownNameError("timm backbone", name, timm.list_models())


def list_tasks(pattern: str) -> str:
    rows = []
    for name in _pick(TASKS.names(), pattern):
        t = TASKS.get(name)
        rows.append({"task": name, "display": t.label, "version": t.version, "family": t.family, "group": t.group,
                     "classes": t.num_classes, "metric": t.metric, "splits": ", ".join(t.splits)})
    return tabulate(rows, headers="keys", tablefmt="simple")


def list_suites(pattern: str) -> str:
    rows = []
    for name, path in available_suites().items():
        if fnmatch.fnmatchcase(name, pattern):
            suite = load_suite(str(path))
            rows.append({"suite": name, "tasks": len(suite.tasks), "methods": ", ".join(suite.methods),
                         "protocol": suite.protocol["kind"], "file": str(path)})
    return tabulate(rows, headers="keys", tablefmt="simple")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "schema", False):
        if args.what != "suites":
            raise HarnessError("--schema goes with 'harness ls suites'")
        from harness.schema import describe

        print(describe())
        return 0
    if getattr(args, "backbone", None):
        if args.what != "methods":
            raise HarnessError("--backbone goes with 'harness ls methods'")
        if args.task:
            TASKS.get(args.task)  # an unknown task is one clear error, not one per row
    parts = {"methods": lambda p: list_methods(p, args), "tasks": list_tasks, "suites": list_suites}
    chosen = parts if args.what == "all" else {args.what: parts[args.what]}
    for title, show in chosen.items():
        if args.what == "all":
            print(f"== {title}")
        print(show(args.pattern))
        if args.what == "all":
            print()
    return 0
