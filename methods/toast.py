"""TOAST: top-down attention steering around a frozen timm ViT (paper §3, §4.5, §4.6, §5; docs/protocol.md §3): the
registered methods. The model is :mod:`methods.toast_model`, its checkpoints :mod:`methods.toast_checkpoint`, and
the pre-tuning stage that makes the ``toast-pretuned`` artifact these methods need :mod:`methods.toast_pretune`.

Variants (class attributes, not hyperparameters: they define the method):

* ``feedback="early"`` (paper §5 "early feedback"): the first pass stops after the middle block; its raw output is
  selected and fed back into the blocks below it; the second pass runs the whole backbone. ~1.5x backbone FLOPs.
* ``feedback="late"``: the first pass runs whole; feedback from the top goes only into the upper half, so the lower
  half's output is computed once and shared by both passes. ~1.5x backbone FLOPs.
  (The compiled official variants name these the other way round: their ``early`` .pyc is ``feedback_to=6,
  feedback_from=12``, i.e. the paper's "late"; their ``hollow`` is the paper's "early". We follow the paper.)
* ablations (Table 8): ``toast-nopretune`` (random top-down module), ``toast-notoken`` (no token selection, so xi is
  unused and frozen), ``toast-nochannel`` (P and the feedback path frozen; xi and the head train).

Settings (hyperparameters with defaults; a sweep may override them):

* ``train_P`` (default True, the paper: "P ... task-specific parameters"; the official ``toast`` mode leaves P frozen
  because its name matches none of ``decoders``/``prompt``/``head``);
* ``v_bias_twice`` (the paper's ``W_V (X + X_td)`` is False; the official code computes ``qkv(td)`` with its bias, so
  b_v is added twice: True matches it). Default: what the loaded checkpoint was made with — True for an official TOAST
  file (its module was trained with the doubled bias; the two forwards differ by ~30% in logits), the recorded
  setting for the harness's own pre-tuned files, False without a checkpoint. An explicit value that contradicts the
  checkpoint is refused. The value applied is on the model as ``checkpoint_settings`` (recorded with the trial);
* ``frozen_eval`` (default True: the frozen backbone runs in eval mode, no drop-path; the official code leaves
  drop-path 0.1 on: set False);
* ``pretuned_backbone`` (optional, default ``check``): what to do with backbone keys inside a pre-tuned checkpoint
  (official ones carry their backbone): ``check`` refuses a file pre-tuned on other backbone weights, ``load`` uses
  the checkpoint's backbone weights, ``ignore`` skips them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import ArtifactRequest, BuildContext, Method
from harness.errors import HarnessError
from methods.common import freeze
from methods.toast_pretune import DEFAULTS as PRETUNE_DEFAULTS

# the model modules (torch, timm, peft) are imported where a model is built: reading records asks this module only
# its declarations (grid, defaults, version)
if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from methods.toast_model import TopDownViT

#: the feedback spans' names (their meaning: :func:`methods.toast_model.feedback_span`): whole, from the middle
#: block, into the upper half
FEEDBACK_KINDS = ("full", "early", "late")

#: docs/protocol.md §5.5: TOAST's ``tune_vtab.py --grid-search-type topdown``
TOAST_GRID = {"lr": [1.0, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}


class ToastMethod(Method):
    """TOAST (paper §3.2): frozen backbone; xi, P (setting), the feedback path and the head train."""

    family = "top-down"
    group = "headline"
    description = "top-down attention steering: xi, P and the feedback path train (pre-tuned init)"
    optimizer = "sgd"
    warmup_epochs = 10
    grid = TOAST_GRID
    #: v_bias_twice None: the checkpoint's setting (official files: True), False without one; see the module doc
    defaults = {"train_P": True, "v_bias_twice": None, "frozen_eval": True}
    #: ``seg_feedback``: the feedback span on segmentation tasks (default :attr:`seg_feedback`)
    hparam_keys = ("pretuned_backbone", "drop_path", "seg_feedback")
    hparam_choices = {"seg_feedback": FEEDBACK_KINDS}
    needs = ("toast-pretuned",)
    #: ViT (attention's V steered) and ConvNeXt (the convolutional module: :mod:`methods.toast_convnext`)
    backbones = ("vit", "convnext")
    suite_sections = ("pretune",)
    #: the first pass is cached where the task allows (harness/features.py); its content depends on the feedback
    #: span only, so every variant with the same span shares one cache
    frozen_features = "first-pass"
    #: the architecture (what pre-tuning must match) and what trains
    feedback = "full"
    token_selection = True
    pretuned = True
    train_feedback = True
    #: the feedback span on segmentation tasks: from the middle block (paper §4.4 and §5: "feedback from the middle
    #: layer instead of the last layer gives better performance"); ``seg_feedback: full`` selects the regular one
    seg_feedback = "early"

    def section_keys(self, section: str) -> dict[str, Any]:
        return dict(PRETUNE_DEFAULTS) if section == "pretune" else {}

    def check_stage(self, request: ArtifactRequest) -> Path | None:
        """Before the pre-tuning (:mod:`methods.toast_pretune`) is submitted as a job: its section and its data
        (the image folder holds class folders; or the task, its split and its data), and the file it will write
        (the one this method's trials look up, or ``--output``/``pretune.checkpoint``)."""
        from harness.api import TASKS
        from methods.toast_pretune import cache_key, default_path, pretune_architecture, section_of

        if request.sections.get("pretune") is None:
            raise HarnessError(f"method {self.name} needs a pre-tuned top-down module, but suite '{request.suite}' "
                               "has no pretune section: add `pretune: {image_folder: <ImageNet train folder>}` "
                               "(or `{task: <upstream task>}`)")
        cfg = section_of(request.sections["pretune"])
        if cfg["image_folder"]:
            root = Path(os.path.expanduser(str(cfg["image_folder"])))
            if not root.is_dir() or not any(entry.is_dir() for entry in os.scandir(root)):
                raise HarnessError(f"pretune.image_folder {root} is not a folder of class folders (expected "
                                   "<root>/<class>/<image> files)")
        elif cfg["task"]:
            task = TASKS.get(cfg["task"])
            if cfg["split"] not in task.splits:
                raise HarnessError(f"pretune.split: task {task.name} has splits {', '.join(task.splits)}, "
                                   f"not '{cfg['split']}'")
            problems = task.check(request.data, deep=False) if request.data is not None else []
            if problems:
                raise HarnessError(f"pretune.task {task.name}: its data is not ready: {'; '.join(problems)}")
        else:
            raise HarnessError("pretune: set 'task' (a registered task, e.g. demo-upstream) or 'image_folder'")
        if request.output:
            return Path(request.output)
        if cfg["checkpoint"]:
            return Path(os.path.expanduser(str(cfg["checkpoint"])))
        if request.data is None:
            return None
        return default_path(request.cache_dir, cache_key(request.backbone, cfg, pretune_architecture(self),
                                                         request.data))

    def make_model(self, backbone: nn.Module, num_classes: int, hparams: dict[str, Any],
                   feedback: str | None = None) -> TopDownViT:
        from methods.toast_convnext import is_convnext, make_convnext_model
        from methods.toast_model import TopDownViT

        hp = {**self.defaults, **hparams}
        freeze(backbone)
        if is_convnext(backbone):  # the convolutional top-down module (paper §4.4, Table 5)
            return make_convnext_model(self, backbone, num_classes, hp)
        return TopDownViT(backbone, num_classes, feedback=feedback or self.feedback,
                          token_selection=self.token_selection, v_bias_twice=bool(hp["v_bias_twice"]),
                          frozen_eval=bool(hp["frozen_eval"]))

    def build(self, backbone, num_classes: int, ctx: BuildContext) -> TopDownViT:
        """The model; with a pre-tuned module loaded (and its settings applied: ``model.checkpoint_settings``) unless
        the method starts from a random one or the build is for inspection only."""
        return self._build(backbone, num_classes, ctx)

    def _build(self, backbone, num_classes: int, ctx: BuildContext, feedback: str | None = None) -> TopDownViT:
        model = self.make_model(backbone, num_classes, ctx.hparams, feedback)
        if self.pretuned and not ctx.random_init:
            from methods.toast_checkpoint import load_top_down
            from methods.toast_model import TopDownViT

            path = source = ctx.resolve_artifact("toast-pretuned")
            if not isinstance(model, TopDownViT):  # the ConvNeXt module: official backbone keys renamed first
                from methods.toast_convnext import read_convnext_checkpoint

                source = read_convnext_checkpoint(path)
            report = load_top_down(model, source, str(ctx.hparams.get("pretuned_backbone", "check")),
                                   hparams=ctx.hparams, method=self.name or "toast")
            # a narrower span than the module was pre-tuned for uses the decoders of its own layers only
            if report.unexpected and (feedback or self.feedback) == self.feedback:
                warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
        self.set_trainable(model, {**self.defaults, **ctx.hparams})
        return model

    def build_segmentation(self, backbone: nn.Module, task, ctx: BuildContext) -> nn.Module:
        """The engine's segmentation model on the second pass's block outputs, with feedback from the middle block
        by default (``seg_feedback``; docs/protocol.md §9.4). The pre-tuned module's decoders of the fed-back
        layers are loaded; what trains is what :meth:`set_trainable` says, plus the decode heads."""
        from harness.api import segmentation_model

        kind = str(ctx.hparams.get("seg_feedback") or self.seg_feedback)
        if kind not in FEEDBACK_KINDS:
            raise HarnessError(f"{self.name}: seg_feedback {kind!r} is not one of {', '.join(FEEDBACK_KINDS)}")
        model = self._build(backbone, task.num_classes, ctx, feedback=kind)
        return segmentation_model(model, backbone, task, ctx, features=model.block_outputs)

    def set_trainable(self, model: TopDownViT, hp: dict[str, Any]) -> None:
        """xi (with token selection), P (``train_P``) and the feedback path (unless the variant freezes them) and
        the head train (:func:`methods.toast_model.train_top_down`)."""
        from methods.toast_model import train_top_down

        train_top_down(model, prompt=self.token_selection, transform=self.train_feedback and bool(hp["train_P"]),
                       feedback=self.train_feedback)


class ToastLite(ToastMethod):
    """TOAST-Lite (paper §4.5, docs/protocol.md §3.9): rank-4 LoRA on every feedback linear; the pre-tuned feedback
    weights stay frozen; xi, P and the head train."""

    description = "TOAST with rank-4 LoRA on the feedback path (merged per step); xi, P and the head train"
    backbones = ("vit",)  # LoRA on linear feedback layers; the ConvNeXt module's are convolutions
    #: 2: the feedback LoRA computed merged (W + s B A per step) instead of peft's per-token form;
    #: 3: A's and B's gradients computed through the rank (no d x d weight gradient)
    version = 3
    defaults = {**ToastMethod.defaults, "lora_rank": 4, "lora_alpha": 1.0}

    def set_trainable(self, model: TopDownViT, hp: dict[str, Any]) -> None:
        """The adapters go on the feedback path first; then TOAST's rule trains them instead of its weights."""
        from methods.toast_model import add_feedback_lora

        add_feedback_lora(model, int(hp["lora_rank"]), float(hp["lora_alpha"]))
        super().set_trainable(model, hp)


class ToastEarly(ToastMethod):
    description = "TOAST with early feedback: the first pass stops at the middle block (~1.5x backbone FLOPs)"
    group = "toast-variant"
    backbones = ("vit",)  # a middle block to feed back from
    feedback = "early"
    seg_feedback = "early"
    frozen_features = "first-pass-early"  # the first pass stops at the middle block


class ToastLate(ToastMethod):
    description = "TOAST with late feedback into the upper half only; the lower half is shared (~1.5x FLOPs)"
    group = "toast-variant"
    backbones = ("vit",)
    feedback = "late"
    seg_feedback = "late"
    frozen_features = "first-pass-late"  # shared: the lower half's output, computed once for both passes


class ToastNoPretune(ToastMethod):
    description = "ablation (Table 8): TOAST from a randomly initialised top-down module"
    group = "toast-variant"
    needs = ()
    suite_sections = ()
    pretuned = False


class ToastNoToken(ToastMethod):
    description = "ablation (Table 8): TOAST without token selection (xi unused)"
    group = "toast-variant"
    token_selection = False


class ToastNoChannel(ToastMethod):
    description = "ablation (Table 8): P and the feedback path frozen; xi and the head train"
    group = "toast-variant"
    train_feedback = False
