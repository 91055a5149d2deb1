"""The frozen-feature cache: exact, keyed on everything that matters, atomic, computed once."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from raytl.cluster import ray_session
from raytl.data.dataset import ImageData
from raytl.feature_rows import FeatureCacheError, FeatureFile
from raytl.features import (
    ensure_features,
    entry_path,
    feature_key,
    prepare_feature_cache,
    read_features,
    streams_features,
    write_features,
)
from raytl.models import create_model, pooled_features
from raytl.preprocess import BatchPreparer, preprocessing_for
from raytl.space import Hyperparameters
from raytl.space_file import parse_space
from raytl.unit import UnitTrainer


@pytest.fixture(scope="module")
def small(digits):
    return ImageData(digits.images[:120], digits.labels[:120], digits.class_names, "digits[:120]")


def test_cached_features_equal_a_fresh_forward_pass(small, tmp_path):
    result = ensure_features(str(tmp_path), "efficientnet_lite0", "package", small, 48)
    assert result.computed and result.features.shape == (120, 1280)
    model = create_model("efficientnet_lite0", 10, "package")
    pre = preprocessing_for(model, 48)
    fresh = pooled_features(
        model, BatchPreparer(pre, torch.device("cpu")), small.images[::7], torch.device("cpu")
    ).numpy()
    np.testing.assert_allclose(result.features[::7], fresh, rtol=1e-4, atol=1e-5)
    again = ensure_features(str(tmp_path), "efficientnet_lite0", "package", small, 48)
    assert not again.computed and np.array_equal(again.features, result.features)


def test_a_probe_on_cached_features_trains_like_one_without(small, tmp_path):
    """Same seed, same data: the head sees the same features, so the epochs agree."""
    features = ensure_features(str(tmp_path), "efficientnet_lite0", "package", small, 48).features
    hp = Hyperparameters(
        strategy="linear_probe",
        backbone="efficientnet_lite0",
        head_lr=0.01,
        batch_size=32,
        epochs=2,
    )
    train, val = np.arange(0, 90), np.arange(90, 120)
    runs = []
    for shared in (None, features):
        trainer = UnitTrainer(
            hp, small, train, val, pretrained="package", image_size=48, seed=3, features=shared
        )
        runs.append([trainer.run_epoch() for _ in range(2)])
    for a, b in zip(*runs, strict=True):
        assert a["head_only"] and b["head_only"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])


def test_key_changes_with_everything_that_changes_the_features(small, tmp_path):
    model = create_model("efficientnet_lite0", 10, "package")
    pre48, pre64 = preprocessing_for(model, 48), preprocessing_for(model, 64)
    base = feature_key("efficientnet_lite0", "package", small, pre48)
    assert base == feature_key("efficientnet_lite0", "package", small, pre48)
    assert base.digest() != feature_key("efficientnet_lite0", "package", small, pre64).digest()
    # other weights: the same architecture from a checkpoint file with one tensor changed
    state = model.state_dict()
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.01
    ckpt = tmp_path / "other.pt"
    torch.save(state, ckpt)
    assert base.digest() != feature_key("efficientnet_lite0", str(ckpt), small, pre48).digest()
    other_data = ImageData(small.images[:-1], small.labels[:-1], small.class_names, "fewer")
    assert base.digest() != feature_key("efficientnet_lite0", "package", other_data, pre48).digest()
    # a cache written under one key is never read for another
    write_features(str(tmp_path), base, np.ones((120, 4), dtype=np.float32))
    other = feature_key("efficientnet_lite0", "package", small, pre64)
    assert read_features(str(tmp_path), other) is None
    assert read_features(str(tmp_path), base).shape == (120, 4)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from raytl.features import FeatureKey, write_features
    key = FeatureKey("b", "w", 48, "d", "p")
    features = np.random.default_rng(0).random((60000, 256), dtype=np.float32)  # about 60 MB
    print("ready", flush=True)
    while True:
        write_features(sys.argv[1], key, features)
""")


def test_a_killed_writer_leaves_no_readable_partial_cache(tmp_path):
    from raytl.features import FeatureKey

    key = FeatureKey("b", "w", 48, "d", "p")
    folder = Path(entry_path(str(tmp_path), key)).parent
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in folder.glob(".*.tmp")):  # its first write began
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.001)
        os.kill(writer.pid, signal.SIGKILL)  # inside that write: ~60 MB take far longer than this
    finally:
        writer.wait()
    assert list(folder.glob(".*.tmp")), "the kill did not land inside a write"
    assert not (folder / "features.parquet").exists()
    assert read_features(str(tmp_path), key) is None  # the partial .tmp file is never read


PRODUCER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from raytl.data.sources import load_data
    from raytl.features import ensure_features
    data = load_data("digits", image_size=8)
    start = Path(sys.argv[2])
    while not start.exists():  # both producers start together
        time.sleep(0.01)
    result = ensure_features(sys.argv[1], "efficientnet_lite0", "package", data, 64)
    print(json.dumps({"computed": result.computed, "sum": float(result.features.sum())}))
""")


def test_two_concurrent_producers_compute_the_cache_once(tmp_path):
    root, start = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(root), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(8)  # both have imported torch and loaded the data by now
    start.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["computed"] for r in results) == [False, True]
    assert results[0]["sum"] == pytest.approx(results[1]["sum"])
    assert len(list(root.glob("*/features.parquet"))) == 1


def test_an_actor_pool_writes_the_cache_in_chunks_and_trials_read_it_held_or_memory_mapped(
    digits, tmp_path
):
    """Two actors compute 1,500 rows in two chunks, written as two row groups under the key a
    single process computes; trials get it through the object store, or memory-mapped from a
    copy in Ray's session folder, and a probe trains identically on either."""
    data = ImageData(digits.images[:1500], digits.labels[:1500], digits.class_names, "d[:1500]")
    config = parse_space(
        {
            "data": {"source": "digits", "image_size": 32},
            "resources": {"cpus_per_worker": 1},
            "space": {"strategy": "linear_probe"},
        }
    )
    single = ensure_features(str(tmp_path / "single"), "efficientnet_lite0", "package", data, 32)
    lines: list[str] = []
    with ray_session(None):
        refs = prepare_feature_cache(
            config, data, ray.put(data), str(tmp_path / "pool"), lines.append
        )
        held = ray.get(refs["efficientnet_lite0"])
        assert not isinstance(held, np.memmap)
        again = prepare_feature_cache(
            config, data, ray.put(data), str(tmp_path / "pool"), lines.append
        )
        mapped_file = FeatureFile(
            str(tmp_path / "pool"),
            single.key.digest(),
            dataclasses.asdict(single.key),
            1500,
            1280,
        )
        mapped = mapped_file.open()
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        assert list((session / "raytl_features").glob("*.npy")) == [
            session / "raytl_features" / f"{single.key.digest()}.npy"
        ]
        del again
    assert "efficientnet_lite0 computed by 2 actor(s) 1500x1280" in lines[0]
    assert "trials read it through the object store" in lines[0]
    assert "efficientnet_lite0 read 1500x1280" in lines[1]
    path = entry_path(str(tmp_path / "pool"), single.key)  # the single process's key: one entry
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 2 and parquet.metadata.row_group(0).num_rows == 1024
    np.testing.assert_allclose(held, single.features, rtol=1e-4, atol=1e-5)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, held)
    assert mapped_file.path == path
    with pytest.raises(FeatureCacheError, match="only inside a Ray search"):
        mapped_file.open()  # no Ray session folder to copy it into (nothing left in /tmp)

    hp = Hyperparameters(
        strategy="linear_probe",
        backbone="efficientnet_lite0",
        head_lr=0.01,
        batch_size=64,
        epochs=1,
    )
    train, val = np.arange(0, 1000), np.arange(1000, 1500)
    heads = []
    for features in (held, mapped):
        trainer = UnitTrainer(
            hp, data, train, val, pretrained="package", image_size=32, seed=1, features=features
        )
        epoch = trainer.run_epoch()
        heads.append((epoch["val_loss"], trainer.classifier.weight.detach().clone()))
    assert heads[0][0] == heads[1][0] and torch.equal(heads[0][1], heads[1][1])


def test_features_are_streamed_when_asked_or_too_large_for_memory(tmp_path):
    def config(mode):
        return parse_space({"data": {"source": "imagefolder", "path": str(tmp_path), "mode": mode}})

    assert streams_features(config("stream"), 10, 8) == (True, "data.mode: stream")
    assert streams_features(config("memory"), 10**9, 8) == (False, "data.mode: memory")
    streamed, why = streams_features(config("auto"), 1500, 1280)
    assert not streamed and why.startswith("0.01 GB <= 25% of ")
    streamed, why = streams_features(config("auto"), 10**9, 1280)
    assert streamed and why.startswith("5120.00 GB > 25% of ")
