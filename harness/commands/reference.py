"""``harness reference``: the published numbers transcribed under results/reference/ (one CSV per source), shown
the way the paper prints them so the transcription can be checked against the PDF."""

from __future__ import annotations

import argparse

from harness.commands import formatter

EXAMPLES = """\
examples:
  harness reference ls                              # every source and table, with backbone and metric
  harness reference show toast-paper --table 1      # TOAST's Table 1 (FGVC), methods x datasets, as printed
  harness reference show vpt-paper --table 1 --our-names   # with our method and task names (checks the name map)
  harness reference show toast-paper --table 11 --format csv   # the tidy rows themselves
  harness table --suite fgvc --reference toast-paper           # our table with the paper's number and Δ per cell

Rows are the paper's methods, columns its datasets and averages as printed, then '# params (M)' / FLOPS where the
paper prints them; notes (e.g. 'paper-inconsistent: ...', where the paper contradicts itself) follow the table.
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("reference", help="show the papers' published numbers (results/reference/)",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("action", nargs="?", default="ls", choices=("ls", "show"),
                        help="ls (default): sources and tables; show: one table")
    parser.add_argument("source", nargs="?", help="with show: a source, e.g. toast-paper or vpt-paper")
    parser.add_argument("--table", help="with show: the table number as printed in the paper (e.g. 1)")
    parser.add_argument("--format", default="markdown", choices=("markdown", "github", "csv"))
    parser.add_argument("--our-names", action="store_true",
                        help="show our method and task names instead of the paper's (unmapped names stay)")
    parser.set_defaults(func=main, parser=parser)


def main(args: argparse.Namespace) -> int:
    from harness import reference
    from harness.errors import HarnessError

    if args.action == "ls":
        print(reference.listing())
        return 0
    if not args.source:
        raise HarnessError(f"reference show needs a source (one of {', '.join(reference.sources())})")
    if not args.table:
        known = reference.tables(reference.load(args.source))
        raise HarnessError(f"reference show {args.source} needs --table (one of {', '.join(known)})")
    print(reference.show(args.source, args.table, fmt=args.format, our_names=args.our_names))
    return 0
