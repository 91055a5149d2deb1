"""Seeded recipes: the default set fitted to a space, and a user's own list checked key by key."""

from __future__ import annotations

import pytest

from raytl.errors import ConfigError
from raytl.models import count_blocks
from raytl.space_file import load_space

SPACE = {
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "space": {
        "strategy": {"choice": ["linear_probe", "fine_tune", "lp_ft"]},
        "freeze_depth": {"int": [0, 6], "when": {"strategy": ["fine_tune", "lp_ft"]}},
        "head_lr": {"loguniform": [1.0e-3, 3.0e-2]},
        "backbone_lr": {
            "loguniform": [1.0e-4, 3.0e-3],
            "when": {"strategy": ["fine_tune", "lp_ft"]},
        },
        "layer_decay": {"uniform": [0.6, 1.0], "when": {"strategy": ["fine_tune"]}},
        "batch_size": 32,
    },
}


def test_the_default_recipes_fitted_to_a_space(space_file):
    points = load_space(space_file(SPACE)).seed_points()
    half = count_blocks("efficientnet_lite0") // 2
    rate, head = pytest.approx(1e-3 * (32 / 64) ** 0.5), pytest.approx(1e-2 * (32 / 64) ** 0.5)
    assert points == [
        {"strategy": "linear_probe", "head_lr": 1e-2},
        # BiT-like: the top half of the blocks, AdamW's rate with the root of the batch (32 here)
        {"strategy": "fine_tune", "freeze_depth": half, "backbone_lr": rate, "head_lr": head},
        # MAE-like: every block, layer decay 0.7
        {
            "strategy": "fine_tune",
            "freeze_depth": 0,
            "layer_decay": 0.7,
            "backbone_lr": rate,
            "head_lr": head,
        },
        {"strategy": "lp_ft", "freeze_depth": 0, "head_lr": 1e-2, "backbone_lr": 1e-4},
    ]


def test_recipes_are_clipped_into_ranges_and_left_out_when_the_space_lacks_their_strategy(
    space_file,
):
    body = {
        **SPACE,
        "space": {
            "strategy": {"choice": ["linear_probe", "fine_tune"]},
            "freeze_depth": {"int": [5, 7], "when": {"strategy": ["fine_tune"]}},
            "head_lr": {"loguniform": [2.0e-2, 5.0e-2]},
            "backbone_lr": 3.0e-4,  # a constant: never set by a seed
        },
    }
    points = load_space(space_file(body)).seed_points()
    assert points == [
        {"strategy": "linear_probe", "head_lr": 2e-2},
        {"strategy": "fine_tune", "freeze_depth": 5, "head_lr": 2e-2},
    ]  # both fine-tuning recipes clip to this one point (kept once); no lp_ft in the space


def test_own_seed_configs_replace_the_defaults_and_an_empty_list_means_none(space_file):
    own = [{"strategy": "fine_tune", "freeze_depth": 2, "head_lr": 0.003}]
    body = {**SPACE, "search": {"seed_configs": own}}
    assert load_space(space_file(body)).seed_points() == own
    assert load_space(space_file({**SPACE, "search": {"seed_configs": []}})).seed_points() == []


@pytest.mark.parametrize(
    ("seed", "key", "expected"),
    [
        ({"strategy": "fine_tune", "freez_depth": 2}, "[0].freez_depth", "not a hyperparameter"),
        ({"strategy": "fine_tune", "batch_size": 64}, "[0].batch_size", "not searched"),
        ({"strategy": "linear_probe", "freeze_depth": 2}, "[0].freeze_depth", "inactive"),
        ({"strategy": "fine_tune", "freeze_depth": 9}, "[0].freeze_depth", "expected a value in"),
        ({"strategy": "scratch"}, "[0].strategy", "expected a value in"),
        ({"head_lr": "fast"}, "[0].head_lr", "expected a value in"),
    ],
)
def test_a_bad_seed_config_names_its_entry_and_key(space_file, seed, key, expected):
    with pytest.raises(ConfigError) as info:
        load_space(space_file({**SPACE, "search": {"seed_configs": [seed]}}))
    assert f": search.seed_configs{key}: " in str(info.value) and expected in str(info.value)


def test_seed_configs_must_be_a_list_of_mappings(space_file):
    with pytest.raises(ConfigError, match="search.seed_configs: expected a list"):
        load_space(space_file({**SPACE, "search": {"seed_configs": {"strategy": "lp_ft"}}}))
    with pytest.raises(ConfigError, match=r"search.seed_configs\[0\]: expected a mapping"):
        load_space(space_file({**SPACE, "search": {"seed_configs": ["lp_ft"]}}))
