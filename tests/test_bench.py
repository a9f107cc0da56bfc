"""``harness bench`` (one training step per method, FLOPs, memory, ratios) and the no-wasted-work rules of a step:
only trainable parameters reach the optimiser, evaluation runs under inference mode, data-loader workers and
pinned memory only on CUDA."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from conftest import TINY_BACKBONE
from torch import nn

from harness.api import METHODS
from harness.bench import methods_in

#: the paper's six, from the registry (the bench test times these; the default adds the PETL baselines)
HEADLINE_METHODS = tuple(methods_in("headline"))

#: TINY_BACKBONE as bench flags: 32x32 images, patch 8, width 32, 2 blocks
TINY_FLAGS = ["--backbone", TINY_BACKBONE["name"], "--image-size", "32",
              *[f"--model-arg={k}={v}" for k, v in TINY_BACKBONE["model_args"].items() if k != "img_size"]]


@pytest.fixture(scope="module")
def bench_csv(tmp_path_factory) -> tuple[list[dict[str, str]], str, "Path"]:
    from harness.cli import main

    out = tmp_path_factory.mktemp("bench") / "bench.csv"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import contextlib
        import io

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["bench", *TINY_FLAGS, "--methods", ",".join(HEADLINE_METHODS), "--batch", "4", "--warmup", "1", "--repeats", "2", "--device", "cpu",
                         "--num-classes", "10", "--threads", "1", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    assert code == 0, printed.getvalue()
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh)), printed.getvalue(), out


def printed_rows(printed: str) -> dict[str, list[str]]:
    """The printed table's rows by method (cells split on runs of 2+ spaces), under its header line."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_bench_writes_one_row_per_method_with_times_and_ratios(bench_csv) -> None:
    rows, printed, _ = bench_csv
    assert [r["method"] for r in rows] == list(HEADLINE_METHODS)
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert float(row["step_ms"]) > 0 and float(row["forward_ms"]) > 0
        assert float(row["step_ms_min"]) <= float(row["step_ms"]) <= float(row["step_ms_max"])
        assert row["batch"] == "4" and row["image_size"] == "32" and row["repeats"] == "2"
    # FLOPs are counted, not timed: the linear probe and fine-tuning run the backbone once plus a 32 -> 10 head;
    # TOAST runs it twice (two passes) plus its feedback path
    backbone = int(rows[0]["backbone_forward_flops"])
    head = 2 * TINY_BACKBONE["model_args"]["embed_dim"] * 10
    assert int(by_name["linear"]["forward_flops"]) == int(by_name["finetune"]["forward_flops"]) == backbone + head
    assert 2.0 * backbone < int(by_name["toast"]["forward_flops"]) < 2.6 * backbone
    # what each method trains: the probe only its head, fine-tuning everything
    assert int(by_name["linear"]["trainable"]) == 0
    assert int(by_name["finetune"]["trainable"]) + int(by_name["finetune"]["head"]) == int(by_name["finetune"]["total"])
    # the printed table shows the CSV's figures, method by method
    table = printed_rows(printed)
    assert set(table) == set(by_name)
    for name, row in by_name.items():
        assert table[name]["step (ms)"] == f"{float(row['step_ms']):.1f}"
        assert table[name]["x finetune"] == f"{float(row['vs_finetune']):.2f}"
        assert table[name]["GFLOPs/img"] == f"{int(row['forward_flops']) / 1e9:.3f}"
    assert table["finetune"]["x finetune"] == "1.00"
    # the step on cached frozen outputs: timed for the methods that declare a frozen part, and only for them
    for row in rows:
        if METHODS.get(row["method"]).frozen_features:
            assert float(row["cached_step_ms"]) > 0
            assert table[row["method"]]["cached step (ms)"] == f"{float(row['cached_step_ms']):.1f}"
        else:
            assert row["cached_step_ms"] == row["cached_vs_finetune"] == ""
            assert table[row["method"]]["cached step (ms)"] == "–"
    assert {r["method"] for r in rows if r["cached_step_ms"]} == {"linear", "toast", "toast-lite"}
    assert "wrote " in printed and "cpu (1 thread)" in printed


def test_bench_steps_exactly_what_the_method_trains(bench_csv) -> None:
    rows, _, _ = bench_csv
    by_name = {r["method"]: r for r in rows}
    linear = by_name["linear"]
    assert int(linear["trainable"]) == 0 and int(linear["head"]) == 32 * 10 + 10
    assert int(linear["optimized_params"]) == int(linear["head"])  # the head only
    finetune = by_name["finetune"]
    assert int(finetune["optimized_params"]) == int(finetune["total"])
    for row in rows:
        assert int(row["optimized_params"]) == int(row["trainable"]) + int(row["head"])


def test_bench_flops_are_the_cost_modules_count(bench_csv) -> None:
    from harness.backbone import build_backbone
    from harness.cost import forward_flops, method_cost

    rows, _, _ = bench_csv
    for row in rows:
        expected = method_cost(METHODS.get(row["method"]), TINY_BACKBONE, 10, image_size=32)["flops"]
        assert int(row["forward_flops"]) == expected, row["method"]
    assert int(rows[0]["backbone_forward_flops"]) == forward_flops(build_backbone(TINY_BACKBONE), 32)


def test_a_bench_run_is_a_record_that_the_table_shows(bench_csv, fixed_suite, tmp_path) -> None:
    """``harness table --columns step`` reads the newest bench record for the suite's backbone architecture."""
    import json
    import shutil

    from records import put

    from harness.store import Store
    from harness.sweep import load_suite
    from harness.table import build_table

    rows, _, out = bench_csv
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["kind"] == "harness-bench" and record["backbone"] == TINY_BACKBONE["name"]
    assert [r["method"] for r in record["rows"]] == [r["method"] for r in rows]
    suite = load_suite(fixed_suite())  # the tiny suite: vit_tiny_patch16_224
    store = Store(tmp_path / "results")
    put(store, suite, "linear", "demo-digits", [60.0, 70.0])
    put(store, suite, "finetune", "demo-digits", [80.0, 90.0])
    text = build_table(suite, store, extra=("step",))
    assert "no harness bench record for vit_tiny_patch16_224" in text  # none under results/bench yet
    header = [c.strip() for c in text.splitlines()[0].split("|")]
    linear_row = [c.strip() for c in text.splitlines()[2].split("|")]
    assert linear_row[1] == "linear" and linear_row[header.index("step (ms)")] == "–"
    (tmp_path / "results" / "bench").mkdir()
    old = {**record, "created_at": "2000-01-01T00:00:00+00:00",
           "rows": [{**r, "step_ms": 999.0} for r in record["rows"]]}
    (tmp_path / "results" / "bench" / "old.json").write_text(json.dumps(old))
    shutil.copy(out.with_suffix(".json"), tmp_path / "results" / "bench" / "new.json")
    text = build_table(suite, store, extra=("step",))
    header = [c.strip() for c in text.splitlines()[0].split("|")]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in text.splitlines()[2:4]}
    linear = {r["method"]: r for r in record["rows"]}["linear"]
    step, ratio, cached = (header.index(c) for c in ("step (ms)", "step x finetune", "cached step (ms)"))
    assert lines["linear"][step] == f"{linear['step_ms']:.1f}" != "999.0"  # the newest record's
    assert lines["linear"][ratio] == f"{linear['vs_finetune']:.2f}"
    assert lines["linear"][cached] == f"{linear['cached_step_ms']:.1f}" and lines["finetune"][cached] == "–"
    assert lines["finetune"][ratio] == "1.00" and "new.json" in text


def test_bench_refuses_bad_input_with_one_line(capsys) -> None:
    from harness.cli import main

    assert main(["bench", "--backbone", "vit_tiny_patch16_22", "--no-progress"]) == 2
    assert "unknown timm backbone 'vit_tiny_patch16_22'" in capsys.readouterr().err
    assert main(["bench", *TINY_FLAGS, "--methods", "lineer", "--no-progress"]) == 2
    assert "unknown method 'lineer'; did you mean: linear?" in capsys.readouterr().err
    assert main(["bench", *TINY_FLAGS, "--batch", "0", "--no-progress"]) == 2
    assert "batch must be at least 1" in capsys.readouterr().err
    assert main(["bench", *TINY_FLAGS, "--model-arg", "depth", "--no-progress"]) == 2
    assert "--model-arg expects key=value" in capsys.readouterr().err
    assert main(["bench", *TINY_FLAGS, "--threads", "0", "--no-progress"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


# -- no wasted work in a step ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HEADLINE_METHODS)
def test_the_optimizer_holds_exactly_the_trainable_parameters(name: str, tmp_path) -> None:
    """Frozen parameters get no optimiser state: the groups hold every requires_grad parameter and nothing else."""
    from harness.bench import bench_hparams
    from harness.train import assemble_model, make_optimizer

    method = METHODS.get(name)
    hparams = bench_hparams(method, {})
    model = assemble_model(method, TINY_BACKBONE, hparams, cache_dir=tmp_path, num_classes=10, random_init=True)
    optimizer = make_optimizer(method, model, 0.1, hparams)
    stepped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) == len(set(stepped))
    assert set(stepped) == {id(p) for p in model.parameters() if p.requires_grad}
    if name == "linear":
        assert set(stepped) == {id(p) for p in model.head.parameters()}
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    nn.functional.cross_entropy(model(images), labels).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # no gradient for frozen weights


@pytest.mark.parametrize("name", HEADLINE_METHODS)
def test_every_attention_call_stays_on_the_fused_kernel(name: str, tmp_path, monkeypatch) -> None:
    """Each block's attention goes through F.scaled_dot_product_attention in training and in evaluation (TOAST's two
    passes: twice per block), never timm's unfused softmax path."""
    from harness.bench import bench_hparams
    from harness.train import assemble_model

    method = METHODS.get(name)
    model = assemble_model(method, TINY_BACKBONE, bench_hparams(method, {}), cache_dir=tmp_path, num_classes=10,
                           random_init=True)
    calls = []
    fused = nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", counting)
    depth = TINY_BACKBONE["model_args"]["depth"]
    passes = 2 if name.startswith("toast") else 1
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model.train()
    nn.functional.cross_entropy(model(images), labels).backward()
    assert len(calls) == passes * depth
    model.eval()
    with torch.inference_mode():
        model(images)
    assert len(calls) == 2 * passes * depth


def test_evaluation_runs_under_inference_mode() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from harness.loop import evaluate

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.modes: list[bool] = []

        def forward(self, x):
            self.modes.append(torch.is_inference_mode_enabled())
            return self.head(x)

    model = Probe()
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.tensor([0, 1] * 3)), batch_size=4)
    evaluate(model, loader, "cpu", "top1", 2)
    assert model.modes == [True, True]


def test_data_loader_workers_and_pinned_memory_only_on_cuda() -> None:
    from harness.train import loader_options, usable_cpus

    assert loader_options(8, "cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    workers = min(8, usable_cpus())
    assert loader_options(8, "cuda") == {"num_workers": workers, "pin_memory": True, "persistent_workers": workers > 0}
    assert loader_options(0, "cuda:1")["num_workers"] == 0 and loader_options(0, "cuda:1")["pin_memory"]


def test_bench_grid_times_a_linear_search_with_and_without_the_cache(make_suite, tmp_path, capsys) -> None:
    from harness.cli import main

    out = tmp_path / "grid.csv"
    suite = make_suite(tasks=["demo-digits"])
    assert main(["bench", "--grid", "--suite", str(suite), "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "linear search on demo-digits" in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["mode"] for r in rows] == ["no cache", "cache"]
    assert [r["feature_cache"] for r in rows] == ["off: --no-cache", "used"]
    assert all(r["points"] == "2" and float(r["seconds"]) > 0 and r["failed"] == "0" for r in rows)
    assert float(rows[1]["max_eval_diff"]) <= 1e-4 and float(rows[1]["speedup"]) > 0


def test_bench_grid_full_grid_takes_the_methods_own_grid(make_suite, tmp_path, capsys) -> None:
    """--full-grid replaces the suite's linear grid with the method's own (40 points); --grid-points cuts it."""
    from harness.cli import main

    out = tmp_path / "grid.csv"
    suite = make_suite(tasks=["demo-digits"])
    assert main(["bench", "--grid", "--full-grid", "--grid-points", "3", "--epochs", "2", "--suite", str(suite),
                 "--no-progress", "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["points"] for r in rows] == ["3", "3"]  # the tiny suite's own linear grid has 2 points
    assert [r["epochs"] for r in rows] == ["2", "2"]  # the tiny suite trains 1
    grid = METHODS.get("linear").grid
    assert len(grid["lr"]) * len(grid["weight_decay"]) == 40


def test_the_default_methods_come_from_the_registry() -> None:
    """No fixed list: the headline methods and the PETL baselines as registered (a new one is timed without an
    edit here); TOAST's variants only when named."""
    from harness.bench import BenchConfig, default_methods

    assert HEADLINE_METHODS == ("linear", "finetune", "vpt-deep", "lora", "toast", "toast-lite")
    names = default_methods()
    assert names[:6] == list(HEADLINE_METHODS) and BenchConfig().methods == names
    assert {"bitfit", "ssf", "adapter", "dora", "adalora", "vpt-shallow"} <= set(names)
    assert not [n for n in names if n.startswith("toast-") and n != "toast-lite"]
