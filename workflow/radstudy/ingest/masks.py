"""Masks: RTSTRUCT contours rasterised onto an image grid, DICOM SEG segments placed on it, and label-map files
(NIfTI / NRRD / MHA, 3D Slicer .seg.nrrd with named segments).

Every delivered mask file is read into a *mask source* (`MaskSource`): its kind, the file, the series and
frame of reference it references, the names of its regions (ROI names, segment labels) and `region(name,
reference)`, the region as a 0/1 uint8 image on the reference grid. `radstudy.ingest.patient` chooses among a
patient's sources and maps their region names to the config's labels. The readers: `read_rtstruct` (RTStruct),
`read_seg` (SegSource, through highdicom) and `read_label_file` (LabelMapSource; a file that names no segments
keeps its label values, `.image`).

`radstudy.ingest.dicomio` re-exports the RTSTRUCT and label-mask names (read_rtstruct, rasterise_roi,
read_label_mask, check_same_grid), so its callers can use one module for that reading.

Failures raise `PatientExcluded(MASK_UNREADABLE | MASK_GRID_MISMATCH, ...)`, naming the patient
(pseudonym), the region and the file relative to the patient's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement

from radstudy.errors import MASK_GRID_MISMATCH, MASK_UNREADABLE, PatientExcluded
from radstudy.images import grid_differences

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
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
    roi = rtstruct.rois[_find_name(rtstruct.roi_names, roi_name, "ROI", "RTSTRUCT", patient=patient, file=rtstruct.file)]
    if not roi.contours:
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: ROI {roi_name!r} has no closed planar contours",
                              file=rtstruct.file)
    return roi


def _find_name(names: list[str], name: str, what: str, container: str, *, patient: str, file: str) -> int:
    """Index of `name` in `names` (exact, else ignoring case and surrounding spaces); PatientExcluded naming the
    patient, file and the names present when it is missing or occurs more than once (which one was meant?)."""
    matches = [i for i, candidate in enumerate(names) if candidate == name]
    if not matches:
        wanted = name.strip().lower()
        matches = [i for i, candidate in enumerate(names) if candidate.strip().lower() == wanted]
    if len(matches) != 1:
        problem = "is not in" if not matches else f"occurs {len(matches)} times in"
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: {what} {name!r} {problem} the {container} "
                              f"({what}s: {', '.join(repr(n) for n in names) or 'none'})", file=file)
    return matches[0]


def _fmt_point(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"


# DICOM SEG ---------------------------------------------------------------------------------------------------

# A SEG voxel whose centre lies this close (in reference voxels) to a reference voxel centre is on it: positions
# come through decimal strings, and highdicom stacks frames whose spacing varies within 1% into one regular volume.
ON_GRID_TOLERANCE = 0.1
SLICE_SPACING_TOLERANCE = 0.01  # relative; the tolerance of the reference series' own slice-spacing check
IN_PLANE_TOLERANCE = 1e-3  # direction cosines and relative pixel spacing, as dicomio checks a series


def is_seg(header) -> bool:
    """Whether a `dicomio.DicomHeader` is a DICOM Segmentation (modality SEG or the Segmentation Storage class)."""
    return header.modality.upper() == "SEG" or header.sop_class_uid == SEG_SOP_CLASS


@dataclass
class SegSource:
    """A DICOM SEG file: its segments (number, label) in segment-number order, read through highdicom."""

    file: str  # as error messages name it
    segmentation: hd.seg.Segmentation
    segments: list[tuple[int, str]]  # (SegmentNumber, SegmentLabel)
    frame_of_reference_uid: str | None
    referenced_series_uid: str | None  # the first series of ReferencedSeriesSequence (else of the source images)
    kind: str = "seg"

    @property
    def names(self) -> list[str]:
        return [label for _, label in self.segments]

    def region(self, name: str, reference: sitk.Image, *, patient: str = "") -> sitk.Image:
        """Segment `name` on the grid of `reference`, placed by its frames' positions in patient coordinates.

        BINARY (and LABELMAP) segments are taken as stored. FRACTIONAL segments (probability or occupancy) are
        thresholded at half their maximum: a voxel belongs to the region where its value is at least 0.5 x
        MaximumFractionalValue. Frames that the SEG omits (a segment that covers some slices only) are zero.

        Where the SEG frames share the reference's in-plane grid (row and column directions, pixel spacing, and
        an in-plane origin on a reference voxel centre) and the SEG declares no other slice spacing, each frame
        is copied voxel for voxel onto the reference slice at its position (no interpolation); a frame with
        voxels of the segment between reference slices is an error. Otherwise (another grid in the same frame of
        reference) the segment is resampled by nearest neighbour in patient coordinates. Voxels of the segment
        outside the reference grid, and a segment that holds no voxel of it, are errors: nothing is dropped.
        """
        number, _ = self.segments[_find_name(self.names, name, "segment", "DICOM SEG", patient=patient, file=self.file)]
        where = f"patient {patient}: segment {name!r} (number {number})"
        mask = self._segment_image(number, where)
        if _shares_in_plane_grid(mask, reference, self._declared_slice_spacing()):
            placed = _copy_slices(mask, reference, where=where, file=self.file)
        else:
            _check_inside(mask, reference, where=where, file=self.file)
            placed = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(placed).any():
            raise PatientExcluded(MASK_UNREADABLE, f"{where} covers no voxel of the image", file=self.file)
        return placed

    def _segment_image(self, number: int, where: str) -> sitk.Image:
        """The segment as a uint8 0/1 image on the SEG's own grid (the regular stack of all its frames)."""
        try:
            volume = self.segmentation.get_volume(segment_numbers=[number], rescale_fractional=True)
        except Exception as error:  # highdicom raises several types for frames that form no regular volume
            raise PatientExcluded(MASK_UNREADABLE, f"{where}: the DICOM SEG frames cannot be stacked into a volume: "
                                  f"{error}", file=self.file) from None
        values = volume.array.reshape(volume.spatial_shape)  # one segment: one channel
        fractional = self.segmentation.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
        image = sitk.GetImageFromArray((values >= 0.5 if fractional else values > 0).astype(np.uint8))
        # highdicom's affine maps (slice, row, column) indices to patient coordinates; SimpleITK's index is
        # (column, row, slice)
        steps = np.asarray(volume.affine, dtype=float)[:3, [2, 1, 0]]
        spacing = np.linalg.norm(steps, axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((steps / spacing).ravel().tolist())
        image.SetOrigin(np.asarray(volume.affine, dtype=float)[:3, 3].tolist())
        return image

    def _declared_slice_spacing(self) -> float | None:
        """SpacingBetweenSlices of the shared pixel measures, where the SEG declares it."""
        shared = self.segmentation.get("SharedFunctionalGroupsSequence", [None])[0]
        measures = shared.get("PixelMeasuresSequence", [None])[0] if shared is not None else None
        spacing = measures.get("SpacingBetweenSlices") if measures is not None else None
        return abs(float(spacing)) if spacing else None


def read_seg(path: Path, *, patient: str = "", file: str | None = None) -> SegSource:
    """A DICOM SEG file's segments and references; `file` names it in errors (PatientExcluded MASK_UNREADABLE)."""
    file = file or Path(path).name
    try:
        segmentation = hd.seg.segread(str(path))
        segments = [(int(number), str(segmentation.get_segment_description(number).segment_label).strip())
                    for number in sorted(segmentation.segment_numbers)]
        series_uid = next((str(item.SeriesInstanceUID) for item in segmentation.get("ReferencedSeriesSequence", [])
                           if "SeriesInstanceUID" in item), None)
        if series_uid is None:
            series_uid = next((str(series) for _, series, _ in segmentation.get_source_image_uids()), None)
        frame_of_reference = str(segmentation.get("FrameOfReferenceUID", "")) or None
    except Exception as error:  # pydicom and highdicom raise many types on damaged or non-SEG files
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: DICOM SEG cannot be read: {error}", file=file) from None
    return SegSource(file, segmentation, segments, frame_of_reference, series_uid)


def _shares_in_plane_grid(mask: sitk.Image, reference: sitk.Image, slice_spacing: float | None) -> bool:
    """Whether `mask` (a SEG's stack of frames) has the reference's row and column directions and pixel spacing,
    an origin on a reference voxel centre in-plane, and (where declared) the reference's slice spacing."""
    mask_direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    reference_direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    if np.max(np.abs(mask_direction[:, :2] - reference_direction[:, :2])) > IN_PLANE_TOLERANCE:
        return False
    if not np.allclose(mask.GetSpacing()[:2], reference.GetSpacing()[:2], rtol=IN_PLANE_TOLERANCE, atol=0):
        return False
    if slice_spacing is not None and abs(slice_spacing - reference.GetSpacing()[2]) > (
            SLICE_SPACING_TOLERANCE * reference.GetSpacing()[2]):
        return False
    corner = np.asarray(reference.TransformPhysicalPointToContinuousIndex(mask.GetOrigin()))
    return bool(np.max(np.abs(corner[:2] - np.rint(corner[:2]))) <= ON_GRID_TOLERANCE)


def _copy_slices(mask: sitk.Image, reference: sitk.Image, *, where: str, file: str) -> sitk.Image:
    """`mask` (sharing the reference's in-plane grid) copied slice by slice onto the reference slices at its
    slices' positions; PatientExcluded where a slice with voxels of the region lies between reference slices or
    its voxels fall outside the reference grid."""
    source = sitk.GetArrayViewFromImage(mask)  # (slices, rows, columns)
    size_x, size_y, size_z = reference.GetSize()
    placed = np.zeros((size_z, size_y, size_x), dtype=np.uint8)
    for k in np.flatnonzero(source.reshape(len(source), -1).any(axis=1)):
        position = mask.TransformIndexToPhysicalPoint((0, 0, int(k)))
        corner = np.asarray(reference.TransformPhysicalPointToContinuousIndex(position))
        x0, y0, z = (int(v) for v in np.rint(corner))
        if np.max(np.abs(corner - np.rint(corner))) > ON_GRID_TOLERANCE:
            raise PatientExcluded(MASK_UNREADABLE, f"{where}: the frame at {_fmt_point(position)} mm does not lie on "
                                  f"an image slice (slice index {corner[2]:.2f})", file=file)
        rows, columns = np.nonzero(source[k])
        rows, columns = rows + y0, columns + x0
        if not (0 <= z < size_z and rows.min() >= 0 and columns.min() >= 0
                and rows.max() < size_y and columns.max() < size_x):
            raise PatientExcluded(MASK_UNREADABLE, f"{where}: the frame at {_fmt_point(position)} mm has voxels of "
                                  f"the segment outside the image (size {reference.GetSize()})", file=file)
        placed[z, rows, columns] = 1
    image = sitk.GetImageFromArray(placed)
    image.CopyInformation(reference)
    return image


def _check_inside(mask: sitk.Image, reference: sitk.Image, *, where: str, file: str) -> None:
    """PatientExcluded when voxel centres of the region in `mask` lie outside the reference grid (resampling
    would drop them)."""
    index_to_point = np.asarray(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    reference_to_index = np.linalg.inv(
        np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing()))
    offset = np.asarray(mask.GetOrigin()) - np.asarray(reference.GetOrigin())
    upper = np.asarray(reference.GetSize()) - 0.5
    outside = 0
    source = sitk.GetArrayViewFromImage(mask)
    for k in np.flatnonzero(source.reshape(len(source), -1).any(axis=1)):  # slice by slice: bounded memory
        rows, columns = np.nonzero(source[k])
        index = np.column_stack([columns, rows, np.full(len(rows), k)])
        continuous = (index @ index_to_point.T + offset) @ reference_to_index.T
        outside += int(np.any((continuous < -0.5) | (continuous > upper), axis=1).sum())
    if outside:
        raise PatientExcluded(MASK_UNREADABLE, f"{where}: {outside} voxel(s) of the segment lie outside the image "
                              f"grid (size {reference.GetSize()})", file=file)


# Label-map files -----------------------------------------------------------------------------------------------

# 3D Slicer writes a segmentation's segments into the NRRD header: Segment<i>_Name, _LabelValue, _Layer (...).
SLICER_SEGMENT_NAME = re.compile(r"^Segment(\d+)_Name$")


@dataclass
class LabelSegment:
    name: str
    value: int  # the label value of its voxels
    layer: int  # which layer (component) of a multi-layer .seg.nrrd holds it; 0 in a plain 3D file


@dataclass
class LabelMapSource:
    """A label-map file (NIfTI / NRRD / MHA): its layers and, where the file names them (3D Slicer .seg.nrrd),
    its segments. A 3D Slicer segmentation whose segments overlap is a 4D NRRD with one label layer per
    component; every other file has one layer."""

    file: str  # as error messages name it
    layers: list[sitk.Image]  # uint8 label images, one per layer
    segments: list[LabelSegment]  # in the file's segment order; empty where it names none
    grid_tolerance: float = 1e-3  # mm, as check_same_grid takes it
    frame_of_reference_uid: str | None = None  # label-map files name neither
    referenced_series_uid: str | None = None
    kind: str = "label_map"

    @property
    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    @property
    def image(self) -> sitk.Image:
        """The label map itself (layer 0; the only layer of a file that names no segments), for files whose
        label values are the config's labels."""
        return self.layers[0]

    def region(self, name: str, reference: sitk.Image, *, patient: str = "") -> sitk.Image:
        """The voxels holding segment `name`'s label value (in its layer); the file must be on the reference grid
        (MASK_GRID_MISMATCH otherwise), and an empty segment is an error, as an RTSTRUCT ROI without contours."""
        segment = self.segments[_find_name(self.names, name, "segment", "label map", patient=patient, file=self.file)]
        layer = uncropped(self.layers[segment.layer], reference, self.grid_tolerance)
        check_same_grid(layer, reference, patient=patient, file=self.file, tolerance=self.grid_tolerance)
        region = sitk.Cast(layer == segment.value, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(region).any():
            raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: segment {name!r} (label value {segment.value}"
                                  f", layer {segment.layer}) holds no voxel", file=self.file)
        region.CopyInformation(reference)  # within tolerance: take the image's exact geometry
        return region


def uncropped(layer: sitk.Image, reference: sitk.Image, tolerance: float) -> sitk.Image:
    """A segmentation saved cropped to its content (3D Slicer's default for .seg.nrrd) placed back on the
    reference grid: where its spacing and direction are the reference's and its origin lies on a reference voxel
    centre (within `tolerance` mm) with the whole crop inside, the crop is pasted voxel for voxel; otherwise the
    layer comes back unchanged, for the grid check to report."""
    same_axes = (np.allclose(layer.GetSpacing(), reference.GetSpacing(), atol=tolerance)
                 and np.allclose(layer.GetDirection(), reference.GetDirection(), atol=1e-6))
    if not same_axes or layer.GetSize() == reference.GetSize():
        return layer
    index = np.asarray(reference.TransformPhysicalPointToContinuousIndex(layer.GetOrigin()))
    start = np.rint(index).astype(int)
    offset_mm = np.abs(index - start) * np.asarray(reference.GetSpacing())
    if offset_mm.max() > tolerance or start.min() < 0 or np.any(start + layer.GetSize() > reference.GetSize()):
        return layer
    full = sitk.Image(reference.GetSize(), layer.GetPixelID())
    full.CopyInformation(reference)
    return sitk.Paste(full, layer, layer.GetSize(), [0, 0, 0], [int(i) for i in start])


def read_label_file(path: Path, *, patient: str = "", file: str | None = None,
                    grid_tolerance: float = 1e-3) -> LabelMapSource:
    """A label-map file as a mask source: the segments that a 3D Slicer .seg.nrrd names (Segment<i>_Name,
    _LabelValue, _Layer in its header; an older Slicer file without _LabelValue / _Layer holds each segment as
    value 1 in its own layer), or none for a plain label map (NIfTI / NRRD / MHA, ITK-SNAP), whose `.image`
    keeps its label values. Labels must be integers in 0..255; `grid_tolerance` (mm) is the grid check's."""
    file = file or Path(path).name
    image = _read_image(path, patient=patient, file=file)
    components = image.GetNumberOfComponentsPerPixel()
    segments = _slicer_segments(image, components, patient=patient, file=file)
    if components > 1 and not segments:
        raise _not_a_label_image(image, patient=patient, file=file)
    layers = [image] if components == 1 else [sitk.VectorIndexSelectionCast(image, i) for i in range(components)]
    return LabelMapSource(file, [_as_labels(layer, patient=patient, file=file) for layer in layers], segments,
                          grid_tolerance)


def _slicer_segments(image: sitk.Image, components: int, *, patient: str, file: str) -> list[LabelSegment]:
    """The segments a 3D Slicer segmentation names in its header, in segment-index order."""
    indices = sorted(int(match.group(1)) for key in image.GetMetaDataKeys() if (match := SLICER_SEGMENT_NAME.match(key)))
    segments = []
    for i in indices:
        name = image.GetMetaData(f"Segment{i}_Name").strip()
        value, layer = (image.GetMetaData(key) if image.HasMetaDataKey(key) else default
                        for key, default in ((f"Segment{i}_LabelValue", "1"),
                                             (f"Segment{i}_Layer", str(i if components > 1 else 0))))
        if not (value.strip().isdigit() and 1 <= int(value) <= 255 and layer.strip().isdigit()
                and int(layer) < components):
            raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: segment {name!r} has label value {value!r} "
                                  f"and layer {layer!r}; expected an integer in 1..255 on one of the file's "
                                  f"{components} layer(s) (overlapping layers are components of a 4D NRRD)", file=file)
        segments.append(LabelSegment(name, int(value), int(layer)))
    return segments


def read_label_mask(path: Path, *, patient: str = "", file: str | None = None) -> sitk.Image:
    """A NIfTI / NRRD / MHA label mask as uint8; its labels must be integers in 0..255."""
    file = file or Path(path).name
    image = _read_image(path, patient=patient, file=file)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise _not_a_label_image(image, patient=patient, file=file)
    return _as_labels(image, patient=patient, file=file)


def _read_image(path: Path, *, patient: str, file: str) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise PatientExcluded(MASK_UNREADABLE, f"patient {patient}: mask file cannot be read", file=file) from None
    if image.GetDimension() != 3:
        raise _not_a_label_image(image, patient=patient, file=file)
    return image


def _not_a_label_image(image: sitk.Image, *, patient: str, file: str) -> PatientExcluded:
    return PatientExcluded(MASK_UNREADABLE, f"patient {patient}: mask is {image.GetDimension()}D with "
                           f"{image.GetNumberOfComponentsPerPixel()} component(s), not a 3D label image", file=file)


def _as_labels(image: sitk.Image, *, patient: str, file: str) -> sitk.Image:
    """`image` as uint8; PatientExcluded unless its values are integer labels in 0..255."""
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
