"""The embedded demo suite: small tasks in the VTAB-1k shape that need no download, and the small ViT backbone the
harness pre-trains for them on a separate, generated upstream dataset.

Tasks (32x32 RGB images; splits train800 / val200 / train800val200 / test):

* ``demo-digits`` (natural): scikit-learn's handwritten digits, upscaled and coloured.
* ``demo-textures`` (specialized): crops of scikit-learn's two sample photos; the class is which photo and quadrant.
* ``demo-position`` (structured): one rendered shape; the class is its cell on a 3x3 grid (like dSprites location).
* ``demo-count`` (structured): 1 to 4 rendered shapes; the class is how many (like CLEVR count).

The upstream data (16 glyphs at random places, scales and colours over smooth noise; task ``demo-upstream``) is
generated from a fixed seed; the backbone trained on it is cached under the user cache folder and loaded through timm's local-file path.
Everything is deterministic: the same seed gives the same images, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.api import (INCEPTION_MEAN, INCEPTION_STD, TASKS, ArtifactRequest, DataContext, Task,
                         file_lock)
from harness.errors import HarnessError

# torch is imported where images are made or trained on: the commands that read records ask this module only its
# tasks' declarations (names, groups, classes)
if TYPE_CHECKING:  # pragma: no cover
    import torch

SIZE = 32
SPLITS = ("train800", "val200", "train800val200", "test")
DATA_VERSION = 3
SHAPES = ("disc", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond")
UPSTREAM_CLASSES = 16
UPSTREAM_IMAGES = 5000  # + 1000 for the upstream val split


# ---------------------------------------------------------------------------------------------------- rendering
def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    return ys, xs


def shape_mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    """A boolean SIZE x SIZE mask of one shape centred at (cy, cx) with radius r."""
    ys, xs = _grid()
    dy, dx = ys - cy, xs - cx
    if kind == "disc":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    if kind == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    if kind == "hbar":
        return (np.abs(dy) <= r * 0.35) & (np.abs(dx) <= r * 1.1)
    if kind == "vbar":
        return (np.abs(dx) <= r * 0.35) & (np.abs(dy) <= r * 1.1)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(kind)


def smooth_noise(rng: np.random.Generator, scale: float = 0.25) -> np.ndarray:
    """A SIZE x SIZE x 3 smooth random background in [0, 1]."""
    import torch

    coarse = rng.random((4, 4, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(SIZE, SIZE),
                                         mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    base = rng.random(3).astype(np.float32)
    return np.clip(base * (1 - scale) + up * scale + rng.normal(0, 0.03, (SIZE, SIZE, 3)), 0, 1)


def paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Paint a shape in a random colour that stands out from the local background."""
    colour = rng.random(3).astype(np.float32)
    background = image[mask].mean(axis=0) if mask.any() else np.full(3, 0.5)
    if np.abs(colour - background).sum() < 0.6:
        colour = 1.0 - background
    image[mask] = colour


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- generators
def segment_mask(y0: float, x0: float, y1: float, x1: float, width: float) -> np.ndarray:
    """A SIZE x SIZE mask of the points within ``width`` of the segment (y0, x0)-(y1, x1)."""
    ys, xs = _grid()
    py, px, dy, dx = ys - y0, xs - x0, y1 - y0, x1 - x0
    t = np.clip((py * dy + px * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    return (py - t * dy) ** 2 + (px - t * dx) ** 2 <= width**2


def glyph_templates(k: int, seed: int = 1234) -> list[np.ndarray]:
    """``k`` fixed glyphs: polylines of 3 to 5 points on a 5 x 5 lattice (digit-like, but not digits)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 5, (int(rng.integers(3, 6)), 2)).astype(np.float32) for _ in range(k)]


def gen_upstream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream pre-training data: which of 16 glyphs is drawn, at a random place, scale, stroke width and colour.

    Glyphs rather than geometric shapes because a ViT trained from scratch learns them within a minute on two
    CPU cores, and their features (strokes, position, colour) transfer to all four demo tasks."""
    templates = glyph_templates(UPSTREAM_CLASSES)
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE, 3), np.float32)
    labels = rng.integers(0, UPSTREAM_CLASSES, n)
    for i in range(n):
        img = smooth_noise(rng)
        scale = rng.uniform(4.0, 5.5)
        oy, ox = rng.uniform(2, SIZE - 2 - 4 * scale, 2)
        width = rng.uniform(1.0, 1.8)
        points = templates[labels[i]] * scale + np.array([oy, ox]) + rng.normal(0, 0.6, templates[labels[i]].shape)
        mask = np.zeros((SIZE, SIZE), bool)
        for a, b in zip(points[:-1], points[1:]):
            mask |= segment_mask(a[0], a[1], b[0], b[1], width)
        paint(img, mask, rng)
        images[i] = img
    return to_uint8(images), labels.astype(np.int64)


def gen_position(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE, 3), np.float32)
    labels = rng.integers(0, 9, n)
    cell = SIZE / 3
    for i in range(n):
        img = smooth_noise(rng)
        r = rng.uniform(2.5, 4.5)
        row, col = divmod(int(labels[i]), 3)
        cy = row * cell + rng.uniform(r, cell - r)
        cx = col * cell + rng.uniform(r, cell - r)
        paint(img, shape_mask(SHAPES[rng.integers(len(SHAPES))], cy, cx, r), rng)
        images[i] = img
    return to_uint8(images), labels.astype(np.int64)


def gen_count(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE, 3), np.float32)
    labels = rng.integers(0, 4, n)  # class k means k + 1 objects
    for i in range(n):
        img = smooth_noise(rng)
        taken = np.zeros((SIZE, SIZE), bool)
        for _ in range(int(labels[i]) + 1):
            for _attempt in range(50):
                r = rng.uniform(2.5, 4)
                cy, cx = rng.uniform(r, SIZE - r, 2)
                mask = shape_mask(SHAPES[rng.integers(len(SHAPES))], cy, cx, r)
                grown = shape_mask("disc", cy, cx, r + 2)
                if not (grown & taken).any():
                    break
            taken |= mask
            paint(img, mask, rng)
        images[i] = img
    return to_uint8(images), labels.astype(np.int64)


def gen_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (shipped with the package), upscaled to 32x32: dark ink on a light
    background, each in its own random tint (random ink/background polarity made the task mostly about colour:
    a linear probe reached 33% instead of 73%)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:n]
    small = torch.from_numpy(digits.images[order].astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    ink = big[:, 0].numpy()[..., None]
    background = rng.uniform(0.6, 1.0, (len(order), 1, 1, 3)).astype(np.float32)
    foreground = rng.uniform(0.0, 0.35, (len(order), 1, 1, 3)).astype(np.float32)
    images = background * (1 - ink) + foreground * ink + rng.normal(0, 0.03, (len(order), SIZE, SIZE, 3))
    return to_uint8(images), digits.target[order].astype(np.int64)


def gen_textures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 32x32 crops (at 1/4 scale) of scikit-learn's two sample photos; class = photo x quadrant."""
    import torch
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(p.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
              for p in load_sample_images().images]
    photos = [torch.nn.functional.interpolate(p, scale_factor=0.25, mode="area")[0].permute(1, 2, 0).numpy()
              for p in photos]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    images = np.zeros((n, SIZE, SIZE, 3), np.float32)
    for i, label in enumerate(labels):
        photo = photos[label // 4]
        h, w = photo.shape[0] // 2, photo.shape[1] // 2
        qy, qx = divmod(int(label % 4), 2)
        y = qy * h + rng.integers(0, h - SIZE + 1)
        x = qx * w + rng.integers(0, w - SIZE + 1)
        crop = photo[y:y + SIZE, x:x + SIZE]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images[i] = crop * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02, crop.shape)
    return to_uint8(images), labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------- caching
#: arrays already decompressed in this process, by (file, modification time): trials of one process (the inline
#: executor, ``harness bench --grid``) read a task's file once instead of once per trial and split
_LOADED: dict[tuple[str, int], dict[str, np.ndarray]] = {}


def cached_arrays(cache_dir: Path, key: str, make) -> dict[str, np.ndarray]:
    path = cache_dir / "datasets" / "demo" / f"{key}-v{DATA_VERSION}.npz"
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                arrays = make()
                tmp = path.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, **arrays)
                os.replace(tmp, path)
    loaded = (str(path), path.stat().st_mtime_ns)
    if loaded not in _LOADED:
        with np.load(path) as data:
            _LOADED[loaded] = {k: data[k] for k in data.files}
    return _LOADED[loaded]


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W, scaled to [0, 1] then normalised with the context's mean/std
    (the demo backbone's own: 0.5/0.5, so pixels land in [-1, 1])."""
    import torch

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------- tasks
class DemoTask(Task):
    family = "demo"
    splits = SPLITS
    deterministic_train = True  # generated tensors, no augmentation
    reads_data = False  # generated (and cached), never read from a data root

    def __init__(self, name: str, group: str, num_classes: int, generator, total: int, seed: int):
        self.name, self.group, self.num_classes = name, group, num_classes
        self.generator, self.total, self.seed = generator, total, seed

    def arrays(self, cache_dir: Path) -> dict[str, np.ndarray]:
        def make():
            images, labels = self.generator(self.total, self.seed)
            return {"images": images, "labels": labels}

        return cached_arrays(cache_dir, f"{self.name}-{self.seed}-{self.total}", make)

    def indices(self, split: str) -> slice:
        return {"train800": slice(0, 800), "val200": slice(800, 1000), "train800val200": slice(0, 1000),
                "test": slice(1000, self.total)}[split]

    def expected_size(self, split: str) -> int | None:
        part = self.indices(split)
        return len(range(*part.indices(self.total)))

    def dataset(self, split: str, ctx: DataContext, train: bool):
        import torch
        from torch.utils.data import TensorDataset

        arrays = self.arrays(ctx.cache_dir)
        sel = self.indices(split)
        images = normalize(arrays["images"][sel], ctx.mean, ctx.std)
        return TensorDataset(images, torch.from_numpy(arrays["labels"][sel].copy()))

    def decoded_dataset(self, split: str, ctx: DataContext, train: bool):
        """The generated uint8 images as 3 x H x W tensors, before :func:`normalize`."""
        import torch
        from torch.utils.data import TensorDataset

        arrays = self.arrays(ctx.cache_dir)
        sel = self.indices(split)
        images = torch.from_numpy(np.ascontiguousarray(arrays["images"][sel])).permute(0, 3, 1, 2)
        return TensorDataset(images, torch.from_numpy(arrays["labels"][sel].copy()))

    def fingerprint(self, split: str, ctx: DataContext) -> str:
        text = json.dumps([self.name, self.seed, self.total, DATA_VERSION, split])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class UpstreamTask(DemoTask):
    """The generated upstream data (16 glyphs) as a task, so pre-training stages (the demo
    backbone, TOAST's pre-tuning) read it through the same interface as any dataset."""

    splits = ("train", "val")

    def __init__(self) -> None:
        super().__init__("demo-upstream", "upstream", UPSTREAM_CLASSES, gen_upstream, UPSTREAM_IMAGES + 1000,
                         seed=0)

    def indices(self, split: str) -> slice:
        return {"train": slice(0, UPSTREAM_IMAGES), "val": slice(UPSTREAM_IMAGES, self.total)}[split]



TASKS.add("demo-digits", DemoTask("demo-digits", "natural", 10, gen_digits, 1797, seed=1))
TASKS.add("demo-textures", DemoTask("demo-textures", "specialized", 8, gen_textures, 2000, seed=2))
TASKS.add("demo-position", DemoTask("demo-position", "structured", 9, gen_position, 2000, seed=3))
TASKS.add("demo-count", DemoTask("demo-count", "structured", 4, gen_count, 2000, seed=4))
TASKS.add("demo-upstream", UpstreamTask())


# ---------------------------------------------------------------------------------------------------- backbone
#: the demo backbone's pre-training recipe. pos_embed_std: timm initialises position embeddings with std 0.02,
#: which next to the patch embeddings carries almost no position; 0.5 lets a small ViT learn spatial features
#: from scratch in a few epochs instead of a few hundred.
UPSTREAM = {"epochs": 15, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "pos_embed_std": 0.5, "seed": 0}


def demo_backbone(request: ArtifactRequest) -> Path:
    """Pre-train the suite's backbone on the upstream data once; later calls return the cached weight file. The
    upstream images are normalised as the trials' inputs are (the request's data context), so pre-training and
    tuning see the same pixels; an interrupted pre-training resumes from its last finished epoch."""
    data = request.data
    mean, std = (tuple(data.mean), tuple(data.std)) if data is not None else (INCEPTION_MEAN, INCEPTION_STD)
    spec = {"name": request.backbone["name"], "model_args": request.backbone.get("model_args") or {},
            "upstream": UPSTREAM, "version": DATA_VERSION, "mean": list(mean), "std": list(std)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = request.cache_dir / "artifacts" / f"demo-backbone-{key}.pth"
    if path.exists():
        return path
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            _pretrain_backbone(spec, request.cache_dir, path, progress=request.progress)
    return path


def _pretrain_backbone(spec: dict[str, Any], cache_dir: Path, path: Path, progress: bool = True) -> None:
    """Supervised pre-training through the engine's one loop (``harness.api.fit``): AdamW, one warm-up epoch then
    cosine, the recipe in UPSTREAM."""
    import timm
    import torch

    from harness.api import fit, pick_device, seed_everything, warmup_cosine

    seed_everything(UPSTREAM["seed"])
    upstream = TASKS.get("demo-upstream")
    model = timm.create_model(spec["name"], pretrained=False, num_classes=upstream.num_classes, **spec["model_args"])
    with torch.no_grad():
        model.pos_embed.normal_(0.0, UPSTREAM["pos_embed_std"])
    device = pick_device()
    model.to(device)
    ctx = DataContext(data_root=None, cache_dir=cache_dir, image_size=SIZE, mean=tuple(spec["mean"]),
                      std=tuple(spec["std"]))
    generator = torch.Generator().manual_seed(UPSTREAM["seed"])
    loader = torch.utils.data.DataLoader(upstream.dataset("train", ctx, train=True),
                                         batch_size=UPSTREAM["batch_size"], shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=UPSTREAM["lr"], weight_decay=UPSTREAM["weight_decay"])
    epochs = UPSTREAM["epochs"]
    result = fit(model, loader, optimizer, epochs=epochs, lr_factor=lambda e: warmup_cosine(e + 1, 1, epochs + 1),
                 device=device, generator=generator, checkpoint=path.with_name(path.stem + ".ckpt.pt"),
                 progress="pre-training the demo backbone (once)" if progress else None)
    if result.status != "ok":  # a fixed recipe on fixed data: only a broken change gets here
        raise HarnessError(f"pre-training the demo backbone diverged in epoch {len(result.history)}")
    state = {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith("head.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
