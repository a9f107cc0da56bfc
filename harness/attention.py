"""Where a ViT looks: the CLS token's attention over the image patches, read from timm blocks.

Library code shared by methods (a method's own ``attention_maps``, e.g. a two-pass model's panels; reached through
``harness.api.cls_attention``) and by the ``harness attention`` command, which only parses arguments and draws:
reading the maps, loading a kept trial's model (or a fresh one) and preparing an input image. Imports of torch and
the engine are inside the functions, so ``harness.api`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from harness.api import DataContext, Task
    from harness.store import Store
    from harness.sweep import Suite
    from harness.train import TrialEnv


def cls_attention(block: "nn.Module", x_in: "torch.Tensor", grid: tuple[int, int]) -> "torch.Tensor":
    """Head-averaged attention of the CLS token (token 0) over the patch tokens (the last ``h*w`` tokens) in a timm
    ViT block, given the block's input. Returns B x h x w.

    Recomputed from Q and K (timm's fused attention never materialises the weights), so it is the softmax row
    timm's explicit path would compute; Q/K norms are applied as the block does."""
    attn = block.attn
    x = block.norm1(x_in)
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    patches = grid[0] * grid[1]
    return weights[:, :, 0, N - patches:].mean(dim=1).reshape(B, *grid)


def find_vit(model: "nn.Module") -> "nn.Module":
    """The timm ViT inside a method's model: its ``backbone`` when that is one, else the first module with
    ``blocks`` and ``patch_embed``."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed"):
        return backbone
    for module in model.modules():
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            return module
    raise HarnessError(f"cannot find a ViT (blocks + patch_embed) inside {type(model).__name__} to read attention from")


def attention_maps(model: "nn.Module", images: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Named B x h x w maps: the model's own ``attention_maps(images)`` when it has one (several panels), else the
    last block's CLS attention, read with a pre-hook on that block during an ordinary forward pass."""
    import torch

    if hasattr(model, "attention_maps"):
        return model.attention_maps(images)
    vit = find_vit(model)
    captured: list[torch.Tensor] = []
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
def record_for_weights(weights: Path) -> dict[str, Any]:
    """The trial record next to kept weights (``<trial>.weights.pt`` beside ``<trial>.json``)."""
    name = weights.name
    if not name.endswith(".weights.pt"):
        raise HarnessError(f"trial weights {weights}: expected a <trial>.weights.pt file from "
                           "harness run --keep-weights")
    record_path = weights.with_name(name[: -len(".weights.pt")] + ".json")
    if not record_path.is_file():
        raise HarnessError(f"trial weights {weights}: no trial record next to it ({record_path})")
    return json.loads(record_path.read_text())


def kept_trial(store: "Store", suite_name: str, method: str, task: str) -> tuple[dict[str, Any], Path] | None:
    """(record, weights file) of the newest finished final trial of (method, task) whose weights were kept."""
    from harness.plan import TrialSpec
    from harness.train import weights_path

    found = []
    for record in store.scan(suite_name):
        spec = record["spec"]
        if (spec["method"], spec["task"], spec["stage"], record["status"]) != (method, task, "final", "ok"):
            continue
        path = Path(record.get("weights_file") or weights_path(store.path_for(TrialSpec.from_dict(spec))))
        if path.is_file():
            found.append((record.get("finished_at") or "", -int(spec["seed"]), record, path))
    if not found:
        return None
    _, _, record, path = max(found, key=lambda f: f[:2])
    return record, path


def load_model(method: str, task: str, suite: "Suite", env: "TrialEnv", store: "Store",
               weights: Path | None) -> tuple["nn.Module", str]:
    """(model in eval mode, row label): the trained model of a kept trial (``weights``, else the newest kept one in
    ``store``), or a fresh one built from the suite's first grid point when no weights were kept."""
    import torch

    from harness.api import METHODS, TASKS
    from harness.plan import Cell, TrialSpec, grid_points, make_spec
    from harness.train import build_model

    record = None
    if weights is not None:
        record = record_for_weights(weights)
        if record["spec"]["method"] != method or record["spec"]["task"] != task:
            raise HarnessError(f"trial weights {weights} are of a {record['spec']['method']}/{record['spec']['task']} "
                               f"trial, not {method}/{task}")
    else:
        kept = kept_trial(store, suite.name, method, task)
        if kept is not None:
            record, weights = kept
    if record is None:
        hparams = grid_points(METHODS.get(method), TASKS.get(task), suite)[0]
        spec = make_spec(suite, Cell(method, task), "final", hparams, suite.seeds[0])
        return build_model(spec, env).eval(), f"{method}\nfresh model\n(no kept weights)"
    spec = TrialSpec.from_dict(record["spec"])
    model = build_model(spec, env)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable & set(result.missing_keys):
        raise HarnessError(f"{weights} does not fit {method}: unexpected {sorted(result.unexpected_keys)[:5]}, "
                           f"missing {sorted(trainable & set(result.missing_keys))[:5]}")
    metric = record.get("metrics", {}).get("eval")
    score = f", {spec.eval_split} {metric:.1f}" if isinstance(metric, (int, float)) else ""
    return model.eval(), f"{method}\ntrained (seed {spec.seed}{score})"


# ---------------------------------------------------------------------------------------------------- image
def load_image(task: "Task", data: "DataContext", image: Path | None = None,
               index: int = 0) -> tuple["torch.Tensor", Any, str]:
    """(input tensor 1x3xHxW, display array HxWx3 in [0, 1], description): ``image`` (a PNG/JPEG file) resized and
    normalised with ``data``'s size, mean and std — the DataContext the suite's trials use, so the models see the
    inputs they were trained on — or, without a file, image ``index`` of the task's test split."""
    import numpy as np
    import torch

    if image is None:
        split = "test" if "test" in task.splits else task.splits[-1]
        dataset = task.dataset(split, data, train=False)
        if not 0 <= index < len(dataset):
            raise HarnessError(f"image index {index}: the {split} split of {task.name} has {len(dataset)} images")
        tensor, label = dataset[index]
        shown = tensor.permute(1, 2, 0).numpy()
        shown = (shown - shown.min()) / max(1e-8, float(shown.max() - shown.min()))
        return tensor[None], shown, f"{task.name} {split} image {index} (label {int(label)})"
    from PIL import Image

    if not image.is_file():
        raise HarnessError(f"image {image}: no such file")
    size = int(data.image_size)
    try:
        pil = Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR)
    except OSError as err:
        raise HarnessError(f"image {image}: cannot read it as an image ({err})") from None
    shown = np.asarray(pil, dtype=np.float32) / 255.0
    mean = torch.tensor(data.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(3, 1, 1)
    tensor = (torch.from_numpy(shown).permute(2, 0, 1) - mean) / std
    return tensor[None].float(), shown, str(image)
