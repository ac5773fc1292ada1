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


# --------------------------------------------------------------------------- enhanced multi-frame images
# The slices of a single-frame series (write_ct_series) as one enhanced multi-frame file, so that tests compare the
# two deliveries of the same data.

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_legacy_enhanced(path: Path, series: SeriesUIDs, *, modality: str = "CT") -> Path:
    """A Legacy Converted Enhanced CT or MR file, converted by highdicom from the single-frame files of `series`."""
    import highdicom as hd
    import pydicom

    datasets = [pydicom.dcmread(f) for f in series.files]
    if modality == "MR":
        for ds in datasets:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
            ds.Modality = "MR"
    converter = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage, "MR": hd.legacy.LegacyConvertedEnhancedMRImage}[modality]
    enhanced = converter(datasets, series_instance_uid=generate_uid(), series_number=datasets[0].SeriesNumber,
                         sop_instance_uid=generate_uid(), instance_number=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(path)
    return path


def write_enhanced(
    path: Path,
    series: SeriesUIDs,
    *,
    modality: str = "CT",
    frames=None,
    per_frame_groups=("PlanePositionSequence",),
    omit=(),
    frame_content=None,
    dimensions=(),
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """An Enhanced CT or MR Image file (written with pydicom) holding the slices of the single-frame `series` as frames.

    frames: indices into series.files, in frame order (default: all, in file order).
    per_frame_groups: functional groups written per frame; the others (plane orientation, pixel measures, pixel
        value transformation) are shared, taken from the first frame's file.
    omit: functional groups left out, for files that lack them.
    frame_content: one {functional group: {attribute: value}} per frame, written per frame (b-values...).
    dimensions: (functional group, attribute) pairs declared in DimensionIndexSequence after the plane position.
    """
    import pydicom
    from pydicom.datadict import tag_for_keyword

    sources = [pydicom.dcmread(series.files[i]) for i in (range(len(series.files)) if frames is None else frames)]
    first = sources[0]
    sop_class = {"CT": ENHANCED_CT_IMAGE_STORAGE, "MR": ENHANCED_MR_IMAGE_STORAGE}[modality]
    ds = _base_dataset(sop_class, str(first.PatientID), series.study_uid, modality)
    ds.SeriesInstanceUID = generate_uid()  # a new series, as converters and scanners make
    for keyword in ("PatientName", "FrameOfReferenceUID", "SeriesDescription", "SeriesNumber",
                    "Manufacturer", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, first.data_element(keyword).value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(sources)
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization = generate_uid()
    ds.DimensionIndexSequence = Sequence()
    for group, keyword in (("PlanePositionSequence", "ImagePositionPatient"), *dimensions):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = organization
        dimension.DimensionIndexPointer = tag_for_keyword(keyword)
        dimension.FunctionalGroupPointer = tag_for_keyword(group)
        ds.DimensionIndexSequence.append(dimension)

    shared = Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for number, source in enumerate(sources, start=1):
        item = Dataset()
        extra = frame_content[number - 1] if frame_content else {}
        groups = _frame_groups(source, modality)
        groups["FrameContentSequence"] = {"StackID": "1", "InStackPositionNumber": number, "DimensionIndexValues": number}
        for group, values in extra.items():
            groups.setdefault(group, {}).update(values)
        for group, values in groups.items():
            if group in omit:
                continue
            if group in per_frame_groups or group == "FrameContentSequence" or group in extra:
                setattr(item, group, Sequence([_dataset(values)]))
            elif number == 1:
                setattr(shared, group, Sequence([_dataset(values)]))
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.PixelData = b"".join(source.PixelData for source in sources)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _frame_groups(source: Dataset, modality: str) -> dict[str, dict]:
    """The functional groups of one single-frame file's geometry and rescale, as {group: {attribute: value}}."""
    return {
        "PlanePositionSequence": {"ImagePositionPatient": source.ImagePositionPatient},
        "PlaneOrientationSequence": {"ImageOrientationPatient": source.ImageOrientationPatient},
        "PixelMeasuresSequence": {"PixelSpacing": source.PixelSpacing, "SliceThickness": source.SliceThickness},
        "PixelValueTransformationSequence": {"RescaleSlope": source.RescaleSlope, "RescaleIntercept": source.RescaleIntercept,
                                             "RescaleType": "HU" if modality == "CT" else "US"},
        f"{modality}ImageFrameTypeSequence": {"FrameType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]},
        **({"CTReconstructionSequence": {"ConvolutionKernel": source.ConvolutionKernel}} if modality == "CT" else {}),
    }


def _dataset(values: dict) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_seg(
    path: Path,
    image: SeriesUIDs,
    segments: dict[str, np.ndarray],
    *,
    segmentation_type: str = "BINARY",
    slices=None,
    affine=None,
) -> Path:
    """A DICOM SEG written by highdicom on the CT series `image`: one segment per entry of `segments` (name ->
    (slices, rows, columns) array of 0/1, or of fractions in 0..1 for a FRACTIONAL `segmentation_type`; LABELMAP
    segments must not overlap), numbered from 1 in order. By default the arrays lie on the CT's grid; `slices` keeps only those CT slices (the arrays then hold just
    them), and `affine` (highdicom's 4x4 from (slice, row, column) index to patient mm) puts them on another
    grid in the CT's frame of reference. Empty frames are omitted, as highdicom does by default."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(file) for file in image.files]
    for ds in sources:  # attributes the SEG copies (type 2) that the synthetic CT leaves out
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                        "StudyID", "AccessionNumber"):
            if keyword not in ds:
                setattr(ds, keyword, "")
    if slices is not None:
        sources = [sources[i] for i in slices]
    stacked = np.stack([np.asarray(mask) for mask in segments.values()], axis=-1)
    stacked = stacked.astype(np.float32 if segmentation_type == "FRACTIONAL" else np.uint8)
    pixels = stacked if affine is None else hd.Volume(
        stacked, affine, coordinate_system="PATIENT", frame_of_reference_uid=image.frame_of_reference_uid,
        channels={"SegmentNumber": list(range(1, len(segments) + 1))})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, name in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        sources, pixels, segmentation_type, descriptions,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="TESTCO", manufacturer_model_name="factory", software_versions="1", device_serial_number="1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def compress_frames(path: Path, transfer_syntax: str) -> Path:
    """Re-encode the frames of an uncompressed file in place with imagecodecs, for transfer syntaxes that pydicom
    cannot encode: JPEG 2000 lossless (OpenJPEG) and JPEG Lossless SV1 (libjpeg-turbo)."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    encode = {
        JPEG2000Lossless: lambda frame: imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K"),
        # the sample precision must be BitsStored: imagecodecs' default writes 12-bit precision for uint16 frames
        JPEGLosslessSV1: lambda frame: imagecodecs.jpeg8_encode(frame.view(np.uint16), lossless=True, predictor=1,
                                                                bitspersample=int(ds.BitsStored)),
    }[transfer_syntax]
    ds.PixelData = encapsulate([encode(frame) for frame in frames])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_excluded(reason: str, named: str, call, /, *args, **kwargs):
    """The PatientExcluded that `call(*args, **kwargs)` raises: with `reason`, its message naming `named` (the
    patient)."""
    import pytest

    from radstudy.errors import PatientExcluded

    with pytest.raises(PatientExcluded) as info:
        call(*args, **kwargs)
    assert info.value.reason == reason, info.value
    assert named in info.value.message
    return info.value


# --------------------------------------------------------------------------- MR series
# Single-frame MR as scanners deliver it: MR Image Storage, sequence tags, and the diffusion b-value in the standard
# tag or in one vendor's private tag.

# vendor -> (Manufacturer, private group, private creator, element offset, VR)
MR_PRIVATE_B_VALUE = {
    "siemens": ("SIEMENS", 0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
    "ge": ("GE MEDICAL SYSTEMS", 0x0043, "GEMS_PARM_01", 0x39, "IS"),
    "philips": ("Philips Medical Systems", 0x2001, "Philips Imaging DD 001", 0x03, "FL"),
}


def write_mr_series(
    folder: Path,
    volume: np.ndarray,
    *,
    description: str = "t2_tse_tra",
    image_type=("ORIGINAL", "PRIMARY", "M", "NORM"),
    echo_time: float | None = 90.0,
    repetition_time: float | None = 4000.0,
    scanning_sequence: str | None = "SE",
    sequence_name: str | None = "*tse2d1_15",
    b_value: float | None = None,
    b_value_tag: str = "standard",
    manufacturer: str | None = None,
    private_creator: str | None = None,
    private_raw: bool = False,
    ge_bias: bool = False,
    file_prefix: str = "MR",
    **series_kwargs,
) -> SeriesUIDs:
    """An MR series (MR Image Storage, one file per slice of `volume`) written by `write_ct_series` and turned into MR.

    b_value is written where `b_value_tag` says: "standard" (DiffusionBValue (0018,9087)), or the private tag of
    "siemens" (0019,100C IS), "ge" (0043,1039 IS, first of four values; `ge_bias` adds 1e9 as multi-b-value GE
    sequences do) or "philips" (2001,1003 FL). `manufacturer` defaults to that vendor's (TESTCO for "standard");
    `private_creator` overrides the vendor's creator (a foreign block; "" writes the element (gggg,10xx) without any
    creator, as exports that drop creators do); `private_raw` writes the private value as VR UN bytes, as an export
    that lost the VR does (pydicom restores the VR when it knows the creator's dictionary). Other keywords go to `write_ct_series` (series_uid, positions,
    z_positions, series_number, file_names...): files of one series with several b-values are written by calling this
    again with the same series_uid and other file names.
    """
    import pydicom

    n_slices = len(volume)
    series_kwargs.setdefault("file_names", [f"{file_prefix}{i:04d}.dcm" for i in range(n_slices)])
    series_kwargs.setdefault("intercept", 0.0)
    uids = write_ct_series(folder, volume, description=description, image_type=image_type, modality="MR", **series_kwargs)
    vendor = MR_PRIVATE_B_VALUE.get(b_value_tag)
    for path in uids.files:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        del ds.ConvolutionKernel
        ds.Manufacturer = manufacturer or (vendor[0] if vendor else "TESTCO")
        ds.MagneticFieldStrength = "3"
        for keyword, value in (("EchoTime", echo_time), ("RepetitionTime", repetition_time)):
            if value is not None:
                setattr(ds, keyword, _ds(value))
        if scanning_sequence is not None:
            ds.ScanningSequence = scanning_sequence.split("\\")
        if sequence_name is not None:
            ds.SequenceName = sequence_name
        if b_value is not None:
            if vendor is None:
                ds.DiffusionBValue = float(b_value)
            else:
                _, group, creator, offset, vr = vendor
                if private_creator == "":
                    block = None
                else:
                    block = ds.private_block(group, private_creator or creator, create=True)
                if vr == "FL":
                    value = float(b_value)
                    raw = np.float32(value).tobytes()
                else:
                    first = str(int(b_value) + (1_000_000_000 if ge_bias and b_value_tag == "ge" else 0))
                    value = [first, "8", "0", "0"] if b_value_tag == "ge" else first
                    raw = ("\\".join(value) if isinstance(value, list) else value).encode("ascii")
                    raw += b" " * (len(raw) % 2)
                if block is None:
                    ds.add_new((group, 0x1000 | offset), "UN" if private_raw else vr, raw if private_raw else value)
                elif private_raw:
                    block.add_new(offset, "UN", raw)
                else:
                    block.add_new(offset, vr, value)
        ds.save_as(path, enforce_file_format=True)
    return uids
