"""docs/tutorial.md runs as written: every command of its ``console`` blocks, in order, on a small
image folder built here from Fashion-MNIST (three classes as PNG files, one broken file).

``RAYTL_WRITE_TUTORIAL=1`` also writes each command's real output into the document (the
temporary folder shown as ``~/tutorial``), which is how the outputs in it were made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "tutorial.md"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)
CLASSES = {"Bag": "bag", "Sneaker": "sneaker", "Trouser": "trouser"}


def build_folders(root: Path, train: int = 100, test: int = 30) -> None:
    """``my-images`` (``train`` PNGs per class and one broken file) and ``my-test-images``."""
    from raytl.data import load_data

    fashion = load_data("fashion-mnist", limit=3000, seed=0)
    for name, folder in CLASSES.items():
        rows = np.flatnonzero(fashion.labels == fashion.class_names.index(name))
        assert len(rows) >= train + test
        for split, picked in (("my-images", rows[:train]), ("my-test-images", rows[train:][:test])):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(picked):
                pixels = fashion.images[row][:, :, 0]
                Image.fromarray(pixels).save(root / split / folder / f"{i:04d}.png")
    (root / "my-images" / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n half a file")


def commands(text: str) -> list[tuple[str, str]]:
    """(command, the block's text) of every console block: the line after ``$ ``, continued to
    ``EOF`` for a here-document."""
    found = []
    for match in BLOCK.finditer(text):
        lines = match.group(1).splitlines()
        assert lines and lines[0].startswith("$ "), f"a console block starts with '$ ': {lines[:1]}"
        command = [lines[0][2:]]
        if "<<'EOF'" in command[0]:
            command += lines[1 : lines.index("EOF") + 1]
        found.append(("\n".join(command), match.group(0)))
    return found


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    build_folders(tmp_path)
    text = TUTORIAL.read_text()
    steps = commands(text)
    assert [c.split()[1] for c, _ in steps if c.startswith("raytl")] == [
        "data",
        "search",
        "evaluate",
        "predict",
        "export",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = {}
    for command, block in steps:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # as a terminal shows them: in the order they were written
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-5000:]}"
        outputs[block] = (command, done.stdout)
    said = {command.split("\n")[0]: out for command, out in outputs.values()}
    assert "broken.png" in said["raytl data inspect my-images"]
    assert (
        "best configuration: test accuracy"
        in said["raytl search my-images.yaml --output runs/my-images"]
    )
    assert (tmp_path / "runs" / "my-images" / "evaluation" / "confusion_matrix.png").is_file()
    assert said["head -n 3 predictions.csv"].startswith("path,class_1,prob_1,class_2,prob_2")
    assert (tmp_path / "runs" / "my-images" / "best" / "model.onnx").is_file()
    if os.environ.get("RAYTL_WRITE_TUTORIAL") == "1":
        for block, (command, out) in outputs.items():
            shown = out.replace(str(tmp_path), "~/tutorial").rstrip("\n")
            body = command if "<<'EOF'" in command else f"{command}\n{shown}" if shown else command
            text = text.replace(block, f"```console\n$ {body}\n```")
        TUTORIAL.write_text(text)
