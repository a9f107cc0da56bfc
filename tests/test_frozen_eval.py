"""A frozen backbone runs in eval mode while the model trains because the model declares it (``frozen_modules``,
``trains_in_frozen``) and the engine keeps it so (:func:`harness.loop.train_mode`): a method writes no ``train()``
override, and the built-in methods' modes are what their own overrides used to give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_BACKBONE
from torch import nn

from harness.api import METHODS, TASKS, BuildContext, Method
from harness.backbone import build_backbone
from harness.loop import fit, train_mode


class _Declared(nn.Module):
    """A new method's model: a frozen backbone with BatchNorm and dropout, a head, and only a declaration."""

    def __init__(self, frozen: tuple[str, ...] = ("backbone",)):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).requires_grad_(False)
        self.head = nn.Linear(8, 3)
        self.frozen_modules = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _DeclaringMethod(Method):
    """A method as a newcomer writes it: build() freezes and declares; nothing about modes."""

    def build(self, backbone: nn.Module, num_classes: int, ctx: BuildContext) -> nn.Module:
        return _Declared(() if ctx.hparams.get("frozen_eval") is False else ("backbone",))


def _fit_recording(model: nn.Module) -> list[tuple[bool, bool]]:
    """Train ``model`` two epochs through the engine's loop; per forward: (backbone's modes, head's mode)."""
    seen: list[tuple[bool, bool]] = []
    model.backbone.register_forward_hook(
        lambda m, i, o: seen.append((any(sub.training for sub in m.modules()), model.head.training)))
    data = [(torch.randn(4, 6, generator=torch.Generator().manual_seed(k)), torch.tensor([0, 1, 2, 0]))
            for k in range(2)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    result = fit(model, data, optimizer, epochs=2, evaluate=lambda m: {"eval": 0.0})
    assert result.status == "ok"
    return seen


def test_a_declared_frozen_backbone_runs_in_eval_mode_while_the_model_trains():
    method = _DeclaringMethod()
    model = method.build(nn.Identity(), 3, BuildContext(hparams={}, suite="t", cache_dir=Path(".")))
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    seen = _fit_recording(model)
    assert seen == [(False, True)] * 4  # 2 epochs x 2 batches: the head trains, no module of the backbone does
    for key, value in model.backbone.state_dict().items():  # BatchNorm's running statistics did not move
        assert torch.equal(value, stats[key]), key
    # frozen_eval: false declares nothing: the backbone's dropout and BatchNorm train
    model = method.build(nn.Identity(), 3, BuildContext(hparams={"frozen_eval": False}, suite="t",
                                                        cache_dir=Path(".")))
    assert _fit_recording(model) == [(True, True)] * 4


def test_cached_training_keeps_the_declaration_and_switches_only_on_a_change():
    """The model on cached frozen outputs switches the model as the loop would, and walks it only on a change."""
    from harness.features import OnFrozen

    model = _Declared()
    on = OnFrozen(model)
    train_mode(on)
    assert model.head.training and not any(m.training for m in model.backbone.modules())
    model.backbone.train()  # a second train() with no change of mode does not walk the model again
    train_mode(on)
    assert model.backbone.training
    on.eval()
    train_mode(on)
    assert model.head.training and not any(m.training for m in model.backbone.modules())


def _old_rule(name: str, model: nn.Module, hp: dict[str, Any]) -> dict[str, bool]:
    """The modes the built-ins' own ``train()`` overrides gave: the backbone in eval mode under ``frozen_eval``
    (LoRA: but its adapters' dropout), everything else training; full fine-tuning trains everything. The PETL
    baselines (docs/protocol.md §4.5), which had no overrides, follow the same rule: only adapter dropout trains."""
    frozen = name != "finetune" and hp.get("frozen_eval", True) is not False
    modes = {}
    for sub, module in model.named_modules():
        in_backbone = sub == "backbone" or sub.startswith("backbone.")
        adapter_dropout = any(f".{d}." in f".{sub}." for d in ("lora_dropout", "vera_dropout", "adapter_dropout"))
        modes[sub] = not (frozen and in_backbone and not adapter_dropout)
    return modes


@pytest.mark.parametrize("frozen_eval", [True, False])
@pytest.mark.parametrize("name", METHODS.names())
def test_builtins_train_in_the_modes_their_overrides_gave(name, frozen_eval):
    method = METHODS.get(name)
    if not frozen_eval and "frozen_eval" not in method.defaults:
        pytest.skip(f"{name} has no frozen_eval setting")
    hp = {**method.defaults_for(TASKS.get("demo-digits")), "lr": 0.1, "weight_decay": 0.0}
    if "frozen_eval" in method.defaults:
        hp["frozen_eval"] = frozen_eval
    if name == "lora":
        hp["dropout"] = 0.1  # a real Dropout module for the adapters (0 gives peft's Identity)
    torch.manual_seed(0)
    ctx = BuildContext(hparams=hp, suite="t", cache_dir=Path("/nonexistent-cache"), random_init=bool(method.needs))
    model = method.build(build_backbone(TINY_BACKBONE), 5, ctx)
    assert not any("train" in vars(type(m)) for m in model.modules() if type(m).__module__.startswith("methods")), \
        f"{name}: a model of methods/ overrides train(); declare frozen_modules instead"
    model.eval()
    train_mode(model)
    assert {sub: m.training for sub, m in model.named_modules()} == _old_rule(name, model, hp)
    model.eval()
    assert not any(m.training for m in model.modules())
