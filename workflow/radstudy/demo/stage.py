"""The demo stage's entry: the synthetic multicenter cohort written where the centers sheet says the hospitals'
deliveries are (DICOM folders, clinical tables), with its ground truth beside them. `demo.kind` picks the CT
colorectal cohort (radstudy.demo.cohort) or the rectal MRI cohort (radstudy.demo.mri)."""

from __future__ import annotations

import logging

from radstudy.config import Study
from radstudy.demo.cohort import generate_cohort
from radstudy.demo.mri import generate_mri_cohort

log = logging.getLogger(__name__)


def generate(study: Study) -> dict:
    """Generate the synthetic cohort into the paths that the centers sheet names."""
    cfg = study.config["demo"]
    centers = [{"id": c.id, "role": c.role, "dicom_root": c.dicom_root, "clinical": c.clinical} for c in study.centers]
    common = dict(seed=study.seed, patients=cfg["patients"], size=cfg["size"],
                  annotated_fraction=cfg["annotated_fraction"], labels=study.config["ingest"]["labels"],
                  workers=cfg["workers"], _downsample=cfg["downsample"])
    if cfg["kind"] == "mri":
        summary = generate_mri_cohort(centers, cfg["out_dir"], **common)
    else:
        summary = generate_cohort(centers, cfg["out_dir"], rtstruct_per_center=cfg["rtstruct_per_center"],
                                  seg_per_center=cfg["seg_per_center"], **common)
    log.info("demo cohort written: %s", {k: v for k, v in summary.items() if k != "oracle"})
    return summary
