"""radstudy.networks.crops: the networks' inputs on synthetic volumes (a liver, label 1, holding a spherical tumour,
label 2; a CT and an MR-like channel) whose crops are known by hand: shape and channel order, centring, CT window
before the z-score, fields of view, the mask channel, the 2D slice, patients left out, and the per-center files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from radstudy.errors import FEATURE_EXTRACTION, ConfigError, PatientExcluded
from radstudy.features import deep
from radstudy.networks import crops
from radstudy.networks.stage import read_center_inputs

LABELS = {"liver": 1, "tumour": 2}
MODALITIES = {"portal": "CT", "t2": "MR"}
SHAPE = (64, 64, 64)  # z y x
# A sphere centred between voxels: its box has an even number of voxels on every axis, so with 1 mm voxels and
# spacing 1 mm the crop grid falls on image voxels and the crop is a slice of the array (known by hand):
# box z 26..35, y 29..38, x 24..33 -> 32-voxel crop starting at z 15, y 18, x 13.
CENTRE = (30.5, 33.5, 28.5)
RADIUS = 5.0
ON_GRID = (slice(15, 47), slice(18, 50), slice(13, 45))


def _volumes(centre=CENTRE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (HU), MR-like intensities and the label map (z y x), deterministic texture."""
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    liver = ((z - 32) / 26) ** 2 + ((y - 32) / 28) ** 2 + ((x - 30) / 26) ** 2 <= 1
    tumour = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= RADIUS ** 2
    labels = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.uint8)
    texture = 20 * np.sin(z / 3) * np.cos(y / 4) + 5 * np.sin(x / 2)
    ct = np.where(labels == 2, 120.0, np.where(labels == 1, 60.0, -1000.0)) + texture
    mr = np.where(labels == 2, 800.0, np.where(labels == 1, 400.0, 30.0)) + 3 * texture + x
    return ct.astype(np.float32), mr.astype(np.float32), labels


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)  # x y z
    image.SetOrigin((-20.0, 10.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


def _patient(folder: Path, ct=None, mr=None, labels=None, spacing=(1.0, 1.0, 1.0)) -> tuple[dict, Path]:
    """Images (portal, t2) and mask files of one patient; arrays default to `_volumes()`."""
    default = _volumes()
    ct, mr, labels = (default[0] if ct is None else ct, default[1] if mr is None else mr,
                      default[2] if labels is None else labels)
    folder.mkdir(parents=True, exist_ok=True)
    images = {"portal": _write(ct, folder / "portal.nii.gz", spacing), "t2": _write(mr, folder / "t2.nii.gz", spacing)}
    return images, _write(labels, folder / "mask.nii.gz", spacing)


def _cfg(**overrides) -> dict:
    return {"crop_size": [32, 32, 32], "spacing": 1.0, "margin_mm": 10, **overrides}


def _input(images, mask, cfg=None, **kwargs):
    return crops.patient_input(images, mask, patient="P001", labels=LABELS, cfg=cfg or _cfg(),
                               modalities=MODALITIES, **kwargs)


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


# ============================================================================ shape, channels, centring
def test_shape_and_channel_order_follow_the_config(tmp_path):
    images, mask = _patient(tmp_path)
    x, info = _input(images, mask)
    assert x.shape == (2, 32, 32, 32) and x.dtype == np.float32
    assert info["spacing_mm"] == (1.0, 1.0, 1.0) and info["slice"] is None
    swapped, _ = _input(images, mask, _cfg(channels=["t2", "portal"]))
    np.testing.assert_array_equal(swapped, x[::-1])
    only, _ = _input(images, mask, _cfg(channels=["t2"]))
    np.testing.assert_array_equal(only, x[1:])
    assert crops.channel_names(images, crops.settings("networks", _cfg(mask_channel=True))) == \
        ["portal", "t2", "tumour_mask"]


def test_the_crop_is_centred_on_the_region_on_an_anisotropic_image(tmp_path):
    # 2.5 mm slices, 0.8 mm pixels; the tumour off the image's centre; spacing null: the box + margin fitted
    ct, mr, labels = _volumes(centre=(27.0, 40.0, 22.0))
    images, mask = _patient(tmp_path, ct, mr, labels, spacing=(0.8, 0.8, 2.5))
    x, info = _input(images, mask, _cfg(spacing=None, mask_channel=True))
    # box: z 11 slices (27.5 mm), y and x 11 pixels (8.8 mm); + 2 x 10 mm -> 47.5 mm in 32 voxels
    assert info["spacing_mm"] == pytest.approx((47.5 / 32,) * 3)
    centre = np.array(ndimage.center_of_mass(x[2]))
    np.testing.assert_allclose(centre, [15.5] * 3, atol=1.0)
    assert x[2].sum() > 0 and not x[2][[0, -1]].any()  # the whole region inside the crop, margins empty


def test_config_errors_name_the_key(tmp_path):
    images, mask = _patient(tmp_path)
    with pytest.raises(ConfigError, match="'lesion' is not one of the labels"):
        _input(images, mask, _cfg(region="lesion"))
    with pytest.raises(ConfigError, match="no modality for channel 't2'"):
        crops.patient_input(images, mask, patient="P001", labels=LABELS, cfg=_cfg(), modalities={"portal": "CT"})


# ============================================================================ intensities
def test_channels_are_the_known_crop_windowed_for_ct_and_z_scored(tmp_path):
    ct, mr, _ = _volumes()
    images, mask = _patient(tmp_path, ct, mr)
    x, _ = _input(images, mask, _cfg(window=[-200, 300]))
    np.testing.assert_allclose(x[0], _zscore(np.clip(ct[ON_GRID], -200, 300)), atol=1e-4)
    np.testing.assert_allclose(x[1], _zscore(mr[ON_GRID]), atol=1e-4)  # MR: no window
    for channel in x:
        assert channel.mean() == pytest.approx(0.0, abs=1e-5) and channel.std() == pytest.approx(1.0, abs=1e-5)


def test_ct_window_is_applied_before_resampling_and_z_scoring(tmp_path):
    # an anisotropic image, spacing null: the crop grid falls between image voxels (interpolation)
    ct, mr, labels = _volumes()
    bright, brighter = ct.copy(), ct.copy()
    spot = (slice(29, 32), slice(32, 35), slice(27, 30))  # inside the tumour, hence in the crop
    bright[spot], brighter[spot] = 400.0, 5000.0  # both above the window's 300 HU
    cfg = _cfg(spacing=None)
    spacing = (0.7, 0.7, 1.5)
    x_bright, info = _input(*_patient(tmp_path / "a", bright, mr, labels, spacing), cfg)
    x_brighter, _ = _input(*_patient(tmp_path / "b", brighter, mr, labels, spacing), cfg)
    assert info["spacing_mm"][0] not in (0.7, 1.5)
    np.testing.assert_array_equal(x_bright[0], x_brighter[0])
    # the same images read as MR are not clipped: the outlier changes every z-score
    as_mr = {"portal": "MR", "t2": "MR"}
    y_bright, _ = crops.patient_input(*_patient(tmp_path / "a", bright, mr, labels, spacing), patient="P001",
                                      labels=LABELS, cfg=cfg, modalities=as_mr)
    y_brighter, _ = crops.patient_input(*_patient(tmp_path / "b", brighter, mr, labels, spacing), patient="P001",
                                        labels=LABELS, cfg=cfg, modalities=as_mr)
    assert np.abs(y_bright[0] - y_brighter[0]).max() > 0.1


def test_a_constant_crop_gives_zeros_not_nan(tmp_path):
    ct, mr, labels = _volumes()
    x, _ = _input(*_patient(tmp_path, ct, np.full_like(mr, 7.0), labels))
    assert np.isfinite(x).all() and not x[1].any()


# ============================================================================ field of view
def test_voxels_outside_the_field_of_view_are_zero_and_counted(tmp_path):
    ct, mr, labels = _volumes()
    fov = np.zeros(SHAPE, np.uint8)
    fov[:40] = 1  # the MR channel covers z < 40: crop slices 15..39 inside, 40..46 outside (7 of 32)
    outside_a, outside_b = mr.copy(), mr.copy()
    outside_a[40:], outside_b[40:] = 0.0, 9999.0  # whatever the scanner wrote there
    fov_file = _write(fov, tmp_path / "fov_t2.nii.gz")
    x, info = _input(*_patient(tmp_path / "a", ct, outside_a, labels), fovs={"t2": fov_file})
    y, _ = _input(*_patient(tmp_path / "b", ct, outside_b, labels), fovs={"t2": fov_file})
    np.testing.assert_array_equal(x, y)
    assert info["outside_fov"] == {"portal": 0.0, "t2": pytest.approx(7 / 32)}
    assert info["outside_region"] == {"portal": 0.0, "t2": 0.0}
    assert not x[1, 25:].any()
    np.testing.assert_allclose(x[1, :25], _zscore(mr[15:40, ON_GRID[1], ON_GRID[2]]), atol=1e-4)


def test_a_region_mostly_outside_the_field_of_view_leaves_the_patient_out(tmp_path):
    fov = np.zeros(SHAPE, np.uint8)
    fov[:29] = 1  # 3 of the tumour's 10 slices
    fov_file = _write(fov, tmp_path / "fov_t2.nii.gz")
    with pytest.raises(PatientExcluded) as caught:
        _input(*_patient(tmp_path), fovs={"t2": fov_file})
    assert caught.value.reason == FEATURE_EXTRACTION
    assert "P001" in caught.value.message and "'t2'" in caught.value.message and str(fov_file) in caught.value.message


# ============================================================================ mask channel, 2D
def test_the_mask_channel_is_the_region_on_the_crop_grid(tmp_path):
    _, _, labels = _volumes()
    x, _ = _input(*_patient(tmp_path), _cfg(mask_channel=True))
    assert x.shape == (3, 32, 32, 32)
    np.testing.assert_array_equal(x[2], (labels[ON_GRID] == 2).astype(np.float32))


def test_dims_2_takes_the_largest_axial_slice(tmp_path):
    ct, mr, labels = _volumes()
    labels[33, 24:44, 20:40] = 2  # a 20 x 20 voxel extension on slice 33: the largest slice by far
    images, mask = _patient(tmp_path, ct, mr, labels)
    x, info = _input(images, mask, _cfg(dims=2, mask_channel=True))
    assert x.shape == (3, 32, 32) and info["slice"] == 33
    # the slice's box y 24..43 (incl. the sphere's 29..38), x 20..39: centred, its crop starts at y 18, x 14
    window = (33, slice(18, 50), slice(14, 46))
    np.testing.assert_array_equal(x[2], (labels[window] == 2).astype(np.float32))
    np.testing.assert_allclose(x[0], _zscore(np.clip(ct[window], -200, 300)), atol=1e-4)
    np.testing.assert_allclose(x[1], _zscore(mr[window]), atol=1e-4)


# ============================================================================ patients left out
def test_an_empty_region_leaves_the_patient_out_naming_patient_region_and_file(tmp_path):
    _, _, labels = _volumes()
    images, mask = _patient(tmp_path, labels=np.where(labels == 2, 1, labels).astype(np.uint8))
    with pytest.raises(PatientExcluded) as caught:
        _input(images, mask)
    assert caught.value.reason == FEATURE_EXTRACTION
    for word in ("P001", "'tumour'", str(mask)):
        assert word in caught.value.message


def test_a_center_lists_every_patient_left_out_and_logs_each(tmp_path, caplog):
    _, _, labels = _volumes()
    good = _patient(tmp_path / "P001")
    empty = _patient(tmp_path / "P002", labels=np.where(labels == 2, 1, labels).astype(np.uint8))
    broken = _patient(tmp_path / "P003")
    broken[0]["t2"].write_bytes(b"not an image")
    items = [("P001", *good, None), ("P002", *empty, None), ("P003", *broken, {})]
    with caplog.at_level(logging.INFO, logger="radstudy.networks.crops"):
        issues = crops.write_center_inputs(items, tmp_path / "center.npz", labels=LABELS, cfg=_cfg(),
                                           modalities=MODALITIES)
    assert list(issues.columns) == crops.ISSUE_COLUMNS
    assert issues["patient"].tolist() == ["P002", "P003"]
    assert (issues["reason"] == FEATURE_EXTRACTION).all() and (issues["region"] == "tumour").all()
    message = issues["message"].tolist()
    assert "P002" in message[0] and "'tumour'" in message[0] and str(empty[1]) in message[0]
    assert "P003" in message[1] and "'t2'" in message[1] and issues["file"][1] == str(broken[0]["t2"])
    patients, inputs, _ = read_center_inputs([tmp_path / "center.npz"])
    assert patients == ["P001"] and inputs.shape == (1, 2, 32, 32, 32)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith(("P001:", "P002:", "P003:")) for line in lines) == 3
    assert "center.npz: 1 patient(s) with an input (0 with a manual mask), 2 left out" in lines[-1]


# ============================================================================ per-center files
def _center(tmp_path: Path, name: str, centres: dict[str, tuple], cfg: dict) -> tuple[Path, list]:
    items = []
    for patient, centre in centres.items():
        ct, mr, labels = _volumes(centre)
        images, mask = _patient(tmp_path / name / patient, ct, mr, labels)
        items.append((patient, images, mask, None))
    out = tmp_path / f"{name}.npz"
    issues = crops.write_center_inputs(items, out, labels=LABELS, cfg=cfg, modalities=MODALITIES)
    assert issues.empty
    return out, items


def test_two_centers_round_trip_to_the_patient_inputs(tmp_path):
    cfg = _cfg(spacing=None, mask_channel=True)
    a, items_a = _center(tmp_path, "A", {"A01": CENTRE, "A02": (34.0, 30.0, 31.0)}, cfg)
    b, items_b = _center(tmp_path, "B", {"B01": (29.0, 35.5, 30.0)}, cfg)
    patients, inputs, channels = read_center_inputs([a, b])
    assert patients == ["A01", "A02", "B01"] and channels == ["portal", "t2", "tumour_mask"]
    assert inputs.dtype == np.float32 and inputs.shape == (3, 3, 32, 32, 32)
    for row, (patient, images, mask, _) in enumerate(items_a + items_b):
        expected, _ = crops.patient_input(images, mask, patient=patient, labels=LABELS, cfg=cfg,
                                          modalities=MODALITIES)
        np.testing.assert_allclose(inputs[row], expected, rtol=1e-3, atol=1e-3)  # float16 storage
    with np.load(a) as stored:
        assert stored["inputs"].dtype == np.float16
        np.testing.assert_allclose(stored["spacing_mm"][1], crops.patient_input(
            *items_a[1][1:3], patient="A02", labels=LABELS, cfg=cfg, modalities=MODALITIES)[1]["spacing_mm"])
        assert stored["slice"].tolist() == [-1, -1] and int(stored["dims"]) == 3


def test_centers_with_different_channels_cannot_be_read_together(tmp_path):
    a, _ = _center(tmp_path, "A", {"A01": CENTRE}, _cfg())
    b, _ = _center(tmp_path, "B", {"B01": CENTRE}, _cfg(channels=["t2", "portal"]))
    with pytest.raises(ValueError) as caught:
        read_center_inputs([a, b])
    assert str(a) in str(caught.value) and str(b) in str(caught.value)


def test_the_crop_helpers_are_the_deep_feature_ones(tmp_path):
    """One geometry for deep features and networks: the crop grid is deep.crop_grid's (same spacing and mask)."""
    ct, _, labels = _volumes(centre=(27.0, 40.0, 22.0))
    images, mask = _patient(tmp_path, ct, None, labels, spacing=(0.8, 0.8, 2.5))
    x, info = _input(images, mask, _cfg(spacing=None, mask_channel=True))
    image = sitk.ReadImage(str(images["portal"]))
    crop = deep.crop_region(image, labels == 2, (32, 32, 32), None, 10)
    assert info["spacing_mm"] == pytest.approx(crop.spacing)
    np.testing.assert_array_equal(x[2], crop.mask.astype(np.float32))


# ============================================================================ segmentation targets (multitask)
def test_manual_and_automatic_targets_are_the_regions_on_the_crop_grid(tmp_path, caplog):
    images, mask = _patient(tmp_path)
    labels = _volumes()[2]
    shifted = np.roll(labels, 2, axis=2)  # an 'automatic' mask two voxels off the manual one
    automatic = _write(shifted, tmp_path / "auto.nii.gz")
    x, info = _input(images, mask, manual=mask, automatic=automatic)
    assert info["manual"].dtype == bool and info["manual"].shape == x.shape[1:]
    assert np.array_equal(info["manual"], labels[ON_GRID] == 2)  # the crop is a slice of the array here
    assert np.array_equal(info["automatic"], shifted[ON_GRID] == 2)
    grid_origin = np.array(info["origin"])
    assert np.allclose(grid_origin, (-20.0 + 13, 10.0 + 18, 5.0 + 15))  # x y z of voxel (15, 18, 13)
    # no file, a file off the images' grid, a mask without the region: no target, a warning naming the file
    off_grid = _write(labels, tmp_path / "coarse.nii.gz", spacing=(2.0, 1.0, 1.0))
    no_region = _write(np.where(labels == 2, 1, labels).astype(np.uint8), tmp_path / "liver_only.nii.gz")
    with caplog.at_level(logging.WARNING):
        _, none = _input(images, mask, manual=off_grid, automatic=no_region)
    assert none["manual"] is None and none["automatic"] is None
    assert str(off_grid) in caplog.text and str(no_region) in caplog.text
    _, absent = _input(images, mask)
    assert absent["manual"] is None and absent["automatic"] is None
    # dims 2: the target of the largest slice, on the slice's grid
    x2, info2 = _input(images, mask, _cfg(dims=2), manual=mask)
    assert info2["manual"].shape == x2.shape[1:] and info2["manual"].sum() == (labels[info2["slice"]] == 2).sum()
    # a manual mask whose region misses the input's slice gives no target (not an empty one)
    elsewhere = np.where(np.arange(SHAPE[0])[:, None, None] == info2["slice"], 0, labels).astype(np.uint8)
    _, info3 = _input(images, mask, _cfg(dims=2), manual=_write(elsewhere, tmp_path / "elsewhere.nii.gz"))
    assert info3["manual"] is None


def test_a_center_file_stores_targets_with_their_flags(tmp_path):
    a, mask_a = _patient(tmp_path / "P001")
    b, mask_b = _patient(tmp_path / "P002")
    out = tmp_path / "center.npz"
    crops.write_center_inputs([("P001", a, mask_a, None), ("P002", b, mask_b, None)], out, labels=LABELS,
                              cfg=_cfg(), modalities=MODALITIES, targets={"P001": (mask_a, mask_a)})
    with np.load(out, allow_pickle=False) as data:
        assert data["has_manual"].tolist() == [True, False] and data["has_automatic"].tolist() == [True, False]
        assert data["manual"].shape == (2, 32, 32, 32) and data["manual"].dtype == np.uint8
        assert data["manual"][0].sum() > 0 and data["manual"][1].sum() == 0
        assert data["origin"].shape == (2, 3) and data["direction"].shape == (2, 9)
        assert data["crop_from"].tolist() == ["manual", "automatic"]  # P001's crop was placed by its manual mask
