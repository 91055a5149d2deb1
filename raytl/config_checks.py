"""The checks of a space file that span its sections: paths exist, backbones and their weights
fit, freeze depth is within the backbones' block counts (each section checks its own ranges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from raytl.errors import ConfigError, RaytlError
from raytl.models import check_pretrained, count_blocks
from raytl.schema import InvalidValue, require
from raytl.seeds import check_points
from raytl.space import ParamSpec, check_positive
from raytl.storage import is_uri


class CheckedSpace(Protocol):
    """What these checks read of a :class:`raytl.config.SpaceConfig` (a protocol: config.py
    imports this module)."""

    @property
    def source(self) -> str: ...
    @property
    def data(self) -> Any: ...  # DataConfig
    @property
    def model(self) -> Any: ...  # ModelConfig
    @property
    def space(self) -> dict[str, ParamSpec]: ...
    @property
    def search(self) -> Any: ...  # SearchConfig
    @property
    def scheme(self) -> Any: ...  # SchemeConfig

    def options(self, name: str, default: Any) -> list[Any]: ...


def require_uri_source(src: str, d: Any) -> None:
    """Only the file sources read from a URI (``s3://``, ``gs://``)."""
    if d.path and is_uri(d.path) and d.source not in ("parquet", "imagefolder"):
        raise ConfigError(
            src, "data.path", f"the {d.source} source reads local paths only; got {d.path}"
        )


def check_space(config: CheckedSpace, local_paths: bool = True) -> dict[str, int]:
    """The checks that span sections: paths exist, backbones and weights fit, freeze depth and
    probe epochs are within bounds. Returns each backbone's block count."""
    src, d = config.source, config.data
    needs_path = d.source in ("imagefolder", "parquet") or (
        d.source == "fashion-mnist" and not d.download
    )
    if local_paths and d.path and needs_path and not is_uri(d.path) and not Path(d.path).exists():
        raise ConfigError(src, "data.path", f"no such file or folder: {d.path}")
    require_uri_source(src, d)
    backbone_key = "space.backbone" if "backbone" in config.space else "model.backbone"
    depths: dict[str, int] = {}
    for backbone in config.options("backbone", config.model.backbone):
        try:
            depths[backbone] = count_blocks(backbone)
        except RaytlError as exc:
            raise ConfigError(src, backbone_key, str(exc)) from None
        try:
            check_pretrained(backbone, config.model.pretrained, check_path=local_paths)
        except RaytlError as exc:
            raise ConfigError(src, "model.pretrained", str(exc)) from None
    try:
        _check_freeze_depth(config, depths)
        check_positive(config.space)
        require(
            config.search.final != "fold_ensemble" or config.scheme.kind == "cv",
            "search.final",
            f"fold_ensemble keeps cv's fold models; scheme.kind is {config.scheme.kind}",
        )
        if config.search.seed_configs is not None:
            check_points(config.search.seed_configs, config.space, src)
    except InvalidValue as exc:
        raise ConfigError(src, exc.key, exc.message) from None
    return depths


def _check_freeze_depth(config: CheckedSpace, depths: dict[str, int]) -> None:
    fd = config.space.get("freeze_depth")
    if fd is None:
        return
    low, high = int(min(fd.options())), int(max(fd.options()))
    require(low >= 0, "space.freeze_depth", f"expected >= 0, got {low}")
    backbone = config.space.get("backbone")
    fixed_backbone = backbone is None or backbone.kind == "const"
    limit = min(depths.values()) if fixed_backbone else max(depths.values())
    names = ", ".join(f"{b}: {n}" for b, n in depths.items())
    require(
        high <= limit,
        "space.freeze_depth",
        f"{high} is beyond the backbone's block count ({names}); expected <= {limit}",
    )
