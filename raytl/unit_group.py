"""The ranks that share one unit: a ``torch.distributed`` subgroup training one model data-parallel.

With more Ray Train workers than units (``assign_units``: W a multiple of U), each unit trains on
W/U consecutive ranks. They hold one model, wrapped in ``DistributedDataParallel`` over their
subgroup (gradients averaged in buckets during the backward pass), see every global batch split
between them, and sum their metric counts with :meth:`UnitGroup.sum`.

BatchNorm across the ranks:

- on CUDA, the model's BatchNorm layers become synchronised ones (timm's
  ``convert_sync_batchnorm``, which also converts timm's ``BatchNormAct2d``): a trainable layer
  normalises with the statistics of the whole global batch, as one process with that batch would;
- on the CPU, torch's ``SyncBatchNorm`` refuses to run in training mode (torch 2.14 raises "expected
  input tensor to be on GPU"), so each rank normalises with its own share's statistics (as plain
  DDP does), DDP copies the first rank's running statistics to the others at every forward
  (``forward_sync_buffers``) and :meth:`UnitGroup.broadcast_buffers` does so once more after each
  epoch's last step, so every rank validates and checkpoints the same statistics. Frozen layers
  (eval mode, :func:`raytl.strategies.set_train_mode`) use their running statistics either way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytl.schemes import Assignment


def learning_rate_scale(ranks: int) -> float:
    """The factor on a unit's learning rates when ``ranks`` ranks share it: 1 (rates kept).

    Each rank keeps the trial's ``batch_size`` per step, so the unit's effective batch is
    ``ranks * batch_size`` and an epoch has ``ranks`` times fewer steps. Keeping the rates makes the
    unit train exactly as one process would with batch ``ranks * batch_size`` and the same rates
    (``tests/test_ddp.py`` checks it), so every trial is a configuration a single process can
    reproduce. Not scaled linearly: that rule (Goyal et al. 2017) is derived for SGD, while raytl
    trains with AdamW, whose step size barely depends on the gradient's scale (for Adam a square
    root rule is the closer one, Malladi et al. 2022); guessing either would make the searched
    rates mean different things on different cluster layouts.
    """
    return 1.0


def rank_batches(order: np.ndarray, ranks: int, rank: int, batch_size: int) -> list[np.ndarray]:
    """Rank ``rank``'s batches of one epoch, given the epoch's ``order`` (a seeded permutation of
    positions, alike on every rank).

    ``order`` is cut into global batches of ``ranks * batch_size``, and rank ``r`` takes the
    ``r``-th equal part of each: so a unit on ``k`` ranks sees exactly the batches one process with
    batch ``k * batch_size`` sees. The last ``len % ranks`` positions are dropped, so every part of
    the last (short) global batch is equally long: the ranks take the same number of steps and
    DDP's mean of their means is the global batch's mean. A single process keeps every position
    (the seeded results from before DDP reproduce). Not ``DistributedSampler``: it shards image by
    image, not batch by batch, and its torch permutation would change every seeded result.
    Streamed Parquet rows are block-shuffled instead (:func:`raytl.data.stream.epoch_order`).
    """
    order = order[: len(order) - len(order) % ranks]
    step = ranks * batch_size
    return [
        np.array_split(order[start : start + step], ranks)[rank]
        for start in range(0, len(order), step)
    ]


def steps_per_epoch(images: int, ranks: int, batch_size: int) -> int:
    """Steps of one epoch over ``images`` positions, as :func:`rank_batches` cuts them."""
    n = images - images % ranks
    return max(1, math.ceil(n / (ranks * batch_size)))


class UnitGroup:
    """The ranks that train one unit together. Contract: every rank of the group calls each
    method (and runs each forward and backward of :meth:`data_parallel`'s module) the same
    number of times, in the same order."""

    def __init__(self, group: Any, ranks: list[int]) -> None:
        self.group = group
        self.ranks = ranks  # global ranks, consecutive; ranks[0] is the unit's first rank
        self.rank = ranks.index(dist.get_rank())
        self.world_size = len(ranks)

    def share_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` with synchronised BatchNorm (CUDA only, see the module docstring) and the
        first rank's weights and buffers on every rank."""
        if device.type == "cuda":
            model = convert_sync_batchnorm(model, process_group=self.group)
        self._broadcast(model.state_dict().values())
        return model

    def data_parallel(self, module: nn.Module, device: torch.device) -> DistributedDataParallel:
        """``module`` wrapped for training: gradients of the parameters that require them are
        averaged over the group in the backward pass. Built anew whenever the frozen set changes
        (a DDP wrapper registers the trainable parameters once, at construction); frozen
        parameters are left out, and every trainable one is used in each forward, so
        ``find_unused_parameters`` stays off."""
        return DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            process_group=self.group,
            forward_sync_buffers=True,  # the first rank's BatchNorm statistics at every forward
        )

    def broadcast_buffers(self, model: nn.Module) -> None:
        """The first rank's buffers (BatchNorm running statistics) on every rank."""
        self._broadcast(model.buffers())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the group, in place."""
        dist.all_reduce(values, group=self.group)
        return values

    def _broadcast(self, tensors: Any) -> None:
        for tensor in tensors:
            dist.broadcast(tensor, self.ranks[0], group=self.group)


def groups_for_rank(plan: list[list[Assignment]], rank: int) -> dict[int, UnitGroup]:
    """This rank's groups by unit, for units trained data-parallel (none when every unit has one
    rank). Every rank creates every subgroup, in the same order, as ``new_group`` requires."""
    groups: dict[int, UnitGroup] = {}
    per = plan[0][0].ranks_per_unit
    for unit in range(len(plan) // per if per > 1 else 0):
        ranks = list(range(unit * per, (unit + 1) * per))
        group = dist.new_group(ranks)
        if rank in ranks:
            groups[unit] = UnitGroup(group, ranks)
    return groups
