"""PETL baselines that the peft library implements, as one generic method: a name maps to a peft config class and
that config's published defaults; nothing of the methods is written here (docs/protocol.md §4.5).

Each class below only declares: ``peft_config`` (the peft config class), ``defaults`` (the config's keyword
arguments, under peft's own names, so a suite or ``--set`` overrides any of them: ``--set settings.lokr.r=8``), and the usual
optimiser and grid. :class:`PeftMethod.build` freezes the timm backbone, wraps it with ``peft.get_peft_model`` and
leaves exactly the tuner's own parameters trainable (peft's ``prefix`` of the tuner: ``lora_``, ``ia3_``,
``vera_lambda_``, ``hada_``, ``lokr_``, ``oft_``), plus the task head. The frozen weights are never merged, so they
stay bit-identical; the backbone runs in eval mode while training except an adapter's own dropout
(``lora_dropout``, ``vera_dropout``; the adapted layers themselves where LyCORIS's ``module_dropout`` or
``rank_dropout`` is set, since those check the layer's own mode).

Target modules on timm ViTs (fused ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) follow each method's
paper, or peft's own guide where the paper targets something else; where a paper adapts the separate q and v
projections, timm's fused qkv is the closest module (its q, k and v are adapted together; docs/protocol.md §4.5
gives the resulting counts beside the published ones).

peft and torch are imported only inside :meth:`PeftMethod.build` (the model class is in :mod:`methods.petl_layers`),
so listing these methods stays free of torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from harness.api import BuildContext, Method
from harness.errors import HarnessError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: AdamW grid shared by the PETL baselines (docs/protocol.md §4.5, §5.5): base learning rates, scaled by the suite's
#: ``lr_scaling`` like every method's; SSF's VTAB scripts use AdamW at 5e-3 for batch 2 x 32 (base 0.02 at batch/256)
PETL_GRID: dict[str, list] = {"lr": [0.05, 0.02, 0.01, 0.005, 0.002, 0.001],
                              "weight_decay": [0.01, 0.001, 0.0001, 0.0]}


def target_list(value: Any, method: str) -> list[str]:
    """peft ``target_modules`` from a list or a comma string (as ``--set`` gives it)."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    names = [n for n in names if n]
    if not names:
        raise HarnessError(f"{method}: target_modules is empty (expected peft module names, e.g. [qkv] or qkv,fc2)")
    return names


class PeftMethod(Method):
    """A peft tuner on a frozen timm backbone + the linear task head (see the module docstring)."""

    family = "peft"
    group = "petl"
    optimizer = "adamw"
    warmup_epochs = 10
    grid = PETL_GRID
    #: the peft config class (``peft.<name>``)
    peft_config: str = ""
    hparam_keys = ("drop_path",)

    def config(self, hp: dict[str, Any], ctx: BuildContext) -> Any:
        """The peft config of a trial: the class's defaults under the trial's hyperparameters."""
        import peft

        cls = getattr(peft, self.peft_config)
        accepted = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hp.items() if k in accepted}
        for key in ("target_modules", "feedforward_modules"):
            if key in kwargs:
                kwargs[key] = target_list(kwargs[key], self.name)
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as err:
            raise HarnessError(f"{self.name}: {self.peft_config}({kwargs}) refused: {err}") from None

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        import warnings

        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        from methods.common import freeze
        from methods.petl_layers import PeftClassifier

        hp = {**self.defaults, **ctx.hparams}
        config = self.config(hp, ctx)
        freeze(backbone)
        try:
            with warnings.catch_warnings():  # peft warns that a timm model has no HF config: expected here
                warnings.simplefilter("ignore", UserWarning)
                tuned = get_peft_model(backbone, config)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise HarnessError(f"{self.name}: cannot put {self.peft_config} on {type(backbone).__name__}: "
                               f"{err}") from None
        prefix = tuned.base_model.prefix
        for pname, p in tuned.named_parameters():
            p.requires_grad_(prefix in pname)
        return PeftClassifier(tuned, num_classes, frozen_eval=bool(hp.get("frozen_eval", True)),
                              trains_in_frozen=self.trains_in_frozen(tuned, config, BaseTunerLayer))

    @staticmethod
    def trains_in_frozen(tuned: nn.Module, config: Any, layer_type: type) -> tuple[str, ...]:
        """What of the eval-mode backbone still trains: the adapters' dropout modules, and the adapted layers
        themselves when a LyCORIS-style dropout (``module_dropout``, ``rank_dropout``) asks their mode."""
        names = {"lora_dropout", "vera_dropout"}
        if getattr(config, "module_dropout", 0) or getattr(config, "rank_dropout", 0):
            names |= {name.rsplit(".", 1)[-1] for name, m in tuned.named_modules() if isinstance(m, layer_type)}
        return tuple(sorted(names))


class DoRA(PeftMethod):
    """DoRA (Liu et al., ICML 2024): LoRA with the weight split into magnitude and direction; the magnitude vector
    trains too. Put where our ``lora`` baseline is (rank 4, alpha 1, the fused qkv), as the DoRA paper compares
    DoRA with LoRA at the same rank and modules, so the decomposition is the only difference."""

    description = "peft DoRA: LoRA (rank 4, scaling 0.25, fused qkv) + a trained magnitude per output"
    peft_config = "LoraConfig"
    defaults = {"r": 4, "lora_alpha": 1.0, "target_modules": ["qkv"], "lora_dropout": 0.0, "use_dora": True,
                "frozen_eval": True}


class IA3(PeftMethod):
    """(IA)^3 (Liu et al., NeurIPS 2022, T-Few): learned vectors rescaling keys, values and the MLP's inner
    activations, initialised to ones. On timm's fused qkv the output vector rescales q as well (3d entries); the
    MLP vector rescales fc2's input (``feedforward_modules``), as the paper's l_ff."""

    description = "peft (IA)3: learned rescaling of the fused qkv output and of fc2's input (MLP activations)"
    peft_config = "IA3Config"
    defaults = {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["fc2"], "frozen_eval": True}


class VeRA(PeftMethod):
    """VeRA (Kopiczko et al., ICLR 2024): one pair of frozen random low-rank matrices shared by all layers; per layer
    only two scaling vectors train (d: r entries, b: the output size). The paper's ViT setting: rank 256 on the
    query and value projections (here timm's fused qkv)."""

    description = "peft VeRA: shared frozen random rank-256 matrices on the fused qkv, per-layer scaling vectors"
    peft_config = "VeraConfig"
    defaults = {"r": 256, "target_modules": ["qkv"], "vera_dropout": 0.0, "d_initial": 0.1, "frozen_eval": True}


class LoHa(PeftMethod):
    """LoHa (Hyeon-Woo et al., ICLR 2022, FedPara; LyCORIS): the update is the Hadamard product of two low-rank
    products. peft's image-classification guide for ViT: r 16, alpha 16 on query and value (here the fused qkv);
    module dropout at peft's default 0 (the guide's 0.1 is ``--set settings.loha.module_dropout=0.1``)."""

    description = "peft LoHa: Hadamard product of two rank-16 factorisations on the fused qkv"
    peft_config = "LoHaConfig"
    defaults = {"r": 16, "alpha": 16, "module_dropout": 0.0, "rank_dropout": 0.0, "target_modules": ["qkv"],
                "frozen_eval": True}


class LoKr(PeftMethod):
    """LoKr (Yeh et al., ICLR 2024, LyCORIS): the update is a Kronecker product of a small matrix and a low-rank
    one. peft's image-classification guide's settings, as for LoHa: r 16, alpha 16 on the fused qkv, module
    dropout 0."""

    description = "peft LoKr: Kronecker-product update (rank 16) on the fused qkv"
    peft_config = "LoKrConfig"
    defaults = {"r": 16, "alpha": 16, "module_dropout": 0.0, "rank_dropout": 0.0, "target_modules": ["qkv"],
                "frozen_eval": True}


class OFT(PeftMethod):
    """OFT (Qiu et al., NeurIPS 2023): a learned block-diagonal orthogonal matrix (Cayley parametrised) rotates each
    adapted weight, keeping its hyperspherical energy. The paper adapts the attention's projections (q, k, v and
    the output); here the fused qkv and ``attn.proj``, with peft's default block size 32."""

    description = "peft OFT: block-diagonal orthogonal rotation (blocks of 32) of the fused qkv and attn.proj"
    peft_config = "OFTConfig"
    defaults = {"r": 0, "oft_block_size": 32, "target_modules": ["qkv", "attn.proj"], "module_dropout": 0.0,
                "coft": False, "block_share": False, "frozen_eval": True}


class AdaLoRA(PeftMethod):
    """AdaLoRA (Zhang et al., ICLR 2023): SVD-form LoRA (P diag(E) Q) on every weight matrix of the block (q, k, v,
    the attention output, both MLP layers: here qkv, attn.proj, fc1, fc2) whose rank budget is pruned from
    ``init_r`` 12 to ``target_r`` 8 per matrix on average by sensitivity, between step ``tinit`` and ``total -
    tfinal`` every ``deltaT`` steps (peft's defaults and example). The schedule is driven by the trial's step count
    (``BuildContext.train_steps``): ``tinit_frac``/``tfinal_frac`` are fractions of it (10% / 30%, the paper's
    GLUE settings are of that shape). peft's orthogonal regulariser is applied only through a transformers loss,
    which a timm model has not, so it is not used here (docs/protocol.md §4.5)."""

    description = "peft AdaLoRA: SVD-form LoRA on qkv, proj, fc1, fc2; rank budget 12 -> 8 over the trial's steps"
    peft_config = "AdaLoraConfig"
    defaults = {"init_r": 12, "target_r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0, "deltaT": 10, "beta1": 0.85,
                "beta2": 0.85, "target_modules": ["qkv", "attn.proj", "fc1", "fc2"], "tinit_frac": 0.1,
                "tfinal_frac": 0.3, "frozen_eval": True}
    #: the schedule length when a model is built outside a trial (parameter counts): no allocation happens then
    UNSCHEDULED_STEPS = 1000

    def config(self, hp: dict[str, Any], ctx: BuildContext) -> Any:
        total = int(ctx.train_steps or self.UNSCHEDULED_STEPS)
        tinit, tfinal = int(float(hp["tinit_frac"]) * total), int(float(hp["tfinal_frac"]) * total)
        if total - tfinal <= tinit:
            raise HarnessError(f"adalora: tinit_frac {hp['tinit_frac']} + tfinal_frac {hp['tfinal_frac']} leave no "
                               f"budget phase in {total} steps (their sum must be < 1)")
        return super().config({**hp, "total_step": total, "tinit": tinit, "tfinal": tfinal}, ctx)

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        model = super().build(backbone, num_classes, ctx)
        model.after_optimizer_step = model.backbone.base_model.update_and_allocate  # the rank budget, per step
        return model
