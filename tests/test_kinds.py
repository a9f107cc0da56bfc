"""The engine acts for the interface: a task's kind gives its model, loss, collate and evaluation
(:mod:`harness.kinds`) unless the task overrides a hook; an unknown kind is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness import kinds
from harness.api import TASKS, DataContext, Task
from harness.errors import HarnessError
from harness.segmentation import collate_lists

CTX = DataContext(data_root=None, cache_dir=Path("."))


class Tiny(Task):
    name, num_classes = "tiny", 2

    def dataset(self, split: str, ctx: DataContext, train: bool):  # pragma: no cover - never called
        raise AssertionError


def test_a_classification_task_gets_the_engines_loss_and_metric():
    model = nn.Linear(3, 2)
    images, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    loss, logs = kinds.objective(Tiny(), {"label_smoothing": 0.0}, CTX)(model, images, labels)
    assert torch.isclose(loss, nn.functional.cross_entropy(model(images), labels)) and logs == {}
    assert kinds.collate(Tiny(), True) is None
    found = kinds.evaluate(Tiny(), model, [(images, labels)], "cpu", CTX, amp=False)
    expected = 100.0 * float((model(images).argmax(1) == labels).float().mean())
    assert found == {"eval": pytest.approx(expected)}


def test_a_tasks_own_hook_replaces_its_kinds():
    class Scored(Tiny):
        def objective(self, train, ctx):
            return "own loss"

        def evaluate(self, model, loader, device, ctx, amp=True):
            return {"eval": 42.0}

    assert kinds.objective(Scored(), {}, CTX) == "own loss"
    assert kinds.evaluate(Scored(), nn.Linear(3, 2), [], "cpu", CTX) == {"eval": 42.0}


def test_a_segmentation_task_gets_the_segmentation_kind():
    task = TASKS.get("seg-voc")
    assert kinds.collate(task, True) is None and kinds.collate(task, False) is collate_lists


def test_an_unknown_kind_names_the_known_ones():
    class Detection(Tiny):
        kind = "detection"

    with pytest.raises(HarnessError, match="task tiny: unknown kind 'detection' .*classification, segmentation"):
        kinds.objective(Detection(), {}, CTX)
