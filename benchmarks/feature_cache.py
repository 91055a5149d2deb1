"""The frozen-feature cache: one process against the actor pool, memory and seconds.

    .venv/bin/python benchmarks/feature_cache.py              # 70,000 Fashion-MNIST images, ~6 min
    .venv/bin/python benchmarks/feature_cache.py --limit 5000 # quick

Fashion-MNIST (its 60,000 training and 10,000 test images, offline from Debian's package) at
32 px, EfficientNet-Lite0 with the package's weights. Two runs, each in a fresh process:

- one process: ``raytl.features.ensure_features`` (how the cache was computed before the pool:
  one process, here with 2 threads, keeps every chunk's features, concatenates them, converts
  them to Arrow and writes them);
- the pool: ``raytl.features.prepare_feature_cache`` on a local Ray of 2 CPUs with
  ``cpus_per_worker: 1`` (two actors, 1,024-row chunks written as row groups as they come),
  then a trial's read of the held matrix from the object store.

The process that ran the cache resets its peak (/proc/self/clear_refs) once the images are
loaded and reports its resident memory then and its peak (VmHWM) after the cache; the actors,
sampled from /proc twice a second, their whole peak. These and the wall time go to the
section "## Frozen-feature cache: one process against the actor pool" of docs/benchmarks.md.
Both drivers hold the images decoded (215 MB at 70,000 x 32 x 32 x 3), the actors their copy
from the object store. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from fashion_search import FASHION, Sampler  # noqa: E402
from strategies import provenance, write_section  # noqa: E402

HEADING = (
    "## Frozen-feature cache: one process against the actor pool (`benchmarks/feature_cache.py`)"
)
SIZE = 32


def fashion(limit: int | None):
    from raytl.data import load_data

    data = load_data("fashion-mnist", path=FASHION, image_size=SIZE)
    if limit:
        data = data.subset(list(range(limit)))
    return data


def child(kind: str, root: str, limit: int | None) -> dict:
    """Run one way of computing the cache in this process; its figures as a dict."""
    import torch

    data = fashion(limit)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the cache's own peak
    memory = {"base_mb": status_mb("VmRSS")}
    started = time.perf_counter()
    if kind == "single":
        from raytl.features import ensure_features

        torch.set_num_threads(2)
        result = ensure_features(root, "efficientnet_lite0", "package", data, SIZE)
        seconds = time.perf_counter() - started
        return {
            **memory,
            "seconds": seconds,
            "shape": list(result.features.shape),
            "peak_mb": status_mb("VmHWM"),
        }
    import ray

    from raytl.cluster import ray_session
    from raytl.features import prepare_feature_cache
    from raytl.space_file import parse_space

    config = parse_space(
        {
            "data": {"source": "fashion-mnist", "path": FASHION, "image_size": SIZE},
            "resources": {"cpus_per_worker": 1},
            "space": {"strategy": "linear_probe"},
        }
    )
    lines: list[str] = []
    with ray_session(None):
        refs = prepare_feature_cache(config, data, ray.put(data), root, lines.append)
        seconds = time.perf_counter() - started
        peak = status_mb("VmHWM")
        shape = list(ray.get(refs["efficientnet_lite0"]).shape)
    return {**memory, "seconds": seconds, "shape": shape, "line": lines[0], "peak_mb": peak}


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def run(kind: str, limit: int | None, scratch: Path) -> dict:
    """A fresh process (its own session), sampled until it ends."""
    command = [sys.executable, __file__, "--child", kind, "--root", str(scratch / kind)]
    if limit:
        command += ["--limit", str(limit)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{kind}: exit {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    actors = [p for pid, (p, c) in sampler.peaks.items() if "FeatureExtractor" in c]
    others = [(p, c) for pid, (p, c) in sampler.peaks.items() if pid != proc.pid]
    largest = max(others, default=(0.0, ""))
    return {
        **result,
        "actor_mb": max(actors, default=0.0),
        "actors": len(actors),
        "largest_other_mb": largest[0],
        "largest_other": largest[1].split()[0] if largest[1] else "",
    }


def section(single: dict, pool: dict, limit: int | None) -> str:
    rows = single["shape"][0]
    lines = [
        HEADING,
        "",
        provenance("benchmarks/feature_cache.py" + (f" --limit {limit}" if limit else "")),
        "",
        f"Fashion-MNIST, {rows:,} images at {SIZE} px, EfficientNet-Lite0 (package weights), "
        f"features {single['shape'][1]} wide ({rows * single['shape'][1] * 4 / 1e6:.0f} MB as "
        "float32). Each run in a fresh process that loads all 70,000 images first (then takes "
        "the first N); its peak is reset after that, so the figure is the cache's. An actor's "
        "peak includes torch, the model and the pages of the images it read from the object "
        "store. 2 cores.",
        "",
        "| how | wall s | process that computed the cache: resident MiB before -> peak during | largest actor: peak MiB |",
        "| --- | --: | --: | --: |",
        f"| one process, 2 threads (`ensure_features`, the path before the pool) | "
        f"{single['seconds']:.1f} | {single['base_mb']:,.0f} -> {single['peak_mb']:,.0f} | - |",
        f"| actor pool, {pool['actors']} actors x 1 CPU (`prepare_feature_cache`: the driver "
        f"writes 1,024-row chunks as they come) | {pool['seconds']:.1f} | "
        f"{pool['base_mb']:,.0f} -> {pool['peak_mb']:,.0f} (the driver) | {pool['actor_mb']:,.0f} |",
        "",
        f"The pool's line: `{pool['line'].split(' (')[0]}`. The largest other process of the "
        f"pool's run (Ray's own included): {pool['largest_other_mb']:,.0f} MiB "
        f"(`{pool['largest_other']}`; the task that reads the matrix into the object store "
        "holds it once and one batch of rows).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, help="the first N images only (quick runs)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", choices=["single", "pool"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.limit)))
        return
    with tempfile.TemporaryDirectory(prefix="raytl-featbench-") as scratch:
        single = run("single", args.limit, Path(scratch))
        pool = run("pool", args.limit, Path(scratch))
    text = section(single, pool, args.limit)
    print(text)
    if not args.no_write:
        write_section(text, HEADING)


if __name__ == "__main__":
    main()
