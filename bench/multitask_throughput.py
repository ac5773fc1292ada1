"""Seconds per epoch and peak memory of the multitask network's training (issue 16), on synthetic crops.

Trains `radstudy.networks.train.train_multitask` (the project's loop: augmentation, masked Dice + CE, BCE, Cox,
inner-split evaluation every epoch) on N random crops with a blob as the tumour mask, half of them annotated, and
prints per epoch the seconds (and of them the inner evaluation's), then the mean over the epochs after the first,
samples per second, and the peak memory: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on CPU.

    .venv/bin/python bench/multitask_throughput.py [--size 16 128 128] [--rows 64] [--epochs 3] [--batch 8]
        [--features 32 64 128 256 320] [--device cpu|cuda] [--threads 2]

Seed 004's crops (MultiRecNet's code): 128 x 128 x 16 (z 16), batch 8; nnU-Net-like features per stage. On CPU
use small sizes (e.g. --size 32 32 32 --features 8 16 32 64, the demo's).
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import numpy as np
import torch

from radstudy.networks.train import train_multitask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[16, 128, 128], help="z y x")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    n, size = args.rows, tuple(args.size)
    axes = np.stack(np.meshgrid(*[np.arange(s) - s / 2 for s in size], indexing="ij"))
    radius = np.array(size) / 5
    mask = ((axes / radius.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 1
    masks = np.repeat(mask[None], n, 0).astype(np.uint8)
    images = (rng.normal(size=(n, 1, *size)) + masks[:, None]).astype(np.float32)
    target = {"y": rng.integers(0, 2, n).astype(float), "time": rng.exponential(30, n),
              "event": (rng.random(n) < 0.6).astype(float)}
    # strides 1, 2, 2, ...: z is pooled as the in-plane axes, so z must be divisible too (16: up to 5 stages)
    cfg = {"crop_size": list(size), "epochs": args.epochs, "batch_size": args.batch, "threads": args.threads,
           "early_stopping_patience": None, "multitask": {"features_per_stage": args.features}}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trained = train_multitask(images, None, target, masks, np.arange(n) % 2 == 0, np.ones(n, bool), cfg, seed=1,
                              device=args.device)
    wall = time.perf_counter() - started
    history = trained.history
    steady = history["seconds"].iloc[1:] if len(history) > 1 else history["seconds"]
    fit_rows = n - len(trained.inner_rows)
    print(history[["epoch", "seconds", "inner_seconds", "train_loss", "inner_loss"]].to_string(index=False))
    parameters = sum(p.numel() for p in trained.model.parameters())
    print(f"device {args.device}, crops {'x'.join(map(str, size))} (z y x), batch {args.batch}, features "
          f"{args.features} ({parameters / 1e6:.2f} M parameters), {fit_rows} fitting rows")
    print(f"seconds per epoch (epochs 2..): {steady.mean():.2f}; {fit_rows / steady.mean():.1f} samples/s; "
          f"whole call {wall:.1f} s")
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
