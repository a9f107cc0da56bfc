"""``harness pretune``: TOAST's pre-tuning stage. The backbone is frozen; the top-down module (task embedding, channel
transform, feedback path) trains on the upstream data named in the suite's ``pretune:`` section, with cross-entropy
plus the variational loss. Writes a checkpoint (official TOAST key names) with a JSON provenance sidecar.

Without ``--output`` the checkpoint goes to the cache path that the suite's TOAST trials look up, so ``harness run``
finds it with no further step. With ``--output``, point the suite's ``pretune.checkpoint`` at the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands import cache_dir, formatter
from harness.errors import HarnessError

EXAMPLES = """\
examples:
  harness pretune --suite demo                                 # what the demo does by itself on first use
  harness pretune --suite vtab --set pretune.image_folder=~/data/imagenet/train
  harness pretune --suite fgvc --method toast-late             # the late-feedback variant's own module
  harness pretune --suite demo --output toast-demo.pt --set pretune.epochs=1
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("pretune", help="pre-tune TOAST's top-down module (frozen backbone) for a suite",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--suite", default="demo", help="suite name (sweeps/<suite>.yaml) or a suite file path")
    parser.add_argument("--method", default="toast",
                        help="which TOAST architecture (toast-early/toast-late have their own feedback span)")
    parser.add_argument("--output", type=Path, help="checkpoint path (default: the cache path trials look up)")
    parser.add_argument("--force", action="store_true", help="pre-tune again even if the checkpoint exists")
    parser.add_argument("--backbone", help="timm model name (as for harness run)")
    parser.add_argument("--weights", help="backbone weights (as for harness run)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a suite key, dotted (e.g. pretune.epochs=1); repeatable")
    parser.add_argument("--data-root", help="where the suite's datasets live")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from harness.api import ARTIFACTS, ArtifactRequest
    from harness.sweep import load_suite, parse_set
    from methods.toast import pretune_architecture
    from methods.toast_pretune import cache_key, default_path, run_pretune, section_of, toast_method

    suite = load_suite(args.suite, backbone=args.backbone, weights=args.weights, data_root=args.data_root,
                       sets=parse_set(args.set))
    if suite.raw.get("pretune") is None:
        raise HarnessError(f"{suite.path}: no 'pretune' section; add one, e.g. pretune: {{task: demo-upstream, "
                           "split: train}} or pretune: {image_folder: ~/data/imagenet/train}")
    cfg = section_of(suite.raw["pretune"])
    method = toast_method(args.method)
    if not method.pretuned:
        raise HarnessError(f"method {args.method} starts from a random top-down module; nothing to pre-tune")
    data = {k: v for k, v in suite.data.items() if k != "root"}
    image_size = int(data.get("image_size", 224))
    cache = cache_dir()
    key = cache_key(suite.backbone, cfg, pretune_architecture(method), image_size)
    output = args.output or default_path(cache, key)
    if output.exists() and not args.force:
        print(f"already pre-tuned: {output} (--force to redo)")
        return 0

    def resolve(name: str) -> Path:
        return Path(ARTIFACTS.get(name)(ArtifactRequest(name=name, suite=suite.name, cache_dir=cache,
                                                        backbone=suite.backbone, data_root=suite.data_root)))

    meta = run_pretune(suite.backbone, cfg, args.method, output, cache_dir=cache, data_root=suite.data_root,
                       data=data, resolve=resolve, progress=not args.no_progress)
    last = meta["epochs"][-1] if meta["epochs"] else {}
    print(f"pre-tuned {args.method}'s top-down module in {meta['seconds']:.1f} s on {meta['data']['images']} images: "
          f"last epoch ce {last.get('ce', float('nan')):.3f}, var {last.get('var', float('nan')):.4f}, "
          f"train acc {100 * last.get('acc', float('nan')):.1f}%"
          + (f" (bottom-up first pass, same head: {100 * last['acc_first']:.1f}%)" if "acc_first" in last else ""))
    print(f"wrote {output} (+ {output.with_suffix('.json').name})")
    if args.output:
        print(f"use it with: pretune.checkpoint: {output}  (in {suite.path}, or --set pretune.checkpoint={output})")
    else:
        print(f"harness run --suite {args.suite} finds it automatically")
    return 0
