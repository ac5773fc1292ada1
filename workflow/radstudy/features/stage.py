"""The feature stage at file level: which mask each patient's features come from, and the study table.

    results/features/{center}/{patient}.parquet   one patient's row (radiomics of every region and channel)
    results/features/features.parquet             patients x features (+ features.meta.json: versions, params hash)
    results/features/qc.tsv                       per patient: included, or excluded with the reason
    results/features/deep/{center}.parquet        deep features of the center's patients (radstudy.features.deep)
    results/features/deep/{center}.issues.tsv     per patient and region: why deep features are NaN, and how much
                                                  of the region and crop lay outside a channel's field of view
    results/features/deep/{center}.meta.json      the deep extractor's settings (backbone, model, device)

Every function takes the folders and files it reads and writes (a patient's ingest folder, a center's
segmentation folder): the results/ layout is written in the rules only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from radstudy.features import radiomics as features
from radstudy.config import Study
from radstudy.errors import FEATURE_EXTRACTION, REASONS
from radstudy.ingest.outputs import MASK_FILE, fov_file, image_file
from radstudy.ingest.outputs import patient_folders

log = logging.getLogger(__name__)


def segmented_patients(segmentation_dir: str | Path) -> list[str]:
    """Patients of a center whose automatic segmentation passed QC (segment_center's qc.tsv)."""
    table = pd.read_csv(Path(segmentation_dir) / "qc.tsv", sep="\t", dtype=str, keep_default_na=False)
    return table.loc[table["status"] == "included", "patient"].tolist()


def mask_for(study: Study, patient: str, ingest_dir: str | Path, segmentation_dir: str | Path) -> Path:
    """The mask a patient's features come from: its manual mask (in its ingest folder) where the config says so
    and one exists, else its automatic segmentation (in its center's segmentation folder)."""
    manual = Path(ingest_dir) / MASK_FILE
    if study.config["segmentation"]["masks_for_features"] == "manual_where_available" and manual.exists():
        return manual
    return Path(segmentation_dir) / f"{patient}.nii.gz"


def _patient_inputs(study: Study, patient: str, ingest_dir: str | Path,
                    segmentation_dir: str | Path) -> tuple[dict[str, Path], Path, dict[str, Path]]:
    """The patient's channel images, the mask its features come from, and the field-of-view masks of the channels
    that do not cover the whole grid (ingestion writes one for those channels only)."""
    channels = study.config["ingest"]["channels"]
    images = {c: Path(ingest_dir) / image_file(c) for c in channels}
    fovs = {c: Path(ingest_dir) / fov_file(c) for c in channels if (Path(ingest_dir) / fov_file(c)).exists()}
    return images, mask_for(study, patient, ingest_dir, segmentation_dir), fovs


def radiomics_params(study: Study) -> tuple[str, dict[str, str]]:
    """(the parameter file of the first channel, {channel: file} of the others) from features.radiomics.params: one
    file for every channel, or one per channel."""
    params = study.config["features"]["radiomics"]["params"]
    if isinstance(params, str):
        return params, {}
    first = next(iter(study.config["ingest"]["channels"]))
    return str(params[first]), {str(c): str(f) for c, f in params.items() if c != first}


def radiomics_param_files(config: dict) -> list[str]:
    """Every parameter file features.radiomics.params names (the rules' inputs)."""
    params = config["features"]["radiomics"]["params"]
    return [params] if isinstance(params, str) else sorted(set(map(str, params.values())))


def patient_radiomics(study: Study, center: str, patient: str, ingest_dir: str | Path, segmentation_dir: str | Path,
                      out: str | Path) -> pd.DataFrame:
    """Radiomics of one patient: ingest_dir is the patient's ingest folder, segmentation_dir its center's
    segmentation folder."""
    cfg = study.config["features"]["radiomics"]
    images, mask, fovs = _patient_inputs(study, patient, ingest_dir, segmentation_dir)
    params, channel_params = radiomics_params(study)
    row, issues = features.extract_patient(
        images, mask, patient=patient, center=center, labels=study.config["ingest"]["labels"], params=params,
        derived=cfg["derived"], margin_mm=cfg["margin_mm"], on_bad_region=cfg["on_bad_region"], fovs=fovs,
        channel_params=channel_params,
    )
    for issue in issues:
        log.warning("%s", issue["message"])
    features.write_row(row, out)
    return row


def patient_perturbed(study: Study, center: str, patient: str, ingest_dir: str | Path,
                      segmentation_dir: str | Path, out: str | Path) -> pd.DataFrame:
    """The patient's radiomics on its masks eroded / dilated (features.robustness): one row per perturbation,
    with a `perturbation` column; the ICC itself is computed by the statistics stage on training patients."""
    cfg, rob = study.config["features"]["radiomics"], study.config["features"]["robustness"]
    images, mask, fovs = _patient_inputs(study, patient, ingest_dir, segmentation_dir)
    first, per_channel = radiomics_params(study)
    params = features.channel_extraction_params(first, per_channel, list(images))  # each file read once
    first_channel = next(iter(images))
    rows = []
    for how in rob["perturbations"]:
        row, issues = features.extract_patient(
            images, mask, patient=patient, center=center, labels=study.config["ingest"]["labels"],
            params=params[first_channel], channel_params=params,
            derived=cfg["derived"], margin_mm=cfg["margin_mm"], on_bad_region="nan", mask_perturbation=how,
            perturbation_radius=rob["radius"], fovs=fovs,
        )
        for issue in issues:
            log.warning("%s (mask %s by %d voxel(s))", issue["message"], how, rob["radius"])
        rows.append(row.assign(perturbation=how))
    table = pd.concat(rows, ignore_index=True)
    features.write_row(table, out)
    return table


def perturbed_table(rows, out: str | Path) -> pd.DataFrame:
    """All patients' perturbed radiomics (patient, center, perturbation, features) in one parquet file."""
    frames = [pd.read_parquet(r) for r in rows]
    table = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(
        columns=["patient", "center", "perturbation"])
    first = [c for c in ("patient", "center", "perturbation") if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]].sort_values(["patient", "perturbation"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    log.info("perturbed radiomics of %d patient(s), %s", table["patient"].nunique(),
             sorted(table["perturbation"].unique()) if len(table) else [])
    return table


# channel, outside_region, outside_crop: only for issues about a channel's field of view (fractions 0..1)
ISSUE_COLUMNS = ["patient", "center", "region", "reason", "message", "channel", "outside_region", "outside_crop"]


def deep_wants_gpu(study: Study) -> bool:
    """Whether the deep-feature jobs should ask the scheduler for a GPU: device cuda, or auto with segmentation.gpu."""
    device = study.config["features"]["deep"]["device"]
    return device == "cuda" or (device == "auto" and bool(study.config["segmentation"]["gpu"]))


def deep_center(study: Study, center: str, segmentation_dir: str | Path, ingest_dirs: list[str | Path],
                model: str | Path, out_table: str | Path, out_issues: str | Path,
                out_meta: str | Path) -> pd.DataFrame:
    """Deep features of every patient of one center whose segmentation passed QC, with the backbone loaded once.
    segmentation_dir: the center's segmentation folder; ingest_dirs: its patients' ingest folders (at least those
    whose segmentation passed QC); model: the nnU-Net model folder (backbone nnunet) or the checkpoint file
    (resnet3d / resnet2d). Writes the table, the issues and the extractor's settings (out_meta, JSON)."""
    from radstudy.features import deep  # torch: only when deep features are computed
    from radstudy.torch_tools import torch_threads

    cfg = study.config["features"]["deep"]
    channels = list(study.config["ingest"]["channels"])
    label = int(study.config["ingest"]["labels"][cfg["region"]])
    patients = segmented_patients(segmentation_dir)
    folders = patient_folders(ingest_dirs)
    threads = cfg["threads"]
    start = time.perf_counter()
    with torch_threads(threads):
        extractor = deep.build_extractor(cfg, model=model, seed=study.seed)
        log.info("center %s: %s loaded in %.1f s; %d patient(s)", center, cfg["backbone"], time.perf_counter() - start,
                 len(patients))
        rows, issues = [], []
        for patient in patients:
            images, mask, fovs = _patient_inputs(study, patient, folders[patient], segmentation_dir)
            row, found = deep.extract_patient(extractor, images, mask, patient=patient, center=center,
                                              region=cfg["region"], label=label, on_bad_region=cfg["on_bad_region"],
                                              fovs=fovs)
            rows.append(row)
            issues += found
    names = deep.feature_names(cfg["region"], channels[0], extractor.backbone, extractor.n_features)
    if rows:
        table = pd.concat(rows, ignore_index=True)
    else:
        table = pd.DataFrame({c: pd.Series(dtype="float64" if c in names else "object")
                              for c in [*features.ID_COLUMNS, *features.FLAG_COLUMNS, *names]})
    features.write_row(table, out_table)
    pd.DataFrame(issues, columns=ISSUE_COLUMNS).to_csv(out_issues, sep="\t", index=False)
    Path(out_meta).write_text(json.dumps(extractor.meta, indent=2, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - start
    log.info("center %s: deep features of %d patient(s) in %.1f s (%d with NaN)", center, len(patients), elapsed,
             len({i["patient"] for i in issues if i["reason"] not in features.NOTES}))
    return table


def _join_deep(table: pd.DataFrame, deep_tables: list[str | Path]) -> pd.DataFrame:
    """Radiomics table + the centers' deep tables (same patients); exclusion flags and reasons combined."""
    deep = pd.concat([features.read_row(t) for t in deep_tables], ignore_index=True)
    twice = sorted(set(deep["patient"][deep["patient"].duplicated()]))
    if twice:
        raise ValueError(f"patients with two deep-feature rows: {twice}")
    deep = deep.set_index("patient")
    names = [c for c in deep.columns if c not in (*features.ID_COLUMNS, *features.FLAG_COLUMNS)]
    lacking = sorted(set(table["patient"]) - set(deep.index))
    if lacking:
        raise ValueError(f"no deep features for patient(s) {lacking}")
    joined = table.join(deep[names], on="patient")
    deep_excluded = table["patient"].map(deep["excluded"].fillna(False).astype(bool)).astype(bool)
    deep_reason = table["patient"].map(deep["exclusion_reason"].fillna("").astype(str))
    reason = [("; ".join(r for r in (a, f"deep {b}" if b else "") if r)) for a, b in
              zip(table["exclusion_reason"], deep_reason.where(deep_excluded, ""))]
    joined["excluded"] = table["excluded"] | deep_excluded
    joined["exclusion_reason"] = reason
    front = [*features.ID_COLUMNS, *features.FLAG_COLUMNS]
    return joined[front + sorted(c for c in joined.columns if c not in front)]


def study_table(study: Study, rows: list[str | Path], out_table: str | Path, out_qc: str | Path,
                out_meta: str | Path | None = None, deep_tables: list[str | Path] = (),
                deep_issues: list[str | Path] = (), deep_meta: list[str | Path] = ()) -> pd.DataFrame:
    """The study feature table: radiomics rows, joined with the deep features of the same patients when given.
    qc.tsv: included / excluded per patient; `message` also carries the patient's deep-feature issues.
    out_meta: the table's metadata (versions, parameters hash; default: <table stem>.meta.json beside it);
    deep_meta: the centers' deep-extractor settings (deep_center's out_meta), the first one recorded in out_meta."""
    params, channel_params = radiomics_params(study)
    table, meta = features.write_study(rows, out_table, params, out_meta, channel_params=channel_params)
    notes: dict[str, str] = {}
    if deep_tables:
        table = _join_deep(table, list(deep_tables))
        features.write_row(table, out_table)
        issues = pd.concat([pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in deep_issues]
                           or [pd.DataFrame(columns=ISSUE_COLUMNS)], ignore_index=True)
        notes = issues.groupby("patient")["message"].agg("; ".join).to_dict()
        info = json.loads(meta.read_text())
        info["deep"] = json.loads(Path(deep_meta[0]).read_text()) if deep_meta else {}
        info["features"] = int(len(table.columns) - len(features.ID_COLUMNS) - len(features.FLAG_COLUMNS))
        meta.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    excluded = table["excluded"]
    qc = pd.DataFrame({
        "patient": table["patient"], "center": table["center"],
        "status": excluded.map({True: "excluded", False: "included"}),
        "stage": excluded.map({True: "features", False: ""}),
        "reason": excluded.map({True: FEATURE_EXTRACTION, False: ""}),
        "reason_text": excluded.map({True: REASONS[FEATURE_EXTRACTION], False: ""}),
        "message": ["; ".join(m for m in (f"{p}: {r}" if e else "", notes.get(p, "")) if m)
                    for p, r, e in zip(table["patient"], table["exclusion_reason"], excluded)],
    })
    qc.to_csv(out_qc, sep="\t", index=False)
    log.info("feature table: %d patients x %d features (%s)", len(table), table.shape[1] - 4, meta)
    return table
