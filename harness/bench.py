"""``harness bench``: what one training step of each method costs on one backbone, all measured in one run.

For a timm backbone with random weights (nothing is downloaded) and a batch size, each method's model is built the
way a trial builds it (:func:`harness.train.assemble_model`; with ``random_init``, as cost accounting builds it, so
TOAST's pre-tuned module is not resolved and starts random) and trained on random images through the training
loop's own step (:func:`harness.loop.train_step`: forward, backward and the optimiser step over exactly the
parameters the method leaves trainable, with its own optimiser; bf16 autocast on CUDA). Per method:

* ``step_ms``: median wall time of one training step over ``repeats`` steps after ``warmup`` steps;
* ``images_per_s``: batch / step time;
* ``forward_flops``: forward FLOPs per image, counted as trial records count them
  (:func:`harness.cost.forward_flops`);
* ``peak_memory_bytes``: :class:`harness.cost.PeakMemory`, as a trial measures it: CUDA max allocated over
  building and training the method on a GPU; on the CPU the peak of the method's own tensors over two untimed
  training steps before the timed ones;
* ``vs_finetune``: step time / finetune's step time (when finetune is benched), and ``vs_forward``: step time /
  the plain backbone's forward on the same batch (inference mode), measured in the same run;
* ``method_forward_ms`` and ``forward_vs_backbone``: the method's own forward (eval mode, inference mode) and its
  ratio to the plain backbone forward (TOAST's two passes and feedback path against one pass);
* ``train_tflops_per_s``: achieved training compute, 3 x forward FLOPs x images/s
  (:func:`harness.cost.training_tflops`), and ``peak_fraction``: that over the device's dense bf16 peak where the
  device is known (:data:`harness.cost.DENSE_BF16_PEAK_TFLOPS`: H100/H200 989, A100 312; else none) and bf16
  autocast is on;
* ``cached_step_ms`` and ``cached_vs_finetune``: for a method that declares a cacheable frozen part
  (:attr:`harness.api.Method.frozen_features`), the same step on the batch's frozen outputs computed beforehand, as
  a trial with the frozen-computation cache (:mod:`harness.features`) steps: the linear probe's head alone,
  TOAST's feedback path and second pass without its first pass.

Each run is also kept as a record beside its CSV (:func:`write_record`), which ``harness table --columns step``
finds through :mod:`harness.bench_records`. ``harness bench --grid`` times a whole search instead
(:mod:`harness.bench_grid`).
"""

from __future__ import annotations

import csv
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

#: the method groups (``harness.api.Method.group``) ``harness bench`` times by default: the paper's headline methods
#: and the PETL baselines; TOAST's variants and plug-ins are timed when named (``--methods``)
DEFAULT_GROUPS = ("headline", "petl")


def methods_in(*groups: str) -> list[str]:
    """The registered methods of ``groups``, in the registry's index order (read from source: no import)."""
    from harness.api import METHODS

    return [name for group in groups for name in METHODS.index
            if (METHODS.static(name).get("group") or "") == group]


def default_methods() -> list[str]:
    """What ``harness bench`` times when no ``--methods`` is given: the registry's :data:`DEFAULT_GROUPS`."""
    return methods_in(*DEFAULT_GROUPS)

DEFAULT_BACKBONE = "vit_base_patch16_224"
#: the optimiser settings every method is stepped with (timing does not depend on their values)
BENCH_HPARAMS = {"lr": 1e-3, "weight_decay": 1e-4}
#: the CSV's columns, in order
COLUMNS = ("method", "status", "step_ms", "step_ms_min", "step_ms_max", "images_per_s", "forward_flops",
           "peak_memory_bytes", "peak_memory_kind", "trainable", "head", "total", "optimized_params", "vs_finetune",
           "vs_forward", "method_forward_ms", "forward_vs_backbone", "cached_step_ms", "cached_vs_finetune", "forward_ms",
           "backbone_forward_flops", "train_tflops_per_s", "peak_fraction", "device_name", "backbone", "batch", "image_size",
           "device", "amp", "warmup", "repeats", "error")


@dataclass
class BenchConfig:
    """One bench run. ``backbone`` is a backbone spec (``name``, ``model_args``; weights are always random)."""

    backbone: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_BACKBONE})
    methods: Sequence[str] = field(default_factory=default_methods)
    batch: int = 32
    #: input size; None: the backbone's own. Given, it is also the backbone's ``img_size`` unless model_args say
    image_size: int | None = None
    warmup: int = 2
    repeats: int = 5
    num_classes: int = 100
    #: hyperparameters for every method that accepts the key (e.g. ``prompt_length``)
    hparams: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    amp: bool = True
    seed: int = 0
    progress: bool = True
    #: the suite settings ``train.compile`` (torch.compile of the model) and ``train.fused_optimizer``
    compile: bool = False
    fused_optimizer: bool = False

    def check(self) -> None:
        for name in ("batch", "repeats", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise HarnessError(f"bench: {name} must be at least 1, got {getattr(self, name)}")
        if int(self.warmup) < 0:
            raise HarnessError(f"bench: warmup must be 0 or more, got {self.warmup}")
        if self.image_size is not None and int(self.image_size) < 1:
            raise HarnessError(f"bench: image size must be positive, got {self.image_size}")


def backbone_spec(config: BenchConfig) -> dict[str, Any]:
    """The backbone spec benched: random weights; ``image_size`` as the model's ``img_size`` unless given."""
    spec = dict(config.backbone)
    spec["weights"] = None
    model_args = dict(spec.get("model_args") or {})
    if config.image_size is not None:
        model_args.setdefault("img_size", int(config.image_size))
    spec["model_args"] = model_args
    return spec


def run_bench(config: BenchConfig) -> list[dict[str, Any]]:
    """Bench every method of ``config``; one row (see :data:`COLUMNS`) per method, in the order given. A method
    that cannot build or step on this backbone gets ``status`` ``failed`` and its error, and the others go on."""
    import torch

    from harness.api import METHODS
    from harness.backbone import build_backbone
    from harness.cost import forward_flops, reference_image_size
    from harness.features import method_refusal
    from harness.loop import autocast_for, pick_device, seed_everything

    config.check()
    names = METHODS.match(list(config.methods))
    device = config.device or pick_device()
    spec = backbone_spec(config)
    steps = config.warmup + config.repeats
    cached = sum(1 for name in names if method_refusal(METHODS.get(name)) is None)
    bar = progress_bar(config.progress, total=steps * (2 * len(names) + cached + 1))
    try:
        seed_everything(config.seed)
        try:
            backbone = build_backbone(spec).to(device).eval()
        except TypeError as err:  # timm passes unknown model arguments on to the constructor
            raise HarnessError(f"backbone {spec['name']}: bad model argument ({err})") from None
        size = int(config.image_size or reference_image_size(backbone))
        generator = torch.Generator().manual_seed(config.seed)
        images = torch.randn(config.batch, 3, size, size, generator=generator).to(device)
        labels = torch.randint(0, config.num_classes, (config.batch,), generator=generator).to(device)

        def forward() -> None:
            with torch.inference_mode(), autocast_for(device, config.amp):
                backbone(images)

        bar.set_description("backbone forward")
        forward_ms = _median_ms(forward, device, config, bar)
        backbone_flops = forward_flops(backbone, size, device)
        del backbone
        rows = []
        for name in names:
            bar.set_description(name)
            row: dict[str, Any] = {"method": name}
            try:
                row.update(_bench_method(METHODS.get(name), config, spec, device, size, images, labels, bar))
                row["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - one method that cannot run must not hide the others
                row.update(status="failed", error=f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            _release(device)
            rows.append(row)
    finally:
        bar.close()
    reference = next((r["step_ms"] for r in rows if r["method"] == "finetune" and r["status"] == "ok"), None)
    from harness.cost import dense_bf16_peak_tflops, training_tflops
    from harness.provenance import device_name

    name = device_name(str(device))
    peak = dense_bf16_peak_tflops(name) if str(device).startswith("cuda") and config.amp else None
    for row in rows:
        tflops = training_tflops(row.get("forward_flops"), row.get("images_per_s"))
        row.update(train_tflops_per_s=tflops, device_name=name,
                   peak_fraction=tflops / peak if tflops is not None and peak else None)
        ok = row["status"] == "ok"
        row.update(forward_ms=forward_ms, backbone_forward_flops=backbone_flops, backbone=spec["name"],
                   batch=config.batch, image_size=size, device=device, amp=bool(config.amp), warmup=config.warmup,
                   repeats=config.repeats)
        row["vs_finetune"] = row["step_ms"] / reference if ok and reference else None
        row["vs_forward"] = row["step_ms"] / forward_ms if ok and forward_ms else None
        row["forward_vs_backbone"] = row["method_forward_ms"] / forward_ms if ok and forward_ms else None
        cached = row.get("cached_step_ms")
        row["cached_vs_finetune"] = cached / reference if ok and cached is not None and reference else None
    return [{column: row.get(column) for column in COLUMNS} for row in rows]


def bench_hparams(method: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a method is benched with: its defaults, the optimiser settings, and the ``extra``
    keys it accepts."""
    accepted = method.accepted_hparams()
    return {**method.defaults, **BENCH_HPARAMS, **{k: v for k, v in extra.items() if k in accepted}}


def _bench_method(method: Any, config: BenchConfig, spec: dict[str, Any], device: str, size: int, images, labels,
                  bar) -> dict[str, Any]:
    import torch

    from harness.cost import PeakMemory, forward_flops, parameter_counts
    from harness.features import OnFrozen, as_tuple, method_refusal
    from harness.loop import autocast_for, cross_entropy, seed_everything, train_mode, train_step
    from harness.store import default_cache_dir
    from harness.train import assemble_model, make_optimizer

    hparams = bench_hparams(method, config.hparams)
    objective = cross_entropy()
    finite = True
    with PeakMemory(device) as memory:
        seed_everything(config.seed)
        model = assemble_model(method, spec, hparams, cache_dir=default_cache_dir(), device=device,
                               num_classes=config.num_classes, random_init=True).to(device)
        optimizer = make_optimizer(method, model, float(hparams["lr"]), hparams,
                                   {"fused_optimizer": config.fused_optimizer})
        train_mode(model)
        if config.compile:
            model.compile()

        def step() -> None:
            nonlocal finite
            finite = train_step(model, optimizer, objective, images, labels, device, config.amp)[2] and finite

        for _ in range(PeakMemory.TRACKED_STEPS):  # memory first, in untimed steps (tracking costs time on the CPU)
            with memory.step(model, optimizer):
                step()
        times = _times_ms(step, device, config, bar)
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast_for(device, config.amp):
            model(images)

    method_forward_ms = _median_ms(infer, device, config, bar)
    cached_step_ms = None
    if method_refusal(method) is None:  # the step a trial takes on cached frozen outputs
        with torch.no_grad(), autocast_for(device, config.amp):  # no_grad, not inference mode: autograd uses them
            frozen = tuple(t.detach() for t in as_tuple(model.eval().frozen_forward(images)))
        on_frozen = OnFrozen(model).train()

        def cached_step() -> None:
            nonlocal finite
            finite = train_step(on_frozen, optimizer, objective, frozen, labels, device, config.amp)[2] and finite

        cached_step_ms = statistics.median(_times_ms(cached_step, device, config, bar))
        del frozen, on_frozen
    counts = parameter_counts(model)
    optimized = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    flops = forward_flops(model, size, device)
    del model, optimizer
    out: dict[str, Any] = {
        "step_ms": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times),
        "forward_flops": flops, **memory.result(), **counts, "optimized_params": optimized,
        "method_forward_ms": method_forward_ms, "cached_step_ms": cached_step_ms,
    }
    out["images_per_s"] = config.batch / (out["step_ms"] / 1000.0)
    if not finite:
        out["error"] = "a non-finite loss skipped some steps"
    return out


def _times_ms(fn: Callable[[], None], device: str, config: BenchConfig, bar) -> list[float]:
    """Wall times (ms) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    times = []
    for i in range(config.warmup + config.repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= config.warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
        bar.update(1)
    return times


def _median_ms(fn: Callable[[], None], device: str, config: BenchConfig, bar) -> float:
    return statistics.median(_times_ms(fn, device, config, bar))


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _release(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def progress_bar(enabled: bool, total: int, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------- output
def bench_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a printed table, with a footnote: what was benched and the plain forward's time."""
    from tabulate import tabulate

    def num(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append({"method": row["method"], "trainable (M)": f"failed: {row['error']}"[:100]})
            continue
        lines.append({
            "method": row["method"],
            "trainable (M)": f"{row['trainable'] / 1e6:.3f}",
            "head (M)": f"{row['head'] / 1e6:.3f}",
            "step (ms)": f"{row['step_ms']:.1f}",
            "img/s": f"{row['images_per_s']:.1f}",
            "GFLOPs/img": "–" if row["forward_flops"] is None else f"{row['forward_flops'] / 1e9:.3f}",
            "peak mem (MB)": f"{row['peak_memory_bytes'] / 2**20:.0f}",
            "x finetune": num(row["vs_finetune"], ".2f"),
            "x forward": num(row["vs_forward"], ".2f"),
            "fwd x backbone": num(row["forward_vs_backbone"], ".2f"),
            "cached step (ms)": num(row["cached_step_ms"], ".1f"),
            "cached x finetune": num(row["cached_vs_finetune"], ".2f"),
            "train TFLOP/s": num(row["train_tflops_per_s"], ".3g"),
            "x bf16 peak": num(row["peak_fraction"], ".1%"),
        })
    text = tabulate(lines, headers="keys", tablefmt="simple", disable_numparse=True)
    if rows:
        first = rows[0]
        flops = first["backbone_forward_flops"]
        kind = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), "")
        text += (f"\n\n{first['backbone']} (random weights), batch {first['batch']}, {first['image_size']}px, "
                 f"{first['device']}{' bf16' if first['amp'] and str(first['device']).startswith('cuda') else ''}"
                 f"{'' if str(first['device']).startswith('cuda') else _threads()}; "
                 f"median of {first['repeats']} train steps after {first['warmup']} warm-up. "
                 f"'x forward': step time / the plain backbone forward on the same batch "
                 f"({first['forward_ms']:.1f} ms, {'–' if flops is None else f'{flops / 1e9:.3f}'} GFLOPs/img); "
                 "'x finetune': step time / finetune's. 'fwd x backbone': the method's own forward (eval, "
                 "inference mode) / the plain backbone forward. 'cached': the step on the frozen part's outputs "
                 "computed beforehand, as a trial with the feature cache takes it (methods that declare one). "
                 "'trainable' excludes the head. 'train TFLOP/s': 3 x forward FLOPs x img/s; 'x bf16 peak': that "
                 "over the device's dense bf16 peak (known GPUs only)."
                 + (" Peak memory on the CPU: the method's own tensors at their peak within a training step "
                    "(parameters, gradients, optimiser state, activations)." if kind == "cpu_tensor_peak" else ""))
    return text


def _threads() -> str:
    import torch

    n = torch.get_num_threads()
    return f" ({n} thread{'' if n == 1 else 's'})"


def write_csv(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] = COLUMNS) -> Path:
    """One row per method (``columns``: :data:`COLUMNS`, or :data:`harness.bench_grid.GRID_COLUMNS`); written to a temporary file and
    renamed (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def write_record(rows: list[dict[str, Any]], csv_path: Path) -> Path:
    """The run as a record beside its CSV (``.json``): its rows, when and where. ``harness table --columns step``
    reads the newest record under ``<results>/bench/`` whose backbone has the suite's architecture."""
    import platform
    from datetime import datetime, timezone

    from harness.bench_records import RECORD_KIND
    from harness.files import atomic_write_json

    path = csv_path.with_suffix(".json")
    first = rows[0] if rows else {}
    atomic_write_json(path, {"kind": RECORD_KIND, "backbone": first.get("backbone"), "batch": first.get("batch"),
                             "device": first.get("device"), "threads": _threads().strip(" ()") or None,
                             "host": platform.node(), "created_at": datetime.now(timezone.utc).isoformat(),
                             "rows": rows})
    return path


def default_csv_path(results: Path, config: BenchConfig, device: str) -> Path:
    return results / "bench" / f"{config.backbone['name']}-b{config.batch}-{device.replace(':', '')}.csv"
