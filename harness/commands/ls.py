"""``harness ls``: the registered methods, tasks and suites (fnmatch wildcards)."""

from __future__ import annotations

import argparse
import fnmatch

from tabulate import tabulate

from harness.api import METHODS, TASKS
from harness.commands import formatter
from harness.sweep import available_suites, load_suite

EXAMPLES = """\
examples:
  harness ls                    # everything
  harness ls methods 'toast*'
  harness ls tasks 'demo-*'
  harness ls suites
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("ls", help="list methods, tasks and suites", description=__doc__, epilog=EXAMPLES,
                            formatter_class=formatter)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "methods", "tasks", "suites"))
    parser.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on names (default: *)")
    parser.set_defaults(func=main)


def _pick(names: list[str], pattern: str) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def list_methods(pattern: str) -> str:
    rows = []
    for name in _pick(METHODS.names(), pattern):
        m = METHODS.get(name)
        rows.append({"method": name, "family": m.family, "optimizer": m.optimizer,
                     "needs": ", ".join(m.needs) or "-", "description": m.description})
    return tabulate(rows, headers="keys", tablefmt="simple")


def list_tasks(pattern: str) -> str:
    rows = []
    for name in _pick(TASKS.names(), pattern):
        t = TASKS.get(name)
        rows.append({"task": name, "family": t.family, "group": t.group, "classes": t.num_classes,
                     "metric": t.metric, "splits": ", ".join(t.splits)})
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
    parts = {"methods": list_methods, "tasks": list_tasks, "suites": list_suites}
    chosen = parts if args.what == "all" else {args.what: parts[args.what]}
    for title, show in chosen.items():
        if args.what == "all":
            print(f"== {title}")
        print(show(args.pattern))
        if args.what == "all":
            print()
    return 0
