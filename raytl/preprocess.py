"""Pixels to model input: the backbone's own normalisation, resizing and batch preparation.

Images are stored as uint8 ``(N, H, W, 3)``; :class:`BatchPreparer` turns a batch of them into
normalised float input at the model's size on the trainer's device, in two steps: ``load`` copies
the uint8 batch to the device (gathered into pinned memory, non-blocking, on a GPU); ``finish``
augments, resizes and normalises the batch where it lies, the augmentation batched
(:func:`crop_and_flip`: one ``roi_align`` for every image's own crop) and drawn from a NumPy
generator of the batch's own, so both steps can run ahead of the training step in a thread
(:mod:`raytl.prefetch`) without touching torch's shared generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from raytl.data.stream import is_streamed

AUGMENT_SCALE = (0.35, 1.0)  # RandomResizedCrop's area range: small images lose little
AUGMENT_RATIO = (3 / 4, 4 / 3)  # its aspect-ratio range (torchvision's default)
CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params, before the centre-crop fallback


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``; to a GPU pinned and non-blocking (a copy from pageable
    memory could wait for the work queued before it)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def random_resized_boxes(n: int, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` crop boxes ``(x1, y1, x2, y2)`` in pixels of a ``height x width`` image, each drawn
    as torchvision's ``RandomResizedCrop.get_params`` draws one (``AUGMENT_SCALE`` of the area, a
    log-uniform aspect ratio in ``AUGMENT_RATIO``, the first of ``CROP_TRIES`` tries that fits,
    else the centre crop clamped to the ratio range), all at once from ``rng``.

    NumPy, not torch: on a many-core GPU machine torch's CPU kernels took milliseconds each on
    these few thousand numbers (``benchmarks/gpu.py``), time the GPU then waited for."""
    area = height * width
    target = area * rng.uniform(*AUGMENT_SCALE, size=(n, CROP_TRIES))
    aspect = np.exp(
        rng.uniform(math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1]), (n, CROP_TRIES))
    )
    w, h = np.sqrt(target * aspect).round(), np.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)[:, None]  # argmax gives the first of equal values
    w, h = np.take_along_axis(w, first, 1)[:, 0], np.take_along_axis(h, first, 1)[:, 0]
    fallback_w, fallback_h = width, height  # no try fitted: the largest centred crop in range
    if width / height < AUGMENT_RATIO[0]:
        fallback_h = round(width / AUGMENT_RATIO[0])
    elif width / height > AUGMENT_RATIO[1]:
        fallback_w = round(height * AUGMENT_RATIO[1])
    none = ~fits.any(1)
    w, h = np.where(none, fallback_w, w), np.where(none, fallback_h, h)
    top = np.floor(rng.random(n) * (height - h + 1))
    left = np.floor(rng.random(n) * (width - w + 1))
    top = np.where(none, (height - fallback_h) // 2, top)
    left = np.where(none, (width - fallback_w) // 2, left)
    return torch.from_numpy(np.stack([left, top, left + w, top + h], axis=1))


def crop_and_flip(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Every image of the float batch ``x`` (N, C, H, W) gets its own random resized crop
    (:func:`random_resized_boxes`), resized to ``size x size``, and a horizontal flip with
    probability 1/2: ``RandomResizedCrop`` + ``RandomHorizontalFlip`` per image, as one batched
    ``roi_align`` on ``x``'s device. The draws come from ``rng`` on the CPU (so a seed gives the
    same crops on every device) and are made before anything is queued on the device."""
    n, _, height, width = x.shape
    boxes = random_resized_boxes(n, height, width, rng)
    flipped = torch.from_numpy(np.flatnonzero(rng.random(n) < 0.5))  # on the CPU: no device sync
    rois = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], boxes], dim=1)
    # aligned: pixel centres at +0.5, as interpolate(align_corners=False) (bilinear, the
    # RandomResizedCrop default); sampling_ratio -1: ceil(crop / size) samples per output pixel
    # and axis, averaged, so a crop larger than the output is not aliased
    rois = to_device(rois.to(x.dtype), x.device)
    out = roi_align(x, rois, size, sampling_ratio=-1, aligned=True)
    flipped = to_device(flipped, x.device)
    out[flipped] = out[flipped].flip(-1)
    return out


def torch_seeded_rng() -> np.random.Generator:
    """A NumPy generator seeded by one draw from torch's, for callers that seed with torch."""
    return np.random.default_rng(int(torch.randint(0, 2**63 - 1, ())))


class BatchPreparer:
    """Turns stored uint8 images (N, H, W, 3) into normalised model input at the model's size."""

    def __init__(self, pre: Preprocessing, device: torch.device) -> None:
        self.pre = pre
        self.device = device
        self.cuda = device.type == "cuda"
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU ``tensor`` on the device: pinned and copied non-blocking on a GPU."""
        return to_device(tensor, self.device)

    def load(self, images: np.ndarray, rows: np.ndarray | None = None) -> torch.Tensor:
        """``images[rows]`` (all of ``images`` if ``rows`` is None) as a uint8 (N, 3, H, W) batch
        on the device. On a GPU the rows are gathered straight into pinned memory and copied
        non-blocking. Draws no random numbers, so a prefetch thread may run it ahead of the step."""
        if rows is None:
            batch = torch.from_numpy(np.ascontiguousarray(images))
        elif self.cuda:
            batch = torch.empty((len(rows), *images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            np.take(images, rows, axis=0, out=batch.numpy(), mode="clip")  # "raise" would buffer
        else:
            batch = torch.from_numpy(images[rows])
        if self.cuda:
            batch = (batch if batch.is_pinned() else batch.pin_memory()).to(
                self.device, non_blocking=True
            )
        return batch.permute(0, 3, 1, 2)  # N,3,H,W (channels_last strides)

    def load_rows(self, images: Any, rows: np.ndarray) -> tuple[torch.Tensor, Any]:
        """:meth:`load` of ``images[rows]`` for stored or streamed images (``images`` is then a
        :class:`~raytl.data.stream.StreamedImages`, decoded here), and which of ``rows`` it
        holds: all of them, but a streamed row that fails to decode mid-stream is left out."""
        if not is_streamed(images):
            return self.load(images, rows), slice(None)
        pixels, kept = images.take_readable(rows)
        return self.load(pixels), kept

    def finish(
        self, x: torch.Tensor, augment: bool = False, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """A :meth:`load`-ed uint8 batch as normalised float input at the model's size, with a
        random resized crop and flip per image if ``augment``, drawn from ``rng`` (by default a
        generator seeded from torch's). Given its own ``rng``, it may run in a prefetch thread."""
        size = self.pre.image_size
        if augment:  # roi_align reads NCHW-contiguous: convert and lay out in one copy
            x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
            x = crop_and_flip(x, size, rng or torch_seeded_rng())
        else:
            x = x.float().div_(255.0)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(
                x,
                size=(size, size),
                mode=self.pre.interpolation,
                antialias=True,
                align_corners=False if self.pre.interpolation != "nearest" else None,
            )
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots
        x = x.sub_(self.mean).div_(self.std)  # x is this call's own tensor
        # channels_last on the CPU too: its convolutions run about twice as fast on it (a loaded
        # batch has these strides already; a crop's output is NCHW-contiguous)
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray, augment: bool = False) -> torch.Tensor:
        return self.finish(self.load(images), augment)
