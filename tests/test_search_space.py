"""The define-by-run space: conditional parameters exist only where their condition holds."""

from __future__ import annotations

import optuna

from raytl.space import DefineByRun
from raytl.space_file import parse_space
from raytl.tune import make_searcher


def sample_many(space_raw: dict, n: int = 40, **sections) -> list[dict]:
    config = parse_space({"space": space_raw, **sections})
    fn = DefineByRun(config.space, config.blocks)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = fn(trial) or {}
        out.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return out


def test_conditional_parameters_are_absent_for_other_strategies():
    samples = sample_many(
        {
            "strategy": {"choice": ["linear_probe", "fine_tune", "lp_ft", "scratch"]},
            "freeze_depth": {"int": [0, 6], "when": {"strategy": ["fine_tune", "lp_ft"]}},
            "backbone_lr": {
                "loguniform": [1e-5, 1e-2],
                "when": {"strategy": ["fine_tune", "lp_ft", "scratch"]},
            },
            "head_lr": {"loguniform": [1e-4, 1e-1]},
            "batch_size": 32,
        }
    )
    strategies = {s["strategy"] for s in samples}
    assert strategies == {"linear_probe", "fine_tune", "lp_ft", "scratch"}
    for s in samples:
        assert ("freeze_depth" in s) == (s["strategy"] in ("fine_tune", "lp_ft"))
        assert ("backbone_lr" in s) == (s["strategy"] != "linear_probe")
        assert 1e-4 <= s["head_lr"] <= 1e-1
        assert s["batch_size"] == 32
        if "freeze_depth" in s:
            assert 0 <= s["freeze_depth"] <= 6


def test_freeze_depth_bound_follows_a_searched_backbone():
    samples = sample_many(
        {
            "backbone": {"choice": ["efficientnet_lite0", "resnet18"]},
            "freeze_depth": {"int": [0, 8]},
        },
        n=60,
        model={"pretrained": "none"},
    )
    for s in samples:
        limit = 8 if s["backbone"] == "efficientnet_lite0" else 5
        assert s["freeze_depth"] <= limit
    assert any(s["backbone"] == "resnet18" for s in samples)


def test_tpe_is_multivariate_and_grouped():
    config = parse_space({"space": {"strategy": {"choice": ["linear_probe", "fine_tune"]}}})
    sampler = make_searcher(config)._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group


def test_feature_cache_applies_only_where_a_head_trains_alone():
    from raytl.features import cacheable_backbones

    base = {"name": "c", "data": {"source": "digits"}}
    probe = {"strategy": {"choice": ["linear_probe", "fine_tune"]}}
    assert cacheable_backbones(parse_space({**base, "space": probe})) == ["efficientnet_lite0"]
    assert cacheable_backbones(parse_space({**base, "space": {"strategy": "lp_ft"}})) == [
        "efficientnet_lite0"
    ]
    assert cacheable_backbones(parse_space({**base, "space": {"strategy": "fine_tune"}})) == []
    assert cacheable_backbones(parse_space({**base, "cache": "off", "space": probe})) == []
    assert cacheable_backbones(parse_space({**base, "space": {**probe, "augment": True}})) == []
    none = {**base, "model": {"pretrained": "none"}, "space": probe}
    assert cacheable_backbones(parse_space(none)) == []  # random weights differ per trial seed


def test_only_cached_linear_probes_run_lean():
    from raytl.trial import is_lean

    hp = parse_space({"name": "c", "data": {"source": "digits"}}).hyperparameters
    cached = ("efficientnet_lite0",)
    assert is_lean(hp({"strategy": "linear_probe"}), cached)
    assert not is_lean(hp({"strategy": "linear_probe", "augment": True}), cached)
    assert not is_lean(hp({"strategy": "lp_ft"}), cached)  # its fine-tuning phase needs Ray Train
    assert not is_lean(hp({"strategy": "linear_probe"}), ())


def test_a_new_search_refuses_an_experiment_folder_that_holds_one(tmp_path):
    """Two runs writing one Tune experiment would mix their trials: only `raytl resume` may."""
    import pytest

    from raytl.errors import RaytlError
    from raytl.trial import SearchInputs
    from raytl.tune import make_tuner

    config = parse_space({"name": "t", "data": {"source": "digits"}})
    (tmp_path / "exp" / "tune").mkdir(parents=True)
    (tmp_path / "exp" / "tune" / "tuner.pkl").write_bytes(b"an earlier search's state")
    inputs = SearchInputs(config, data=None, storage=str(tmp_path / "exp"))
    with pytest.raises(RaytlError, match="already holds a search; `raytl resume"):
        make_tuner(inputs, tmp_path / "out", resume=False, echo=print)
