"""The command line: `raytl train` then `raytl predict` on real image files, and clear user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from raytl.errors import RaytlError


def raytl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raytl", *args], capture_output=True, text=True, timeout=timeout
    )


def write_folder(root, digits, per_class=30):
    """A real image folder: PNG and JPEG files, one sub-folder per class, from the digits."""
    for k, name in enumerate(digits.class_names[:3]):
        folder = root / f"digit_{name}"
        folder.mkdir(parents=True)
        for j, index in enumerate(np.flatnonzero(digits.labels == k)[:per_class]):
            image = Image.fromarray(digits.images[index]).resize((24, 24), Image.NEAREST)
            image.save(folder / f"{j}.{'png' if j % 2 else 'JPG'}")
    return root


@pytest.mark.slow
def test_train_then_predict_on_an_image_folder(tmp_path, space_file, digits):
    folder = write_folder(tmp_path / "images", digits)
    (folder / "digit_0" / "broken.png").write_bytes(b"not a png at all")
    space = space_file(
        {
            "data": {
                "source": "imagefolder",
                "path": str(folder),
                "image_size": 32,
                "test_fraction": 0.25,
            },
            "search": {"max_epochs": 4},
            "space": {"strategy": "linear_probe", "head_lr": 0.05, "batch_size": 8},
        }
    )
    out = tmp_path / "out"
    proc = raytl("train", str(space), "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # a probe trains its head to convergence in one report, whatever max_epochs says
    assert "test accuracy" in proc.stdout and "epoch  1/1" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["images"] == 90 and metrics["test_accuracy"] > 0.6  # 3 classes
    assert "broken.png" in (out / "skipped.txt").read_text()
    assert json.loads((out / "class_names.json").read_text()) == ["digit_0", "digit_1", "digit_2"]

    proc = raytl("predict", str(out), str(folder / "digit_1"), "--top", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 30
    top = [line.split(": ")[1].split()[0] for line in lines]
    assert top.count("digit_1") >= 20  # most of the class is recognised

    again = raytl("train", str(space), "--output", str(out))
    assert (
        again.returncode == 2
        and "already exists" in again.stderr
        and "Traceback" not in again.stderr
    )


def test_data_inspect_lists_classes_and_bad_files(tmp_path, digits):
    folder = write_folder(tmp_path / "images", digits, per_class=3)
    (folder / "digit_2" / "empty.jpg").write_bytes(b"")
    proc = raytl("data", "inspect", str(folder), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digit_0" in proc.stdout and "empty.jpg" in proc.stdout


def test_missing_data_folder_is_one_clear_line(tmp_path, space_file):
    space = space_file({"data": {"source": "imagefolder", "path": str(tmp_path / "nope")}})
    proc = raytl("train", str(space), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "data.path" in proc.stderr


def test_overwrite_clears_only_what_a_search_wrote(tmp_path):
    from raytl.rundir import prepare_output, read_marker

    out = prepare_output(tmp_path / "out")
    first = read_marker(out)
    (out / "tensorboard" / "trial_x").mkdir(parents=True)
    (out / "results.parquet").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    prepare_output(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".raytl-run.json", "notes.txt"]
    assert read_marker(out).run_id != first.run_id  # a new run


def test_overwrite_never_clears_a_folder_raytl_did_not_make(tmp_path):
    """``--output ~`` once deleted ~/ray; a data folder with a class called ``best`` lost it."""
    from raytl.rundir import prepare_output

    data = tmp_path / "images"
    for name in ("best", "ray", "cats"):
        (data / name).mkdir(parents=True)
        (data / name / "1.png").write_bytes(b"png")
    with pytest.raises(RaytlError, match="clears only folders raytl made.*nothing was deleted"):
        prepare_output(data, overwrite=True)
    assert sorted(p.name for p in data.iterdir()) == ["best", "cats", "ray"]


def test_overwrite_refuses_home_root_parents_and_the_inputs(tmp_path, monkeypatch):
    from raytl.rundir import MARKER, prepare_output

    def marked(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text('{"run_id": "x", "raytl_version": "0", "created": 0}')
        (folder / "ray").mkdir(exist_ok=True)
        return folder

    home = marked(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(RaytlError, match="home folder"):
        prepare_output(home, overwrite=True)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    with pytest.raises(RaytlError, match="parent of the current folder"):
        prepare_output(marked(tmp_path / "a"), overwrite=True)
    runs = marked(tmp_path / "project")
    (runs / "spaces").mkdir()
    with pytest.raises(RaytlError, match="holds or lies inside"):  # holds the space file's folder
        prepare_output(runs, overwrite=True, protect=[runs / "spaces"])
    inner = marked(tmp_path / "data" / "out")
    with pytest.raises(RaytlError, match="holds or lies inside"):  # inside data.path
        prepare_output(inner, overwrite=True, protect=[tmp_path / "data"])
    for folder in (home, tmp_path / "a", runs, inner):
        assert (folder / "ray").is_dir()  # nothing was deleted


def test_publish_copies_results_and_runs_to_storage(tmp_path):
    from raytl.rundir import publish

    out = tmp_path / "out"
    (out / "tensorboard" / "trial_1" / "fold_0").mkdir(parents=True)
    (out / "tensorboard" / "trial_1" / "fold_0" / "events.out").write_bytes(b"events")
    (out / "best").mkdir()
    (out / "best" / "metrics.json").write_text("{}")
    (out / "results.csv").write_text("trial_id\n")
    publish(out, f"file://{tmp_path}/shared/exp")
    copied = sorted(
        p.relative_to(tmp_path / "shared" / "exp").as_posix()
        for p in (tmp_path / "shared" / "exp").rglob("*")
        if p.is_file()
    )
    assert copied == ["best/metrics.json", "results.csv", "tensorboard/trial_1/fold_0/events.out"]


def test_skipped_txt_keeps_a_file_name_that_is_not_utf8(tmp_path, synthetic):
    """A non-UTF-8 file name once broke skipped.txt (UnicodeEncodeError)."""
    import dataclasses
    import os

    from raytl.data.dataset import SkippedFile
    from raytl.rundir import write_skipped

    name = os.fsdecode(b"/data/cats/caf\xe9.jpg")  # Latin-1 bytes: a surrogate in Python
    data = dataclasses.replace(synthetic, skipped=(SkippedFile(name, f"truncated ({name})"),))
    write_skipped(tmp_path, data)
    assert (tmp_path / "skipped.txt").read_bytes() == (
        b"/data/cats/caf\xe9.jpg\ttruncated (/data/cats/caf\xe9.jpg)\n"
    )


def test_an_address_that_is_not_a_ray_dashboard_is_one_line(capsys):
    """A proxy's 404 once surfaced as a traceback (RuntimeError: Version check returned 404)."""
    import http.server
    import threading

    from raytl.cli import main

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotRay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = main(["jobs", "--address", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not as a Ray dashboard" in err
