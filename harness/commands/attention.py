"""``harness attention``: where the models look. For each method (one row), the last block's CLS-token attention over
the image patches, averaged over heads (paper Fig. 1/3). A model that offers ``attention_maps(images)`` (TOAST: first
pass, token-similarity map, second pass; paper Fig. 4) shows all its panels side by side.

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


# ---------------------------------------------------------------------------------------------------- maps
def cls_attention(block, x_in, grid: tuple[int, int]):
    """Head-averaged attention of the CLS token (token 0) over the patch tokens (the last ``h*w`` tokens) in a timm
    ViT block, given the block's input. Returns B x h x w."""
    attn = block.attn
    x = block.norm1(x_in)
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    patches = grid[0] * grid[1]
    return weights[:, :, 0, N - patches:].mean(dim=1).reshape(B, *grid)


def _find_vit(model):
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed"):
        return backbone
    for module in model.modules():
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            return module
    raise HarnessError(f"cannot find a ViT (blocks + patch_embed) inside {type(model).__name__} to read attention from")


def attention_maps(model, images) -> dict[str, Any]:
    """The model's own ``attention_maps`` if it has one, else the last block's CLS attention read with a hook."""
    import torch

    if hasattr(model, "attention_maps"):
        return model.attention_maps(images)
    vit = _find_vit(model)
    captured: list = []
    handle = vit.blocks[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    if not captured:
        raise HarnessError(f"{type(model).__name__} never ran its last ViT block; no attention to show")
    with torch.no_grad():
        return {"last layer": cls_attention(vit.blocks[-1], captured[-1], tuple(vit.patch_embed.grid_size))}


# ---------------------------------------------------------------------------------------------------- models
def _record_for_weights(weights: Path) -> dict[str, Any]:
    import json

    name = weights.name
    if not name.endswith(".weights.pt"):
        raise HarnessError(f"--trial-weights {weights}: expected a <trial>.weights.pt file from "
                           "harness run --keep-weights")
    record_path = weights.with_name(name[: -len(".weights.pt")] + ".json")
    if not record_path.is_file():
        raise HarnessError(f"--trial-weights {weights}: no trial record next to it ({record_path})")
    return json.loads(record_path.read_text())


def _kept_trial(store, suite_name: str, method: str, task: str) -> tuple[dict[str, Any], Path] | None:
    """The newest finished final trial of (method, task) whose weights were kept."""
    from harness.train import weights_path

    found = []
    for record in store.scan(suite_name):
        spec = record["spec"]
        if (spec["method"], spec["task"], spec["stage"], record["status"]) != (method, task, "final", "ok"):
            continue
        path = Path(record.get("weights_file") or weights_path(store.path_for(spec)))
        if path.is_file():
            found.append((record.get("finished_at") or "", -int(spec["seed"]), record, path))
    if not found:
        return None
    _, _, record, path = max(found, key=lambda f: f[:2])
    return record, path


def load_model(method: str, task: str, suite, env, store, weights: Path | None):
    """(model, row label): a kept trial's trained model, or a fresh one built from the suite."""
    import torch

    from harness.api import METHODS, TASKS
    from harness.plan import Cell, grid_points, make_spec
    from harness.train import build_model

    record = None
    if weights is not None:
        record = _record_for_weights(weights)
        if record["spec"]["method"] != method or record["spec"]["task"] != task:
            raise HarnessError(f"--trial-weights {weights} is a {record['spec']['method']}/{record['spec']['task']} "
                               f"trial, not {method}/{task}")
    else:
        kept = _kept_trial(store, suite.name, method, task)
        if kept is not None:
            record, weights = kept
    if record is None:
        hparams = grid_points(METHODS.get(method), TASKS.get(task), suite)[0]
        spec = make_spec(suite, Cell(method, task), "final", hparams, suite.seeds[0])
        model = build_model(spec, env)
        return model.eval(), f"{method}\nfresh model\n(no kept weights)"
    spec = record["spec"]
    model = build_model(spec, env)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable & set(result.missing_keys):
        raise HarnessError(f"{weights} does not fit {method}: unexpected {sorted(result.unexpected_keys)[:5]}, "
                           f"missing {sorted(trainable & set(result.missing_keys))[:5]}")
    metric = record.get("metrics", {}).get("eval")
    score = f", {spec['eval_split']} {metric:.1f}" if isinstance(metric, (int, float)) else ""
    return model.eval(), f"{method}\ntrained (seed {spec['seed']}{score})"


# ---------------------------------------------------------------------------------------------------- image
def load_image(args, task, suite, model, env):
    """(input tensor 1x3xHxW, display array HxWx3 in [0, 1], description)."""
    import numpy as np
    import torch

    size = int(suite.data.get("image_size", 224))
    if args.image is None:
        split = "test" if "test" in task.splits else task.splits[-1]
        dataset = task.dataset(split, env.data_context({"data": {k: v for k, v in suite.data.items() if k != "root"}}),
                               train=False)
        if not 0 <= args.index < len(dataset):
            raise HarnessError(f"--index {args.index}: the {split} split of {task.name} has {len(dataset)} images")
        image, label = dataset[args.index]
        shown = image.permute(1, 2, 0).numpy()
        shown = (shown - shown.min()) / max(1e-8, float(shown.max() - shown.min()))
        return image[None], shown, f"{task.name} {split} image {args.index} (label {int(label)})"
    from PIL import Image

    if not args.image.is_file():
        raise HarnessError(f"--image {args.image}: no such file")
    try:
        pil = Image.open(args.image).convert("RGB").resize((size, size), Image.BILINEAR)
    except OSError as err:
        raise HarnessError(f"--image {args.image}: cannot read it as an image ({err})") from None
    shown = np.asarray(pil, dtype=np.float32) / 255.0
    preprocess = getattr(task, "preprocess_image", None)
    if preprocess is not None:  # a task that knows its own normalisation
        tensor = preprocess(pil)
    else:  # the backbone's normalisation (timm pretrained config); the demo's [-1, 1] is mean = std = 0.5
        cfg = getattr(_find_vit(model), "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
        tensor = (torch.from_numpy(shown).permute(2, 0, 1) - mean) / std
    return tensor[None].float(), shown, str(args.image)


# ---------------------------------------------------------------------------------------------------- figure
def draw(rows: list[dict[str, Any]], shown, title: str, output: Path) -> None:
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
    env = TrialEnv(cache_dir=cache_dir(), data_root=suite.data_root, device="cpu", progress=True,
                   results_root=store.root)
    rows, image, shown, described = [], None, None, ""
    for method, path in zip(methods, weights):
        model, label = load_model(method, task.name, suite, env, store, path)
        if image is None:
            image, shown, described = load_image(args, task, suite, model, env)
        with torch.no_grad():
            probs = model(image).softmax(dim=-1)[0]
        maps = {name: m[0].detach().cpu() for name, m in attention_maps(model, image).items()}
        rows.append({"label": label, "maps": maps, "pred": int(probs.argmax()), "prob": float(probs.max())})
        print(f"{method}: {' '.join(label.split())}")
    title = (f"{suite.name} / {task.name}: last-layer CLS attention over patches (head average, colour scaled per "
             f"panel to its [min, max])\n{described}")
    if any("fresh model" in row["label"] for row in rows):
        title += "\nfresh model = pre-trained backbone (and pre-tuned top-down module), untrained head: no kept weights"
    draw(rows, shown, title, args.output)
    print(f"wrote {args.output}")
    return 0
