"""Reading DICOM image series: scan a folder, group and select series, check geometry, read voxels.

The ingestion stage calls, per patient and channel:

    headers, bad_files = scan_folder(folder)
    series = select_series(group_series(headers), selector, patient=pseudonym)
    geometry = check_geometry(series, patient=pseudonym)
    image = read_series(geometry, patient=pseudonym)

An enhanced multi-frame CT or MR file (geometry in its functional groups) becomes one header per frame, so that
series selection and the geometry checks treat its frames as they treat single-frame slices.

Every unusable input raises `PatientExcluded` with a reason code and a message naming the patient
(pseudonym) and the file relative to the patient's folder. Raw PatientIDs never leave `_read_header`:
headers keep only a hash, so that objects which end up in logs or exceptions carry no identifier.
RTSTRUCT and label-mask handling lives in `radstudy.ingest.masks` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.datadict import keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.tag import Tag

from radstudy.config import settings
from radstudy.errors import (
    AMBIGUOUS_SERIES,
    GEOMETRY_GAP,
    GEOMETRY_MIXED,
    GEOMETRY_ORIENTATION,
    GEOMETRY_SPACING,
    GEOMETRY_TILT,
    NO_MATCHING_SERIES,
    PIXEL_DATA_ERROR,
    ConfigError,
    PatientExcluded,
)
from radstudy.ingest.masks import ROI, RTStruct, check_same_grid, rasterise_roi, read_label_mask, read_rtstruct  # noqa: F401 (re-export)

# Files that sit beside DICOM in patient folders and are not DICOM by design (masks, notes, tables).
NON_DICOM_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".json", ".csv", ".txt")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# Only these tags are parsed; pixel data is never read while scanning.
_HEADER_TAGS = [
    "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Modality", "SeriesDescription", "SeriesNumber", "ImageType", "PatientID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "InstanceNumber", "SliceThickness", "RescaleSlope", "RescaleIntercept",
    "Manufacturer", "ConvolutionKernel", "BitsStored", "PixelRepresentation", "NumberOfFrames",
    # Enhanced multi-frame images keep geometry and rescale here; single-frame files have none, so reading
    # them costs those files nothing.
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "DimensionIndexSequence",
    # MR series selection: sequence tags and the diffusion b-value (standard tag; vendors' private tags below).
    "EchoTime", "RepetitionTime", "ScanningSequence", "SequenceName", "EchoPulseSequence", "PulseSequenceName",
    "DiffusionBValue", "DiffusionDirectionality",
]

# The vendors' private diffusion b-value tags: (vendor, Manufacturer regex, group, element offset in the private
# block, private creators, how the value is encoded). The block is found through its private creator; the creator
# slots (gggg,0010)..(gggg,001F) are read, which covers what scanners write (creators at higher slots are not
# searched). A file of another Manufacturer is never read for these tags.
PRIVATE_B_VALUE_TAGS = (
    ("Siemens", re.compile(r"SIEMENS", re.IGNORECASE), 0x0019, 0x0C, ("SIEMENS MR HEADER",), "IS"),
    # First value of a multi-valued IS; multi-b-value and synthetic DWI add 1e9 (BIAS_FOR_BVALUE) on some versions.
    ("GE", re.compile(r"^\s*GE\b|GENERAL ELECTRIC", re.IGNORECASE), 0x0043, 0x39, ("GEMS_PARM_01",), "IS"),
    ("Philips", re.compile(r"PHILIPS", re.IGNORECASE), 0x2001, 0x03, ("PHILIPS IMAGING DD 001",), "FL"),
)
PRIVATE_SLOTS = range(0x10, 0x20)
GE_B_VALUE_BIAS = 1_000_000_000
_HEADER_TAGS += [
    Tag(group, tag) for _, _, group, offset, _, _ in PRIVATE_B_VALUE_TAGS for slot in PRIVATE_SLOTS
    for tag in (slot, (slot << 8) | offset)
]
_HEADER_TAGS = [Tag(t) for t in _HEADER_TAGS]  # converted once: dcmread converts every keyword on every file
B_VALUE_TOLERANCE = 1.0  # s/mm^2: a selector's b_value matches a file within this

# Enhanced multi-frame images (one file, one frame per slice; PS3.3 C.7.6.16 functional groups) that scanning
# expands into one header per frame: Enhanced CT, Legacy Converted Enhanced CT, Enhanced MR, Legacy Converted
# Enhanced MR.
ENHANCED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4",
})
# Per-frame attributes (functional group, attribute) that tell volumes apart inside one enhanced file, besides the
# non-spatial dimensions its DimensionIndexSequence declares: frames differing in one of them are not one stack.
STACK_ATTRIBUTES = (
    ("FrameContentSequence", "StackID"), ("FrameContentSequence", "TemporalPositionIndex"),
    ("MRDiffusionSequence", "DiffusionBValue"), ("MREchoSequence", "EffectiveEchoTime"),
)
SPATIAL_DIMENSIONS = frozenset({"ImagePositionPatient", "InStackPositionNumber"})
# The functional group that holds each geometry attribute of a frame (named when a frame lacks one).
FRAME_GROUPS = {
    "ImagePositionPatient": "PlanePositionSequence", "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
}

# Geometry tolerances that are not study settings.
ORIENTATION_TOLERANCE = 1e-3  # direction cosines; 1e-3 is ~0.06 degrees
PIXEL_SPACING_TOLERANCE = 1e-3  # relative
DUPLICATE_POSITION_MM = 1e-2  # two slices closer than this occupy the same position
# A slice may sit at most this fraction of a pixel off the line through the first slice along the
# normal: beyond it, stacking the slices orthogonally would misplace voxels (gantry tilt).
TILT_TOLERANCE_PIXELS = 0.1

INT16_MIN, INT16_MAX = -32768, 32767


@dataclass(frozen=True)
class DicomHeader:
    """The header fields of one DICOM file needed for series selection and geometry."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str | None
    modality: str
    sop_class_uid: str
    series_description: str
    series_number: int | None
    image_type: tuple[str, ...]
    patient_key: str  # sha256(PatientID) hex[:16]; the raw ID is never stored
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # DICOM order: (row spacing, column spacing)
    rows: int | None
    columns: int | None
    instance_number: int | None
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    manufacturer: str
    convolution_kernel: str
    relative_path: str = ""  # relative to the scanned folder; what error messages name
    bits_stored: int | None = None
    pixel_representation: int | None = None  # 0 unsigned, 1 two's complement
    number_of_frames: int = 1
    frame_number: int | None = None  # 1-based frame of an enhanced multi-frame file; None for a single-frame file
    stack: tuple[tuple[str, str], ...] = ()  # (attribute, value) of the frame's non-spatial dimensions (StackID, b-value...)
    echo_time: float | None = None  # ms; EchoTime, or the frame's MREchoSequence > EffectiveEchoTime
    repetition_time: float | None = None  # ms; RepetitionTime, or the frame's MRTimingAndRelatedParametersSequence
    scanning_sequence: str = ""  # ScanningSequence and SequenceName joined by a space (enhanced MR: EchoPulseSequence, PulseSequenceName)
    b_value: float | None = None  # diffusion b-value, s/mm^2
    b_value_source: str | None = None  # the tag that gave b_value (standard, MRDiffusionSequence, or a vendor's private tag)

    @property
    def has_pixels(self) -> bool:
        return self.rows is not None and self.columns is not None

    @property
    def name(self) -> str:
        """The file relative to the scanned folder, and the frame for a frame of a multi-frame file: what messages name."""
        return self.relative_path if self.frame_number is None else f"{self.relative_path} frame {self.frame_number}"


def patient_key(patient_id: str) -> str:
    """The hash that stands for a PatientID in memory objects (equal IDs give equal keys)."""
    return hashlib.sha256(patient_id.strip().encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- scanning


def scan_folder(folder: Path) -> tuple[list[DicomHeader], list[tuple[str, str]]]:
    """Read the headers of every DICOM file under `folder` (any layout, any file names).

    Returns the headers of the readable DICOM files (one per frame for an enhanced multi-frame image)
    and (relative path, short reason) for every other file. Mask and table files (NON_DICOM_SUFFIXES),
    hidden files and DICOMDIR are skipped silently: they are expected beside the images and are not errors.
    """
    folder = Path(folder)
    headers: list[DicomHeader] = []
    bad_files: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(folder).as_posix()
            if _skipped_by_name(name) or not path.is_file():
                continue
            found, problem = _read_header(path, relative)
            headers += found
            if problem is not None:  # [], None: a DICOMDIR
                bad_files.append((relative, problem))
    return headers, bad_files


def _skipped_by_name(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(".") or lower == "dicomdir" or lower.endswith(NON_DICOM_SUFFIXES)


def _looks_like_dicom(path: Path) -> tuple[bool, bool]:
    """(is DICOM, has the Part-10 preamble), from the first bytes only.

    Files without the 128-byte preamble + "DICM" are still common (old exports); they start directly
    with a little-endian group 0x0002 or 0x0008 tag. Anything else is not opened as DICOM, so that
    random files are never parsed with force=True.
    """
    with open(path, "rb") as stream:
        start = stream.read(132)
    if len(start) == 132 and start[128:132] == b"DICM":
        return True, True
    if len(start) >= 8 and start[:2] in (b"\x02\x00", b"\x08\x00"):
        return True, False
    return False, False


def _read_header(path: Path, relative: str) -> tuple[list[DicomHeader], str | None]:
    """The header of one file (one per frame of an enhanced multi-frame image), or ([], reason); ([], None) for a DICOMDIR."""
    try:
        if path.stat().st_size == 0:
            return [], "empty file"
        is_dicom, has_preamble = _looks_like_dicom(path)
        if not is_dicom:
            return [], "not a DICOM file"
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=not has_preamble)
    except Exception as error:  # damaged files raise many types (struct.error, EOFError, ...): one scan must not stop
        return [], f"unreadable DICOM header ({type(error).__name__})"
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if str(media_class or "") == DICOMDIR_SOP_CLASS:
        return [], None
    try:
        header = _header_from_dataset(ds, path, relative)
        return (_frame_headers(ds, header) if header.sop_class_uid in ENHANCED_SOP_CLASSES else [header]), None
    except _MissingTag as missing:
        return [], f"DICOM without {missing}"
    except _Unsupported as unsupported:
        return [], str(unsupported)
    except Exception as error:  # malformed values (text in a number, ...)
        return [], f"malformed DICOM header ({type(error).__name__})"


class _MissingTag(Exception):
    pass


class _Unsupported(Exception):
    """A DICOM image file of a kind or variant that cannot be read; the message names what."""


def _header_from_dataset(ds: pydicom.Dataset, path: Path, relative: str) -> DicomHeader:
    def required(keyword: str) -> str:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise _MissingTag(keyword)
        return value

    return DicomHeader(
        path=path,
        sop_instance_uid=required("SOPInstanceUID"),
        series_uid=required("SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID") or None,
        modality=_text(ds, "Modality").upper(),
        sop_class_uid=_text(ds, "SOPClassUID"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_integer(ds, "SeriesNumber"),
        image_type=tuple(v.strip().upper() for v in _multi(ds, "ImageType")),
        patient_key=patient_key(_text(ds, "PatientID")),
        position=_floats(ds, "ImagePositionPatient", 3),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        rows=_integer(ds, "Rows"),
        columns=_integer(ds, "Columns"),
        instance_number=_integer(ds, "InstanceNumber"),
        slice_thickness=_float(ds, "SliceThickness"),
        rescale_slope=_float(ds, "RescaleSlope") or 1.0,  # absent (or a nonsensical 0) means identity
        rescale_intercept=_float(ds, "RescaleIntercept") or 0.0,
        manufacturer=_text(ds, "Manufacturer"),
        convolution_kernel="\\".join(_multi(ds, "ConvolutionKernel")),
        relative_path=relative,
        bits_stored=_integer(ds, "BitsStored"),
        pixel_representation=_integer(ds, "PixelRepresentation"),
        number_of_frames=_integer(ds, "NumberOfFrames") or 1,
        echo_time=_float(ds, "EchoTime"),
        repetition_time=_float(ds, "RepetitionTime"),
        scanning_sequence=_sequence_text(ds),
        **dict(zip(("b_value", "b_value_source"), _b_value(ds), strict=True)),
    )


def _sequence_text(ds) -> str:
    """ScanningSequence (its values joined by backslashes) and SequenceName joined by a space; for enhanced MR files,
    which have neither, EchoPulseSequence and PulseSequenceName."""
    parts = ["\\".join(v.strip() for v in _multi(ds, "ScanningSequence")), _text(ds, "SequenceName")]
    if not any(parts):
        parts = [_text(ds, "EchoPulseSequence"), _text(ds, "PulseSequenceName")]
    return " ".join(part for part in parts if part)


def _b_value(ds) -> tuple[float | None, str | None]:
    """(b-value in s/mm^2, the tag that gave it) of a file: the standard DiffusionBValue (0018,9087), else the private
    tag of the file's vendor (PRIVATE_B_VALUE_TAGS), else (None, None). Enhanced MR frames take theirs from their
    functional groups (`_frame_b_value`)."""
    value = _float(ds, "DiffusionBValue")
    if value is not None:
        return value, "DiffusionBValue (0018,9087)"
    manufacturer = _text(ds, "Manufacturer")
    for vendor, pattern, group, offset, creators, encoding in PRIVATE_B_VALUE_TAGS:
        if not pattern.search(manufacturer):
            continue
        element = _private_element(ds, group, offset, creators)
        if element is None:
            continue
        value = _private_number(element.value, encoding)
        if value is None:
            continue
        if vendor == "GE":
            value %= GE_B_VALUE_BIAS
        return value, f"{vendor} private ({group:04X},{element.tag.element:04X})"
    return None, None


def _private_element(ds, group: int, offset: int, creators: tuple[str, ...]):
    """The element at `offset` of the private block of `group` whose creator is one of `creators` (case-insensitive);
    where the file has no creator at all in the default slot (gggg,0010) (an export that dropped it), the element
    (gggg,10xx) itself. A block of another creator is never read."""
    wanted = {c.upper() for c in creators}
    for slot in PRIVATE_SLOTS:
        creator = ds.get((group, slot))
        if creator is not None and str(creator.value).strip().upper() in wanted:
            return ds.get((group, (slot << 8) | offset))
    if ds.get((group, PRIVATE_SLOTS[0])) is None:
        return ds.get((group, (PRIVATE_SLOTS[0] << 8) | offset))
    return None


def _private_number(value, encoding: str) -> float | None:
    """The first number of a private element's value: IS/DS text (a list of values, a string, or the raw bytes of an
    element read without its VR), or FL (a float, or 4 little-endian bytes)."""
    if isinstance(value, (bytes, bytearray)):
        if encoding == "FL":
            return float(struct.unpack("<f", bytes(value[:4]))[0]) if len(value) >= 4 else None
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str):
        value = value.replace("\x00", "").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None or str(value).strip() == "" else float(value)
    except (TypeError, ValueError):
        return None


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _multi(ds, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [str(value)]
    return [str(v) for v in value]


def _integer(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return int(value)


def _float(ds, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return float(value)


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    values = _multi(ds, keyword)
    if len(values) != count:
        return None  # absent or malformed: the series then fails the geometry check, naming the file
    return tuple(float(v) for v in values)


def _frame_headers(ds: pydicom.Dataset, header: DicomHeader) -> list[DicomHeader]:
    """One header per frame of an enhanced multi-frame image: position, orientation, pixel spacing and rescale from
    the frame's functional groups, else the shared ones, else the top level (where a converter left them).

    A frame without a position cannot be placed, so the whole file is unsupported (naming what is missing);
    other missing geometry is left to `check_geometry`, which names the frame.
    """
    kind = f"enhanced multi-frame {header.modality or 'image'}"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != header.number_of_frames:
        raise _Unsupported(f"{kind} with {len(per_frame)} PerFrameFunctionalGroupsSequence item(s) for "
                           f"{header.number_of_frames} frame(s) is not supported")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    stack_attributes = _stack_attributes(ds)
    frames = []
    for number, item in enumerate(per_frame, start=1):
        groups = (item, shared)
        position = _group_floats(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
        if position is None:
            raise _Unsupported(f"{kind} without PlanePositionSequence > ImagePositionPatient (frame {number} of "
                               f"{len(per_frame)}) is not supported")
        slope = _group_float(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_float(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        kernel = _group_item(groups, "CTReconstructionSequence", "ConvolutionKernel") or _group_item(
            groups, "UnassignedSharedConvertedAttributesSequence", "ConvolutionKernel")
        frames.append(replace(
            header,
            frame_number=number,
            position=position,
            orientation=_group_floats(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6) or header.orientation,
            pixel_spacing=_group_floats(groups, "PixelMeasuresSequence", "PixelSpacing", 2) or header.pixel_spacing,
            slice_thickness=_group_float(groups, "PixelMeasuresSequence", "SliceThickness") or header.slice_thickness,
            rescale_slope=slope or header.rescale_slope,
            rescale_intercept=header.rescale_intercept if intercept is None else intercept,
            convolution_kernel=header.convolution_kernel or ("\\".join(_multi(kernel, "ConvolutionKernel")) if kernel else ""),
            stack=tuple((keyword, _text(found, keyword)) for group, keyword in stack_attributes
                        if (found := _group_item(groups, group, keyword)) is not None),
            echo_time=_group_float(groups, "MREchoSequence", "EffectiveEchoTime") or header.echo_time,
            repetition_time=_group_float(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime") or header.repetition_time,
            **dict(zip(("b_value", "b_value_source"), _frame_b_value(groups, header), strict=True)),
        ))
    return frames


def _frame_b_value(groups, header: DicomHeader) -> tuple[float | None, str | None]:
    """A frame's b-value: MRDiffusionSequence > DiffusionBValue of its own or the shared functional groups (a frame
    whose DiffusionDirectionality is NONE and that gives no b-value is b = 0), else the file's top-level one."""
    value = _group_float(groups, "MRDiffusionSequence", "DiffusionBValue")
    if value is not None:
        return value, "MRDiffusionSequence > DiffusionBValue"
    item = _group_item(groups, "MRDiffusionSequence", "DiffusionDirectionality")
    if item is not None and _text(item, "DiffusionDirectionality").upper() == "NONE":
        return 0.0, "MRDiffusionSequence > DiffusionDirectionality NONE"
    return header.b_value, header.b_value_source


def _group_item(groups, sequence: str, keyword: str) -> pydicom.Dataset | None:
    """The first item of functional group `sequence` that holds `keyword`, searched in `groups` in order."""
    for group in groups:
        items = group.get(sequence) if group is not None else None
        if items and items[0].get(keyword) not in (None, ""):
            return items[0]
    return None


def _group_floats(groups, sequence: str, keyword: str, count: int) -> tuple[float, ...] | None:
    item = _group_item(groups, sequence, keyword)
    return None if item is None else _floats(item, keyword, count)


def _group_float(groups, sequence: str, keyword: str) -> float | None:
    item = _group_item(groups, sequence, keyword)
    return None if item is None else _float(item, keyword)


def _stack_attributes(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """(functional group, attribute) of STACK_ATTRIBUTES and of the non-spatial dimensions that the file's
    DimensionIndexSequence declares (cardiac phase, contrast phase...)."""
    attributes = list(STACK_ATTRIBUTES)
    for dimension in ds.get("DimensionIndexSequence") or []:
        keyword = keyword_for_tag(dimension.get("DimensionIndexPointer") or 0)
        group = keyword_for_tag(dimension.get("FunctionalGroupPointer") or 0)
        if keyword and group and keyword not in SPATIAL_DIMENSIONS and (group, keyword) not in attributes:
            attributes.append((group, keyword))
    return attributes


# --------------------------------------------------------------------------- series


@dataclass
class Series:
    """The files sharing one SeriesInstanceUID and modality (an RTSTRUCT is a series of its own)."""

    uid: str
    modality: str
    description: str
    image_type: tuple[str, ...]
    headers: list[DicomHeader]
    series_number: int | None = None
    frame_of_reference_uid: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self.headers)

    @property
    def is_image(self) -> bool:
        """Files with pixel data (Rows/Columns); RTSTRUCT, SR, RTPLAN... have none."""
        return any(h.has_pixels for h in self.headers)

    def summary(self) -> str:
        """SeriesNumber, modality, description, ImageType and size, then what MR selectors match on where the files
        have it: the b-values (with their slice counts and the tag they came from), EchoTime and RepetitionTime
        ranges and the scanning sequence. A CT series reads as before: "#2 CT 'AXIAL' [ORIGINAL\\PRIMARY] 120 slices"."""
        number = "?" if self.series_number is None else self.series_number
        image_type = "\\".join(self.image_type) or "-"
        kind = f"{self.n_slices} slices" if self.is_image else f"{self.n_slices} file(s), no pixel data"
        text = f"#{number} {self.modality} '{self.description}' [{image_type}] {kind}"
        b_values = Counter(None if h.b_value is None else round(h.b_value, 1) for h in self.headers)
        if set(b_values) != {None}:
            counts = ", ".join(f"{'none' if b is None else f'{b:g}'} ({n})" for b, n in
                               sorted(b_values.items(), key=lambda item: (item[0] is None, item[0] or 0)))
            sources = sorted({h.b_value_source for h in self.headers if h.b_value_source})
            text += f"; b-values {counts} from {', '.join(sources)}"
        for label, values in (("TE", [h.echo_time for h in self.headers]), ("TR", [h.repetition_time for h in self.headers])):
            known = [v for v in values if v is not None]
            if known:
                low, high = min(known), max(known)
                text += f"; {label} {low:g} ms" if low == high else f"; {label} {low:g}-{high:g} ms"
        sequences = sorted({h.scanning_sequence for h in self.headers if h.scanning_sequence})
        if sequences:
            text += f"; sequence {' | '.join(sequences)}"
        return text


def group_series(headers: list[DicomHeader]) -> list[Series]:
    """Group headers by (SeriesInstanceUID, Modality), ordered by SeriesNumber then UID."""
    groups: dict[tuple[str, str], list[DicomHeader]] = {}
    for header in headers:
        groups.setdefault((header.series_uid, header.modality), []).append(header)
    series = [
        Series(
            uid=uid,
            modality=modality,
            description=_most_common(h.series_description for h in members),
            image_type=_most_common(h.image_type for h in members),
            headers=members,
            series_number=_most_common(h.series_number for h in members),
            frame_of_reference_uid=_most_common(h.frame_of_reference_uid for h in members),
        )
        for (uid, modality), members in groups.items()
    ]
    series.sort(key=_series_order)
    return series


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _series_order(series: Series):
    return (series.series_number is None, series.series_number or 0, series.uid)


def validate_selector(selector: dict | None) -> dict:
    """The selector (an `ingest.channels` entry of the config) with the schema's defaults filled in;
    ConfigError on unknown keys or bad values."""
    rules = settings("ingest.channels.*", selector)
    rules.setdefault("description", None)
    for key in ("description", "scanning_sequence"):
        if rules[key] is not None:
            try:
                re.compile(rules[key])
            except re.error as error:
                raise ConfigError(f"series selector: {key} is not a valid regex: {error}") from None
    for key in ("echo_time", "repetition_time"):
        low, high = rules[key] or (None, None)
        if low is not None and high is not None and low > high:
            raise ConfigError(f"series selector: {key} range [{low}, {high}] has its minimum above its maximum")
    return rules


def select_series(series: list[Series], selector: dict, *, patient: str) -> Series:
    """The one image series that `selector` picks (an `ingest.channels` entry: see the config schema for the keys).

    Series are considered when they have pixel data and match modality and description (case-insensitive regex
    search). Their files (frames of an enhanced file) are then filtered one by one, since scanners store the
    localizer inside the axial series, several echoes or b-values in one series, and ADC images beside the DWI:
    a file is dropped when its ImageType holds a value of exclude_image_type, or lacks one of image_type, or
    does not match scanning_sequence, echo_time, repetition_time or b_value (within B_VALUE_TOLERANCE; a file
    without the attribute does not match a selector that asks for it). A series keeps the files left, so that
    b0 and b800 of one DWI series are two channels' series, and counts when at least min_slices are left.
    Among several, `choose` decides: "most_slices" (a tie is ambiguous), "first" (lowest SeriesNumber) or "error".
    When none is left, the message lists every series with its ImageType, b-values, TE, TR and sequence.
    """
    rules = validate_selector(selector)
    description = re.compile(rules["description"], re.IGNORECASE) if rules["description"] else None
    keep = _file_filter(rules)

    candidates = []
    for one in series:
        if not one.is_image or one.modality != str(rules["modality"]).upper():
            continue
        if description is not None and not description.search(one.description):
            continue
        kept = [h for h in one.headers if keep(h)]
        if len(kept) < rules["min_slices"]:
            continue
        candidates.append(replace(one, headers=kept, image_type=_most_common(h.image_type for h in kept)))

    if not candidates:
        listing = "; ".join(s.summary() for s in series) or "no DICOM series at all"
        raise PatientExcluded(
            NO_MATCHING_SERIES,
            f"patient {patient}: no series matches selector {_describe(rules)}; series present: {listing}",
        )
    if len(candidates) == 1:
        return candidates[0]
    if rules["choose"] == "first":
        return min(candidates, key=_series_order)
    if rules["choose"] == "most_slices":
        most = max(s.n_slices for s in candidates)
        tied = [s for s in candidates if s.n_slices == most]
        if len(tied) == 1:
            return tied[0]
        candidates = tied
    raise PatientExcluded(
        AMBIGUOUS_SERIES,
        f"patient {patient}: {len(candidates)} series match selector {_describe(rules)} "
        f"(choose={rules['choose']}): " + "; ".join(s.summary() for s in candidates),
    )


def _file_filter(rules: dict):
    """Whether one file (header) passes the selector's per-file rules (see `select_series`)."""
    excluded_types = {t.upper() for t in rules["exclude_image_type"] or []}
    required_types = {t.strip().upper() for t in rules["image_type"] or []}
    sequence = re.compile(rules["scanning_sequence"], re.IGNORECASE) if rules["scanning_sequence"] else None
    b_value = rules["b_value"]

    def in_range(value: float | None, bounds) -> bool:
        if bounds is None:
            return True
        low, high = bounds
        return value is not None and (low is None or value >= low) and (high is None or value <= high)

    def keep(header: DicomHeader) -> bool:
        return (
            not excluded_types.intersection(header.image_type)
            and required_types.issubset(header.image_type)
            and (sequence is None or bool(sequence.search(header.scanning_sequence)))
            and in_range(header.echo_time, rules["echo_time"])
            and in_range(header.repetition_time, rules["repetition_time"])
            and (b_value is None or (header.b_value is not None and abs(header.b_value - b_value) <= B_VALUE_TOLERANCE))
        )

    return keep


def _describe(rules: dict) -> str:
    shown = {k: v for k, v in rules.items() if k != "choose" and v not in (None, [])}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())


# --------------------------------------------------------------------------- geometry


@dataclass
class SeriesGeometry:
    """The checked voxel grid of one image series; `files` and `headers` are sorted along the normal."""

    files: list[Path]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # (x: along a row, y: along a column, z: measured slice distance)
    direction: tuple[float, ...]  # 9 floats, row-major, columns = row, column, normal directions (SimpleITK)
    size: tuple[int, int, int]  # (columns, rows, slices)
    headers: list[DicomHeader] = field(default_factory=list, repr=False)
    slice_positions: tuple[float, ...] = ()  # mm along the normal, ascending


def check_geometry(
    series: Series, *, patient: str, spacing_tolerance: float = 0.01, gap_factor: float = 1.5
) -> SeriesGeometry:
    """Sort the slices along the slice normal and check that they form one regular grid.

    Sorting uses the position projected on the normal (row x column direction), never file names or
    InstanceNumber, which scanners and exports number in either direction.
    """
    headers = series.headers
    if not headers:
        raise PatientExcluded(GEOMETRY_MIXED, f"patient {patient}: series {series.summary()} has no files")
    for header in headers:
        if header.number_of_frames != 1 and header.frame_number is None:
            raise PatientExcluded(GEOMETRY_MIXED, f"patient {patient}: multi-frame image ({header.number_of_frames} "
                                  f"frames, {pydicom.uid.UID(header.sop_class_uid).name}) in the series; only single-frame "
                                  "slices and enhanced CT and MR images are supported", file=header.relative_path)
        missing = [name for name, value in (
            ("ImagePositionPatient", header.position), ("ImageOrientationPatient", header.orientation),
            ("PixelSpacing", header.pixel_spacing), ("Rows", header.rows), ("Columns", header.columns),
        ) if value is None]
        if missing:
            if header.frame_number is not None:
                missing = [f"{FRAME_GROUPS[name]} > {name}" if name in FRAME_GROUPS else name for name in missing]
            raise PatientExcluded(GEOMETRY_MIXED, f"patient {patient}: {header.name} lacks {', '.join(missing)}",
                                  file=header.relative_path)
    _check_one_stack(headers, patient)

    first = headers[0]
    orientation = np.asarray(first.orientation, dtype=float)
    for header in headers[1:]:
        if np.max(np.abs(np.asarray(header.orientation) - orientation)) > ORIENTATION_TOLERANCE:
            raise PatientExcluded(
                GEOMETRY_ORIENTATION,
                f"patient {patient}: orientation {_fmt(header.orientation)} of {header.name} differs from "
                f"{_fmt(first.orientation)} ({first.name})",
                file=header.relative_path,
            )
        if (header.rows, header.columns) != (first.rows, first.columns) or not np.allclose(
            header.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_TOLERANCE, atol=0
        ):
            raise PatientExcluded(
                GEOMETRY_MIXED,
                f"patient {patient}: matrix {header.rows}x{header.columns} spacing {_fmt(header.pixel_spacing)} of {header.name} "
                f"differs from {first.rows}x{first.columns} spacing {_fmt(first.pixel_spacing)} ({first.name})",
                file=header.relative_path,
            )

    row_dir, col_dir = _unit(orientation[:3]), _unit(orientation[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.array([h.position for h in headers], dtype=float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    distances = np.diff(along)

    for i in np.flatnonzero(distances < DUPLICATE_POSITION_MM):
        b_values = {headers[i].b_value, headers[i + 1].b_value}
        hint = (f" (b-values {' and '.join(f'{b:g}' for b in sorted(b_values))}: set the channel's b_value to select one)"
                if len(b_values) > 1 and None not in b_values else "")
        raise PatientExcluded(
            GEOMETRY_MIXED,
            f"patient {patient}: two slices at the same position {along[i]:.3f} mm "
            f"({headers[i].name} and {headers[i + 1].name}): mixed or duplicated series{hint}",
            file=headers[i + 1].relative_path,
        )

    pixel = min(first.pixel_spacing)
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if drift.size and drift.max() > TILT_TOLERANCE_PIXELS * pixel:
        worst = int(np.argmax(drift))
        raise PatientExcluded(
            GEOMETRY_TILT,
            f"patient {patient}: slices are not stacked along the slice normal (gantry tilt?): "
            f"{drift[worst]:.3f} mm in-plane shift over {along[worst] - along[0]:.2f} mm",
            file=headers[worst].relative_path,
        )

    if len(headers) > 1:
        z_spacing = float((along[-1] - along[0]) / (len(headers) - 1))
        typical = float(np.median(distances))
        gaps = np.flatnonzero(distances >= gap_factor * typical)
        if gaps.size:
            missing = []
            for i in gaps:
                n_missing = max(int(round(distances[i] / typical)) - 1, 1)
                step = distances[i] / (n_missing + 1)
                missing += [along[i] + step * k for k in range(1, n_missing + 1)]
            i = int(gaps[0])
            raise PatientExcluded(
                GEOMETRY_GAP,
                f"patient {patient}: missing slice(s) at {', '.join(f'{p:.2f}' for p in missing)} mm along the "
                f"slice normal (slice distance {typical:.3f} mm; first gap of {distances[i]:.3f} mm between "
                f"{headers[i].name} and {headers[i + 1].name})",
                file=headers[i + 1].relative_path,
            )
        deviating = np.flatnonzero(np.abs(distances - typical) > spacing_tolerance * typical)
        if deviating.size:
            i = int(deviating[0])
            raise PatientExcluded(
                GEOMETRY_SPACING,
                f"patient {patient}: slice distances vary from {distances.min():.3f} to {distances.max():.3f} mm "
                f"(median {typical:.3f}, tolerance {spacing_tolerance:.0%}); first irregular distance "
                f"{distances[i]:.3f} mm between {headers[i].name} and {headers[i + 1].name}",
                file=headers[i + 1].relative_path,
            )
    else:  # a single slice has no measured distance
        z_spacing = first.slice_thickness or 1.0

    row_spacing, column_spacing = first.pixel_spacing
    direction = np.column_stack([row_dir, col_dir, normal])
    return SeriesGeometry(
        files=[h.path for h in headers],
        origin=tuple(float(v) for v in positions[0]),
        spacing=(float(column_spacing), float(row_spacing), z_spacing),
        direction=tuple(float(v) for v in direction.ravel()),
        size=(int(first.columns), int(first.rows), len(headers)),
        headers=headers,
        slice_positions=tuple(float(v) for v in along),
    )


def _check_one_stack(headers: list[DicomHeader], patient: str) -> None:
    """Frames of several volumes (time points, b-values, echoes, stacks) in one series cannot be stacked into one
    grid: exclude, naming the attributes that differ and their values."""
    labels = {header.stack for header in headers}
    if len(labels) <= 1:
        return
    keywords = dict.fromkeys(keyword for label in labels for keyword, _ in label)
    differing = []
    for keyword in keywords:
        values = sorted({dict(label).get(keyword, "none") for label in labels}, key=_numeric_first)
        if len(values) > 1:
            differing.append(f"{len(values)} values of {keyword}: {', '.join(values)}")
    first = headers[0]
    raise PatientExcluded(
        GEOMETRY_MIXED,
        f"patient {patient}: enhanced multi-frame {first.modality} with several volumes in one series "
        f"({'; '.join(differing)}) is not supported; select a series that holds one volume"
        + (", or one b-value with the channel's b_value" if "DiffusionBValue" in keywords else ""),
        file=first.relative_path,
    )


def _numeric_first(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=float)
    return vector / np.linalg.norm(vector)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# --------------------------------------------------------------------------- voxels


def output_pixel_type(headers: list[DicomHeader]) -> tuple[int, bool]:
    """(pixel type to read, whether the HU range must be checked while reading).

    HU are integers when every slope and intercept is integral: int16 when the stored bit range maps
    into int16; otherwise (e.g. signed 16-bit data with intercept -1024, which cannot fit in theory
    although real CT values do) int16 after checking the actual values. Else float32.
    """
    integral = all(_is_integral(h.rescale_slope) and _is_integral(h.rescale_intercept) for h in headers)
    if not integral:
        return sitk.sitkFloat32, False
    for header in headers:
        low, high = _stored_range(header)
        if low is None:
            return sitk.sitkInt16, True
        ends = (header.rescale_slope * low + header.rescale_intercept, header.rescale_slope * high + header.rescale_intercept)
        if min(ends) < INT16_MIN or max(ends) > INT16_MAX:
            return sitk.sitkInt16, True
    return sitk.sitkInt16, False


def _is_integral(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def _stored_range(header: DicomHeader) -> tuple[int | None, int | None]:
    if header.bits_stored is None or header.pixel_representation is None or not 1 <= header.bits_stored <= 32:
        return None, None
    if header.pixel_representation == 1:
        return -(2 ** (header.bits_stored - 1)), 2 ** (header.bits_stored - 1) - 1
    return 0, 2**header.bits_stored - 1


def read_series(geometry: SeriesGeometry, *, patient: str) -> sitk.Image:
    """The series in HU (rescale applied) as sitkInt16, or sitkFloat32 when HU are not integral or
    exceed int16; origin, spacing and direction are those that `check_geometry` measured."""
    pixel_type, check_range = output_pixel_type(geometry.headers)
    if any(h.frame_number is not None for h in geometry.headers):
        image = _read_frames(geometry, pixel_type, check_range, patient)
    else:
        image = _read_checked_int16(geometry, patient) if check_range else None
        if image is None:  # no check needed, or values beyond int16
            image = _read_files(geometry, geometry.headers, sitk.sitkFloat32 if check_range else pixel_type, patient)
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    return image


# Slab size for range-checked reading: int32 slabs of this many bytes on top of the int16 volume.
CHECK_SLAB_BYTES = 32 * 2**20


def _read_checked_int16(geometry: SeriesGeometry, patient: str) -> sitk.Image | None:
    """The series as int16 if all its HU fit, else None.

    Reading everything as int32 and casting would hold 3x the int16 volume; reading in int32 slabs
    into one int16 array keeps the peak near 2x (the array, and SimpleITK's copy of it).
    """
    columns, rows, n_slices = geometry.size
    per_slab = max(1, CHECK_SLAB_BYTES // (rows * columns * 4))
    volume = np.empty((n_slices, rows, columns), dtype=np.int16)
    low_high = sitk.MinimumMaximumImageFilter()
    for start in range(0, n_slices, per_slab):
        slab = _read_files(geometry, geometry.headers[start : start + per_slab], sitk.sitkInt32, patient)
        low_high.Execute(slab)
        if low_high.GetMinimum() < INT16_MIN or low_high.GetMaximum() > INT16_MAX:
            return None
        volume[start : start + slab.GetSize()[2]] = sitk.GetArrayViewFromImage(slab)
    image = sitk.GetImageFromArray(volume)
    del volume
    return image


def _read_files(geometry: SeriesGeometry, headers: list[DicomHeader], pixel_type: int, patient: str) -> sitk.Image:
    """ImageSeriesReader on `headers`' files (in this order), converting to `pixel_type` inside the
    reader so that no second full-size buffer is made."""
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(h.path) for h in headers])
    reader.SetOutputPixelType(pixel_type)
    try:
        image = reader.Execute()
    except RuntimeError:
        bad = _find_undecodable_file(headers)
        raise PatientExcluded(
            PIXEL_DATA_ERROR,
            f"patient {patient}: pixel data cannot be decoded" + (f" in {bad}" if bad else " (series read failed)"),
            file=bad,
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PatientExcluded(PIXEL_DATA_ERROR, f"patient {patient}: image has "
                              f"{image.GetNumberOfComponentsPerPixel()} components per pixel, not grey values",
                              file=headers[0].relative_path)
    if image.GetDimension() == 2:  # a one-file read comes back as a 2D image
        image = sitk.JoinSeries(image)
    expected = (geometry.size[0], geometry.size[1], len(headers))
    if tuple(image.GetSize()) != expected:
        raise PatientExcluded(PIXEL_DATA_ERROR, f"patient {patient}: decoded size {image.GetSize()} differs from "
                              f"the headers' {expected}", file=headers[0].relative_path)
    return image


def _read_frames(geometry: SeriesGeometry, pixel_type: int, check_range: bool, patient: str) -> sitk.Image:
    """A series holding frames of enhanced multi-frame files, decoded by pydicom (GDCM's series reader takes one
    slice per file) and rescaled as GDCM rescales single-frame files: stored * slope + intercept in float64, then
    int16 or float32; int16 with a range check turns float32 as soon as one value does not fit."""
    columns, rows, n_slices = geometry.size
    volume = np.empty((n_slices, rows, columns), dtype=np.float32 if pixel_type == sitk.sitkFloat32 else np.int16)
    for index, header, stored in _decoded_slices(geometry.headers, patient):
        values = stored.astype(np.float64) * header.rescale_slope + header.rescale_intercept
        if check_range and volume.dtype == np.int16 and (values.min() < INT16_MIN or values.max() > INT16_MAX):
            volume = volume.astype(np.float32)
        volume[index] = values
    return sitk.GetImageFromArray(volume)


def _decoded_slices(headers: list[DicomHeader], patient: str):
    """(index in `headers`, header, stored values) of every slice, decoding each file once and frame by frame."""
    by_file: dict[Path, list[int]] = {}
    for index, header in enumerate(headers):
        by_file.setdefault(header.path, []).append(index)
    for indices in by_file.values():
        first = headers[indices[0]]
        try:
            if first.frame_number is None:
                arrays = [pydicom.dcmread(first.path, force=True).pixel_array]
            else:
                indices = sorted(indices, key=lambda i: headers[i].frame_number)
                arrays = iter_pixels(first.path, indices=[headers[i].frame_number - 1 for i in indices])
            for index, stored in zip(indices, arrays, strict=True):
                if stored.shape != (first.rows, first.columns):
                    raise PatientExcluded(PIXEL_DATA_ERROR, f"patient {patient}: {headers[index].name} decodes to shape "
                                          f"{stored.shape}, not {first.rows}x{first.columns} grey values", file=first.relative_path)
                yield index, headers[index], stored
        except PatientExcluded:
            raise
        except Exception as error:  # decoders raise many types
            raise PatientExcluded(PIXEL_DATA_ERROR, _undecodable(first, patient, error), file=first.relative_path) from None


def _undecodable(header: DicomHeader, patient: str, error: Exception) -> str:
    """Why pydicom cannot decode `header`'s file: a transfer syntax without an installed decoder, or damaged data."""
    syntax = pydicom.dcmread(header.path, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID")
    needed = _missing_decoder(syntax) if syntax is not None else None
    if needed is not None:
        kind = "image" if header.frame_number is None else f"enhanced multi-frame {header.modality}"
        return (f"patient {patient}: {kind} with transfer syntax {syntax.name} is not supported: no installed pydicom "
                f"decoder plugin reads it ({needed}) ({header.relative_path})")
    return f"patient {patient}: pixel data of {header.relative_path} cannot be decoded ({type(error).__name__})"


def _missing_decoder(syntax: pydicom.uid.UID) -> str | None:
    """None when pydicom can decode `syntax`, else what it would need (its plugins' missing packages)."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # a transfer syntax that pydicom does not know
        return "none exists"
    return None if decoder.is_available else "; ".join(decoder.missing_dependencies) or "none installed"


def _find_undecodable_file(headers: list[DicomHeader]) -> str | None:
    """The first file whose pixel data GDCM cannot decode (only called after a failed read)."""
    for header in headers:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(header.path))
        try:
            reader.Execute()
        except RuntimeError:
            return header.relative_path
    return None
