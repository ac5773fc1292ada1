"""Training of one end-to-end network on one split's training partition, prediction, saving and loading.

`train_network` reads only the rows of the `train` mask (images, clinical values and outcomes): rows outside it
(validation, test, external patients) never reach the weights, the clinical imputation and scaling, the class
weight, the early stopping or the choice of the epoch. Inside the training partition:

* an inner split (cfg `inner_validation_fraction`, stratified by y or by event, seeded) holds rows out for early
  stopping: after every epoch the inner loss (the same loss, on the whole inner set, eval mode) is computed and
  the weights of the epoch with the lowest inner loss are kept; training stops after `early_stopping_patience`
  epochs without improvement (null: all epochs). The inner AUC (binary) or Harrell's C (survival) is reported.
* batches: each epoch the fitting rows are shuffled within each stratum (events / non-events, positives /
  negatives) and dealt round-robin into n // batch_size batches: the remainder rows join the batches instead of
  forming a small last one (what drop_last avoids, without dropping rows), so every batch holds batch_size to
  2 x batch_size - 1 rows (all rows when there are fewer than batch_size; BatchNorm always sees >= 2), and the
  strata are spread evenly: for survival each batch holds >= 1 event (with fewer events than batches, fewer and
  larger batches are made). A batch of one row (a training partition of one row) is skipped.
* augmentation of the training batches only, vectorised over the batch (one 2D `grid_sample` of every axial plane
  and a linear resampling along z, see `_augment`): random left-right flip, rotation in the axial (x-y) plane
  within +- rotate_degrees, isotropic scaling within 1 +- scale (zero padding: 0 is the neutral normalised
  intensity), and a random shift of each image channel's intensities within +- intensity_shift (not of the mask
  channel).
* losses: `binary_loss` with pos_weight n_neg / n_pos of the training partition (class_weight balanced), or
  `cox_efron_loss`; AdamW with the configured learning rate and weight decay.
* clinical predictors: missing values imputed with the training partition's means, then centred and divided by
  its standard deviations (observed values; a constant column is divided by 1). A column without any training
  value raises.

Determinism: the network's initialisation, dropout, the inner split, the batches and the augmentation all derive
from `seed` (torch's global RNG and a torch Generator seeded with it, scikit-learn's random_state for the inner
split; the caller's global torch RNG is restored afterwards); torch's deterministic algorithms are on
(`torch_tools.deterministic`), with warn_only so that on CUDA the operations torch has no deterministic kernel
for (e.g. the backward of 3D adaptive average and max pooling) warn instead of failing: on CPU two runs give
identical weights with the same number of threads, on GPU they may differ in the last bits. Threads: cfg
`threads` (torch.set_num_threads for the call, then restored). Device: "cpu" or "cuda" (the caller resolves cfg
`device`: auto).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import monai
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from radstudy import __version__
from radstudy.concordance import auc, harrell_c
from radstudy.config import settings
from radstudy.errors import ConfigError
from radstudy.networks.losses import binary_loss, cox_efron_loss
from radstudy.networks.nets import FusionNet, build_network, load_pretrained
from radstudy.torch_tools import deterministic, torch_threads

PREDICT_BATCH = 32  # rows per forward pass in eval mode (memory, not results: eval mode is row-independent)
FORMAT = "radstudy.networks/1"
MULTITASK = "multitask"  # the endpoint of a multitask network (it predicts both)
HISTORY_COLUMNS = ["epoch", "train_loss", "inner_loss", "inner_metric", "seconds", "inner_seconds"]


@dataclass
class ClinicalNormaliser:
    """Imputation with the training means, then (x - mean) / sd with the training standard deviations."""

    means: np.ndarray
    scales: np.ndarray

    @classmethod
    def fit(cls, clinical: np.ndarray) -> ClinicalNormaliser:
        clinical = np.asarray(clinical, dtype=float)
        empty = np.flatnonzero(np.isnan(clinical).all(axis=0))
        if len(empty):
            raise ValueError(f"clinical column(s) {empty.tolist()} have no value in the training partition")
        means, sds = np.nanmean(clinical, axis=0), np.nanstd(clinical, axis=0)
        return cls(means, np.where(sds > 0, sds, 1.0))

    def transform(self, clinical: np.ndarray) -> np.ndarray:
        clinical = np.asarray(clinical, dtype=float)
        if clinical.ndim != 2 or clinical.shape[1] != len(self.means):
            raise ValueError(f"clinical data must have {len(self.means)} columns, got shape {clinical.shape}")
        filled = np.where(np.isnan(clinical), self.means, clinical)
        return ((filled - self.means) / self.scales).astype(np.float32)


@dataclass
class TrainedNetwork:
    """A trained network with what is needed to score new rows (see `predict`, `save_network`)."""

    model: FusionNet
    history: pd.DataFrame  # one row per epoch: HISTORY_COLUMNS (seconds of the epoch, of which inner_seconds
    # for the inner evaluation)
    best_epoch: int  # the epoch whose weights `model` holds
    normaliser: ClinicalNormaliser | None  # None: an image-only network
    cfg: dict  # the networks settings it was trained with
    channels: list[str]  # input channels, in order
    endpoint: str
    versions: dict
    inner_rows: np.ndarray  # rows (of the training call's inputs) held out for early stopping
    pretrained: dict | None = None  # load_pretrained's report, when cfg checkpoint was given


def library_versions() -> dict[str, str]:
    return {"radstudy": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "monai": str(monai.__version__), "numpy": str(np.__version__)}


# ============================================================================ inputs
def _endpoint_kind(target: dict) -> str:
    if "y" in target:
        return "binary"
    if "time" in target and "event" in target:
        return "survival"
    raise ValueError(f"target must hold 'y' (binary) or 'time' and 'event' (survival), got {sorted(target)}")


def _training_rows(inputs: np.ndarray, train: np.ndarray, cfg: dict) -> np.ndarray:
    train = np.asarray(train)
    if train.dtype != bool or train.shape != (len(inputs),):
        raise ValueError(f"train must be a boolean mask of length {len(inputs)} (one per input row), "
                         f"got {train.dtype} {train.shape}")
    if inputs.ndim != int(cfg["dims"]) + 2:
        raise ValueError(f"inputs must be (rows, channels, {'z, ' if cfg['dims'] == 3 else ''}y, x) for dims "
                         f"{cfg['dims']}, got shape {inputs.shape}")
    return np.flatnonzero(train)


def _rows_of(name: str, values, n: int) -> np.ndarray:
    """`values` as a float array with one row per input row (a clear error otherwise)."""
    values = np.asarray(values, dtype=float)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} rows, the inputs have {n}")
    return values


def _outcome(target: dict, kind: str, rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The training rows' outcome, checked: y or event in {0, 1}, time finite and >= 0."""
    keys = ("y",) if kind == "binary" else ("time", "event")
    out = {}
    for key in keys:
        values = _rows_of(f"target {key!r}", target[key], n)[rows]
        bad = ~np.isfinite(values) | (values < 0 if key == "time" else ~np.isin(values, (0.0, 1.0)))
        if bad.any():
            raise ValueError(f"target {key!r} of training row(s) {rows[bad][:10].tolist()} is "
                             f"{values[bad][:10].tolist()} ({'finite >= 0' if key == 'time' else '0 or 1'} expected)")
        out[key] = values
    return out


def _cached(inputs: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """The rows' inputs as one contiguous float32 tensor on `device` (read once, indexed every batch)."""
    array = np.ascontiguousarray(inputs[rows], dtype=np.float32)
    bad = ~np.isfinite(array.reshape(len(rows), -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"input row(s) {rows[bad][:10].tolist()} hold NaN or infinite values")
    return torch.from_numpy(array).to(device)


def _inner_split(rows: np.ndarray, strata: np.ndarray, fraction: float, seed: int, kind: str):
    """(fitting rows, inner-validation rows) of the training partition, stratified by `strata`, seeded."""
    label = "outcome class" if kind == "binary" else "event status"
    counts = {int(k): int(v) for k, v in zip(*np.unique(strata, return_counts=True))}
    if len(counts) < 2 or min(counts.values()) < 2:
        raise ValueError(f"the training partition needs >= 2 rows of each {label} for the inner split, has {counts}")
    try:
        fit, inner = train_test_split(rows, test_size=fraction, stratify=strata, random_state=seed)
    except ValueError as exc:
        raise ValueError(f"cannot hold out {fraction:.0%} of the {len(rows)} training rows stratified by "
                         f"{label} ({counts}): {exc}") from exc
    return np.sort(fit), np.sort(inner)


# ============================================================================ batches and augmentation
def _batches(strata: np.ndarray, batch_size: int, generator: torch.Generator, survival: bool) -> list[np.ndarray]:
    """Positions 0..n-1 dealt into batches (see the module docstring); strata: bool (event / positive)."""
    n = len(strata)
    n_batches = max(1, n // batch_size)
    if survival:
        n_batches = max(1, min(n_batches, int(strata.sum())))
    groups = [np.flatnonzero(strata), np.flatnonzero(~strata)]
    order = np.concatenate([g[torch.randperm(len(g), generator=generator).numpy()] for g in groups])
    return [order[k::n_batches] for k in range(n_batches)]


def _batch_maker(fit_pos: torch.Tensor, strata: np.ndarray, batch_size: int, generator: torch.Generator,
                 survival: bool):
    """A function giving each epoch's batches (`_batches`) as tensors of positions into the cached rows."""
    def make_batches() -> list[torch.Tensor]:
        return [fit_pos[torch.as_tensor(batch, device=fit_pos.device)] for batch in
                _batches(strata, batch_size, generator, survival)]
    return make_batches


def _zoom_depth(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Linear resampling of each row of (N, C, D, H, W) along D by its zoom (grid_sample's convention, zeros
    outside, align_corners=False), as one batched product with a (D x D) interpolation matrix per row."""
    n, depth = x.shape[0], x.shape[2]
    slices = torch.arange(depth, device=x.device, dtype=x.dtype)
    centre = (slices * 2 + 1) / depth - 1
    source = ((zoom[:, None] * centre + 1) * depth - 1) / 2  # continuous source index of each output slice
    low = source.floor()[..., None]
    frac = source[..., None] - low
    weights = (slices == low) * (1 - frac) + (slices == low + 1) * frac  # (N, D out, D in); outside: no column
    return torch.matmul(weights[:, None], x.reshape(n, x.shape[1], depth, -1)).view_as(x)


def _augment(x: torch.Tensor, generator: torch.Generator, aug: dict, image_channels: int) -> torch.Tensor:
    """Random flip / in-plane rotation / scaling and intensity shift of a batch (a copy: modified in place).

    The transform (rotation about the z axis, isotropic zoom) is separable: one bilinear grid_sample of all axial
    planes at once (the same 2D grid for every slice and channel of a row), then linear resampling along z for the
    zoom. This equals a trilinear 3D grid_sample with the same affine but costs ~10x less on CPU."""
    n, dims = x.shape[0], x.dim() - 2
    u = torch.rand(n, 3, generator=generator).to(x.device)
    shift = (torch.rand(n, image_channels, generator=generator).to(x.device) * 2 - 1) * aug["intensity_shift"]
    flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0) if aug["flip"] else torch.ones(n, device=x.device)
    if aug["rotate_degrees"] > 0 or aug["scale"] > 0:
        angle = (u[:, 1] * 2 - 1) * math.radians(aug["rotate_degrees"])
        zoom = 1 + (u[:, 2] * 2 - 1) * aug["scale"]
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin  # grid coordinates are (x, y)
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
        planes = x.reshape(n, -1, *x.shape[-2:])  # (N, C x D, H, W)
        grid = F.affine_grid(theta, list(planes.shape), align_corners=False)
        x = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False).view_as(x)
        if dims == 3:
            x = _zoom_depth(x, zoom)
    elif aug["flip"]:
        x = torch.where((flip < 0).view(-1, *[1] * (dims + 1)), x.flip(-1), x)
    if aug["intensity_shift"] > 0:
        x[:, :image_channels] += shift.view(n, image_channels, *[1] * dims)
    return x


# ============================================================================ training
def _scores(model: FusionNet, images: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
    """Eval-mode scores of cached rows, PREDICT_BATCH rows at a time."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i:i + PREDICT_BATCH],
                                None if clinical is None else clinical[i:i + PREDICT_BATCH])
                          for i in range(0, len(images), PREDICT_BATCH)])


def _run_epochs(model: torch.nn.Module, cfg: dict, *, make_batches, batch_loss, inner_eval, log: logging.Logger,
                metric_name: str, first_eligible: int = 1, label: str = "network") -> tuple[list[dict], int, dict]:
    """The epochs of one training: AdamW steps over `make_batches()` (position tensors; batches of one row are
    skipped) with `batch_loss(positions, epoch)`, then `inner_eval(epoch)` -> (inner loss, {metric: value}) in eval
    mode; the weights of the epoch >= first_eligible with the lowest inner loss are kept; early stopping after
    cfg early_stopping_patience epochs without improvement (counted from first_eligible). Returns (history rows,
    best epoch, best state dict)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    history, best_loss, best_state, best_epoch = [], math.inf, None, 0
    for epoch in range(1, cfg["epochs"] + 1):
        started = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for index in make_batches():
            if len(index) < 2:
                continue
            loss = batch_loss(index, epoch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(index), seen + len(index)
        evaluated = time.perf_counter()
        model.eval()
        inner_loss, metrics = inner_eval(epoch)
        now = time.perf_counter()
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "inner_loss": float(inner_loss),
               "inner_metric": metrics[metric_name], "seconds": now - started, "inner_seconds": now - evaluated,
               **{f"inner_{k}": v for k, v in metrics.items() if k != metric_name}}
        history.append(row)
        log.info("epoch %d/%d: train loss %.4f, inner loss %.4f, inner %s, %.1f s", epoch, cfg["epochs"],
                 row["train_loss"], row["inner_loss"],
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), row["seconds"])
        if epoch < first_eligible:
            continue
        if inner_loss < best_loss:  # NaN never improves
            best_loss, best_epoch = inner_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif cfg["early_stopping_patience"] and epoch - best_epoch >= cfg["early_stopping_patience"]:
            break
    if best_state is None:
        raise ValueError(f"training of the {label} diverged: the inner loss was NaN in every epoch that could be kept")
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch, best_state


def _history(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    return table[HISTORY_COLUMNS + [c for c in table.columns if c not in HISTORY_COLUMNS]]


def train_network(inputs: np.ndarray, clinical: np.ndarray | None, target: dict, endpoint: str, train: np.ndarray,
                  cfg: dict, *, seed: int, device: str = "cpu", log: logging.Logger | None = None,
                  channels: Sequence[str] | None = None) -> TrainedNetwork:
    """Train a network of `cfg` (the networks settings) on the rows of `train` (see the module docstring).

    inputs: (N, C, z, y, x) or (N, C, y, x); clinical: (N, P) or None (image only); target: {"y"} or {"time",
    "event"} arrays of length N (rows outside `train` are not read: they may be NaN); channels: the input
    channels' names (stored with the model; default input0, input1, ...)."""
    log = log if log is not None else logging.getLogger(__name__)
    cfg = settings("networks", cfg)
    kind = _endpoint_kind(target)
    rows = _training_rows(inputs, train, cfg)
    outcome = _outcome(target, kind, rows, len(inputs))
    strata = (outcome["y"] if kind == "binary" else outcome["event"]).astype(bool)
    fit_rows, inner_rows = _inner_split(rows, strata, cfg["inner_validation_fraction"], seed, kind)
    fit_pos, inner_pos = _positions(rows, fit_rows, inner_rows)
    channels = _channel_names(channels, inputs.shape[1])
    clinical_train = None if clinical is None else _rows_of("clinical", clinical, len(inputs))[rows]
    normaliser = None if clinical_train is None else ClinicalNormaliser.fit(clinical_train)
    pos_weight = None
    if kind == "binary" and cfg["class_weight"] == "balanced":
        pos_weight = float((~strata).sum() / strata.sum())
    torch_device = torch.device(device)
    images = _cached(inputs, rows, torch_device)
    clin = None if normaliser is None else torch.from_numpy(normaliser.transform(clinical_train)).to(torch_device)
    outcome_t = {k: torch.as_tensor(v, dtype=torch.float32, device=torch_device) for k, v in outcome.items()}

    def loss_of(score: torch.Tensor, pos: np.ndarray | torch.Tensor) -> torch.Tensor:
        if kind == "binary":
            return binary_loss(score, outcome_t["y"][pos], pos_weight)
        return cox_efron_loss(score, outcome_t["time"][pos], outcome_t["event"][pos])

    def metric_of(score: np.ndarray) -> float:
        if kind == "binary":
            return auc(outcome["y"][inner_pos], score)
        return harrell_c(outcome["time"][inner_pos], outcome["event"][inner_pos], score)

    metric_name = "auc" if kind == "binary" else "c"
    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    # warn_only: see the module docstring (CUDA kernels)
    with torch_threads(cfg["threads"]), torch.random.fork_rng(devices=devices), deterministic(seed, warn_only=True):
        generator = torch.Generator().manual_seed(int(seed))
        model = build_network(cfg, len(channels), 0 if normaliser is None else len(normaliser.means))
        pretrained = load_pretrained(model, cfg["checkpoint"], dims=cfg["dims"]) if cfg["checkpoint"] else None
        model.to(torch_device)
        image_channels = len(channels) - int(bool(cfg["mask_channel"]))
        fit_pos_t, inner_pos_t = (torch.as_tensor(p, device=torch_device) for p in (fit_pos, inner_pos))

        make_batches = _batch_maker(fit_pos_t, strata[fit_pos], cfg["batch_size"], generator, kind == "survival")

        def batch_loss(index, epoch):
            x = _augment(images[index], generator, cfg["augmentation"], image_channels)
            return loss_of(model(x, None if clin is None else clin[index]), index)

        def inner_eval(epoch):
            score = _scores(model, images[inner_pos_t], None if clin is None else clin[inner_pos_t])
            return float(loss_of(score, inner_pos_t)), {metric_name: metric_of(score.float().cpu().numpy())}

        history, best_epoch, _ = _run_epochs(model, cfg, make_batches=make_batches, batch_loss=batch_loss,
                                             inner_eval=inner_eval, log=log, metric_name=metric_name,
                                             label=f"{endpoint} network")
    return TrainedNetwork(model, _history(history), best_epoch, normaliser, cfg, channels, endpoint,
                          library_versions(), inner_rows, pretrained)


# ============================================================================ the multitask network (seed 004)
def _finite_rows(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, bool) if values is None else np.isfinite(np.asarray(values, dtype=float))


def train_multitask(inputs: np.ndarray, clinical: np.ndarray | None, target: dict, seg: np.ndarray,
                    has_seg: np.ndarray, train: np.ndarray, cfg: dict, *, seed: int, device: str = "cpu",
                    log: logging.Logger | None = None, channels: Sequence[str] | None = None,
                    nnunet_model: str | Path | None = None) -> TrainedNetwork:
    """Train the multitask network (`radstudy.networks.multitask`) on the rows of `train`.

    target: any of "y" (binary endpoint) and "time" + "event" (survival), arrays of length N, NaN where a row has
    no such outcome; seg (N, *spatial): the region of the manual mask in the crop, has_seg (N,): the rows that have
    one. Every training row needs at least one outcome. The loss of a batch is

        w_seg x (Dice + cross-entropy, rows with a mask) + w_cls x BCE (rows with y) + w_surv x Cox Efron (rows
        with a survival outcome)

    with the weights of cfg multitask.loss_weights, the classification and survival terms off during the first
    multitask.warmup_epochs epochs (segmentation warm-up) and the kept epoch chosen after them. Everything else
    as `train_network`: only `train` rows are read; an inner split of them (stratified by event, else by y) for the
    early stopping and the kept epoch (lowest inner loss, the same weighted loss), the stratified batches, the
    augmentation (the target mask is moved with its image), clinical normalisation with training statistics,
    determinism. The inner history reports the AUC, Harrell's C and the Dice of the inner rows.

    nnunet_model: the study's trained nnU-Net model folder, read when multitask.encoder is nnunet."""
    from radstudy.networks.multitask import build_from_nnunet, build_multitask, segmentation_loss

    log = log if log is not None else logging.getLogger(__name__)
    cfg = settings("networks", cfg)
    mt = cfg["multitask"]
    if mt["warmup_epochs"] >= cfg["epochs"] and (mt["loss_weights"]["classification"] or
                                                 mt["loss_weights"]["survival"]):
        raise ConfigError(f"networks.multitask.warmup_epochs ({mt['warmup_epochs']}) must be below networks.epochs "
                          f"({cfg['epochs']}): the classification and survival heads train only after the warm-up")
    rows = _training_rows(inputs, train, cfg)
    n = len(inputs)
    has = {"y": _finite_rows(target.get("y"), n),
           "survival": _finite_rows(target.get("time"), n) & _finite_rows(target.get("event"), n)}
    without = rows[~(has["y"] | has["survival"])[rows]]
    if len(without):
        raise ValueError(f"training row(s) {without[:10].tolist()} have no outcome of any endpoint")
    seg = np.asarray(seg)
    has_seg = np.asarray(has_seg, dtype=bool)
    if seg.shape != (n, *inputs.shape[2:]) or has_seg.shape != (n,):
        raise ValueError(f"seg must be (rows, {', '.join(map(str, inputs.shape[2:]))}) and has_seg (rows,) for "
                         f"inputs {inputs.shape}, got {seg.shape} and {has_seg.shape}")
    outcome = {}
    for kind, keys in (("binary", ("y",)), ("survival", ("time", "event"))):
        present = rows[has["y" if kind == "binary" else "survival"][rows]]
        if len(present):
            outcome.update(_outcome({k: target[k] for k in keys}, kind, present, n))
    event = np.where(has["survival"], np.nan_to_num(np.asarray(target.get("event", np.zeros(n)), float)), np.nan)
    ys = np.where(has["y"], np.nan_to_num(np.asarray(target.get("y", np.zeros(n)), float)), np.nan)
    strata_all = np.where(np.isfinite(event), event, np.where(np.isfinite(ys), ys, 0)).astype(bool)
    kind = "survival" if has["survival"][rows].any() else "binary"
    strata = strata_all[rows]
    fit_rows, inner_rows = _inner_split(rows, strata, cfg["inner_validation_fraction"], seed, kind)
    fit_pos, inner_pos = _positions(rows, fit_rows, inner_rows)
    channels = _channel_names(channels, inputs.shape[1])
    clinical_train = None if clinical is None else _rows_of("clinical", clinical, n)[rows]
    normaliser = None if clinical_train is None else ClinicalNormaliser.fit(clinical_train)
    y_train = ys[rows]
    pos_weight = None
    if cfg["class_weight"] == "balanced" and np.isfinite(y_train).any():
        positives = np.nansum(y_train)
        pos_weight = float((np.isfinite(y_train).sum() - positives) / positives) if positives else None
    torch_device = torch.device(device)
    # the target travels as the last channel through the augmentation
    stacked = np.concatenate([np.asarray(inputs, np.float32)[rows], seg[rows, None].astype(np.float32)], axis=1)
    images = _cached(stacked, np.arange(len(rows)), torch_device)
    clin = None if normaliser is None else torch.from_numpy(normaliser.transform(clinical_train)).to(torch_device)
    t = {name: torch.as_tensor(values, dtype=torch.float32, device=torch_device) for name, values in
         (("y", np.nan_to_num(ys[rows])), ("time", np.nan_to_num(np.asarray(target.get("time", np.zeros(n)),
                                                                               float)[rows])),
          ("event", np.nan_to_num(event[rows])))}
    masks = {name: torch.as_tensor(values[rows], device=torch_device) for name, values in
             (("y", has["y"]), ("survival", has["survival"]), ("seg", has_seg))}
    weights = mt["loss_weights"]
    warmup = int(mt["warmup_epochs"])

    def loss_of(out, pos, epoch: int | None = None, target_seg=None) -> torch.Tensor:
        seg_logits, cls_logit, risk = out
        seg_target = images[pos, -1] if target_seg is None else target_seg
        loss = weights["segmentation"] * segmentation_loss(seg_logits, seg_target, masks["seg"][pos])
        heads = 0.0 if epoch is not None and epoch <= warmup else 1.0
        with_y, with_s = masks["y"][pos], masks["survival"][pos]
        if heads and weights["classification"] and bool(with_y.any()):
            loss = loss + weights["classification"] * binary_loss(cls_logit[with_y], t["y"][pos][with_y], pos_weight)
        if heads and weights["survival"] and bool(with_s.any()):
            loss = loss + weights["survival"] * cox_efron_loss(risk[with_s], t["time"][pos][with_s],
                                                               t["event"][pos][with_s])
        return loss

    image_channels = len(channels)
    metric_name = "c" if kind == "survival" else "auc"
    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch_threads(cfg["threads"]), torch.random.fork_rng(devices=devices), deterministic(seed, warn_only=True):
        generator = torch.Generator().manual_seed(int(seed))
        n_clinical = 0 if normaliser is None else len(normaliser.means)
        pretrained = None
        if mt["encoder"] == "nnunet":
            if nnunet_model is None:
                raise ValueError("networks.multitask.encoder is 'nnunet' but no nnU-Net model folder was given")
            model, pretrained = build_from_nnunet(cfg, nnunet_model, len(channels), n_clinical, channels=channels)
        else:
            model = build_multitask(cfg, len(channels), n_clinical)
        model.to(torch_device)
        fit_pos_t, inner_pos_t = (torch.as_tensor(p, device=torch_device) for p in (fit_pos, inner_pos))

        make_batches = _batch_maker(fit_pos_t, strata[fit_pos], cfg["batch_size"], generator, kind == "survival")

        def batch_loss(index, epoch):
            x = _augment(images[index], generator, cfg["augmentation"], image_channels)
            out = model(x[:, :-1], None if clin is None else clin[index])
            return loss_of(out, index, epoch, target_seg=(x[:, -1] > 0.5).float())

        def inner_eval(epoch):
            out = _outputs(model, images[inner_pos_t, :-1], None if clin is None else clin[inner_pos_t])
            loss = float(loss_of(out, inner_pos_t, epoch if epoch <= warmup else None))
            cls_logit, risk = out[1].float().cpu().numpy(), out[2].float().cpu().numpy()
            inner_y, inner_s = has["y"][rows][inner_pos], has["survival"][rows][inner_pos]
            metrics = {"auc": auc(ys[rows][inner_pos][inner_y], cls_logit[inner_y]) if inner_y.any() else np.nan,
                       "c": harrell_c(t["time"].cpu().numpy()[inner_pos][inner_s],
                                      event[rows][inner_pos][inner_s], risk[inner_s]) if inner_s.any() else np.nan}
            with_seg = has_seg[rows][inner_pos]
            predicted = out[0].argmax(1).cpu().numpy()[with_seg] > 0
            truth = seg[rows][inner_pos][with_seg] > 0
            metrics["dice"] = float(np.mean([dice(p, q) for p, q in zip(predicted, truth)])) if len(truth) else np.nan
            return loss, metrics

        history, best_epoch, _ = _run_epochs(model, cfg, make_batches=make_batches, batch_loss=batch_loss,
                                             inner_eval=inner_eval, log=log, metric_name=metric_name,
                                             first_eligible=warmup + 1, label="multitask network")
    return TrainedNetwork(model, _history(history), best_epoch, normaliser, cfg, channels, MULTITASK,
                          library_versions(), inner_rows, pretrained)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def _outputs(model, images: torch.Tensor, clinical: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Eval-mode outputs of a multitask network (segmentation logits, logit, risk), PREDICT_BATCH rows at a time."""
    model.eval()
    with torch.inference_mode():
        parts = [model(images[i:i + PREDICT_BATCH], None if clinical is None else clinical[i:i + PREDICT_BATCH])
                 for i in range(0, len(images), PREDICT_BATCH)]
    return tuple(torch.cat(p) for p in zip(*parts))


def predict_multitask(trained: TrainedNetwork, inputs: np.ndarray, clinical: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """Per row: "logit" (binary endpoint), "risk" (log relative risk) and "probability_map" (N, *spatial: the
    region's softmax probability in the crop; the predicted mask is > 0.5)."""
    _check_inputs(trained, inputs, clinical)
    clin = None if clinical is None else trained.normaliser.transform(clinical)
    device = next(trained.model.parameters()).device
    out = {"logit": [], "risk": [], "probability_map": []}
    with torch_threads(trained.cfg["threads"]):
        for start in range(0, len(inputs), PREDICT_BATCH):
            rows = np.arange(start, min(start + PREDICT_BATCH, len(inputs)))
            c = None if clin is None else torch.from_numpy(clin[rows]).to(device)
            seg_logits, logit, risk = _outputs(trained.model, _cached(inputs, rows, device), c)
            out["logit"].append(logit.float().cpu().numpy())
            out["risk"].append(risk.float().cpu().numpy())
            out["probability_map"].append(torch.softmax(seg_logits.float(), 1)[:, 1].cpu().numpy())
    if not out["logit"]:
        return {"logit": np.zeros(0, np.float32), "risk": np.zeros(0, np.float32),
                "probability_map": np.zeros((0, *inputs.shape[2:]), np.float32)}
    return {k: np.concatenate(v) for k, v in out.items()}


def _positions(rows: np.ndarray, *parts: np.ndarray) -> list[np.ndarray]:
    """Positions (in `rows`) of the rows of each part."""
    position = {row: i for i, row in enumerate(rows)}
    return [np.array([position[r] for r in part], dtype=int) for part in parts]


def _channel_names(channels: Sequence[str] | None, n_channels: int) -> list[str]:
    channels = list(channels) if channels is not None else [f"input{i}" for i in range(n_channels)]
    if len(channels) != n_channels:
        raise ValueError(f"{len(channels)} channel names for inputs with {n_channels} channels")
    return channels


# ============================================================================ prediction, saving, loading
def predict(trained: TrainedNetwork, inputs: np.ndarray, clinical: np.ndarray | None = None) -> np.ndarray:
    """Raw score per row (logit or log relative risk), eval mode, PREDICT_BATCH rows at a time."""
    model = trained.model
    _check_inputs(trained, inputs, clinical)
    clin = None if clinical is None else trained.normaliser.transform(clinical)
    device = next(model.parameters()).device
    out = []
    with torch_threads(trained.cfg["threads"]):
        for start in range(0, len(inputs), PREDICT_BATCH):
            rows = np.arange(start, min(start + PREDICT_BATCH, len(inputs)))
            images = _cached(inputs, rows, device)
            c = None if clin is None else torch.from_numpy(clin[rows]).to(device)
            out.append(_scores(model, images, c).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _check_inputs(trained: TrainedNetwork, inputs: np.ndarray, clinical: np.ndarray | None) -> None:
    expected = len(trained.channels)
    if inputs.ndim != int(trained.cfg["dims"]) + 2 or inputs.shape[1] != expected:
        raise ValueError(f"inputs must be (rows, {expected} channels: {', '.join(trained.channels)}, ...) for "
                         f"dims {trained.cfg['dims']}, got shape {inputs.shape}")
    if (trained.normaliser is None) != (clinical is None):
        raise ValueError("clinical data must be given exactly when the network was trained with it "
                         f"({'with' if trained.normaliser is not None else 'without'} clinical data)")


def save_network(trained: TrainedNetwork, path: str | Path) -> None:
    """Weights, settings, channels, clinical normalisation, history and versions in one torch file."""
    normaliser = trained.normaliser
    payload = {
        "format": FORMAT, "state_dict": trained.model.state_dict(), "cfg": trained.cfg,
        "in_channels": len(trained.channels), "n_clinical": 0 if normaliser is None else len(normaliser.means),
        "channels": list(trained.channels), "endpoint": trained.endpoint,
        "normaliser": None if normaliser is None else {"means": normaliser.means.tolist(),
                                                       "scales": normaliser.scales.tolist()},
        "history": {c: trained.history[c].tolist() for c in trained.history}, "best_epoch": int(trained.best_epoch),
        "versions": dict(trained.versions), "inner_rows": np.asarray(trained.inner_rows).tolist(),
        "pretrained": trained.pretrained,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_network(path: str | Path) -> TrainedNetwork:
    """A network saved by `save_network`, on the CPU, in eval mode. A multitask network started from an nnU-Net
    is rebuilt from that model folder's plans (recorded in the file), which must still be there."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a clear error
        raise ValueError(f"network file {path} cannot be read ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"network file {path} is not a radstudy network ({FORMAT} expected)")
    if payload["endpoint"] == MULTITASK:
        from radstudy.networks.multitask import build_from_nnunet, build_multitask

        cfg = settings("networks", payload["cfg"])
        if cfg["multitask"]["encoder"] == "nnunet":  # the architecture of the nnU-Net plans it started from
            model, _ = build_from_nnunet(cfg, payload["pretrained"]["model_folder"], payload["in_channels"],
                                         payload["n_clinical"])
        else:
            model = build_multitask(cfg, payload["in_channels"], payload["n_clinical"])
    else:
        model = build_network(payload["cfg"], payload["in_channels"], payload["n_clinical"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"network file {path}: the weights do not fit its settings ({exc})") from exc
    model.eval()
    stored = payload["normaliser"]
    normaliser = None if stored is None else ClinicalNormaliser(np.asarray(stored["means"]),
                                                                np.asarray(stored["scales"]))
    return TrainedNetwork(model, pd.DataFrame(payload["history"]), payload["best_epoch"],
                          normaliser, payload["cfg"], payload["channels"], payload["endpoint"], payload["versions"],
                          np.asarray(payload["inner_rows"], dtype=int), payload["pretrained"])
