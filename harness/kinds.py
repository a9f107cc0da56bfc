"""What the engine does for each kind of task (:attr:`harness.api.Task.kind`): how a method's model for the task is
built, its loss, its data loader's collate and its evaluation over a split.

:mod:`harness.api` only declares these hooks (``Task.build_model``, ``objective``, ``collate``, ``evaluate``); a
task that overrides one is asked first, and where it answers None (the interface's default) the engine uses its
kind's behaviour from :data:`KINDS`. So the interface imports nothing of the engine it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from harness import segmentation
from harness.api import BuildContext, DataContext, Method, Task
from harness.distributed import SINGLE, World
from harness.errors import HarnessError
from harness.loop import Objective, cross_entropy
from harness.loop import evaluate as evaluate_classification


@dataclass(frozen=True)
class TaskKind:
    """One kind of task's behaviour: each entry takes the task first."""

    build_model: Callable[[Method, Task, nn.Module, BuildContext], nn.Module]
    objective: Callable[[Task, dict[str, Any], DataContext], Objective]
    collate: Callable[[Task, bool], Callable | None]
    evaluate: Callable[..., dict[str, Any]]  # (task, model, loader, device, ctx, amp, world)


CLASSIFICATION = TaskKind(
    build_model=lambda method, task, backbone, ctx: method.build(backbone, task.num_classes, ctx),
    objective=lambda task, train, ctx: cross_entropy(float(train.get("label_smoothing", 0.0))),
    collate=lambda task, train: None,
    evaluate=lambda task, model, loader, device, ctx, amp=True, world=SINGLE: {
        "eval": evaluate_classification(model, loader, device, task.metric, task.num_classes, amp, world)},
)

SEGMENTATION = TaskKind(build_model=segmentation.build_segmentation, objective=segmentation.objective_for,
                    collate=segmentation.collate_for, evaluate=segmentation.evaluate_for)

#: kind name (a task's ``kind``) -> the engine's behaviour for it
KINDS: dict[str, TaskKind] = {"classification": CLASSIFICATION, "segmentation": SEGMENTATION}


def kind_of(task: Task) -> TaskKind:
    try:
        return KINDS[task.kind]
    except KeyError:
        raise HarnessError(f"task {task.name}: unknown kind {task.kind!r} (the engine knows "
                           f"{', '.join(sorted(KINDS))})") from None


def build_model(method: Method, task: Task, backbone: nn.Module, ctx: BuildContext) -> nn.Module:
    """The method's model for ``task``: the task's own ``build_model``, else its kind's."""
    own = task.build_model(method, backbone, ctx)
    return own if own is not None else kind_of(task).build_model(method, task, backbone, ctx)


def objective(task: Task, train: dict[str, Any], ctx: DataContext) -> Objective:
    """The loss for ``task`` under the suite's ``train`` section: the task's own, else its kind's."""
    own = task.objective(train, ctx)
    return own if own is not None else kind_of(task).objective(task, train, ctx)


def collate(task: Task, train: bool) -> Callable | None:
    """The data loader's ``collate_fn`` (None: torch's default stacking): the task's own, else its kind's."""
    own = task.collate(train)
    return own if own is not None else kind_of(task).collate(task, train)


def own_evaluation(task: Task) -> bool:
    """Whether ``task`` overrides the evaluation hook (the engine then cannot split it over ranks)."""
    return type(task).evaluate is not Task.evaluate


def evaluate(task: Task, model: nn.Module, loader: Any, device: str, ctx: DataContext,
             amp: bool = True, world: World = SINGLE) -> dict[str, Any]:
    """``{"eval": value, ...details}`` over a whole split: the task's own evaluation, else its kind's. With several
    ranks (``world``) ``loader`` is this rank's part of the split and the kind's evaluation combines the parts; a
    task's own evaluation is not split: the caller gives rank 0 the whole split and shares its numbers
    (:func:`own_evaluation`)."""
    own = task.evaluate(model, loader, device, ctx, amp)
    return own if own is not None else kind_of(task).evaluate(task, model, loader, device, ctx, amp, world)
