"""The driver's memory as trials accumulate: does a long search grow the process that runs it?

    .venv/bin/python benchmarks/driver_memory.py                 # 100 trials (about 10 minutes)
    .venv/bin/python benchmarks/driver_memory.py --trials 40     # shorter

Runs a real `raytl search` (cached linear probes on the quickstart's digits, 2 trials at a time,
so trials are many and short) as a subprocess and samples, twice a second, the resident memory
(VmRSS from /proc) of the driver and of the GCS it started, against the number of finished
trials (read from the driver's clock file). Prints the figures and writes the "## Driver memory"
section of docs/benchmarks.md with docs/driver_memory.png. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import provenance, write_section  # noqa: E402

HEADING = "## Driver memory as trials accumulate"
PLOT = REPO / "docs" / "driver_memory.png"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every process below ``pid`` (the local Ray the driver started)."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        child = int(stat.parent.name)
        parents.setdefault(ppid, []).append(child)
        names[child] = name
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = names[child]
            todo.append(child)
    return found


def finished_trials(clock: Path) -> int:
    try:
        return sum(1 for t in json.loads(clock.read_text()).values() if "finished_at" in t)
    except (OSError, ValueError):
        return 0


def run(trials: int, tmp: Path) -> dict:
    space = {
        "name": "driver-memory",
        "data": {"source": "digits", "image_size": 48, "test_fraction": 0.2, "seed": 0},
        "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
        "scheme": {"kind": "holdout"},
        "search": {
            "num_samples": trials,
            "max_concurrent": 2,
            "max_epochs": 2,
            "scheduler": "fifo",
            "seed": 0,
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "space": {
            "strategy": "linear_probe",
            "head_lr": {"loguniform": [1.0e-3, 3.0e-2]},
            "batch_size": {"choice": [32, 64]},
        },
    }
    path, out = tmp / "space.yaml", tmp / "out"
    path.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    driver = subprocess.Popen(
        [sys.executable, "-m", "raytl", "search", str(path), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(driver.stdout), daemon=True)
    reader.start()
    samples = []  # (seconds, finished trials, driver MB, GCS MB)
    gcs_pid = None
    while driver.poll() is None:
        if gcs_pid is None or rss_mb(gcs_pid) is None:
            gcs_pid = next(
                (p for p, n in descendants(driver.pid).items() if n == "gcs_server"), None
            )
        mine = rss_mb(driver.pid)
        if mine is not None:
            samples.append(
                (
                    time.perf_counter() - started,
                    finished_trials(out / ".trial_clock.json"),
                    mine,
                    rss_mb(gcs_pid) if gcs_pid else float("nan"),
                )
            )
        time.sleep(0.5)
    reader.join(timeout=5)
    if driver.returncode != 0:
        sys.exit("the search failed:\n" + "".join(log[-40:]))
    return {
        "trials": trials,
        "seconds": time.perf_counter() - started,
        "samples": np.array(samples, dtype=float),
    }


def summarize(result: dict) -> dict:
    s = result["samples"]
    trials = result["trials"]
    # the driver's memory while n trials were finished: the median of those samples
    at = {}
    for n in sorted({1, 10, trials // 4, trials // 2, 3 * trials // 4, trials - 1}):
        rows = s[s[:, 1] == n]
        if len(rows):
            at[n] = (float(np.median(rows[:, 2])), float(np.median(rows[:, 3])))
    steady = s[(s[:, 1] >= 10) & np.isfinite(s[:, 2]) & np.isfinite(s[:, 3])]
    fits = len(np.unique(steady[:, 1])) > 1
    slope = np.polyfit(steady[:, 1], steady[:, 2], 1)[0] if fits else float("nan")
    gcs_slope = np.polyfit(steady[:, 1], steady[:, 3], 1)[0] if fits else float("nan")
    return {
        "at": at,
        "slope_mb_per_trial": float(slope),
        "gcs_slope_mb_per_trial": float(gcs_slope),
        "peak_mb": float(s[:, 2].max()),
    }


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(s[:, 1], s[:, 2], ".", ms=2, label="driver (raytl search)")
    ax.plot(s[:, 1], s[:, 3], ".", ms=2, label="GCS (gcs_server)")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Memory over a {result['trials']}-trial search (cached linear probes)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def section(result: dict, summary: dict) -> str:
    lines = [
        HEADING,
        "",
        provenance(f".venv/bin/python benchmarks/driver_memory.py --trials {result['trials']}"),
        "",
        f"A real `raytl search` of {result['trials']} cached "
        f"linear-probe trials (digits, 48 px, holdout, 2 epochs, 2 trials at a time, then the refit of the best), "
        f"{result['seconds']:.0f} s in all. Resident memory (VmRSS) sampled twice a second; each "
        "figure is the median of the samples taken while that many trials were finished.",
        "",
        "| finished trials | driver MiB | GCS MiB |",
        "| ---: | ---: | ---: |",
    ]
    for n, (mine, gcs) in summary["at"].items():
        lines.append(f"| {n} | {mine:.0f} | {gcs:.0f} |")
    lines += [
        "",
        f"Growth fitted over trials 10 to {result['trials']}: driver "
        f"{summary['slope_mb_per_trial'] * 1024:+.0f} KiB per trial, GCS "
        f"{summary['gcs_slope_mb_per_trial'] * 1024:+.0f} KiB per trial; driver peak "
        f"{summary['peak_mb']:.0f} MiB.",
        "",
        f"![memory over the search]({PLOT.name})",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raytl-memory-") as tmp:
        result = run(args.trials, Path(tmp))
    summary = summarize(result)
    for n, (mine, gcs) in summary["at"].items():
        print(f"after {n:4d} trials: driver {mine:7.1f} MiB   GCS {gcs:7.1f} MiB")
    print(
        f"growth over trials >= 10: driver {summary['slope_mb_per_trial'] * 1024:+.1f} KiB/trial, "
        f"GCS {summary['gcs_slope_mb_per_trial'] * 1024:+.1f} KiB/trial; "
        f"{result['seconds']:.0f} s in all"
    )
    plot(result)
    write_section(section(result, summary), HEADING)


if __name__ == "__main__":
    main()
