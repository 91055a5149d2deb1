"""S3 for real: a moto S3 server process on 127.0.0.1, Parquet shards written to it by
``raytl data convert``, a search reading them with its Tune experiment on the same bucket, the
driver killed mid-search, ``raytl resume`` from the bucket, and the results read back from it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from raytl.cluster import free_port
from raytl.storage import join_location
from tests.conftest import remove_ray_temp_of

KEYS = {"AWS_ACCESS_KEY_ID": "raytl-test", "AWS_SECRET_ACCESS_KEY": "raytl-test-secret"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server of this module's own (stopped afterwards, nothing else touched), with a
    bucket; yields ``uri(key)``, which names a key on it as pyarrow reads it."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    assert server, "moto_server not found: pip install -e '.[dev]' (it brings moto[server])"
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    saved = {key: os.environ.get(key) for key in KEYS}
    os.environ.update(KEYS)  # the search's subprocesses and their Ray workers inherit them
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        fs = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
            **_keys(),
        )
        fs.create_dir("raytl-test")
        yield lambda key: f"s3://raytl-test/{key}?{query}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _keys() -> dict[str, str]:
    return {
        "access_key": KEYS["AWS_ACCESS_KEY_ID"],
        "secret_key": KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def _digits_folder(root: Path, classes: int = 3, per_class: int = 50) -> Path:
    """scikit-learn's digits as an image folder of real PNG files (8x8 upscaled to 32 px)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(classes):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for i, image in enumerate(images):
            pixels = (image * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).save(folder / f"{i:03d}.png")
    return root


def _raytl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raytl", *args], capture_output=True, text=True, **kwargs
    )


def test_convert_to_s3_then_read_the_shards_back(s3, tmp_path):
    from raytl.data.sources.parquet import load_parquet

    src = _digits_folder(tmp_path / "digits")
    shards = s3("convert-check/shards")
    done = _raytl("data", "convert", str(src), shards, "--shard-size", "40", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote 4 shard(s) to s3://raytl-test/convert-check/shards" in done.stdout
    data = load_parquet(path=shards, image_size=32)
    assert len(data.labels) == 150 and data.class_names == ("digit_0", "digit_1", "digit_2")
    assert sorted(np.bincount(data.labels)) == [50, 50, 50]
    # a second conversion into the same prefix is refused: shards are never mixed
    again = _raytl("data", "convert", str(src), shards, timeout=300)
    assert again.returncode != 0 and "already holds part-00000.parquet" in again.stderr


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_an_image_folder_on_the_bucket_reads_as_the_local_one(s3, tmp_path, mode):
    """``data.path: s3://.../folder`` with ``source: imagefolder``: the same classes, labels and
    pixels as the local folder (hidden and non-image files skipped), held or streamed."""
    from raytl.data import load_data

    src = _digits_folder(tmp_path / "digits", per_class=8)
    (src / "digit_1" / ".hidden.png").write_bytes((src / "digit_1" / "000.png").read_bytes())
    (src / "digit_2" / "notes.txt").write_text("not an image")
    for i, nested in enumerate(("a-b/x.png", "a/b.png", "a/c/d.png", "a.png")):  # path order
        (src / "digit_0" / nested).parent.mkdir(parents=True, exist_ok=True)
        (src / "digit_0" / nested).write_bytes((src / "digit_1" / f"00{i}.png").read_bytes())
    uri = s3(f"folder-{mode}")
    fs, root = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(src), root, destination_filesystem=fs)
    with pytest.warns(UserWarning, match="ignored 1 file.*: digit_2/notes.txt"):
        local = load_data("imagefolder", path=str(src), image_size=16)
    with pytest.warns(UserWarning, match="ignored 1 file.*: digit_2/notes.txt"):
        remote = load_data("imagefolder", path=uri, image_size=16, mode=mode)
    assert remote.streamed == (mode == "stream")
    assert remote.class_names == local.class_names and remote.source == uri.split("?")[0]
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.images[:], local.images)
    if mode == "stream":
        assert remote.images.name(0) == f"{uri.split('?')[0]}/digit_0/000.png"
        assert remote.images.rows.paths.type == pa.string()  # one array, no object per file
    # a sample is taken on the listing, before anything is read: the local one's
    with pytest.warns(UserWarning, match="ignored 1 file"):
        few = load_data("imagefolder", path=uri, image_size=16, mode=mode, limit=9, seed=3)
    with pytest.warns(UserWarning, match="ignored 1 file"):
        few_local = load_data("imagefolder", path=str(src), image_size=16, limit=9, seed=3)
    np.testing.assert_array_equal(few.labels, few_local.labels)
    np.testing.assert_array_equal(few.images[:], few_local.images)


def test_a_class_folder_on_the_bucket_without_images_is_named(s3, tmp_path):
    from raytl.data import load_data
    from raytl.data.dataset import DataError

    src = _digits_folder(tmp_path / "digits", classes=2, per_class=2)
    (src / "empty").mkdir()
    (src / "empty" / "notes.txt").write_text("not an image")
    uri = s3("folder-empty-class")
    fs, root = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(src), root, destination_filesystem=fs)
    with pytest.raises(DataError, match=r"class folder s3://\S+/empty contains no image files"):
        load_data("imagefolder", path=uri, image_size=16)


def test_unreachable_storage_is_one_line_naming_the_uri(tmp_path):
    from raytl.data.dataset import DataError
    from raytl.data.sources.shards import scan_parquet

    dead = f"s3://nowhere/shards?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    env = {**os.environ, **KEYS, "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with pytest.raises(DataError, match=r"^parquet path s3://nowhere/shards cannot be read"):
            scan_parquet(dead)


@pytest.mark.slow
def test_search_on_s3_killed_then_resumed_from_the_bucket(s3, tmp_path):
    src = _digits_folder(tmp_path / "digits")
    shards = s3("e2e/shards")
    assert _raytl("data", "convert", str(src), shards, timeout=300).returncode == 0
    storage = s3("e2e/runs")
    space = {
        "name": "s3e2e",
        "data": {
            "source": "parquet",
            "path": shards,
            "image_size": 48,
            "test_fraction": 0.2,
            "mode": "stream",  # trials, the feature cache and the refit read from the bucket
        },
        "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
        "scheme": {"kind": "holdout"},
        "search": {
            "num_samples": 4,
            "max_concurrent": 1,
            "max_epochs": 2,
            "scheduler": "fifo",
            "seed": 4,
            "storage": storage,
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "space": {
            "strategy": {"choice": ["linear_probe", "fine_tune"]},
            "freeze_depth": 6,
            "head_lr": {"loguniform": [1.0e-2, 5.0e-2]},
            "batch_size": 16,
        },
    }
    space_file, out = tmp_path / "space.yaml", tmp_path / "out"
    space_file.write_text(yaml.safe_dump(space))
    driver = subprocess.Popen(
        [sys.executable, "-m", "raytl", "search", str(space_file), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in driver.stdout:  # kill the driver and its Ray once two trials are done
        seen.append(line)
        if re.search(r"\| [23]/4 done", line):
            break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    remove_ray_temp_of(driver.pid)  # SIGKILL left it behind
    assert re.search(r"\| [23]/4 done", seen[-1]), "".join(seen[-30:])
    assert any("data.mode: stream (150 images decoded at 48 px" in line for line in seen)
    # the feature cache went to the bucket; the probes read it memory-mapped, copied per node
    assert any("trials read it memory-mapped on each node (data.mode: stream)" in x for x in seen)

    refused = _raytl("resume", str(out), timeout=300)
    assert refused.returncode != 0 and "--trust-storage" in refused.stderr
    resumed = _raytl("resume", str(out), "--trust-storage", timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    local = pd.read_parquet(out / "results.parquet")
    assert len(local) == 4 and local["trial_id"].is_unique
    assert set(local["status"]) == {"completed"}

    # everything reviewable is on the bucket, in this run's own folder
    fs, root = pafs.FileSystem.from_uri(storage)
    runs = [
        i for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith("s3e2e-")
    ]
    assert len(runs) == 1
    run = runs[0].path
    remote = pq.read_table(f"{run}/results.parquet", filesystem=fs).to_pandas()
    assert sorted(remote["trial_id"]) == sorted(local["trial_id"])
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(run, recursive=True))}
    assert {"report.md", "tuner.pkl"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard runs
    everything = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert sum(i.base_name == "features.parquet" for i in everything) == 1
    assert join_location(storage, runs[0].base_name).startswith("s3://raytl-test/e2e/runs/s3e2e-")


@pytest.mark.parametrize("where", ["unreachable", "no such bucket"])
def test_storage_that_cannot_be_written_is_one_line_before_any_work(s3, tmp_path, where):
    """``search.storage`` is probed (a file written and removed) before the data is loaded or Ray
    starts: a server that does not answer, or a bucket that does not exist, is one line naming
    the location, exit 2."""
    storage = (
        f"s3://raytl-test/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
        if where == "unreachable"
        else s3("runs").replace("raytl-test", "no-such-bucket")
    )
    space = {
        "name": "probe",
        "data": {"source": "digits", "image_size": 32, "limit": 200},
        "search": {"num_samples": 1, "max_epochs": 1, "storage": storage},
        "space": {"strategy": "linear_probe"},
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    done = _raytl(
        "search",
        str(space_file),
        "--output",
        str(tmp_path / "out"),
        timeout=120,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    shown = storage.partition("?")[0]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"raytl: error: search.storage {shown} cannot be written: ")
    )
    assert "Traceback" not in done.stderr
