"""Backbones: the offline weights map correctly, checkpoints load without pickle, blocks are ordered."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from raytl.errors import RaytlError
from raytl.models import (
    PACKAGE_WEIGHTS,
    backbone_blocks,
    check_pretrained,
    count_blocks,
    create_model,
    head_parameter_names,
    load_package_weights,
    load_saved_model,
    package_weights_path,
    save_model,
)
from raytl.preprocess import BatchPreparer, preprocessing_for

# the backbones with offline ImageNet weights: tensors in the package, timm's pretrained input size
PACKAGED = {
    "efficientnet_lite0": (296, 224),
    "efficientnet_lite1": (386, 240),
    "efficientnet_lite2": (386, 260),
}


@pytest.fixture(scope="module", params=sorted(PACKAGED))
def imagenet_model(request):
    """timm's backbone with the package's weights, ImageNet head kept (create_model replaces it)."""
    model = timm.create_model(request.param, pretrained=False)
    load_package_weights(model, request.param)
    return request.param, model.eval()


def test_every_packaged_backbone_is_tested():
    assert sorted(PACKAGE_WEIGHTS) == sorted(PACKAGED)


@pytest.mark.parametrize("backbone", sorted(PACKAGED))
def test_package_weights_load_every_tensor(backbone):
    source = torch.load(package_weights_path(backbone), map_location="cpu", weights_only=True)
    target = create_model(backbone, 10, "package").state_dict()
    assert len(source) == len(target) == PACKAGED[backbone][0]
    # reset_classifier(10) replaces the head: compare every other tensor, in order
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if dst_name.startswith("classifier"):
            assert dst.shape[0] == 10
            continue
        assert torch.equal(src, dst), (src_name, dst_name)


# ImageNet 285 "Egyptian cat" (any of 281-285, the domestic cats, under a tighter crop), 967 "espresso"
PHOTOS = [("chelsea", 285, range(281, 286)), ("coffee", 967, range(967, 968))]


@pytest.mark.parametrize(("photo", "label", "cropped_labels"), PHOTOS)
def test_package_weights_recognise_real_photographs(imagenet_model, photo, label, cropped_labels):
    """At timm's pretrained input size, through timm's own eval transforms on the image's centre
    square (crop_pct 1, the view raytl's preparer takes) and through raytl's preparer; timm's
    default crop_pct (0.875-0.89) cuts the cat's ears off, and Lite0 then sees a tabby (281)."""
    skimage_data = pytest.importorskip("skimage.data")
    backbone, model = imagenet_model
    pixels = getattr(skimage_data, photo)()  # uint8 RGB photograph
    config = timm.data.resolve_data_config({}, model=model)
    size = PACKAGED[backbone][1]
    assert config["input_size"] == (3, size, size)
    image = Image.fromarray(pixels)
    views = [timm.data.create_transform(**config)(image).unsqueeze(0)]
    views.append(timm.data.create_transform(**{**config, "crop_pct": 1.0})(image).unsqueeze(0))
    side = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = np.ascontiguousarray(pixels[top : top + side, left : left + side])
    views.append(BatchPreparer(preprocessing_for(model, size), torch.device("cpu"))(square[None]))
    with torch.no_grad():
        cropped, whole, ours = model(torch.cat(views)).argmax(dim=1).tolist()
    assert (whole, ours) == (label, label)
    assert cropped in cropped_labels


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite3"])
def test_package_weights_only_for_the_packaged_backbones(backbone):
    supported = "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
    expected = f"'package' weights exist only for {supported}, not {backbone};"
    with pytest.raises(RaytlError, match=expected):
        create_model(backbone, 10, "package")
    with pytest.raises(RaytlError, match=expected):
        check_pretrained(backbone, "package")


def test_block_counts_follow_timm_grouping():
    for backbone in PACKAGED:  # stem + 7 stages (conv_head joins the last)
        assert count_blocks(backbone) == 8
    assert count_blocks("resnet18") == 5  # stem + 4 stages
    assert count_blocks("vit_small_patch16_224") == 13
    with pytest.raises(RaytlError, match="not a timm model"):
        count_blocks("no_such_net")


def test_blocks_cover_every_parameter_once_and_exclude_the_head():
    model = create_model("resnet18", 7, "none")
    blocks = backbone_blocks(model)
    head = head_parameter_names(model)
    assert head == ["fc.weight", "fc.bias"]
    names = [n for b in blocks for n in b]
    assert len(names) == len(set(names))
    assert set(names) | set(head) == {n for n, _ in model.named_parameters()}
    assert blocks[0][0].startswith("conv1")  # stem first
    assert blocks[-1][0].startswith("layer4")


def test_checkpoint_path_loads_without_pickle(tmp_path):
    source = create_model("resnet18", 5, "none")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model("resnet18", 3, str(path))  # another task's head is skipped
    for name, tensor in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, loaded.state_dict()[name])
    assert loaded.get_classifier().out_features == 3


def test_checkpoint_needing_code_to_unpickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would have run code",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(RaytlError, match="not a plain state dict"):
        create_model("resnet18", 3, str(path))


def test_checkpoint_of_another_architecture_fails_clearly(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_model("resnet18", 5, "none").state_dict(), path)
    with pytest.raises(RaytlError, match="does not fit"):
        create_model("efficientnet_lite0", 5, str(path))


def test_a_search_with_weights_of_another_architecture_stops_before_ray(tmp_path):
    """The check runs once when the space is read, not inside every trial."""
    weights = tmp_path / "resnet18.safetensors"
    save_file(create_model("resnet18", 5, "none").state_dict(), str(weights))
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "w",
                "data": {"source": "digits", "limit": 200},
                "model": {"backbone": "efficientnet_lite0", "pretrained": str(weights)},
                "space": {"strategy": "fine_tune"},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "raytl", "search", str(space), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"raytl: error: {space}: model.pretrained: {weights}: does not fit"), (
        line
    )
    assert "backbone efficientnet_lite0" in line and "\n" not in line
    assert not (tmp_path / "out" / "ray").exists()  # Ray never started


def test_preprocessing_follows_pretrained_config():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    pre = preprocessing_for(vit, 96)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic" and pre.image_size == 96


def test_save_and_load_round_trip(tmp_path):
    model = create_model("resnet18", 4, "none").eval()
    pre = preprocessing_for(model, 32)
    save_model(
        tmp_path, model, backbone="resnet18", class_names=["a", "b", "c", "d"], preprocessing=pre
    )
    loaded, pre2, names, _ = load_saved_model(tmp_path)
    assert names == ["a", "b", "c", "d"] and pre2 == pre
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
