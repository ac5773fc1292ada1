"""DICOM SEG and label-map files as mask sources: each written the way other tools deliver it (highdicom writes the
SEG, pynrrd the 3D Slicer .seg.nrrd, SimpleITK the plain label maps) and read back voxel-equal to the mask it
was made from, on the CT grid that the ingestion stage reads."""

from __future__ import annotations

import numpy as np
import nrrd
import pytest
import SimpleITK as sitk

from dicom_factory import assert_excluded, write_ct_series, write_seg
from radstudy import errors
from radstudy.errors import PatientExcluded
from radstudy.images import grid_differences
from radstudy.ingest import dicomio, masks

PATIENT = "RS-0042"
N_SLICES, ROWS, COLUMNS = 8, 10, 12
ORIGIN_XY, PIXEL_SPACING, SLICE_SPACING = (-10.0, -20.0), (0.8, 0.7), 2.0  # PixelSpacing: rows, columns


@pytest.fixture
def ct(tmp_path):
    """A CT series, its image as the ingestion stage reads it, and a label mask on it: 1 'Liver' on slices 1-6,
    2 'Tumor 1' on slices 3-4 only."""
    rng = np.random.default_rng(0)
    uids = write_ct_series(tmp_path / "ct", rng.integers(0, 200, (N_SLICES, ROWS, COLUMNS)).astype(np.int16),
                           origin_xy=ORIGIN_XY, pixel_spacing=PIXEL_SPACING)
    headers, _ = dicomio.scan_folder(tmp_path / "ct")
    series = dicomio.select_series(dicomio.group_series(headers), {"min_slices": 1}, patient=PATIENT)
    reference = dicomio.read_series(dicomio.check_geometry(series, patient=PATIENT), patient=PATIENT)
    labels = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=np.uint8)
    labels[1:7, 2:8, 1:10] = 1
    labels[3:5, 4:6, 3:6] = 2
    return uids, reference, labels


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def assert_on_grid(region: sitk.Image, reference: sitk.Image, expected: np.ndarray) -> None:
    assert region.GetPixelID() == sitk.sitkUInt8
    assert region.GetSize() == reference.GetSize()
    assert region.GetOrigin() == reference.GetOrigin() and region.GetSpacing() == reference.GetSpacing()
    assert region.GetDirection() == reference.GetDirection()
    assert expected.any()
    np.testing.assert_array_equal(array(region), expected.astype(np.uint8))  # Dice 1.0


def excluded(reason: str, call, *args, **kwargs) -> PatientExcluded:
    return assert_excluded(reason, PATIENT, call, *args, **kwargs)


# --------------------------------------------------------------------------- DICOM SEG


@pytest.mark.parametrize("segmentation_type", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_seg_segments_are_voxel_equal_to_the_mask(ct, tmp_path, segmentation_type):
    """Binary, fractional (thresholded at half the maximum) and label-map SEGs; Tumor 1 spans two slices only."""
    uids, reference, labels = ct
    liver, tumour = (labels >= 1), (labels == 2)
    if segmentation_type == "FRACTIONAL":  # 0.3 stays out, 0.6 and 1.0 count
        liver = np.where(liver, 0.6, 0.0) + np.where(labels == 0, 0.3, 0.0)
        tumour = tumour * 1.0
    if segmentation_type == "LABELMAP":  # one value per voxel: the segments may not overlap
        liver = labels == 1
    path = write_seg(tmp_path / "seg.dcm", uids, {"Liver": liver, "Tumor 1": tumour},
                     segmentation_type=segmentation_type)

    source = masks.read_seg(path, patient=PATIENT, file="seg/seg.dcm")

    assert (source.kind, source.file, source.names) == ("seg", "seg/seg.dcm", ["Liver", "Tumor 1"])
    assert source.referenced_series_uid == uids.series_uid
    assert source.frame_of_reference_uid == uids.frame_of_reference_uid
    assert source.segmentation.segmentation_type.value == segmentation_type
    assert_on_grid(source.region("Liver", reference, patient=PATIENT), reference, liver >= 0.5)
    assert_on_grid(source.region("tumor 1", reference, patient=PATIENT), reference, labels == 2)


def test_seg_on_some_frames_is_zero_elsewhere(ct, tmp_path):
    uids, reference, labels = ct
    kept = [3, 4, 5]
    path = write_seg(tmp_path / "seg.dcm", uids, {"Tumor": labels[kept] >= 1}, slices=kept)

    region = masks.read_seg(path, patient=PATIENT).region("Tumor", reference, patient=PATIENT)

    expected = np.zeros_like(labels)
    expected[kept] = labels[kept] >= 1
    assert_on_grid(region, reference, expected)


def ct_affine(row_offset=0, column_offset=0, slice_offset=0.0) -> np.ndarray:
    """highdicom's affine of the CT grid ((slice, row, column) index -> patient mm), shifted by whole pixels
    in-plane and by `slice_offset` mm along the slices."""
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, SLICE_SPACING)
    affine[:3, 1] = (0.0, PIXEL_SPACING[0], 0.0)
    affine[:3, 2] = (PIXEL_SPACING[1], 0.0, 0.0)
    affine[:3, 3] = (ORIGIN_XY[0] + column_offset * PIXEL_SPACING[1], ORIGIN_XY[1] + row_offset * PIXEL_SPACING[0],
                     slice_offset)
    return affine


def test_seg_cropped_in_plane_is_placed_voxel_for_voxel(ct, tmp_path):
    """A SEG on a crop of the CT's grid (3 rows and 1 column in): frames copied at their offset, no interpolation."""
    uids, reference, labels = ct
    crop = (labels >= 1)[:, 2:8, 1:10]
    path = write_seg(tmp_path / "seg.dcm", uids, {"Liver": crop}, affine=ct_affine(row_offset=2, column_offset=1))

    region = masks.read_seg(path, patient=PATIENT).region("Liver", reference, patient=PATIENT)

    assert_on_grid(region, reference, labels >= 1)


def test_seg_on_a_coarser_grid_is_resampled_by_nearest_neighbour(ct, tmp_path):
    """Another grid in the CT's frame of reference: the same voxels as SimpleITK's nearest-neighbour resampling
    of the mask on its own grid."""
    uids, reference, _ = ct
    spacing_xyz, origin = (1.5, 1.7, 3.0), (ORIGIN_XY[0] + 0.35, ORIGIN_XY[1] + 0.45, 1.1)
    coarse = np.zeros((4, 5, 5), dtype=np.uint8)  # (slices, rows, columns)
    coarse[1:3, 1:4, 1:3] = 1
    coarse[2, 3, 3] = 1
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = (0, 0, spacing_xyz[2]), (0, spacing_xyz[1], 0), (spacing_xyz[0], 0, 0)
    affine[:3, 3] = origin
    path = write_seg(tmp_path / "seg.dcm", uids, {"Liver": coarse}, affine=affine)
    own_grid = sitk.GetImageFromArray(coarse)
    own_grid.SetSpacing(spacing_xyz)
    own_grid.SetOrigin(origin)
    expected = sitk.Resample(own_grid, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    region = masks.read_seg(path, patient=PATIENT).region("Liver", reference, patient=PATIENT)

    assert_on_grid(region, reference, array(expected))
    assert array(region).sum() > coarse.sum()  # finer grid: each coarse voxel covers several

    affine[:3, 3] = (ORIGIN_XY[0] - 1.2, *origin[1:])  # column 0 lies left of the image, column 1 on it
    coarse[2, 2, 0] = 1
    beyond = write_seg(tmp_path / "beyond.dcm", uids, {"Liver": coarse}, affine=affine)
    error = excluded(errors.MASK_UNREADABLE, masks.read_seg(beyond, patient=PATIENT).region,
                     "Liver", reference, patient=PATIENT)
    assert "1 voxel(s) of the segment lie outside the image" in error.message


def test_seg_frame_between_image_slices_is_an_error(ct, tmp_path):
    uids, reference, labels = ct
    path = write_seg(tmp_path / "seg.dcm", uids, {"Liver": labels >= 1}, affine=ct_affine(slice_offset=1.0))

    error = excluded(errors.MASK_UNREADABLE, masks.read_seg(path, patient=PATIENT, file="x/seg.dcm").region,
                     "Liver", reference, patient=PATIENT)

    assert error.file == "x/seg.dcm" and "'Liver'" in error.message and "does not lie on an image slice" in error.message


def test_seg_voxels_outside_the_image_are_an_error(ct, tmp_path):
    uids, reference, labels = ct
    path = write_seg(tmp_path / "seg.dcm", uids, {"Liver": labels >= 1}, affine=ct_affine(column_offset=5))

    error = excluded(errors.MASK_UNREADABLE, masks.read_seg(path, patient=PATIENT).region,
                     "Liver", reference, patient=PATIENT)

    assert "outside the image" in error.message


def test_seg_segment_named_twice_or_missing_is_an_error(ct, tmp_path):
    uids, reference, labels = ct
    path = write_seg(tmp_path / "seg.dcm", uids, {"GTV": labels == 2, "GTV ": labels == 1})
    source = masks.read_seg(path, patient=PATIENT, file="seg.dcm")

    twice = excluded(errors.MASK_UNREADABLE, source.region, "GTV", reference, patient=PATIENT)
    missing = excluded(errors.MASK_UNREADABLE, source.region, "Liver", reference, patient=PATIENT)

    assert "'GTV' occurs 2 times in the DICOM SEG" in twice.message and twice.file == "seg.dcm"
    assert "'Liver' is not in the DICOM SEG" in missing.message


def test_damaged_seg_is_unreadable_naming_the_file(ct, tmp_path):
    uids, reference, labels = ct
    good = write_seg(tmp_path / "seg.dcm", uids, {"Liver": labels >= 1})
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) - 200])
    not_dicom = tmp_path / "noise.dcm"
    not_dicom.write_bytes(b"not a DICOM file at all" * 10)

    for path in (truncated, not_dicom, uids.files[0]):  # a CT slice is no SEG either
        def read_and_place(path=path):
            masks.read_seg(path, patient=PATIENT, file=f"p/{path.name}").region("Liver", reference, patient=PATIENT)

        error = excluded(errors.MASK_UNREADABLE, read_and_place)
        assert error.file == f"p/{path.name}"


def test_is_seg_recognises_seg_headers(ct, tmp_path):
    uids, _, labels = ct
    write_seg(tmp_path / "masks" / "seg.dcm", uids, {"Liver": labels >= 1})
    headers, _ = dicomio.scan_folder(tmp_path)

    assert sorted(masks.is_seg(h) for h in headers) == [False] * N_SLICES + [True]


# --------------------------------------------------------------------------- label-map files


def write_slicer_nrrd(path, layers: np.ndarray, segments: list[tuple[str, int, int]]):
    """A 3D Slicer segmentation file: `layers` (layers, slices, rows, columns) on the CT grid, with Slicer's
    Segment<i>_Name / _LabelValue / _Layer header fields; one layer is written as a 3D NRRD, as Slicer does."""
    header = {"space": "left-posterior-superior", "space origin": [ORIGIN_XY[0], ORIGIN_XY[1], 0.0],
              "Segmentation_MasterRepresentation": "Binary labelmap"}
    directions = [[PIXEL_SPACING[1], 0, 0], [0, PIXEL_SPACING[0], 0], [0, 0, SLICE_SPACING]]
    data = np.transpose(layers, (0, 3, 2, 1))  # pynrrd writes Fortran order: (layer, x, y, z)
    if len(layers) == 1:
        data, header["kinds"], header["space directions"] = data[0], ["domain"] * 3, directions
    else:
        header["kinds"], header["space directions"] = ["list"] + ["domain"] * 3, [[np.nan] * 3] + directions
    for i, (name, value, layer) in enumerate(segments):
        header.update({f"Segment{i}_ID": f"Segment_{i + 1}", f"Segment{i}_Name": name,
                       f"Segment{i}_LabelValue": str(value), f"Segment{i}_Layer": str(layer)})
    nrrd.write(str(path), np.ascontiguousarray(data), header)
    return path


def test_slicer_seg_nrrd_regions_by_segment_name(ct, tmp_path):
    _, reference, labels = ct
    path = write_slicer_nrrd(tmp_path / "Segmentation.seg.nrrd", labels[None], [("Liver", 1, 0), ("Tumor 1", 2, 0)])

    source = masks.read_label_file(path, patient=PATIENT, file="Segmentation.seg.nrrd")

    assert (source.kind, source.names) == ("label_map", ["Liver", "Tumor 1"])
    assert_on_grid(source.region("Liver", reference, patient=PATIENT), reference, labels == 1)
    assert_on_grid(source.region("Tumor 1", reference, patient=PATIENT), reference, labels == 2)


def test_slicer_seg_nrrd_with_overlapping_layers(ct, tmp_path):
    """Overlapping segments: Slicer writes one label layer per component of a 4D NRRD."""
    _, reference, labels = ct
    layers = np.stack([(labels >= 1) * 1, (labels == 2) * 3]).astype(np.uint8)  # Tumor 1 inside Liver
    path = write_slicer_nrrd(tmp_path / "s.seg.nrrd", layers, [("Liver", 1, 0), ("Tumor 1", 3, 1)])

    source = masks.read_label_file(path, patient=PATIENT)

    assert source.names == ["Liver", "Tumor 1"]
    assert_on_grid(source.region("Liver", reference, patient=PATIENT), reference, labels >= 1)
    assert_on_grid(source.region("Tumor 1", reference, patient=PATIENT), reference, labels == 2)


def test_slicer_seg_nrrd_on_another_grid_or_bad_header_is_an_error(ct, tmp_path):
    _, reference, labels = ct
    # one slice more than the CT: no crop of its grid (a crop is placed back: tests/ingest/test_patient.py)
    larger = np.concatenate([labels, labels[-1:]])
    cropped = write_slicer_nrrd(tmp_path / "c.seg.nrrd", larger[None], [("Liver", 1, 0)])
    bad_layer = write_slicer_nrrd(tmp_path / "b.seg.nrrd", labels[None], [("Liver", 1, 2)])
    empty = write_slicer_nrrd(tmp_path / "e.seg.nrrd", labels[None], [("Liver", 1, 0), ("Spleen", 7, 0)])

    grid = excluded(errors.MASK_GRID_MISMATCH, masks.read_label_file(cropped, patient=PATIENT, file="c.seg.nrrd")
                    .region, "Liver", reference, patient=PATIENT)
    layer = excluded(errors.MASK_UNREADABLE, masks.read_label_file, bad_layer, patient=PATIENT, file="b.seg.nrrd")
    nothing = excluded(errors.MASK_UNREADABLE, masks.read_label_file(empty, patient=PATIENT).region,
                       "Spleen", reference, patient=PATIENT)

    assert grid.file == "c.seg.nrrd" and "size" in grid.message
    assert layer.file == "b.seg.nrrd" and "'Liver'" in layer.message and "layer '2'" in layer.message
    assert "'Spleen' (label value 7" in nothing.message


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_plain_label_map_names_nothing_and_keeps_its_values(ct, tmp_path, suffix):
    _, reference, labels = ct
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / f"mask{suffix}"))

    source = masks.read_label_file(tmp_path / f"mask{suffix}", patient=PATIENT)

    assert (source.kind, source.names, source.file) == ("label_map", [], f"mask{suffix}")
    assert source.image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(array(source.image), labels)
    assert not grid_differences(source.image, reference, 1e-4)


def test_multi_component_image_without_segments_is_not_a_label_map(tmp_path):
    image = sitk.Compose(*[sitk.Image(4, 4, 4, sitk.sitkUInt8)] * 2)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))

    error = excluded(errors.MASK_UNREADABLE, masks.read_label_file, tmp_path / "rgb.nrrd", patient=PATIENT)

    assert "2 component(s), not a 3D label image" in error.message and error.file == "rgb.nrrd"
