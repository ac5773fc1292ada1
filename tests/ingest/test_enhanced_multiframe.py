"""Enhanced multi-frame CT and MR (one file, geometry in the functional groups): read as the same data delivered as
single-frame slices, with the same geometry checks, and every variant that cannot be read excluded by name."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydicom.uid import HTJ2KLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from dicom_factory import (AXIAL, assert_excluded, compress_frames, write_ct_series, write_enhanced,
                           write_legacy_enhanced)
from radstudy import errors
from radstudy.config import load_study
from radstudy.errors import PatientExcluded
from radstudy.ingest import dicomio
from radstudy.ingest.patient import image_file, ingest_patient
from radstudy.ingest.pseudonym import assign_pseudonyms

REPO = Path(__file__).resolve().parents[2]

PATIENT = "RS-0042"
N_SLICES, ROWS, COLUMNS = 12, 8, 6
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(0.3)), float(np.sin(0.3)))


def volume(n_slices=N_SLICES, seed=0):
    return np.random.default_rng(seed).integers(-100, 1500, size=(n_slices, ROWS, COLUMNS)).astype(np.int16)


def load(folder, selector=None) -> dicomio.SeriesGeometry:
    """scan -> group -> select -> geometry, as the ingestion stage chains them."""
    headers, _ = dicomio.scan_folder(folder)
    series = dicomio.select_series(dicomio.group_series(headers), selector or {}, patient=PATIENT)
    return dicomio.check_geometry(series, patient=PATIENT)


def read(folder, selector=None) -> tuple[dicomio.SeriesGeometry, sitk.Image]:
    geometry = load(folder, selector)
    return geometry, dicomio.read_series(geometry, patient=PATIENT)


def excluded(reason: str, call, *args, **kwargs) -> PatientExcluded:
    return assert_excluded(reason, PATIENT, call, *args, **kwargs)


def assert_same_image(ours: sitk.Image, theirs: sitk.Image):
    assert ours.GetPixelID() == theirs.GetPixelID()
    assert ours.GetSize() == theirs.GetSize()
    assert ours.GetOrigin() == theirs.GetOrigin()
    assert ours.GetSpacing() == theirs.GetSpacing()
    assert ours.GetDirection() == theirs.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))


def single_frame(tmp_path, data=None, **kwargs):
    """The plain delivery: one file per slice, descending z (scanners write either way)."""
    kwargs.setdefault("z_positions", [40.0 - 2.5 * i for i in range(N_SLICES)])
    return write_ct_series(tmp_path / "single", volume() if data is None else data, **kwargs)


# --------------------------------------------------------------------------- voxel-equal to single frames


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_legacy_converted_enhanced_equals_single_frame_series(tmp_path, modality):
    uids = single_frame(tmp_path, modality=modality, intercept=-1024 if modality == "CT" else 0)
    path = write_legacy_enhanced(tmp_path / "enhanced" / "legacy.dcm", uids, modality=modality)
    assert pydicom.dcmread(path).SOPClassUID in dicomio.ENHANCED_SOP_CLASSES

    plain_geometry, plain = read(tmp_path / "single", {"modality": modality})
    geometry, image = read(tmp_path / "enhanced", {"modality": modality})

    assert_same_image(image, plain)
    assert geometry.slice_positions == plain_geometry.slice_positions
    assert [h.frame_number for h in geometry.headers] == list(range(N_SLICES, 0, -1))  # frames in file order, z descending
    assert len(geometry.files) == N_SLICES and set(geometry.files) == {path}
    assert {h.convolution_kernel for h in geometry.headers} == {"STANDARD"}  # kept by the converter among unassigned attributes


@pytest.mark.parametrize(("slope", "intercept", "pixel_type"), [(1.0, -1024.0, sitk.sitkInt16), (0.3, -1000.25, sitk.sitkFloat32)])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_with_shuffled_frames_oblique_and_per_frame_rescale_equals_single_frames(
    tmp_path, modality, slope, intercept, pixel_type
):
    uids = single_frame(tmp_path, orientation=OBLIQUE, slope=slope, intercept=intercept, modality=modality)
    order = list(np.random.default_rng(3).permutation(N_SLICES))
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, modality=modality, frames=order,
                   per_frame_groups=("PlanePositionSequence", "PixelValueTransformationSequence"))

    _, plain = read(tmp_path / "single", {"modality": modality})
    geometry, image = read(tmp_path / "enhanced", {"modality": modality})

    assert image.GetPixelID() == pixel_type
    assert_same_image(image, plain)
    assert geometry.direction == pytest.approx((1, 0, 0, 0, OBLIQUE[4], -OBLIQUE[5], 0, OBLIQUE[5], OBLIQUE[4]))
    assert {h.convolution_kernel for h in geometry.headers} == {"STANDARD" if modality == "CT" else ""}  # MR: none


def test_per_frame_rescale_of_each_frame_is_applied(tmp_path):
    uids = single_frame(tmp_path)
    for i, path in enumerate(uids.files):  # scanners may rescale each slice differently
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept, ds.RescaleSlope = -1024 + 10 * i, 1 + i % 3
        ds.save_as(path)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, per_frame_groups=("PlanePositionSequence", "PixelValueTransformationSequence"))
    geometry, image = read(tmp_path / "enhanced")
    _, plain = read(tmp_path / "single")
    assert len({(h.rescale_slope, h.rescale_intercept) for h in geometry.headers}) == N_SLICES
    assert_same_image(image, plain)


def test_enhanced_values_beyond_int16_turn_float32_as_single_frames_do(tmp_path):
    data = volume()
    data[3, 0, 0] = -32000  # -33024 HU does not fit int16
    uids = single_frame(tmp_path, data)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids)
    _, plain = read(tmp_path / "single")
    _, image = read(tmp_path / "enhanced")
    assert image.GetPixelID() == sitk.sitkFloat32
    assert_same_image(image, plain)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1])
def test_compressed_enhanced_ct_equals_single_frames(tmp_path, syntax):
    uids = single_frame(tmp_path)
    if syntax in (JPEG2000Lossless, JPEGLosslessSV1):  # pydicom has no encoder for these here
        path = compress_frames(write_enhanced(tmp_path / "enhanced" / "e.dcm", uids), syntax)
    else:
        path = write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, transfer_syntax=syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    _, plain = read(tmp_path / "single")
    _, image = read(tmp_path / "enhanced")
    assert_same_image(image, plain)


def test_enhanced_file_beside_single_frame_series_is_one_more_series(tmp_path):
    uids = single_frame(tmp_path, series_number=2)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, frames=range(10))
    headers, bad = dicomio.scan_folder(tmp_path)
    series = dicomio.group_series(headers)
    by_slices = {s.n_slices: s for s in series}
    assert bad == [] and sorted(by_slices) == [10, N_SLICES]
    assert "10 slices" in by_slices[10].summary()
    assert dicomio.select_series(series, {}, patient=PATIENT).uid == uids.series_uid  # most slices


# --------------------------------------------------------------------------- geometry checks name the frame


def test_missing_frame_is_a_gap_naming_its_position(tmp_path):
    uids = single_frame(tmp_path)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, frames=[i for i in range(N_SLICES) if i != 5])
    error = excluded(errors.GEOMETRY_GAP, load, tmp_path / "enhanced")
    assert "missing slice(s) at 27.50 mm" in error.message  # z = 40 - 2.5 * 5, as for single frames
    assert "e.dcm frame 6 and e.dcm frame 5" in error.message and error.file == "e.dcm"


def test_frame_with_another_orientation_is_named(tmp_path):
    orientations = [AXIAL] * N_SLICES
    orientations[4] = (1.0, 0.0, 0.0, 0.0, 0.995, 0.0998)
    uids = single_frame(tmp_path, orientations=orientations)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, per_frame_groups=("PlanePositionSequence", "PlaneOrientationSequence"))
    error = excluded(errors.GEOMETRY_ORIENTATION, load, tmp_path / "enhanced")
    assert "of e.dcm frame 5 differs" in error.message


@pytest.mark.parametrize(("frame_content", "dimensions", "named"), [
    ([{"MRDiffusionSequence": {"DiffusionBValue": b}} for b in [0] * N_SLICES + [1000] * N_SLICES], (),
     "2 values of DiffusionBValue: 0.0, 1000.0"),
    ([{"TemporalPositionSequence": {"TemporalPositionTimeOffset": t}} for t in [0.0] * N_SLICES + [30.5] * N_SLICES],
     (("TemporalPositionSequence", "TemporalPositionTimeOffset"),), "2 values of TemporalPositionTimeOffset: 0.0, 30.5"),
    ([{"FrameContentSequence": {"StackID": s}} for s in ["1"] * N_SLICES + ["2"] * N_SLICES], (),
     "2 values of StackID: 1, 2"),
])
def test_several_volumes_in_one_file_are_excluded_naming_what_differs(tmp_path, frame_content, dimensions, named):
    uids = single_frame(tmp_path, modality="MR", intercept=0)
    write_enhanced(tmp_path / "enhanced" / "dwi.dcm", uids, modality="MR", frames=list(range(N_SLICES)) * 2,
                   frame_content=frame_content, dimensions=dimensions)
    error = excluded(errors.GEOMETRY_MIXED, load, tmp_path / "enhanced", {"modality": "MR"})
    assert f"enhanced multi-frame MR with several volumes in one series ({named}) is not supported" in error.message
    assert error.file == "dwi.dcm"


def test_enhanced_without_plane_position_is_unreadable_naming_it(tmp_path):
    uids = single_frame(tmp_path)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, omit=("PlanePositionSequence",))
    headers, bad = dicomio.scan_folder(tmp_path / "enhanced")
    assert headers == []
    assert bad == [("e.dcm", "enhanced multi-frame CT without PlanePositionSequence > ImagePositionPatient "
                             f"(frame 1 of {N_SLICES}) is not supported")]


@pytest.mark.parametrize(("group", "named"), [
    ("PlaneOrientationSequence", "PlaneOrientationSequence > ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelMeasuresSequence > PixelSpacing"),
])
def test_enhanced_without_orientation_or_pixel_measures_is_excluded_naming_it(tmp_path, group, named):
    uids = single_frame(tmp_path)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids, omit=(group,))
    error = excluded(errors.GEOMETRY_MIXED, load, tmp_path / "enhanced")
    assert f"e.dcm frame 1 lacks {named}" in error.message


def test_transfer_syntax_without_decoder_is_excluded_naming_it(tmp_path):
    """HTJ2K: no decoder plugin of pydicom is installed for it (JPEG 2000 frames relabelled: decoding is never tried)."""
    assert not pydicom.pixels.get_decoder(HTJ2KLossless).is_available
    uids = single_frame(tmp_path)
    path = compress_frames(write_enhanced(tmp_path / "enhanced" / "e.dcm", uids), JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(path, enforce_file_format=True)
    error = excluded(errors.PIXEL_DATA_ERROR, dicomio.read_series, load(tmp_path / "enhanced"), patient=PATIENT)
    assert "enhanced multi-frame CT with transfer syntax High-Throughput JPEG 2000" in error.message
    assert "is not supported" in error.message and "pylibjpeg" in error.message and error.file == "e.dcm"


def test_other_multi_frame_images_are_excluded_naming_their_sop_class(tmp_path):
    uids = single_frame(tmp_path)
    path = write_enhanced(tmp_path / "enhanced" / "e.dcm", uids)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame secondary capture
    ds.save_as(path)
    error = excluded(errors.GEOMETRY_MIXED, load, tmp_path / "enhanced", {"min_slices": 1})
    assert f"multi-frame image ({N_SLICES} frames, Multi-frame Grayscale Word Secondary Capture Image Storage)" in error.message


def test_scanning_reads_functional_groups_only_of_enhanced_files(tmp_path):
    uids = single_frame(tmp_path)
    write_enhanced(tmp_path / "enhanced" / "e.dcm", uids)
    headers, _ = dicomio.scan_folder(tmp_path)
    single = [h for h in headers if h.frame_number is None]
    frames = [h for h in headers if h.frame_number is not None]
    assert len(single) == len(frames) == N_SLICES
    assert {h.number_of_frames for h in frames} == {N_SLICES}
    by_position = {h.position: h for h in single}
    for frame in frames:  # each frame carries the geometry and rescale of the slice it came from
        twin = by_position[frame.position]
        assert (frame.orientation, frame.pixel_spacing, frame.rescale_slope, frame.rescale_intercept, frame.slice_thickness) == (
            twin.orientation, twin.pixel_spacing, twin.rescale_slope, twin.rescale_intercept, twin.slice_thickness)


# --------------------------------------------------------------------------- one patient, end to end


def _study(tmp_path: Path):
    """The project's config with this test's center: patients' folders under tmp_path/dicom."""
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["centers"] = "centers.tsv"
    config["pseudonymisation"]["key_file"] = "private/key.tsv"
    config["demo"]["enabled"] = False
    (tmp_path / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\nT\tdevelopment\tdicom\tclinical.csv\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    study = load_study(tmp_path / "config.yaml", base_dir=tmp_path)
    key = assign_pseudonyms(study.center("T"), study.key_file)
    return study, dict(zip(key["original_id"], key["pseudonym"]))


def test_patient_delivered_as_one_enhanced_file_is_ingested_as_its_single_frames(tmp_path):
    uids = write_ct_series(tmp_path / "dicom" / "PLAIN", volume(), description="ABD PV 3mm")
    write_enhanced(tmp_path / "dicom" / "ENHANCED" / "ct.dcm", uids, frames=np.random.default_rng(5).permutation(N_SLICES))
    write_enhanced(tmp_path / "dicom" / "NOPOSITION" / "ct.dcm", uids, omit=("PlanePositionSequence",))
    study, ids = _study(tmp_path)

    records = {name: ingest_patient(study, "T", ids[name], tmp_path / "out" / name) for name in ids}

    assert records["ENHANCED"]["status"] == records["PLAIN"]["status"] == "included", records
    assert records["ENHANCED"]["channels"] == records["PLAIN"]["channels"]
    assert_same_image(sitk.ReadImage(str(tmp_path / "out" / "ENHANCED" / image_file("CT"))),
                      sitk.ReadImage(str(tmp_path / "out" / "PLAIN" / image_file("CT"))))
    missing = records["NOPOSITION"]
    assert missing["status"] == "excluded" and missing["reason"] == errors.UNREADABLE_FILES and missing["file"] == "ct.dcm"
    assert "enhanced multi-frame CT without PlanePositionSequence" in missing["message"]
