"""The quickstart search, measured: what `make quickstart` runs, timed, and what it found.

    .venv/bin/python benchmarks/quickstart.py          # about 4 min on 2 cores

Runs ``raytl search search_spaces/quickstart.yaml`` (the README's main job, without the venv
install) into a temporary folder, and writes the section "## Quickstart search" of
docs/benchmarks.md from that one run alone: wall time, trials completed and stopped, the best
trial and its cross-validated score, the refit's test accuracy and time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import provenance, write_section  # noqa: E402

HEADING = "## Quickstart search (`benchmarks/quickstart.py`)"
SPACE = "search_spaces/quickstart.yaml"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="raytl-quickstart-") as folder:
        out = Path(folder) / "quickstart"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "raytl", "search", SPACE, "--output", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        print(done.stdout)
        if done.returncode != 0:
            sys.exit(f"the search failed:\n{done.stderr[-3000:]}")
        results = pd.read_parquet(out / "results.parquet")
        best = json.loads((out / "best" / "metrics.json").read_text())
    searched = re.search(r"search finished in (\d+)s", done.stdout)
    counts = results["status"].value_counts()
    row = results.loc[results["trial_id"] == best["trial_id"]].iloc[0]
    hp = best["hyperparameters"]
    chosen = ", ".join(
        f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in hp.items()
        if k in ("strategy", "freeze_depth", "head_lr", "backbone_lr") and v is not None
    )
    search = yaml.safe_load((REPO / SPACE).read_text())["search"]
    lines = [
        HEADING,
        "",
        provenance(f".venv/bin/python benchmarks/quickstart.py  # runs raytl search {SPACE}"),
        "",
        f"`{SPACE}` as shipped: digits (1,797 images; {best['test_images']} held out as the test "
        "split), 48 px, EfficientNet-Lite0 with the package's ImageNet weights, cv with 2 folds, "
        f"{search['num_samples']} trials of at most {search['max_epochs']} epochs, ASHA, TPE "
        "seeded, the frozen-feature cache, then the refit "
        "of the best on train+val and one test. One run; the venv install of `make quickstart` is "
        "not included.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| the command's wall time | {wall:.0f} s |",
        f'| the search, refit included ("search finished in") | {searched.group(1) if searched else "?"} s |',
        f"| trials completed / stopped by ASHA / failed | {counts.get('completed', 0)} / "
        f"{counts.get('stopped', 0)} / {counts.get('error', 0)} |",
        f"| best trial | {chosen} |",
        f"| its cv validation accuracy (mean ± std over folds) | {row['val_accuracy_mean']:.4f} ± "
        f"{row['val_accuracy_std']:.4f} |",
        f"| refit on train+val ({best['train_images']} images), test accuracy "
        f"({best['test_images']} untouched images) | {best['test_accuracy']:.4f} |",
        f"| refit time | {best['seconds']:.0f} s |",
        "",
    ]
    section = "\n".join(lines) + "\n"  # a blank line before the next section
    print(section)
    write_section(section, HEADING)


if __name__ == "__main__":
    main()
