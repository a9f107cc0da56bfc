"""Visual Prompt Tuning (Jia et al. 2022), deep and shallow, on timm ViTs (docs/protocol.md §4.1).

The ViT is not copied: :class:`methods.vpt_model.PromptedViT` calls the timm model's own ``patch_embed``,
``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks`` and ``norm`` and inserts the prompt tokens itself, as
official VPT's ``PromptedTransformer`` does:

* p prompt tokens go right after the prefix tokens (CLS, and any register tokens): ``[CLS, (reg), P, patches]``.
  Prompts get no position embedding (they are inserted after ``_pos_embed``).
* Shallow: inserted once, before the first block. Deep: before every block i >= 1 the p prompt outputs of block
  i-1 are *replaced* by the learned prompts of layer i (``deep_prompt_embeddings[i-1]``).
* Init uniform in +-sqrt(6 / (3 * patch_h * patch_w + d)) (0.0625 for ViT-B/16), patch size read from the backbone.
* Dropout on the prompt embeddings (0.1 deep, 0 shallow, as VPT's demo.ipynb).
* Output: the CLS token after the backbone's final norm, then a linear head.
* The backbone is frozen and kept in eval mode while training (official VPT); ``frozen_eval: false`` leaves
  dropout/drop-path of the frozen backbone on, as the TOAST repo's VPT baseline does.

Prompt length: ``prompt_length`` hyperparameter. Per-task defaults for the 19 VTAB-1k tasks come from
docs/protocol.md §4.1 (a reimplementation's VPT-deep table, consistent with VPT's demo.ipynb); the same table is used
for shallow, since VPT's own per-task shallow lengths are only in an external sheet. A registered VTAB task
(``vtab-<folder>``) gets its folder's length; FGVC tasks 100; others 10.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.api import BuildContext, Method, Task
from methods.common import freeze

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: VPT-deep prompt lengths on VTAB-1k, keyed by the VTAB-1k folder name (docs/protocol.md §4.1)
VTAB_PROMPT_LENGTH: dict[str, int] = {
    "cifar": 10, "caltech101": 10, "dtd": 10, "oxford_flowers102": 1, "oxford_iiit_pet": 1, "svhn": 50,
    "sun397": 5,
    "patch_camelyon": 100, "eurosat": 100, "resisc45": 10, "diabetic_retinopathy": 1,
    "clevr_count": 100, "clevr_dist": 200, "dmlab": 100, "kitti": 100, "dsprites_loc": 100, "dsprites_ori": 100,
    "smallnorb_azi": 200, "smallnorb_ele": 200,
}
#: default prompt length by task family when a task has no entry of its own
FAMILY_PROMPT_LENGTH: dict[str, int] = {"fgvc": 100}
DEFAULT_PROMPT_LENGTH = 10


def vtab_folder(task_name: str) -> str | None:
    """The VTAB-1k folder a registered VTAB task reads (``vtab-clevr_count`` -> ``clevr_count``), or None."""
    folder = task_name.removeprefix("vtab-")
    return folder if folder != task_name and folder in VTAB_PROMPT_LENGTH else None


def default_prompt_length(task: Task) -> int:
    folder = vtab_folder(task.name)
    if folder is not None:
        return VTAB_PROMPT_LENGTH[folder]
    return FAMILY_PROMPT_LENGTH.get(task.family, DEFAULT_PROMPT_LENGTH)


class _VPT(Method):
    family = "prompt"
    backbones = ("vit",)  # prompt tokens go between a ViT's tokens
    optimizer = "sgd"
    warmup_epochs = 10
    # docs/protocol.md §5.5 (VPT and TOAST tune_vtab.py); base lrs, scaled by batch/256 where the suite says so
    grid = {"lr": [5, 2.5, 1, 50, 25, 10, 0.5, 0.25, 0.1, 0.05], "weight_decay": [0.01, 0.001, 0.0001, 0.0]}
    deep: bool = True
    defaults: dict[str, Any] = {}
    hparam_keys = ("drop_path",)

    def defaults_for(self, task: Task) -> dict[str, Any]:
        return dict(self.defaults, prompt_length=default_prompt_length(task))

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        from methods.vpt_model import PromptedViT  # torch, only where a model is built

        hp = {**self.defaults, **ctx.hparams}
        freeze(backbone)
        return PromptedViT(backbone, num_classes, prompt_length=int(hp["prompt_length"]),
                           deep=self.deep, dropout=float(hp["prompt_dropout"]),
                           frozen_eval=bool(hp["frozen_eval"]))


class VPTDeep(_VPT):
    description = "frozen ViT; learned prompt tokens replaced before every block (VPT-deep) + linear head"
    group = "headline"
    deep = True
    defaults = {"prompt_length": DEFAULT_PROMPT_LENGTH, "prompt_dropout": 0.1, "frozen_eval": True}


class VPTShallow(_VPT):
    description = "frozen ViT; learned prompt tokens inserted once at the input (VPT-shallow) + linear head"
    group = "petl"
    deep = False
    defaults = {"prompt_length": DEFAULT_PROMPT_LENGTH, "prompt_dropout": 0.0, "frozen_eval": True}
