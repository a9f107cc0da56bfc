"""``harness run --log``: each trial's curve, hyper-parameters, final metric and provenance, read back with each
tracker's own reader; logging changes nothing recorded; a failing tracker costs a warning, not the trial; a missing
package is named before the first trial."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from harness.cli import main
from harness.trackers import TRACKERS, Tracker

SMOKE = ["--suite", "demo", "--methods", "linear", "--tasks", "demo-digits", "--epochs", "2", "--grid-points", "1",
         "--seeds", "1", "--no-progress", "--no-table"]


def run(results: Path, *extra: str) -> int:
    return main(["run", *SMOKE, "--results", str(results), *extra])


def records(results: Path) -> dict[str, dict]:
    return {(r := json.loads(p.read_text()))["spec"]["stage"]: r for p in results.rglob("*-*.json")}


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file, decoded with wandb's own protobuf ``Record``: the file is a 7-byte
    W&B header, then LevelDB log framing (32 KiB blocks; per chunk crc32c, length, type 1 full / 2 first /
    3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pending, offset = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        room = 32768 - offset % 32768
        if room < 7:  # a block's tail too short for a header is zero padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_three_trackers_hold_what_the_records_hold(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    results = tmp_path / "results"
    assert run(results, "--log", "tensorboard", "--log", "mlflow", "--log", "wandb") == 0
    recs = records(results)
    final = recs["final"]
    curve = [(e["epoch"], e["eval"]) for e in final["curve"]]
    assert len(curve) == 2

    # TensorBoard: event files beside the record, read by TensorBoard's own accumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = results / "demo" / "linear" / "demo-digits" / "tensorboard" / f"final-{final['id']}"
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("curve/eval")] == curve

    # MLflow: the local file store, read by MLflow's client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(results / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"demo/linear/demo-digits/search/seed42", f"demo/linear/demo-digits/final/seed{final['spec']['seed']}"}
    logged = runs[f"demo/linear/demo-digits/final/seed{final['spec']['seed']}"]
    history = client.get_metric_history(logged.info.run_id, "eval")
    assert [(m.step, pytest.approx(m.value)) for m in history] == curve
    assert logged.data.metrics["final/eval"] == pytest.approx(final["metrics"]["eval"])
    assert float(logged.data.params["hp.lr"]) == final["spec"]["hparams"]["lr"]
    assert logged.data.tags["git.commit"] == final["provenance"]["git"]["commit"]

    # W&B: offline (no network), one run file per trial, read with wandb's own record definitions
    files = sorted((results / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    by_name = {}
    for path in files:
        decoded = wandb_records(path)
        name = next(r.run.display_name for r in decoded if r.WhichOneof("record_type") == "run")
        history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                              for i in r.history.item})
                   for r in decoded if r.WhichOneof("record_type") == "history"]
        by_name[name] = history
    logged = by_name[f"demo/linear/demo-digits/final/seed{final['spec']['seed']}"]
    assert [(step, pytest.approx(values["eval"])) for step, values in logged] == curve


def test_logging_changes_nothing_recorded_and_a_failing_tracker_is_a_warning(tmp_path, monkeypatch, capsys):
    plain, logged = tmp_path / "plain", tmp_path / "logged"
    assert run(plain) == 0

    def broken(record, results):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(TRACKERS, "tensorboard", Tracker("tensorboard", "tensorboard", "tensorboard", broken))
    capsys.readouterr()
    assert run(logged, "--log", "tensorboard") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: --log tensorboard")]
    assert len(warnings) == 2 and "No space left on device" in warnings[0] and "its record is written" in warnings[0]
    a, b = records(plain), records(logged)
    assert set(a) == set(b) == {"search", "final"}
    for stage in a:
        assert a[stage]["id"] == b[stage]["id"]
        assert a[stage]["metrics"] == b[stage]["metrics"] and a[stage]["curve"] == b[stage]["curve"]


def test_a_missing_package_or_unknown_tracker_stops_before_the_first_trial(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    results = tmp_path / "results"
    assert run(results, "--log", "wandb") == 2
    assert capsys.readouterr().err.strip() == ("harness: error: --log wandb: the wandb package is not installed "
                                               "(pip install 'harness[wandb]')")
    assert run(results, "--log", "tensorbord") == 2
    assert "unknown tracker 'tensorbord'; did you mean: tensorboard" in capsys.readouterr().err
    assert not list(results.rglob("*.json"))
