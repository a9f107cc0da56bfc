"""The suite-file schema, in one place: every section, every key, its type and what it means.

:data:`SECTIONS` describes a suite file (``sweeps/<suite>.yaml``) section by section. Sections with fixed keys
(backbone, data, train, protocol, executor, slurm) list them here with their types and bounds; sections keyed by
names (grids, settings, fixed) or whose keys come from plug-ins (``pretune``: the methods that read it) say their
layout here, and :mod:`harness.validation` checks those names against the registries. ``harness ls suites
--schema`` prints this module's description (:func:`describe`). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from harness.errors import did_you_mean

Kind = type | tuple[type, ...]
#: a problem found in a suite: the dotted key it is about (as a tuple) and what is wrong
SuiteProblem = tuple[tuple[str, ...], str]

NUMBER: tuple[type, ...] = (int, float)
PROTOCOL_KINDS = ("search-then-final", "fixed")
LR_SCALINGS = ("none", "batch/256")
SCHEDULES = ("cosine", "poly")
OPTIMIZER_KINDS = ("method", "adamw", "sgd")
NORMALIZATIONS = ("backbone", "imagenet", "inception")
CODE_CHECKS = ("refuse", "warn")


@dataclass(frozen=True)
class Key:
    """One key of a suite file: its type, a one-line meaning, and the values it may take."""

    kind: Kind
    meaning: str
    required: bool = False
    nullable: bool = False
    choices: tuple[Any, ...] = ()
    #: numbers: at least this (inclusive); ``positive``: strictly above 0
    minimum: float | None = None
    positive: bool = False
    #: lists: the type of every element, and whether an empty list is refused
    items: Kind | None = None
    nonempty: bool = False
    #: mappings with fixed keys (e.g. protocol.search)
    keys: dict[str, Key] | None = None
    #: mappings keyed by names (methods, tasks): their layout, for the printed schema only
    #: ((pattern, type, meaning), ...); the names are checked in harness.sweep against the registries
    entries: tuple[tuple[str, str, str], ...] = ()
    #: what else the mapping accepts besides ``keys`` (printed)
    note: str = ""
    #: a section whose keys are declared by the methods that read it (``Method.suite_sections``)
    from_methods: bool = False

    def describe(self) -> str:
        """The type as a reader would say it: 'integer > 0', 'list of integers', 'one of a | b'."""
        if self.choices:
            text = "one of " + " | ".join(str(c) for c in self.choices)
        else:
            text = type_name(self.kind)
            if self.items is not None:
                text = f"{'non-empty ' if self.nonempty else ''}list of {type_name(self.items, plural=True)}"
            elif self.nonempty:
                text = f"non-empty {text}"
            if self.positive:
                text += " > 0"
            elif self.minimum is not None:
                text += f" >= {self.minimum:g}"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this key (its own type and bounds, not nested keys), or None."""
        expected = _article(self.describe())
        if value is None:
            return None if self.nullable else f"expected {expected}, got null"
        if not is_a(value, self.kind):
            return f"expected {expected}, got {value!r}{_yaml_hint(value, self.kind)}"
        if self.choices and value not in self.choices:
            return f"expected one of {', '.join(str(c) for c in self.choices)}, got {value!r}"
        if is_a(value, NUMBER) and not isinstance(value, bool):
            # written as `not (x > 0)` so that NaN is refused too
            if self.positive and not value > 0 or self.minimum is not None and not value >= self.minimum:
                return f"expected {expected}, got {value!r}"
        if isinstance(value, list):
            if self.nonempty and not value:
                return f"expected {expected}, got an empty list"
            bad = [v for v in value if self.items is not None and not is_a(v, self.items)]
            if bad:
                return f"expected {expected}, got {bad[0]!r}{_yaml_hint(bad[0], self.items)} in {value!r}"
        return None


#: "no example value known" for :func:`key_for` (None is a value: a default of None)
NO_DEFAULT: Any = object()


def is_a(value: Any, kind: Kind) -> bool:
    """``isinstance``, except that a boolean is not a number (YAML's ``yes`` must not pass for an epoch count)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _article(text: str) -> str:
    if text.startswith(("one of", "true/false")):
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def type_name(kind: Kind, plural: bool = False) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "numbers" if plural else "number"
    names = {bool: "true/false", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    words = [names.get(k, k.__name__) for k in kinds]
    if plural:
        words = [w if w == "true/false" else w + "s" for w in words]
    return " or ".join(words)


def _yaml_hint(value: Any, kind: Kind) -> str:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string: say so when a number was meant."""
    if isinstance(value, str) and is_a(1.0, kind):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string: YAML reads numbers like 1e-3 as text; write 1.0e-3)"
    return ""


# -- keys whose meaning is the same wherever they appear (hyperparameters, a method's own section) ----------------
COMMON_KEYS: dict[str, Key] = {
    "lr": Key(NUMBER, "base learning rate", positive=True),
    "min_lr": Key(NUMBER, "the lowest learning rate of the schedule", minimum=0),
    "weight_decay": Key(NUMBER, "weight decay", minimum=0),
    "drop_path": Key(NUMBER, "drop-path rate in the backbone", minimum=0),
    "epochs": Key(int, "training epochs", positive=True),
    "batch_size": Key(int, "batch size", positive=True),
    "warmup_epochs": Key(int, "linear warm-up epochs", minimum=0),
    "cooldown_epochs": Key(int, "epochs at the lowest learning rate at the end", minimum=0),
    "num_workers": Key(int, "data-loading worker processes", minimum=0),
    "seed": Key(int, "random seed"),
}


def key_for(name: str, example: Any = NO_DEFAULT) -> Key | None:
    """The rule for a key known only by its name and, maybe, an example value (a method's default, a grid value, a
    section default): the common rule for its name, else the example's type; None when nothing is known (no
    check). A default of None makes null acceptable."""
    if name in COMMON_KEYS:
        return replace(COMMON_KEYS[name], nullable=True) if example is None else COMMON_KEYS[name]
    for kind, as_kind in ((bool, bool), (int, int), (float, NUMBER), (str, str), (list, list), (dict, dict)):
        if isinstance(example, kind):
            return Key(as_kind, "")
    return None


def check_mapping(keys: dict[str, Key], value: dict[str, Any], path: tuple[str, ...],
                  extra: Collection[str] = (), extra_note: str = "") -> list[SuiteProblem]:
    """Problems of a mapping with fixed ``keys`` (recursively): unknown keys with a did-you-mean, missing required
    keys, wrong types and bounds. Keys in ``extra`` are accepted without a check (e.g. the tasks' data keys)."""
    problems: list[SuiteProblem] = []
    for name, item in value.items():
        where = (*path, str(name))
        if name not in keys:
            if name in extra:
                continue
            suggestion = did_you_mean(str(name), [*keys, *sorted(extra)])
            problems.append((where, f"unknown key{suggestion} (known: {', '.join(keys)}{extra_note})"))
            continue
        problems += check_key(keys[name], item, where)
    for name, key in keys.items():
        if key.required and name not in value:
            problems.append((path, f"missing required key '{name}' ({key.meaning})"))
    return problems


def check_key(key: Key, value: Any, path: tuple[str, ...]) -> list[SuiteProblem]:
    message = key.check(value)
    if message:
        return [(path, message)]
    if key.keys is not None and isinstance(value, dict):
        return check_mapping(key.keys, value, path)
    return []


# -- the sections -------------------------------------------------------------------------------------------------
BACKBONE_KEYS: dict[str, Key] = {
    "name": Key(str, "timm model name, e.g. vit_base_patch16_224.augreg_in1k", required=True),
    "model_args": Key(dict, "extra timm.create_model arguments (img_size, patch_size, depth, ...)", nullable=True),
    "weights": Key(str, "timm (its own pretrained weights) | none | a local .pth/.safetensors/.npz | "
                        "artifact:<name>", nullable=True),
}
#: the engine's keys of ``data:``; tasks add theirs (``Task.data_keys``)
DATA_KEYS: dict[str, Key] = {
    "root": Key(str, "where the suite's datasets live (or --data-root); not part of a trial", nullable=True),
    "roots": Key(dict, "task name -> that task's own folder, over root; not part of a trial", nullable=True),
    "image_size": Key(int, "input size in pixels (default 224)", positive=True),
    "normalize": Key(str, "input mean/std: the backbone's own pretrained config, or forced", choices=NORMALIZATIONS),
}
TRAIN: dict[str, Key] = {
    "epochs": Key(int, "training epochs per trial (required unless iters is given)", positive=True),
    "iters": Key((int, dict), "an iteration budget instead of epochs: optimiser steps per trial (or task -> steps), "
                              "schedule per step, one evaluation at the end"),
    "warmup_iters": Key(int, "linear warm-up steps with iters (default 0)", minimum=0),
    "schedule": Key(str, "learning-rate schedule after warm-up (default cosine)", choices=SCHEDULES),
    "poly_power": Key(NUMBER, "poly schedule: (1 - step/iters)^power (default 1.0)", positive=True),
    "warmup_ratio": Key(NUMBER, "poly schedule: the lr factor warm-up starts from (default 1e-6)", minimum=0),
    "optimizer": Key(str, "the optimiser for every method (default method: each method's own)",
                     choices=OPTIMIZER_KINDS),
    "no_decay": Key(list, "no weight decay on parameters whose name contains one of these (default: each "
                          "method's rule)", items=str),
    "batch_size": Key(int, "training batch size", required=True, positive=True),
    "eval_batch_size": Key(int, "evaluation batch size (default: 2 x batch_size)", positive=True),
    "lr_scaling": Key(str, "learning rate = base lr (none) or base lr x batch_size / 256", choices=LR_SCALINGS),
    "warmup_epochs": Key(int, "linear warm-up epochs (default: each method's official value)", minimum=0),
    "lr_step": Key(str, "with epochs: the schedule moves once per epoch (default, as VPT's code) or after every "
                        "optimiser step (a warm-up then ramps within its epochs)", choices=("epoch", "step")),
    "eval_every": Key(int, "with epochs: score the evaluation split after every N-th epoch and the last (default 1: "
                           "the per-epoch curve; the reported metric is the last epoch's either way)", positive=True),
    "num_workers": Key(int, "data-loading worker processes (CUDA only: none on the CPU; capped at the CPUs)",
                       minimum=0),
    "label_smoothing": Key(NUMBER, "label smoothing of the cross-entropy (default 0)", minimum=0),
    "amp": Key(bool, "mixed precision on GPUs (default true)"),
    "feature_cache": Key(bool, "cache the frozen part's outputs where exact (the linear probe's features, TOAST's "
                               "first pass, on deterministic tasks; default true)"),
    "feature_cache_dtype": Key(str, "how cached frozen outputs are stored (default float32: exact; float16 halves "
                                    "the disk)", choices=("float32", "float16")),
    "decoded_cache": Key(bool, "keep deterministic inputs decoded (uint8 at the input size, memory-mapped) and "
                               "normalise them on the device: VTAB-1k and the demo, every task's evaluation splits "
                               "(default true; the same numbers either way)"),
    "compile": Key(bool, "torch.compile the model a trial fits (default false; first steps pay the compilation)"),
    "fused_optimizer": Key(bool, "fused AdamW/SGD kernels on CUDA (default false; ignored on the CPU)"),
}
#: keys of a suite's ``train:`` section, with their types
TRAIN_KEYS: dict[str, Kind] = {name: key.kind for name, key in TRAIN.items()}
PROTOCOL: dict[str, Key] = {
    "kind": Key(str, "search a grid then retrain the winner, or train fixed hyperparameters once",
                required=True, choices=PROTOCOL_KINDS),
    "search": Key(dict, "the search stage (search-then-final)", keys={
        "train": Key(str, "split trained on", required=True),
        "eval": Key(str, "split scored on (validation; never the test set)", required=True),
        "seed": Key(int, "seed of every search trial (default: the first of seeds)"),
    }),
    "final": Key(dict, "the final stage", required=True, keys={
        "train": Key(str, "split trained on", required=True),
        "eval": Key(str, "split reported (last-epoch metric)", required=True),
    }),
    "seeds": Key(list, "seeds of the final trials (--seeds N keeps the first N)", required=True, items=int,
                 nonempty=True),
}
SLURM: dict[str, Key] = {
    "partition": Key(str, "SLURM partition", nullable=True),
    "account": Key(str, "SLURM account", nullable=True),
    "qos": Key(str, "SLURM quality of service", nullable=True),
    "time": Key(int, "minutes per job (default 240; locally a week)", nullable=True, positive=True),
    "gpus": Key(int, "GPUs per job", nullable=True, minimum=0),
    "cpus": Key(int, "CPUs per job", nullable=True, positive=True),
    "mem_gb": Key(NUMBER, "memory per job in GB", nullable=True, positive=True),
    "array_parallelism": Key(int, "array tasks running at once (default 256)", nullable=True, positive=True),
    "sbatch": Key(dict, "extra sbatch options, e.g. {constraint: a100}", nullable=True),
    "setup": Key(list, "shell lines run before each job, e.g. module load", nullable=True),
    "signal_delay_s": Key(int, "seconds before the time limit at which jobs checkpoint and requeue",
                          nullable=True, minimum=0),
    "max_timeouts": Key(int, "requeues after a timeout before a job gives up (default 3)", nullable=True,
                        minimum=0),
}
EXECUTOR: dict[str, Key] = {
    "workers": Key(int, "local executor: cells run at once (default: half the CPUs)", nullable=True, positive=True),
    "checkpoint_every": Key(int, "epochs between checkpoints of a running trial (default 1)", nullable=True,
                            positive=True),
    "code_check": Key(str, "a job finding other code than was submitted: refuse to run, or warn", nullable=True,
                      choices=CODE_CHECKS),
    "devices": Key(int, "processes per trial on each node, one per GPU (data-parallel trials; default 1; "
                        "--devices)", nullable=True, positive=True),
    "nodes": Key(int, "nodes per trial under SLURM (default 1; --nodes)", nullable=True, positive=True),
}
#: keys of a suite's ``slurm:`` section, with their types
SLURM_KEYS: dict[str, Kind] = {name: key.kind for name, key in SLURM.items()}
#: keys of a suite's ``executor:`` section (settings shared by the local and SLURM executors)
EXECUTOR_KEYS: dict[str, Kind] = {name: key.kind for name, key in EXECUTOR.items()}

#: every top-level section of a suite file
SECTIONS: dict[str, Key] = {
    "suite": Key(str, "the suite's name: records and tables are filed under it", required=True),
    "description": Key(str, "one line, shown by `harness ls suites`"),
    "tasks": Key(list, "the suite's tasks: names or fnmatch patterns (`harness ls tasks`)", required=True,
                 items=str, nonempty=True),
    "task_lists": Key(dict, "named task lists that --tasks expands", entries=(
        ("<list name>", "list of strings", "task names or fnmatch patterns"),)),
    "methods": Key(list, "the methods run by default: names or fnmatch patterns (`harness ls methods`)",
                   required=True, items=str),
    "backbone": Key(dict, "the pretrained model every method wraps", required=True, keys=BACKBONE_KEYS),
    "data": Key(dict, "where the data lives and how it is read", keys=DATA_KEYS,
                note="plus the keys the suite's tasks read (Task.data_keys of each task in tasks and task_lists)"),
    "train": Key(dict, "the training budget, the same for every method", required=True, keys=TRAIN),
    "protocol": Key(dict, "how trials are chosen and what is reported", required=True, keys=PROTOCOL),
    "grids": Key(dict, "per-method search grids: each axis given replaces that axis of the method's default grid",
                 entries=(("<method>.<hyperparameter>", "non-empty list", "the values searched"),)),
    "settings": Key(dict, "per-method fixed hyperparameters, over the method's defaults", entries=(
        ("<method>.<hyperparameter>", "value", "for every task"),
        ("<method>.per_task.<task>.<hyperparameter>", "value", "for one task, over the line above"),
    )),
    "fixed": Key(dict, "the hyperparameters of each cell of a 'fixed' protocol", entries=(
        ("<method>.<task>.<hyperparameter>", "value", "for one task"),
        ("<method>.'*'.<hyperparameter>", "value", "for every task without its own entry"),
    )),
    "executor": Key(dict, "settings shared by the local and SLURM executors", keys=EXECUTOR),
    "log": Key(list, "experiment trackers every trial also logs to: tensorboard, mlflow, wandb (`run --log` adds)",
               items=str),
    "slurm": Key(dict, "SLURM resources (command-line flags override them)", keys=SLURM),
    "flaky": Key(list, "cells whose regressions `harness regress` reports but never fails on", nullable=True,
                 items=(str, dict), entries=(
                     ("- '<method>:<task>'", "string", "one cell (or <method>/<task>); fnmatch wildcards allowed"),
                     ("- {method: M, task: T}", "mapping", "the same as a mapping"),)),
    "pretune": Key(dict, "a stage some methods run before tuning; copied into those methods' trial specs",
                   from_methods=True, entries=(
                       ("<key>", "per method", "the keys the methods that read this section declare "
                                               "(Method.suite_sections, Method.section_keys)"),)),
}


def flaky_pair(entry: Any) -> tuple[str, str] | None:
    """A ``flaky:`` entry as (method pattern, task pattern): ``'lora:demo-digits'``, ``'lora/demo-digits'`` or
    ``{method: lora, task: demo-digits}``; None when it is none of these."""
    if isinstance(entry, dict) and set(entry) == {"method", "task"} and all(isinstance(v, str) for v in entry.values()):
        return entry["method"], entry["task"]
    if isinstance(entry, str):
        for sep in (":", "/"):
            method, found, task = entry.partition(sep)
            if found and method.strip() and task.strip():
                return method.strip(), task.strip()
    return None


@dataclass
class _Rows:
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add_keys(self, keys: dict[str, Key], prefix: str = "") -> None:
        for name, key in keys.items():
            self.rows.append((f"{prefix}{name}", key.describe() + (", required" if key.required else ""),
                              key.meaning))
            if key.keys:
                self.add_keys(key.keys, f"{prefix}{name}.")


def describe() -> str:
    """The schema as text: each section, its keys with their types and meanings (``harness ls suites --schema``)."""
    lines = ["Suite files (sweeps/<suite>.yaml) are checked whole against this schema before anything runs: an",
             "unknown section, key, method, task or hyperparameter, or a wrong type, is an error naming file:line",
             "(or --set) with a did-you-mean. The hyperparameters a method accepts: lr, weight_decay, its grid axes,",
             "its defaults and its hparam_keys (Method.accepted_hparams). Names of methods and tasks are written",
             "<method> and <task> below (`harness ls methods`, `harness ls tasks`).", ""]
    for name, section in SECTIONS.items():
        lines.append(f"{name}: {section.describe()}{', required' if section.required else ''}")
        lines.append(f"    {section.meaning}")
        table = _Rows()
        if section.keys:
            table.add_keys(section.keys)
        table.rows += list(section.entries)
        width = max((len(r[0]) for r in table.rows), default=0)
        kind_width = max((len(r[1]) for r in table.rows), default=0)
        for key, kind, meaning in table.rows:
            lines.append(f"    {key:<{width}}  {kind:<{kind_width}}  {meaning}".rstrip())
        if section.note:
            lines.append(f"    {section.note}")
        lines.append("")
    lines.append("Keys with one meaning wherever they appear (hyperparameters; sections a method reads, e.g. pretune):")
    width = max(len(k) for k in COMMON_KEYS)
    for name, key in COMMON_KEYS.items():
        lines.append(f"    {name:<{width}}  {key.describe():<14}  {key.meaning}")
    lines.append("    any other: the type of its default value (the method's default, or the section's)")
    return "\n".join(lines)
