"""`harness run --dry-run` before anything is there: the plan, what the pre-flight would refuse as one warning per kind
of problem, and the compute estimate (harness/estimate.py) from a bench record or the rule of thumb."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.commands.run import group_problems
from harness.plan import Cell
from harness.store import Store
from harness.sweep import load_suite

import records


def bench_record(folder, device: str = "cuda") -> None:
    """A bench record of the tiny ViT at batch 100: finetune's step 100 ms, linear's 50 ms (10 ms on cached
    features); every method's forward and the backbone's 20 ms."""
    folder.mkdir(parents=True)
    rows = [{"method": "finetune", "status": "ok", "step_ms": 100.0, "cached_step_ms": None,
             "method_forward_ms": 20.0, "forward_ms": 20.0, "batch": 100},
            {"method": "linear", "status": "ok", "step_ms": 50.0, "cached_step_ms": 10.0,
             "method_forward_ms": 20.0, "forward_ms": 20.0, "batch": 100}]
    (folder / "vit_tiny_patch16_224-b100-cuda.json").write_text(json.dumps(
        {"kind": "harness-bench", "backbone": "vit_tiny_patch16_224", "batch": 100, "device": device,
         "created_at": "2026-12-01T00:00:00+00:00", "rows": rows}))


def test_the_estimate_is_trials_x_images_x_the_bench_time_per_image(fixed_suite, tmp_path):
    """Two seeds of finetune and linear on demo-digits (train800val200: 1,000 images, test: 797), 1 epoch, one cell
    already done for linear's first seed. finetune: 2 x (1000 x 1 ms + 797 x 0.2 ms); linear on cached features:
    1 x 1000 x 0.1 ms, its evaluation free, plus the backbone's forward once over both splits (1797 x 0.2 ms)."""
    from harness.estimate import estimate

    suite = load_suite(fixed_suite(tasks=["demo-digits"]))
    results = tmp_path / "results"
    store = Store(results)
    records.put(store, suite, "linear", "demo-digits", [50.0])
    bench_record(results / "bench")
    cells = [Cell("finetune", "demo-digits"), Cell("linear", "demo-digits")]
    found = estimate(suite, cells, store, results)
    finetune, linear = found.methods["finetune"], found.methods["linear"]
    assert (finetune.trials, finetune.steps, linear.trials, linear.steps) == (2, 20, 1, 10)
    assert finetune.seconds == pytest.approx(2 * (1000 * 0.001 + 797 * 0.0002))
    assert linear.seconds == pytest.approx(1000 * 0.0001 + 1797 * 0.0002)
    assert finetune.sources == linear.sources == {"bench"} and "b100-cuda.json" in found.source
    without_cache = estimate(suite, cells, store, results, feature_cache=False).methods["linear"]
    assert without_cache.seconds == pytest.approx(1000 * 0.0005 + 797 * 0.0002)


def test_without_a_gpu_bench_record_the_rule_of_thumb_counts_flops(fixed_suite, tmp_path):
    """A CPU bench record is not a GPU's: the estimate falls back to 3 x forward FLOPs per training image and 1 x per
    evaluated one at RULE_TFLOPS, and says so."""
    from harness.cost import method_cost
    from harness.api import METHODS
    from harness.estimate import RULE_TFLOPS, estimate

    suite = load_suite(fixed_suite(tasks=["demo-digits"], methods=["finetune"]))
    results = tmp_path / "results"
    bench_record(results / "bench", device="cpu")
    found = estimate(suite, [Cell("finetune", "demo-digits")], Store(results), results)
    flops = method_cost(METHODS.get("finetune"), suite.backbone, 10, image_size=(32, 32))["flops"]
    assert found.methods["finetune"].sources == {"rule"} and "rule of thumb" in found.source
    assert found.methods["finetune"].seconds == pytest.approx(2 * (3 * flops * 1000 + flops * 797) / (RULE_TFLOPS * 1e12))


def test_a_vtab_dry_run_without_data_prints_the_plan_one_warning_and_gpu_hours(capsys, tmp_path):
    code = main(["run", "--suite", "vtab", "--methods", "linear,finetune", "--dry-run", "--results",
                 str(tmp_path / "results"), "--gpus-available", "8"])
    out, err = capsys.readouterr()
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 19 alike: <…> no data root")
    total = next(line for line in out.splitlines() if line.startswith("estimated compute:"))
    hours = float(total.split()[2])
    wall = float(total.split(";")[1].split()[0])
    assert hours > 10 and wall == pytest.approx(hours / 8, abs=0.06)


def test_problems_that_differ_in_a_few_words_are_one_line():
    alike = [f"vtab-{name}: no data root: pass --data-root PATH (the folder that holds {name}/)" for name in
             ("cifar", "dtd", "svhn")]
    other = "backbone: no weights file /x.pth"
    assert group_problems([*alike, other]) == [
        "3 alike: <…> no data root: pass --data-root PATH (the folder that holds <…>", other]
    assert group_problems(alike[:1]) == alike[:1]
