"""The feature stage at file level: which mask each patient's features come from, and the study table.

    results/features/{center}/{patient}.parquet   one patient's row (radiomics of every region and channel)
    results/features/features.parquet             patients x features (+ features.meta.json: versions, params hash)
    results/features/qc.tsv                       per patient: included, or excluded with the reason
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from . import features
from .config import Study
from .errors import FEATURE_EXTRACTION, REASONS
from .ingest import MASK_FILE, image_file

log = logging.getLogger(__name__)


def segmented_patients(segmentation_dir: str | Path) -> list[str]:
    """Patients of a center whose automatic segmentation passed QC (segment_center's qc.tsv)."""
    table = pd.read_csv(Path(segmentation_dir) / "qc.tsv", sep="\t", dtype=str, keep_default_na=False)
    return table.loc[table["status"] == "included", "patient"].tolist()


def mask_for(study: Study, center: str, patient: str, ingest_root: Path, segmentation_root: Path) -> Path:
    manual = ingest_root / center / patient / MASK_FILE
    if study.config["segmentation"]["masks_for_features"] == "manual_where_available" and manual.exists():
        return manual
    return segmentation_root / center / f"{patient}.nii.gz"


def patient_radiomics(study: Study, center: str, patient: str, ingest_root: str | Path, segmentation_root: str | Path,
                      out: str | Path) -> pd.DataFrame:
    cfg = study.config["features"]["radiomics"]
    folder = Path(ingest_root) / center / patient
    images = {c: folder / image_file(c) for c in study.config["ingest"]["channels"]}
    mask = mask_for(study, center, patient, Path(ingest_root), Path(segmentation_root))
    row, issues = features.extract_patient(
        images, mask, patient=patient, center=center, labels=study.config["ingest"]["labels"], params=cfg["params"],
        derived=cfg["derived"], margin_mm=cfg["margin_mm"], on_bad_region=cfg["on_bad_region"],
    )
    for issue in issues:
        log.warning("%s", issue["message"])
    features.write_row(row, out)
    return row


def study_table(study: Study, rows: list[str | Path], out_table: str | Path, out_qc: str | Path) -> pd.DataFrame:
    table, meta = features.write_study(rows, out_table, study.config["features"]["radiomics"]["params"])
    excluded = table["excluded"]
    qc = pd.DataFrame({
        "patient": table["patient"], "center": table["center"],
        "status": excluded.map({True: "excluded", False: "included"}),
        "stage": excluded.map({True: "features", False: ""}),
        "reason": excluded.map({True: FEATURE_EXTRACTION, False: ""}),
        "reason_text": excluded.map({True: REASONS[FEATURE_EXTRACTION], False: ""}),
        "message": [f"{p}: {r}" if e else "" for p, r, e in zip(table["patient"], table["exclusion_reason"], excluded)],
    })
    qc.to_csv(out_qc, sep="\t", index=False)
    log.info("feature table: %d patients x %d features (%s)", len(table), table.shape[1] - 4, meta)
    return table
