"""The search-space file's typed form: the sections' frozen dataclasses and :class:`SpaceConfig`.

A space file (read by :mod:`raytl.space_file`, with errors that name the file, the key and what
was expected) has fixed sections (``data``, ``model``, ``scheme``, ``search``, ``resources``), each a
frozen dataclass that checks its own ranges, and a ``space`` section of hyperparameters
(:mod:`raytl.space`). Names that come from a registry (data sources, schemes, strategies) are
checked against that registry. The validated :class:`SpaceConfig` is what every process receives:
it pickles, so trials, workers and refits never parse the file again.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np

from raytl.data.dataset import ImageData
from raytl.data.images import DEFAULT_MAX_PIXELS
from raytl.data.sources import SOURCES, load_data
from raytl.data.splits import carve_test, stratified_indices
from raytl.schema import (
    OneOf,
    base_type,
    hints,
    require,
)
from raytl.schemes import SCHEMES
from raytl.seeds import default_points
from raytl.space import (
    Hyperparameters,
    ParamSpec,
)

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a folder name: no "/", no "..", no spaces
SourceName = Annotated[str, OneOf(tuple(SOURCES))]
SchemeName = Annotated[str, OneOf(tuple(SCHEMES))]


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split (the test split is carved once, first)."""

    source: SourceName = "digits"
    path: str | None = None
    image_size: int = 64
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    limit: int | None = None
    pool_size: int | None = None  # a stratified subsample of the pool, after the test split
    seed: int = 0
    on_bad_file: Literal["skip", "error"] = "skip"
    max_pixels: int = DEFAULT_MAX_PIXELS
    download: bool = False
    synthetic_classes: int = 4
    synthetic_per_class: int = 60
    mode: Literal["auto", "memory", "stream"] = "auto"

    def __post_init__(self) -> None:
        require(self.image_size >= 8, "image_size", f"expected >= 8 pixels, got {self.image_size}")
        for name in ("test_fraction", "val_fraction"):
            value = getattr(self, name)
            require(0 < value < 1, name, f"expected in (0, 1), got {value}")
        require(
            self.limit is None or self.limit >= 10,
            "limit",
            f"expected >= 10 images, got {self.limit}",
        )
        require(
            self.pool_size is None or self.pool_size >= 10,
            "pool_size",
            f"expected >= 10 images, got {self.pool_size}",
        )
        require(self.max_pixels > 0, "max_pixels", f"expected > 0, got {self.max_pixels}")
        require(
            self.synthetic_classes >= 2,
            "synthetic_classes",
            f"expected >= 2, got {self.synthetic_classes}",
        )
        require(
            self.synthetic_per_class >= 4,
            "synthetic_per_class",
            f"expected >= 4, got {self.synthetic_per_class}",
        )
        require(
            self.source not in ("imagefolder", "parquet") or bool(self.path),
            "path",
            f"the {self.source} source needs a path",
        )
        require(
            self.mode != "stream" or self.source in ("imagefolder", "parquet"),
            "mode",
            f"stream reads image files: the imagefolder or parquet source, not {self.source}",
        )

    def split_test(self, data: ImageData) -> tuple[np.ndarray, np.ndarray]:
        """(pool, test): the untouched test split of ``data``, carved once for this seed, every
        byte-identical copy on the same side as its original; ``pool_size`` then keeps a
        stratified subsample of the pool (the test split stays whole, so pools of different
        sizes are scored on the same test images)."""
        pool, test = carve_test(
            data.labels, self.test_fraction, self.seed, data.class_names, groups=data.groups
        )
        if self.pool_size is not None:
            pool = pool[stratified_indices(data.labels[pool], self.pool_size, seed=self.seed)]
        return pool, test

    def load(self) -> ImageData:
        """The images this section names, decoded (``limit`` applied, unreadable files skipped)."""
        return load_data(
            self.source,
            path=self.path,
            image_size=self.image_size,
            limit=self.limit,
            seed=self.seed,
            on_bad_file=self.on_bad_file,
            max_pixels=self.max_pixels,
            download=self.download,
            synthetic_classes=self.synthetic_classes,
            synthetic_per_class=self.synthetic_per_class,
            mode=self.mode,
        )


@dataclass(frozen=True)
class ModelConfig:
    """The timm backbone and where its weights come from: package | hub | none | a checkpoint path."""

    backbone: str = "efficientnet_lite0"
    pretrained: str = "package"
    compile: bool = False  # torch.compile the model for training and evaluation (GPU nodes)


@dataclass(frozen=True)
class SchemeConfig:
    """How a trial is scored: one holdout split, k cross-validation folds, or S disjoint segments."""

    kind: SchemeName = "holdout"
    folds: int = 3
    segments: int = 3

    def __post_init__(self) -> None:
        require(self.folds >= 2, "folds", f"expected >= 2, got {self.folds}")
        require(self.segments >= 1, "segments", f"expected >= 1, got {self.segments}")

    @property
    def size(self) -> int:
        """How many units (independent models) a trial trains under this scheme."""
        key = SCHEMES[self.kind].size_key
        return int(getattr(self, key)) if key else 1


@dataclass(frozen=True)
class SearchConfig:
    """The Tune side: budget, sampler, early stopping, storage."""

    num_samples: int | None = None  # trials; None: 8, or as many as time_budget_s allows
    time_budget_s: float | None = None  # running trials stop cleanly when it ends
    seed_configs: list[dict[str, Any]] | None = None  # None: raytl's recipes (raytl.seeds)
    final: Literal["refit", "fold_ensemble"] = "refit"  # best/: one refit, or cv's k fold models
    max_latency_ms: float | None = None  # the pick's batch-1 latency at most this (raytl.latency)
    max_params: float | None = None  # the pick's parameters at most this
    max_concurrent: int = 2
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: int = 2
    scheduler: Literal["asha", "fifo"] = "asha"
    sampler: Literal["tpe", "random"] = "tpe"
    metric: Literal[
        "val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1", "val_top5_accuracy"
    ] = "val_accuracy"
    seed: int = 0
    storage: str | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_concurrent", "max_epochs"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"expected >= 1, got {value}")
        for name in ("time_budget_s", "max_latency_ms", "max_params"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"expected > 0, got {value}")
        require(
            1 <= self.grace_period <= self.max_epochs,
            "grace_period",
            f"expected in [1, max_epochs={self.max_epochs}], got {self.grace_period}",
        )
        require(
            self.reduction_factor >= 2,
            "reduction_factor",
            f"expected >= 2, got {self.reduction_factor}",
        )
        require(self.max_failures >= 0, "max_failures", f"expected >= 0, got {self.max_failures}")

    @property
    def mode(self) -> Literal["min", "max"]:
        return metric_mode(self.metric)

    @property
    def trials(self) -> int:
        """Tune's ``num_samples``: -1 (no limit) when only a time budget bounds the search."""
        if self.num_samples is not None:
            return self.num_samples
        return -1 if self.time_budget_s else 8


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a metric is minimised (a loss) or maximised: the one place that decides."""
    return "min" if metric.endswith("loss") else "max"


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial asks of the cluster: W Ray Train workers, each with these CPUs/GPUs."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        require(
            self.workers_per_trial >= 1,
            "workers_per_trial",
            f"expected >= 1, got {self.workers_per_trial}",
        )
        require(
            self.cpus_per_worker > 0, "cpus_per_worker", f"expected > 0, got {self.cpus_per_worker}"
        )
        require(
            self.gpus_per_worker >= 0,
            "gpus_per_worker",
            f"expected >= 0, got {self.gpus_per_worker}",
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "scheme": SchemeConfig,
    "search": SearchConfig,
    "resources": ResourcesConfig,
}


@dataclass(frozen=True)
class SpaceConfig:
    """A validated space file."""

    name: str
    data: DataConfig
    model: ModelConfig
    scheme: SchemeConfig
    search: SearchConfig
    resources: ResourcesConfig
    space: dict[str, ParamSpec]
    source: str = "<memory>"
    cache: bool = True  # the frozen-feature cache (raytl.features); `cache: off` disables it
    blocks: dict[str, int] = dataclasses.field(default_factory=dict)
    """Each backbone's block count (``freeze_depth``'s bound), from timm's model when the file
    was checked (:mod:`raytl.space_file`): carried, so no other process needs timm for it."""

    def hyperparameters(self, sampled: dict[str, Any] | None = None) -> Hyperparameters:
        """The trial configuration for ``sampled`` values, constants and defaults filled in."""
        values: dict[str, Any] = {}
        for spec in self.space.values():
            if spec.kind == "const" and spec.is_active({**values, **(sampled or {})}):
                values[spec.name] = spec.values[0]
        values.update(sampled or {})
        field_hints = hints(Hyperparameters)
        for name, value in values.items():  # tables hold ints as floats (3.0), numpy scalars, ...
            if hasattr(value, "item"):
                value = value.item()
            if (
                base_type(field_hints[name]) is int
                and isinstance(value, float)
                and value.is_integer()
            ):
                value = int(value)
            values[name] = value
        values["backbone"] = values.get("backbone") or self.model.backbone
        values["epochs"] = values.get("epochs") or self.search.max_epochs
        return Hyperparameters(**values)

    def seed_points(self) -> list[dict[str, Any]]:
        """The configurations the search evaluates first: ``search.seed_configs``, or raytl's
        recipes fitted to this space (:mod:`raytl.seeds`)."""
        if self.search.seed_configs is not None:
            return self.search.seed_configs
        return default_points(self.space, self.model.backbone, self.blocks)

    def options(self, name: str, default: Any) -> list[Any]:
        """The values hyperparameter ``name`` can take in this space (its bounds for a range)."""
        spec = self.space.get(name)
        return spec.options() if spec is not None else [default]

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, in the file's own shape (written as DIR/space.yaml)."""
        out: dict[str, Any] = {"name": self.name, "cache": self.cache}
        for section in SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        out["space"] = {name: spec.to_yaml() for name, spec in self.space.items()}
        return out
