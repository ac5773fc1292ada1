"""radstudy.features.deep: crop and normalisation on volumes with a known tumour box (answers by hand), the plain-torch
ResNets against checkpoints written here (wrappers, prefixes, wrong files), determinism and names, bad patients,
config checks, and the nnU-Net backbone on a real nnU-Net trained here for a few iterations (slow)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml

from radstudy.features import deep

from radstudy.features import radiomics as features

from radstudy.features import stage as features_stage

from radstudy.config import load_study, validate_config
from radstudy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
LABELS = {"liver": 1, "tumour": 2}


def _cfg(**overrides) -> dict:
    cfg = validate_config(copy.deepcopy(DEFAULT))["features"]["deep"]
    cfg.update(device="cpu", **overrides)
    return cfg


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)  # x, y, z
    image.SetOrigin(origin)
    return image


def _ramp(shape) -> np.ndarray:
    z, y, x = np.indices(shape)
    return (100.0 * z + 10.0 * y + x).astype(np.float32)


# ============================================================================ crop (known box)
def test_crop_of_the_exact_box_returns_its_voxels():
    array = _ramp((20, 40, 50))
    region = np.zeros(array.shape, bool)
    region[10:14, 20:30, 30:40] = True
    crop = deep.crop_region(_image(array), region, (4, 10, 10), margin_mm=0)
    assert crop.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(crop.image, array[10:14, 20:30, 30:40], atol=1e-4)
    assert crop.mask.all()


def test_crop_with_margin_is_isotropic_and_centred_on_an_anisotropic_image():
    # 3 mm slices, 1 mm pixels; the box is 4 slices (12 mm) x 10 x 20 mm
    array = _ramp((20, 60, 60))
    region = np.zeros(array.shape, bool)
    region[8:12, 25:35, 20:40] = True
    crop = deep.crop_region(_image(array, spacing=(1.0, 1.0, 3.0)), region, (8, 16, 16), margin_mm=2.0)
    # extents with margin: z 12+4=16 mm, y 10+4=14 mm, x 20+4=24 mm -> mm per voxel 2, 0.875, 1.5 -> the largest, 2
    assert crop.spacing == pytest.approx((2.0, 2.0, 2.0))
    # the mask's physical extent is the box's (x: 20 mm = 10 voxels of 2 mm), centred in the crop
    along_x = np.flatnonzero(crop.mask.any(axis=(0, 1)))
    assert len(along_x) == 10 and along_x[0] == 3 and along_x[-1] == 12
    along_z = np.flatnonzero(crop.mask.any(axis=(1, 2)))
    assert along_z[0] == 1 and along_z[-1] == 6  # 12 mm of 16: 6 of 8 voxels, centred
    # centre voxel values: the image is linear, so interpolation reproduces it at the crop's centre
    centre = np.array([(8 + 11) / 2, (25 + 34) / 2, (20 + 39) / 2])  # voxel index of the box centre (z, y, x)
    expected = 100 * centre[0] + 10 * centre[1] + centre[2]
    got = crop.image[3:5, 7:9, 7:9].mean()  # the 8 voxels around the crop's centre
    assert got == pytest.approx(expected, abs=1e-3)


def test_crop_with_fixed_spacing_and_outside_fill():
    array = _ramp((10, 20, 20)) + 5.0
    region = np.zeros(array.shape, bool)
    region[0:2, 0:2, 0:2] = True  # a corner: half the field of view lies outside the image
    crop = deep.crop_region(_image(array), region, (8, 8, 8), spacing=(1.0, 1.0, 1.0))
    assert crop.spacing == (1.0, 1.0, 1.0)
    assert crop.mask.sum() == 8
    assert crop.image.min() == pytest.approx(5.0)  # outside: the image minimum
    # the box sits at the crop centre: crop index 3..4 <-> image 0..1
    np.testing.assert_allclose(crop.image[3:5, 3:5, 3:5], array[0:2, 0:2, 0:2], atol=1e-4)


def test_largest_slice():
    region = np.zeros((5, 10, 10), bool)
    region[1, :3, :3] = True
    region[3, :4, :4] = True
    assert deep.largest_slice(region) == 3


# ============================================================================ normalisation
def test_ct_normalisation_as_nnunet():
    props = {"mean": 100.0, "std": 20.0, "percentile_00_5": 0.0, "percentile_99_5": 200.0}
    array = np.array([[[-1000.0, 0.0, 100.0, 140.0, 500.0]]], np.float32)
    out = deep.normalise_nnunet(array, "CTNormalization", props)
    np.testing.assert_allclose(out, [[[-5.0, -5.0, 0.0, 2.0, 5.0]]])
    assert array[0, 0, 0] == -1000.0  # the input is not modified
    z = deep.normalise_nnunet(np.array([[[1.0, 3.0]]], np.float32), "ZScoreNormalization", {})
    np.testing.assert_allclose(z, [[[-1.0, 1.0]]])
    with pytest.raises(deep.DeepFeatureError, match="NoSuchNormalization"):
        deep.normalise_nnunet(array, "NoSuchNormalization", props)


# ============================================================================ ResNets and checkpoints
def _save(state: dict, path: Path, *, prefix: str = "", wrap: bool = False, extra: dict | None = None) -> Path:
    state = {prefix + k: v for k, v in state.items()}
    state.update(extra or {})
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    return path


def _random_resnet(depth: int, dims: int, shortcut: str = "B", seed: int = 0) -> deep.ResNet:
    torch.manual_seed(seed)
    model = deep.ResNet(depth, dims, shortcut=shortcut)
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong load would show
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_resnet2d_has_torchvision_layout():
    r18, r50 = deep.ResNet(18, 2), deep.ResNet(50, 2)
    keys = set(r18.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias"):
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in keys
    assert "layer1.0.conv3.weight" in r50.state_dict() and "layer1.0.downsample.0.weight" in r50.state_dict()
    # torchvision's parameter counts (11,689,512 and 25,557,032) minus the 1000-class fc layer
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512 - (512 * 1000 + 1000)
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 - (2048 * 1000 + 1000)
    assert (r18.n_features, r50.n_features) == (512, 2048)


def test_resnet3d_shortcuts():
    a, b = deep.ResNet(18, 3, shortcut="A"), deep.ResNet(18, 3, shortcut="B")
    assert not any("downsample" in k for k in a.state_dict())
    assert "layer3.0.downsample.0.weight" in b.state_dict()  # 128 -> 256 channels at stride 1 (dilated)
    assert b.state_dict()["conv1.weight"].shape == (64, 1, 7, 7, 7)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert a.eval()(x).shape == (1, 512) and deep.ResNet(50, 3).eval()(x).shape == (1, 2048)


@pytest.mark.parametrize("prefix, wrap", [("", False), ("module.", False), ("module.", True), ("", True)])
def test_resnet3d_loads_checkpoint_variants(tmp_path, prefix, wrap):
    source = _random_resnet(10, 3, shortcut="B")
    head = {"conv_seg.0.weight": torch.zeros(2, 512, 1, 1, 1)}  # MedicalNet's segmentation head: ignored
    path = _save(source.state_dict(), tmp_path / "med3d.pth", prefix=prefix, wrap=wrap,
                 extra={prefix + k: v for k, v in head.items()})
    extractor = deep.build_extractor(_cfg(backbone="resnet3d", depth=10, checkpoint=str(path), crop_size=[16, 32, 32]),
                                     model=path, seed=1)
    assert extractor.meta["shortcut"] == "B"  # read from the checkpoint
    for key, value in source.state_dict().items():
        assert torch.equal(extractor.model.state_dict()[key], value), key
    assert extractor.n_features == 512


def test_resnet2d_loads_a_torchvision_style_file(tmp_path):
    source = _random_resnet(18, 2)
    state = dict(source.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as in old torchvision files
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    path = _save(state, tmp_path / "resnet18.pth")
    extractor = deep.build_extractor(_cfg(backbone="resnet2d", checkpoint=str(path)), model=path, seed=1)
    assert torch.equal(extractor.model.layer3[1].bn2.running_mean, source.layer3[1].bn2.running_mean)
    assert extractor.n_features == 512 and extractor.meta["image_size"] == 224


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    r2d = _save(_random_resnet(18, 2).state_dict(), tmp_path / "r2d.pth")
    with pytest.raises(deep.DeepFeatureError, match=r"r2d\.pth does not fit the 3D ResNet-18.*wrong shapes: conv1"):
        deep.build_extractor(_cfg(backbone="resnet3d", depth=18, checkpoint=str(r2d)), model=r2d, seed=1)
    state = dict(_random_resnet(18, 2).state_dict())
    del state["layer4.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    broken = _save(state, tmp_path / "broken.pth", prefix="module.", wrap=True)
    with pytest.raises(deep.DeepFeatureError) as error:
        deep.build_extractor(_cfg(backbone="resnet2d", checkpoint=str(broken)), model=broken, seed=1)
    message = str(error.value)
    assert "broken.pth" in message
    assert "missing keys: layer4.1.conv2.weight" in message and "unexpected keys: layer5.0.conv1.weight" in message
    r50 = tmp_path / "r50.pth"
    torch.save(deep.ResNet(50, 2).state_dict(), r50)
    with pytest.raises(deep.DeepFeatureError, match="ResNet-18.*unexpected keys: .*layer1.0.conv3.weight"):
        deep.build_extractor(_cfg(backbone="resnet2d", depth=18, checkpoint=str(r50)), model=r50, seed=1)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(deep.DeepFeatureError, match="junk.pth cannot be read"):
        deep.read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(deep.DeepFeatureError, match="does not exist"):
        deep.read_state_dict(tmp_path / "absent.pth")


# ============================================================================ per patient
def _patient(folder: Path, *, tumour: slice | None = (slice(6, 10), slice(20, 30), slice(22, 34)),
             constant: bool = False, seed: int = 0) -> tuple[dict, Path]:
    """A CT-like volume (HU) with a liver block and a darker tumour box; files image_CT.nii.gz and mask."""
    rng = np.random.default_rng(seed)
    shape = (16, 48, 48)
    image = np.full(shape, -1000.0, np.float32)
    image[2:14, 8:40, 8:40] = 60.0
    mask = np.zeros(shape, np.uint8)
    mask[3:13, 12:38, 12:38] = 1
    image[mask == 1] = 130.0
    if tumour is not None:
        mask[tumour] = 2
        image[tumour] = 30.0
    image += rng.normal(0, 10, shape).astype(np.float32)
    if constant:
        image[:] = 40.0
    folder.mkdir(parents=True, exist_ok=True)
    for array, name in ((np.round(image).astype(np.int16), "image_CT.nii.gz"), (mask, "mask.nii.gz")):
        sitk.WriteImage(_image(array, spacing=(1.5, 1.5, 3.0)), str(folder / name), True)
    return {"CT": folder / "image_CT.nii.gz"}, folder / "mask.nii.gz"


@pytest.fixture(scope="module")
def resnet3d(tmp_path_factory):
    path = _save(_random_resnet(10, 3, shortcut="A").state_dict(), tmp_path_factory.mktemp("r3d") / "r10.pth")
    return deep.build_extractor(_cfg(backbone="resnet3d", depth=10, checkpoint=str(path), crop_size=[16, 32, 32]),
                                model=path, seed=7)


def test_features_are_deterministic_and_named(resnet3d, tmp_path):
    images, mask = _patient(tmp_path / "p1")
    first, issues = deep.extract_patient(resnet3d, images, mask, patient="A-0001", center="A", region="tumour", label=2)
    again, _ = deep.extract_patient(resnet3d, images, mask, patient="A-0001", center="A", region="tumour", label=2)
    assert issues == []
    names = [c for c in first.columns if c not in ("patient", "center", "excluded", "exclusion_reason")]
    assert names == [f"tumour_CT_deep_resnet3d_{i:04d}" for i in range(512)]
    assert np.isfinite(first[names].to_numpy()).all() and first[names].to_numpy().std() > 0
    pd.testing.assert_frame_equal(first, again)  # bit-identical
    other, _ = deep.extract_patient(resnet3d, *_patient(tmp_path / "p2", seed=1, tumour=(slice(4, 12), slice(10, 20),
                                                                                           slice(10, 30))),
                                    patient="A-0002", center="A", region="tumour", label=2)
    assert not np.allclose(other[names].to_numpy(), first[names].to_numpy())  # the input matters
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


def test_resnet2d_features_on_the_largest_slice(tmp_path):
    path = _save(_random_resnet(18, 2).state_dict(), tmp_path / "r18.pth")
    extractor = deep.build_extractor(_cfg(backbone="resnet2d", checkpoint=str(path)), model=path, seed=3)
    images, mask = _patient(tmp_path / "p")
    row, issues = deep.extract_patient(extractor, images, mask, patient="A-0001", center="A", region="tumour", label=2)
    assert issues == []
    values = row.filter(like="_deep_resnet2d_").to_numpy()
    assert values.shape == (1, 512) and np.isfinite(values).all()
    again, _ = deep.extract_patient(extractor, images, mask, patient="A-0001", center="A", region="tumour", label=2)
    np.testing.assert_array_equal(again.filter(like="_deep_").to_numpy(), values)


@pytest.mark.parametrize("case, reason", [("empty", "empty_region"), ("one", "single_voxel"),
                                          ("constant", "constant_image"), ("unreadable", "unreadable_image")])
def test_bad_patients_get_nan_and_a_message(resnet3d, tmp_path, case, reason):
    tumour = {"empty": None, "one": (slice(8, 9), slice(24, 25), slice(24, 25))}.get(
        case, (slice(6, 10), slice(20, 30), slice(22, 34)))
    images, mask = _patient(tmp_path / case, tumour=tumour, constant=case == "constant")
    if case == "unreadable":
        images["CT"].write_bytes(b"broken")
    row, issues = deep.extract_patient(resnet3d, images, mask, patient="A-0009", center="A", region="tumour", label=2)
    values = row.filter(like="_deep_").to_numpy()
    assert values.shape == (1, 512) and np.isnan(values).all()
    assert [i["reason"] for i in issues] == [reason]
    assert issues[0]["message"].startswith("A-0009: deep features")
    assert not row["excluded"].item()
    excluded, _ = deep.extract_patient(resnet3d, images, mask, patient="A-0009", center="A", region="tumour", label=2,
                                       on_bad_region="exclude")
    assert excluded["excluded"].item() and reason in excluded["exclusion_reason"].item()


# ============================================================================ config
@pytest.mark.parametrize("deep_cfg, key", [
    ({"backbone": "resnet3d"}, "features.deep.checkpoint"),
    ({"backbone": "resnet2d", "checkpoint": "x.pth", "depth": 10}, "features.deep.depth"),
    ({"backbone": "nnunet", "depth": 18}, "features.deep.depth"),
    ({"region": "spleen"}, "features.deep.region"),
    ({"window": [100, -100], "backbone": "resnet3d", "checkpoint": "x.pth"}, "features.deep.window"),
    ({"crop_size": [32, 64]}, "features.deep.crop_size"),
    ({"device": "gpu"}, "features.deep.device"),
    ({"backbone": "vit"}, "features.deep.backbone"),
])
def test_invalid_deep_config_names_the_key(deep_cfg, key):
    raw = copy.deepcopy(DEFAULT)
    raw["features"]["deep"] = deep_cfg
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(raw)


def test_deep_config_defaults():
    raw = copy.deepcopy(DEFAULT)
    raw["features"].pop("deep")
    cfg = validate_config(raw)["features"]["deep"]
    assert cfg["enabled"] and cfg["backbone"] == "nnunet" and cfg["region"] == "tumour" and cfg["device"] == "auto"
    assert cfg["checkpoint"] is None and len(cfg["crop_size"]) == 3
    off = copy.deepcopy(DEFAULT)
    off["features"]["deep"] = {"enabled": False, "backbone": "resnet3d"}  # no checkpoint needed when disabled
    assert not validate_config(off)["features"]["deep"]["enabled"]


@pytest.mark.parametrize("device, gpu, wanted", [("auto", False, False), ("auto", True, True), ("cuda", False, True),
                                                 ("cpu", True, False)])
def test_gpu_request_follows_the_config(tmp_path, device, gpu, wanted):
    config = copy.deepcopy(DEFAULT)
    config["centers"] = str(tmp_path / "centers.tsv")
    (tmp_path / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\nA\tdevelopment\td\tc.csv\n")
    config["features"]["deep"]["device"] = device
    config["segmentation"]["gpu"] = gpu
    assert features_stage.deep_wants_gpu(load_study(config)) is wanted


# ============================================================================ nnU-Net backbone (slow: a real training)
@pytest.fixture(scope="module")
def nnunet_model(tiny_nnunet):
    """The suite's shared tiny nnU-Net (tests/conftest.py), with three of its center C1 patients."""
    cases = [c for c in tiny_nnunet["cases"] if c["center"] == "C1"][:3]
    return {"root": tiny_nnunet["root"], "cases": cases, "model": tiny_nnunet["model"]}


@pytest.mark.slow
def test_nnunet_encoder_features(nnunet_model, tmp_path):
    model = nnunet_model["model"]
    plans = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    per_stage = plans["architecture"]["arch_kwargs"]["features_per_stage"]
    extractor = deep.build_extractor(_cfg(crop_size=[8, 32, 32]), model=model, seed=5)
    assert extractor.n_features == sum(per_stage[-3:])  # bottleneck + the two skips above, pooled
    assert extractor.meta["configuration"] == "2d" and extractor.meta["normalization"] == ["CTNormalization"]
    # the trained weights, not a fresh network
    weights = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    encoder = {k[len("encoder."):]: v for k, v in weights["network_weights"].items() if k.startswith("encoder.")}
    loaded = extractor.model.encoder.state_dict()
    assert encoder.keys() == loaded.keys() and all(torch.equal(encoder[k], loaded[k]) for k in encoder)

    case = nnunet_model["cases"][0]
    row, issues = deep.extract_patient(extractor, case["images"], case["mask"], patient=case["patient"], center="A",
                                       region="tumour", label=2)
    assert issues == []
    names = [f"tumour_CT_deep_nnunet_{i:04d}" for i in range(extractor.n_features)]
    assert [c for c in row.columns if "_deep_" in c] == names
    values = row[names].to_numpy()[0]
    assert np.isfinite(values).all() and values.std() > 0
    again, _ = deep.extract_patient(extractor, case["images"], case["mask"], patient=case["patient"], center="A",
                                    region="tumour", label=2)
    np.testing.assert_array_equal(again[names].to_numpy()[0], values)

    # by hand: CT normalisation with the plans' foreground properties, the crop, the encoder per tumour slice, mean
    props = json.loads((model / "plans.json").read_text())["foreground_intensity_properties_per_channel"]["0"]
    image = sitk.ReadImage(str(case["images"]["CT"]))
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(case["mask"]))) == 2
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    normalised = (np.clip(hu, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    grid = deep.crop_grid(image, region, (8, 32, 32), None, 10)
    as_image = sitk.GetImageFromArray(normalised)
    as_image.CopyInformation(image)
    crop = deep.resample_to(as_image, grid, float(normalised.min()))
    on_grid = deep.region_on_grid(region, image, grid)
    slices = np.flatnonzero(on_grid.any(axis=(1, 2)))
    with torch.no_grad():
        skips = extractor.model.encoder(torch.from_numpy(crop[slices][:, None]))
        pooled = torch.cat([s.mean(dim=(2, 3)) for s in skips[-3:]], dim=1).mean(0).double().numpy()
    np.testing.assert_allclose(values, pooled, rtol=1e-5, atol=1e-6)


def _write_study(root: Path, model: Path, center: str) -> tuple:
    config = copy.deepcopy(DEFAULT)
    config["centers"] = str(root / "centers.tsv")
    config["features"]["deep"].update(crop_size=[8, 32, 32], device="cpu")
    (root / "centers.tsv").write_text(f"id\trole\tdicom_root\tclinical\n{center}\tdevelopment\t{root}\t{root}/c.csv\n")
    return load_study(config, base_dir=root), model


@pytest.mark.slow
def test_center_job_and_study_table(nnunet_model, tmp_path):
    """deep_center on a center with one empty-tumour patient, then the study table with the radiomics rows."""
    root = tmp_path
    ingest = root / "ingest"
    shutil.copytree(nnunet_model["root"] / "ingest", ingest)
    center = nnunet_model["cases"][0]["center"]
    segmentation = root / "segmentation" / center
    segmentation.mkdir(parents=True)
    patients = [c["patient"] for c in nnunet_model["cases"]]
    for patient in patients:  # the manual masks stand in for the automatic ones
        shutil.copy(ingest / center / patient / "mask_manual.nii.gz", segmentation / f"{patient}.nii.gz")
    empty = sitk.ReadImage(str(segmentation / f"{patients[1]}.nii.gz"))
    empty = sitk.Cast(empty * sitk.Cast(empty != 2, empty.GetPixelID()), empty.GetPixelID())  # no tumour left
    sitk.WriteImage(empty, str(segmentation / f"{patients[1]}.nii.gz"))
    pd.DataFrame({"patient": patients + ["A-0099"], "status": ["included"] * 3 + ["excluded"]}).to_csv(
        segmentation / "qc.tsv", sep="\t", index=False)
    study, model = _write_study(root, nnunet_model["model"], center)
    out = root / "features" / "deep"
    out.mkdir(parents=True)
    table = features_stage.deep_center(study, center, segmentation, [ingest / center / p for p in patients], model,
                                       out / "A.parquet", out / "A.issues.tsv", out / "A.meta.json")
    assert table["patient"].tolist() == patients  # QC-passed patients only
    deep_cols = [c for c in table.columns if "_deep_nnunet_" in c]
    assert np.isnan(table.loc[1, deep_cols].to_numpy(float)).all()
    assert np.isfinite(table.loc[[0, 2], deep_cols].to_numpy(float)).all()
    issues = pd.read_csv(out / "A.issues.tsv", sep="\t")
    assert issues[["patient", "reason"]].values.tolist() == [[patients[1], "empty_region"]]
    meta = json.loads((out / "A.meta.json").read_text())
    assert meta["backbone"] == "nnunet" and meta["n_features"] == len(deep_cols) and meta["device"] == "cpu"

    rows = []
    for i, patient in enumerate(patients):  # radiomics rows as radiomics_patient writes them
        row = features.feature_row(patient, center, {"tumour_CT_original_firstorder_Mean": float(i)}, {}, "nan")
        rows.append(root / f"{patient}.parquet")
        features.write_row(row, rows[-1])
    study_table = features_stage.study_table(study, rows, root / "features.parquet", root / "qc.tsv",
                                             deep_tables=[out / "A.parquet"], deep_issues=[out / "A.issues.tsv"],
                                             deep_meta=[out / "A.meta.json"])
    written = pd.read_parquet(root / "features.parquet")
    pd.testing.assert_frame_equal(written, study_table)
    assert written["tumour_CT_original_firstorder_Mean"].tolist() == [0.0, 1.0, 2.0]  # radiomics unchanged
    np.testing.assert_array_equal(written[deep_cols].to_numpy(), table[deep_cols].to_numpy())
    qc = pd.read_csv(root / "qc.tsv", sep="\t", keep_default_na=False).set_index("patient")
    assert (qc["status"] == "included").all()
    assert "empty" in qc.loc[patients[1], "message"] and qc.loc[patients[0], "message"] == ""
    assert json.loads((root / "features.meta.json").read_text())["deep"]["backbone"] == "nnunet"
