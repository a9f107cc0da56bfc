"""The commands that only read records (issue 23): they import neither torch nor scikit-learn, expand grids in
ParameterGrid's order without it, find stale records through each cell folder's settings index, show tasks by the
papers' short names and explain an empty or partial table. Timings live in tests/benchmarks/read_latency.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.plan import Cell, cell_state, parameter_grid, search_specs
from harness.store import INDEX_NAME, Store
from harness.sweep import load_suite
from records import complete_plan, put

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "timm", "peft")

GRIDS = [
    {},
    {"lr": [0.1]},
    {"lr": [50, 25, 10, 5], "weight_decay": [0.01, 0.001, 0.0]},
    {"weight_decay": [0.0, 1e-4], "lr": [1.0, 0.5, 0.25]},  # axes given out of order: sorted by name
    {"prompt_length": [1, 10, 50], "lr": [5, 2.5], "b": ["x", None], "weight_decay": [0.0]},
    {"target_modules": [["qkv"], ["qkv", "proj"]], "lr": [0.5, 0.25]},  # list values stay whole
]


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_points_are_in_parameter_grids_order(grid):
    from sklearn.model_selection import ParameterGrid

    assert parameter_grid(grid) == list(ParameterGrid(grid))


READ_COMMANDS = ("table", "status", "plot", "regress", "baseline", "reference", "ls")

PROBE = """
import sys
sys.path.insert(0, "tests")
results, out = sys.argv[1], sys.argv[2]
import importlib
for name in {commands!r}:
    importlib.import_module("harness.commands." + name)
from harness.cli import main
from harness.store import Store
from harness.sweep import load_suite
from records import complete_plan

complete_plan(Store(__import__("pathlib").Path(results)), load_suite("demo", grid_points=2, seeds=1))
at = ["--results", results, "--grid-points", "2", "--seeds", "1"]
runs = [["table", "--suite", "demo", *at], ["table", "--suite", "demo", "--format", "latex", *at],
        ["status", "--suite", "demo", "--stale", *at], ["ls"], ["reference", "ls"],
        ["plot", "--suite", "demo", "--out", out, *at],
        ["baseline", "--suite", "demo", "--out", out + "/base.json", "--allow-dirty", *at],
        ["regress", "--suite", "demo", "--baseline", out + "/base.json", "--report-dir", out, *at]]
codes = [main(argv) for argv in runs]
print("CODES", codes, file=sys.stderr)
print("HEAVY", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
"""


def test_read_commands_import_neither_torch_nor_sklearn(tmp_path):
    """Every read command's module, and table, status, ls, reference, plot, baseline and regress run over the demo
    suite's complete plan (search trials of 2 grid points, winners, finals), in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(commands=READ_COMMANDS, heavy=HEAVY),
                           str(tmp_path / "results"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stderr.splitlines()
             if line.startswith(("CODES ", "HEAVY "))}
    assert lines.get("CODES") == "[0, 0, 0, 0, 0, 0, 0, 0]", done.stderr[-3000:]
    assert lines.get("HEAVY") == "[]", done.stderr[-3000:]


def test_method_and_task_modules_declare_without_torch():
    """What the read path asks of every registered method and task (grid, defaults, versions, the artifacts'
    versions) is there without torch: their modules import it only where a model is built or data is read."""
    probe = ("from harness.api import ARTIFACTS, METHODS, TASKS\n"
             "for n in METHODS.names():\n    m = METHODS.get(n); m.grid; [ARTIFACTS.get(a).version "
             "if hasattr(ARTIFACTS.get(a), 'version') else 1 for a in m.needs]\n"
             "for n in TASKS.names():\n    TASKS.get(n).label\n"
             f"import sys; print([m for m in {HEAVY!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr[-3000:]


# ------------------------------------------------------------------------------------------ settings index
def test_stale_records_are_found_through_the_index_and_it_follows_changes(tmp_path):
    suite = load_suite("demo", seeds=1)
    store = Store(tmp_path / "results")
    cell = Cell("linear", "demo-digits")
    complete_plan(store, load_suite("demo", seeds=1, epochs=1))  # other settings: never stale
    spec = search_specs(suite, cell)[0]
    store.write({"spec": spec, "status": "ok", "metrics": {"eval": 50.0}, "curve": [], "params": {},
                 "provenance": {}})
    edited = json.loads(store.path_for(spec).read_text())
    edited["spec"]["hparams"]["lr"] = 123.0  # an edited grid's old point
    from harness.plan import TrialSpec

    old = TrialSpec.from_dict(edited["spec"])
    store.write(dict(edited, spec=old))
    assert [s.path for s in cell_state(suite, cell, store).stale] == [store.path_for(old)]
    folder = store.cell_dir(suite.name, cell)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert sorted(index["files"]) == sorted(p.name for p in folder.glob("[!.]*.json"))

    # a corrupt record is reported on every read, not only the one that indexed it
    broken = folder / "search-0000000000000000.json"
    broken.write_text("{")
    for _ in range(2):
        fresh = Store(store.root)
        cell_state(suite, cell, fresh)
        assert [p.path for p in fresh.problems] == [broken]
    # a file that changes is read again: the stale record, rewritten under other settings, is no longer stale
    other = TrialSpec.from_dict(dict(edited["spec"], overrides={"epochs": 7}))
    store.path_for(old).write_text(json.dumps(dict(edited, id=other.id, spec=other.to_dict(), schema=1)))
    assert cell_state(suite, cell, Store(store.root)).stale == []


def test_records_are_indexed_as_they_are_written(tmp_path, monkeypatch):
    """The first reader after a run parses one record per group of other settings (to name them), not every
    record: each write added its own index entry."""
    from harness.store import SETTINGS_FIELDS

    suite = load_suite("demo", seeds=1)
    assert list(SETTINGS_FIELDS) == sorted(suite.spec_base())
    store = Store(tmp_path / "results")
    complete_plan(store, load_suite("demo", seeds=1, epochs=1))  # records of other settings
    complete_plan(store, suite)
    reader, parsed, check = Store(store.root), [], Store._check
    monkeypatch.setattr(Store, "_check", lambda self, path: parsed.append(path) or check(self, path))
    groups = reader.other_settings(suite)
    assert [g["overrides"] for g in groups] == [{"epochs": 1, "seeds": 1}] and groups[0]["records"] > 1
    assert len(parsed) == 1


def test_a_read_only_results_folder_still_reads(tmp_path, monkeypatch):
    suite = load_suite("demo", seeds=1)
    store = Store(tmp_path / "results")
    put_cell = Cell("linear", "demo-digits")
    complete_plan(store, suite)
    for index in store.root.rglob(INDEX_NAME):  # records copied in from elsewhere: no index beside them
        index.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr("harness.store.atomic_write_json", refuse)
    assert cell_state(suite, put_cell, Store(store.root)).complete
    assert not (store.cell_dir(suite.name, put_cell) / INDEX_NAME).exists()


# ------------------------------------------------------------------------------------------ in the paper's words
def vtab_suite(fixed_suite):
    from tasks.vtab import VTAB_TASKS

    return fixed_suite(tasks=[f"vtab-{folder}" for folder in VTAB_TASKS])


def test_vtab_table_shows_the_papers_names_long_on_an_80_column_terminal(fixed_suite, tmp_path, capsys,
                                                                         monkeypatch):
    path = vtab_suite(fixed_suite)
    suite = load_suite(path)
    store = Store(tmp_path / "results")
    for task in suite.tasks:
        put(store, suite, "linear", task, [60.0, 62.0])
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["table", "--suite", path, "--results", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [h.strip() for h in out[0].split("|")[1:3]] == ["task", "linear"]  # long: tasks as rows
    rows = [line.split("|")[1].strip() for line in out[2:]]
    assert rows[:3] == ["Cifar", "Caltech101", "DTD"] and "sNORB-Elev" in rows and "Clevr-Count" in rows
    assert not any("vtab-" in line for line in out)
    monkeypatch.setenv("COLUMNS", "400")  # room enough: the paper's wide layout
    assert main(["table", "--suite", path, "--results", str(store.root)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split("|")[1].strip() == "method" and "Retinopathy" in header
    assert main(["table", "--suite", path, "--results", str(store.root), "--layout", "wide"]) == 0
    monkeypatch.setenv("COLUMNS", "80")
    assert capsys.readouterr().out.splitlines()[0].split("|")[1].strip() == "method"
    assert main(["table", "--suite", path, "--results", str(store.root), "--format", "csv"]) == 0
    assert "vtab-clevr_count," in capsys.readouterr().out  # csv keeps the registry's names


def test_an_empty_table_says_why_in_one_line(fixed_suite, tmp_path, capsys):
    path = vtab_suite(fixed_suite)
    assert main(["table", "--suite", path, "--results", str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"note: no final records for these 38 cells of suite tiny in {tmp_path / 'results'}/tiny"
                             " under the suite file's settings")


def test_a_partial_table_counts_its_cells(fixed_suite, tmp_path, capsys):
    path = fixed_suite()
    suite = load_suite(path)
    put(Store(tmp_path / "results"), suite, "linear", suite.tasks[0], [60.0, 61.0])
    assert main(["table", "--suite", path, "--results", str(tmp_path / "results"), "--epochs", "3"]) == 0
    assert "under --epochs 3" in capsys.readouterr().err
    assert main(["table", "--suite", path, "--results", str(tmp_path / "results")]) == 0
    cells = len(suite.methods) * len(suite.tasks)
    assert f"note: 1 of {cells} cells have final records" in capsys.readouterr().err


def test_data_root_on_the_demo_is_said_to_be_ignored(tmp_path, capsys):
    assert main(["status", "--suite", "demo", "--results", str(tmp_path), "--data-root", "/data"]) == 0
    assert "note: --data-root /data is ignored: the tasks of suite demo read no data files" in capsys.readouterr().err


def test_regress_on_a_folder_that_is_not_a_run_says_so():
    from harness.reports import _sides

    sides = dict(_sides({"baseline": {"run_id": "n1", "git": {}, "created": "2026-12-01"},
                         "run": {"run_id": None, "time": None, "git": {}, "folder": "results"}}))
    assert "None" not in sides["this run"] and "not a run" in sides["this run"]


def test_ls_methods_backbone_reads_a_counted_cost_without_torch(tmp_path):
    """A cost counted once (here: written as the first count would write it) is listed from the cache, in a fresh
    interpreter that imports neither torch nor timm."""
    import os

    from harness.api import METHODS
    from harness.cost_cache import cache_path, cost_key
    from harness.files import atomic_write_json

    spec = {"name": "vit_tiny_patch16_224", "weights": None}
    key = cost_key(METHODS.get("linear"), spec, 100, {}, None, True)
    atomic_write_json(cache_path(tmp_path, key), {"key": key, "cost": {"trainable": 0, "head": 19300,
                                                                       "total": 5543716, "flops": 2.5e9}})
    probe = ("import sys\nfrom harness.cli import main\n"
             "main(['ls', 'methods', 'linear', '--backbone', 'vit_tiny_patch16_224'])\n"
             f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HARNESS_CACHE_DIR=str(tmp_path)))
    row = next(line for line in done.stdout.splitlines() if line.startswith("linear"))
    assert "0.019" in row and "5.54" in row and "2.50" in row, done.stdout + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
