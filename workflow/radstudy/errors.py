"""Errors that exclude a patient from the study, with a machine-readable reason.

A stage raises `PatientExcluded` when one patient's input is unusable; the stage records the
reason (`results/qc/exclusions.tsv`) and the rest of the study goes on. Messages name the
patient (pseudonym) and the file (relative to the patient's folder), never identifying values.
"""

from __future__ import annotations

# Reason codes: stable strings that the patient-flow table counts.
UNREADABLE_FILES = "unreadable_files"  # no readable DICOM in the patient's folder
NO_MATCHING_SERIES = "no_matching_series"  # no series satisfies the channel's selector
AMBIGUOUS_SERIES = "ambiguous_series"  # several series match and the selector cannot choose
MULTIPLE_PATIENTS = "multiple_patients"  # the folder mixes DICOM of different patients
GEOMETRY_GAP = "geometry_gap"  # missing slice(s): a gap larger than the slice spacing
GEOMETRY_SPACING = "geometry_inconsistent_spacing"  # slice spacing varies beyond tolerance
GEOMETRY_ORIENTATION = "geometry_orientation"  # slices with different orientations
GEOMETRY_MIXED = "geometry_mixed_series"  # duplicate positions / different matrix sizes
GEOMETRY_TILT = "geometry_tilt"  # gantry tilt: slice normal not along the stacking direction
MASK_GRID_MISMATCH = "mask_grid_mismatch"  # manual mask is on another grid than the image
MASK_UNREADABLE = "mask_unreadable"  # mask file (NIfTI/NRRD/RTSTRUCT) cannot be read or rasterised
CHANNEL_GRID_MISMATCH = "channel_grid_mismatch"  # a channel cannot be brought onto the reference grid
PIXEL_DATA_ERROR = "pixel_data_error"  # headers readable but pixel data cannot be decoded
NO_CLINICAL_RECORD = "no_clinical_record"  # images delivered but no row in the center's clinical table
SEGMENTATION_QC = "segmentation_qc"  # the automatic segmentation failed its plausibility checks
NO_MANUAL_MASK = "no_manual_mask"  # segmentation.method manual: the patient was delivered without a usable mask
FEATURE_EXTRACTION = "feature_extraction"  # a region could not give radiomic or deep features (on_bad_region: exclude)

REASONS = {
    UNREADABLE_FILES: "no readable DICOM image files",
    NO_MATCHING_SERIES: "no series matches the channel selector",
    AMBIGUOUS_SERIES: "several series match the channel selector",
    MULTIPLE_PATIENTS: "folder holds DICOM of more than one patient",
    GEOMETRY_GAP: "missing slices (gap in slice positions)",
    GEOMETRY_SPACING: "inconsistent slice spacing",
    GEOMETRY_ORIENTATION: "slices with different orientations",
    GEOMETRY_MIXED: "mixed series (duplicate positions or matrix sizes)",
    GEOMETRY_TILT: "gantry tilt / non-orthogonal stacking",
    MASK_GRID_MISMATCH: "manual mask on another grid than the image",
    MASK_UNREADABLE: "manual mask unreadable",
    CHANNEL_GRID_MISMATCH: "image channels on incompatible grids",
    PIXEL_DATA_ERROR: "pixel data cannot be decoded",
    NO_CLINICAL_RECORD: "no row in the clinical table",
    SEGMENTATION_QC: "automatic segmentation failed quality control",
    NO_MANUAL_MASK: "no manual mask (segmentation.method manual)",
    FEATURE_EXTRACTION: "radiomic or deep features could not be extracted from a region",
}


class PatientExcluded(Exception):
    """One patient's input is unusable; `reason` is one of the codes above."""

    def __init__(self, reason: str, message: str, file: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown exclusion reason {reason!r}")
        self.reason = reason
        self.file = file
        self.message = message
        super().__init__(f"{reason}: {message}" + (f" (file: {file})" if file else ""))


class ConfigError(Exception):
    """The study configuration or centers sheet is invalid; the message names the key or row."""
