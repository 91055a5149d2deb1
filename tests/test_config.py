"""The space file: valid files load, every mistake is one precise line naming the file and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raytl.errors import ConfigError
from raytl.space import condition_order
from raytl.space_file import load_space, parse_space
from tests.conftest import REPO


def test_every_shipped_space_file_loads():
    files = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert files, "no shipped space files"
    for path in files:
        config = load_space(path)
        assert config.name
        assert config.space


def test_quickstart_resolves_defaults_and_conditions():
    config = load_space(REPO / "search_spaces" / "quickstart.yaml")
    assert config.data.source == "digits"
    assert config.space["freeze_depth"].when == {"strategy": ("fine_tune", "lp_ft")}
    hp = config.hyperparameters({"strategy": "fine_tune", "freeze_depth": 3, "head_lr": 0.01})
    assert hp.backbone == "efficientnet_lite0"
    assert hp.epochs == config.search.max_epochs
    assert hp.batch_size == 64  # a constant of the file
    assert hp.freeze_depth == 3


def _error(space_file, body) -> str:
    with pytest.raises(ConfigError) as info:
        load_space(space_file(body))
    return str(info.value)


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ({"data": {"sorce": "digits"}}, "data.sorce", "did you mean 'source'"),
        ({"dataa": {}}, "dataa", "unknown key"),
        ({"data": {"image_size": "big"}}, "data.image_size", "expected an integer"),
        ({"data": {"source": "mnist"}}, "data.source", "expected one of imagefolder"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "expected in (0, 1)"),
        ({"data": {"source": "imagefolder"}}, "data.path", "needs a path"),
        (
            {"data": {"source": "imagefolder", "path": "/nonexistent/x"}},
            "data.path",
            "no such file",
        ),
        ({"model": {"backbone": "resnet_nonexistent"}}, "model.backbone", "not a timm model"),
        (
            {"model": {"backbone": "resnet18", "pretrained": "package"}},
            "model.pretrained",
            "only for efficientnet_lite0",
        ),
        (
            {"space": {"freeze_depth": {"int": [0, 12]}}},
            "space.freeze_depth",
            "beyond the backbone's block count",
        ),
        (
            {"space": {"head_lr": {"loguniform": [0, 1]}}},
            "space.head_lr.loguniform",
            "low must be > 0",
        ),
        (
            {"space": {"head_lr": {"loguniform": [0.1, 0.01]}}},
            "space.head_lr.loguniform",
            "low <= high",
        ),
        (
            {"space": {"strategy": {"choice": ["linear_probe", "magic"]}}},
            "space.strategy.choice",
            "expected one of linear_probe",
        ),
        ({"space": {"learning_rate": 0.1}}, "space.learning_rate", "unknown key"),
        (
            {"space": {"freeze_depth": {"int": [0, 2], "when": {"strategy": ["fine_tune"]}}}},
            "space.freeze_depth.when.strategy",
            "must name a choice",
        ),
        (
            {
                "space": {
                    "strategy": {"choice": ["fine_tune"]},
                    "freeze_depth": {"int": [0, 2], "when": {"strategy": ["lp_fy"]}},
                }
            },
            "space.freeze_depth.when.strategy",
            "expected one of linear_probe",
        ),
        (
            {
                "space": {
                    "strategy": {"choice": ["fine_tune", "linear_probe"]},
                    "freeze_depth": {"int": [0, 2], "when": {"strategy": ["lp_ft"]}},
                }
            },
            "space.freeze_depth.when.strategy",
            "not among strategy's values",
        ),
        (
            {"space": {"head_lr": {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}}},
            "space.head_lr",
            "exactly one of",
        ),
        (
            {"space": {"batch_size": {"uniform": [8, 64]}}},
            "space.batch_size.uniform",
            "not a real-valued",
        ),
        ({"search": {"grace_period": 9, "max_epochs": 4}}, "search.grace_period", "expected in [1"),
        ({"resources": {"workers_per_trial": 0}}, "resources.workers_per_trial", "expected >= 1"),
    ],
)
def test_errors_name_file_and_key(space_file, body, key, expected):
    message = _error(space_file, body)
    assert f": {key}: " in message, message
    assert expected in message, message
    assert "space.yaml" in message


def test_yaml_exponent_without_dot_is_a_number(space_file):
    config = load_space(space_file({"space": {"head_lr": {"loguniform": ["1e-4", "1e-1"]}}}))
    assert config.space["head_lr"].low == pytest.approx(1e-4)


def test_overrides_set_any_key_and_bare_hyperparameters(space_file):
    path = space_file(
        {"data": {"source": "digits"}, "space": {"strategy": {"choice": ["fine_tune"]}}}
    )
    config = load_space(path, ["data.limit=500", "strategy=linear_probe", "search.num_samples=3"])
    assert config.data.limit == 500
    assert config.search.num_samples == 3
    assert config.space["strategy"].kind == "const"
    assert config.hyperparameters().strategy == "linear_probe"
    with pytest.raises(ConfigError, match="data.limt"):
        load_space(path, ["data.limt=5"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_space(path, ["nonsense"])


def test_conditions_are_ordered_parents_first():
    config = parse_space(
        {
            "space": {
                "freeze_depth": {"int": [0, 3], "when": {"strategy": ["fine_tune"]}},
                "strategy": {"choice": ["fine_tune", "linear_probe"]},
            }
        }
    )
    assert [s.name for s in condition_order(config.space)] == ["strategy", "freeze_depth"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_space(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: digits\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)


def test_cli_user_error_is_one_line_without_traceback(space_file):
    path = space_file({"data": {"image_sise": 64}})
    proc = subprocess.run(
        [sys.executable, "-m", "raytl", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "data.image_sise" in lines[0] and "did you mean 'image_size'" in lines[0]


@pytest.mark.parametrize("name", ["../../etc", "runs/x", "a b", "", ".hidden"])
def test_name_is_a_folder_name(space_file, name):
    """The name names folders (runs/NAME, NAME-RUN_ID on storage): no path may hide in it."""
    message = _error(space_file, {"name": name})
    assert ": name: " in message and "it names folders" in message
