"""Versions in every record: a method's or task's ``version`` (and a pre-tuning stage's) is part of each trial
spec; a bump makes the older records stale (listed with the reason, never counted) and ``harness run`` retrains
exactly those cells. Records made before specs carried versions read as version 1 and keep their ids."""

from __future__ import annotations

import pytest

from harness import train
from harness.api import ARTIFACTS, METHODS, TASKS
from harness.cli import main
from harness.plan import Cell, TrialSpec, cell_state, final_specs, fixed_hparams, trial_id
from harness.store import Store
from harness.sweep import load_suite
from records import ok_record, put

TASKS_2 = ["demo-digits", "demo-position"]


def ran_trials(monkeypatch, value=None):
    """Record (method, task, seed) of every trial ``harness run`` starts. With ``value``, the trial is not trained:
    it returns an ok record with that metric."""
    ran = []
    real = train.run_trial

    def spy(spec, env):
        ran.append((spec.method, spec.task, spec.seed))
        return real(spec, env) if value is None else ok_record(spec, value)

    monkeypatch.setattr(train, "run_trial", spy)
    return ran


def table_row(capsys, path, results, method):
    assert main(["table", "--suite", path, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    return [cell.strip(" *") for cell in next(line for line in out.splitlines()
                                          if line.startswith(f"| {method} ")).split("|")[1:-1]]


def stale_lines(capsys, path, results):
    assert main(["status", "--suite", path, "--results", str(results), "--stale"]) == 0
    return sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("stale: "))


def stale_counts(capsys, path, results):
    """``harness status``'s stale column, per cell."""
    assert main(["status", "--suite", path, "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].split().index("stale")
    return {line.split()[0]: int(line.split()[column]) for line in lines[2:] if "/" in line.split(" ")[0]}


def test_records_made_before_versions_keep_their_ids(fixed_suite):
    """A spec at version 1 hashes as a spec without version fields does, so older records stay counted."""
    suite = load_suite(fixed_suite())
    spec = final_specs(suite, Cell("linear", "demo-digits"), fixed_hparams(suite, Cell("linear", "demo-digits")))[0]
    assert (spec.method_version, spec.task_version, spec.artifact_versions) == (1, 1, {})
    legacy = {k: v for k, v in spec.to_dict().items()
              if k not in ("method_version", "task_version", "artifact_versions")}
    assert trial_id(legacy) == spec.id and TrialSpec.from_dict(legacy) == spec
    bumped = TrialSpec.from_dict({**legacy, "method_version": 2})
    assert bumped.id != spec.id and bumped.to_dict()["method_version"] == 2


def test_a_method_version_bump_retrains_only_its_cells(fixed_suite, tmp_path, monkeypatch, capsys):
    path, results = fixed_suite(tasks=TASKS_2), tmp_path / "results"
    suite, store = load_suite(path), Store(results)
    for task in TASKS_2:
        put(store, suite, "linear", task, [10.0, 12.0])
        put(store, suite, "finetune", task, [50.0, 52.0])
    old = {p.name for p in (results / "tiny" / "linear").rglob("*.json")}
    assert table_row(capsys, path, results, "linear")[1:3] == ["11.0 ± 1.0", "11.0 ± 1.0"]

    monkeypatch.setattr(METHODS.get("linear"), "version", 2)
    ran = ran_trials(monkeypatch)
    assert main(["run", "--suite", path, "--results", str(results), "--no-progress", "--no-table"]) == 0
    assert ran == [("linear", task, seed) for task in TASKS_2 for seed in (42, 44)]  # finetune's cells kept

    new = {task: cell_state(suite, Cell("linear", task), store).final_records for task in TASKS_2}
    values = {task: sorted(r["metrics"]["eval"] for r in new[task]) for task in TASKS_2}
    assert all(r["spec"]["method_version"] == 2 for task in TASKS_2 for r in new[task])
    row = table_row(capsys, path, results, "linear")
    for column, task in enumerate(TASKS_2, start=1):
        mean, std = sum(values[task]) / 2, abs(values[task][1] - values[task][0]) / 2
        assert row[column] == f"{mean:.1f} ± {std:.1f}" and mean != 11.0  # the new records, not the old ones
    assert table_row(capsys, path, results, "finetune")[1:3] == ["51.0 ± 1.0", "51.0 ± 1.0"]

    lines = stale_lines(capsys, path, results)
    assert len(lines) == 4 and {line.split("/")[-1].split(" ")[0] for line in lines} == old
    assert all(line.endswith(" (method_version 1 -> 2)") and "/linear/" in line for line in lines)

    assert main(["run", "--suite", path, "--results", str(results), "--no-progress", "--no-table"]) == 0
    assert len(ran) == 4  # done: nothing runs again


def test_a_task_version_bump_retrains_only_its_cells(fixed_suite, tmp_path, monkeypatch, capsys):
    path, results = fixed_suite(tasks=TASKS_2), tmp_path / "results"
    suite, store = load_suite(path), Store(results)
    for method in ("linear", "finetune"):
        for task in TASKS_2:
            put(store, suite, method, task, [10.0, 12.0])

    monkeypatch.setattr(TASKS.get("demo-position"), "version", 3)
    ran = ran_trials(monkeypatch, value=40.0)
    assert main(["run", "--suite", path, "--results", str(results), "--no-progress", "--no-table"]) == 0
    assert ran == [(method, "demo-position", seed) for method in ("linear", "finetune") for seed in (42, 44)]
    for method in ("linear", "finetune"):
        assert table_row(capsys, path, results, method)[1:3] == ["11.0 ± 1.0", "40.0 ± 0.0"]

    assert stale_counts(capsys, path, results) == {"linear/demo-digits": 0, "linear/demo-position": 2,
                                                   "finetune/demo-digits": 0, "finetune/demo-position": 2}
    lines = stale_lines(capsys, path, results)
    assert len(lines) == 4
    assert all(line.endswith(" (task_version 1 -> 3)") and "/demo-position/" in line for line in lines)


def test_a_pretuning_stage_version_is_in_the_specs_of_the_methods_that_need_it(make_suite, tmp_path, monkeypatch):
    """TOAST's specs carry the version of its pre-tuned artifact; bumping the stage makes their records stale,
    and a method that starts from a random module (no ``needs``) is not affected."""
    from methods.toast_pretune import PRETUNE_VERSION

    path = make_suite(methods=["toast", "toast-nopretune"], tasks=["demo-digits"],
                      protocol={"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42]},
                      fixed={m: {"*": {"lr": 0.1, "weight_decay": 0.0}} for m in ("toast", "toast-nopretune")})
    suite, store = load_suite(str(path)), Store(tmp_path)
    cells = [Cell("toast", "demo-digits"), Cell("toast-nopretune", "demo-digits")]
    for cell in cells:
        [spec] = final_specs(suite, cell, fixed_hparams(suite, cell))
        store.write(ok_record(spec, 50.0))
    [toast_spec] = final_specs(suite, cells[0], fixed_hparams(suite, cells[0]))
    assert toast_spec.artifact_versions == {"toast-pretuned": PRETUNE_VERSION}

    monkeypatch.setattr(ARTIFACTS.get("toast-pretuned"), "version", PRETUNE_VERSION + 1)
    toast, nopretune = (cell_state(suite, cell, store) for cell in cells)
    assert toast.final_records == [] and toast.to_run()[0].artifact_versions == {"toast-pretuned": PRETUNE_VERSION + 1}
    assert [s.reason for s in toast.stale] == [f"toast-pretuned version {PRETUNE_VERSION} -> {PRETUNE_VERSION + 1}"]
    assert len(nopretune.final_records) == 1 and nopretune.stale == []


@pytest.mark.parametrize(("what", "name", "registry"),
                         [("methods", "linear", METHODS), ("tasks", "demo-digits", TASKS)])
def test_ls_shows_the_version_column(what, name, registry, monkeypatch, capsys):
    def version() -> str:
        assert main(["ls", what, name]) == 0
        header, _, row = capsys.readouterr().out.splitlines()[:3]
        return row.split()[header.split().index("version")]

    assert version() == "1"
    monkeypatch.setattr(registry.get(name), "version", 2)
    assert version() == "2"


def test_a_version_bump_does_not_reuse_cached_frozen_features(fixed_suite, tmp_path, monkeypatch, session_cache):
    """The linear probe trains on cached backbone features: after a bump they are computed again, as the frozen
    computation (or the task's transforms) may be what changed."""
    path = fixed_suite(tasks=["demo-digits"])
    run = ["run", "--suite", path, "--methods", "linear", "--seeds", "1", "--results", str(tmp_path / "r"),
           "--no-progress", "--no-table"]
    caches = lambda: set((session_cache / "features").rglob("*.json"))  # noqa: E731
    for version in (7, 8):  # versions no other test uses: the cache is shared by the session
        monkeypatch.setattr(METHODS.get("linear"), "version", version)
        before = caches()
        assert main(run) == 0
        assert len(caches() - before) == 2  # the train and the eval split's features
