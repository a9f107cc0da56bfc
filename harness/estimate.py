"""What a suite will cost before it runs (``harness run --dry-run``): per method, the trials still to run x the
images they train and evaluate x the time per image, in GPU-hours, and the wall time on N GPUs.

The time per image comes from the newest ``harness bench`` record of the suite's backbone made on a GPU
(``<results>/bench/*.json``): its training step (the step on cached frozen outputs where the frozen-computation
cache serves the method on that task) and the method's own forward for evaluation, each divided by the bench's
batch. A method that record lacks, or a suite with no GPU record at all, gets a rule of thumb instead, named in the
output: a training image costs 3 forward FLOPs (forward + backward) and an evaluated one 1, at
``RULE_TFLOPS`` achieved (the forward FLOPs counted as a trial counts them, on the meta device). Where the cache
serves a method on a task, its steps and evaluations leave out the frozen part's forward (the backbone's forward
FLOPs, or the bench's backbone forward), which runs once per task and split instead.

Split sizes are the ones a task knows without its data (:meth:`harness.api.Task.expected_size`); a split of unknown
size is left out and the output says so. The estimate covers the trials, not pre-tuning stages or data loading; a
segmentation model counts as its backbone at the crop size (the decode head and sliding-window evaluation are not
counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.api import METHODS, TASKS
from harness.plan import Cell, cell_state
from harness.sweep import Suite

#: the training compute the rule of thumb assumes a GPU achieves (dense bf16, ~1/3 of an A100's 312 TFLOP/s peak;
#: a measured H200 fine-tune step reached ~226, docs/protocol.md "cost")
RULE_TFLOPS = 100.0


@dataclass
class MethodEstimate:
    method: str
    trials: int = 0
    steps: int = 0
    seconds: float = 0.0
    #: where the time per image came from: "bench" or "rule"
    sources: set[str] = field(default_factory=set)


@dataclass
class Estimate:
    methods: dict[str, MethodEstimate]
    source: str  # one line: the bench record used, or the rule of thumb
    unknown_splits: list[str]  # "task/split" whose size is not known without the data
    gpus: int = 1

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.methods.values())

    def lines(self) -> list[str]:
        from tabulate import tabulate

        rows = [{"method": m.method, "trials to run": m.trials, "optimiser steps": m.steps,
                 "GPU-hours": f"{m.seconds / 3600:.1f}", "from": "/".join(sorted(m.sources)) or "-"}
                for m in self.methods.values()]
        total_hours = self.seconds / 3600
        rows.append({"method": "total", "trials to run": sum(m.trials for m in self.methods.values()),
                     "optimiser steps": sum(m.steps for m in self.methods.values()),
                     "GPU-hours": f"{total_hours:.1f}", "from": ""})
        out = [f"estimated compute: {total_hours:.1f} GPU-hours; {total_hours / max(1, self.gpus):.1f} h of wall "
               f"time on {self.gpus} GPU{'s' if self.gpus != 1 else ''} (--gpus-available) if trials keep them busy",
               f"  time per image: {self.source}"]
        if self.unknown_splits:
            out.append(f"  not counted (size unknown without the data): {', '.join(self.unknown_splits)}")
        out += ["  " + line for line in tabulate(rows, headers="keys", tablefmt="simple",
                                                 disable_numparse=True).splitlines()]
        return out


def _gpu_bench(results: Path, backbone: str) -> tuple[Path, dict[str, Any]] | None:
    from harness.bench_records import latest_record

    found = latest_record(results / "bench", backbone)
    if found is None or not str(found[1].get("device") or "").startswith("cuda"):
        return None
    return found


def _pending(suite: Suite, cell: Cell, store: Any) -> tuple[int, int]:
    """Search and final trials of a cell still to run (finals of an unfinished search: the protocol's seeds)."""
    state = cell_state(suite, cell, store, stale=False)
    search = sum(not s.finished for s in state.search)
    finals = state.n_finals if state.hparams is None else sum(not s.finished for s in state.finals)
    return search, finals


def _stage_images(suite: Suite, task: Any, stage: str) -> tuple[int | None, int | None, int, str, str]:
    """Per trial of ``stage``: images trained (None: unknown), images evaluated, optimiser steps, and the splits."""
    section = suite.protocol[stage]
    train_split, eval_split = section["train"], section["eval"]
    train, batch = suite.train, int(suite.train["batch_size"])
    iters = train.get("iters")
    if isinstance(iters, dict):
        iters = iters.get(task.name)
    eval_size = task.expected_size(eval_split)
    if iters:
        return int(iters) * batch, eval_size, int(iters), train_split, eval_split
    size = task.expected_size(train_split)
    epochs = int(train["epochs"])
    evaluations = math.ceil(epochs / int(train.get("eval_every", 1)))
    evaluated = eval_size * evaluations if eval_size is not None else None
    if size is None:
        return None, evaluated, 0, train_split, eval_split
    return size * epochs, evaluated, epochs * math.ceil(size / batch), train_split, eval_split


def estimate(suite: Suite, cells: list[Cell], store: Any, results: Path, gpus: int = 1,
             feature_cache: bool = True) -> Estimate:
    """The compute of the cells' trials still to run (see the module docstring)."""
    from harness.features import method_refusal, setting_refusal, task_refusal

    bench = _gpu_bench(results, suite.backbone["name"])
    by_method = {row["method"]: row for row in (bench[1].get("rows") or []) if row.get("status") == "ok"} \
        if bench else {}
    if bench:
        record = bench[1]
        source = (f"harness bench record {bench[0]} ({record.get('backbone')}, {record.get('device')}, batch "
                  f"{record.get('batch')}, {record.get('created_at', '')[:10]}); methods it lacks: rule of thumb "
                  f"({RULE_TFLOPS:g} TFLOP/s)")
    else:
        source = (f"rule of thumb: 3 x forward FLOPs per training image, 1 x per evaluated one, at {RULE_TFLOPS:g} "
                  f"TFLOP/s achieved (no `harness bench` record of {suite.backbone['name']} on a GPU under "
                  f"{results / 'bench'})")
    cache_off = setting_refusal(suite.train, feature_cache) is not None
    flops_cache: dict[tuple[str, str], tuple[float, float]] = {}
    methods: dict[str, MethodEstimate] = {}
    unknown: set[str] = set()
    built_frozen: set[tuple[str, str, str]] = set()
    for cell in cells:
        method, task = METHODS.get(cell.method), TASKS.get(cell.task)
        out = methods.setdefault(cell.method, MethodEstimate(cell.method))
        cached = not cache_off and method_refusal(method) is None and task_refusal(task) is None
        for stage, count in zip(("search", "final"), _pending(suite, cell, store)):
            if not count:
                continue
            trained, evaluated, steps, train_split, eval_split = _stage_images(suite, task, stage)
            for split, images in ((train_split, trained), (eval_split, evaluated)):
                if images is None:
                    unknown.add(f"{task.name}/{split}")
            row = by_method.get(cell.method)
            if row is not None:
                batch = float(row["batch"])
                step = row.get("cached_step_ms") if cached and row.get("cached_step_ms") else row["step_ms"]
                frozen_s = float(row["forward_ms"]) / 1000 / batch if cached else 0.0
                train_s = step / 1000 / batch
                eval_s = max(float(row["method_forward_ms"]) / 1000 / batch - frozen_s, 0.0)
                out.sources.add("bench")
            else:
                method_flops, backbone_flops = _flops(suite, cell, flops_cache)
                frozen = backbone_flops if cached else 0.0
                train_s = (3 * method_flops - frozen) / (RULE_TFLOPS * 1e12)
                eval_s = max(method_flops - frozen, 0.0) / (RULE_TFLOPS * 1e12)
                frozen_s = frozen / (RULE_TFLOPS * 1e12)
                out.sources.add("rule")
            out.trials += count
            out.steps += steps * count
            out.seconds += count * ((trained or 0) * train_s + (evaluated or 0) * eval_s)
            for split in (train_split, eval_split):  # the frozen part, once per task and split
                size = task.expected_size(split)
                if frozen_s and size and (cell.method, task.name, split) not in built_frozen:
                    built_frozen.add((cell.method, task.name, split))
                    out.seconds += size * frozen_s
    return Estimate(methods, source, sorted(unknown), gpus)


def _flops(suite: Suite, cell: Cell, cache: dict[tuple[str, str], tuple[float, float]]) -> tuple[float, float]:
    """Forward FLOPs per image of the method's model and of the bare backbone at the task's input size (random
    weights on the meta device, as ``harness ls methods --backbone`` counts them; once per method and size)."""
    from harness.cost import method_cost
    from harness.inputs import suite_data_context

    import torch

    from harness.backbone import build_backbone
    from harness.cost import forward_flops

    task = TASKS.get(cell.task)
    ctx = suite_data_context(suite, Path("/nonexistent"))
    size = tuple(task.input_size(ctx))
    key = (cell.method, str(size))  # the head's FLOPs (classes x width) are noise: one count per input size
    if key not in cache:
        spec = {**suite.backbone, "weights": None,
                "model_args": {**task.backbone_args(ctx), **(suite.backbone.get("model_args") or {})}}
        # the suite's settings for the method (e.g. LoRA's target modules on a ConvNeXt) build what its trials build
        counted = method_cost(METHODS.get(cell.method), spec, task.num_classes,
                              hparams=suite.settings_for(cell.method, cell.task), image_size=size)
        with torch.device("meta"):
            backbone = build_backbone(spec)
        plain = float(forward_flops(backbone, size, "meta") or 0.0)
        cache[key] = (float(counted["flops"] or plain), plain)
    return cache[key]
