"""Channels that do not cover the reference grid (an MR field of view smaller than the CT's): every radiomic and deep
feature of such a channel comes from the voxels inside its field-of-view mask only, the fractions outside are
recorded, and a region (mostly) outside is a bad region of that channel with a message naming it.

The synthetic patient: a box tumour of 8 x 16 x 16 voxels (z, y, x = 8..15, 20..35, 20..35), a small node box at
x 44..49, and an MR channel whose field of view is x < 30, so 6 of the tumour's 16 columns (37.5 %) and all of the
node lie outside it; the voxels outside hold ingestion's fill value."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from radiomics import featureextractor
from radstudy.config import validate_config
from radstudy.features import deep
from radstudy.features import radiomics as F
from radstudy.ingest.patient import fov_file
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
SPACING = (1.0, 1.0, 2.0)  # x, y, z (mm)
SHAPE = (24, 56, 56)  # z, y, x
TUMOUR = (slice(8, 16), slice(20, 36), slice(20, 36))
NODE = (slice(8, 13), slice(8, 14), slice(44, 50))
FOV_X = 30  # the MR sees x < 30
LABELS = {"tumour": 2, "node": 3}
DERIVED = {"peritumoural": {"ring_of": "tumour", "mm": 4}}
FAST = {
    "setting": {"binWidth": 10},
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": None},
}
FILTERED = {
    "setting": {"binWidth": 10},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 2.0], "binWidth": 5}, "Wavelet": {"binWidth": 10}},
    "featureClass": {"firstorder": None, "glcm": None},
    "radstudy": {"resample": {"spacing": [1.5, 1.5, 1.5]}},
}


def _labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:20, 6:50, 6:52] = 1  # liver, unused by LABELS: background texture only
    lab[TUMOUR] = 2
    lab[NODE] = 3
    return lab


def _fov() -> np.ndarray:
    fov = np.zeros(SHAPE, bool)
    fov[:, :, :FOV_X] = True
    return fov


def _write(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((-20.0, 5.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


def write_patient(folder: Path, *, fill: float = -1024.0, with_fov: bool = True) -> tuple[dict, Path, dict]:
    """image_CT (whole grid), image_MR (fill outside x < 30), the label mask and MR's field-of-view mask."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lab = _labels()
    images = {}
    for channel, offset in (("CT", 40.0), ("MR", 300.0)):
        texture = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.0)
        array = offset + 25 * texture / texture.std() + 40 * (lab == 1) - 15 * (lab == 2) + 10 * (lab == 3)
        if channel == "MR":
            array[~_fov()] = fill
        images[channel] = _write(np.round(array).astype(np.int16), folder / f"image_{channel}.nii.gz")
    mask = _write(lab, folder / "mask.nii.gz")
    fovs = {"MR": _write(_fov().astype(np.uint8), folder / fov_file("MR"))} if with_fov else {}
    return images, mask, fovs


def extract(images, mask, fovs, params=FAST, **kw):
    return F.extract_patient(images, mask, patient="T1-0001", center="T1", labels=LABELS, params=params,
                             derived=DERIVED, fovs=fovs, **kw)


def _block(row, region: str, channel: str):
    columns = [c for c in row.columns if c.startswith(f"{region}_{channel}_")]
    assert columns
    return row.iloc[0][columns].astype(float)


def _pyradiomics(image: Path, region: np.ndarray, params: dict) -> dict[str, float]:
    """pyradiomics itself on the whole image and a binary mask (no crop, no radstudy step)."""
    with warnings.catch_warnings():  # pykwalify's deprecated load_module(), as in radstudy's own extractor
        warnings.filterwarnings("ignore", message="the load_module", category=DeprecationWarning)
        extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy({**params, "setting": {
            **params["setting"], "label": 1, "additionalInfo": False}}))
    reference = sitk.ReadImage(str(image))
    mask = sitk.GetImageFromArray(region.astype(np.uint8))
    mask.CopyInformation(reference)
    return {k: float(v) for k, v in extractor.execute(reference, mask).items()}


# ============================================================================ radiomics
def test_features_of_a_partly_covered_channel_are_those_of_the_region_within_its_field_of_view(tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    row, issues = extract(images, mask, fovs)
    lab, fov = _labels(), _fov()
    regions = F.derive_regions(sitk.ReadImage(str(mask)), LABELS, DERIVED)
    for region in ("tumour", "peritumoural"):
        within = sitk.GetArrayFromImage(regions[region]).astype(bool) & fov
        direct = _pyradiomics(images["MR"], within, FAST)
        mr = _block(row, region, "MR")
        assert len(mr) > 20
        for name, value in mr.items():  # exact: the same voxels, the same pyradiomics
            assert value == direct[name.split(f"{region}_MR_", 1)[1]], name
    # the CT covers the grid: its features are those of the whole region, as without any field-of-view mask
    alone, _ = extract(images, mask, {})
    for region in ("tumour", "peritumoural"):
        ct = _block(row, region, "CT")
        assert np.isfinite(ct).all()
        assert ct.equals(_block(alone, region, "CT"))
    # (without it, the MR node is the constant fill: a bad region that also took the CT node's features)
    assert np.isfinite(_block(row, "node", "CT")).all() and _block(alone, "node", "CT").isna().all()
    direct = _pyradiomics(images["CT"], lab == 2, FAST)
    assert _block(row, "tumour", "CT")["tumour_CT_original_firstorder_Mean"] == direct["original_firstorder_Mean"]
    # without the field-of-view mask the fill value would enter the MR tumour's features
    assert _block(alone, "tumour", "MR")["tumour_MR_original_firstorder_Minimum"] == -1024.0
    assert _block(row, "tumour", "MR")["tumour_MR_original_firstorder_Minimum"] > 100.0
    assert not row.loc[0, "excluded"]


def test_the_fractions_outside_the_field_of_view_are_recorded(tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    _, issues = extract(images, mask, fovs)
    notes = {i["region"]: i for i in issues if i["reason"] == F.PARTLY_OUTSIDE_FOV}
    assert set(notes) == {"tumour", "peritumoural"}
    tumour = notes["tumour"]
    assert tumour["channel"] == "MR" and tumour["patient"] == "T1-0001"
    assert tumour["outside_region"] == pytest.approx(6 / 16)  # x 30..35 of 20..35
    # the crop: the box + 10 mm (FAST's margin: the default 10 mm > 3 voxels of 2 mm), x 10..45 -> 30..45 outside
    assert tumour["outside_crop"] == pytest.approx(16 / 36)
    assert "37.5% of the region and 44.4% of its box + 10 mm" in tumour["message"]
    assert "'tumour'" in tumour["message"] and "(MR)" in tumour["message"] and str(fovs["MR"]) in tumour["message"]
    # the ring (4 mm: 4 columns in x on each side) spans x 16..39: 10 of its 24 columns lie outside
    ring = notes["peritumoural"]
    assert ring["outside_region"] == pytest.approx(
        float((ring_mask(mask) & ~_fov()).sum()) / float(ring_mask(mask).sum()))
    assert 0.3 < ring["outside_region"] < 0.5
    assert not any(i.get("channel") == "CT" for i in issues)  # the CT has no field-of-view mask


def ring_mask(mask: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(F.derive_regions(sitk.ReadImage(str(mask)), LABELS, DERIVED)["peritumoural"]) > 0


def test_a_region_outside_the_field_of_view_is_a_bad_region_of_that_channel(tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    row, issues = extract(images, mask, fovs)
    [node] = [i for i in issues if i["region"] == "node"]
    assert node["reason"] == F.OUTSIDE_FOV and node["channel"] == "MR"
    assert node["outside_region"] == 1.0 and node["outside_crop"] > 0.5
    for part in ("T1-0001", "'node'", "(MR)", "100.0% of the region", "0 voxel(s) inside", "NaN"):
        assert part in node["message"], part
    assert _block(row, "node", "MR").isna().all()
    assert np.isfinite(_block(row, "node", "CT")).all()  # the CT's block of the region is kept
    assert not row.loc[0, "excluded"]
    excluded, _ = extract(images, mask, fovs, on_bad_region="exclude")
    assert excluded.loc[0, "excluded"]
    assert excluded.loc[0, "exclusion_reason"] == "node (MR): outside_field_of_view"
    # more than half outside, with voxels inside: the same path
    lab = _labels()
    lab[lab == 2] = 0
    lab[TUMOUR[0], TUMOUR[1], 24:38] = 2  # x 24..37: 8 of its 14 columns outside (57 %)
    _write(lab, tmp_path / "mask.nii.gz")
    row, issues = F.extract_patient(images, tmp_path / "mask.nii.gz", patient="T1-0001", center="T1",
                                    labels={"tumour": 2}, params=FAST, fovs=fovs)
    [tumour] = issues
    assert tumour["reason"] == F.OUTSIDE_FOV and tumour["outside_region"] == pytest.approx(8 / 14)
    assert "57.1% of the region" in tumour["message"]
    assert _block(row, "tumour", "MR").isna().all() and np.isfinite(_block(row, "tumour", "CT")).all()


def test_filters_and_resampling_never_read_the_fill_value(tmp_path):
    """LoG, wavelets and IBSI resampling read the neighbourhood: outside the field of view they see the nearest voxel
    inside, so the features are the same whatever ingestion filled there."""
    rows = {}
    for fill in (-1024.0, 0.0, 3000.0):
        images, mask, fovs = write_patient(tmp_path / str(fill), fill=fill)
        rows[fill], issues = extract(images, mask, fovs, params=FILTERED)
        assert {i["reason"] for i in issues} == {F.PARTLY_OUTSIDE_FOV, F.OUTSIDE_FOV}
    first = _block(rows[-1024.0], "tumour", "MR")
    assert np.isfinite(first).all() and any("_wavelet-" in c for c in first.index)
    for fill in (0.0, 3000.0):
        assert _block(rows[fill], "tumour", "MR").equals(first)
        assert _block(rows[fill], "peritumoural", "MR").equals(_block(rows[-1024.0], "peritumoural", "MR"))


def test_fill_outside_fov_takes_the_nearest_voxel_inside():
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    inside = np.zeros(values.shape, bool)
    inside[0, :, :2] = True
    filled = F.fill_outside_fov(values, inside, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(filled[0], [[0, 1, 1, 1], [4, 5, 5, 5], [8, 9, 9, 9]])
    assert F.fill_outside_fov(values, np.ones(values.shape, bool), (1.0, 1.0, 1.0)) is values


def test_a_field_of_view_mask_on_another_grid_is_reported(tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    fov = sitk.ReadImage(str(fovs["MR"]))
    fov.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(fov, str(fovs["MR"]))
    row, issues = extract(images, mask, fovs)
    mr = [i for i in issues if i.get("channel") == "MR"]
    assert {i["reason"] for i in mr} == {F.UNREADABLE_IMAGE} and len(mr) == 3
    assert "not on the image's grid" in mr[0]["message"] and str(fovs["MR"]) in mr[0]["message"]
    assert _block(row, "tumour", "MR").isna().all() and np.isfinite(_block(row, "tumour", "CT")).all()


# ============================================================================ deep features
def test_crop_marks_the_voxels_outside_the_field_of_view():
    array = np.full((10, 20, 20), 50.0, np.float32)
    array[:, :, 12:] = -1024.0  # the fill
    fov = np.zeros(array.shape, bool)
    fov[:, :, :12] = True
    region = np.zeros(array.shape, bool)
    region[4:6, 8:12, 8:14] = True
    image = sitk.GetImageFromArray(array)
    crop = deep.crop_region(image, region, (2, 8, 8), spacing=(1.0, 1.0, 1.0), fov=fov)
    # the crop spans x 7..14 on the image's own grid: columns 12..14 lie outside
    np.testing.assert_array_equal(crop.valid.any(axis=(0, 1)), [True] * 5 + [False] * 3)
    assert deep.crop_outside(crop.valid) == pytest.approx(3 / 8)
    assert (crop.image[crop.valid] == 50.0).all()  # no inside voxel carries the fill
    assert deep.crop_region(image, region, (2, 8, 8), spacing=(1.0, 1.0, 1.0)).valid is None


def test_normalised_inputs_are_neutral_outside_the_field_of_view():
    x = np.array([[[1.0, 3.0, -1024.0, -1024.0]]], np.float32)
    valid = np.array([[[True, True, False, False]]])
    np.testing.assert_allclose(deep.standardise(x, valid), [[[-1.0, 1.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(deep.standardise(x), (x - x.mean()) / x.std())  # no mask: as before
    # nnU-Net's z-score: statistics of the voxels inside only, 0 outside; CT normalisation: 0 outside
    np.testing.assert_allclose(deep.normalise_nnunet(x, "ZScoreNormalization", {}, valid=valid), [[[-1, 1, 0, 0]]])
    props = {"mean": 100.0, "std": 20.0, "percentile_00_5": 0.0, "percentile_99_5": 200.0}
    ct = np.array([[[140.0, 60.0, -1024.0]]], np.float32)
    out = deep.normalise_nnunet(ct, "CTNormalization", props, valid=np.array([[[True, True, False]]]))
    np.testing.assert_allclose(out, [[[2.0, -2.0, 0.0]]])


def _cfg(**overrides) -> dict:
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg = validate_config(raw)["features"]["deep"]
    cfg.update(device="cpu", **overrides)
    return cfg


@pytest.fixture(scope="module")
def resnet3d(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r3d") / "r10.pth"
    torch.save(deep.ResNet(10, 3, shortcut="A").state_dict(), path)
    # a crop of 32 x 32 x 32 mm on the image's own voxels (z, y, x: 2, 1, 1 mm), centred on the tumour's box: x 12..43,
    # of which 30..43 (14 of 32 columns) lie outside the MR's field of view
    cfg = _cfg(backbone="resnet3d", depth=10, checkpoint=str(path), crop_size=[16, 32, 32], spacing=[2.0, 1.0, 1.0])
    return deep.build_extractor(cfg, model=path, seed=7)


def test_resnet3d_input_is_neutral_outside_the_field_of_view(resnet3d, tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    image = sitk.ReadImage(str(images["MR"]))
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) == 2
    batch, [outside] = resnet3d.inputs([image], region, [_fov()])
    x = batch[0, 0]
    crop = deep.crop_region(image, region, (16, 32, 32), (2.0, 1.0, 1.0), fov=_fov())
    assert outside == deep.crop_outside(crop.valid) == 14 / 32
    assert (x[~crop.valid] == 0.0).all()
    inside = deep.window(crop.image, *resnet3d.cfg["window"])[crop.valid]
    np.testing.assert_allclose(x[crop.valid], (inside - inside.mean()) / inside.std(), rtol=1e-5, atol=1e-5)
    # the features do not depend on the fill
    other, *_ = write_patient(tmp_path / "zero", fill=0.0)
    a, _ = resnet3d.extract([image], region, [_fov()])
    b, _ = resnet3d.extract([sitk.ReadImage(str(other["MR"]))], region, [_fov()])
    np.testing.assert_array_equal(a, b)


def test_deep_features_record_the_fractions_and_refuse_a_region_outside(resnet3d, tmp_path):
    images, mask, fovs = write_patient(tmp_path)
    mr_first = {"MR": images["MR"], "CT": images["CT"]}  # the resnet reads the first channel
    row, issues = deep.extract_patient(resnet3d, mr_first, mask, patient="T1-0001", center="T1", region="tumour",
                                       label=2, fovs=fovs)
    [note] = issues
    assert note["reason"] == F.PARTLY_OUTSIDE_FOV and note["channel"] == "MR"
    assert note["outside_region"] == pytest.approx(6 / 16) and note["outside_crop"] == 14 / 32
    assert "37.5% of region 'tumour' and 43.8% of its crop" in note["message"] and note["message"].startswith("T1-0001: deep features")
    assert np.isfinite(row.filter(like="_deep_").to_numpy()).all() and not row["excluded"].item()
    row, issues = deep.extract_patient(resnet3d, mr_first, mask, patient="T1-0001", center="T1", region="node",
                                       label=3, fovs=fovs, on_bad_region="exclude")
    [bad] = issues
    assert bad["reason"] == F.OUTSIDE_FOV and bad["outside_region"] == 1.0
    assert "100.0% of region 'node' lies outside the field of view of MR" in bad["message"]
    assert np.isnan(row.filter(like="_deep_").to_numpy()).all() and row["excluded"].item()
    # a channel without a field-of-view mask: as before, no note
    row, issues = deep.extract_patient(resnet3d, {"CT": images["CT"]}, mask, patient="T1-0001", center="T1",
                                       region="node", label=3, fovs=fovs)
    assert issues == [] and np.isfinite(row.filter(like="_deep_").to_numpy()).all()


def test_each_channel_of_a_multichannel_nnunet_input_gets_its_own_field_of_view(tmp_path):
    """The nnU-Net backbone's input (its `inputs`, without a trained network: the attributes it reads from the
    plans are set here): channel 0 (CT, whole grid) exactly as without field-of-view masks, channel 1 (MR) z-scored
    over its field of view and 0 outside it."""
    images, mask, fovs = write_patient(tmp_path)
    extractor = deep.NnunetExtractor.__new__(deep.NnunetExtractor)
    extractor.cfg = _cfg(crop_size=[16, 32, 32], spacing=[2.0, 1.0, 1.0])
    extractor.schemes, extractor.use_mask_for_norm = ["CTNormalization", "ZScoreNormalization"], [False, False]
    extractor.properties = {"0": {"mean": 40.0, "std": 25.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}}
    extractor.transpose, extractor.dims, extractor.channels_used = [0, 1, 2], 3, 2
    ct, mr = (sitk.ReadImage(str(images[c])) for c in ("CT", "MR"))
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) == 2
    batch, outside = extractor.inputs([ct, mr], region, [None, _fov()])
    plain, none_outside = extractor.inputs([ct, mr], region, [None, None])
    assert outside == [0.0, 14 / 32] and none_outside == [0.0, 0.0]
    np.testing.assert_array_equal(batch[0, 0], plain[0, 0])  # the CT: as before
    mr_crop = batch[0, 1]
    assert (mr_crop[:, :, 30 - 12:] == 0.0).all()  # crop x 12..43: from image column 30 on, outside
    values = sitk.GetArrayFromImage(mr).astype(np.float32)[_fov()]
    expected = (sitk.GetArrayFromImage(mr)[4:20, 12:44, 12:30] - values.mean()) / values.std()
    np.testing.assert_allclose(mr_crop[:, :, :30 - 12], expected, rtol=1e-4, atol=1e-4)
    # without its mask the MR's fill reaches the network and shifts the z-score of every voxel
    fill = (-1024.0 - sitk.GetArrayFromImage(mr).mean()) / sitk.GetArrayFromImage(mr).std()
    np.testing.assert_allclose(plain[0, 1][:, :, 30 - 12:], fill, rtol=1e-4)
    assert not np.allclose(plain[0, 1][:, :, :30 - 12], expected, atol=0.1)


def test_the_radiomics_job_reads_the_field_of_view_masks_of_the_patients_ingest_folder(tmp_path, caplog):
    """radiomics_patient's function: the fov_{channel} file beside the images is found and used."""
    from radstudy.config import load_study
    from radstudy.features import stage

    ingest, segmentation = tmp_path / "ingest" / "T1-0001", tmp_path / "segmentation"
    images, mask, fovs = write_patient(ingest)
    segmentation.mkdir()
    mask.rename(segmentation / "T1-0001.nii.gz")
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["centers"] = str(tmp_path / "centers.tsv")
    (tmp_path / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\nT1\tdevelopment\td\tc.csv\n")
    raw["ingest"]["channels"]["MR"] = {"modality": "MR", "description": "t1"}
    raw["ingest"]["labels"] = {"tumour": 2}
    raw["features"]["radiomics"].update(params=str(tmp_path / "fast.yaml"), derived={})
    study = load_study(raw, base_dir=tmp_path)
    assert stage._patient_inputs(study, "T1-0001", ingest, segmentation)[2] == {"MR": fovs["MR"]}
    row = stage.patient_radiomics(study, "T1", "T1-0001", ingest, segmentation, tmp_path / "row.parquet")
    assert row.loc[0, "tumour_MR_original_firstorder_Minimum"] > 100.0  # not the fill (-1024)
    assert "37.5% of the region and 44.4% of its box + 10 mm" in caplog.text
    fovs["MR"].unlink()  # a channel without a field-of-view file covers the grid: the fill enters its features
    row = stage.patient_radiomics(study, "T1", "T1-0001", ingest, segmentation, tmp_path / "row.parquet")
    assert row.loc[0, "tumour_MR_original_firstorder_Minimum"] == -1024.0
