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

from radstudy.config import Study, settings
from radstudy.statistics.design import primary_split, split_names
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


def network_settings(study: Study) -> dict:
    return settings("networks", study.config["networks"])


def wants_gpu(study: Study) -> bool:
    """Whether the training job should ask the scheduler for a GPU: device cuda, or auto with segmentation.gpu."""
    device = network_settings(study)["device"]
    return device == "cuda" or (device == "auto" and bool(study.config["segmentation"]["gpu"]))


def fitted_networks(config: dict) -> list[tuple[str, str]]:
    """(endpoint, model) of every network the stage trains and saves: each configured endpoint x networks.fit;
    none when networks.enabled is false."""
    cfg = settings("networks", config.get("networks"))
    if not cfg["enabled"]:
        return []
    return [(endpoint, model) for endpoint in statistics_settings(config)["endpoints"] for model in cfg["fit"]]


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
        out_history: str | Path, out_models: dict, out_saliency: str | Path) -> pd.DataFrame:
    """Train and score every network of the study (`fitted_networks`) in every split of the design.

    inputs: every center's network inputs (`radstudy.networks.inputs.inputs_center`); features / clinical /
    patients: the tables the statistics stage reads (they fix the patients and their cohorts). out_models: {(endpoint, model): path} of
    the primary split's networks (holdout, or `final`). A patient of the split without a network input gets a row
    with an empty score, which the evaluation counts as an exclusion. Writes the predictions, the training
    history of every network (learning curves) and saliency maps of a few patients per cohort (out_saliency:
    PNG files and index.tsv)."""
    from radstudy.networks import saliency
    from radstudy.networks import train as training

    cfg = network_settings(study)
    stats = statistics_settings(study.config)
    data = assemble(read_table(features), read_table(clinical), read_table(patients))
    cohorts = study_cohorts(data, stats)
    names, arrays, channels = read_center_inputs([Path(p) for p in inputs])
    row_of = {patient: i for i, patient in enumerate(names)}
    lacking = sorted(set(data["patient"]) - set(row_of))
    if lacking:
        log.warning("%d patient(s) without a network input get no network prediction: %s", len(lacking), lacking[:10])
    device = str(resolve_device(cfg["device"], setting="networks.device"))
    horizon = stats["models"]["survival"]["horizon"]
    primary = primary_split(cohorts)
    predictions, histories, saliency_rows = [], [], []
    out_saliency = Path(out_saliency)
    out_saliency.mkdir(parents=True, exist_ok=True)
    for split in split_names(cohorts):
        cohort = data["patient"].map(cohorts[cohorts["split"] == split].set_index("patient")["cohort"])
        in_split = cohort.notna().to_numpy() & data["patient"].isin(row_of).to_numpy()
        part = data[in_split].reset_index(drop=True)
        part_cohort = cohort[in_split].to_numpy()
        images = arrays[[row_of[p] for p in part["patient"]]]
        for endpoint, spec in stats["endpoints"].items():
            has_y, y, outcome_cols = outcome(part, endpoint, spec)
            train = (part_cohort == "training") & has_y
            target = _target(endpoint, _full(y, has_y, endpoint))
            for model in cfg["fit"]:
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
    table = _with_missing(pd.concat(predictions, ignore_index=True) if predictions else
                          pd.DataFrame(columns=PREDICTION_COLUMNS), data, cohorts, lacking, stats, cfg)
    _write(table.reindex(columns=PREDICTION_COLUMNS), out_predictions)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    first = ["split", "endpoint", "model", "epoch"]
    _write(history[first + [c for c in history.columns if c not in first]] if len(history) else history, out_history)
    _write(pd.DataFrame(saliency_rows, columns=["file", "patient", "cohort", "split", "endpoint", "model", "score"]),
           out_saliency / "index.tsv")
    return table


def read_center_inputs(paths: Iterable[str | Path]) -> tuple[list[str], np.ndarray, list[str]]:
    """The patients, inputs (float32) and channels of several centers' .npz files, concatenated in the order given.
    Channels and input shapes must agree and a patient may appear once: a ValueError names the files otherwise."""
    paths = [Path(p) for p in paths]
    patients: list[str] = []
    inputs = []
    channels = shape = first = None
    seen: dict[str, Path] = {}
    for path in paths:
        with np.load(path, allow_pickle=False) as data:
            names = [str(c) for c in data["channels"]]
            x = data["inputs"].astype(np.float32)
            ids = [str(p) for p in data["patients"]]
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
    return patients, np.concatenate(inputs), channels


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
    for name in ("training", "validation", "test"):
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
