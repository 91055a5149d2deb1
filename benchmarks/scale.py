"""Data at scale: what loading a dataset costs the driver, as the dataset grows.

    .venv/bin/python benchmarks/scale.py                         # N = 5,000 and 20,000 (about 10 min)
    .venv/bin/python benchmarks/scale.py --sizes 2000 --limit 500   # quick
    .venv/bin/python benchmarks/scale.py --before c51fe9f        # also on older code, side by side

Generates N real JPEG files at 224 px (Fashion-MNIST's training images, upscaled with noise so that
they do not compress to nothing) as an ImageFolder and as Parquet shards (``raytl data convert``),
then loads each in a fresh process, whole and with ``data.limit``, and reads that process's peak
resident memory (VmHWM from /proc) and wall time. Prints the figures and writes the "## Data at
scale" section of docs/benchmarks.md. Linux only (/proc).

This is the in-memory path (``data.mode: memory``, what ``load_data`` does by default), so the
whole load grows with N (the streamed path, ``data.mode: stream``, holds an index instead:
``benchmarks/stream.py``); ``data.limit`` samples the file index before anything is decoded, so a
limited load costs what its sample costs, whatever N is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import machine, write_section  # noqa: E402

HEADING = "## Data at scale (`benchmarks/scale.py`)"
FASHION = "/usr/share/datasets/fashion-mnist"

CHILD = """
import json, sys, time, warnings
start = time.perf_counter()
from raytl.data import load_data
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
imported = rss("VmRSS:")
warnings.simplefilter("ignore")
source, path, limit = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None)
t0 = time.perf_counter()
data = load_data(source, path=path, image_size=224, limit=limit, seed=0)
print(json.dumps({"images": len(data), "decoded_mb": data.images.nbytes / 2**20,
                  "seconds": time.perf_counter() - t0, "imports_mb": imported,
                  "peak_mb": rss("VmHWM:")}))
"""


CHECK = """
import raytl
assert raytl.__file__.startswith({code!r}), raytl.__file__
"""


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """N JPEGs at 224 px in an ImageFolder (one folder per Fashion-MNIST class)."""
    from raytl.data import load_data

    fashion = load_data("fashion-mnist", path=FASHION)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(fashion), size=n, replace=n > len(fashion))
    for i, k in enumerate(picks):
        folder = root / fashion.class_names[fashion.labels[k]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        big = np.asarray(Image.fromarray(fashion.images[k]).resize((224, 224), Image.BICUBIC))
        noisy = np.clip(big.astype(np.int16) + rng.integers(-12, 13, big.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def measure(source: str, path: Path, limit: int | None, pythonpath: Path) -> dict:
    """Load in a fresh process (the code at ``pythonpath``); its peak memory and time."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(  # cwd: `python -c` puts it first on sys.path, before the installed raytl
        [sys.executable, "-c", CHILD + CHECK.format(code=str(pythonpath))]
        + [source, str(path), str(limit or 0)],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def code_at(ref: str | None, scratch: Path) -> tuple[Path, str]:
    """The repository's code at ``ref`` (a git worktree in ``scratch``), or this checkout's."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", ref or "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if ref is None:
        return REPO, head
    tree = scratch / "code"
    subprocess.run(
        ["git", "worktree", "add", "-q", "--detach", str(tree), ref], cwd=REPO, check=True
    )
    return tree, head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--before", help="a git ref: measure the code at that commit as well")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raytl-scale-") as scratch:
        codes = [code_at(None, Path(scratch))]
        if args.before:
            codes.append(code_at(args.before, Path(scratch)))
        try:
            for n in args.sizes:
                folder = make_images(Path(scratch) / f"folder-{n}", n)
                shards = Path(scratch) / f"shards-{n}"
                sys.path.insert(0, str(REPO))
                from raytl.data import convert_imagefolder

                convert_imagefolder(str(folder), str(shards))
                for source, path in (("imagefolder", folder), ("parquet", shards)):
                    for limit in (None, args.limit):
                        for code, commit in codes:
                            row = {"n": n, "source": source, "limit": limit, "code": commit}
                            row |= measure(source, path, limit, code)
                            print(json.dumps(row), flush=True)
                            rows.append(row)
        finally:
            for code, _ in codes[1:]:
                subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=REPO)
    if not args.no_write:
        write_section(section(rows, codes[0][1], args), HEADING)


def section(rows: list[dict], commit: str, args: argparse.Namespace) -> str:
    when = datetime.date.today().isoformat()
    command = "benchmarks/scale.py " + " ".join(
        [f"--sizes {' '.join(map(str, args.sizes))}", f"--limit {args.limit}"]
        + ([f"--before {args.before}"] if args.before else [])
    )
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python {command}`, {when}, at commit {commit}; {machine()}.",
        "Each load runs in a fresh process (`load_data(..., image_size=224)`); peak is its VmHWM,",
        "imports is its resident memory after `import raytl.data` (torch included).",
        "",
        "| N files | source | data.limit | code | images | decoded MB | peak MB | imports MB | s |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['source']} | {r['limit'] or 'none'} | {r['code']} | {r['images']:,} | "
            f"{r['decoded_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['imports_mb']:,.0f} | "
            f"{r['seconds']:.1f} |"
        )
    lines += ["", *reading(rows, commit)]
    return "\n".join(lines) + "\n"


def codes_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["code"] for r in rows))


def reading(rows: list[dict], commit: str) -> list[str]:
    """What the table says, computed from it: how the peak grows with N, whole and limited."""
    out = []
    sizes = sorted({r["n"] for r in rows})
    for source in sorted({r["source"] for r in rows}):
        for limited in (False, True):
            mine = {
                r["n"]: r["peak_mb"]
                for r in rows
                if r["source"] == source and bool(r["limit"]) == limited and r["code"] == commit
            }
            if len(mine) < 2:
                continue
            first, last = mine[sizes[0]], mine[sizes[-1]]
            limit = max(r["limit"] or 0 for r in rows)
            what = f"with data.limit {limit}" if limited else "whole"
            out.append(
                f"- {source}, {what}: peak {first:,.0f} MB at N={sizes[0]:,}, {last:,.0f} MB at "
                f"N={sizes[-1]:,} ({last / first:.2f}x for {sizes[-1] / sizes[0]:.0f}x the files)."
            )
    imports = {c: max(r["imports_mb"] for r in rows if r["code"] == c) for c in codes_of(rows)}
    if len(imports) > 1:
        out.append(
            "- Imports: "
            + ", ".join(f"{mb:,.0f} MB at {code}" for code, mb in imports.items())
            + " (`import raytl.data` now loads scikit-learn's splitters, which `raytl.config`, "
            "and so every search, imported anyway)."
        )
    out.append(
        "- A whole load in memory (`data.mode: memory`) holds every decoded image in the loading "
        "process, so it grows with N; the streamed path (`data.mode: stream`) holds an index "
        'instead: see "Streaming" (`benchmarks/stream.py`).'
    )
    return out


if __name__ == "__main__":
    main()
