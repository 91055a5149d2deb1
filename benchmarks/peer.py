"""raytl's default search against a plain Ray Tune script given the same wall time (issue 15).

    .venv/bin/python benchmarks/peer.py                          # digits + Fashion-MNIST, 3 seeds
    .venv/bin/python benchmarks/peer.py --datasets digits --repeats 2
    .venv/bin/python benchmarks/peer.py --quick --no-write       # smoke test: ~3 min on 2 cores
    .venv/bin/python benchmarks/peer.py --space search_spaces/backbones.yaml --datasets digits
    # larger untouched test splits (docs/benchmarks.md says why): 4,000 and 898 test images
    .venv/bin/python benchmarks/peer.py --datasets fashion --fashion-limit 6000 --test-fraction 0.6667
    .venv/bin/python benchmarks/peer.py --datasets digits --test-fraction 0.5

For each dataset and seed: raytl's search (``search_spaces/quickstart.yaml``'s search: TPE with
raytl's seeded recipes, ASHA, cv with 2 folds, the frozen-feature cache, then the refit of the
best on train+val and one test) runs and its wall time W is measured; then the plain script runs
for the same wall time W (its data load and Ray start-up included: the Tuner's ``time_budget_s``
is W minus them) and its best trial by validation accuracy (its last checkpoint) is tested on
the same untouched test split, after the budget. Prints a table and writes the "## Search
against a plain Ray Tune script" section of docs/benchmarks.md (``--no-write``: prints only).

``--space`` runs another space file the same way (the backbone search,
``search_spaces/backbones.yaml``, where the plain script samples the backbone too) and writes its
own section.

Datasets: ``digits`` is the quickstart file as shipped; ``fashion`` is the same file with the data
swapped for a stratified Fashion-MNIST subset (``--fashion-limit``, 2,000 images, 48 px, read from
Debian's /usr/share/datasets/fashion-mnist).

Seeds: repeat ``s`` sets both ``data.seed`` and ``search.seed`` to ``s`` (seed 0 is the file as
shipped). ``data.seed`` picks the test split (and Fashion-MNIST's subset), the holdout/fold splits
and the training seeds, so the spread over repeats is the one a user sees, the luck of the split
included, not only the searches' own randomness on one test split of a few hundred images (one
digits test image is 0.28 points). Within a repeat raytl and the plain script use the same
images and the same test split (raytl's ``data.split_test``), so each repeat is a paired
comparison. ``--fixed-split`` keeps the file's ``data.seed`` and varies ``search.seed`` alone.

The plain script (:func:`plain_trainable`) is what a user who knows Ray Tune and PyTorch would
write: a function trainable with a hand-written AdamW loop on one holdout split (scikit-learn's
stratified ``train_test_split`` of raytl's pool), random search over the same space
(``BasicVariantGenerator``), no early stopping, no feature cache, no refit, every configuration
trained for ``search.max_epochs`` epochs. Its four strategies are raytl's (raytl/strategies.py),
with the freezing reimplemented here in a few lines on timm's own coarse groups
(``timm.models.group_modules(model, model.group_matcher(coarse=True))``, the groups
``raytl.models.backbone_blocks`` counts): raytl is imported only for its offline weights
(``raytl.models.create_model``) and, in the driver, to check that both freeze the same parameters
for every depth (:func:`check_same_freezing`). What differs from raytl, on purpose: one holdout
split instead of cv folds, constant learning rates, a linear probe trained for the same epochs as
the others (each a full forward pass over the frozen backbone) instead of a converged probe on
cached features, and lp_ft's probe phase one such epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch.nn.modules.batchnorm import _BatchNorm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import DOC, provenance, write_section  # noqa: E402

from raytl.cluster import ray_session  # noqa: E402
from raytl.config import SpaceConfig  # noqa: E402
from raytl.console import ray_output_to  # noqa: E402
from raytl.models import create_model  # noqa: E402
from raytl.search import run_search  # noqa: E402
from raytl.space_file import parse_space  # noqa: E402

QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
FASHION_PATH = "/usr/share/datasets/fashion-mnist"
HEADING = "## Search against a plain Ray Tune script"
SILENT = lambda line: None  # noqa: E731


# --------------------------------------------------------------------------- the plain script


def plain_freeze(model: torch.nn.Module, depth: int | None) -> list[torch.nn.Module]:
    """Freeze as raytl's strategies do and return the BatchNorm layers to keep in eval mode.

    ``depth`` None: a linear probe (every backbone parameter frozen, only the classifier trains);
    ``k``: the first ``k`` of timm's coarse groups (stem first, the classifier's group left out)
    frozen, everything after them trainable. The BatchNorm layers of what is frozen keep their
    pretrained running statistics."""
    from timm.models import group_modules

    classifier = model.get_classifier()
    modules = dict(model.named_modules())
    groups = [
        names
        for names in group_modules(model, model.group_matcher(coarse=True)).values()
        if not any(modules[n] is classifier for n in names)
    ]
    model.requires_grad_(True)
    if depth is None or depth >= len(groups):  # all of the backbone, unmatched modules included
        model.requires_grad_(False)
        classifier.requires_grad_(True)
        head = set(classifier.modules())
        return [m for m in model.modules() if isinstance(m, _BatchNorm) and m not in head]
    frozen = [modules[n] for names in groups[:depth] for n in names]
    for module in frozen:
        module.requires_grad_(False)
    return [m for module in frozen for m in module.modules() if isinstance(m, _BatchNorm)]


def plain_trainable(config: dict[str, Any], data_ref: list[Any], setup: dict[str, Any]) -> None:
    """One trial of the plain script: build the timm model, freeze per strategy, train with AdamW
    on one holdout split, report validation accuracy every epoch and, after the last, a Tune
    checkpoint of the model (the driver tests only the trial picked by validation accuracy, after
    the budget: :func:`pick_test_accuracy`)."""
    import ray
    from ray import tune
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(setup["threads"])
    torch.manual_seed(setup["seed"])
    images, labels, pool, test = ray.get(data_ref[0])
    train, val = train_test_split(
        pool,
        test_size=setup["val_fraction"],
        stratify=labels[pool],
        random_state=setup["seed"],
    )
    strategy = config["strategy"]
    weights = "none" if strategy == "scratch" else setup["pretrained"]
    model = create_model(config.get("backbone", setup["backbone"]), setup["num_classes"], weights)
    inputs = plain_inputs(model, images, setup["image_size"])

    epochs, depth = setup["epochs"], int(config.get("freeze_depth", 0))
    phases: list[tuple[int | None, int]] = {  # (freeze depth, None: the probe; epochs)
        "linear_probe": [(None, epochs)],
        "fine_tune": [(depth, epochs)],
        "lp_ft": [(None, setup["probe_epochs"]), (depth, epochs)],
        "scratch": [(0, epochs)],
    }[strategy]
    total = sum(n for _, n in phases)
    rng = np.random.default_rng(setup["seed"])
    done, batch_size = 0, int(config.get("batch_size", 64))
    for phase_depth, phase_epochs in phases:
        frozen_bn = plain_freeze(model, phase_depth)
        head = list(model.get_classifier().parameters())
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
        groups = [{"params": head, "lr": config["head_lr"]}]
        if rest:
            groups.append({"params": rest, "lr": config.get("backbone_lr", 3e-4)})
        optimizer = torch.optim.AdamW(groups, weight_decay=config.get("weight_decay", 1e-4))
        for _ in range(phase_epochs):
            model.train()
            for bn in frozen_bn:
                bn.eval()
            order = rng.permutation(train)
            for i in range(0, len(order), batch_size):
                batch = order[i : i + batch_size]
                if len(batch) < 2:  # a BatchNorm in train mode needs two images
                    continue
                loss = F.cross_entropy(model(inputs(batch)), torch.from_numpy(labels[batch]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            done += 1
            metrics = {
                "val_accuracy": plain_accuracy(model, inputs, labels, val),
                "epoch": done,
                "finished": done == total,
            }
            if done < total:
                tune.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as folder:
                torch.save(model.state_dict(), Path(folder) / "model.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def plain_inputs(
    model: torch.nn.Module, images: np.ndarray, size: int
) -> Callable[[np.ndarray], torch.Tensor]:
    """Rows of ``images`` as the model's normalized input at ``size`` px (timm's mean and std)."""
    import timm

    data_config = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)

    def inputs(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float().div(255)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        return (x - mean) / std

    return inputs


def plain_accuracy(
    model: torch.nn.Module,
    inputs: Callable[[np.ndarray], torch.Tensor],
    labels: np.ndarray,
    rows: np.ndarray,
) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(inputs(rows[i : i + 256])) for i in range(0, len(rows), 256)])
    return float((logits.argmax(1).numpy() == labels[rows]).mean())


def pick_test_accuracy(
    checkpoint: Any, backbone: str, setup: dict[str, Any], data: Any, test: np.ndarray
) -> float:
    """The picked trial's final model (its Tune checkpoint) on the untouched test split, in the
    driver after the search: only the pick is tested, and not on the plain script's clock."""
    model = create_model(backbone, setup["num_classes"], "none")
    with checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    images = np.asarray(data.images)
    return plain_accuracy(
        model, plain_inputs(model, images, setup["image_size"]), data.labels, test
    )


def plain_space(config: SpaceConfig) -> dict[str, Any]:
    """The space file's ``space`` as Tune domains (``when`` ignored: an inactive value is unused)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in config.space.items():
        if spec.kind == "const":
            out[name] = spec.values[0]
        elif spec.kind == "choice":
            out[name] = tune.choice(list(spec.values))
        elif spec.kind == "int" and spec.step == 1:  # [low, high], both included
            out[name] = tune.randint(int(spec.low), int(spec.high) + 1)
        elif spec.kind == "int":
            out[name] = tune.qrandint(int(spec.low), int(spec.high), spec.step)
        elif spec.kind == "uniform":
            out[name] = tune.uniform(spec.low, spec.high)
        else:
            out[name] = tune.loguniform(spec.low, spec.high)
    return out


def check_same_freezing(backbone: str, num_classes: int = 10) -> int:
    """Raise unless :func:`plain_freeze` freezes exactly raytl's blocks (``backbone_blocks``) for
    every freeze depth and the whole backbone for the probe; returns the block count."""
    import timm

    from raytl.models import backbone_blocks

    with torch.device("meta"):
        model = timm.create_model(backbone, num_classes=num_classes)
    blocks = backbone_blocks(model)
    for depth in [None, *range(len(blocks) + 1)]:
        plain_freeze(model, depth)
        plain = {n for n, p in model.named_parameters() if not p.requires_grad}
        expected = {n for b in blocks[: len(blocks) if depth is None else depth] for n in b}
        if plain != expected:
            raise AssertionError(
                f"{backbone}, depth {depth}: the plain script freezes {sorted(plain ^ expected)[:5]} "
                "differently from raytl"
            )
    return len(blocks)


def run_peer(
    config: SpaceConfig, wall_s: float, storage: Path, seed: int, log: Path | None = None
) -> dict[str, Any]:
    """The plain script on ``config``'s data, space, epochs and concurrency, for ``wall_s``
    seconds of wall time in all (its data load and Ray start-up included), random search seeded
    with ``seed``; its pick (best validation accuracy of the trials that finished) and its test."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    for backbone in searched_backbones(config):
        check_same_freezing(backbone)
    started = time.perf_counter()
    data = config.data.load()
    pool, test = config.data.split_test(data)  # raytl's own untouched test split
    cpus = config.resources.workers_per_trial * config.resources.cpus_per_worker
    setup = {
        "backbone": config.model.backbone,
        "pretrained": config.model.pretrained,
        "num_classes": len(data.class_names),
        "image_size": config.data.image_size,
        "val_fraction": config.data.val_fraction,
        "epochs": config.search.max_epochs,
        "probe_epochs": 1,
        "seed": seed,
        "threads": max(1, int(cpus)),
    }
    storage.mkdir(parents=True, exist_ok=True)
    with ray_output_to(log or storage / "ray-output.log", verbose=False), ray_session(None):
        data_ref = [ray.put((np.asarray(data.images), data.labels, pool, test))]
        budget = max(1.0, wall_s - (time.perf_counter() - started))
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(plain_trainable, data_ref=data_ref, setup=setup),
                {"CPU": cpus},
            ),
            param_space=plain_space(config),
            tune_config=tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                search_alg=BasicVariantGenerator(random_state=seed),
                num_samples=1000,
                max_concurrent_trials=config.search.max_concurrent,
                time_budget_s=budget,
            ),
            run_config=tune.RunConfig(storage_path=str(storage), name="plain", verbose=0),
        )
        grid = tuner.fit()
    seconds = time.perf_counter() - started
    frame = grid.get_dataframe()
    finished = frame["finished"].fillna(False).astype(bool) if "finished" in frame else None
    done = frame[finished] if finished is not None else frame.iloc[0:0]
    best = (
        done.sort_values("val_accuracy", ascending=False, kind="stable").iloc[0]
        if len(done)
        else None
    )
    probes = done[done["config/strategy"] == "linear_probe"] if len(done) else done
    test_accuracy = math.nan
    if best is not None:
        results = (grid[i] for i in range(len(grid)))
        result = next(r for r in results if (r.metrics or {}).get("trial_id") == best["trial_id"])
        backbone = best.get("config/backbone", setup["backbone"])
        test_accuracy = pick_test_accuracy(result.checkpoint, backbone, setup, data, test)
    errors = [str(e).strip().splitlines()[-1] for e in grid.errors]
    return {
        "seconds": seconds,
        "budget": budget,
        "test_images": len(test),
        "trials": len(frame),
        "completed": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "pick": (
            pick_of(best, "config/", len(searched_backbones(config)) > 1)
            if best is not None
            else None
        ),
        "val": float(best["val_accuracy"]) if best is not None else math.nan,
        "test": test_accuracy,
        "probes": [
            (float(r["val_accuracy"]), float(r["time_total_s"])) for _, r in probes.iterrows()
        ],
    }


def searched_backbones(config: SpaceConfig) -> list[str]:
    spec = config.space.get("backbone")
    return [str(b) for b in spec.options()] if spec is not None else [config.model.backbone]


def pick_of(row: pd.Series, prefix: str = "", backbone: bool = False) -> str:
    """``fine_tune, freeze 3, head_lr 0.0069, backbone_lr 0.0023`` from a table row (the
    backbone first, ``lite1``, when the space searches it)."""

    def value(name: str) -> Any:
        v = row.get(prefix + name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    strategy = value("strategy")
    parts = [str(strategy)]
    if backbone and value("backbone") is not None:
        parts.insert(0, str(value("backbone")).removeprefix("efficientnet_"))
    if strategy in ("fine_tune", "lp_ft") and value("freeze_depth") is not None:
        parts.append(f"freeze {int(value('freeze_depth'))}")
    if value("head_lr") is not None:
        parts.append(f"head_lr {float(value('head_lr')):.2g}")
    if strategy != "linear_probe" and value("backbone_lr") is not None:
        parts.append(f"backbone_lr {float(value('backbone_lr')):.2g}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- raytl, one repeat


def dataset_raw(
    name: str, quick: bool, fashion_limit: int, space: Path, test_fraction: float | None = None
) -> dict[str, Any]:
    """The space file (the quickstart's), for digits as shipped; for ``fashion`` its data swapped;
    ``test_fraction`` (when given) replaces the file's ``data.test_fraction``."""
    raw = yaml.safe_load(space.read_text())
    if test_fraction is not None:
        raw["data"]["test_fraction"] = test_fraction
    if name == "fashion":
        raw["name"] = "peer_fashion"
        raw["data"] = {**raw["data"], "source": "fashion-mnist", "limit": fashion_limit}
        if Path(FASHION_PATH).is_dir():
            raw["data"]["path"] = FASHION_PATH
    if quick:  # a smoke test of the whole path, not a measurement
        raw["data"]["limit"] = 300
        raw["search"].update(num_samples=2, max_epochs=1, grace_period=1)
    return raw


def repeat_config(raw: dict[str, Any], name: str, seed: int, fixed_split: bool) -> SpaceConfig:
    raw = copy.deepcopy(raw)
    raw["search"]["seed"] = seed
    if not fixed_split:
        raw["data"]["seed"] = seed
    return parse_space(raw, f"benchmarks/peer.py ({name}, seed {seed})")


def one_repeat(config: SpaceConfig, seed: int) -> dict[str, Any]:
    """raytl's search, then the plain script for the same wall time, each in its own temp folder."""
    with tempfile.TemporaryDirectory(prefix=f"raytl-peer-{config.name}-{seed}-") as folder:
        tmp = Path(folder)
        started = time.perf_counter()
        table = run_search(config, tmp / "raytl", echo=SILENT)
        wall = time.perf_counter() - started
        best = json.loads((tmp / "raytl" / "best" / "metrics.json").read_text())
        hp = best["hyperparameters"]
        probes = table[table["strategy"] == "linear_probe"]
        raytl = {
            "seconds": wall,
            "trials": len(table),
            "completed": int((table["status"] == "completed").sum()),
            "pick": pick_of(pd.Series(hp), backbone=len(searched_backbones(config)) > 1),
            "val": float(best["search_value"]),
            "test": float(best["test_accuracy"]),
            "probes": [
                (
                    float(r["val_accuracy_mean"]),
                    float(r["worker_seconds"]),
                    float(r["trial_seconds"]),
                )
                for _, r in probes.iterrows()
            ],
        }
        peer = run_peer(config, wall, tmp / "plain", seed)
    return {"seed": seed, "raytl": raytl, "peer": peer, "test_images": peer["test_images"]}


# --------------------------------------------------------------------------- report


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    r = [run["raytl"]["test"] for run in runs]
    p = [run["peer"]["test"] for run in runs]
    diffs = [a - b for a, b in zip(r, p, strict=True)]
    s = max(spread(r), spread(p)) if len(runs) > 1 else math.nan
    diff = statistics.mean(diffs)
    return {
        "repeats": len(runs),
        "raytl_mean": statistics.mean(r),
        "raytl_std": spread(r),
        "peer_mean": statistics.mean(p),
        "peer_std": spread(p),
        "diff": diff,
        "diff_std": spread(diffs),
        "spread": s,
        "met": bool(diff > s) if not math.isnan(s) else None,
        "ahead_in": sum(d > 0 for d in diffs),
    }


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" + (f" ± {std:.4f}" if not math.isnan(std) else "")


def mean_of(values: list[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f}" if values else "none"


def heading_of(space: Path) -> str:
    """The doc section a space file's figures go to: the quickstart's is the main one."""
    if space.resolve() == QUICKSTART.resolve():
        return HEADING
    return (
        f"## The {yaml.safe_load(space.read_text())['name']} search against a plain Ray Tune script"
    )


def section(
    results: dict[str, list[dict[str, Any]]], command: str, labels: dict[str, str], space: Path
) -> str:
    shown = space.resolve().relative_to(REPO) if space.resolve().is_relative_to(REPO) else space
    lines = [
        f"{heading_of(space)} (`benchmarks/peer.py`)",
        "",
        provenance(command),
        "",
        f"raytl: the search of `{shown}` as shipped (TPE with raytl's seeded "
        "recipes, ASHA, cv with 2 folds, the frozen-feature cache, refit of the best on train+val, "
        "one test). Plain: a Ray Tune function trainable with a hand-written AdamW loop on one "
        "holdout split, random search over the same space, no early stopping, no cache, no refit, "
        "every configuration trained for the same `max_epochs` with raytl's four strategies (the "
        "same parameters frozen, frozen BatchNorm in eval mode), 2 trials at once like raytl; it "
        "gets raytl's measured wall time W in all (its data load and Ray start-up included) and "
        "its best finished trial by validation accuracy is tested (its final checkpoint, after the "
        "budget, off its clock) on the same untouched test split as raytl's pick. Repeat `s` sets "
        "`data.seed` and `search.seed` to `s` (seed 0: the file as shipped), so the spread "
        "includes the luck of the test split; within a repeat both see the same images and test "
        "split. Spread: the larger of the two standard deviations over "
        "repeats. The plain script's wall time (plain s) runs a little past W: Tune's own start "
        "and Ray's shutdown lie outside `time_budget_s`, in its favour.",
        "",
        "| data | repeats | raytl test acc | plain test acc | raytl − plain (std of the paired differences) | ahead by more than the spread | raytl ahead in | raytl trials completed / run | plain trials completed / started |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        s = summary(runs)
        verdict = "n/a (1 repeat)" if s["met"] is None else ("yes" if s["met"] else "**no**")
        lines.append(
            f"| {labels[name]} | {s['repeats']} | {fmt(s['raytl_mean'], s['raytl_std'])} | "
            f"{fmt(s['peer_mean'], s['peer_std'])} | {s['diff']:+.4f}"
            + (f" ({s['diff_std']:.4f})" if not math.isnan(s["diff_std"]) else "")
            + f" | {verdict}"
            + (f" (spread {s['spread']:.4f})" if not math.isnan(s["spread"]) else "")
            + f" | {s['ahead_in']} of {s['repeats']} | "
            f"{sum(r['raytl']['completed'] for r in runs)} / {sum(r['raytl']['trials'] for r in runs)} | "
            f"{sum(r['peer']['completed'] for r in runs)} / {sum(r['peer']['trials'] for r in runs)} |"
        )
    lines += [
        "",
        "Each repeat:",
        "",
        "| data | seed | test images | W (raytl) s | plain s | raytl pick | raytl val (cv) | raytl test | plain pick | plain val (holdout) | plain test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        for run in runs:
            a, b = run["raytl"], run["peer"]
            lines.append(
                f"| {labels[name]} | {run['seed']} | {run['test_images']} | {a['seconds']:.0f} | "
                f"{b['seconds']:.0f} | {a['pick']} | {a['val']:.4f} | {a['test']:.4f} | "
                f"{b['pick'] or 'none finished'} | {b['val']:.4f} | {b['test']:.4f} |"
            )
    lines += [
        "",
        "Linear-probe trials, before (the plain script's: the same epochs as every configuration, "
        "each a forward pass over the frozen backbone) and after (raytl's: a probe trained to "
        "convergence on features cached once per search). raytl's seconds are `worker_seconds` "
        "(the trial's training, over its 2 folds) and `trial_seconds` (launch to end); the plain "
        "script's are Tune's `time_total_s` of the trial.",
        "",
        "| data | plain probes finished | plain val acc (mean) | plain s (mean) | raytl probes | raytl val acc (cv mean) | raytl worker s (mean) | raytl trial s (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        before = [p for run in runs for p in run["peer"]["probes"]]
        after = [p for run in runs for p in run["raytl"]["probes"]]
        lines.append(
            f"| {labels[name]} | {len(before)} | {mean_of([p[0] for p in before])} | "
            f"{mean_of([p[1] for p in before], 1)} | {len(after)} | "
            f"{mean_of([p[0] for p in after])} | {mean_of([p[1] for p in after], 1)} | "
            f"{mean_of([p[2] for p in after], 1)} |"
        )
    lines.append("")
    for name, runs in results.items():
        s = summary(runs)
        goal = (
            "goal (ahead in the mean by more than the spread): "
            + ("met" if s["met"] else "NOT met")
            if s["met"] is not None
            else "one repeat: no spread to compare with"
        )
        lines.append(
            f"- {labels[name]}: raytl {s['raytl_mean']:.4f}, plain {s['peer_mean']:.4f}, "
            f"difference {s['diff']:+.4f}; {goal}."
        )
        errors = sum(r["peer"]["errors"] for r in runs)
        if errors:
            lines.append(f"  The plain script had {errors} failed trial(s).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", default="digits,fashion", help="comma-separated: digits, fashion"
    )
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds (instead of --repeats)"
    )
    parser.add_argument("--fashion-limit", type=int, default=2000)
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="data.test_fraction for every dataset (the file's: 0.2); with --fashion-limit, a "
        "larger untouched test split beside the same training pool (6000 and 0.6667: 2,000 to "
        "search and refit on, 4,000 to test)",
    )
    parser.add_argument(
        "--fixed-split",
        action="store_true",
        help="keep the file's data.seed (one test split); vary search.seed only",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: digits, seed 0, 300 images, 2 trials of 1 epoch",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave the doc alone")
    parser.add_argument(
        "--space",
        type=Path,
        default=QUICKSTART,
        help="the space file raytl searches (the quickstart's)",
    )
    args = parser.parse_args()
    datasets = ["digits"] if args.quick else [d.strip() for d in args.datasets.split(",") if d]
    unknown = set(datasets) - {"digits", "fashion"}
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(sorted(unknown))}: digits, fashion")
    seeds = (
        [0]
        if args.quick
        else [int(s) for s in args.seeds.split(",")]
        if args.seeds
        else list(range(args.repeats))
    )
    tested = [f"test {args.test_fraction:g}"] if args.test_fraction is not None else []
    digits = ["300"] if args.quick else tested
    labels = {
        "digits": "digits" + (f" ({', '.join(digits)})" if digits else ""),
        "fashion": f"fashion-mnist ({', '.join([f'{args.fashion_limit:,}', *tested])})",
    }
    command = shlex.join([".venv/bin/python", "benchmarks/peer.py", *sys.argv[1:]])
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for name in datasets:
        raw = dataset_raw(name, args.quick, args.fashion_limit, args.space, args.test_fraction)
        for seed in seeds:
            run = one_repeat(repeat_config(raw, name, seed, args.fixed_split), seed)
            results.setdefault(name, []).append(run)
            a, b = run["raytl"], run["peer"]
            print(
                f"{name} seed {seed}: raytl {a['test']:.4f} ({a['pick']}; {a['completed']}/"
                f"{a['trials']} trials completed, {a['seconds']:.0f} s) | plain {b['test']:.4f} "
                f"({b['pick']}; {b['completed']}/{b['trials']} finished, {b['seconds']:.0f} s, "
                f"budget {b['budget']:.0f} s)"
                + (f" | plain errors: {b['errors']} ({b['first_error']})" if b["errors"] else ""),
                flush=True,
            )
    text = section(results, command, labels, args.space)
    print()
    print(text)
    print(f"{(time.perf_counter() - started) / 60:.1f} min in all")
    if not args.no_write:
        write_section(text, heading_of(args.space))
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
