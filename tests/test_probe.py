"""A probe trains to convergence inside one report: early stopping on real validation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytl import probe
from raytl.data.splits import carve_test, stratified_split
from tests.conftest import unit_trainer


def expected_stop(losses: list[float]) -> tuple[int, int]:
    """(passes run, pass kept) by the documented rule, from the validation losses seen."""
    best, kept = float("inf"), 0
    for p, loss in enumerate(losses):
        if loss < best - probe.MIN_IMPROVEMENT:
            best, kept = loss, p + 1
        elif p + 1 - kept >= probe.PATIENCE:
            return p + 1, kept
    return len(losses), kept


def test_stops_when_validation_loss_stops_falling_and_keeps_the_best_head(digits):
    """A linear head on 60 digits (64 pixels each) overfits: its validation loss falls, then
    rises; the probe stops PATIENCE passes after the lowest one and keeps that pass's head."""
    x = torch.from_numpy(digits.images.reshape(len(digits.images), -1)).float() / 255
    y = torch.from_numpy(digits.labels)
    train, val = slice(0, 60), slice(60, 700)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)

    def train_pass(p: int) -> tuple[torch.Tensor, int]:
        loss = F.cross_entropy(head(x[train]), y[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach() * 60, torch.tensor(0.0), torch.tensor(60.0)]), 60

    seen: list[float] = []

    @torch.no_grad()
    def validation_loss() -> float:
        seen.append(float(F.cross_entropy(head(x[val]), y[val])))
        return seen[-1]

    _, images, kept = probe.train_to_convergence(train_pass, validation_loss, head)
    passes, expected_kept = expected_stop(seen)
    assert images == 60 and len(seen) == passes < probe.MAX_PASSES  # it stopped early
    assert kept == expected_kept > 1 and min(seen) == seen[kept - 1]
    assert seen[-1] > seen[kept - 1]  # it overfitted after the pass it kept
    with torch.no_grad():  # the head is the kept pass's, not the last one's
        assert float(F.cross_entropy(head(x[val]), y[val])) == pytest.approx(seen[kept - 1])


def test_without_validation_it_runs_the_passes_it_is_given():
    calls: list[int] = []

    def train_pass(p: int) -> tuple[torch.Tensor, int]:
        calls.append(p)
        return torch.zeros(3), 1

    assert probe.train_to_convergence(train_pass, None, torch.nn.Linear(2, 2), 7)[2] == 7
    assert calls == list(range(7))
    calls.clear()
    assert probe.train_to_convergence(train_pass, None, torch.nn.Linear(2, 2))[2] == len(calls)
    assert len(calls) == probe.PASSES_WITHOUT_VALIDATION


def trainer(data, train, val, **kw):
    return unit_trainer(data, train, val, **{"epochs": 2, **kw})


@pytest.fixture(scope="module")
def splits(digits):
    pool, _ = carve_test(digits.labels, 0.2, 0, digits.class_names)
    train, val = stratified_split(digits.labels, pool, 0.3, 0, digits.class_names, "validation")
    return train[:400], val[:200]


def test_a_linear_probe_is_complete_after_one_report(digits, splits):
    train, val = splits
    unit = trainer(digits, train, val, strategy="linear_probe", head_lr=0.01)
    assert unit.total_epochs == 1  # whatever the searched epochs
    m = unit.run_epoch()
    assert m["rung_epoch"] == 0 and 1 <= m["probe_passes"] < probe.MAX_PASSES
    assert m["val_loss"] == pytest.approx(unit.evaluate(val).loss, rel=1e-4)
    assert m["val_accuracy"] > 0.6  # chance is 0.1


def test_lp_ft_probes_to_convergence_then_its_fine_tuning_epochs_meet_the_rungs(digits, splits):
    train, val = splits
    kw = dict(strategy="lp_ft", freeze_depth=6, head_lr=0.01, backbone_lr=1e-3)
    unit = trainer(digits, train, val, **kw)
    assert unit.total_epochs == 3  # the probe's one report, then epochs=2 of fine-tuning
    batchnorms = [m for m in unit.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.clone()) for m in batchnorms]
    reports = [unit.run_epoch() for _ in range(3)]
    # fine-tuning keeps every BatchNorm on the statistics the probe's features were normalized by,
    # while the unfrozen BatchNorm weights train
    assert all(
        torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        for m, (mean, var, _) in zip(batchnorms, before, strict=True)
    )
    assert any(
        not torch.equal(m.weight, w) for m, (_, _, w) in zip(batchnorms, before, strict=True)
    )
    assert [(r["phase"], r["rung_epoch"]) for r in reports] == [
        ("probe", 0),
        ("fine_tune", 1),
        ("fine_tune", 2),
    ]
    passes = reports[0]["probe_passes"]
    assert passes >= 1 and all(r["probe_passes"] == passes for r in reports)
    # a refit (no validation split) runs the passes the search kept, and checkpoints carry them
    refit = trainer(digits, np.concatenate([train, val]), val[:0], **kw)
    refit.probe_passes = passes
    assert refit.run_epoch()["probe_passes"] == passes
    assert refit.state_dict(head_only=True)["probe_passes"] == passes
