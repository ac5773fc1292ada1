"""DICOM and mask reading: synthetic bad inputs, and the IBSI reference data where present."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import AXIAL, assert_excluded, write_ct_series, write_rtstruct
from radstudy import errors
from radstudy.ingest import dicomio
from radstudy.ingest import masks
from radstudy.errors import PatientExcluded

REFERENCE = Path(__file__).parents[2] / ".." / "shared" / "reference"
PATIENT = "RS-0042"
N_SLICES, ROWS, COLUMNS = 12, 8, 6


def volume(n_slices=N_SLICES, rows=ROWS, columns=COLUMNS, seed=0):
    return np.random.default_rng(seed).integers(-100, 1500, size=(n_slices, rows, columns)).astype(np.int16)


def load(folder: Path, selector=None):
    """scan -> group -> select -> geometry, as the ingestion stage chains them."""
    headers, bad = dicomio.scan_folder(folder)
    series = dicomio.select_series(dicomio.group_series(headers), selector or {}, patient=PATIENT)
    return dicomio.check_geometry(series, patient=PATIENT)


def excluded(reason: str, call, *args, **kwargs) -> PatientExcluded:
    return assert_excluded(reason, PATIENT, call, *args, **kwargs)


# --------------------------------------------------------------------------- scanning and selection


def test_scan_reports_non_dicom_and_skips_masks_and_dicomdir(tmp_path):
    write_ct_series(tmp_path / "a" / "b", volume(), file_names=[f"{i:x}" for i in range(N_SLICES)])  # no suffix
    (tmp_path / "notes.bin").write_bytes(b"just some bytes, not DICOM" * 20)
    (tmp_path / "a" / "empty").write_bytes(b"")
    (tmp_path / "a" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    (tmp_path / "mask.nii.gz").write_bytes(b"not read")
    (tmp_path / "DICOMDIR").write_bytes(b"not read")
    (tmp_path / ".DS_Store").write_bytes(b"not read")
    without_preamble = tmp_path / "a" / "b" / "0"
    without_preamble.write_bytes(without_preamble.read_bytes()[132:])  # old exports: no preamble, no "DICM"

    headers, bad = dicomio.scan_folder(tmp_path)

    assert len(headers) == N_SLICES
    assert dict(bad).keys() == {"notes.bin", "a/empty", "a/broken.dcm"}
    assert dict(bad)["notes.bin"] == "not a DICOM file"
    assert all(h.relative_path.startswith("a/b/") for h in headers)
    assert headers[0].patient_key == dicomio.patient_key("PAT-001") != "PAT-001"
    assert "PAT-001" not in repr(headers[0])


def test_scan_of_non_dicom_only_folder_returns_no_headers(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 ...")
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 200)
    headers, bad = dicomio.scan_folder(tmp_path)
    assert headers == []
    assert sorted(name for name, _ in bad) == ["image.jpg", "report.pdf"]


def test_default_selector_ignores_localizer_second_series_and_rtstruct(tmp_path):
    main = write_ct_series(tmp_path / "study" / "s2", volume(20), series_number=2)
    write_ct_series(tmp_path / "study" / "s3", volume(12), series_number=3, description="AXIAL LUNG")
    write_ct_series(
        tmp_path / "scout", volume(3), series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        orientation=(0, 1, 0, 0, 0, -1), description="SCOUT",
    )
    write_rtstruct(tmp_path / "rt" / "rs.dcm", main, {"GTV": [square(0, 0, 2, 8)]})

    series = dicomio.group_series(dicomio.scan_folder(tmp_path)[0])
    assert [s.modality for s in series].count("RTSTRUCT") == 1
    chosen = dicomio.select_series(series, {}, patient=PATIENT)
    assert chosen.uid == main.series_uid and chosen.n_slices == 20

    lung = dicomio.select_series(series, {"description": "lung"}, patient=PATIENT)
    assert lung.description == "AXIAL LUNG"
    first = dicomio.select_series(series, {"choose": "first", "min_slices": 1}, patient=PATIENT)
    assert first.series_number == 2  # the localizer (series 1) stays excluded by its ImageType
    excluded(errors.AMBIGUOUS_SERIES, dicomio.select_series, series, {"choose": "error"}, patient=PATIENT)


def test_localizer_files_inside_the_axial_series_are_dropped(tmp_path):
    uids = write_ct_series(tmp_path, volume(), series_number=2)
    write_ct_series(tmp_path / "scout", volume(2), series_uid=uids.series_uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    orientation=(0, 1, 0, 0, 0, -1), file_names=["L1", "L2"])
    geometry = load(tmp_path)
    assert geometry.size[2] == N_SLICES


def test_no_matching_series_lists_candidates(tmp_path):
    write_ct_series(tmp_path, volume(), description="AXIAL 2mm")
    write_ct_series(tmp_path / "pet", volume(), description="PET AC", modality="PT")
    error = excluded(errors.NO_MATCHING_SERIES, load, tmp_path, {"description": "arterial"})
    assert "'AXIAL 2mm'" in error.message and "12 slices" in error.message and "'PET AC'" in error.message


def test_too_few_slices_is_no_matching_series(tmp_path):
    write_ct_series(tmp_path, volume(5))
    excluded(errors.NO_MATCHING_SERIES, load, tmp_path)


def test_selector_typos_are_config_errors():
    with pytest.raises(errors.ConfigError):
        dicomio.validate_selector({"modalty": "CT"})
    with pytest.raises(errors.ConfigError):
        dicomio.validate_selector({"choose": "largest"})


# --------------------------------------------------------------------------- geometry and voxels


def test_shuffled_names_and_reversed_instance_numbers_sort_by_position(tmp_path):
    data = volume()
    rng = np.random.default_rng(1)
    names = [f"x{n}" for n in rng.permutation(N_SLICES)]
    write_ct_series(tmp_path, data, z_positions=[50.0 - 2.5 * i for i in range(N_SLICES)],  # descending z
                    instance_numbers=list(range(N_SLICES, 0, -1)), file_names=names)
    geometry = load(tmp_path)
    image = dicomio.read_series(geometry, patient=PATIENT)

    assert geometry.files == [tmp_path / names[i] for i in reversed(range(N_SLICES))]
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), data[::-1].astype(np.int32) - 1024)
    assert image.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))  # (columns, rows, measured), not SliceThickness
    assert image.GetOrigin() == pytest.approx((-10.0, -20.0, 50.0 - 2.5 * (N_SLICES - 1)))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_oblique_series_geometry_follows_the_normal(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)  # rotated about x; normal = (0, -s, c)
    write_ct_series(tmp_path, volume(), orientation=orientation, z_positions=[3.0 * i for i in range(N_SLICES)])
    geometry = load(tmp_path)
    assert geometry.spacing[2] == pytest.approx(3.0)
    assert geometry.direction == pytest.approx((1, 0, 0, 0, c, -s, 0, s, c))


def test_non_integral_rescale_gives_float32(tmp_path):
    data = volume()
    write_ct_series(tmp_path, data, slope=0.5, intercept=-1000.25)
    image = dicomio.read_series(load(tmp_path), patient=PATIENT)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), data * 0.5 - 1000.25)


def test_out_of_int16_theoretical_range_still_int16_when_values_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(dicomio, "CHECK_SLAB_BYTES", ROWS * COLUMNS * 4 * 5)  # read in slabs of 5 slices
    data = volume()  # signed 16-bit stored with intercept -1024 cannot fit in theory; these values do
    write_ct_series(tmp_path, data, intercept=-1024)
    geometry = load(tmp_path)
    assert dicomio.output_pixel_type(geometry.headers) == (sitk.sitkInt16, True)
    image = dicomio.read_series(geometry, patient=PATIENT)
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), data.astype(np.int32) - 1024)
    assert image.GetOrigin() == pytest.approx(geometry.origin) and image.GetSpacing() == pytest.approx(geometry.spacing)
    data[-1, 0, 0] = -32000  # -33024 HU does not fit int16 (in the last slab)
    shutil.rmtree(tmp_path)
    write_ct_series(tmp_path, data, intercept=-1024)
    image = dicomio.read_series(load(tmp_path), patient=PATIENT)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), data.astype(np.int32) - 1024)


def test_missing_slice_is_a_gap_naming_the_position(tmp_path):
    write_ct_series(tmp_path, volume(), z_positions=[2.0 * i for i in range(N_SLICES + 1) if i != 6])
    error = excluded(errors.GEOMETRY_GAP, load, tmp_path)
    assert "12.00" in error.message and error.file is not None


def test_inconsistent_spacing(tmp_path):
    z = [2.0 * i for i in range(N_SLICES)]
    z[7:] = [v + 0.5 for v in z[7:]]
    write_ct_series(tmp_path, volume(), z_positions=z)
    excluded(errors.GEOMETRY_SPACING, load, tmp_path)


def test_mixed_orientation(tmp_path):
    orientations = [AXIAL] * N_SLICES
    orientations[4] = (1.0, 0.0, 0.0, 0.0, 0.995, 0.0998)
    uids = write_ct_series(tmp_path, volume(), orientations=orientations)
    error = excluded(errors.GEOMETRY_ORIENTATION, load, tmp_path)
    assert error.file == uids.files[4].name


def test_duplicate_positions_from_two_series_sharing_a_uid(tmp_path):
    first = write_ct_series(tmp_path / "one", volume())
    write_ct_series(tmp_path / "two", volume(seed=1), series_uid=first.series_uid)
    error = excluded(errors.GEOMETRY_MIXED, load, tmp_path)
    assert "same position" in error.message


def test_different_matrix_sizes_are_mixed(tmp_path):
    first = write_ct_series(tmp_path / "one", volume())
    write_ct_series(tmp_path / "two", volume(2, rows=10), series_uid=first.series_uid, z_positions=[30.0, 32.0])
    excluded(errors.GEOMETRY_MIXED, load, tmp_path)


def test_gantry_tilt(tmp_path):
    positions = [(-10.0, -20.0 + 0.5 * i, 2.0 * i) for i in range(N_SLICES)]  # y drifts with z
    write_ct_series(tmp_path, volume(), positions=positions)
    excluded(errors.GEOMETRY_TILT, load, tmp_path)


def test_corrupt_pixel_data_names_the_file(tmp_path):
    uids = write_ct_series(tmp_path, volume())
    broken = uids.files[5]
    broken.write_bytes(broken.read_bytes()[:-40])  # truncated pixel data; the header still reads
    geometry = load(tmp_path)
    error = excluded(errors.PIXEL_DATA_ERROR, dicomio.read_series, geometry, patient=PATIENT)
    assert error.file == broken.name


# --------------------------------------------------------------------------- masks


def square(x0, y0, side, z):
    return np.array([(x0, y0, z), (x0 + side, y0, z), (x0 + side, y0 + side, z), (x0, y0 + side, z)], dtype=float)


@pytest.fixture
def ct_with_image(tmp_path):
    """A 12 x 20 x 20 CT with 1 mm pixels at origin (0, 0, 0) and 2 mm slices."""
    uids = write_ct_series(tmp_path / "ct", volume(rows=20, columns=20), origin_xy=(0.0, 0.0), pixel_spacing=(1.0, 1.0))
    return uids, dicomio.read_series(load(tmp_path / "ct"), patient=PATIENT)


def test_rasterise_fills_voxel_centres_and_xors_holes(tmp_path, ct_with_image):
    uids, image = ct_with_image
    outer, hole = square(1.5, 1.5, 10, 4.0), square(4.5, 4.5, 4, 4.0)  # 10x10 centres minus 4x4 hole
    path = write_rtstruct(tmp_path / "rs.dcm", uids, {"GTV": [outer, hole, square(1.5, 1.5, 3, 6.0)], "Body": [square(0, 0, 19, 0.0)]})
    rtstruct = masks.read_rtstruct(path, patient=PATIENT)
    assert rtstruct.roi_names == ["GTV", "Body"]
    assert rtstruct.frame_of_reference_uid == uids.frame_of_reference_uid
    assert rtstruct.referenced_series_uid == uids.series_uid

    mask = masks.rasterise_roi(rtstruct, "GTV", image, patient=PATIENT)
    values = sitk.GetArrayViewFromImage(mask)
    assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSize() == image.GetSize()
    assert values[2].sum() == 100 - 16 and values[2, 5:9, 5:9].sum() == 0 and values[2, 2, 2] == 1
    assert values[3].sum() == 9 and values.sum() == 100 - 16 + 9
    # A contour through voxel centres keeps them (boundary counts as inside).
    body = sitk.GetArrayFromImage(masks.rasterise_roi(rtstruct, "body", image, patient=PATIENT))
    assert body[0].sum() == 400


def test_rasterise_on_an_oblique_grid(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)
    uids = write_ct_series(tmp_path / "ct", volume(rows=16, columns=16), orientation=(c, s, 0.0, -s, c, 0.0),
                           origin_xy=(5.0, -3.0), pixel_spacing=(0.9, 1.1), z_positions=[3.0 * i for i in range(N_SLICES)])
    image = dicomio.read_series(load(tmp_path / "ct"), patient=PATIENT)
    # A rectangle through the centres (x 3..9, y 4..12) of slice 5, written in patient coordinates.
    corners = [(3, 4, 5), (9, 4, 5), (9, 12, 5), (3, 12, 5)]
    contour = np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in corners])
    rtstruct = masks.read_rtstruct(write_rtstruct(tmp_path / "rs.dcm", uids, {"GTV": [contour]}))
    mask = sitk.GetArrayFromImage(masks.rasterise_roi(rtstruct, "GTV", image, patient=PATIENT))
    expected = np.zeros_like(mask)
    expected[5, 4:13, 3:10] = 1
    np.testing.assert_array_equal(mask, expected)


def test_contour_outside_the_image(tmp_path, ct_with_image):
    uids, image = ct_with_image
    path = write_rtstruct(tmp_path / "rs.dcm", uids, {"GTV": [square(2, 2, 5, 8.0), square(2, 2, 5, 80.0)]})
    rtstruct = masks.read_rtstruct(path, patient=PATIENT)
    error = excluded(errors.MASK_UNREADABLE, masks.rasterise_roi, rtstruct, "GTV", image, patient=PATIENT)
    assert "'GTV'" in error.message and "outside" in error.message and error.file == "rs.dcm"
    path = write_rtstruct(tmp_path / "rs2.dcm", uids, {"GTV": [square(40, 2, 5, 8.0)]})  # beside the image in-plane
    excluded(errors.MASK_UNREADABLE, masks.rasterise_roi, masks.read_rtstruct(path), "GTV", image, patient=PATIENT)


def test_contour_not_in_one_slice_and_unknown_roi(tmp_path, ct_with_image):
    uids, image = ct_with_image
    tilted = square(2, 2, 5, 8.0)
    tilted[2:, 2] += 3.0
    rtstruct = masks.read_rtstruct(write_rtstruct(tmp_path / "rs.dcm", uids, {"GTV": [tilted]}))
    error = excluded(errors.MASK_UNREADABLE, masks.rasterise_roi, rtstruct, "GTV", image, patient=PATIENT)
    assert "one image slice" in error.message
    error = excluded(errors.MASK_UNREADABLE, masks.rasterise_roi, rtstruct, "CTV", image, patient=PATIENT)
    assert "'GTV'" in error.message


def test_unreadable_rtstruct(tmp_path):
    (tmp_path / "rs.dcm").write_bytes(b"garbage")
    with pytest.raises(PatientExcluded) as info:
        masks.read_rtstruct(tmp_path / "rs.dcm", patient=PATIENT, file="rt/rs.dcm")
    assert info.value.reason == errors.MASK_UNREADABLE and info.value.file == "rt/rs.dcm"


def test_label_mask_on_another_grid(tmp_path, ct_with_image):
    _, image = ct_with_image
    other = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    other.CopyInformation(image)
    other.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(other, str(tmp_path / "mask.nii.gz"))
    mask = masks.read_label_mask(tmp_path / "mask.nii.gz", patient=PATIENT)
    error = excluded(errors.MASK_GRID_MISMATCH, masks.check_same_grid, mask, image, patient=PATIENT, file="mask.nii.gz")
    assert "spacing (1.0000, 1.0000, 2.5000)" in error.message and error.file == "mask.nii.gz"

    same = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    same.CopyInformation(image)
    sitk.WriteImage(same + 1.0, str(tmp_path / "same.nrrd"))
    mask = masks.read_label_mask(tmp_path / "same.nrrd", patient=PATIENT)
    assert mask.GetPixelID() == sitk.sitkUInt8
    masks.check_same_grid(mask, image, patient=PATIENT, file="same.nrrd")


def test_label_mask_with_fractional_values(tmp_path, ct_with_image):
    _, image = ct_with_image
    soft = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 0.5
    sitk.WriteImage(soft, str(tmp_path / "soft.nii.gz"))
    excluded(errors.MASK_UNREADABLE, masks.read_label_mask, tmp_path / "soft.nii.gz", patient=PATIENT)


def test_polygon_interior_matches_skimage_on_simple_polygons():
    from skimage.draw import polygon

    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(3, 30))
        x, y = (rng.integers(-3, 25, n) / 2.0, rng.integers(-3, 25, n) / 2.0) if trial % 2 else rng.uniform(-3, 22, (2, n))
        angle = np.arctan2(y - y.mean() - 0.0567, x - x.mean() - 0.1234)
        if len(np.unique(angle)) < n:
            continue
        order = np.argsort(angle)  # star-shaped around the mean: a simple polygon
        x, y = x[order], y[order]
        expected = np.zeros((20, 20), bool)
        expected[polygon(y, x, (20, 20))] = True
        ours = np.zeros((20, 20), bool)
        first, block = masks.polygon_interior(x, y, 20, 20)
        ours[first : first + len(block)] = block
        np.testing.assert_array_equal(ours, expected, err_msg=f"trial {trial}")


# --------------------------------------------------------------------------- reference data

REFERENCE_CASES = {
    "STS_001": ("dicom/STS_001/CT/image", "dicom/STS_001/CT/mask", "dicom/STS_001/nifti/CT_image.nii.gz",
                "dicom/STS_001/nifti/CT_mask.nii.gz", "GTV_Mass_CT"),
    "ibsi_ct_phantom": ("ibsi/ct_phantom_PAT1/dicom/image", "ibsi/ct_phantom_PAT1/dicom/mask",
                        "ibsi/ct_phantom_PAT1/nifti/image/phantom.nii.gz", "ibsi/ct_phantom_PAT1/nifti/mask/mask.nii.gz", "GTV-1"),
}


@pytest.fixture(params=sorted(REFERENCE_CASES), scope="module")
def reference_case(request):
    image_dir, mask_dir, image_nifti, mask_nifti, roi = REFERENCE_CASES[request.param]
    if not (REFERENCE / image_dir).is_dir():
        pytest.skip(f"reference data absent: {REFERENCE / image_dir}")
    folder = (REFERENCE / image_dir).parent
    headers, bad = dicomio.scan_folder(folder)
    series = dicomio.group_series(headers)
    geometry = dicomio.check_geometry(dicomio.select_series(series, {}, patient=PATIENT), patient=PATIENT)
    image = dicomio.read_series(geometry, patient=PATIENT)
    rtstruct_file = next(s for s in series if s.modality == "RTSTRUCT").headers[0]
    rtstruct = masks.read_rtstruct(rtstruct_file.path, patient=PATIENT, file=rtstruct_file.relative_path)
    return {
        "bad": bad,
        "headers": headers,
        "image": image,
        "mask": masks.rasterise_roi(rtstruct, roi, image, patient=PATIENT),
        "rtstruct": rtstruct,
        "reference_image": sitk.ReadImage(str(REFERENCE / image_nifti)),
        "reference_mask": masks.read_label_mask(REFERENCE / mask_nifti),
        "frame_of_reference": geometry.headers[0].frame_of_reference_uid,
    }


def test_reference_image_equals_ibsi_nifti(reference_case):
    image, reference = reference_case["image"], reference_case["reference_image"]
    assert reference_case["bad"] == []
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4, rtol=0)
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4, rtol=0)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6, rtol=0)
    ours = sitk.GetArrayViewFromImage(image)
    theirs = sitk.GetArrayViewFromImage(reference)
    assert np.array_equal(ours.astype(theirs.dtype), theirs)


def test_reference_rtstruct_mask_matches_ibsi_mask(reference_case):
    mask, reference = reference_case["mask"], reference_case["reference_mask"]
    masks.check_same_grid(reference, reference_case["image"], patient=PATIENT, file="reference mask")
    ours = sitk.GetArrayViewFromImage(mask).astype(bool)
    theirs = sitk.GetArrayViewFromImage(reference).astype(bool)
    dice = 2 * np.count_nonzero(ours & theirs) / (np.count_nonzero(ours) + np.count_nonzero(theirs))
    print(f"voxels ours {np.count_nonzero(ours)}, reference {np.count_nonzero(theirs)}, Dice {dice:.5f}")
    assert dice >= 0.99
    assert reference_case["rtstruct"].frame_of_reference_uid == reference_case["frame_of_reference"]
