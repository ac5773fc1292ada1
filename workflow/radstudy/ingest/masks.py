"""Masks: RTSTRUCT contours rasterised onto an image grid, and label-mask files (NIfTI / NRRD / MHA).

Every delivered mask file is read into a *mask source* (`MaskSource`): its kind, the file, the series and
frame of reference it references, the names of its regions (ROI names, segment labels) and `region(name,
reference)`, the region as a 0/1 uint8 image on the reference grid. `radstudy.ingest.patient` chooses among a
patient's sources and maps their region names to the config's labels.

`radstudy.ingest.dicomio` re-exports the public names, so callers can use one module for all reading.

Failures raise `PatientExcluded(MASK_UNREADABLE | MASK_GRID_MISMATCH, ...)`, naming the patient
(pseudonym), the ROI and the file relative to the patient's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement

from radstudy.errors import MASK_GRID_MISMATCH, MASK_UNREADABLE, PatientExcluded
from radstudy.images import grid_differences

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA_TAG = 0x30060050
# Voxel centres this close to a contour (in voxels) count as on it: contours that tools traced through
# voxel centres (mask-to-RTSTRUCT converters) come back through decimal strings and float transforms a
# little off those centres. Larger values (1e-3) already add voxels that the IBSI masks leave out.
BOUNDARY_TOLERANCE = 1e-6


class MaskSource(Protocol):
    """A delivered mask file as `radstudy.ingest.patient` uses it (RTStruct; DICOM SEG; named label maps)."""

    kind: str  # "rtstruct" | "seg" | "label_map"
    file: str  # relative to the patient's folder, as messages and the QC record name it
    frame_of_reference_uid: str | None
    referenced_series_uid: str | None  # the image series the file says it was drawn on, where it names one

    @property
    def names(self) -> list[str]:
        """Region names (ROI names, segment labels), in the file's order; empty where the file names none."""
        ...

    def region(self, name: str, reference: sitk.Image, *, patient: str = "") -> sitk.Image:
        """Region `name` (one of `names`) as a uint8 0/1 image on the grid of `reference`; PatientExcluded
        (MASK_UNREADABLE / MASK_GRID_MISMATCH) naming the patient, file and region when it cannot be placed."""
        ...


@dataclass
class ROI:
    number: int | None
    name: str
    contours: list[np.ndarray]  # CLOSED_PLANAR contours only, each (N, 3) in mm (patient coordinates)
    ignored_contours: int = 0  # POINT / OPEN_PLANAR / ... contours, which enclose no volume


@dataclass
class RTStruct:
    file: str  # as error messages name it
    rois: list[ROI]
    frame_of_reference_uid: str | None  # the referenced FrameOfReferenceUID
    referenced_series_uid: str | None  # the referenced image SeriesInstanceUID, where the file names one
    kind: str = "rtstruct"

    @property
    def names(self) -> list[str]:
        return self.roi_names

    def region(self, name: str, reference: sitk.Image, *, patient: str = "") -> sitk.Image:
        return rasterise_roi(self, name, reference, patient=patient)

    @property
    def roi_names(self) -> list[str]:
        return [roi.name for roi in self.rois]

    @property
    def contours(self) -> dict[str, list[np.ndarray]]:
        return {roi.name: roi.contours for roi in self.rois}


def read_rtstruct(path: Path, *, patient: str = "", file: str | None = None) -> RTStruct:
    """ROI names and closed planar contours of an RTSTRUCT file; `file` names it in errors."""
    path = Path(path)
    file = file or path.name
    try:
        ds = pydicom.dcmread(path, force=True)
        modality = str(ds.get("Modality", "")).upper()
        if modality != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
            raise ValueError(f"modality {modality or 'missing'}, not RTSTRUCT")
        # Every ROI the structure set declares, also those without contours, so that errors list them.
        rois = {
            int(item.ROINumber): ROI(int(item.ROINumber), str(item.get("ROIName", "")).strip(), [])
            for item in ds.get("StructureSetROISequence", [])
        }
        for item in ds.get("ROIContourSequence", []):
            number = int(item.ReferencedROINumber) if "ReferencedROINumber" in item else None
            roi = rois.setdefault(number, ROI(number, f"ROI {number}", []))
            for contour in item.get("ContourSequence", []):
                if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                    roi.ignored_contours += 1
                    continue
                points = _contour_data(contour)
                if points.size < 9 or points.size % 3:
                    raise ValueError(f"ROI {roi.name!r} has a contour with {points.size} coordinates")
                roi.contours.append(points.reshape(-1, 3))
        frame_of_reference, series_uid = _referenced_uids(ds)
    except Exception as error:  # pydicom raises many types on damaged files; all mean the same here
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: RTSTRUCT cannot be read: {error}", file=file) from None
    return RTStruct(file, list(rois.values()), frame_of_reference, series_uid)


def _contour_data(contour) -> np.ndarray:
    """ContourData as floats. Converting it through pydicom's per-value DS objects takes most of an
    RTSTRUCT's read time, so the raw bytes are split directly while pydicom has not parsed them."""
    element = contour.get_item(CONTOUR_DATA_TAG)
    if isinstance(element, RawDataElement) and element.value is not None:
        text = element.value.rstrip(b" \x00")
        return np.array(text.split(b"\\"), dtype=np.float64) if text else np.zeros(0)
    return np.asarray(contour.ContourData, dtype=np.float64)


def _referenced_uids(ds) -> tuple[str | None, str | None]:
    frame_of_reference = series_uid = None
    for reference in ds.get("ReferencedFrameOfReferenceSequence", []):
        frame_of_reference = frame_of_reference or str(reference.get("FrameOfReferenceUID", "")) or None
        for study in reference.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                series_uid = series_uid or str(series.get("SeriesInstanceUID", "")) or None
    return frame_of_reference, series_uid


def rasterise_roi(rtstruct: RTStruct, roi_name: str, reference: sitk.Image, *, patient: str = "") -> sitk.Image:
    """The ROI as a uint8 0/1 mask on the grid of `reference`.

    Each contour goes to the slice nearest its plane (within half a slice) and is filled by testing
    voxel centres; contours on one slice combine by XOR, so inner contours cut holes (even-odd rule).
    """
    roi = _find_roi(rtstruct, roi_name, patient)
    size_x, size_y, size_z = reference.GetSize()
    origin = np.asarray(reference.GetOrigin(), dtype=float)
    # physical point p = origin + D @ diag(spacing) @ index  =>  index = inverse(D @ diag(spacing)) @ (p - origin)
    index_to_point = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(reference.GetSpacing())
    point_to_index = np.linalg.inv(index_to_point)

    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    for points in roi.contours:
        index = (points - origin) @ point_to_index.T  # continuous (x, y, z) indices
        slice_index = int(np.rint(np.median(index[:, 2])))
        where = f"ROI {roi.name!r}: contour at {_fmt_point(points.mean(axis=0))} mm"
        if np.max(np.abs(index[:, 2] - slice_index)) > 0.5 + 1e-6:
            raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: {where} does not lie in one image slice "
                                  f"(spans slice indices {index[:, 2].min():.2f} to {index[:, 2].max():.2f})",
                                  file=rtstruct.file)
        outside_in_plane = (index[:, 0].max() < -0.5 or index[:, 0].min() > size_x - 0.5
                            or index[:, 1].max() < -0.5 or index[:, 1].min() > size_y - 0.5)
        if not 0 <= slice_index < size_z or outside_in_plane:
            raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: {where} lies outside the image "
                                  f"(continuous index {_fmt_point(index.mean(axis=0))}, size {reference.GetSize()})",
                                  file=rtstruct.file)
        first_row, inside = polygon_interior(index[:, 0], index[:, 1], size_x, size_y)
        mask[slice_index, first_row : first_row + len(inside)] ^= inside

    image = sitk.GetImageFromArray(mask.view(np.uint8))
    image.CopyInformation(reference)
    return image


def polygon_interior(x: np.ndarray, y: np.ndarray, width: int, height: int) -> tuple[int, np.ndarray]:
    """Which voxel centres (integer x, y) of a width x height slice lie inside or on the polygon (x, y).

    Returns (first row, boolean rows x width block). The same rule as skimage.draw.polygon (which
    reproduces the IBSI masks exactly), computed per row and edge instead of per voxel and edge so
    that large contours (body outlines) stay fast: a centre is inside when an odd number of edges,
    half-open in y, cross its row to its right (even-odd rule), or when it lies on an edge (within
    BOUNDARY_TOLERANCE), so that contours traced through voxel centres keep those voxels.
    """
    eps = BOUNDARY_TOLERANCE
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    first_row = max(int(np.ceil(y.min() - eps)), 0)
    last_row = min(int(np.floor(y.max() + eps)), height - 1)
    if last_row < first_row:
        return 0, np.zeros((0, width), dtype=bool)
    rows = np.arange(first_row, last_row + 1, dtype=float)[:, None]  # (rows, 1) against (edges,)
    y_low, y_high = np.minimum(y, y_next), np.maximum(y, y_next)

    # Interior: centre i lies left of a crossing iff i < ceil(crossing x). Count crossings per centre
    # with a difference array and keep the odd counts.
    row_of_crossing, edge = np.nonzero((y_low <= rows) & (rows < y_high))  # half-open: a vertex counts once
    crossing_x = _x_on_edge(x, y, x_next, y_next, edge, rows[row_of_crossing, 0])
    columns_left = np.clip(np.ceil(crossing_x), 0, width).astype(np.intp)
    counts = np.zeros((len(rows), width + 1), dtype=np.int32)
    np.add.at(counts, (row_of_crossing, 0), 1)
    np.add.at(counts, (row_of_crossing, columns_left), -1)
    inside = np.cumsum(counts[:, :width], axis=1) % 2 == 1

    # Boundary: the part of each edge within eps of a row covers the centres within eps of its x range.
    row_of_touch, edge = np.nonzero((y_low <= rows + eps) & (y_high >= rows - eps))
    row_y = rows[row_of_touch, 0]
    x0, y0, x1, y1 = x[edge], y[edge], x_next[edge], y_next[edge]
    with np.errstate(divide="ignore", invalid="ignore"):  # horizontal edges: handled by the where below
        t_a = np.clip((row_y - eps - y0) / (y1 - y0), 0.0, 1.0)
        t_b = np.clip((row_y + eps - y0) / (y1 - y0), 0.0, 1.0)
    horizontal = y0 == y1
    t_a, t_b = np.where(horizontal, 0.0, t_a), np.where(horizontal, 1.0, t_b)
    xa, xb = x0 + t_a * (x1 - x0), x0 + t_b * (x1 - x0)
    start = np.clip(np.ceil(np.minimum(xa, xb) - eps), 0, width).astype(np.intp)
    stop = np.clip(np.floor(np.maximum(xa, xb) + eps) + 1, 0, width).astype(np.intp)
    keep = start < stop
    touches = np.zeros((len(rows), width + 1), dtype=np.int32)
    np.add.at(touches, (row_of_touch[keep], start[keep]), 1)
    np.add.at(touches, (row_of_touch[keep], stop[keep]), -1)
    inside |= np.cumsum(touches[:, :width], axis=1) > 0
    return first_row, inside


def _x_on_edge(x, y, x_next, y_next, edge, row):
    """x where edge `edge` (vertex edge to edge + 1) meets the horizontal line y = row."""
    return (x_next[edge] - x[edge]) * (row - y[edge]) / (y_next[edge] - y[edge]) + x[edge]


def _find_roi(rtstruct: RTStruct, roi_name: str, patient: str) -> ROI:
    matches = [roi for roi in rtstruct.rois if roi.name == roi_name]
    if not matches:
        wanted = roi_name.strip().lower()
        matches = [roi for roi in rtstruct.rois if roi.name.strip().lower() == wanted]
    if len(matches) != 1:
        problem = "is not in" if not matches else f"occurs {len(matches)} times in"
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: ROI {roi_name!r} {problem} the RTSTRUCT "
                              f"(ROIs: {', '.join(repr(n) for n in rtstruct.roi_names) or 'none'})", file=rtstruct.file)
    if not matches[0].contours:
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: ROI {roi_name!r} has no closed planar contours",
                              file=rtstruct.file)
    return matches[0]


def _fmt_point(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"


def read_label_mask(path: Path, *, patient: str = "", file: str | None = None) -> sitk.Image:
    """A NIfTI / NRRD / MHA label mask as uint8; its labels must be integers in 0..255."""
    file = file or Path(path).name
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: mask file cannot be read", file=file) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: mask is {image.GetDimension()}D with "
                              f"{image.GetNumberOfComponentsPerPixel()} component(s), not a 3D label image", file=file)
    if image.GetPixelID() == sitk.sitkUInt8:
        return image
    values = sitk.GetArrayViewFromImage(image)
    low, high = values.min(), values.max()
    if low < 0 or high > 255 or not np.array_equal(values, np.round(values)):
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: mask values are not integer labels in 0..255 "
                              f"(range {low:g} to {high:g})", file=file)
    return sitk.Cast(image, sitk.sitkUInt8)


def check_same_grid(mask: sitk.Image, image: sitk.Image, *, patient: str, file: str, tolerance: float = 1e-3) -> None:
    """MASK_GRID_MISMATCH unless size, spacing, origin (mm, absolute) and direction agree within `tolerance`."""
    differences = grid_differences(mask, image, tolerance)
    if differences:
        raise PatientExcluded(MASK_GRID_MISMATCH, f"patient {patient}: mask grid differs from the image: "
                              + "; ".join(differences), file=file)
