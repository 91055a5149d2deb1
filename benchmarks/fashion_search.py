"""It really runs big: a streamed search on all 70,000 Fashion-MNIST images.

    .venv/bin/python benchmarks/fashion_search.py              # about 10 min on 2 cores
    .venv/bin/python benchmarks/fashion_search.py --limit 3000 # quick

Writes Fashion-MNIST's 70,000 images (its 60,000 training and 10,000 test images, from Debian's
dataset-fashion-mnist, offline) as PNG files in an image folder, converts them to Parquet shards with ``raytl data convert``, then runs
``raytl search`` on the shards with ``data.mode: stream`` (a cached linear probe and a few short
fine-tuning trials, sized for a 2-core machine). While the search runs, every process of its
session (the driver, Ray's processes, the trials' workers) is sampled from /proc twice a second;
the section "## A streamed search on all of Fashion-MNIST" of docs/benchmarks.md gets the driver's
peak resident memory (VmHWM, the kernel's own peak), the largest of the other processes and the
wall time. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import provenance, write_section  # noqa: E402

HEADING = "## A streamed search on all of Fashion-MNIST (`benchmarks/fashion_search.py`)"
FASHION = "/usr/share/datasets/fashion-mnist"


def write_folder(root: Path) -> int:
    """Every Fashion-MNIST image (training and test files) as a PNG under ``root/<class>/``."""
    from raytl.data import load_data

    fashion = load_data("fashion-mnist", path=FASHION)
    for i, (pixels, label) in enumerate(zip(fashion.images, fashion.labels, strict=True)):
        folder = root / fashion.class_names[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[:, :, 0]).save(folder / f"{i:05d}.png")
    return len(fashion)


def peak_of(pid: int) -> tuple[float, str]:
    """(VmHWM in MiB, command) of a live process; (0, "") once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return 0.0, ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024, command
    return 0.0, command


def session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples the peak memory of every process in the driver's session until stopped."""

    def __init__(self, driver: int) -> None:
        super().__init__(daemon=True)
        self.driver, self.peaks = driver, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit() and session_of(int(entry)) == self.driver:
                    peak, command = peak_of(int(entry))
                    old = self.peaks.get(int(entry), (0.0, ""))
                    self.peaks[int(entry)] = (max(peak, old[0]), command or old[1])
            time.sleep(0.5)


def space(shards: Path, limit: int | None) -> dict:
    return {
        "name": "fashion60k",
        "data": {
            "source": "parquet",
            "path": str(shards),
            "image_size": 32,
            "mode": "stream",
            "limit": limit,
        },
        "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
        "scheme": {"kind": "holdout"},
        "search": {
            "num_samples": 4,
            "max_concurrent": 1,
            "max_epochs": 1,
            "scheduler": "fifo",
            "seed": 0,
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 2},
        "space": {
            "strategy": {"choice": ["linear_probe", "fine_tune"]},
            "freeze_depth": 5,
            "head_lr": {"loguniform": [3.0e-3, 3.0e-2]},
            "backbone_lr": 1.0e-3,
            "batch_size": 128,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, help="data.limit (quick runs); default: all 70,000")
    parser.add_argument("--data", type=Path, help="keep the folder and shards here (reused)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raytl-fashion-") as folder:
        run(args, Path(folder))


def run(args: argparse.Namespace, scratch: Path) -> None:
    """Write the data (unless ``--data`` holds it), run the search in ``scratch``, measure."""
    data = args.data or scratch
    folder, shards, out = data / "folder", data / "shards", scratch / "out"
    if not folder.exists():
        started = time.perf_counter()
        print(f"wrote {write_folder(folder)} PNGs in {time.perf_counter() - started:.0f}s")
    if not shards.exists():
        raytl = [sys.executable, "-m", "raytl"]
        subprocess.run([*raytl, "data", "convert", str(folder), str(shards)], check=True)
    space_file = scratch / "space.yaml"
    space_file.write_text(yaml.safe_dump(space(shards, args.limit), sort_keys=False))
    started = time.perf_counter()
    driver = subprocess.Popen(
        [sys.executable, "-m", "raytl", "search", str(space_file), "--output", str(out)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = Sampler(driver.pid)
    sampler.start()
    log = []
    assert driver.stdout is not None
    for line in driver.stdout:
        log.append(line)
        print(line, end="")
    driver.wait()
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    if driver.returncode != 0:
        sys.exit(f"the search failed ({driver.returncode})")
    driver_peak = sampler.peaks.get(driver.pid, (0.0, ""))[0]
    others = sorted(
        ((peak, command) for pid, (peak, command) in sampler.peaks.items() if pid != driver.pid),
        reverse=True,
    )
    picked = [line.strip() for line in log if "data.mode" in line or "test accuracy" in line]
    lines = [
        HEADING,
        "",
        provenance(
            ".venv/bin/python benchmarks/fashion_search.py"
            + (f" --limit {args.limit}" if args.limit else "")
        ),
        "",
        "All of Fashion-MNIST (70,000 PNGs at 28 px: its 60,000 training and 10,000 test images, "
        "as Parquet shards written by "
        "`raytl data convert`), searched with `data.mode: stream` at 32 px: holdout, 4 trials "
        "(linear probe on the cached features or fine-tuning the top blocks, 1 epoch), one at a "
        "time, 2 CPUs per trial, then the refit on train+val and the test. Peaks are each "
        "process's VmHWM, sampled every 0.5 s.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| wall time of the search | {seconds:.0f} s |",
        f"| driver's peak resident memory | {driver_peak:.0f} MiB |",
    ]
    for peak, command in others[:3]:
        lines.append(
            f"| peak of `{command.split(' ')[0].rsplit('/', 1)[-1][:40]}` | {peak:.0f} MiB |"
        )
    lines += ["", "From the search's log:", "", *[f"    {line}" for line in picked], ""]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, HEADING)


if __name__ == "__main__":
    main()
