"""Training throughput: radstudy.networks.train.train_network's loop vs a bare torch loop (issue 15's target: >= 0.9x).

Both train the same network (MONAI ResNet10, widen factor 0.25, stride-2 stem: ~0.9 M parameters) on the same
cached float32 crops (32^3 voxels, one channel) with batch 8, AdamW and the binary cross-entropy, with the same
torch threads:

  bare      the minimal loop: a random permutation, then for each batch of 8 index the cached tensor, forward,
            backward, step (no augmentation, no validation, no logging).
  pipeline  train_network on the same rows (all in the training partition; 20 % of them held out as its inner
            split), augmentation on (flip, rotation, scaling, intensity shift), early stopping off so that
            every epoch runs. samples = rows it fits on per epoch; rates are given per epoch over the whole
            epoch (history `seconds`: batches, augmentation and the inner evaluation) and over the training part
            alone (`seconds` - `inner_seconds`: what the bare loop does, plus augmentation and batching).

Samples per second are computed per epoch, over the epochs after the first (the first one pays for oneDNN's kernel
selection), for each of `--repeats` alternating runs: the median epoch and the best epoch (the least disturbed by
other jobs: on a shared machine the best epoch is the fairer comparison); ratios of both are printed. Timings on a
machine busy with other jobs are noisy (2 threads on 2 busy cores can be 10x slower): the load average is printed
before and after.

    nice .venv/bin/python bench/networks_throughput.py [--rows 96] [--epochs 6] [--threads 2] [--repeats 3]
        [--device cpu|cuda] [--size 32] [--architecture resnet10] [--widen 0.25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from radstudy.config import settings
from radstudy.networks.losses import binary_loss
from radstudy.networks.nets import build_network
from radstudy.networks.train import train_network


def _data(rows: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(rows) % 2).astype(float)
    images = rng.normal(size=(rows, 1, size, size, size)).astype(np.float32)
    images[:, :, size // 4: -size // 4, size // 4: -size // 4, size // 4: -size // 4] += y[:, None, None, None, None]
    return images, y


def bare_loop(images: np.ndarray, y: np.ndarray, cfg: dict, epochs: int, device: str, seed: int = 0) -> list[float]:
    """Samples per second of each epoch of the minimal torch loop."""
    torch.manual_seed(seed)
    model = build_network(cfg, images.shape[1]).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(y).float().to(device)
    batch = cfg["batch_size"]
    rates = []
    for _ in range(epochs):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), device=device)
        seen = 0
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            loss = binary_loss(model(x_all[index]), y_all[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += len(index)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    return rates


def pipeline_loop(images: np.ndarray, y: np.ndarray, cfg: dict, device: str):
    """Samples per second of each epoch of train_network, with and without its inner evaluation, and the rows it
    fits on per epoch."""
    trained = train_network(images, None, {"y": y}, "binary", np.ones(len(y), bool), cfg, seed=0, device=device)
    n_fit = len(y) - len(trained.inner_rows)
    seconds, inner = trained.history["seconds"], trained.history["inner_seconds"]
    return (n_fit / seconds).tolist(), (n_fit / (seconds - inner)).tolist(), n_fit


def _summary(rates: list[float]) -> str:
    return f"median {statistics.median(rates):.1f}, best {max(rates):.1f} samples/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--architecture", default="resnet10", choices=["resnet10", "resnet18", "resnet34"])
    parser.add_argument("--widen", type=float, default=0.25)
    args = parser.parse_args()
    cfg = settings("networks", {
        "architecture": args.architecture, "widen_factor": args.widen, "stem_stride": 2, "batch_size": 8,
        "crop_size": [args.size] * 3, "epochs": args.epochs, "early_stopping_patience": None,
        "threads": args.threads, "augmentation": {"flip": True, "rotate_degrees": 10, "scale": 0.1,
                                                  "intensity_shift": 0.1}})
    images, y = _data(args.rows, args.size)
    print(f"load average before: {os.getloadavg()}; device {args.device}, {args.threads} threads, "
          f"{args.architecture} widen {args.widen}, {args.size}^3 crops, batch 8, {args.rows} rows, "
          f"{args.epochs} epochs")
    torch.set_num_threads(args.threads)
    runs = []
    for repeat in range(args.repeats):
        bare = bare_loop(images, y, cfg, args.epochs, args.device)[1:]
        pipe, fitting, n_fit = pipeline_loop(images, y, cfg, args.device)
        runs.append((bare, pipe[1:], fitting[1:]))
        print(f"repeat {repeat + 1}: bare {_summary(bare)}; train_network {_summary(pipe[1:])}, without its inner "
              f"evaluation {_summary(fitting[1:])} ({n_fit} rows fitted per epoch, {args.rows - n_fit} inner rows)")
    bare, pipe, fitting = ([rate for run in runs for rate in run[i]] for i in range(3))
    print(f"all repeats: bare {_summary(bare)}; train_network {_summary(pipe)}; without its inner evaluation "
          f"{_summary(fitting)}")
    for name, rates in (("train_network / bare", pipe), ("train_network without inner evaluation / bare", fitting)):
        print(f"ratio {name}: medians {statistics.median(rates) / statistics.median(bare):.3f}, "
              f"best epochs {max(rates) / max(bare):.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
