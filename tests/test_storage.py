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


def test_a_folder_of_files_appears_whole_or_keeps_the_old_one(tmp_path):
    from raytl.storage import atomic_folder

    best = tmp_path / "best"
    with atomic_folder(best) as staging:
        (staging / "model.safetensors").write_bytes(b"old model")
        (staging / "metrics.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"), atomic_folder(best) as staging:
        (staging / "model.safetensors").write_bytes(b"new model")
        raise OSError("disk full")  # before metrics.json: a best/ without it must never show
    assert sorted(p.name for p in best.iterdir()) == ["metrics.json", "model.safetensors"]
    assert (best / "model.safetensors").read_bytes() == b"old model"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no staging folder left


def test_bookkeeping_that_cannot_be_written_is_a_warning(tmp_path):
    """A full disk (here a file-size limit, RLIMIT_FSIZE) once ended the search on the trial
    clock's write; now the clock is a warning and the search goes on."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys, warnings\n"
        "from raytl.rundir import tick_trial_clock\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        f"    tick_trial_clock({str(tmp_path)!r}, 'a' * 64, 'launched_at')\n"
        "print(seen[0].message if seen else 'no warning')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "cannot record the trial clock" in proc.stdout and "search goes on" in proc.stdout
    assert not (tmp_path / ".trial_clock.json").exists()  # nothing half-written either
