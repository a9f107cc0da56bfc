"""The V-PETL Bench source (results/reference/vpetl-bench.csv): the PETL baselines' published FGVC and VTAB-1k numbers
on ViT-B/16 ImageNet-21k. Its printed means are recomputed from its cells, the numbers it copies from VPT's Table 1
agree with vpt-paper.csv, its names map to our registered methods and tasks, and `harness table --reference
vpetl-bench` prints its numbers under our PETL rows."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
from records import FIXED, put

from harness.api import METHODS, TASKS
from harness.cli import main
from harness.reference import Comparison, load, our_method, our_task
from harness.store import Store
from harness.sweep import load_suite

ROOT = Path(__file__).resolve().parents[1] / "results" / "reference"
SOURCE = "vpetl-bench"

#: the README's row names -> our registered methods
NAMES = {"Full fine-tuning": "finetune", "Linear probing": "linear", "Adapter": "adapter",
         "AdaptFormer": "adaptformer", "BitFit": "bitfit", "VPT-Shallow": "vpt-shallow", "VPT-Deep": "vpt-deep",
         "SSF": "ssf", "LoRA": "lora"}
VTAB = ["vtab-cifar", "vtab-caltech101", "vtab-dtd", "vtab-oxford_flowers102", "vtab-oxford_iiit_pet", "vtab-svhn",
        "vtab-sun397", "vtab-patch_camelyon", "vtab-eurosat", "vtab-resisc45", "vtab-diabetic_retinopathy",
        "vtab-clevr_count", "vtab-clevr_dist", "vtab-dmlab", "vtab-kitti", "vtab-dsprites_loc", "vtab-dsprites_ori",
        "vtab-smallnorb_azi", "vtab-smallnorb_ele"]
FGVC = ["fgvc-cub", "fgvc-nabirds", "fgvc-flowers", "fgvc-dogs", "fgvc-cars"]


def rows(source: str = SOURCE) -> list[dict[str, str]]:
    with open(ROOT / f"{source}.csv", newline="") as f:
        return list(csv.DictReader(f))


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_names_map_to_our_registered_methods_and_tasks():
    methods = {r["method"] for r in rows()}
    assert methods == set(NAMES)
    for paper, ours in NAMES.items():
        assert our_method(paper) == ours and ours in METHODS
    for benchmark, expected in (("vtab-1k", VTAB), ("fgvc", FGVC)):
        tasks = [our_task(benchmark, r["task"]) for r in rows() if r["benchmark"] == benchmark and r["method"] == "SSF"]
        assert tasks == expected + ["mean"]  # the README's column order, its Mean last
        assert all(t in TASKS for t in expected)
    assert our_task("vtab-1k", "Retinopathy") == "vtab-diabetic_retinopathy"
    assert our_task("vtab-1k", "KITTI/distance") == "vtab-kitti"
    assert our_task("fgvc", "Stanford Cars") == "fgvc-cars"


def test_printed_means_are_the_mean_of_the_cells():
    """Each row's 'Mean' is the mean of its 19 VTAB (5 FGVC) cells, within the rounding of the printed digits."""
    by_row = defaultdict(list)
    for r in rows():
        by_row[(r["method"], r["benchmark"])].append(r)
    assert len(by_row) == 18  # 9 methods x 2 benchmarks
    for (method, benchmark), cells in by_row.items():
        means = [r for r in cells if r["task"] == "Mean"]
        members = [r for r in cells if r["task"] != "Mean"]
        assert len(means) == 1 and len(members) == (19 if benchmark == "vtab-1k" else 5)
        recomputed = sum(float(r["value"]) for r in members) / len(members)
        tolerance = 0.5 * 10 ** -decimals(means[0]["value"]) + 1e-9
        assert recomputed == pytest.approx(float(means[0]["value"]), abs=tolerance), (method, benchmark)
    # spot checks against the README as read
    values = {(r["method"], r["benchmark"], r["task"]): r["value"] for r in rows()}
    assert values[("SSF", "vtab-1k", "Mean")] == "73.10"
    assert values[("BitFit", "vtab-1k", "SVHN")] == "59.9"
    assert values[("AdaptFormer", "fgvc", "Stanford Cars")] == "81.9"
    assert values[("LoRA", "vtab-1k", "SmallNORB/ele")] == "44.0"


def test_the_rows_copied_from_vpt_agree_with_vpt_paper():
    """Full, Linear, VPT-shallow and VPT-deep are VPT's Table 1 numbers: every cell both sources print is equal."""
    ours = {(our_method(r["method"]), r["benchmark"], our_task(r["benchmark"], r["task"])): float(r["value"])
            for r in rows()}
    compared = 0
    for r in rows("vpt-paper"):
        key = (our_method(r["method"]), r["benchmark"], our_task(r["benchmark"], r["task"]))
        if key in ours:
            assert ours[key] == float(r["value"]), key
            compared += 1
    assert compared == 4 * 19 + 4 * 6  # 19 VTAB cells and 5 FGVC cells plus the FGVC mean, per method


def test_params_are_kept_per_benchmark():
    frame = load(SOURCE)
    params = frame.groupby(["our_method", "benchmark"])["params_m"].unique()
    assert all(len(v) == 1 for v in params)
    assert params[("bitfit", "vtab-1k")][0] == 0.10 and params[("adapter", "vtab-1k")][0] == 0.16
    assert params[("adapter", "fgvc")][0] == 0.41 and params[("finetune", "fgvc")][0] == 85.8
    assert params[("linear", "vtab-1k")][0] == 0.0


def test_comparison_gives_the_papers_cells_for_the_petl_methods():
    groups = {"natural": VTAB[:7], "specialized": VTAB[7:11], "structured": VTAB[11:]}
    cells = Comparison(SOURCE).cells(["bitfit", "adapter", "adaptformer", "ssf", "lora", "dora"], groups)
    assert cells[("bitfit", "vtab-cifar")].value == 72.8 and cells[("bitfit", "vtab-cifar")].params_m == 0.10
    assert cells[("adapter", "vtab-clevr_count")].value == 80.9
    assert cells[("adaptformer", "vtab-resisc45")].value == 84.4
    assert cells[("ssf", "mean")].value == 73.10 and cells[("ssf", "mean")].text == "73.10"
    assert cells[("lora", "vtab-smallnorb_azi")].value == 31.0
    assert not any(m == "dora" for m, _ in cells)  # not in the source
    assert not any(c.endswith("(mean)") for _, c in cells)  # the README prints no group means
    # a subset of the tasks: the 19-task mean is not comparable
    partial = Comparison(SOURCE).cells(["ssf"], {"natural": VTAB[:7]})
    assert ("ssf", "mean") not in partial and partial[("ssf", "vtab-dtd")].value == 75.1
    # FGVC tasks pick the FGVC table
    fgvc = Comparison(SOURCE).cells(["ssf", "bitfit"], {"": FGVC})
    assert fgvc[("ssf", "fgvc-cars")].value == 89.2 and fgvc[("bitfit", "mean")].value == 88.02
    assert fgvc[("ssf", "fgvc-cars")].params_m == 0.39


def table_lines(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_table_reference_puts_vpetl_beside_our_petl_rows(make_suite, tmp_path, capsys):
    lr = {"*": {"lr": 0.1, "weight_decay": 0.0}}
    fixed = {**FIXED, "fixed": {m: lr for m in ("bitfit", "ssf", "adapter")}}
    path = str(make_suite(tasks=VTAB, methods=["bitfit", "ssf", "adapter"], **fixed))
    suite, results = load_suite(path), tmp_path / "results"
    store = Store(results)
    for task in VTAB:
        put(store, suite, "bitfit", task, [70.0, 72.0])  # 71.0 everywhere
        put(store, suite, "ssf", task, [75.0, 75.0])
    put(store, suite, "adapter", "vtab-cifar", [69.0, 70.0])

    assert main(["table", "--suite", path, "--results", str(results), "--reference", SOURCE, "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split(",")
    by_method = {row[0]: dict(zip(header, row)) for row in (line.split(",") for line in out[1:])}
    bitfit, ssf, adapter = by_method["bitfit"], by_method["ssf"], by_method["adapter"]
    assert float(bitfit["vtab-cifar_paper"]) == 72.8
    assert float(bitfit["vtab-cifar_delta"]) == pytest.approx(71.0 - 72.8)
    assert float(bitfit["vtab-smallnorb_azi_paper"]) == 15.7
    assert float(bitfit["mean_paper"]) == 62.05
    assert float(bitfit["mean_delta"]) == pytest.approx(71.0 - 62.05)
    assert float(ssf["vtab-dtd_paper"]) == 75.1 and float(ssf["vtab-dtd_delta"]) == pytest.approx(-0.1)
    assert float(ssf["mean_paper"]) == 73.10
    assert float(adapter["vtab-cifar_paper"]) == 69.2
    assert float(adapter["vtab-cifar_delta"]) == pytest.approx(69.5 - 69.2)
    assert float(adapter["vtab-svhn_paper"]) == 82.8 and adapter["vtab-svhn_delta"] == ""  # no record of ours
    assert adapter["mean_delta"] == ""
    assert bitfit["natural_paper"] == ""  # no group means in the README

    assert main(["table", "--suite", path, "--results", str(results), "--reference", SOURCE]) == 0
    text = capsys.readouterr().out
    head, body = table_lines(text)
    labels = [r[0] for r in body]
    assert labels == ["bitfit", "↳ paper", "↳ Δ", "ssf", "↳ paper", "↳ Δ", "adapter", "↳ paper", "↳ Δ"]
    bitfit_paper = dict(zip(head, body[1]))
    assert bitfit_paper["mean"] == "62.05" and bitfit_paper["# params (M)"] == "0.1"
    assert f"paper: {SOURCE}" in text and "vit-b16-in21k" in text


def test_reference_listing_and_show(capsys):
    assert main(["reference", "ls"]) == 0
    out = capsys.readouterr().out
    assert SOURCE in out and "BitFit" in out and "vtab-1k" in out
    assert main(["reference", "show", SOURCE, "--table", "vtab"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    ssf = next(line for line in lines if line.startswith("| SSF "))
    cells = dict(zip(columns, (c.strip() for c in ssf.strip("|").split("|"))))
    assert cells["Patch Camelyon"] == "87.4" and cells["Mean"] == "73.10" and cells["# params (M)"] == "0.21"
