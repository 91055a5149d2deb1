"""A trial's context: resolved once, frozen, and what every worker receives (it pickles whole)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from raytl.space_file import parse_space
from raytl.trial import SearchInputs, TrialContext

SPACE = {
    "name": "t",
    "data": {"source": "digits"},
    "search": {"max_epochs": 3},
    "space": {"strategy": {"choice": ["linear_probe", "fine_tune"]}, "freeze_depth": 4},
}


def test_context_resolves_the_trial_once_and_pickles_whole():
    config = parse_space(SPACE)
    inputs = SearchInputs(
        config, data="data-ref", storage="/tmp/x", features={"efficientnet_lite0": "f"}
    )
    ctx = TrialContext.create(inputs, {"strategy": "linear_probe", "head_lr": 0.01})
    assert (
        ctx.hp.backbone == "efficientnet_lite0" and ctx.hp.epochs == 3 and ctx.hp.freeze_depth == 4
    )
    assert ctx.features == "f" and ctx.lean  # a cached linear probe trains in the Tune trial
    again = pickle.loads(pickle.dumps(ctx))
    assert again == ctx and again.config.space == config.space
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.hp.head_lr = 1.0  # type: ignore[misc]


def test_only_a_cached_probe_is_lean():
    config = parse_space(SPACE)
    cached = SearchInputs(config, "d", "/tmp/x", {"efficientnet_lite0": "f"})
    uncached = SearchInputs(config, "d", "/tmp/x")
    assert not TrialContext.create(cached, {"strategy": "fine_tune"}).lean
    assert not TrialContext.create(uncached, {"strategy": "linear_probe"}).lean
