"""The paired scheme study, run and written up: holdout vs cv vs parallel segments (issue 16).

    .venv/bin/python benchmarks/schemes.py                  # Fashion-MNIST (2 pool sizes) + digits
    .venv/bin/python benchmarks/schemes.py --quick --no-write   # smoke test, a few minutes

For each dataset it runs ``raytl compare --paired K`` (:func:`raytl.paired.run_paired`) on
``search_spaces/compare_schemes.yaml``'s space (all four strategies, freeze depth, both learning
rates; EfficientNet-Lite0 with the offline ImageNet weights, 48 px): K configurations drawn per
repeat, each scored by holdout, cv (3 folds) and segments (3) for the same epochs with no early
stopping, refit on the whole pool and tested once; ``--repeats`` re-draws the configurations,
seeds and splits. Fashion-MNIST runs on stratified pools of two sizes (the same test split), since
a segment's model sees 1/S of the pool and its fidelity should depend on the pool size.

Writes the "## Measured" section of docs/schemes.md from the study's own tables alone (with the
command, date and commit), copies its plots next to it, and leaves every study's full output
(compare.md, the Parquet tables, each scheme's runs) under ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import provenance, write_section  # noqa: E402

from raytl.paired import run_paired  # noqa: E402
from raytl.paired_stats import rule_lines  # noqa: E402
from raytl.space_file import parse_space  # noqa: E402

DOC = REPO / "docs" / "schemes.md"
HEADING = "## Measured: the paired study"
OLD_HEADINGS = ("## A real run on Fashion-MNIST",)  # superseded sections, removed
SPACE = REPO / "search_spaces" / "compare_schemes.yaml"
FASHION_PATH = "/usr/share/datasets/fashion-mnist"


def dataset_raw(name: str, args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load(SPACE.read_text())
    raw["search"] = {**raw["search"], "max_epochs": args.epochs, "max_concurrent": 2}
    if name == "digits":
        raw["name"] = "schemes_digits"
        raw["data"] = {"source": "digits", "image_size": 48, "test_fraction": 0.2, "seed": 0}
    else:
        raw["name"] = "schemes_fashion"
        raw["data"] = {**raw["data"], "limit": args.fashion_limit, "test_fraction": 0.2}
        if Path(FASHION_PATH).is_dir():
            raw["data"]["path"] = FASHION_PATH
    if args.quick:
        raw["data"]["limit"] = 300
    return raw


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = parse_space(dataset_raw(name, args), f"benchmarks/schemes.py ({name})")
    pools = [None] if name == "digits" or args.quick else args.pool_sizes
    started = time.perf_counter()
    run_paired(
        config,
        out,
        args.k,
        schemes=["holdout", "cv", "segments"],
        repeats=args.repeats,
        pool_sizes=pools,
        echo=lambda line: print(f"[{name}] {line}", flush=True),
    )
    summary = pd.read_parquet(out / "paired.parquet")
    intervals = pd.read_parquet(out / "paired_intervals.parquet")
    return {
        "name": name,
        "out": out,
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "intervals": intervals,
        "rules": rule_lines(intervals, summary),
        "config": config,
    }


def _ci(row: pd.Series, name: str) -> str:
    value, low, high = row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high")
    if value is None or pd.isna(value):
        return "n/a"
    if pd.isna(low):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def headline(run: dict[str, Any]) -> list[str]:
    """The table a reader looks at first: per pool size and scheme, the correlations with
    their intervals, the pick, the cost."""
    means = run["summary"].groupby(["pool_size", "scheme"], sort=False).mean(numeric_only=True)
    lines = [
        "| pool | scheme | Kendall tau [95%] | tau − cv [95%] | Spearman [95%] | test acc. of pick | "
        "regret | worker-s | wall s | cost vs cv |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, row in run["intervals"].iterrows():
        pool, scheme = row["pool_size"], row["scheme"]
        m, cv = means.loc[(pool, scheme)], means.loc[(pool, "cv")]
        lines.append(
            f"| {int(pool):,} | {scheme} | {_ci(row, 'kendall_tau')} | "
            f"{_ci(row, 'kendall_tau_minus_cv') if scheme != 'cv' else '—'} | "
            f"{_ci(row, 'spearman')} | {m['selected_test_accuracy']:.4f} | {m['regret']:.4f} | "
            f"{m['worker_seconds']:.0f} | {m['wall_seconds']:.0f} | "
            f"{m['worker_seconds'] / max(cv['worker_seconds'], 1e-9):.0%} |"
        )
    return lines


def final_models(run: dict[str, Any]) -> str:
    """cv's pick as a refit and as a fold ensemble (item 4), mean over repeats per pool size."""
    cv = run["summary"][run["summary"]["scheme"] == "cv"]
    parts = []
    for pool, t in cv.groupby("pool_size"):
        parts.append(
            f"pool {int(pool):,}: refit {t['selected_test_accuracy'].mean():.4f}, fold ensemble "
            f"{t['ensemble_test_accuracy'].mean():.4f} (over {len(t)} repeat(s))"
        )
    return "cv's pick, refit on the whole pool against its 3 fold models averaged: " + "; ".join(
        parts
    )


def section(runs: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    lines = [
        f"{HEADING} (`benchmarks/schemes.py`)",
        "",
        provenance(command),
        "",
        f"Every figure below comes from this one run. Per dataset: K = {args.k} configurations "
        f"drawn per repeat from `search_spaces/compare_schemes.yaml`'s space (Optuna's random "
        f"sampler), {args.repeats} repeat(s) (each re-draws the configurations, the seeds and the "
        f"splits), every configuration scored by holdout (val fraction 0.2), cv (3 folds) and "
        f"segments (3) for {args.epochs} epoch(s) with no early stopping, 2 trials at once, then "
        "refit on the whole pool and tested once on the untouched test split (20% of the images). "
        "Intervals: 95%, a paired bootstrap over configurations (the same resample for every "
        "scheme) within each repeat, averaged over repeats. Cost: worker-seconds summed over the "
        'K trials, mean over repeats; "cost vs cv" is its share of cv\'s.',
        "",
    ]
    for run in runs:
        c = run["config"]
        lines += [
            f"### {c.data.source}{f' ({c.data.limit:,} images)' if c.data.limit else ''}, "
            f"{run['seconds'] / 60:.0f} min",
            "",
            *headline(run),
            "",
            "What the intervals support:",
            "",
            *[f"- {line}" for line in run["rules"]],
            f"- {final_models(run)}.",
            "",
            f"![Kendall tau with intervals, {c.data.source}]({c.name}_tau.png)",
            "",
            f"![regret against worker-seconds, {c.data.source}]({c.name}_cost_regret.png)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion,digits")
    parser.add_argument("--k", type=int, default=8, help="configurations per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pool-sizes", default="1000,3000", help="Fashion-MNIST's pool sizes")
    parser.add_argument("--fashion-limit", type=int, default=4000)
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "schemes-study")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 300 images, K=3, 1 repeat"
    )
    parser.add_argument("--no-write", action="store_true", help="leave docs/schemes.md alone")
    args = parser.parse_args()
    args.pool_sizes = [int(p) for p in args.pool_sizes.split(",")]
    if args.quick:
        args.k, args.repeats = 3, 1
    command = shlex.join([".venv/bin/python", "benchmarks/schemes.py", *sys.argv[1:]])
    runs = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        out = args.output / name
        if out.exists():
            shutil.rmtree(out)
        runs.append(run_one(name, args, out))
    text = section(runs, command, args)
    print(text)
    if not args.no_write:
        for run in runs:
            for kind in ("tau", "cost_regret"):
                shutil.copy(
                    run["out"] / f"paired_{kind}.png",
                    DOC.parent / f"{run['config'].name}_{kind}.png",
                )
        for heading in [h for h in OLD_HEADINGS if h in DOC.read_text()]:
            write_section("", heading, DOC)
        write_section(text, HEADING, DOC)
        print(f"wrote {DOC} ({datetime.date.today()})")


if __name__ == "__main__":
    main()
