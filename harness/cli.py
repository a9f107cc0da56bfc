"""The ``harness`` command line. Each subcommand lives in ``harness/commands/<name>.py`` and exposes
``add_parser(subparsers)``; adding one is adding its module to ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import HarnessError

COMMANDS = ("run", "table", "status", "ls", "pretune", "attention", "data", "plot", "report", "reference", "baseline",
            "regress",
            "nightly", "bench")

DESCRIPTION = """\
Benchmark transfer-learning methods (linear probe, fine-tune, VPT, LoRA, TOAST, ...) on vision suites
(demo, FGVC, VTAB-1k) with the papers' protocols. Every finished trial writes one JSON record; tables and
status are computed from the records.

examples:
  harness run --suite demo                          # the embedded demo: no download, CPU, minutes
  harness run --suite demo --methods linear,finetune --epochs 2 --dry-run
  harness table --suite demo --format github
  harness status --suite demo
  harness ls methods 'vpt*'
  harness bench --backbone vit_tiny_patch16_224 --batch 16   # step time, FLOPs, memory per method
  harness regress --suite nightly --baseline results/baselines/nightly.json   # exit 1 when a cell regressed
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"harness.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # what a data-parallel launch runs again
    try:
        return int(args.func(args) or 0)
    except HarnessError as err:
        print(f"harness: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\nharness: interrupted; every finished trial is recorded - rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
