"""Small synthetic DICOM files for tests: CT series from numpy volumes, and RTSTRUCTs.

    uids = write_ct_series(folder, volume, z_positions=[0, 2, 4, ...])
    write_rtstruct(folder / "rs.dcm", uids, {"GTV": [contour_mm, ...]})

`volume` is (slices, rows, columns) of stored values; HU = stored * slope + intercept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class SeriesUIDs:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    files: list[Path]


def write_ct_series(
    folder: Path,
    volume: np.ndarray,
    *,
    z_positions=None,
    positions=None,
    origin_xy=(-10.0, -20.0),
    orientation=AXIAL,
    orientations=None,
    pixel_spacing=(0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    patient_id: str = "PAT-001",
    description: str = "AXIAL 2mm",
    series_number: int = 2,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    modality: str = "CT",
    instance_numbers=None,
    file_names=None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> SeriesUIDs:
    """One file per slice of `volume` (int16 stored values), at `positions` (x, y, z per slice) or at
    `z_positions` with `origin_xy`; default positions 0, 2, 4... mm along the slice normal.
    `orientations` gives one orientation per slice (else `orientation` for all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume)
    n_slices, rows, columns = volume.shape
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        if z_positions is None:
            z_positions = [2.0 * i for i in range(n_slices)]
        base = np.array([origin_xy[0], origin_xy[1], 0.0])
        positions = [tuple(base + normal * z) for z in z_positions]
    orientations = orientations or [orientation] * n_slices
    instance_numbers = instance_numbers or list(range(1, n_slices + 1))
    file_names = file_names or [f"IM{i:04d}.dcm" for i in range(n_slices)]
    uids = SeriesUIDs(
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
        sop_instance_uids=[],
        files=[],
    )
    for i in range(n_slices):
        ds = _base_dataset(CT_IMAGE_STORAGE, patient_id, uids.study_uid, modality)
        ds.SeriesInstanceUID = uids.series_uid
        ds.FrameOfReferenceUID = uids.frame_of_reference_uid
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.ImageType = list(image_type)
        ds.InstanceNumber = instance_numbers[i]
        ds.ImagePositionPatient = [_ds(v) for v in positions[i]]
        ds.ImageOrientationPatient = [_ds(v) for v in orientations[i]]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SliceThickness = "2.5"  # deliberately unlike the slice distance: readers must not use it
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.Manufacturer, ds.ConvolutionKernel = "TESTCO", "STANDARD"
        ds.PixelData = np.ascontiguousarray(volume[i], dtype="<i2").tobytes()
        path = folder / file_names[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        uids.sop_instance_uids.append(ds.SOPInstanceUID)
        uids.files.append(path)
    return uids


def write_rtstruct(path: Path, image: SeriesUIDs, rois: dict[str, list[np.ndarray]], *, patient_id: str = "PAT-001") -> Path:
    """An RTSTRUCT referencing `image`, with CLOSED_PLANAR contours (each an (N, 3) array in mm)."""
    ds = _base_dataset(RTSTRUCT_STORAGE, patient_id, image.study_uid, "RTSTRUCT")
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "test"
    series = Dataset()
    series.SeriesInstanceUID = image.series_uid
    study = Dataset()
    study.ReferencedSOPInstanceUID = image.study_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = image.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = image.frame_of_reference_uid
        ds.StructureSetROISequence.append(roi)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = Sequence()
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [_ds(v) for v in np.asarray(points, dtype=float).ravel()]
            roi_contour.ContourSequence.append(contour)
        ds.ROIContourSequence.append(roi_contour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base_dataset(sop_class: str, patient_id: str, study_uid: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid
    ds.Modality = modality
    return ds


def _ds(value: float) -> str:
    """A decimal string within the DS limit of 16 characters."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"
