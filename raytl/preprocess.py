"""Pixels to model input: the backbone's own normalisation, resizing and batch preparation.

Images are stored as uint8 ``(N, H, W, 3)``; :class:`BatchPreparer` turns a batch of them into
normalised float input at the model's size, on the trainer's device (pinned, non-blocking copies
and channels_last on a GPU), with optional per-image augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

AUGMENT_SCALE = (0.35, 1.0)  # RandomResizedCrop's area range: small images lose little


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input: the backbone's pretrained normalisation, at our image size."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    image_size: int


def preprocessing_for(model: nn.Module, image_size: int) -> Preprocessing:
    """The backbone's pretrained normalisation and interpolation, at ``image_size``."""
    cfg = timm.data.resolve_model_data_config(model)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    mean, std = cfg["mean"], cfg["std"]
    return Preprocessing(
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        interpolation=interpolation,
        image_size=image_size,
    )


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class BatchPreparer:
    """Turns stored uint8 images (N, H, W, 3) into normalised model input at the model's size."""

    def __init__(self, pre: Preprocessing, device: torch.device) -> None:
        self.pre = pre
        self.device = device
        self.cuda = device.type == "cuda"
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        # per image: a random resized crop at the model's size and a horizontal flip
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(pre.image_size, scale=AUGMENT_SCALE, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, images: np.ndarray, augment: bool = False) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N,3,H,W uint8
        if augment:  # v2 transforms draw one crop per call, so each image gets its own
            x = torch.stack([self.augment(img) for img in x])
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.float().div_(255.0)
        size = self.pre.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(
                x,
                size=(size, size),
                mode=self.pre.interpolation,
                antialias=True,
                align_corners=False if self.pre.interpolation != "nearest" else None,
            )
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots
        x = (x - self.mean) / self.std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
