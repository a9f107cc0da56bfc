"""Experiment trackers (``harness run --log tensorboard|mlflow|wandb``, or the suite's ``log:`` list): each trial's
finished record is also sent to the trackers, so their own comparison views work on our trials.

A tracker reads the record after the trial computed it (a deep copy), so logging never changes what is computed
or recorded; a tracker that fails (a full disk, a server gone) costs one warning, never the trial. Runs are named
``suite/method/task/stage/seed<N>`` and grouped by suite (TensorBoard: one event folder per trial beside its record;
MLflow: one experiment per suite; W&B: project and group = the suite). What goes in: the hyper-parameters and the
spec's identity as parameters, the per-epoch curve with the epoch as step, the final metrics, the cost and the
provenance (commit, device, host).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, did_you_mean


@dataclass(frozen=True)
class Tracker:
    name: str
    module: str  # what must import for it to work
    extra: str  # pip install 'harness[<extra>]'
    log: Callable[[dict[str, Any], Path], None]  # (record, its results folder)


# ------------------------------------------------------------------------------------------------- what is logged
def run_name(record: dict[str, Any]) -> str:
    spec = record["spec"]
    return f"{spec['suite']}/{spec['method']}/{spec['task']}/{spec['stage']}/seed{spec['seed']}"


def params_of(record: dict[str, Any]) -> dict[str, Any]:
    """The trial's hyper-parameters and identity, as scalars and strings (what every tracker's params accept)."""
    spec = record["spec"]
    params: dict[str, Any] = {f"hp.{k}": v for k, v in (spec.get("hparams") or {}).items()}
    params.update({key: spec.get(key) for key in ("suite", "method", "task", "stage", "seed")})
    params.update(trial_id=record.get("id"), backbone=(spec.get("backbone") or {}).get("name"),
                  epochs=(spec.get("train") or {}).get("epochs"), train_split=spec.get("train_split"),
                  eval_split=spec.get("eval_split"), method_version=spec.get("method_version"),
                  task_version=spec.get("task_version"))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items() if v is not None}


def curve_points(record: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """(epoch, its numeric values) per curve entry: train_loss, eval, lr, ..."""
    points = []
    for entry in record.get("curve") or []:
        values = {k: float(v) for k, v in entry.items() if k != "epoch" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        points.append((int(entry["epoch"]), values))
    return points


def final_values(record: dict[str, Any]) -> dict[str, float]:
    """``final/<metric>`` of the record's metrics and ``cost/<name>`` of its numeric cost entries."""
    values = {f"final/{k}": float(v) for k, v in (record.get("metrics") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values.update({f"cost/{k}": float(v) for k, v in (record.get("cost") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if isinstance(record.get("wall_time_s"), (int, float)):
        values["cost/wall_time_s"] = float(record["wall_time_s"])
    return values


def tags_of(record: dict[str, Any]) -> dict[str, str]:
    """Status and provenance as strings: commit (and dirty), device, host, SLURM job."""
    prov = record.get("provenance") or {}
    git = prov.get("git") or {}
    tags = {"status": record.get("status"), "git.commit": git.get("commit"), "git.dirty": git.get("dirty"),
            "device": (prov.get("device_identity") or {}).get("model") or prov.get("device"),
            "host": prov.get("hostname"), "slurm_job_id": (prov.get("slurm") or {}).get("job_id")}
    return {k: str(v) for k, v in tags.items() if v is not None}


def event_folder(record: dict[str, Any], results: Path) -> Path:
    """Where a trial's TensorBoard events go: beside its record, ``<cell folder>/tensorboard/<stage>-<id>/``."""
    spec = record["spec"]
    cell = Path(results) / spec["suite"] / spec["method"] / spec["task"]
    return cell / "tensorboard" / f"{spec['stage']}-{record['id']}"


# ------------------------------------------------------------------------------------------------- the trackers
def _tensorboard(record: dict[str, Any], results: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(event_folder(record, results)))
    try:
        for epoch, values in curve_points(record):
            for key, value in values.items():
                writer.add_scalar(f"curve/{key}", value, epoch)
        finals = final_values(record)
        writer.add_hparams(params_of(record), finals or {"final/eval": float("nan")}, run_name=".")
        writer.add_text("provenance", "  \n".join(f"{k}: {v}" for k, v in tags_of(record).items()))
    finally:
        writer.close()


def _mlflow(record: dict[str, Any], results: Path) -> None:
    """MLflow's tracking URI when set (a server, sqlite), else a local file store ``<results>/mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this
        uri = (Path(results).resolve() / "mlruns").as_uri()
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    suite = record["spec"]["suite"]
    experiment = client.get_experiment_by_name(suite)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(suite)
        except Exception:  # noqa: BLE001 - another trial created it first
            experiment_id = client.get_experiment_by_name(suite).experiment_id
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name(record), tags={"suite": suite, **tags_of(record)})
    now = int(1000 * time.time())
    metrics = [Metric(key, value, now, epoch) for epoch, values in curve_points(record)
               for key, value in values.items()]
    metrics += [Metric(key, value, now, 0) for key, value in final_values(record).items()]
    params = [Param(k, str(v)) for k, v in params_of(record).items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("harness.record", "1")])
    client.set_terminated(run.info.run_id, "FINISHED" if record.get("status") == "ok" else "FAILED")


def _wandb(record: dict[str, Any], results: Path) -> None:
    """W&B in its own mode (``WANDB_MODE``); offline unless set, so a node without network logs to
    ``<results>/wandb/`` for ``wandb sync`` later. Project: ``WANDB_PROJECT`` or the suite."""
    import wandb

    suite = record["spec"]["suite"]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or suite, group=suite, name=run_name(record),
                     job_type=record["spec"]["stage"], dir=str(results), config=params_of(record),
                     tags=[record["spec"]["method"], record["spec"]["task"]], reinit="create_new",
                     mode=os.environ.get("WANDB_MODE") or "offline",
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
    try:
        for epoch, values in curve_points(record):
            run.log(values, step=epoch)
        run.summary.update({**final_values(record), **tags_of(record)})
    finally:
        run.finish(exit_code=0 if record.get("status") == "ok" else 1)


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", "tensorboard", "tensorboard", _tensorboard),
    "mlflow": Tracker("mlflow", "mlflow", "mlflow", _mlflow),
    "wandb": Tracker("wandb", "wandb", "wandb", _wandb),
}


# ------------------------------------------------------------------------------------------------- the engine's use
def check_trackers(names: list[str] | tuple[str, ...], where: str = "--log") -> tuple[str, ...]:
    """The trackers asked for, each known and importable: else one message before the first trial."""
    chosen: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise HarnessError(f"{where}: unknown tracker '{name}'{did_you_mean(name, TRACKERS)}")
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.module) is None:
            raise HarnessError(f"{where} {name}: the {tracker.module} package is not installed "
                               f"(pip install 'harness[{tracker.extra}]')")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def log_trial(record: dict[str, Any], trackers: tuple[str, ...], results: Path | None) -> list[str]:
    """Send a finished record to each tracker; a failure is a warning (printed and returned), never raised."""
    problems = []
    for name in trackers:
        try:
            TRACKERS[name].log(copy.deepcopy(record), Path(results or "results"))
        except Exception as err:  # noqa: BLE001 - a tracker never fails a trial
            problems.append(f"warning: --log {name}: trial {record.get('id')} was not logged "
                            f"({type(err).__name__}: {err}); its record is written")
            print(problems[-1], file=sys.stderr)
    return problems
