"""Issue 20's GPU targets measured in one process, figures written to a folder (run by scripts/gpu_check.sh; asserts
nothing: timings belong in benchmarks, not unit tests).

    .venv/bin/python tests/benchmarks/gpu_targets.py --out DIR            # ViT-B/16, batch 64, bf16 on CUDA
    .venv/bin/python tests/benchmarks/gpu_targets.py --out DIR --smoke    # tiny settings: a CPU smoke test

Measured (each ratio within one run):
1. ``harness bench`` (finetune, linear, toast, toast-lite): TOAST-Lite step vs TOAST's (cached and uncached), TOAST's
   forward vs the backbone's, finetune's training TFLOP/s and fraction of the device's dense bf16 peak;
2. bench's step against a bare one (plain loop, no harness code), on the same model, the two stepped alternately:
   bench's TOAST uncached step within 5 % of the bare TopDownViT step, and the same for finetune;
   and TOAST-Lite against TOAST (cached and uncached), their two models stepped alternately. Ratios from
   alternating steps (the median of per-round ratios) are the ones to quote on a shared or noisy machine: part 1's
   ratios come from methods timed one after another;
3. finetune with ``--compile`` and fused AdamW: the TFLOP/s fraction with and without;
4. a finetune trial on a generated VTAB-1k-shaped task (800 + 200 JPEGs at 300-640 px, 224-px inputs, random
   weights) with the decoded-input cache: its wall time by part against steps x bench step time + evaluation
   forwards (target: within 1.2x), and the loader's images/s per worker count (cached vs images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_vtab_tree(root: Path, train: int, val: int, smoke: bool) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    task = root / "dtd"
    for split, n in (("train800", train), ("val200", val), ("train800val200", 0), ("test", 0)):
        lines = []
        for i in range(n):
            w, h = (40, 30) if smoke else (int(rng.integers(300, 641)), int(rng.integers(300, 641)))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
            pixels = np.clip(pixels + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"images/{split}/{i:06d}.jpg"
            (task / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(task / rel, "JPEG", quality=90)
            lines.append(f"{rel} {i % 47}")
        (task / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    return root


def build_for_bench(method_name: str, backbone: dict, device: str):
    """The method's model and optimiser built as ``harness bench`` builds them (random weights, its own optimiser
    over its trainable parameters, training mode)."""
    from harness.api import METHODS
    from harness.bench import BENCH_HPARAMS, bench_hparams
    from harness.loop import seed_everything, train_mode
    from harness.store import default_cache_dir
    from harness.train import assemble_model, make_optimizer

    method = METHODS.get(method_name)
    hparams = bench_hparams(method, dict(BENCH_HPARAMS))
    seed_everything(0)
    model = assemble_model(method, backbone, hparams, cache_dir=default_cache_dir(), device=device, num_classes=100,
                           random_init=True).to(device)
    optimizer = make_optimizer(method, model, float(hparams["lr"]), hparams)
    return train_mode(model), optimizer


def interleaved_ms(steps: dict, device: str, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Each step of ``steps`` (name -> callable) timed in rounds, one call of each per round, so that a slow
    stretch of a shared machine falls on all of them alike. Returns the median ms per step and, against the first
    step, the median of the per-round ratios."""
    import torch

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            ms = timed(fn)
            if i >= warmup:
                times[name].append(ms)
    first = next(iter(steps))
    ratios = {name: statistics.median(a / b for a, b in zip(t, times[first])) for name, t in times.items()
              if name != first}
    return {name: statistics.median(t) for name, t in times.items()}, ratios


def bench_vs_bare(method_name: str, backbone: dict, batch: int, size: int, device: str, warmup: int,
                  repeats: int) -> dict:
    """One model, stepped alternately by bench's step (:func:`harness.loop.train_step`: the objective, the
    finiteness check) and by a bare loop (cross-entropy under bf16 autocast, backward, the optimiser's step; no
    harness code), with the same optimiser: what the harness's step path adds to a step, with nothing else
    differing."""
    import torch
    import torch.nn.functional as F

    from harness.loop import autocast_for, cross_entropy, train_step

    model, opt = build_for_bench(method_name, backbone, device)
    objective = cross_entropy()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def bare() -> None:
        with autocast_for(device, True):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    medians, ratios = interleaved_ms({"bare": bare,
                                      "bench": lambda: train_step(model, opt, objective, x, y, device, True)},
                                     device, warmup, repeats)
    return {"bare_ms": medians["bare"], "bench_ms": medians["bench"], "bench_vs_bare": ratios["bench"]}


def lite_vs_toast(backbone: dict, batch: int, size: int, device: str, warmup: int, repeats: int) -> dict:
    """TOAST-Lite's step against TOAST's, uncached and on cached frozen outputs (as a trial with the feature
    cache steps), the two models stepped alternately (:func:`interleaved_ms`)."""
    import torch

    from harness.features import OnFrozen, as_tuple
    from harness.loop import autocast_for, cross_entropy, train_step

    objective = cross_entropy()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    uncached, cached = {}, {}
    for name in ("toast", "toast-lite"):
        model, opt = build_for_bench(name, backbone, device)
        with torch.no_grad(), autocast_for(device, True):
            frozen = tuple(t.detach() for t in as_tuple(model.eval().frozen_forward(x)))
        on_frozen = OnFrozen(model).train()
        uncached[name] = lambda m=model, o=opt: train_step(m, o, objective, x, y, device, True)
        cached[name] = lambda m=on_frozen, o=opt, f=frozen: train_step(m, o, objective, f, y, device, True)
    out = {}
    for label, steps in (("uncached", uncached), ("cached", cached)):
        medians, ratios = interleaved_ms(steps, device, warmup, repeats)
        out[label] = {"toast_ms": medians["toast"], "toast_lite_ms": medians["toast-lite"],
                      "toast_lite_vs_toast": ratios["toast-lite"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (CPU smoke test)")
    parser.add_argument("--device", help="default: CUDA if present")
    parser.add_argument("--epochs", type=int, help="trial epochs (default 3; smoke 1)")
    parser.add_argument("--parts", default="bench,bare,paired,compile,trial",
                        help="comma list of the parts to run (default: all): bench, bare, paired, compile, trial")
    parser.add_argument("--backbone", help="timm name instead of vit_base_patch16_224 (not with --smoke)")
    parser.add_argument("--batch", type=int, help="batch size instead of 64")
    parser.add_argument("--repeats", type=int, help="timed steps instead of 20")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from harness.bench import BenchConfig, bench_table, run_bench, write_csv
    from harness.bench_trial import phases_table, run_loader_bench, run_trial_bench, loader_table, LOADER_COLUMNS
    from harness.loop import pick_device

    device = args.device or pick_device()
    if args.smoke:
        backbone = {"name": "vit_tiny_patch16_224",
                    "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
        batch, size, warmup, repeats, train, val = 4, 32, 1, 2, 16, 8
    else:
        backbone = {"name": args.backbone or "vit_base_patch16_224", "model_args": {}}
        batch, size, warmup, repeats, train, val = args.batch or 64, 224, 5, args.repeats or 20, 800, 200
    parts = set(args.parts.split(","))
    summary: dict = {"device": device, "smoke": args.smoke, "batch": batch, "image_size": size}
    timings: dict = {}

    def stage(name: str):
        timings[name] = time.perf_counter()
        print(f"== {name}", flush=True)

    stage("bench")  # always: the other parts are ratios to its rows
    config = BenchConfig(backbone=backbone, methods=["finetune", "linear", "toast", "toast-lite"], batch=batch,
                         image_size=size, warmup=warmup, repeats=repeats, device=device, progress=False)
    rows = {r["method"]: r for r in run_bench(config)}
    print(bench_table(list(rows.values())))
    write_csv(list(rows.values()), out / "bench.csv")
    ft, toast, lite = rows["finetune"], rows["toast"], rows["toast-lite"]
    summary.update(
        toast_lite_vs_toast=lite["step_ms"] / toast["step_ms"],
        toast_lite_vs_toast_cached=(lite["cached_step_ms"] / toast["cached_step_ms"]
                                    if lite["cached_step_ms"] and toast["cached_step_ms"] else None),
        toast_forward_vs_backbone=toast["forward_vs_backbone"],
        finetune_train_tflops=ft["train_tflops_per_s"], finetune_peak_fraction=ft["peak_fraction"],
        device_name=ft["device_name"])

    stage("bare")
    for name in ("finetune", "toast") if "bare" in parts else ():
        figures = bench_vs_bare(name, backbone, batch, size, device, warmup, repeats)
        summary[f"bare_{name}_step_ms"] = figures["bare_ms"]
        summary[f"bench_{name}_vs_bare"] = figures["bench_vs_bare"]

    stage("paired")
    if "paired" in parts:
        paired = lite_vs_toast(backbone, batch, size, device, warmup, repeats)
        summary["paired_toast_lite_vs_toast"] = {k: v["toast_lite_vs_toast"] for k, v in paired.items()}
        summary["paired_steps_ms"] = paired

    stage("compile")
    compiled = {}
    settings = (("plain", False, False), ("fused", False, True), ("compile+fused", True, True))
    for label, compile_, fused in settings if "compile" in parts else ():
        config = BenchConfig(backbone=backbone, methods=["finetune"], batch=batch, image_size=size,
                             warmup=warmup + (3 if compile_ else 0), repeats=repeats, device=device, progress=False,
                             compile=compile_, fused_optimizer=fused)
        try:
            row = run_bench(config)[0]
            compiled[label] = {k: row[k] for k in ("step_ms", "train_tflops_per_s", "peak_fraction", "status",
                                                   "error")}
        except Exception as err:  # noqa: BLE001 - a compiler missing on this machine is a figure too
            compiled[label] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:300]}
    summary["finetune_settings"] = compiled
    if "trial" not in parts:
        return finish(summary, timings, out)

    stage("trial")
    with tempfile.TemporaryDirectory() as scratch:
        root = write_vtab_tree(Path(scratch) / "vtab-1k", train, val, args.smoke)
        sets = {"train.num_workers": 8, "data.strict_counts": False}
        if args.smoke:
            sets.update({"backbone.name": backbone["name"], "backbone.model_args": backbone["model_args"],
                         "data.image_size": size, "train.batch_size": batch})
        else:
            sets.update({"backbone.name": backbone["name"], "train.batch_size": batch})
        epochs = args.epochs or (1 if args.smoke else 3)
        loader_rows = run_loader_bench("vtab", "vtab-dtd", data_root=str(root), workers=[0, 1, 2] if args.smoke
                                       else [0, 1, 4, 8], decoded=True, limit=None)
        print(loader_table(loader_rows))
        write_csv(loader_rows, out / "loader.csv", LOADER_COLUMNS)
        # the cache is built by the first trial; the second is timed as a search point after the first would be
        run_trial_bench("vtab", "finetune", "vtab-dtd", data_root=str(root), epochs=1, sets=sets, device=device,
                        weights="none")
        record = run_trial_bench("vtab", "finetune", "vtab-dtd", data_root=str(root), epochs=epochs, sets=sets,
                                 device=device, weights="none")
    print(phases_table(record))
    (out / "trial.json").write_text(json.dumps(record, indent=1, default=str))
    phases = record["cost"]["phases_s"]
    steps = -(-train // int(record["spec"]["train"]["batch_size"])) * epochs
    eval_batch = int(record["spec"]["train"].get("eval_batch_size") or 2 * batch)
    eval_forwards = -(-val // eval_batch) * epochs * ft["forward_ms"] * eval_batch / batch / 1000
    ideal = steps * ft["step_ms"] / 1000 + eval_forwards
    summary.update(trial_wall_s=record["bench_wall_s"], trial_ideal_s=ideal,
                   trial_wall_vs_ideal=record["bench_wall_s"] / ideal, trial_phases_s=phases,
                   trial_decoded_cache=record.get("decoded_cache"), trial_status=record["status"])
    warm = {(r["split"], r["source"], r["workers"]): r["images_per_s_per_core"] for r in loader_rows
            if r["pass"] == "warm"}
    images = max((v for (s, src, _w), v in warm.items() if s == "train800" and src == "images" and v), default=None)
    decoded = max((v for (s, src, _w), v in warm.items() if s == "train800" and src == "decoded" and v),
                  default=None)
    summary["loader_decoded_vs_images_per_core"] = decoded / images if images and decoded else None
    return finish(summary, timings, out)


def finish(summary: dict, timings: dict, out: Path) -> int:
    start = min(timings.values())
    summary["seconds"] = {name: round(t - start, 1) for name, t in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
