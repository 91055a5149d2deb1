"""Transfer strategies: what is frozen, for how long, and which parameter group gets which learning rate.

A strategy turns a trial's hyperparameters into one or more :class:`Phase` objects. The trainer
applies a phase by freezing the first ``freeze_depth`` blocks (their BatchNorm statistics too) and
building AdamW parameter groups for what still trains. Adding a strategy means adding one phase
function and one :data:`STRATEGIES` entry: the space file's strategy names come from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


class StrategySettings(Protocol):
    """What a strategy reads of a trial's hyperparameters (:class:`raytl.space.Hyperparameters`,
    with ``epochs`` resolved). A protocol, so this registry sits below the space that names it."""

    @property
    def epochs(self) -> int | None: ...
    @property
    def freeze_depth(self) -> int: ...
    @property
    def head_lr(self) -> float: ...
    @property
    def backbone_lr(self) -> float: ...
    @property
    def layer_decay(self) -> float: ...
    @property
    def augment(self) -> bool: ...


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
    converge: bool = False  # a head on frozen features, trained to convergence in one report
    running_statistics: bool = False  # every BatchNorm normalizes with its running statistics


@dataclass(frozen=True)
class Strategy:
    """A named recipe: whether it starts from pretrained weights and how its phases are laid out."""

    name: str
    pretrained: bool
    phases: Callable[[StrategySettings, int], list[Phase]]
    probes_first: bool = False  # its first phase trains only the head on frozen features
    only_probes: bool = False  # every phase does (such a trial needs no Ray Train worker group)


def _epochs(hp: StrategySettings) -> int:
    if hp.epochs is None:
        raise ValueError("a strategy needs the trial's epochs resolved (space.hyperparameters)")
    return hp.epochs


def _probe(hp: StrategySettings, n_blocks: int) -> Phase:
    """A head on the frozen backbone, trained to convergence (early stopping on validation loss)
    inside one report: each pass over cached features costs milliseconds, so a probe judged after
    the fine-tuning trials' 2-3 epochs would be judged underfit, not bad. Augmentation off: the
    frozen backbone then sees fixed features, which the trainer computes once."""
    return Phase("probe", 1, n_blocks, hp.head_lr, 0.0, 1.0, False, converge=True)


def _linear_probe(hp: StrategySettings, n_blocks: int) -> list[Phase]:
    return [_probe(hp, n_blocks)]


def _fine_tune(hp: StrategySettings, n_blocks: int) -> list[Phase]:
    return [
        Phase(
            "fine_tune",
            _epochs(hp),
            min(hp.freeze_depth, n_blocks),
            hp.head_lr,
            hp.backbone_lr,
            hp.layer_decay,
            hp.augment,
        )
    ]


def _lp_ft(hp: StrategySettings, n_blocks: int) -> list[Phase]:
    """Kumar et al. 2022: probe first so fine-tuning starts from a good head and distorts features
    less; the probe converges in its one report, then ``epochs`` fine-tuning epochs follow.

    The fine-tuning phase keeps every BatchNorm on its running statistics (its weights still
    train): the probe's head was fitted to features normalized by them, and switching to batch
    statistics changes every feature at once. Measured on digits (48 px, Lite0, holdout): with
    batch statistics the train accuracy fell from 0.997 after the probe to 0.35 in the first
    fine-tuning epoch, at backbone_lr 1e-4 as at 1e-3."""
    (fine_tune,) = _fine_tune(hp, n_blocks)
    return [_probe(hp, n_blocks), replace(fine_tune, running_statistics=True)]


def _scratch(hp: StrategySettings, n_blocks: int) -> list[Phase]:
    return [Phase("scratch", _epochs(hp), 0, hp.head_lr, hp.backbone_lr, 1.0, hp.augment)]


STRATEGIES: dict[str, Strategy] = {
    "linear_probe": Strategy(
        "linear_probe", True, _linear_probe, probes_first=True, only_probes=True
    ),
    "fine_tune": Strategy("fine_tune", True, _fine_tune),
    "lp_ft": Strategy("lp_ft", True, _lp_ft, probes_first=True),
    "scratch": Strategy("scratch", False, _scratch),
}


def phase_at(phases: list[Phase], epoch: int) -> int:
    """The phase that epoch ``epoch`` (0-based) belongs to."""
    start = 0
    for i, phase in enumerate(phases):
        if epoch < start + phase.epochs:
            return i
        start += phase.epochs
    return len(phases) - 1


def rung_epochs(phases: list[Phase], done: int) -> int:
    """Of the first ``done`` epochs, those that count toward ASHA's rungs: a converged probe's
    one report is not one (it is complete when it reports), so lp_ft's fine-tuning epochs alone
    meet the rungs and a linear probe never does."""
    return sum(not phases[phase_at(phases, e)].converge for e in range(done))


def lr_schedule(
    optimizer: torch.optim.Optimizer, phase: Phase, steps_per_epoch: int
) -> LRScheduler:
    """Linear warm-up over 5% of the phase's steps, then cosine to zero over the rest; a
    converged probe (early stopping, :mod:`raytl.probe`) keeps its rate after the warm-up."""
    total = phase.epochs * steps_per_epoch
    warmup = min(max(1, total // 20), total)
    first = LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=max(1, warmup - 1))
    if phase.converge:
        return first
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    return SequentialLR(optimizer, [first, cosine], milestones=[warmup])


def apply_freeze(model: nn.Module, blocks: list[list[str]], freeze_depth: int) -> set[str]:
    """Freeze the parameters of the first ``freeze_depth`` blocks; everything else trains.

    Returns the frozen parameter names. BatchNorm layers whose parameters are all frozen are put in
    eval mode by :func:`set_train_mode`, so their running statistics stay the pretrained ones.
    """
    frozen = {name for block in blocks[:freeze_depth] for name in block}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return frozen


def set_train_mode(model: nn.Module, running_statistics: bool = False) -> None:
    """``model.train()``, except frozen BatchNorm layers (every one with ``running_statistics``),
    which keep normalizing with their running statistics and leave them unchanged."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if running_statistics or (params and not any(p.requires_grad for p in params)):
                module.eval()


def param_groups(
    model: nn.Module,
    blocks: list[list[str]],
    head: list[str],
    phase: Phase,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable parameters.

    The head gets ``head_lr``; block ``i`` of ``n`` gets ``backbone_lr * layer_decay ** (n - 1 - i)``,
    so the top block trains at ``backbone_lr`` and earlier blocks slower. Biases and norm weights
    (1-D tensors) get no weight decay, as in timm and most fine-tuning recipes.

    Hand-written rather than timm's ``param_groups_layer_decay`` on purpose: that one decays over
    timm's *fine* groups and gives the head the top block's rate, while raytl needs one rule for
    freeze depth and decay (the *coarse* blocks that ``freeze_depth`` counts), a separate
    ``head_lr``, and frozen parameters left out.
    """
    params = dict(model.named_parameters())
    n = len(blocks)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}

    def add(name: str, label: str, lr: float) -> None:
        param = params[name]
        if not param.requires_grad:
            return
        decay = param.ndim > 1
        group = groups.setdefault(
            (label, decay),
            {
                "params": [],
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{label}{'' if decay else '_no_decay'}",
            },
        )
        group["params"].append(param)

    for i, block in enumerate(blocks):
        lr = phase.backbone_lr * phase.layer_decay ** (n - 1 - i)
        for name in block:
            add(name, f"block_{i}", lr)
    for name in head:
        add(name, "head", phase.head_lr)
    return list(groups.values())
