"""One writer for every file: atomic locally, and the same calls on any pyarrow filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytl.storage import Storage, atomic_write, is_uri


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write(target, "old\n")

    def half_written(path: str) -> None:
        with open(path, "w") as f:
            f.write("new, cut")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_written)
    assert target.read_text() == "old\n"  # the reader still sees the complete old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left
    atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n"


def test_storage_names_paths_and_uris_alike(tmp_path):
    local = Storage(tmp_path / "exp")
    assert not is_uri(local.uri) and local.is_local
    local.write("best/metrics.json", "{}")
    assert local.is_file("best", "metrics.json") and local.read_bytes("best/metrics.json") == b"{}"
    assert local.uri_of("feature_cache") == f"{tmp_path}/exp/feature_cache"

    uri = Storage(f"file://{tmp_path}/exp")
    assert uri.is_file("best", "metrics.json")
    uri.write("space.yaml", lambda path: Path(path).write_text("name: x\n"))
    assert (tmp_path / "exp" / "space.yaml").read_text() == "name: x\n"
    assert [p.name for p in (tmp_path / "exp").iterdir() if p.name.startswith(".")] == []


def test_uri_of_keeps_the_query_of_an_s3_uri(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # naming a location connects to nothing
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3 = Storage("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert (
        is_uri(s3.uri)
        and not s3.is_local
        and s3.path("feature_cache") == "bucket/runs/feature_cache"
    )
    assert s3.uri_of("feature_cache") == (
        "s3://bucket/runs/feature_cache?endpoint_override=127.0.0.1:9&scheme=http"
    )
