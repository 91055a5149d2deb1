"""Scale-out within a unit: one unit trained by 1 process or by 2 DDP ranks (CPU, gloo).

    .venv/bin/python benchmarks/ddp_unit.py             # about 3 min on 2 cores
    .venv/bin/python benchmarks/ddp_unit.py --quick     # a smoke run

One holdout unit of Fashion-MNIST (Debian's package, offline) fine-tuned from the offline
EfficientNet-Lite0 weights, no Ray: (a) one process with one thread and batch 2B, (b) one process
with two threads and batch 2B, (c) two ranks (torch.multiprocessing, gloo, one thread each) with
batch B each over a :class:`~raytl.unit_group.UnitGroup`, which is how a trial runs a unit when
``workers_per_trial`` is twice the number of units. Prints the training img/s and the validation
accuracy of each and writes the section "## Scale-out within a unit" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from strategies import provenance, write_section  # noqa: E402

from raytl.data import load_data  # noqa: E402
from raytl.schemes import assign_units  # noqa: E402
from raytl.space import Hyperparameters  # noqa: E402
from raytl.unit import UnitTrainer  # noqa: E402
from raytl.unit_group import groups_for_rank  # noqa: E402

HEADING = "## Scale-out within a unit (`benchmarks/ddp_unit.py`)"
FASHION = "/usr/share/datasets/fashion-mnist"
BATCH = 32  # per rank; one process takes 2 * BATCH


def run_unit(images: int, epochs: int, batch: int, group=None) -> dict:
    data = load_data("fashion-mnist", path=FASHION, limit=images, seed=0)
    order = np.random.default_rng(0).permutation(len(data))
    cut = int(0.8 * len(order))
    hp = Hyperparameters(
        backbone="efficientnet_lite0",
        strategy="fine_tune",
        freeze_depth=3,
        head_lr=3e-3,
        backbone_lr=1e-3,
        batch_size=batch,
        epochs=epochs,
    )
    trainer = UnitTrainer(
        hp,
        data,
        order[:cut],
        order[cut:],
        pretrained="package",
        image_size=48,
        device=torch.device("cpu"),
        seed=0,
        group=group,
    )
    metrics = [trainer.run_epoch() for _ in range(epochs)]
    return {  # this process's own images over its training time (a rank: its share)
        "images_per_second": float(np.mean([m["images_per_second"] for m in metrics])),
        "val_accuracy": metrics[-1]["val_accuracy"],
        "train_loss": metrics[-1]["train_loss"],
    }


def rank_main(rank: int, store: str, out: str, images: int, epochs: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        group = groups_for_rank(assign_units(1, 2), rank)[0]
        result = run_unit(images, epochs, BATCH, group)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    images, epochs = (600, 1) if args.quick else (5000, 2)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows.append(
            (
                f"1 process, {threads} thread(s), batch {2 * BATCH}",
                run_unit(images, epochs, 2 * BATCH),
            )
        )
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(rank_main, args=(f"{scratch}/store", scratch, images, epochs), nprocs=2)
        ranks = [torch.load(Path(scratch) / f"rank{r}.pt") for r in range(2)]
    # the ranks trained one model: the same validation figures; the unit's rate is their sum
    two = {
        "images_per_second": sum(r["images_per_second"] for r in ranks),
        "val_accuracy": ranks[0]["val_accuracy"],
        "train_loss": ranks[0]["train_loss"],
    }
    rows.append((f"2 ranks (gloo), 1 thread each, batch {BATCH} each", two))
    base = rows[0][1]["images_per_second"]
    lines = [
        HEADING,
        "",
        provenance(f".venv/bin/python benchmarks/ddp_unit.py{' --quick' if args.quick else ''}"),
        "",
        f"One unit: {images} Fashion-MNIST images (80% train, 20% validation) at 48 px, "
        f"EfficientNet-Lite0 fine-tuned from block 3 (`freeze_depth: 3`), {epochs} epoch(s), the "
        "same global batch of 64 in every row.",
        "",
        "| run | train img/s | vs 1 thread | val accuracy | last train loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['images_per_second']:.0f} | {r['images_per_second'] / base:.2f}x "
            f"| {r['val_accuracy']:.4f} | {r['train_loss']:.4f} |"
        )
    lines.append("")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, HEADING)


if __name__ == "__main__":
    main()
