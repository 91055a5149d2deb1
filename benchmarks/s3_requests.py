"""What loading Parquet shards from S3 costs in requests and seconds (a real S3 server: moto).

Starts moto's standalone server on 127.0.0.1 (the dev extra brings it), converts an image folder
of N JPEGs (Fashion-MNIST upscaled with noise, ``scale.make_images``) to shards on a bucket of it,
then, each in a fresh process: the streamed load (``load_data(..., mode="stream")``: the shards
scanned and checked, every row group read once to check and digest its rows), one streamed epoch
(``StreamedImages.take`` over every row, batches of 64, in storage order) and the in-memory load.
Requests are the lines moto's server logs for the bucket (GET, HEAD), counted per step.

    .venv/bin/python benchmarks/s3_requests.py                 # N 4,000, 500-row shards
    .venv/bin/python benchmarks/s3_requests.py --no-write      # print only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

HEADING = "## Parquet shards on S3: requests per load (`benchmarks/s3_requests.py`)"
KEYS = {"AWS_ACCESS_KEY_ID": "raytl-bench", "AWS_SECRET_ACCESS_KEY": "raytl-bench-secret"}
BUCKET = "raytl-bench"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) /' + BUCKET + r'[/?"\s]')


def child_step(step: str, uri: str) -> dict:
    """One step in this (fresh) process: its seconds, and what it saw."""
    import numpy as np

    from raytl.data import load_data

    t0 = time.perf_counter()
    mode = "memory" if step == "memory" else "stream"
    data = load_data("parquet", path=uri, image_size=48, mode=mode)
    out: dict = {"images": len(data), "load_seconds": time.perf_counter() - t0}
    if step == "epoch":
        t1 = time.perf_counter()
        for start in range(0, len(data), 64):
            data.images.take(np.arange(start, min(start + 64, len(data))))
        out["epoch_seconds"] = time.perf_counter() - t1
    return out


def start_moto(log: Path) -> tuple[subprocess.Popen, int]:
    from raytl.cluster import free_port

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if not server:
        sys.exit("moto_server not found: pip install -e '.[dev]' (it brings moto[server])")
    port = free_port()
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"moto did not start (see {log})")
            time.sleep(0.2)


def requests_in(log: Path, since: int) -> tuple[dict[str, int], int]:
    """The bucket's requests logged after byte ``since`` of the log, by method; the new end."""
    text = log.read_text(errors="replace")
    plain = ANSI.sub("", text[since:])  # the server colours some lines
    counts = Counter(m.group(1) for m in REQUEST.finditer(plain))
    return dict(counts), len(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    from strategies import provenance

    command = (".venv/bin/python benchmarks/s3_requests.py " + " ".join(sys.argv[1:])).strip()
    env = {**os.environ, **KEYS}
    with tempfile.TemporaryDirectory(prefix="raytl-bench-s3-") as scratch:
        folder, log = Path(scratch) / "folder", Path(scratch) / "moto.log"
        from scale import make_images

        make_images(folder, args.images, seed=0)
        proc, port = start_moto(log)
        try:
            os.environ.update(KEYS)
            import pyarrow.fs as pafs

            from raytl.data import convert_imagefolder

            query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
            fs = pafs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{port}",
                scheme="http",
                allow_bucket_creation=True,
                access_key=KEYS["AWS_ACCESS_KEY_ID"],
                secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
            )
            fs.create_dir(BUCKET)
            uri = f"s3://{BUCKET}/shards?{query}"
            written = convert_imagefolder(str(folder), uri, shard_size=args.shard_size)
            shards = len([w for w in written if ".parquet" in str(w)])
            _, mark = requests_in(log, 0)
            rows = []
            for step in ("stream", "epoch", "memory"):
                done = subprocess.run(
                    [sys.executable, __file__, "_child", step, uri],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=REPO,
                    check=False,
                )
                if done.returncode:
                    sys.exit(done.stderr[-4000:])
                time.sleep(0.5)  # the server's log lines for the last requests
                counts, mark = requests_in(log, mark)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"step": step, **result, **counts})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [
        HEADING,
        "",
        provenance(command),
        "",
        f"{args.images:,} JPEGs at 224 px converted by `raytl.data.convert_imagefolder` into "
        f"{shards} shards of {args.shard_size} rows (256-row row groups) on a moto S3 server on "
        "this machine (so seconds are not a network's; the requests are what a bucket would "
        "bill and wait for). Each step runs in a fresh process: `load_data('parquet', "
        "mode='stream')` (the index: the shards scanned, every row group read once), the same "
        "then one epoch of `take` over every row in storage order (the epoch's requests are the "
        "step's minus the load's), and `load_data(..., mode='memory')`. Requests: the lines "
        "moto logs for the bucket.",
        "",
        "| step | images | GET | HEAD | load s | epoch s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        epoch = f"{r['epoch_seconds']:.2f}" if "epoch_seconds" in r else ""
        lines.append(
            f"| {r['step']} | {r['images']:,} | {r.get('GET', 0)} | {r.get('HEAD', 0)} | "
            f"{r['load_seconds']:.2f} | {epoch} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from strategies import write_section

        write_section(text, HEADING)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(child_step(sys.argv[2], sys.argv[3])), flush=True)
    else:
        main()
