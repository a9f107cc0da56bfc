"""``harness attention``: where the models look. For each method (one row), the last block's CLS-token attention over
the image patches, averaged over heads (paper Fig. 1/3). A model that offers ``attention_maps(images)`` (a two-pass
model's first pass, token-similarity map and second pass; paper Fig. 4) shows all its panels side by side.

Models come from the kept weights of a finished trial (``harness run --keep-weights``) when there are any, else they
are built fresh from the suite (pre-trained backbone, untrained head and adapters); each row says which.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.commands import add_results_arg, cache_dir, formatter, store_from_args
from harness.errors import HarnessError

EXAMPLES = """\
examples:
  harness run --suite demo --methods linear,toast --tasks demo-position --keep-weights
  harness attention --suite demo --task demo-position --methods linear,toast --output fig.png
  harness attention --suite demo --task demo-digits --methods toast --image digit.png --output fig.png
  harness attention --suite demo --task demo-digits --methods toast \\
      --trial-weights results/demo/toast/demo-digits/final-0123456789abcdef.weights.pt
"""


def add_parser(sub) -> None:
    parser = sub.add_parser("attention", help="plot last-layer CLS attention maps of methods' models on an image",
                            description=__doc__, epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--suite", default="demo", help="suite name or file (backbone, data settings)")
    parser.add_argument("--task", required=True, help="the task whose head (and trained weights) to use")
    parser.add_argument("--methods", required=True, help="comma list of methods, one figure row each")
    parser.add_argument("--image", type=Path,
                        help="an image file (PNG/JPEG); default: --index of the task's test split")
    parser.add_argument("--index", type=int, default=0, help="which test image when --image is not given")
    parser.add_argument("--trial-weights", help="comma list of .weights.pt files, one per method in order "
                                                "(default: the newest kept final-trial weights in --results)")
    parser.add_argument("--output", type=Path, default=Path("attention.png"), help="PNG to write")
    parser.add_argument("--data-root", help="where the suite's datasets live")
    add_results_arg(parser)
    parser.set_defaults(func=main)


def draw(rows: list[dict[str, Any]], shown, title: str, output: Path) -> None:
    """One row per method: the input, then each named map over it (colour scaled per panel to its [min, max])."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    columns = 1 + max(len(r["maps"]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.5 * columns + 0.8, 2.6 * len(rows) + 0.9), squeeze=False)
    h, w = shown.shape[:2]
    for i, row in enumerate(rows):
        ax = axes[i][0]
        ax.imshow(shown, interpolation="nearest")
        ax.set_title(f"input · pred {row['pred']} ({row['prob']:.0%})", fontsize=9)
        ax.set_ylabel(row["label"], fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
        for j, (name, amap) in enumerate(row["maps"].items(), start=1):
            amap = torch.as_tensor(amap, dtype=torch.float32)
            lo, hi = float(amap.min()), float(amap.max())
            up = F.interpolate(amap[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
            ax = axes[i][j]
            ax.imshow(shown, interpolation="nearest")
            ax.imshow(np.clip((up - lo) / max(hi - lo, 1e-8), 0, 1), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"{name}\nvalues {lo:.2f} to {hi:.2f}", fontsize=9)
        for j in range(columns):
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            if j > len(row["maps"]):
                axes[i][j].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import torch

    from harness.api import METHODS, TASKS
    from harness.attention import attention_maps, load_image, load_model
    from harness.inputs import suite_data_context
    from harness.sweep import load_suite
    from harness.train import TrialEnv

    suite = load_suite(args.suite, data_root=args.data_root)
    methods = METHODS.match(args.methods)
    task = TASKS.get(args.task)
    weights: list[Path | None] = [None] * len(methods)
    if args.trial_weights:
        given = [Path(p.strip()) for p in args.trial_weights.split(",") if p.strip()]
        if len(given) != len(methods):
            raise HarnessError(f"--trial-weights: {len(given)} files for {len(methods)} methods (one per method)")
        for path in given:
            if not path.is_file():
                raise HarnessError(f"--trial-weights {path}: no such file")
        weights = list(given)
    store = store_from_args(args)
    env = TrialEnv.for_suite(suite, cache_dir(), device="cpu", progress=True, results_root=store.root)
    rows, image, shown, described = [], None, None, ""
    for method, path in zip(methods, weights):
        model, label = load_model(method, task.name, suite, env, store, path)
        if image is None:
            image, shown, described = load_image(task, suite_data_context(suite, env.cache_dir), args.image, args.index)
        with torch.no_grad():
            probs = model(image).softmax(dim=-1)[0]
        maps = {name: m[0].detach().cpu() for name, m in attention_maps(model, image).items()}
        rows.append({"label": label, "maps": maps, "pred": int(probs.argmax()), "prob": float(probs.max())})
        print(f"{method}: {' '.join(label.split())}")
    title = (f"{suite.name} / {task.name}: last-layer CLS attention over patches (head average, colour scaled per "
             f"panel to its [min, max])\n{described}")
    if any("fresh model" in row["label"] for row in rows):
        title += ("\nfresh model = pre-trained backbone (with any prepared stage, e.g. a pre-tuned module), untrained "
                  "head: no kept weights")
    draw(rows, shown, title, args.output)
    print(f"wrote {args.output}")
    return 0
