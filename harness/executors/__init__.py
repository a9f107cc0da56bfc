"""Where cells run: the executor registry and the contract every executor keeps.

An executor is called as ``executor(suite, cells, store, env, args, total_pending=None) -> int`` and runs whole
cells through :func:`harness.runner.run_cell`, so each trial lands as its own record and a restarted cell resumes
at its first missing trial. Which trials a cell still needs, and whether it is finished, comes from
:func:`harness.plan.cell_state` alone.

Exit code: ``0`` when every selected cell is complete (its final trials all have records), ``1`` when a trial failed
or a cell could not finish (e.g. every search trial diverged: no winner to retrain). An executor that only submits
(``returns_before_done``, i.e. SLURM) returns 0 once its jobs are queued, and 1 only for cells it already knows can
never finish.

=========  ====================================  ==================================================================
name       module                                what it does
=========  ====================================  ==================================================================
inline     :mod:`harness.executors.inline`       runs the cells in this process, one after another
local      :mod:`harness.executors.local`        runs cells as submitit worker processes on this machine; waits
slurm      :mod:`harness.executors.slurm`        submits cells as SLURM job arrays and returns
=========  ====================================  ==================================================================

Entries are lazy (``"module:function"``): listing executors or running inline never imports submitit. The other
modules: :mod:`~harness.executors.settings` (job resources), :mod:`~harness.executors.code` (code identity and the
check at job start), :mod:`~harness.executors.job` (the checkpointable job callable),
:mod:`~harness.executors.ledger` (what was submitted), :mod:`~harness.executors.queue` (what the queue says),
:mod:`~harness.executors.status` (records merged with jobs, for ``harness status``) and
:mod:`~harness.executors.report` (the nightly report as a job after the night's arrays) and
:mod:`~harness.executors.stage` (``harness pretune --executor slurm``: a method's stage as one SLURM job).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from harness.plan import Cell, CellState
    from harness.store import Store
    from harness.sweep import Suite
    from harness.train import TrialEnv

#: every selected cell is complete
EXIT_COMPLETE = 0
#: a trial failed, or a cell could not finish
EXIT_UNFINISHED = 1


class Executor(Protocol):
    """The executor signature. ``total_pending`` (trials still to run, from the plan) sizes progress bars."""

    returns_before_done: bool

    def __call__(self, suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
                 total_pending: int | None = None) -> int: ...


@dataclass(frozen=True)
class LazyExecutor:
    """A registry entry: the executor's function as ``"module:function"``, imported on first call."""

    name: str
    target: str
    help: str
    #: True when the executor submits and returns before the trials ran (`harness run` then prints no table)
    returns_before_done: bool = False

    def load(self) -> Callable[..., int]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)

    def __call__(self, suite: Suite, cells: list[Cell], store: Store, env: TrialEnv, args: argparse.Namespace,
                 total_pending: int | None = None) -> int:
        return self.load()(suite, cells, store, env, args, total_pending=total_pending)


EXECUTORS: dict[str, LazyExecutor] = {entry.name: entry for entry in (
    LazyExecutor("inline", "harness.executors.inline:run_inline", "this process, one cell after another; waits"),
    LazyExecutor("local", "harness.executors.local:run_local", "parallel worker processes on this machine; waits"),
    LazyExecutor("slurm", "harness.executors.slurm:run_slurm", "SLURM job arrays; submits and returns",
                 returns_before_done=True),
)}


def unfinished(state: CellState) -> str | None:
    """Why a cell is not complete, as one line starting with its state word (``failed``/``no result``/``not
    finished``); None when it is complete. Executors print these after running, so the user sees every cell that
    makes the exit code 1."""
    if state.complete:
        return None
    key = state.cell.key
    if state.failed_records:
        err = state.failed_records[0]["error"]
        return (f"not finished: {key}: {len(state.failed_records)} failed trial(s) (recorded as failed; rerun to "
                f"retry), e.g. {err['type']}: {err['message']}")
    if state.dead_end:
        return f"no result: {key}: {state.blocked}"
    return f"not finished: {key}: {state.blocked or 'final trials missing'}"
