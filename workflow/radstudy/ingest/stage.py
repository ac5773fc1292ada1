"""File-level entry points of every stage: paths in, paths out.

The `radstudy` command and the Snakemake rules both call these functions, so a stage behaves
the same with or without Snakemake.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from radstudy.ingest.clinical import pseudonymised_clinical
from radstudy.config import Study
from radstudy.ingest.outputs import patient_folders  # noqa: F401 (re-export)
from radstudy.ingest.patient import ingest_patient
from radstudy.ingest.pseudonym import assign_pseudonyms
from radstudy.ingest.qc import apply_stage_exclusions, center_patients, patient_flow

log = logging.getLogger(__name__)


def _write_tsv(table: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, sep="\t", index=False, na_rep="NA")


def discover(study: Study, center_id: str, out_tsv: str | Path) -> pd.DataFrame:
    """Pseudonymise the center's delivered patients; the output lists pseudonyms only."""
    center = study.center(center_id)
    key = assign_pseudonyms(center, study.key_file)
    patients = pd.DataFrame({"patient": key["pseudonym"], "center": center_id, "role": center.role})
    _write_tsv(patients, out_tsv)
    log.info("center %s: %d patient folder(s) delivered", center_id, len(patients))
    return patients


def ingest(study: Study, center_id: str, patient: str, out_dir: str | Path) -> dict:
    """One patient's images, mask and qc.json into `out_dir`, the patient's ingest folder (named after its pseudonym)."""
    return ingest_patient(study, center_id, patient, out_dir)


def clinical(study: Study, center_id: str, patients_tsv: str | Path, out_tsv: str | Path, out_summary: str | Path) -> None:
    patients = pd.read_csv(patients_tsv, sep="\t", dtype=str)
    table, summary = pseudonymised_clinical(study, center_id, patients)
    _write_tsv(table, out_tsv)
    Path(out_summary).write_text(json.dumps(summary, indent=2))
    if summary["clinical_rows_without_images"]:
        log.warning("center %s: %d clinical row(s) without a patient folder", center_id,
                    summary["clinical_rows_without_images"])


def center_qc(ingest_dirs: list[str | Path], clinical_tsv: str | Path, out_tsv: str | Path) -> pd.DataFrame:
    clinical_table = pd.read_csv(clinical_tsv, sep="\t")
    table = center_patients([Path(d) for d in ingest_dirs], clinical_table)
    _write_tsv(table, out_tsv)
    return table


def flow(center_qc_tsvs: list[str | Path], clinical_summaries: list[str | Path], clinical_tsvs: list[str | Path],
         out_patients: str | Path, out_exclusions: str | Path, out_flow: str | Path, out_clinical: str | Path,
         stage_tsvs: list[str | Path] = ()) -> None:
    """Study-level patient table, exclusions, patient flow, and the clinical table of included patients.
    `stage_tsvs`: later stages' per-patient tables (patient, status, stage, reason, reason_text, message)."""
    patients = pd.concat([pd.read_csv(p, sep="\t", dtype={"file": str}) for p in center_qc_tsvs], ignore_index=True)
    stages_ = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in stage_tsvs]
    patients = apply_stage_exclusions(patients, stages_)
    _write_tsv(patients, out_patients)
    _write_tsv(patients[patients["status"] == "excluded"], out_exclusions)
    summaries = [json.loads(Path(s).read_text()) for s in clinical_summaries]
    _write_tsv(patient_flow(patients, summaries), out_flow)
    included = set(patients.loc[patients["status"] == "included", "patient"])
    table = pd.concat([pd.read_csv(p, sep="\t") for p in clinical_tsvs], ignore_index=True)
    _write_tsv(table[table["patient"].isin(included)].drop(columns="has_clinical_record"), out_clinical)
