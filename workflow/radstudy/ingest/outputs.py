"""A patient's ingest folder (results/ingest/{center}/{patient}/): the files ingestion writes there, and reading
them back. Later stages (segmentation, features) import these names from here, not from the ingestion code, so
that their environments need none of ingestion's DICOM libraries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

QC_FILE = "qc.json"
MASK_FILE = "mask_manual.nii.gz"


def image_file(channel: str) -> str:
    return f"image_{channel}.nii.gz"


def fov_file(channel: str) -> str:
    """The channel's field-of-view mask (uint8, 1 inside), written only for a channel that does not cover the
    whole reference grid: voxels outside it hold a fill value and are kept out of every feature."""
    return f"fov_{channel}.nii.gz"


def patient_folders(ingest_dirs) -> dict[str, Path]:
    """Patients' ingest folders (as ingestion writes them: each named after its patient's pseudonym), by patient.
    Later stages take the folders they were given, so the results/ layout is written in the rules only."""
    dirs = [Path(d) for d in ingest_dirs]
    folders = {d.name: d for d in dirs}
    if len(folders) != len(dirs):
        raise ValueError("two ingest folders have the same patient name")
    return folders


def label_counts(mask: sitk.Image) -> dict[int, int]:
    """Voxels per non-zero label, counted in C++ (np.bincount would widen a 512x512x150 mask to 8 bytes per voxel)."""
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.ComputePerimeterOff()
    shapes.Execute(mask)
    return {int(label): int(shapes.GetNumberOfPixels(label)) for label in shapes.GetLabels()}


def label_volumes(mask: sitk.Image, labels: dict[str, int]) -> dict:
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    counts = label_counts(mask)
    return {region: {"voxels": counts.get(v, 0), "volume_ml": round(counts.get(v, 0) * voxel_ml, 3)}
            for region, v in labels.items()}
