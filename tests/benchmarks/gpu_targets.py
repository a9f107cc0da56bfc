"""Issue 20's GPU targets measured in one process, figures written to a folder (run by scripts/gpu_check.sh; asserts
nothing: timings belong in benchmarks, not unit tests).

    .venv/bin/python tests/benchmarks/gpu_targets.py --out DIR            # ViT-B/16, batch 64, bf16 on CUDA
    .venv/bin/python tests/benchmarks/gpu_targets.py --out DIR --smoke    # tiny settings: a CPU smoke test

Measured (each ratio within one run):
1. ``harness bench`` (finetune, linear, toast, toast-lite): TOAST-Lite step vs TOAST's (cached and uncached), TOAST's
   forward vs the backbone's, finetune's training TFLOP/s and fraction of the device's dense bf16 peak;
2. a bare step of the same models in the same process (plain SGD loop, no harness code) against bench's step:
   bench's TOAST uncached step within 5 % of the bare TopDownViT step;
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


def bare_step_ms(method_name: str, backbone: dict, batch: int, size: int, device: str, amp: bool,
                 warmup: int, repeats: int) -> float:
    """The method's model built as bench builds it, stepped by a plain loop: its own optimiser (AdamW or SGD, as
    bench builds it) over its trainable parameters, cross-entropy under bf16 autocast, no harness code in the
    step (no finiteness check, no memory tracking)."""
    import torch
    import torch.nn.functional as F

    from harness.api import METHODS
    from harness.bench import BENCH_HPARAMS, bench_hparams
    from harness.loop import autocast_for, seed_everything
    from harness.store import default_cache_dir
    from harness.train import assemble_model, make_optimizer

    method = METHODS.get(method_name)
    hparams = bench_hparams(method, dict(BENCH_HPARAMS))
    seed_everything(0)
    model = assemble_model(method, backbone, hparams, cache_dir=default_cache_dir(), device=device, num_classes=100,
                           random_init=True).to(device).train()
    opt = make_optimizer(method, model, float(hparams["lr"]), hparams)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_for(device, amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    del model, opt
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (CPU smoke test)")
    parser.add_argument("--device", help="default: CUDA if present")
    parser.add_argument("--epochs", type=int, help="trial epochs (default 3; smoke 1)")
    parser.add_argument("--parts", default="bench,bare,compile,trial",
                        help="comma list of the parts to run (default: all): bench, bare, compile, trial")
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
        bare = bare_step_ms(name, backbone, batch, size, device, True, warmup, repeats)
        summary[f"bare_{name}_step_ms"] = bare
        summary[f"bench_{name}_vs_bare"] = rows[name]["step_ms"] / bare

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
            sets.update({"backbone.name": "vit_base_patch16_224", "train.batch_size": batch})
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
