"""The suite-file schema: every typo, wrong type and unknown name is refused before anything runs, with file:line (or
the flag that caused it) and a did-you-mean; the shipped suites pass; ``harness ls suites --schema`` prints it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.api import TASKS, DataContext, Task
from harness.cli import main
from harness.errors import HarnessError
from harness.schema import SECTIONS
from harness.sweep import available_suites, load_suite, parse_set


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(HarnessError) as err:
        load_suite(str(path), **kwargs)
    return str(err.value)


# -- the typos of the issue ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "typo", "dotted", "suggestion"), [
    ({"grids": {"linaer": {"lr": [1.0, 0.1], "weight_decay": [0.0]}}}, "linaer:", "grids.linaer",
     "unknown method; did you mean: linear?"),
    ({"settings": {"vpt-deep": {"prompt_lenght": 4}}}, "prompt_lenght:", "settings.vpt-deep.prompt_lenght",
     "unknown hyperparameter of vpt-deep; did you mean: prompt_length?"),
    ({"slurm": {"partion": "gpu"}}, "partion:", "slurm.partion", "unknown key; did you mean: partition?"),
])
def test_reproduced_typos_exit_2_with_file_line_and_suggestion(make_suite, capsys, tmp_path, changes, typo, dotted,
                                                               suggestion):
    path = make_suite(**changes)
    results = tmp_path / "results"
    code, err = run_cli(capsys, "run", "--suite", str(path), "--results", str(results), "--dry-run")
    assert code == 2
    assert f"harness: error: {path}:{line_of(path, typo)}: {dotted}: {suggestion}" in err
    assert "Traceback" not in err
    assert not results.exists()  # refused before anything ran or was planned


def test_every_problem_is_reported_at_once_one_per_line(make_suite):
    path = make_suite(grids={"linaer": {"lr": [1.0]}}, slurm={"partion": "gpu"}, train={"epochs": 0})
    lines = refused(path).splitlines()
    assert len(lines) == 3
    assert [line.split(": ")[1] for line in lines] == ["train.epochs", "grids.linaer", "slurm.partion"]  # file order


# -- types and ranges ---------------------------------------------------------------------------------------------
def test_a_string_learning_rate_is_refused_with_the_yaml_hint(make_suite):
    path = make_suite(grids={"linear": {"lr": ["1e-3"], "weight_decay": [0.0]}})
    message = refused(path)
    assert f"{path}:{line_of(path, 'lr:')}: grids.linear.lr: expected a number > 0, got '1e-3'" in message
    assert "write 1.0e-3" in message


def test_a_string_learning_rate_in_fixed_is_refused(make_suite):
    path = make_suite(fixed={"finetune": {"*": {"lr": "fast"}}})
    assert "fixed.finetune.*.lr: expected a number > 0, got 'fast'" in refused(path)


@pytest.mark.parametrize("epochs", [0, -3])
def test_a_zero_or_negative_epoch_count_is_refused(make_suite, epochs):
    path = make_suite(train={"epochs": epochs})
    assert f"{path}:{line_of(path, 'epochs:')}: train.epochs: expected an integer > 0, got {epochs}" in refused(path)


def test_a_negative_learning_rate_in_a_grid_is_refused(make_suite):
    path = make_suite(grids={"linear": {"lr": [0.1, -0.5], "weight_decay": [0.0]}})
    assert "grids.linear.lr: expected a number > 0, got -0.5" in refused(path)


def test_a_negative_learning_rate_in_settings_is_refused(make_suite):
    path = make_suite(settings={"linear": {"per_task": {"demo-digits": {"lr": -1}}}})
    assert "settings.linear.per_task.demo-digits.lr: expected a number > 0, got -1" in refused(path)


def test_a_grid_axis_must_be_a_list(make_suite):
    path = make_suite(grids={"linear": {"lr": 0.1, "weight_decay": [0.0]}})
    assert "grids.linear.lr: expected a non-empty list of values, got 0.1" in refused(path)


def test_a_non_integer_seed_is_refused(make_suite):
    path = make_suite(protocol={"seeds": [42, 4.5]})
    assert f"{path}:{line_of(path, 'seeds:')}: protocol.seeds: expected a non-empty list of integers" in refused(path)


def test_a_hyperparameter_of_the_wrong_type_is_refused(make_suite):
    path = make_suite(settings={"vpt-deep": {"prompt_length": 2.5, "frozen_eval": "yes please"}})
    message = refused(path)
    assert "settings.vpt-deep.prompt_length: expected an integer, got 2.5" in message
    assert "settings.vpt-deep.frozen_eval: expected true/false, got 'yes please'" in message


# -- names --------------------------------------------------------------------------------------------------------
def test_an_unknown_task_under_fixed_is_refused_and_star_is_allowed(make_suite):
    path = make_suite(fixed={"linear": {"*": {"lr": 0.1}, "demo-digts": {"lr": 0.2}}})
    message = refused(path)
    assert f"{path}:{line_of(path, 'demo-digts:')}: fixed.linear.demo-digts: unknown task; did you mean: demo-digits" \
        in message
    assert "'*'" not in message and ".*:" not in message


def test_an_unknown_per_task_task_is_refused(make_suite):
    path = make_suite(settings={"linear": {"per_task": {"demo-positon": {"lr": 0.1}}}})
    assert (f"{path}:{line_of(path, 'demo-positon:')}: settings.linear.per_task.demo-positon: unknown task; "
            "did you mean: demo-position") in refused(path)


def test_unknown_task_and_method_names_in_the_lists_are_refused(make_suite):
    path = make_suite(tasks=["demo-digits", "demo-digts", "vtab-nothing*"], methods=["linear", "lora-deep"])
    message = refused(path)
    assert "tasks: unknown task 'demo-digts'; did you mean: demo-digits" in message
    assert "tasks: no task matches 'vtab-nothing*'" in message
    assert "methods: unknown method 'lora-deep'" in message


def test_unknown_keys_of_fixed_sections_are_refused(make_suite):
    path = make_suite(train={"warmup_epoch": 1}, protocol={"search": {"train": "train800", "eval": "val200",
                                                                        "sed": 1}},
                      executor={"workres": 2}, backbone={"name": "vit_tiny_patch16_224", "weigths": None})
    message = refused(path)
    assert "train.warmup_epoch: unknown key; did you mean: warmup_epochs" in message  # first of the close keys
    assert "protocol.search.sed: unknown key; did you mean: seed?" in message
    assert "executor.workres: unknown key; did you mean: workers?" in message
    assert "backbone.weigths: unknown key; did you mean: weights?" in message


def test_data_keys_are_the_engines_plus_the_tasks(make_suite):
    assert load_suite(str(make_suite(tasks=["vtab-dtd"], data={"image_size": 32, "preprocess": "vpt"})))
    path = make_suite(tasks=["vtab-dtd"], data={"image_size": 32, "prepocess": "vpt", "normalise": "imagenet"})
    message = refused(path)
    assert f"{path}:{line_of(path, 'prepocess:')}: data.prepocess: unknown key; did you mean: preprocess?" in message
    assert "data.normalise: unknown key; did you mean: normalize?" in message
    assert "data.normalize: expected one of backbone, imagenet, inception" in refused(
        make_suite(data={"normalize": "imagenette"}))


def test_a_task_that_declares_data_keys_gets_exactly_those():
    class Declared(Task):
        data_keys = ("crop",)

        def dataset(self, split: str, ctx: DataContext, train: bool):  # pragma: no cover - never called
            raise AssertionError

    class Undeclared(Task):
        def dataset(self, split: str, ctx: DataContext, train: bool):  # pragma: no cover - never called
            raise AssertionError

    assert tuple(Declared().data_keys) == ("crop",)
    assert tuple(Undeclared().data_keys) == ()  # no fallback: a task reads only what it declares
    # the list-file families declare theirs: VTAB adds preprocess to the list-file checks' keys, FGVC does not
    assert tuple(TASKS.get("vtab-dtd").data_keys) == ("strict_counts", "deep_sample", "preprocess")
    assert tuple(TASKS.get("fgvc-cub").data_keys) == ("strict_counts", "deep_sample")
    assert tuple(TASKS.get("demo-digits").data_keys) == ()


def test_a_key_only_another_family_reads_is_refused(make_suite):
    """preprocess is VTAB's: a suite of demo or FGVC tasks that sets it is refused, naming what its tasks read."""
    message = refused(make_suite(data={"image_size": 32, "preprocess": "vpt"}))
    assert "data.preprocess: unknown key" in message and "the suite's tasks read no others" in message
    message = refused(make_suite(tasks=["fgvc-cub"], data={"image_size": 32, "preprocess": "vpt"}))
    assert "data.preprocess: unknown key" in message and "the suite's tasks read: deep_sample, strict_counts" in message


def test_a_method_section_is_checked_against_the_keys_its_readers_declare(make_suite):
    path = make_suite(methods=["toast"], pretune={"epochs": 1, "var_loss_weigth": 0.1})
    message = refused(path)
    assert f"{path}:{line_of(path, 'var_loss_weigth:')}: pretune.var_loss_weigth: unknown key; " \
           "did you mean: var_loss_weight?" in message
    assert "pretune.epochs: expected an integer > 0, got -1" in refused(make_suite(pretune={"epochs": -1}))


def test_method_names_are_checked_without_importing_torch(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(textwrap.dedent("""\
        suite: plain
        tasks: [demo-digits]
        methods: [linar]
        backbone: {name: vit_tiny_patch16_224}
        train: {epochs: 1, batch_size: 8}
        protocol: {kind: search-then-final, search: {train: train800, eval: val200}, final: {train: a, eval: b},
                   seeds: [1]}
        """))
    code = ("import sys\nfrom harness.sweep import load_suite\ntry:\n    load_suite(sys.argv[1])\n"
            "except Exception as err:\n    print(err)\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert f"{path}:3: methods: unknown method 'linar'; did you mean: linear?" in out
    assert out.splitlines()[-1] == "False"


# -- --set ---------------------------------------------------------------------------------------------------------
def test_set_of_an_unknown_key_is_refused_naming_set(make_suite, capsys):
    code, err = run_cli(capsys, "run", "--suite", str(make_suite()), "--dry-run", "--set", "slurm.partion=x")
    assert code == 2
    assert "harness: error: --set: slurm.partion: unknown key; did you mean: partition?" in err


def test_set_of_an_unknown_method_and_a_bad_value_is_refused(make_suite):
    path = make_suite()
    assert "--set: grids.lienar: unknown method; did you mean: linear?" in refused(
        path, sets=parse_set(["grids.lienar.lr=[1.0]"]))
    assert "--set: grids.linear.lr: expected a number > 0, got -1.0" in refused(
        path, sets=parse_set(["grids.linear.lr=[-1.0]"]))
    assert "--epochs: train.epochs: expected an integer > 0, got 0" in refused(path, epochs=0)


def test_set_of_a_known_key_is_accepted(make_suite):
    suite = load_suite(str(make_suite()), sets=parse_set(["grids.linear.lr=[1.0]"]))
    assert suite.grid_for("linear")["lr"] == [1.0]
    assert suite.overrides == {"set": {"grids.linear.lr": [1.0]}}


def test_set_needs_a_dotted_key():
    with pytest.raises(HarnessError, match="expects a dotted key"):
        parse_set(["train..epochs=3"])


# -- the shipped suites and the printed schema -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vtab", "fgvc", "fgvc-search", "demo"])
def test_the_shipped_suites_validate(name):
    assert name in available_suites()
    suite = load_suite(name)
    assert suite.name == name and suite.tasks


#: a key of each section that the printed schema must show
SHOWN = {"suite": "suite:", "description": "description:", "tasks": "fnmatch patterns", "task_lists": "<list name>",
         "methods": "methods:", "backbone": "model_args", "data": "normalize", "train": "warmup_epochs",
         "protocol": "search.seed", "grids": "<method>.<hyperparameter>", "settings": "per_task",
         "fixed": "<method>.'*'", "executor": "checkpoint_every", "slurm": "partition",
         "flaky": "'<method>:<task>'", "pretune": "Method.section_keys", "log": "tensorboard, mlflow, wandb"}


def test_ls_suites_schema_prints_every_section_and_its_keys(capsys):
    assert set(SHOWN) == set(SECTIONS)
    assert main(["ls", "suites", "--schema"]) == 0
    out = capsys.readouterr().out
    for section, key in SHOWN.items():
        assert f"\n{section}: " in out, section
        assert key in out, (section, key)
    assert "epochs           integer > 0 " in out and "(required unless iters is given)" in out


def test_ls_suites_schema_does_not_import_torch():
    code = ("import sys\nfrom harness.cli import main\nassert main(['ls', 'suites', '--schema']) == 0\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert "slurm: mapping" in out
    assert out.splitlines()[-1] == "False"


def test_schema_flag_goes_with_suites(capsys):
    code, err = run_cli(capsys, "ls", "methods", "--schema")
    assert code == 2 and "--schema goes with 'harness ls suites'" in err
