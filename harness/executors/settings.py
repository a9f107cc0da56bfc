"""Job settings of the local and SLURM executors: the suite's ``slurm:`` and ``executor:`` sections (keys and
types from :mod:`harness.schema`), then the command line's flags, checked before anything is submitted."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError, did_you_mean
from harness.schema import CODE_CHECKS, EXECUTOR_KEYS, SLURM_KEYS
from harness.sweep import Suite

DEFAULT_TIME_MIN = 240

#: command-line flag (argparse dest) -> JobSettings field
FLAGS = ("partition", "account", "qos", "time", "gpus", "cpus", "mem_gb", "array_parallelism", "workers",
         "code_check", "devices", "nodes")


@dataclass
class JobSettings:
    """Resources and behaviour of local/SLURM jobs: the suite's ``slurm:``/``executor:`` sections, then flags."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None  # minutes; None: DEFAULT_TIME_MIN on SLURM, a week locally
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int | None = None
    max_timeouts: int = 3
    workers: int | None = None
    checkpoint_every: int = 1
    code_check: str = "refuse"
    #: a data-parallel trial: processes (SLURM tasks) per node, one GPU each when the job has GPUs, on ``nodes``
    devices: int = 1
    nodes: int = 1

    @property
    def time_min(self) -> int:
        return self.time if self.time is not None else DEFAULT_TIME_MIN

    def signal_delay(self) -> int:
        """Seconds before the time limit at which SLURM sends USR2. SLURM checks limits every 30 s and signals when
        at most ``delay + 30`` s remain, so the limit must exceed that or the signal fires at once."""
        total = self.time_min * 60
        delay = self.signal_delay_s if self.signal_delay_s is not None else min(90, max(10, total // 4))
        if total <= delay + 30:
            raise HarnessError(f"--time {self.time_min} min is too short for a {delay} s pre-timeout signal "
                               f"(SLURM sends it when <= {delay + 30} s remain): raise --time or lower "
                               "slurm.signal_delay_s")
        return delay


def parse_sbatch(items: list[str]) -> dict[str, Any]:
    """``--sbatch KEY=VALUE`` items as submitit's ``slurm_additional_parameters`` (``hold`` or ``hold=true``: a bare
    flag; ``KEY=false`` drops it). Values stay strings (``01:00:00`` must not become a number)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise HarnessError(f"--sbatch expects KEY=VALUE (e.g. gres=gpu:1 or hold=true), got '{item}'")
        if not sep or value.strip().lower() == "true":
            out[key] = True
        elif value.strip().lower() == "false":
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _section(suite: Suite, name: str, keys: dict[str, Any]) -> dict[str, Any]:
    """A suite section checked against its keys and types: an unknown key or a wrong type names file and line."""
    section = dict(suite.raw.get(name) or {})
    for key, value in section.items():
        if key not in keys:
            raise HarnessError(f"{suite.line_of(name, key)}: {name}.{key}: unknown key{did_you_mean(key, keys)} "
                               f"(known: {', '.join(keys)})")
        kind = keys[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            raise HarnessError(f"{suite.line_of(name, key)}: {name}.{key}: expected {getattr(kind, '__name__', kind)}"
                               f", got {value!r}")
    return section


def settings_from(suite: Suite, args: argparse.Namespace) -> JobSettings:
    """The suite's ``slurm:`` and ``executor:`` sections, overridden by the command line."""
    merged: dict[str, Any] = {**_section(suite, "slurm", SLURM_KEYS), **_section(suite, "executor", EXECUTOR_KEYS)}
    merged["sbatch"] = {str(k): v for k, v in (merged.get("sbatch") or {}).items()}
    merged["setup"] = [str(line) for line in merged.get("setup") or []]
    for name in FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            merged[name] = value
    merged["sbatch"].update(parse_sbatch(getattr(args, "sbatch", None) or []))
    merged["setup"] += list(getattr(args, "setup", None) or [])
    settings = JobSettings(**{k: v for k, v in merged.items() if v is not None})
    if settings.code_check not in CODE_CHECKS:
        raise HarnessError(f"code_check: expected one of {', '.join(CODE_CHECKS)}, got '{settings.code_check}'")
    for name in ("time", "cpus", "workers", "array_parallelism", "checkpoint_every", "devices", "nodes"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise HarnessError(f"{name.replace('_', '-')}: expected a positive integer, got {value}")
    return settings
