"""Methods and tasks from installed packages (issue 21 §3; docs/plugins.md): the package docs/plugins.md shows is
built in a temporary folder with a ``*.dist-info`` beside it (METADATA + entry_points.txt), which is what
``pip install`` leaves and what :mod:`importlib.metadata` reads, so no pip run is needed; it is then listed, run on a
suite end to end and named in its records. Broken and clashing plug-ins are one clear line."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
from records import FIXED

from harness.api import METHODS, TASKS
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def doc_files() -> dict[str, str]:
    """The files docs/plugins.md shows, by the ``<!-- file: PATH -->`` marker before each code block."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", text, re.S))


def entry_points_txt(pyproject: str) -> str:
    """entry_points.txt as pip writes it, from the ``[project.entry-points."GROUP"]`` tables of a pyproject."""
    import tomllib

    groups = tomllib.loads(pyproject)["project"]["entry-points"]
    return "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                   for group, eps in groups.items())


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(files, entry_points)``: a distribution my-petl 0.1.0 made of ``files`` (path -> source) and
    ``entry_points`` (entry_points.txt text), importable and visible to importlib.metadata for this test only; the
    registries are re-read and put back afterwards."""
    site = tmp_path / "site"

    def make(files: dict[str, str], entry_points: str) -> None:
        for rel, source in files.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(source)
        info = site / "my_petl-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-petl\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(entry_points)
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()

    for registry in (METHODS, TASKS):
        monkeypatch.setattr(registry, "_index", None)
        monkeypatch.setattr(registry, "_origins", {})
    yield make
    for registry in (METHODS, TASKS):  # built-ins loaded meanwhile stay (their modules are imported once)
        for name in registry._origins:
            registry._entries.pop(name, None)
    for module in [m for m in sys.modules if m.split(".")[0] in ("my_petl", "my_broken")]:
        del sys.modules[module]


def test_the_documented_plugin_runs_on_a_suite_and_its_records_name_it(install, fixed_suite, tmp_path, capsys):
    files = doc_files()
    install({"my_petl/__init__.py": files["my_petl/__init__.py"]}, entry_points_txt(files["pyproject.toml"]))

    assert main(["ls", "methods", "my-*"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"my-bitfit\s+plug-in \(my-petl 0\.1\.0\)", listed)
    assert "torch" not in listed and "my_petl" not in sys.modules  # listed from metadata and source alone

    suite = fixed_suite(methods=["my-bitfit", "linear"], tasks=["my-stripes"],
                        fixed={"my-bitfit": {"*": {"lr": 0.1, "weight_decay": 0.0}},
                               "linear": {"*": {"lr": 0.1, "weight_decay": 0.0}}},
                        protocol={**FIXED["protocol"], "seeds": [42]})
    assert main(["run", "--suite", suite, "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| my-bitfit\s+\|", table) and "my-stripes" in table

    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    records = {r["spec"]["method"]: r for r in records if "spec" in r}
    assert records["my-bitfit"]["status"] == "ok"
    assert records["my-bitfit"]["params"]["trainable"] > 0
    origin = {"distribution": "my-petl", "version": "0.1.0", "group": "harness.methods",
              "entry_point": "my-bitfit = my_petl:MyBitFit"}
    task = {"distribution": "my-petl", "version": "0.1.0", "group": "harness.tasks",
            "entry_point": "my-stripes = my_petl:Stripes"}
    assert records["my-bitfit"]["provenance"]["plugins"] == {"method": origin, "task": task}
    assert records["linear"]["provenance"]["plugins"] == {"task": task}  # a built-in method on the plug-in's task


def test_a_name_clash_with_a_built_in_names_both(install, capsys):
    install({"my_petl/__init__.py": "from harness.api import Method\n"},
            "[harness.methods]\nbitfit = my_petl:MyBitFit\n")
    assert main(["ls", "methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert ("method 'bitfit' of plug-in my-petl 0.1.0 (harness.methods: bitfit = my_petl:MyBitFit) clashes with "
            "the built-in methods.bitfit:BitFit") in err


def test_a_plugin_that_fails_to_import_is_one_line_and_breaks_nothing_else(install, make_suite, capsys):
    install({"my_broken/__init__.py": "raise ImportError('needs torch 9')\n"},
            "[harness.methods]\nbroken = my_broken:Nope\n")
    assert main(["ls", "methods"]) == 0  # listed (without its facts), every other method too
    listed = capsys.readouterr().out
    assert re.search(r"broken\s+plug-in \(my-petl 0\.1\.0\)", listed) and "bitfit" in listed

    assert main(["run", "--suite", str(make_suite()), "--methods", "broken", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert ("method 'broken' of plug-in my-petl 0.1.0 (harness.methods: broken = my_broken:Nope) failed to "
            "import: ImportError: needs torch 9") in err
    assert main(["run", "--suite", str(make_suite()), "--methods", "linear", "--dry-run"]) == 0
