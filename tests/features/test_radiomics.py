"""Radiomic feature extraction (radstudy.features.radiomics): names, reads, cropping, regions, bad inputs, texture, ICC."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from pykwalify.errors import SchemaError
from radstudy.features import radiomics as F
from radstudy.statistics.robustness import icc_3_1, icc_table, robust_features
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
LABELS = {"liver": 1, "tumour": 2}
DERIVED = {
    "peritumoural": {"ring_of": "tumour", "mm": 4},
    "liver_minus_tumour": {"subtract": ["liver", "tumour"]},
}
SPACING = (1.0, 1.0, 2.0)  # x, y, z (mm)

# Small parameter sets keep the tests fast; the shipped files are checked separately.
FAST = {
    "setting": {"binWidth": 10, "resegmentRange": [-150, 250]},
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": None},
}
FILTERED = {
    "setting": {"binWidth": 10, "resegmentRange": [-150, 250]},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 2.0], "binWidth": 5}, "Wavelet": {"binWidth": 10}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": None, "glszm": None},
    "radstudy": {"resample": {"spacing": [1.5, 1.5, 1.5]}},
}


def _texture(rng, shape, grain: float) -> np.ndarray:
    field = rng.normal(size=shape)
    if grain > 0:
        field = ndimage.gaussian_filter(field, grain)
    return field / field.std()


def _labels(shape=(24, 56, 56), tumour_radius=6.0) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    cz, cy, cx = (s / 2 for s in shape)
    lab = np.zeros(shape, np.uint8)
    lab[((xx - cx) / 20) ** 2 + ((yy - cy) / 18) ** 2 + ((zz - cz) / 9) ** 2 <= 1] = 1
    if tumour_radius > 0:
        lab[((xx - cx - 2) ** 2 + (yy - cy) ** 2) / tumour_radius**2 + ((zz - cz) * 2 / tumour_radius) ** 2 <= 1] = 2
    return lab


def write_case(
    folder: Path,
    *,
    seed=0,
    image=None,
    labels=None,
    grain=1.0,
    spacing=SPACING,
    origin=(-20.0, 5.0, 3.0),
    mask_origin=None,
    channels=("CT",),
) -> tuple[dict[str, Path], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lab = _labels() if labels is None else labels
    images = {}
    for i, channel in enumerate(channels):
        if image is None:
            arr = 60 + 25 * _texture(rng, lab.shape, grain) + 40 * (lab == 1) - 10 * (lab == 2) - 80 * (lab == 0)
        else:
            arr = image
        img = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        images[channel] = folder / f"image_{channel}.nii.gz"
        sitk.WriteImage(img, str(images[channel]))
    m = sitk.GetImageFromArray(lab.astype(np.uint8))
    m.SetSpacing(spacing)
    m.SetOrigin(origin if mask_origin is None else mask_origin)
    mask = folder / "mask.nii.gz"
    sitk.WriteImage(m, str(mask))
    return images, mask


def extract(images, mask, params=FAST, patient="T1-0001", **kw):
    kw.setdefault("labels", LABELS)
    return F.extract_patient(images, mask, patient=patient, center="T1", params=params, **kw)


def features_of(row: pd.DataFrame) -> pd.Series:
    return row.iloc[0].drop(list(F.ID_COLUMNS + F.FLAG_COLUMNS)).astype(float)


# --------------------------------------------------------------------------------------------------------------------


def test_names_follow_the_scheme(tmp_path):
    images, mask = write_case(tmp_path, channels=("CT", "PV"))
    params = {**FILTERED, "radstudy": {}}
    row, issues = extract(images, mask, params=params, derived=DERIVED)
    assert issues == []
    assert list(row.columns[:4]) == ["patient", "center", "excluded", "exclusion_reason"]
    assert row.loc[0, "patient"] == "T1-0001" and row.loc[0, "center"] == "T1" and not row.loc[0, "excluded"]
    feats = list(row.columns[4:])
    pattern = re.compile(
        r"^(liver|tumour|peritumoural|liver_minus_tumour)_(CT|PV)_"
        r"(original|log-sigma-[12]-0-mm-3D|wavelet-[LH]{3})_(shape|firstorder|glcm|glszm)_[A-Za-z0-9]+$"
    )
    assert all(pattern.match(c) for c in feats), [c for c in feats if not pattern.match(c)][:5]
    assert not any("diagnostics" in c for c in feats)
    for name in (
        "tumour_CT_original_firstorder_Mean",
        "liver_CT_wavelet-LLH_glcm_Contrast",
        "tumour_CT_log-sigma-2-0-mm-3D_glszm_ZonePercentage",
        "peritumoural_PV_wavelet-HHH_glcm_Idmn",
    ):
        assert name in feats and np.isfinite(row.loc[0, name])
    # shape does not depend on the image: written once, for the first channel
    assert "tumour_CT_original_shape_MeshVolume" in feats and "tumour_PV_original_shape_MeshVolume" not in feats
    # the names are known without extracting (bad regions get the same NaN block)
    expected = {
        f"{r}_{c}_{n}"
        for r in ["liver", "tumour", *DERIVED]
        for c, shape in (("CT", True), ("PV", False))
        for n in F.feature_names(params, shape=shape)
    }
    assert set(feats) == expected
    assert row[feats].dtypes.eq("float64").all()


def test_each_channel_image_is_read_once(tmp_path, monkeypatch):
    images, mask = write_case(tmp_path, channels=("CT", "PV"))
    calls: list[str] = []
    real = sitk.ReadImage

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", counting)
    _, issues = extract(images, mask, derived=DERIVED)
    assert issues == []
    assert sorted(calls) == sorted([str(images["CT"]), str(images["PV"]), str(mask)])


def test_cropping_gives_the_same_features_as_no_cropping(tmp_path):
    images, mask = write_case(tmp_path, grain=1.5)
    whole = 1000.0  # mm: the crop is the whole image
    cropped, _ = extract(images, mask, params=FILTERED)  # default margin, raised to the filters' support
    full, _ = extract(images, mask, params=FILTERED, margin_mm=whole)
    a, b = features_of(cropped), features_of(full)
    assert np.isfinite(b).all()
    original = [c for c in a.index if "_original_" in c]
    wavelet = [c for c in a.index if "_wavelet-" in c]
    log = [c for c in a.index if "_log-sigma-" in c]
    assert np.allclose(a[original], b[original], rtol=1e-6, atol=1e-6)  # resampled on the whole-image grid
    assert np.allclose(a[wavelet], b[wavelet], rtol=1e-6, atol=1e-6)  # margin > wavelet length
    # LoG is a recursive (IIR) filter: at 4 sigma its tail changes float32 results in the 6th digit ...
    assert np.allclose(a[log], b[log], rtol=1e-4, atol=1e-6)
    # ... and with a margin of 15 sigma it is the same to 1e-6 as well.
    wide, _ = extract(images, mask, params=FILTERED, margin_mm=30.0)
    assert np.allclose(features_of(wide), b, rtol=1e-6, atol=1e-6)


def test_margin_exceeds_the_filter_support():
    spacing = (0.7, 0.7, 2.5)
    margin = F.required_margin_mm(FILTERED, spacing)
    assert margin > F.LOG_SUPPORT_SIGMAS * 2.0  # largest LoG sigma
    assert margin > 6 * 1.5  # coif1 filter length (6) x resampled voxel (1.5 mm)
    assert F.required_margin_mm(FAST, spacing) == pytest.approx(3 * 2.5)  # interpolation/partial volume only


def test_derived_regions(tmp_path):
    lab = _labels()
    mask = sitk.GetImageFromArray(lab)
    mask.SetSpacing(SPACING)
    derived = {
        **DERIVED,
        "whole_liver": {"union": ["liver", "tumour"]},
        "ring_in_liver": {"ring_of": "tumour", "mm": 4, "within": "liver"},
    }
    regions = F.derive_regions(mask, LABELS, derived)
    assert list(regions) == ["liver", "tumour", "peritumoural", "liver_minus_tumour", "whole_liver", "ring_in_liver"]
    arr = {k: sitk.GetArrayFromImage(v).astype(bool) for k, v in regions.items()}
    assert all(v.GetSpacing() == SPACING for v in regions.values())
    tumour = lab == 2
    ring = arr["peritumoural"]
    assert ring.any() and not (ring & tumour).any()
    dist = ndimage.distance_transform_edt(~tumour, sampling=SPACING[::-1])
    assert np.array_equal(ring, (dist > 0) & (dist <= 4))  # within 4 mm of the tumour, in mm not voxels
    assert not (arr["liver_minus_tumour"] & tumour).any()
    assert np.array_equal(arr["whole_liver"], lab > 0)
    assert not (arr["ring_in_liver"] & ~(lab == 1)).any()
    with pytest.raises(ValueError, match="unknown region 'lesion'"):
        F.derive_regions(mask, LABELS, {"x": {"ring_of": "lesion", "mm": 3}})
    with pytest.raises(ValueError, match="exactly one of"):
        F.derive_regions(mask, LABELS, {"x": {"mm": 3}})


def _issue(issues, region):
    found = [i for i in issues if i["region"] == region]
    assert found, issues
    assert set(found[0]) == {"patient", "region", "reason", "message"}
    return found[0]


def _block(row, region):
    return features_of(row)[[c for c in row.columns[4:] if c.startswith(region + "_")]]


def test_empty_and_single_voxel_regions_give_nan_and_a_clear_message(tmp_path):
    lab = _labels(tumour_radius=0)
    lab[3, 3, 3] = 3  # a 1-voxel region
    images, mask = write_case(tmp_path, labels=lab)
    row, issues = extract(images, mask, labels={**LABELS, "node": 3}, derived=DERIVED)
    tumour = _issue(issues, "tumour")
    assert tumour["reason"] == F.EMPTY_REGION and tumour["patient"] == "T1-0001"
    assert "T1-0001" in tumour["message"] and "'tumour'" in tumour["message"] and str(mask) in tumour["message"]
    assert _issue(issues, "node")["reason"] == F.SINGLE_VOXEL
    assert _issue(issues, "peritumoural")["reason"] == F.EMPTY_REGION  # ring of an empty tumour
    assert _block(row, "tumour").isna().all() and _block(row, "node").isna().all()
    assert _block(row, "liver").notna().all()  # the other regions are unaffected
    assert not row.loc[0, "excluded"]
    # "exclude" flags the patient's row instead
    row, _ = extract(images, mask, labels={**LABELS, "node": 3}, on_bad_region="exclude")
    assert row.loc[0, "excluded"] and "tumour: empty_region" in row.loc[0, "exclusion_reason"]
    assert _block(row, "liver").notna().all()
    with pytest.raises(ValueError, match="on_bad_region"):
        extract(images, mask, on_bad_region="drop")


def test_mask_outside_the_image(tmp_path):
    images, mask = write_case(tmp_path, mask_origin=(500.0, 500.0, 500.0))
    row, issues = extract(images, mask)
    assert {i["reason"] for i in issues} == {F.OUTSIDE_IMAGE}
    assert "lies outside the image" in issues[0]["message"] and str(images["CT"]) in issues[0]["message"]
    assert features_of(row).isna().all()
    # shifted by part of its extent: the regions stick out of the image
    images, mask = write_case(tmp_path / "partly", mask_origin=(10.0, 5.0, 3.0))
    row, issues = extract(images, mask)
    assert _issue(issues, "liver")["reason"] == F.OUTSIDE_IMAGE and "partly outside" in issues[0]["message"]


def test_mask_on_another_grid_inside_the_image_is_mapped(tmp_path):
    shifted_images, shifted_mask = write_case(tmp_path / "s", mask_origin=(-20.0, 5.0, 3.0 + 2.0))  # one slice
    row, issues = extract(shifted_images, shifted_mask)
    assert issues == []
    assert np.isfinite(features_of(row)).all()


def test_constant_image_and_nothing_left_after_resegmentation(tmp_path):
    lab = _labels()
    images, mask = write_case(tmp_path, image=np.full(lab.shape, 50.0), labels=lab)
    row, issues = extract(images, mask)
    assert {i["reason"] for i in issues} == {F.CONSTANT_IMAGE}
    assert "constant (50)" in issues[0]["message"]
    assert features_of(row).isna().all()
    images, mask = write_case(tmp_path / "fat", image=np.full(lab.shape, -500.0) + (lab == 1) * 100, labels=lab)
    row, issues = extract(images, mask)
    assert _issue(issues, "tumour")["reason"] == F.EMPTY_AFTER_RESEGMENTATION
    assert _block(row, "tumour").isna().all()


def test_unreadable_files_never_crash(tmp_path):
    images, mask = write_case(tmp_path)
    row, issues = extract(images, tmp_path / "missing_mask.nii.gz", derived=DERIVED)
    assert {i["reason"] for i in issues} == {F.UNREADABLE_MASK} and len(issues) == 4
    assert features_of(row).isna().all()
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    row, issues = extract({"CT": tmp_path / "broken.nii.gz"}, mask, on_bad_region="exclude")
    assert {i["reason"] for i in issues} == {F.UNREADABLE_IMAGE} and row.loc[0, "excluded"]
    assert "broken.nii.gz" in issues[0]["message"]


def test_a_texture_difference_shows_in_the_expected_features(tmp_path):
    """Same intensity distribution, different spatial grain: co-occurrence and run-length features differ, the
    first-order ones do not."""
    lab = _labels(tumour_radius=0)
    rng = np.random.default_rng(3)
    params = {
        "setting": {"binWidth": 10},
        "imageType": {"Original": {}},
        "featureClass": {
            "firstorder": ["Mean", "Variance"],
            "glcm": ["Contrast", "Correlation"],
            "glrlm": ["LongRunEmphasis", "ShortRunEmphasis"],
        },
    }
    out = {}
    for grain in (0.0, 2.0):  # white noise vs. blobs of ~2 voxels
        field = _texture(rng, lab.shape, grain)
        roi = lab == 1
        image = 80 + 30 * (field - field[roi].mean()) / field[roi].std()  # same mean and SD inside the ROI
        images, mask = write_case(tmp_path / f"g{grain}", image=image, labels=lab)
        row, issues = extract(images, mask, params=params, labels={"liver": 1})
        assert issues == []
        out[grain] = features_of(row).rename(lambda c: c.split("_original_")[1])
    fine, coarse = out[0.0], out[2.0]
    assert fine["firstorder_Mean"] == pytest.approx(coarse["firstorder_Mean"], rel=0.05)
    assert fine["firstorder_Variance"] == pytest.approx(coarse["firstorder_Variance"], rel=0.1)
    assert fine["glcm_Contrast"] > 3 * coarse["glcm_Contrast"]
    assert coarse["glcm_Correlation"] > 0.5 > fine["glcm_Correlation"]
    assert coarse["glrlm_LongRunEmphasis"] > fine["glrlm_LongRunEmphasis"]
    assert fine["glrlm_ShortRunEmphasis"] > coarse["glrlm_ShortRunEmphasis"]


def test_study_table(tmp_path):
    rows = []
    for i, (p, c) in enumerate([("C2-0002", "C2"), ("C1-0007", "C1"), ("C1-0001", "C1")]):
        images, mask = write_case(tmp_path / p, seed=i)
        row, _ = extract(images, mask, patient=p)
        row["center"] = c
        rows.append(row)
    # a row as another stage would write it, and a shuffled column order
    F.write_row(rows[1], tmp_path / "C1-0007.parquet")
    F.write_row(rows[2][list(rows[2].columns[::-1])], tmp_path / "C1-0001.tsv")
    table = F.study_table([rows[0], tmp_path / "C1-0007.parquet", tmp_path / "C1-0001.tsv"])
    assert list(table.patient) == ["C1-0001", "C1-0007", "C2-0002"]
    assert list(table.columns[:4]) == ["patient", "center", "excluded", "exclusion_reason"]
    assert list(table.columns[4:]) == sorted(table.columns[4:])
    again = F.study_table(rows[::-1])
    assert list(again.columns) == list(table.columns)
    pd.testing.assert_frame_equal(again, table, check_exact=False, rtol=1e-12)
    with pytest.raises(ValueError, match="more than once"):
        F.study_table([rows[0], rows[0]])
    table, meta_path = F.write_study(rows, tmp_path / "features.parquet", FAST)
    assert meta_path == tmp_path / "features.meta.json"
    assert json.loads(meta_path.read_text())["patients"] == 3


def test_feature_metadata(tmp_path):
    params = REPO / "config" / "radiomics" / "ct.yaml"
    meta = F.feature_metadata(params)
    json.dumps(meta)
    import radiomics

    assert meta["pyradiomics_version"] == radiomics.__version__
    assert meta["params_sha256"] == hashlib.sha256(params.read_bytes()).hexdigest()
    assert meta["settings"]["binWidth"] == 25 and meta["settings"]["resegmentRange"] == [-150, 250]
    assert meta["settings"]["label"] == 1 and meta["settings"]["additionalInfo"] is False
    assert meta["image_types"]["LoG"]["sigma"] == [1.0, 2.0, 3.0]
    assert meta["preprocessing"]["resample"]["spacing"] == [1.0, 1.0, 1.0]
    assert meta["features_per_region_channel"] == len(F.feature_names(params))


@pytest.mark.parametrize("name, count, wavelet", [("ct.yaml", 1000, True), ("demo.yaml", 250, False)])
def test_shipped_parameter_files(name, count, wavelet):
    params = REPO / "config" / "radiomics" / name
    names = F.feature_names(params)
    assert len(names) == len(set(names)) > count
    assert "original_firstorder_Mean" in names
    # the demo's 4 mm grid has no wavelet images (see demo.yaml); real CTs do
    assert wavelet == ({"wavelet-LLH_glcm_Contrast", "wavelet-LLL_ngtdm_Strength"} <= set(names))
    assert any(n.startswith("log-sigma-") and n.endswith("_glszm_ZonePercentage") for n in names)
    ep = F.load_params(params)
    assert ep.resample["round_intensities"] and ep.resample["interpolator"] == "linear"


def test_the_mri_parameter_file_normalises_and_does_not_round():
    ep = F.load_params(REPO / "config" / "radiomics" / "mri.yaml")
    assert ep.setting["normalize"] and ep.setting["normalizeScale"] == 100 and "resegmentRange" not in ep.setting
    assert not ep.resample["round_intensities"]
    names = F.feature_names(ep)
    assert len(names) == len(set(names)) > 1000 and "wavelet-HHH_glszm_ZonePercentage" in names


MR_FAST = {"setting": {"normalize": True, "normalizeScale": 100, "binWidth": 5, "voxelArrayShift": 300},
           "imageType": {"Original": {}}, "featureClass": {"firstorder": None, "glcm": None}}


def test_each_channel_takes_its_own_parameters(tmp_path):
    """An MR channel beside a CT one (features.radiomics.params per channel): each channel's block equals what its
    own parameters give on that channel alone; shape comes from the first channel's."""
    images, mask = write_case(tmp_path, channels=("CT", "T2"))
    mr = sitk.ReadImage(str(images["T2"]))
    sitk.WriteImage(sitk.Cast(mr, sitk.sitkFloat32) * 7.5 + 300.0, str(images["T2"]))  # an MR-like scale
    both, _ = extract(images, mask, channel_params={"T2": MR_FAST})
    ct_alone, _ = extract({"CT": images["CT"]}, mask)
    mr_alone, _ = extract({"T2": images["T2"]}, mask, params=MR_FAST)
    both, ct_alone, mr_alone = features_of(both), features_of(ct_alone), features_of(mr_alone)
    ct_cols = [c for c in both.index if "_CT_" in c]
    mr_cols = [c for c in both.index if "_T2_" in c]
    assert ct_cols and mr_cols and not any("shape" in c for c in mr_cols)
    np.testing.assert_allclose(both[ct_cols], ct_alone[ct_cols], rtol=1e-10)
    mr_texture = [c for c in mr_cols if "glcm" in c]
    np.testing.assert_allclose(both[mr_texture], mr_alone[mr_texture], rtol=1e-10)
    # the CT parameters on the rescaled MR would give other bins: the per-channel file is what made the block
    mr_with_ct, _ = extract({"T2": images["T2"]}, mask)
    assert not np.allclose(features_of(mr_with_ct)[mr_texture], both[mr_texture], equal_nan=True)
    with pytest.raises(ValueError, match=r"channel\(s\) \['PET'\], which are not image channels"):
        extract(images, mask, channel_params={"PET": MR_FAST})


def test_parameter_checks(tmp_path):
    with pytest.raises(ValueError, match="radstudy.resample"):
        F.load_params({**FAST, "setting": {"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkLinear"}})
    with pytest.raises(ValueError, match="unknown keys in radstudy"):
        F.load_params({**FAST, "radstudy": {"resampling": {}}})
    with pytest.raises(ValueError, match="spacing"):
        F.load_params({**FAST, "radstudy": {"resample": {"spacing": [1, 1]}}})
    with pytest.raises(SchemaError):  # pyradiomics' own schema
        F.load_params({**FAST, "setting": {"binWidth": "wide"}})


# --------------------------------------------------------------------------------------------------------------------
# ICC


def test_icc_3_1_reproduces_shrout_and_fleiss():
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(3,1) = 0.71.
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert icc_3_1(ratings) == pytest.approx(0.7148, abs=1e-4)
    assert round(icc_3_1(ratings), 2) == 0.71
    x = np.arange(5.0)[:, None]
    assert icc_3_1(np.hstack([x, x + 3])) == pytest.approx(1.0)  # consistency: a constant offset is agreement
    assert np.isnan(icc_3_1(np.ones((4, 3))))  # no between-subject variance
    assert icc_3_1(np.array([[1, 2], [3, np.nan], [2, 2], [5, 6]])) == pytest.approx(
        icc_3_1([[1, 2], [2, 2], [5, 6]])
    )
    with pytest.raises(ValueError):
        icc_3_1(np.ones(4))


def test_robust_features():
    icc = pd.Series({"a": 0.9, "b": 0.75, "c": 0.5, "d": np.nan})
    assert robust_features(icc) == ["a", "b"]
    assert robust_features(icc, threshold=0.95) == []
    assert robust_features(pd.DataFrame({"feature": icc.index, "icc": icc.values}), 0.5) == ["a", "b", "c"]


def test_robustness_icc_across_eroded_and_dilated_masks(tmp_path):
    params = {
        "setting": {"binWidth": 10},
        "imageType": {"Original": {}},
        "featureClass": {"shape": ["MeshVolume"], "firstorder": ["Mean", "Variance"]},
    }
    cases = []
    rng = np.random.default_rng(5)
    for i in range(5):
        lab = _labels(tumour_radius=float(rng.uniform(4, 8)))
        image = 60 + rng.uniform(-40, 40) + 25 * _texture(rng, lab.shape, 1.0) + 40 * (lab == 1)
        cases.append(write_case(tmp_path / f"p{i}", image=image, labels=lab))
    # as the workflow computes it: each patient's rows on the original and perturbed masks (radiomics_patient,
    # radiomics_perturbed), the ICC over patients (the statistics stage, on its training patients)
    tables = {
        how or "original": F.study_table([
            F.extract_patient(images, mask, patient=f"T1-{i:04d}", center="T1", labels={"tumour": 2}, params=params,
                              mask_perturbation=how)[0]
            for i, (images, mask) in enumerate(cases)
        ])
        for how in (None, "erode", "dilate")
    }
    icc = icc_table(tables)
    assert set(icc.index) == {
        "tumour_CT_original_shape_MeshVolume",
        "tumour_CT_original_firstorder_Mean",
        "tumour_CT_original_firstorder_Variance",
    }
    assert icc["tumour_CT_original_firstorder_Mean"] > 0.9  # the tumour means differ far more than a 1-voxel rim
    assert icc["tumour_CT_original_shape_MeshVolume"] > 0.75  # volumes shift together
    assert "tumour_CT_original_firstorder_Mean" in robust_features(icc)


def test_mask_perturbation(tmp_path):
    lab = _labels()
    region = lab == 2
    eroded, dilated = F.perturb_region(region, "erode"), F.perturb_region(region, "dilate")
    assert eroded.sum() < region.sum() < dilated.sum()
    assert not (eroded & ~region).any() and not (region & ~dilated).any()
    with pytest.raises(ValueError):
        F.perturb_region(region, "shrink")
