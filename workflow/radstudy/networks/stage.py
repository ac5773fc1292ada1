"""The end-to-end networks stage at file level (seeds 000 and 003): each center's network inputs (crops around the
region in every channel), then per split of the study design, per endpoint and per model (`cnn`: images only;
`cnn_clinical`: images + the clinical predictors), a network trained on the split's training partition only and
scored on every patient of the split.

The cohorts are the statistics stage's (`radstudy.statistics.models.study_cohorts`: same patients, seed and
stratification), so the predictions join results/models/predictions.tsv and the combined model may take the
network's output as a deep signature without a patient changing sides. Early stopping and the choice of epoch use
an inner split of the training partition (`radstudy.networks.train`); validation and test patients are only scored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from radstudy.config import Study
from radstudy.networks.settings import MULTITASK, network_settings
from radstudy.segment.stage import DSC_COLUMNS
from radstudy.statistics.design import COHORTS, primary_split, split_names
from radstudy.statistics.models import (
    ClinicalEncoder,
    assemble,
    derive_seed,
    fixed_score_model,
    outcome,
    statistics_settings,
    study_cohorts,
)
from radstudy.tables import read_table
from radstudy.torch_tools import resolve_device

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["patient", "center", "split", "cohort", "endpoint", "model", "score", "probability", "outcome",
                      "time", "event"]


def _clinical_design(data: pd.DataFrame, train: np.ndarray, stats: dict) -> np.ndarray:
    """The clinical predictors as numbers, encoded as the clinical model encodes them (levels, log transforms and
    missing-value fills learnt on the training rows only); the network scales them with training statistics."""
    m = stats["models"]["clinical"]
    encoder = ClinicalEncoder(variables=list(m["variables"]), categorical=list(m["categorical"]),
                              ordinal=dict(m["ordinal"]), log_transform=list(m["log_transform"]))
    encoder.fit(data.loc[train])
    return encoder.transform(data).to_numpy(dtype=np.float32)


def _target(endpoint: str, y) -> dict:
    if endpoint == "binary":
        return {"y": np.asarray(y, dtype=np.float32)}
    return {"time": np.asarray(y["time"], dtype=np.float32), "event": np.asarray(y["event"], dtype=np.float32)}


def run(study: Study, *, inputs: list[str | Path], features, clinical, patients, out_predictions: str | Path,
        out_history: str | Path, out_models: dict, out_saliency: str | Path, out_dsc: str | Path | None = None,
        out_masks: str | Path | None = None, segmentation_split: str | Path | None = None,
        nnunet_model: str | Path | None = None) -> pd.DataFrame:
    """Train and score every network of the study (`fitted_networks`) in every split of the design.

    inputs: every center's network inputs (`radstudy.networks.inputs.inputs_center`); features / clinical /
    patients: the tables the statistics stage reads (they fix the patients and their cohorts). out_models: {(endpoint, model): path} of
    the primary split's networks (holdout, or `final`). A patient of the split without a network input gets a row
    with an empty score, which the evaluation counts as an exclusion. Writes the predictions, the training
    history of every network (learning curves) and saliency maps of a few patients per cohort (out_saliency:
    PNG files and index.tsv).

    The multitask network (networks.fit multitask) is trained once per split for both endpoints (`train_multitask`:
    the training rows with any outcome; the segmentation target: the manual masks of the training rows that have
    one) and adds rows of model multitask for each endpoint. Its masks predicted in the crop of the primary split's
    patients go to out_masks (`{patient}.nii.gz` on the crop grid, in patient space; index.tsv); out_dsc: DSC / HD95
    in the crop of the held-out annotated patients (the primary split's cohorts other than training, with a manual
    mask) for the multitask network and, on the same crops, for the automatic segmentation (nnunet), with
    nnunet_trained from segmentation_split (the patients nnU-Net was trained on). nnunet_model: the study's nnU-Net
    model folder (multitask.encoder nnunet)."""
    from radstudy.networks import saliency
    from radstudy.networks import train as training

    cfg = network_settings(study)
    stats = statistics_settings(study.config)
    data = assemble(read_table(features), read_table(clinical), read_table(patients))
    cohorts = study_cohorts(data, stats)
    names, arrays, channels, extra = read_center_inputs([Path(p) for p in inputs], with_targets=True)
    row_of = {patient: i for i, patient in enumerate(names)}
    lacking = sorted(set(data["patient"]) - set(row_of))
    if lacking:
        log.warning("%d patient(s) without a network input get no network prediction: %s", len(lacking), lacking[:10])
    device = str(resolve_device(cfg["device"], setting="networks.device"))
    horizon = stats["models"]["survival"]["horizon"]
    primary = primary_split(cohorts)
    predictions, histories, saliency_rows = [], [], []
    dsc = pd.DataFrame(columns=DSC_COLUMNS)
    out_saliency = Path(out_saliency)
    out_saliency.mkdir(parents=True, exist_ok=True)
    for split in split_names(cohorts):
        part, part_cohort, index = split_rows(data, cohorts, split, row_of)
        images = arrays[index]
        for endpoint, spec in stats["endpoints"].items():
            has_y, y, outcome_cols = outcome(part, endpoint, spec)
            train = (part_cohort == "training") & has_y
            target = _target(endpoint, _full(y, has_y, endpoint))
            for model in [m for m in cfg["fit"] if m != MULTITASK]:
                started = time.perf_counter()
                clinical_x = _clinical_design(part, train, stats) if model == "cnn_clinical" else None
                trained = training.train_network(
                    images, clinical_x, target, endpoint, train, cfg,
                    seed=derive_seed(study.seed, "network", split, endpoint, model), device=device, log=log,
                    channels=channels)
                score = training.predict(trained, images, clinical_x)
                # probability: expit(logit); survival: the risk by the horizon from the training rows' Breslow
                reg = fixed_score_model(endpoint, model, score[train], y[train[has_y]])
                probability = reg.probability(pd.DataFrame({model: score}), horizon)
                predictions.append(pd.DataFrame({
                    "patient": part["patient"], "center": part["center"], "split": split, "cohort": part_cohort,
                    "endpoint": endpoint, "model": model, "score": score, "probability": probability,
                }).join(outcome_cols))
                histories.append(trained.history.assign(split=split, endpoint=endpoint, model=model,
                                                        best_epoch=trained.best_epoch))
                log.info("split %s, %s, %s: best epoch %d of %d, %.1f s", split, endpoint, model,
                         trained.best_epoch, len(trained.history), time.perf_counter() - started)
                if split == primary:
                    if (endpoint, model) in out_models:
                        training.save_network(trained, out_models[(endpoint, model)])
                    key = {"split": split, "endpoint": endpoint, "model": model}
                    saliency_rows += _saliency(saliency, trained, images, clinical_x, part, part_cohort, score,
                                               key, cfg, out_saliency)
        if MULTITASK in cfg["fit"]:
            rows = {k: v[index] for k, v in extra.items()}
            trained, result = _multitask(study, cfg, stats, part, part_cohort, images, channels, rows, split,
                                         predictions, histories, device, nnunet_model)
            if split == primary:
                if (MULTITASK, MULTITASK) in out_models:
                    training.save_network(trained, out_models[(MULTITASK, MULTITASK)])
                dsc = _multitask_dsc(part, part_cohort, rows, result, cfg["region"], segmentation_split)
                if out_masks is not None and cfg["multitask"]["save_masks"]:
                    _write_masks(part, part_cohort, rows, result, Path(out_masks))
    if out_dsc is not None:
        _write(dsc, out_dsc)
    if out_masks is not None:
        Path(out_masks).mkdir(parents=True, exist_ok=True)
    table = _with_missing(pd.concat(predictions, ignore_index=True) if predictions else
                          pd.DataFrame(columns=PREDICTION_COLUMNS), data, cohorts, lacking, stats, cfg)
    _write(table.reindex(columns=PREDICTION_COLUMNS), out_predictions)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    first = ["split", "endpoint", "model", "epoch"]
    _write(history[first + [c for c in history.columns if c not in first]] if len(history) else history, out_history)
    _write(pd.DataFrame(saliency_rows, columns=["file", "patient", "cohort", "split", "endpoint", "model", "score"]),
           out_saliency / "index.tsv")
    return table


TARGET_KEYS = ("manual", "has_manual", "automatic", "has_automatic", "spacing_mm", "origin", "direction", "crop_from")


def split_rows(data: pd.DataFrame, cohorts: pd.DataFrame, split: str,
               row_of: dict[str, int]) -> tuple[pd.DataFrame, np.ndarray, list[int]]:
    """The patients of one split that have a network input: their rows of `data`, their cohorts, and their rows in
    the concatenated network inputs (row_of: patient -> input row)."""
    cohort = data["patient"].map(cohorts[cohorts["split"] == split].set_index("patient")["cohort"])
    in_split = cohort.notna().to_numpy() & data["patient"].isin(row_of).to_numpy()
    part = data[in_split].reset_index(drop=True)
    return part, cohort[in_split].to_numpy(), [row_of[p] for p in part["patient"]]


def read_center_inputs(paths: Iterable[str | Path], with_targets: bool = False):
    """The patients, inputs (float32) and channels of several centers' .npz files, concatenated in the order given
    (and with_targets: a 4th item, {key: array} of TARGET_KEYS, the segmentation targets and crop grids).
    Channels and input shapes must agree and a patient may appear once: a ValueError names the files otherwise."""
    paths = [Path(p) for p in paths]
    patients: list[str] = []
    inputs = []
    targets: dict[str, list] = {k: [] for k in TARGET_KEYS}
    channels = shape = first = None
    seen: dict[str, Path] = {}
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            names = [str(c) for c in data["channels"]]
            x = data["inputs"].astype(np.float32)
            ids = [str(p) for p in data["patients"]]
            if with_targets and names:
                missing = [k for k in TARGET_KEYS if k not in data.files]
                if missing:
                    raise ValueError(f"network inputs {path} lack {missing}: written by an older radstudy, rerun "
                                     "the network_inputs rule (snakemake --forcerun network_inputs)")
                for k in TARGET_KEYS:
                    targets[k].append(data[k])
        if not names:
            continue  # a center that was given no patient at all (channels unknown): nothing to add or compare
        if channels is None:
            channels, shape, first = names, x.shape[1:], path
        elif names != channels:
            raise ValueError(f"network inputs have different channels: {first} has {channels}, {path} has {names}")
        elif x.shape[1:] != shape:
            raise ValueError(f"network inputs have different shapes: {first} has {shape}, {path} has {x.shape[1:]}")
        for patient in ids:
            if patient in seen:
                raise ValueError(f"patient {patient} has network inputs in both {seen[patient]} and {path}")
            seen[patient] = path
        patients += ids
        inputs.append(x)
    if channels is None:
        raise ValueError("no network inputs in " + (", ".join(map(str, paths)) or "no file"))
    if with_targets:
        return patients, np.concatenate(inputs), channels, {k: np.concatenate(v) for k, v in targets.items()}
    return patients, np.concatenate(inputs), channels


def _multitask(study: Study, cfg: dict, stats: dict, part: pd.DataFrame, part_cohort: np.ndarray,
               images: np.ndarray, channels: list[str], rows: dict, split: str, predictions: list, histories: list,
               device: str, nnunet_model) -> tuple:
    """The multitask network of one split: trained on the training rows with any outcome, scored on every row;
    appends its prediction rows (model multitask, each endpoint) and history. Returns (trained, outputs)."""
    from radstudy.networks import train as training

    started = time.perf_counter()
    n_image = len(channels) - int(bool(cfg["mask_channel"]))  # the mask channel would show it the target
    x = images[:, :n_image]
    outcomes, target = {}, {}
    for endpoint, spec in stats["endpoints"].items():
        has_y, y, outcome_cols = outcome(part, endpoint, spec)
        outcomes[endpoint] = (has_y, y, outcome_cols)
        target.update(_target(endpoint, _full(y, has_y, endpoint)))
    any_outcome = np.logical_or.reduce([o[0] for o in outcomes.values()])
    train = (part_cohort == "training") & any_outcome
    clinical_x = _clinical_design(part, train, stats) if cfg["multitask"]["clinical"] else None
    trained = training.train_multitask(
        x, clinical_x, target, rows["manual"], rows["has_manual"] & train, train, cfg,
        seed=derive_seed(study.seed, "network", split, MULTITASK), device=device, log=log,
        channels=channels[:n_image], nnunet_model=nnunet_model)
    result = training.predict_multitask(trained, x, clinical_x)
    horizon = stats["models"]["survival"]["horizon"]
    for endpoint, (has_y, y, outcome_cols) in outcomes.items():
        score = result["logit" if endpoint == "binary" else "risk"]
        fit = train & has_y
        reg = fixed_score_model(endpoint, MULTITASK, score[fit], y[fit[has_y]])
        predictions.append(pd.DataFrame({
            "patient": part["patient"], "center": part["center"], "split": split, "cohort": part_cohort,
            "endpoint": endpoint, "model": MULTITASK, "score": score,
            "probability": reg.probability(pd.DataFrame({MULTITASK: score}), horizon),
        }).join(outcome_cols))
    histories.append(trained.history.assign(split=split, endpoint=MULTITASK, model=MULTITASK,
                                            best_epoch=trained.best_epoch))
    log.info("split %s, multitask: best epoch %d of %d, %.1f s", split, trained.best_epoch, len(trained.history),
             time.perf_counter() - started)
    return trained, result


def _multitask_dsc(part: pd.DataFrame, cohort: np.ndarray, rows: dict, result: dict, region: str,
                   segmentation_split) -> pd.DataFrame:
    """DSC / HD95 / volumes in the crop of the held-out annotated patients: the multitask network's mask and, on
    the same crop, the automatic segmentation's, against the manual mask."""
    from radstudy.networks.train import dice
    from radstudy.segment.nnunet import hd95

    trained_on: set[str] = set()
    if segmentation_split is not None and Path(segmentation_split).exists():
        split_table = read_table(segmentation_split)
        trained_on = set(split_table.loc[split_table["set"] == "train", "patient"].astype(str))
    out = []
    held_out = np.flatnonzero((cohort != "training") & rows["has_manual"])
    for i in held_out:
        manual = rows["manual"][i] > 0
        spacing = rows["spacing_mm"][i][-manual.ndim:]
        voxel_ml = float(np.prod(rows["spacing_mm"][i])) / 1000.0
        candidates = [("multitask", result["probability_map"][i] > 0.5)]
        if rows["has_automatic"][i]:
            candidates.append(("nnunet", rows["automatic"][i] > 0))
        for method, mask in candidates:
            out.append({"patient": part["patient"].iloc[i], "center": part["center"].iloc[i], "region": region,
                        "method": method, "scope": "crop", "crop_from": rows["crop_from"][i], "cohort": cohort[i],
                        "nnunet_trained": part["patient"].iloc[i] in trained_on,
                        "dsc": round(dice(mask, manual), 4), "hd95": round(hd95(mask, manual, spacing), 3),
                        "volume_auto_ml": round(int(mask.sum()) * voxel_ml, 3),
                        "volume_manual_ml": round(int(manual.sum()) * voxel_ml, 3)})
    return pd.DataFrame(out, columns=DSC_COLUMNS)


def _write_masks(part: pd.DataFrame, cohort: np.ndarray, rows: dict, result: dict, out_dir: Path) -> None:
    """Each patient's predicted mask (and probability > 0.5) in its crop, as a NIfTI image on the crop grid in
    patient space (it lies over the patient's scan in ITK-SNAP / 3D Slicer), and index.tsv."""
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for i, patient in enumerate(part["patient"]):
        mask = (result["probability_map"][i] > 0.5).astype(np.uint8)
        if mask.ndim == 2:
            mask = mask[None]
        image = sitk.GetImageFromArray(mask)
        image.SetSpacing([float(v) for v in rows["spacing_mm"][i][::-1]])
        image.SetOrigin([float(v) for v in rows["origin"][i]])
        image.SetDirection([float(v) for v in rows["direction"][i]])
        file = f"{patient}.nii.gz"
        sitk.WriteImage(image, str(out_dir / file), True)
        index.append({"file": file, "patient": patient, "center": part["center"].iloc[i], "cohort": cohort[i],
                      "voxels": int(mask.sum()), "has_manual": bool(rows["has_manual"][i])})
    _write(pd.DataFrame(index, columns=["file", "patient", "center", "cohort", "voxels", "has_manual"]),
           out_dir / "index.tsv")


def _full(y, has_y: np.ndarray, endpoint: str):
    """The outcome over every row of the split (rows without one: NaN, never in the training mask)."""
    if endpoint == "binary":
        full = np.full(len(has_y), np.nan)
        full[has_y] = y
        return full
    full = {"time": np.full(len(has_y), np.nan), "event": np.full(len(has_y), np.nan)}
    full["time"][has_y], full["event"][has_y] = y["time"], y["event"]
    return full


def _with_missing(table: pd.DataFrame, data: pd.DataFrame, cohorts: pd.DataFrame, lacking: list[str], stats: dict,
                  cfg: dict) -> pd.DataFrame:
    """Rows with an empty score for the patients of each split without a network input."""
    if not lacking:
        return table
    rows = []
    lacking_data = data[data["patient"].isin(lacking)].reset_index(drop=True)
    for split in split_names(cohorts):
        cohort = lacking_data["patient"].map(cohorts[cohorts["split"] == split].set_index("patient")["cohort"])
        for endpoint, spec in stats["endpoints"].items():
            _, _, outcome_cols = outcome(lacking_data, endpoint, spec)
            for model in cfg["fit"]:
                rows.append(pd.DataFrame({"patient": lacking_data["patient"], "center": lacking_data["center"],
                                          "split": split, "cohort": cohort, "endpoint": endpoint, "model": model,
                                          "score": np.nan, "probability": np.nan}).join(outcome_cols))
    return pd.concat([table, *rows], ignore_index=True)


def _saliency(saliency, trained, images, clinical_x, part, cohort, score, key: dict, cfg: dict,
              out_dir: Path) -> list[dict]:
    """Grad-CAM maps of the first cfg["saliency_patients"] patients (by pseudonym) of each cohort, as PNG files."""
    import matplotlib.pyplot as plt

    rows = []
    for name in COHORTS:
        chosen = np.flatnonzero(cohort == name)[: cfg["saliency_patients"]]
        if not len(chosen):
            continue
        cams = saliency.grad_cam(trained, images[chosen], None if clinical_x is None else clinical_x[chosen])
        for i, cam in zip(chosen, cams):
            patient = part["patient"].iloc[i]
            title = f"{patient} ({name}): {key['model']}, {key['endpoint']}, score {score[i]:.2f}"
            figure = saliency.saliency_figure(images[i], cam, title=title, mask_channel=cfg["mask_channel"])
            file = f"{key['split']}_{key['endpoint']}_{key['model']}_{patient}.png"
            figure.savefig(out_dir / file, dpi=100)
            plt.close(figure)
            rows.append({"file": file, "patient": patient, "cohort": name, **key, "score": float(score[i])})
    return rows


def _write(table: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, sep="\t", index=False)
