"""The network inputs at file level: each center's crops around the region in every channel (`radstudy.networks.
crops`), read once here and cached for every epoch of every network. Its own module (and the features stage's
environment): it reads the ingested images and masks as the features stage does, which the training does not."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from radstudy.config import Study, settings
from radstudy.features.stage import _patient_inputs, segmented_patients
from radstudy.ingest.outputs import MASK_FILE, patient_folders
from radstudy.networks import crops

ISSUE_COLUMNS = ["patient", "center", "region", "reason", "message", "file"]


def inputs_center(study: Study, center: str, segmentation_dir: str | Path, ingest_dirs: list[str | Path],
                  out_inputs: str | Path, out_issues: str | Path) -> pd.DataFrame:
    """The network inputs of one center's patients whose segmentation passed QC, on the mask the features stage
    chooses (`radstudy.features.stage.mask_for`): out_inputs (.npz, `radstudy.networks.crops`) and the patients
    that gave none, with the reason (out_issues, TSV)."""
    folders = patient_folders(ingest_dirs)
    items = [(patient, *_patient_inputs(study, patient, folders[patient], segmentation_dir))
             for patient in segmented_patients(segmentation_dir)]
    modalities = {name: selector["modality"] for name, selector in study.config["ingest"]["channels"].items()}
    # the segmentation targets of the multitask network and its comparison with nnU-Net in the same crops
    targets = {patient: (folders[patient] / MASK_FILE, Path(segmentation_dir) / f"{patient}.nii.gz")
               for patient, *_ in items}  # a file that is not there gives no target
    issues = crops.write_center_inputs(items, out_inputs, labels=study.config["ingest"]["labels"],
                                       cfg=settings("networks", study.config["networks"]),
                                       modalities=modalities, targets=targets)
    issues = issues.assign(center=center).reindex(columns=ISSUE_COLUMNS)
    Path(out_issues).parent.mkdir(parents=True, exist_ok=True)
    issues.to_csv(out_issues, sep="\t", index=False)
    return issues
