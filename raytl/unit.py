"""One unit's trainer: a :class:`UnitTrainer` trains one independent model of a scheme.

It runs without Ray (``raytl train``, the refit, GPU checks) and inside a trial (:mod:`raytl.trial`),
where a process may own several units, or share one unit with other Ray Train workers: a
:class:`~raytl.unit_group.UnitGroup`, whose ranks train one ``DistributedDataParallel`` model, each
taking its share of every global batch. On a GPU it uses bf16 autocast (fp16 with loss scaling
where bf16 is missing), channels_last and pinned, non-blocking copies; the next batch is copied
while the current one trains, and augmented on the device (:mod:`raytl.train_feed`).

Phases whose backbone is entirely frozen (``linear_probe``, ``lp_ft``'s probe) do not push images
through the backbone every epoch: the pooled features are computed once in eval mode and only the
head trains on them, which is exactly equivalent since the frozen backbone (BatchNorm included)
and the un-augmented inputs do not change. Such a probe phase trains to convergence inside one
report (:mod:`raytl.probe`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LRScheduler

from raytl import strategies
from raytl.config import SpaceConfig
from raytl.data.dataset import ImageData
from raytl.data.stream import epoch_order, rows_of
from raytl.feature_rows import FeatureRows, resolve_features
from raytl.metrics import EvalResult, evaluation_counts, loss_weights, scored
from raytl.models import (
    backbone_blocks,
    classifier_of,
    create_model,
    head_parameter_names,
    pooled_features,
)
from raytl.preprocess import BatchPreparer, default_device, preprocessing_for
from raytl.probe import train_to_convergence
from raytl.space import Hyperparameters
from raytl.strategies import STRATEGIES, Phase, apply_freeze, param_groups, set_train_mode
from raytl.train_feed import train_batches
from raytl.unit_group import UnitGroup, learning_rate_scale, rank_batches, steps_per_epoch

EVAL_BATCH = 256


class UnitTrainer:
    """Trains one model on one unit's train indices and validates it on the unit's val indices."""

    @classmethod
    def for_space(
        cls,
        config: SpaceConfig,
        hp: Hyperparameters,
        data: ImageData,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        unit: int = 0,
        device: torch.device | None = None,
        group: UnitGroup | None = None,
        features: Any = None,
        probe_passes: int | None = None,
    ) -> UnitTrainer:
        """A trainer with the space file's weights, image size, seed (plus the unit's index) and
        compile setting."""
        return cls(
            hp,
            data,
            train_idx,
            val_idx,
            pretrained=config.model.pretrained,
            image_size=config.data.image_size,
            device=device,
            seed=config.search.seed + unit,
            group=group,
            features=features,
            compile=config.model.compile,
            probe_passes=probe_passes,
        )

    def __init__(
        self,
        hp: Hyperparameters,
        data: ImageData,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        pretrained: str,
        image_size: int,
        device: torch.device | None = None,
        seed: int = 0,
        group: UnitGroup | None = None,
        features: Any = None,
        compile: bool = False,
        probe_passes: int | None = None,
    ) -> None:
        self.hp = hp
        self.data = data
        self.train_idx = np.asarray(train_idx)
        self.val_idx = np.asarray(val_idx)
        self.device = device or default_device()
        self.seed = seed
        self.group = group
        self.strategy = STRATEGIES[hp.strategy]
        torch.manual_seed(seed)
        self.model = create_model(
            hp.backbone_name,
            len(data.class_names),
            pretrained if self.strategy.pretrained else "none",
        )
        self.blocks = backbone_blocks(self.model)
        self.head = head_parameter_names(self.model)
        self.classifier = classifier_of(self.model)
        self.phases = self.strategy.phases(hp, len(self.blocks))
        self.pre = preprocessing_for(self.model, image_size)
        self.prepare = BatchPreparer(self.pre, self.device)
        cuda = self.device.type == "cuda"  # bf16 where the GPU has it; fp16 needs loss scaling
        bf16 = not cuda or torch.cuda.is_bf16_supported(including_emulation=False)
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=not bf16)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        if group is not None:  # one starting point for every rank of the unit
            self.model = group.share_model(self.model, self.device)
        # torch.compile wraps the module for the forward passes; state_dict keys stay the same
        self.compile = compile
        self.forward = torch.compile(self.model) if compile else self.model
        self.train_forward: Callable[[torch.Tensor], torch.Tensor] = self.forward  # per phase
        self.epoch = 0  # epochs completed
        self.phase_index: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: LRScheduler | None = None
        self._features: dict[str, FeatureRows] = {}
        # the frozen backbone's pooled features for every image (raytl.features), if given: an
        # array, an ObjectRef of one, or a FeatureFile (memory-mapped)
        self.shared_features = resolve_features(features)
        # passes of a converged probe phase (raytl.probe): kept by early stopping, or (no
        # validation split: a refit) the count given
        self.probe_passes = probe_passes

    # ------------------------------------------------------------------ schedule

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def _phase_for(self, epoch: int) -> int:
        return strategies.phase_at(self.phases, epoch)

    @property
    def phase(self) -> Phase:
        return self.phases[self._phase_for(self.epoch)]

    def _head_only(self, phase: Phase) -> bool:
        return phase.freeze_depth >= len(self.blocks) and not phase.augment

    @property
    def _ranks(self) -> int:
        return self.group.world_size if self.group else 1

    def _my_batches(self, epoch: int, pass_index: int = 0) -> list[np.ndarray]:
        """This rank's batches of positions into ``train_idx`` (:func:`rank_batches`); a converged
        probe's passes (``pass_index`` > 0) each draw their own order."""
        rng = np.random.default_rng((self.seed, epoch, pass_index)[: 3 if pass_index else 2])
        order = epoch_order(self.data.images, self.train_idx, rng)
        rank = self.group.rank if self.group else 0
        return rank_batches(order, self._ranks, rank, self.hp.batch_size)

    def _augment_rng(self, pass_index: int, step: int) -> np.random.Generator:
        """One training batch's crops and flips: fixed by seed, epoch, pass, rank and step."""
        rank = self.group.rank if self.group else 0
        return np.random.default_rng((self.seed, self.epoch, pass_index, rank, step))

    def _steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_idx), self._ranks, self.hp.batch_size)

    def _wrap_for_training(self, head_only: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward that trains this phase: the classifier alone on cached features, else the
        model; over the unit's ranks, wrapped in DDP (rebuilt per phase: the frozen set changed)."""
        if self.group is None:
            return self.classifier if head_only else self.forward  # compiled, when asked for
        module = self.group.data_parallel(self.classifier if head_only else self.model, self.device)
        return torch.compile(module) if self.compile and not head_only else module

    def _enter_phase(self, index: int) -> None:
        phase = self.phases[index]
        apply_freeze(self.model, self.blocks, phase.freeze_depth)
        groups = param_groups(self.model, self.blocks, self.head, phase, self.hp.weight_decay)
        for settings in groups:  # the effective batch is ranks * batch_size (learning_rate_scale)
            settings["lr"] *= learning_rate_scale(self._ranks)
        self.train_forward = self._wrap_for_training(self._head_only(phase))
        self.optimizer = torch.optim.AdamW(groups)
        self.scheduler = strategies.lr_schedule(self.optimizer, phase, self._steps_per_epoch())
        self.phase_index = index
        self._features.clear()

    # ------------------------------------------------------------------ training

    def _autocast(self) -> Any:
        return torch.autocast(
            device_type="cuda", dtype=self.amp_dtype, enabled=self.device.type == "cuda"
        )

    @functools.cached_property
    def class_weight(self) -> torch.Tensor | None:
        """The training loss's class weights: ``class_weight: balanced`` weighs by the unit's own
        train labels (validation's loss stays unweighted); None when unweighted."""
        labels = self.data.labels[self.train_idx]
        return loss_weights(self.hp.class_weight, labels, len(self.data.class_names), self.device)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.hp.label_smoothing
        return F.cross_entropy(logits.float(), target, self.class_weight, label_smoothing=smoothing)

    def _cached(self, key: str, indices: np.ndarray) -> FeatureRows:
        """Pre-logit features of the (frozen, eval-mode) backbone, computed once per phase, or
        taken from the shared feature cache when the trainer was given one."""
        if key not in self._features:
            matrix: np.ndarray | torch.Tensor | None = self.shared_features
            if matrix is None:
                images = rows_of(self.data.images, indices)
                matrix = pooled_features(self.model, self.prepare, images, self.device)
            self._features[key] = FeatureRows(matrix, indices, self.device)
        return self._features[key]

    def _train_steps(
        self,
        phase: Phase,
        head_only: bool,
        progress: Callable[[int, int], None] | None,
        pass_index: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """One pass over this rank's share of the train indices; the summed loss, the correct
        count and the images seen (as one tensor, summed over the unit's ranks), and the images
        this rank saw."""
        optimizer, scheduler = self.optimizer, self.scheduler
        assert optimizer is not None and scheduler is not None  # _enter_phase ran
        batches = self._my_batches(self.epoch, pass_index)
        labels = torch.from_numpy(self.data.labels[self.train_idx])
        # the cached feature matrix has one row per train index, in train_idx order
        features = self._cached("train", self.train_idx) if head_only else None
        set_train_mode(self.model, phase.running_statistics)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        images = 0
        rng_for = functools.partial(self._augment_rng, pass_index)
        data = (self.data.images, self.train_idx, labels, batches, features)
        with train_batches(self.prepare, *data, phase.augment, rng_for) as loaded:
            for step, (x, y) in enumerate(loaded):
                with self._autocast():
                    logits = self.train_forward(x)
                    loss = self._loss(logits, y)
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()  # over a unit's ranks, DDP averages gradients
                self.scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
                self.scaler.update()
                scheduler.step()
                total_loss += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                images += len(y)
                if progress:
                    progress(step + 1, len(batches))
        seen = torch.tensor(float(images), device=self.device)
        sums = torch.stack([total_loss.float(), correct.float(), seen])
        if self.group is None:
            return sums, images
        self.group.broadcast_buffers(self.model)  # one set of BatchNorm statistics per unit
        return self.group.sum(sums), images

    def run_epoch(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Train one epoch and validate; returns the epoch's metrics."""
        index = self._phase_for(self.epoch)
        if index != self.phase_index:
            self._enter_phase(index)
        phase = self.phases[index]
        head_only = self._head_only(phase)
        start = time.perf_counter()
        if phase.converge and head_only:  # a probe: passes until the validation loss stops falling
            sums, seen, self.probe_passes = train_to_convergence(
                lambda p: self._train_steps(phase, True, progress, p),
                self._validation_loss if len(self.val_idx) else None,
                self.classifier,
                self.probe_passes,
            )
        else:
            sums, seen = self._train_steps(phase, head_only, progress)
        train_seconds = time.perf_counter() - start
        if len(self.val_idx):
            val = self.evaluate(self.val_idx, head_only=head_only)
        else:  # a refit on train+val has nothing to validate on (the test split is not for that)
            val = EvalResult.nothing()
        self.epoch += 1
        seen_all = max(1.0, float(sums[2]))
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "phase": phase.name,
            "train_loss": float(sums[0]) / seen_all,
            "train_accuracy": float(sums[1]) / seen_all,
            **val.metrics("val_"),  # raytl.metrics.VAL_METRICS (top-5: > 5 classes only)
            "epoch_seconds": time.perf_counter() - start,
            "images_per_second": seen / max(train_seconds, 1e-9),
            "head_only": head_only,
            # epochs that count toward ASHA's rungs: a converged probe's report is not one
            "rung_epoch": strategies.rung_epochs(self.phases, self.epoch),
            "probe_passes": self.probe_passes or 0,
        }
        for group in self.optimizer.param_groups if self.optimizer else []:
            metrics[f"lr/{group['name']}"] = group["lr"]
        return metrics

    def _my_val(self, indices: np.ndarray | None = None) -> np.ndarray:
        """This rank's share of ``indices`` (the val indices by default) when ranks share the unit."""
        indices = self.val_idx if indices is None else indices
        return indices[self.group.rank :: self.group.world_size] if self.group else indices

    def _validation_loss(self) -> float:
        return self.evaluate(self.val_idx, head_only=True).loss

    @torch.no_grad()
    def evaluate(self, indices: np.ndarray, *, head_only: bool = False) -> EvalResult:
        """Scores (:class:`~raytl.metrics.EvalResult`) and predictions on ``indices`` (sharded
        over the unit's ranks, if any).

        ``head_only``: the backbone is frozen in this phase, so its cached features serve.
        """
        mine = self._my_val(np.asarray(indices))
        self.model.eval()
        labels = torch.from_numpy(self.data.labels[mine]).to(self.device)
        if head_only:  # this rank's share of the cached features (the same share every pass)
            chunks = [
                self.classifier(x).float() for x in self._cached("val", mine).chunks(EVAL_BATCH)
            ]
            logits = torch.cat(chunks) if chunks else torch.empty(0, len(self.data.class_names))
        else:
            chunks = []
            for start in range(0, len(mine), EVAL_BATCH):
                x = self.prepare(self.data.images[mine[start : start + EVAL_BATCH]])
                with self._autocast():
                    chunks.append(self.forward(x).float())
            logits = torch.cat(chunks) if chunks else torch.empty(0, len(self.data.class_names))
        n_classes = len(self.data.class_names)
        counts = evaluation_counts(logits, labels, n_classes).to(self.device)
        if self.group is not None:  # the ranks' shares: one all-reduce of the counts
            counts = self.group.sum(counts)
        predictions = logits.argmax(1) if len(mine) else torch.empty(0, dtype=torch.long)
        return scored(counts, n_classes, predictions.cpu().numpy())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, head_only: bool = False) -> dict[str, Any]:
        """Everything needed to continue exactly where this unit stopped (weights_only-loadable).

        ``head_only``: only the classifier's weights, for a trial that never moves the backbone
        (a linear probe on cached features); the backbone is the pretrained one by construction.
        """
        weights = (
            {"head": self.classifier.state_dict()}
            if head_only
            else {"model": self.model.state_dict()}
        )
        return {
            **weights,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "phase_index": self.phase_index,
            "probe_passes": self.probe_passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "head" in state:
            self.classifier.load_state_dict(state["head"])
        else:
            self.model.load_state_dict(state["model"])
        self.epoch = int(state["epoch"])
        self.probe_passes = state.get("probe_passes", self.probe_passes)
        if state["phase_index"] is not None:
            self._enter_phase(int(state["phase_index"]))
            assert (
                self.optimizer is not None and self.scheduler is not None
            )  # _enter_phase set them
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
