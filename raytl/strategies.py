"""Transfer strategies: what is frozen, for how long, and which parameter group gets which learning rate.

A strategy turns a trial's hyperparameters into one or more :class:`Phase` objects. The trainer
applies a phase by freezing the first ``freeze_depth`` blocks (their BatchNorm statistics too) and
building AdamW parameter groups for what still trains. Adding a strategy means adding one function
to :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from raytl.config import Hyperparameters


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one freezing pattern and one set of learning rates."""

    name: str
    epochs: int
    freeze_depth: int  # blocks frozen from the stem; == number of blocks means only the head trains
    head_lr: float
    backbone_lr: float
    layer_decay: float
    augment: bool


@dataclass(frozen=True)
class Strategy:
    """A named recipe: whether it starts from pretrained weights and how its phases are laid out."""

    name: str
    pretrained: bool
    phases: Callable[[Hyperparameters, int], list[Phase]]
    uses: tuple[str, ...]  # the hyperparameters it reads (the others are inactive in the search)


def _linear_probe(hp: Hyperparameters, n_blocks: int) -> list[Phase]:
    # augmentation off: a frozen backbone sees fixed features, which the trainer computes once
    return [Phase("probe", hp.epochs, n_blocks, hp.head_lr, 0.0, 1.0, False)]


def _fine_tune(hp: Hyperparameters, n_blocks: int) -> list[Phase]:
    return [Phase("fine_tune", hp.epochs, min(hp.freeze_depth, n_blocks), hp.head_lr,
                  hp.backbone_lr, hp.layer_decay, hp.augment)]


def _lp_ft(hp: Hyperparameters, n_blocks: int) -> list[Phase]:
    # Kumar et al. 2022: probe first so fine-tuning starts from a good head and distorts features less
    probe_epochs = hp.lp_epochs if hp.lp_epochs is not None else max(1, hp.epochs // 3)
    probe_epochs = min(probe_epochs, hp.epochs)
    phases = [Phase("probe", probe_epochs, n_blocks, hp.head_lr, 0.0, 1.0, False)]
    if hp.epochs > probe_epochs:
        phases.append(Phase("fine_tune", hp.epochs - probe_epochs, min(hp.freeze_depth, n_blocks),
                            hp.head_lr, hp.backbone_lr, hp.layer_decay, hp.augment))
    return phases


def _scratch(hp: Hyperparameters, n_blocks: int) -> list[Phase]:
    return [Phase("scratch", hp.epochs, 0, hp.head_lr, hp.backbone_lr, 1.0, hp.augment)]


_COMMON = ("head_lr", "weight_decay", "label_smoothing", "batch_size", "epochs", "backbone")
STRATEGIES: dict[str, Strategy] = {
    "linear_probe": Strategy("linear_probe", True, _linear_probe, _COMMON),
    "fine_tune": Strategy("fine_tune", True, _fine_tune,
                          (*_COMMON, "freeze_depth", "backbone_lr", "layer_decay", "augment")),
    "lp_ft": Strategy("lp_ft", True, _lp_ft,
                      (*_COMMON, "freeze_depth", "backbone_lr", "layer_decay", "augment", "lp_epochs")),
    "scratch": Strategy("scratch", False, _scratch, (*_COMMON, "backbone_lr", "augment")),
}


def apply_freeze(model: nn.Module, blocks: list[list[str]], freeze_depth: int) -> set[str]:
    """Freeze the parameters of the first ``freeze_depth`` blocks; everything else trains.

    Returns the frozen parameter names. BatchNorm layers whose parameters are all frozen are put in
    eval mode by :func:`set_train_mode`, so their running statistics stay the pretrained ones.
    """
    frozen = {name for block in blocks[:freeze_depth] for name in block}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return frozen


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except frozen BatchNorm layers, which keep using their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def param_groups(
    model: nn.Module, blocks: list[list[str]], head: list[str], phase: Phase, weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups for the trainable parameters.

    The head gets ``head_lr``; block ``i`` of ``n`` gets ``backbone_lr * layer_decay ** (n - 1 - i)``,
    so the top block trains at ``backbone_lr`` and earlier blocks slower (layer-wise decay, as
    timm's ``param_groups_layer_decay`` does over the same grouping). Biases and norm weights (1-D
    tensors) get no weight decay, as in timm and most fine-tuning recipes.
    """
    params = dict(model.named_parameters())
    n = len(blocks)
    groups: dict[tuple[str, bool], dict] = {}

    def add(name: str, label: str, lr: float) -> None:
        param = params[name]
        if not param.requires_grad:
            return
        decay = param.ndim > 1
        group = groups.setdefault(
            (label, decay),
            {"params": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0,
             "name": f"{label}{'' if decay else '_no_decay'}"},
        )
        group["params"].append(param)

    for i, block in enumerate(blocks):
        lr = phase.backbone_lr * phase.layer_decay ** (n - 1 - i)
        for name in block:
            add(name, f"block_{i}", lr)
    for name in head:
        add(name, "head", phase.head_lr)
    return list(groups.values())
