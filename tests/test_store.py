"""The results store: atomic writes, validation, corrupt and partial records."""

from __future__ import annotations

import json
import os

import pytest

from harness.plan import Cell, is_finished, search_specs, trial_id
from harness.store import Store, atomic_write_json
from harness.sweep import load_suite


@pytest.fixture
def spec(make_suite):
    return search_specs(load_suite(str(make_suite())), Cell("linear", "demo-digits"))[0]


def record_for(spec, status="ok", value=50.0):
    return {"spec": spec, "status": status, "metrics": {"eval": value}, "curve": [{"epoch": 1, "eval": value}],
            "params": {"trainable": 1, "head": 1, "total": 2}, "provenance": {}}


def test_write_then_read_roundtrip(tmp_path, spec):
    store = Store(tmp_path)
    path = store.write(record_for(spec))
    assert path == tmp_path / "tiny" / "linear" / "demo-digits" / f"search-{trial_id(spec)}.json"
    record = store.read(spec)
    assert record["id"] == trial_id(spec) and record["metrics"]["eval"] == 50.0
    assert is_finished(record) and store.problems == []


def test_atomic_write_leaves_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        atomic_write_json(path, circular)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


@pytest.mark.parametrize("damage, reason", [
    (lambda text: text[: len(text) // 2], "unreadable record"),
    (lambda text: json.dumps({"spec": {}}), "partial record"),
    (lambda text: text.replace('"status": "ok"', '"status": "weird"'), "unknown status"),
    (lambda text: text.replace('"lr": 1.0', '"lr": 2.0'), "does not match its spec"),
])
def test_damaged_records_are_reported_and_not_counted(tmp_path, spec, damage, reason):
    store = Store(tmp_path)
    path = store.write(record_for(spec))
    path.write_text(damage(path.read_text()))
    assert store.read(spec) is None
    assert store.scan("tiny") == []
    assert len(store.problems) == 1 and reason in store.problems[0].reason
    assert str(path) in str(store.problems[0])


def test_failed_trials_are_not_finished_but_diverged_are(tmp_path, spec):
    store = Store(tmp_path)
    store.write(record_for(spec, status="failed", value=None))
    assert store.read(spec) is not None and not is_finished(store.read(spec))
    store.write(record_for(spec, status="diverged", value=None))
    assert is_finished(store.read(spec))


def test_scan_ignores_temp_files(tmp_path, spec):
    store = Store(tmp_path)
    path = store.write(record_for(spec))
    (path.parent / f".{path.name}.abc.tmp").write_text("{half")
    os.utime(path)
    assert len(store.scan()) == 1 and store.problems == []
