"""``raytl export``: a saved timm model as TorchScript and ONNX files that load on their own
runtime and give the PyTorch model's logits (the parity it prints) and top classes on real
image files; an export out of tolerance is one clear error and leaves no file."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

from raytl.data.images import decode_image
from raytl.models import load_saved_model
from raytl.preprocess import BatchPreparer
from tests.conftest import save_test_model
from tests.test_cli import raytl
from tests.test_stream import photo

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """efficientnet_lite0 with the packaged ImageNet weights and a new 3-class head, saved as
    raytl saves a model, and a few real JPEG and PNG files."""
    root = tmp_path_factory.mktemp("export")
    save_test_model(root / "model", 48)
    fmt = ("JPEG", "PNG")
    images = [photo(root / f"{i}.img", seed=i, fmt=fmt[i % 2]) for i in range(5)]
    return root / "model", images


def model_inputs(model_dir, images):
    """The image files through the saved model's preprocessing, and the PyTorch logits."""
    model, pre, _, _ = load_saved_model(model_dir)
    pixels = np.stack(
        [decode_image(p.read_bytes(), size=pre.image_size, max_pixels=10**8) for p in images]
    )
    x = BatchPreparer(pre, torch.device("cpu"))(pixels).contiguous()
    with torch.no_grad():
        return x, model.eval()(x).numpy()


def parity(stdout):
    match = re.search(r"largest absolute logit difference (\S+) \(tolerance (\S+)\)", stdout)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


def test_torchscript_export_loads_and_matches(tmp_path, saved):
    model_dir, images = saved
    out = tmp_path / "model.pt"
    proc = raytl("export", str(model_dir), "--format", "torchscript", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    diff, tolerance = parity(proc.stdout)
    print(proc.stdout.strip())
    assert tolerance == TOLERANCE and diff <= TOLERANCE and "same top class on 4/4" in proc.stdout

    x, expected = model_inputs(model_dir, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
        loaded = torch.jit.load(str(out))
    with torch.no_grad():
        got = loaded(x).numpy()
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_onnx_export_loads_and_matches(tmp_path, saved):
    model_dir, images = saved
    proc = raytl("export", str(model_dir), "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    diff, _ = parity(proc.stdout)
    print(proc.stdout.strip())
    assert diff <= TOLERANCE
    out = model_dir / "model.onnx"  # the default: beside the model
    assert f"exported {out} (onnx)" in proc.stdout

    x, expected = model_inputs(model_dir, images)  # 5 images: the batch dimension is dynamic
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"pixels": x.numpy()})[0]
    assert got.shape == (5, 3) and np.abs(got - expected).max() <= TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_an_export_out_of_tolerance_is_one_line_and_leaves_no_file(tmp_path, saved):
    model_dir, _ = saved
    out = tmp_path / "strict.onnx"
    proc = raytl(
        "export", str(model_dir), "--format", "onnx", "--output", str(out), "--tolerance", "0"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # ONNX Runtime's float kernels are not bit-exact
    assert (
        "differ from the PyTorch model's by up to" in proc.stderr and "--tolerance" in proc.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_without_onnx_the_error_names_the_extra(tmp_path, saved):
    model_dir, _ = saved
    code = (
        "import sys; sys.modules['onnx'] = None  # as if not installed: importing it fails\n"
        "from raytl.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "export", str(model_dir), "--format", "onnx"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "raytl[export]" in proc.stderr and proc.stderr.strip().count("\n") == 0
