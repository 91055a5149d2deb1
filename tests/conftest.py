"""Shared fixtures: small real datasets (digits, synthetic) and space files written per test."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent


def remove_ray_temp_of(pid: int) -> None:
    """Remove the Ray temp folder (``$TMPDIR/raytl-ray-*``) of a search driver the test killed
    with SIGKILL (it had no chance to remove it): the one whose Ray session is named after the
    driver's pid. Nothing else is touched."""
    import tempfile

    from raytl.cluster import wait_for_ray_processes

    for folder in Path(tempfile.gettempdir()).glob("raytl-ray-*"):
        if list(folder.glob(f"ray/session_*_{pid}")):
            # its Ray's processes, orphaned by the kill, write session folders until they exit
            wait_for_ray_processes(str(folder))
            remove_until_gone(folder)


def remove_until_gone(folder: Path) -> None:
    """Remove ``folder``, which Ray's processes, still exiting for a moment after a kill, can
    write into again: the removal is repeated (for up to 20 s) until it has stayed gone for 3 s."""
    import shutil
    import time

    gone_since = None
    for _ in range(40):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.5)
        if folder.exists():
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= 3:
            break


@contextlib.contextmanager
def shared_ray_temp_restored():
    """For a block that runs a plain ``ray.init()`` (Ray's shared temp folder, ``/tmp/ray``):
    afterwards the session folders it created are removed, Ray's links to the latest session
    point where they pointed before (or are gone, as before), and the folder itself is gone if it
    was not there before and is empty. Nothing else is touched."""
    import shutil

    import ray._private.utils

    root = Path(ray._private.utils.get_ray_address_file(None)).parent  # /tmp/ray
    existed = root.exists()
    links = ("session_latest", "prom_metrics_service_discovery.json")
    sessions = set(root.glob("session_2*"))
    targets = {
        name: os.readlink(root / name) if (root / name).is_symlink() else None for name in links
    }
    try:
        yield
    finally:
        for folder in set(root.glob("session_2*")) - sessions:
            shutil.rmtree(folder, ignore_errors=True)
        for name, target in targets.items():
            (root / name).unlink(missing_ok=True)
            if target is not None:
                (root / name).symlink_to(target)
        if not existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # the folder itself, when Ray made it here and nothing is left in it


@pytest.fixture
def restores_shared_ray_temp():
    """A test that starts Ray in its shared temp folder (``ray.cluster_utils.Cluster``, a plain
    ``ray.init()``) leaves no session folder there and Ray's latest-session links as they were."""
    with shared_ray_temp_restored():
        yield


def write_space(tmp_path: Path, body: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def space_file(tmp_path: Path):
    """A factory: write a space mapping to a YAML file in tmp_path and return its path."""
    return lambda body, name="space.yaml": write_space(tmp_path, body, name)


@pytest.fixture(scope="session")
def digits():
    from raytl.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def synthetic():
    from raytl.data import load_data

    return load_data("synthetic", synthetic_classes=4, synthetic_per_class=40, seed=0)


def unit_trainer(data, train, val, *, image_size: int = 48, probe_passes=None, **hp):
    """A UnitTrainer on the CPU with efficientnet_lite0's packaged weights, seed 0; ``hp``
    overrides the hyperparameters (default: 1 epoch, batch 64)."""
    import torch

    from raytl.space import Hyperparameters
    from raytl.unit import UnitTrainer

    settings = {"backbone": "efficientnet_lite0", "epochs": 1, "batch_size": 64, **hp}
    return UnitTrainer(
        Hyperparameters(**settings),
        data,
        train,
        val,
        pretrained="package",
        image_size=image_size,
        device=torch.device("cpu"),
        probe_passes=probe_passes,
    )


def save_test_model(folder: Path, image_size: int) -> Path:
    """efficientnet_lite0 with the packaged ImageNet weights and a fresh 3-class head (seeded),
    saved as raytl saves a model into ``folder``, for the commands that read a saved model."""
    import torch

    from raytl.models import create_model, save_model
    from raytl.preprocess import preprocessing_for

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, "package")
    save_model(
        folder,
        model,
        backbone="efficientnet_lite0",
        class_names=["ant", "bee", "cow"],
        preprocessing=preprocessing_for(model, image_size),
    )
    return folder
