"""``harness bench --trial`` and ``harness bench --loader``: where a real trial's time goes, and how fast a task's
input pipeline delivers images.

``--trial`` runs one trial of a suite's search stage (its first grid point, or ``--set`` values) end to end, as
``harness run`` would, with its wall time split into parts (the record's ``cost.phases_s``, :class:`PhaseClock` of
:mod:`harness.train`): ``data_setup`` (datasets, loaders, data fingerprints), ``model_build``, ``cost_accounting``
(parameter counts, forward FLOPs), ``feature_cache`` (splitting off / building the frozen-computation or decoded-input
cache), ``data`` (waiting for training batches), ``steps``, ``evaluation`` (every evaluation pass, its loading
included), ``checkpoints``, ``loop_other``, ``record`` (assembling the record) and ``record_write`` (writing it, timed
here into a scratch folder). Nothing lands in the results.

``--loader`` times the task's training and evaluation input pipelines as a trial builds them (decode, resize,
normalise, collate) with 0, 1, ... workers (up to the CPUs this process may use): ``cold`` is a fresh loader's first
pass (worker start-up and first reads of the files included), ``warm`` the same loader's second pass; images/s and
images/s per core (a worker is a core; no worker: the main process's one).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.plan import Cell, search_specs, select_tasks
from harness.store import default_cache_dir
from harness.sweep import load_suite

PHASE_ORDER = ("data_setup", "model_build", "cost_accounting", "feature_cache", "data", "steps", "evaluation",
               "checkpoints", "loop_other", "record", "record_write")
LOADER_COLUMNS = ("split", "source", "workers", "pass", "images", "seconds", "images_per_s", "images_per_s_per_core")


def run_trial_bench(suite_name: str, method: str, task: str | None = None, *, data_root: str | None = None,
                    epochs: int | None = None, sets: dict[str, Any] | None = None, device: str | None = None,
                    feature_cache: bool = True, progress: bool = False, weights: str | None = None) -> dict[str, Any]:
    """One trial end to end; its record with ``cost.phases_s`` completed by ``record_write`` and ``other`` (the
    trial's wall time not in any part)."""
    from harness.store import Store
    from harness.train import TrialEnv, run_trial

    suite = load_suite(suite_name, data_root=data_root, epochs=epochs, sets=sets or None, weights=weights)
    task = select_tasks(suite, task)[0]
    if method not in suite.methods:
        raise HarnessError(f"--method {method}: suite {suite.name} runs {', '.join(suite.methods)}")
    specs = search_specs(suite, Cell(method, task))
    if not specs:
        raise HarnessError(f"suite {suite.name} has no search stage for {method}/{task}")
    options: dict[str, Any] = {"progress": progress, "feature_cache": feature_cache}
    if device:
        options["device"] = device
    env = TrialEnv.for_suite(suite, default_cache_dir(), **options)
    t0 = time.perf_counter()
    record = run_trial(specs[0], env)
    with tempfile.TemporaryDirectory() as scratch:
        t_write = time.perf_counter()
        Store(Path(scratch)).write(record)
        write_s = time.perf_counter() - t_write
    wall = time.perf_counter() - t0
    phases = dict((record.get("cost") or {}).get("phases_s") or {})
    phases["record_write"] = round(write_s, 4)
    phases["other"] = round(max(0.0, wall - sum(phases.values())), 4)
    record.setdefault("cost", {})["phases_s"] = phases
    record["bench_wall_s"] = round(wall, 3)
    return record


def phases_table(record: dict[str, Any]) -> str:
    from tabulate import tabulate

    phases = record["cost"]["phases_s"]
    wall = record.get("bench_wall_s") or sum(phases.values()) or 1.0
    names = [n for n in PHASE_ORDER if n in phases] + [n for n in phases if n not in PHASE_ORDER]
    rows = [(n, f"{phases[n]:.3f}", f"{100 * phases[n] / wall:.1f}") for n in names]
    rows.append(("wall", f"{wall:.3f}", "100.0"))
    return tabulate(rows, headers=("part", "seconds", "%"), tablefmt="simple")


def loader_plan(suite_name: str, task: str | None = None, data_root: str | None = None):
    """(suite, task, spec, data context) of the suite's first search trial on ``task``."""
    from harness.train import TrialEnv

    suite = load_suite(suite_name, data_root=data_root)
    task = select_tasks(suite, task)[0]
    method = suite.methods[0]
    specs = search_specs(suite, Cell(method, task))
    if not specs:
        raise HarnessError(f"suite {suite.name} has no search stage on {task}")
    env = TrialEnv.for_suite(suite, default_cache_dir(), progress=False)
    return suite, task, specs[0], env.data_context(specs[0])


def time_loader(loader: Any, passes: int = 2) -> list[tuple[int, float]]:
    """(images, seconds) of each pass over ``loader``; the first pass starts the workers."""
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += len(batch[1])
        out.append((n, time.perf_counter() - t0))
    return out


def run_loader_bench(suite_name: str, task: str | None = None, *, data_root: str | None = None,
                     workers: list[int] | None = None, batch: int | None = None, limit: int | None = None,
                     decoded: bool = False) -> list[dict[str, Any]]:
    """Rows of :data:`LOADER_COLUMNS`: the task's training and evaluation loaders as a trial builds them, per worker
    count, cold then warm. ``limit``: the first N images of each split. ``decoded``: also the decoded-input cache's
    loaders (:mod:`harness.decoded`), built first where the task allows it."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from harness import kinds
    from harness.api import TASKS
    from harness.train import usable_cpus

    _suite, task_name, spec, dctx = loader_plan(suite_name, task, data_root)
    task_obj = TASKS.get(task_name)
    batch = batch or int(spec.train["batch_size"])
    counts = workers if workers is not None else list(range(0, usable_cpus() + 1))
    rows = []
    for split, train in ((spec.train_split, True), (spec.eval_split, False)):
        dataset = task_obj.dataset(split, dctx, train=train)
        if limit:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        sources = [("images", dataset, kinds.collate(task_obj, train))]
        if decoded:
            from harness.decoded import decoded_dataset_for_bench

            from harness.features import _whole_batch

            found = decoded_dataset_for_bench(task_obj, split, dctx, train, dataset)
            if found is not None:
                sources.append(("decoded", found, _whole_batch))
        for source, data, collate in sources:
            for w in counts:
                loader = DataLoader(data, batch_size=batch, shuffle=train, num_workers=w,
                                    persistent_workers=w > 0, collate_fn=collate,
                                    generator=torch.Generator().manual_seed(0))
                for label, (n, seconds) in zip(("cold", "warm"), time_loader(loader)):
                    ips = n / seconds if seconds else None
                    rows.append({"split": split, "source": source, "workers": w, "pass": label, "images": n,
                                 "seconds": round(seconds, 3), "images_per_s": ips,
                                 "images_per_s_per_core": ips / max(1, w) if ips else None})
                del loader
    return rows


def loader_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    return tabulate([[row[c] for c in LOADER_COLUMNS] for row in rows], headers=LOADER_COLUMNS,
                    tablefmt="simple", floatfmt=".1f")
