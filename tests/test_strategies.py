"""Strategies: what is frozen (BatchNorm included), which groups get which learning rate."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from raytl.models import backbone_blocks, create_model, head_parameter_names
from raytl.space import Hyperparameters
from raytl.strategies import (
    STRATEGIES,
    apply_freeze,
    param_groups,
    phase_at,
    rung_epochs,
    set_train_mode,
)


@pytest.fixture
def model():
    return create_model("efficientnet_lite0", 10, "package")


def hp(**kw):
    return Hyperparameters(**{"backbone": "efficientnet_lite0", "epochs": 6, **kw})


def test_linear_probe_trains_only_the_head_and_freezes_batchnorm(model):
    blocks = backbone_blocks(model)
    (phase,) = STRATEGIES["linear_probe"].phases(
        hp(strategy="linear_probe", augment=True), len(blocks)
    )
    assert phase.freeze_depth == len(blocks) and not phase.augment
    apply_freeze(model, blocks, phase.freeze_depth)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(head_parameter_names(model)) == {"classifier.weight", "classifier.bias"}
    set_train_mode(model)
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    # gradients reach only the head
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_fine_tune_freezes_the_stem_and_first_blocks(model):
    blocks = backbone_blocks(model)
    (phase,) = STRATEGIES["fine_tune"].phases(hp(strategy="fine_tune", freeze_depth=3), len(blocks))
    frozen = apply_freeze(model, blocks, phase.freeze_depth)
    assert frozen == {n for b in blocks[:3] for n in b}
    assert "conv_stem.weight" in frozen and "blocks.1.0.conv_pw.weight" in frozen
    assert "blocks.2.0.conv_pw.weight" not in frozen
    set_train_mode(model)
    modules = dict(model.named_modules())
    assert not modules["bn1"].training and not modules["blocks.1.0.bn1"].training
    assert modules["blocks.2.0.bn1"].training and modules["bn2"].training
    before = modules["bn1"].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, modules["bn1"].running_mean)  # frozen statistics unchanged


def test_param_groups_learning_rates_and_layer_decay(model):
    blocks = backbone_blocks(model)
    (phase,) = STRATEGIES["fine_tune"].phases(
        hp(strategy="fine_tune", freeze_depth=2, head_lr=0.01, backbone_lr=0.001, layer_decay=0.5),
        len(blocks),
    )
    apply_freeze(model, blocks, phase.freeze_depth)
    groups = param_groups(model, blocks, head_parameter_names(model), phase, weight_decay=0.05)
    lrs = {g["name"]: g["lr"] for g in groups}
    n = len(blocks)
    assert lrs["head"] == 0.01
    assert lrs[f"block_{n - 1}"] == pytest.approx(0.001)
    assert lrs[f"block_{n - 2}"] == pytest.approx(0.0005)
    assert lrs["block_2"] == pytest.approx(0.001 * 0.5 ** (n - 3))
    assert "block_0" not in lrs and "block_1" not in lrs  # frozen: not in the optimizer
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("_no_decay"))
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}


def test_lp_ft_probes_to_convergence_then_fine_tunes_for_its_epochs():
    phases = STRATEGIES["lp_ft"].phases(hp(strategy="lp_ft", freeze_depth=4), 8)
    assert [(p.name, p.epochs, p.freeze_depth, p.converge) for p in phases] == [
        ("probe", 1, 8, True),
        ("fine_tune", 6, 4, False),
    ]
    assert [phase_at(phases, e) for e in range(7)] == [0, 1, 1, 1, 1, 1, 1]
    assert [rung_epochs(phases, done) for done in range(8)] == [0, 0, 1, 2, 3, 4, 5, 6]
    (probe,) = STRATEGIES["linear_probe"].phases(hp(strategy="linear_probe"), 8)
    assert probe.converge and probe.epochs == 1 and rung_epochs([probe], 1) == 0


def test_scratch_starts_from_random_weights():
    assert not STRATEGIES["scratch"].pretrained
    (phase,) = STRATEGIES["scratch"].phases(hp(strategy="scratch"), 8)
    assert phase.freeze_depth == 0
