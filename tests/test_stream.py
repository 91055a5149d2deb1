"""The streaming data path on real image files: the same pixels, labels and splits as memory,
an index that pickles small, block-shuffled Parquet reads, bad files named, and a trainer that
trains exactly as on the in-memory array."""

from __future__ import annotations

import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytl.data import convert_imagefolder, load_data
from raytl.data.stream import (
    WINDOW_BLOCKS,
    ShardRows,
    StreamReadError,
    choose_mode,
    epoch_order,
    map_in_shares,
)
from raytl.errors import ConfigError
from raytl.space import Hyperparameters
from raytl.space_file import load_space
from raytl.unit import UnitTrainer
from tests.conftest import write_space


def photo(path: Path, seed: int, size=(40, 30), fmt="JPEG") -> Path:
    """A noisy colour image (every file's bytes differ), JPEG or PNG."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def make_folder(root: Path, per_class: int = 12, classes=("ant", "bee", "cow")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            photo(root / name / f"{i:03d}.{fmt.lower()}", seed=100 * c + i, fmt=fmt)
    return root


def load(source: str, path: Path, mode: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped-file warning; skipped is checked instead
        return load_data(source, path=str(path), image_size=24, mode=mode, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("stream") / "folder")
    broken = photo(root / "bee" / "zz_broken.jpg", seed=7)
    broken.write_bytes(broken.read_bytes()[:300])  # truncated: no JPEG end marker
    (root / "cow" / "copy.png").write_bytes((root / "cow" / "000.png").read_bytes())
    shards = root.parent / "shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_imagefolder(str(root), str(shards), shard_size=16)
    return root, shards


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_streamed_rows_decode_to_the_in_memory_pixels(folders, source):
    """Labels, groups (the byte-identical copy), skipped files and every pixel as in memory; the
    index pickles small and decodes the same after a round trip (what a worker receives)."""
    root, shards = folders
    path = root if source == "imagefolder" else shards
    memory, stream = load(source, path, "memory"), load(source, path, "stream")
    assert stream.streamed and not memory.streamed
    np.testing.assert_array_equal(stream.labels, memory.labels)
    np.testing.assert_array_equal(stream.group_ids, memory.group_ids)
    assert stream.duplicates == memory.duplicates == 1
    assert [s.path for s in stream.skipped] == [s.path for s in memory.skipped]
    np.testing.assert_array_equal(stream.images[:], memory.images)
    rows = np.array([5, 0, len(stream) - 1, 5])
    np.testing.assert_array_equal(stream.images[rows], memory.images[rows])
    np.testing.assert_array_equal(stream.images[3], memory.images[3])
    sent = pickle.dumps(stream)
    assert len(sent) < 20_000  # the index, not the pixels (36 images at 24 px: 62 KB)
    np.testing.assert_array_equal(pickle.loads(sent).images[rows], memory.images[rows])
    part = stream.subset(np.array([2, 9]))
    np.testing.assert_array_equal(part.images[:], memory.images[[2, 9]])
    assert stream.fingerprint == load(source, path, "stream").fingerprint
    limited = load(source, path, "stream", limit=12, seed=1)
    np.testing.assert_array_equal(
        limited.labels, load(source, path, "memory", limit=12, seed=1).labels
    )


def test_parquet_epochs_read_a_few_row_groups_at_a_time_and_mix_classes(tmp_path):
    """A streamed Parquet epoch is a permutation of the rows in which each window of row groups
    is read together (a batch needs a few cached groups, not one read per row); its batches mix
    the classes even when every row group holds one class (shards written class by class), and
    ``raytl data convert`` writes the rows shuffled, so its row groups mix them already."""
    root = make_folder(tmp_path / "folder", per_class=40)
    convert_imagefolder(str(root), str(tmp_path / "sorted"), shard_size=4, shuffle_seed=None)
    data = load("parquet", tmp_path / "sorted", "stream")
    assert isinstance(data.images.rows, ShardRows)
    rows = np.arange(0, len(data), 2)
    order = epoch_order(data.images, rows, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(rows)))
    np.testing.assert_array_equal(order, epoch_order(data.images, rows, np.random.default_rng(0)))
    blocks = data.images.rows.blocks()[rows[order]]
    assert len(np.unique(blocks)) == 30 > WINDOW_BLOCKS
    window = 2 * WINDOW_BLOCKS  # rows per window: 16 groups of 2 chosen rows
    assert all(
        len(np.unique(blocks[s : s + window])) <= WINDOW_BLOCKS for s in range(0, 60, window)
    )
    labels = data.labels[rows[order]]
    assert np.mean([len(np.unique(labels[s : s + 8])) for s in range(0, 56, 8)]) >= 2  # 3 classes

    convert_imagefolder(str(root), str(tmp_path / "shuffled"), shard_size=4)
    mixed = load("parquet", tmp_path / "shuffled", "stream")
    groups = mixed.labels.reshape(-1, 4)  # one row group per 4-row shard
    assert np.mean([len(np.unique(g)) for g in groups]) > 1.5
    assert sorted(mixed.labels.tolist()) == sorted(data.labels.tolist())


def test_a_shards_footer_is_read_once_by_the_driver_and_once_by_each_worker(tmp_path):
    """On a bucket each footer read is requests: the driver reads every shard's footer when it
    scans the shards and opens them with it after; a worker's ShardRows reads a shard's footer
    with its first row group and not again. Checked by breaking the footers on disk after."""
    from raytl.data.images import DEFAULT_MAX_PIXELS
    from raytl.data.sources.parquet import chosen_rows, parquet_tasks, stream_parquet
    from raytl.data.sources.shards import scan_parquet

    root = make_folder(tmp_path / "folder", per_class=8)
    shards = tmp_path / "shards"
    convert_imagefolder(str(root), str(shards), shard_size=24)
    for file in sorted(shards.glob("*.parquet")):  # row groups of 6 rows, metadata kept
        pq.write_table(pq.read_table(file), file, row_group_size=6)

    def break_footers() -> None:  # the trailing length and magic bytes zeroed
        for file in shards.glob("*.parquet"):
            with file.open("r+b") as f:
                f.seek(-8, 2)
                f.write(bytes(8))

    scanned = scan_parquet(str(shards))
    expected = load("parquet", shards, "stream")
    worker = pickle.loads(pickle.dumps(expected.images.rows))
    first = np.flatnonzero(worker.block == 0)[:1]  # a row of shard 0's first row group
    assert worker.read(first, lambda fn, n: [fn(i) for i in range(n)])[0]
    break_footers()
    with pytest.raises(Exception, match="magic bytes"):
        pq.read_metadata(next(shards.glob("*.parquet")))

    chosen = chosen_rows(scanned, None, 0)
    np.testing.assert_array_equal(chosen.labels, expected.labels)
    streamed = stream_parquet(
        scanned, chosen, image_size=24, on_bad_file="skip", max_pixels=DEFAULT_MAX_PIXELS
    )
    np.testing.assert_array_equal(streamed.labels, expected.labels)  # its rows unread yet
    assert len(parquet_tasks(scanned)) == len(expected)
    shard0 = worker.row_groups[worker.block, 0] == 0
    later = np.flatnonzero(shard0 & (worker.block != 0))  # shard 0, its other row groups
    part = worker.subset(later)  # a unit's rows, in the same process: the footer is known
    blobs = part.read(np.arange(len(later)), lambda fn, n: [fn(i) for i in range(n)])
    assert len(later) == 18 and all(blobs)


def test_a_file_broken_mid_stream_is_dropped_from_training_and_named(folders, tmp_path, capsys):
    root, _ = folders
    copy = tmp_path / "folder"
    make_folder(copy, per_class=4)
    data = load("imagefolder", copy, "stream")
    victim = copy / "bee" / "001.jpeg"
    victim.write_bytes(victim.read_bytes()[:200])  # damaged after the index was built
    files = data.images.rows
    row = [files.path(i) for i in range(len(files))].index(str(victim))
    rows = np.array([0, row, 2])
    with pytest.raises(StreamReadError, match=f"{victim}: cannot be decoded mid-stream"):
        data.images[rows]
    pixels, kept = data.images.take_readable(rows)
    assert kept.tolist() == [0, 2] and len(pixels) == 2
    data.images.take_readable(rows)
    err = capsys.readouterr().err
    assert err.count(f"skipped {victim} mid-stream") == 1  # named once per process


def test_a_batch_is_decoded_in_one_share_per_thread_and_comes_back_in_order():
    from concurrent.futures import ThreadPoolExecutor

    seen: list[tuple[str, int]] = []

    def work(i: int) -> int:
        seen.append((threading.current_thread().name, i))
        return i * i

    with ThreadPoolExecutor(3) as pool:
        assert map_in_shares(pool, 3, work, 7) == [i * i for i in range(7)]
        assert map_in_shares(pool, 3, work, 2) == [0, 1]  # fewer positions than threads
        assert map_in_shares(pool, 3, work, 0) == []
    thread_of: dict[int, str] = {i: name for name, i in seen[:7]}
    for share in ([0, 3, 6], [1, 4], [2, 5]):  # every third position, on one thread each
        assert len({thread_of[i] for i in share}) == 1


def test_auto_mode_streams_what_would_not_fit_and_says_so(tmp_path):
    mode, why = choose_mode("auto", 200_000, 224, memory=32 * 10**9)
    assert mode == "stream" and "30.11 GB > 25% of this machine's 32.0 GB" in why
    mode, why = choose_mode("auto", 10_000, 64, memory=32 * 10**9)
    assert mode == "memory" and "<= 25%" in why
    assert choose_mode("stream", 10, 64)[0] == "stream"
    data = load("imagefolder", make_folder(tmp_path / "f", per_class=4), "auto")
    assert not data.streamed and data.note.startswith("data.mode auto: memory (12 images")


def test_stream_mode_needs_a_file_source(tmp_path):
    path = write_space(tmp_path, {"data": {"source": "digits", "mode": "stream"}})
    with pytest.raises(ConfigError, match="data.mode.*imagefolder or parquet source, not digits"):
        load_space(path)


def test_a_trainer_on_streamed_files_trains_exactly_as_in_memory(folders):
    """Files are streamed in the same seeded order as the array is indexed, so one epoch of
    fine-tuning gives the same weights and metrics, whichever way the pixels arrive."""
    root, _ = folders
    results = []
    for mode in ("memory", "stream"):
        data = load("imagefolder", root, mode)
        hp = Hyperparameters(
            backbone="efficientnet_lite0",
            strategy="fine_tune",
            epochs=1,
            batch_size=8,
            freeze_depth=4,
            augment=True,
        )
        trainer = UnitTrainer(
            hp,
            data,
            np.arange(0, len(data), 2),
            np.arange(1, len(data), 2),
            pretrained="package",
            image_size=24,
            device=torch.device("cpu"),
            seed=3,
        )
        metrics = trainer.run_epoch()
        head = trainer.classifier.weight.detach().clone()
        results.append((metrics["train_loss"], metrics["val_accuracy"], head))
    (loss_m, acc_m, head_m), (loss_s, acc_s, head_s) = results
    assert loss_m == pytest.approx(loss_s, rel=1e-6) and acc_m == acc_s
    torch.testing.assert_close(head_m, head_s)


def test_a_shard_that_cannot_be_read_mid_stream_is_one_line_naming_it(tmp_path):
    root = make_folder(tmp_path / "folder", per_class=4)
    convert_imagefolder(str(root), str(tmp_path / "shards"), shard_size=6)
    data = load("parquet", tmp_path / "shards", "stream")
    held = load("parquet", tmp_path / "shards", "memory")
    shard = tmp_path / "shards" / "part-00001.parquet"
    shard.write_bytes(b"PAR1 overwritten since the search started")
    rows = np.arange(len(data))
    with pytest.raises(StreamReadError, match=rf"^{shard}: row group 0 cannot be read mid-stream"):
        data.images[rows]
    with pytest.raises(StreamReadError, match=f"^{shard}: row group 0"):
        data.images.take_readable(rows)  # a whole shard is not a file to drop from a batch
    np.testing.assert_array_equal(data.images[:6], held.images[:6])  # the other shards still read
