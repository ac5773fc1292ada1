"""Patient-level QC tables and the patient flow.

Every delivered patient has one row in `results/qc/patients.tsv` (included, or excluded with the stage
and reason); `results/qc/exclusions.tsv` lists the excluded ones and `results/qc/patient_flow.tsv` counts
them per center: delivered, included, excluded, and excluded per reason. Later stages add their own
exclusions through the same columns, so the flow counts every patient exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from radstudy.errors import NO_CLINICAL_RECORD, REASONS

QC_COLUMNS = ["patient", "center", "role", "status", "stage", "reason", "reason_text", "message", "file"]


def center_patients(ingest_dirs: list[Path], clinical: pd.DataFrame) -> pd.DataFrame:
    """One row per delivered patient of a center from the ingestion QC records and the clinical table."""
    records = [json.loads((Path(d) / "qc.json").read_text()) for d in ingest_dirs]
    table = pd.DataFrame(records).reindex(columns=QC_COLUMNS + ["channels", "mask", "unused_files"]).astype({c: object for c in QC_COLUMNS})
    has_record = clinical.set_index("patient")["has_clinical_record"]
    lacking = (table["status"] == "included") & ~table["patient"].map(has_record).fillna(False).astype(bool)
    table.loc[lacking, ["status", "stage", "reason", "reason_text"]] = [
        "excluded", "clinical", NO_CLINICAL_RECORD, REASONS[NO_CLINICAL_RECORD]]
    table.loc[lacking, "message"] = table.loc[lacking, "patient"] + ": no row in the center's clinical table"
    table["annotated"] = table["mask"].map(lambda m: isinstance(m, dict) and m.get("source", "none") != "none")
    table["mask_source"] = table["mask"].map(lambda m: m.get("source", "none") if isinstance(m, dict) else "")
    table["mask_notes"] = table["mask"].map(mask_notes)
    table["unused_files"] = [len(u) if isinstance(u, list) else 0 for u in table["unused_files"]]
    return table.drop(columns=["channels", "mask"]).sort_values("patient").reset_index(drop=True)


def mask_notes(mask) -> str:
    """What a reader of the patient table should know about the manual mask: labels combined from several
    regions or chosen among them, and labels taken from a file drawn on another series than the reference."""
    notes = []
    for region, record in (mask.get("regions", {}) if isinstance(mask, dict) else {}).items():
        if record["taken"] != "single":
            notes.append(f"{region}: {record['taken']} of {', '.join(record['matched'])}")
        if "other_series" in record["reference"]:
            notes.append(f"{region}: drawn on another series ({', '.join(record['files'])})")
    return "; ".join(notes)


def apply_stage_exclusions(patients: pd.DataFrame, stage_tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Patients excluded by a later stage (segmentation QC, feature extraction...) become excluded here, with
    that stage's reason; a patient already excluded keeps its first reason."""
    patients = patients.copy()
    for table in stage_tables:
        excluded = table[table["status"] == "excluded"].set_index("patient")
        hit = patients["patient"].isin(excluded.index) & (patients["status"] == "included")
        for column in ["status", "stage", "reason", "reason_text", "message"]:
            patients.loc[hit, column] = patients.loc[hit, "patient"].map(excluded[column])
    return patients


def patient_flow(patients: pd.DataFrame, clinical_summaries: list[dict] | None = None) -> pd.DataFrame:
    """Per center: delivered, included, excluded, excluded:<reason>; plus a 'total' row."""
    reasons = sorted(patients.loc[patients["status"] == "excluded", "reason"].dropna().unique())
    rows = []
    for (center, role), group in patients.groupby(["center", "role"], sort=True):
        excluded = group[group["status"] == "excluded"]
        row = {"center": center, "role": role, "delivered": len(group),
               "included": int((group["status"] == "included").sum()), "excluded": len(excluded)}
        row.update({f"excluded:{r}": int((excluded["reason"] == r).sum()) for r in reasons})
        rows.append(row)
    flow = pd.DataFrame(rows)
    if clinical_summaries:
        without = {s["center"]: s["clinical_rows_without_images"] for s in clinical_summaries}
        flow["clinical_rows_without_images"] = flow["center"].map(without).fillna(0).astype(int)
    total = flow.drop(columns=["center", "role"]).sum(numeric_only=True)
    flow.loc[len(flow)] = {"center": "total", "role": "", **total.to_dict()}
    return flow
