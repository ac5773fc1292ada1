"""radstudy.segment.nnunet: real nnU-Net on a tiny synthetic dataset (slow), and the metrics / QC / post-processing
against hand-made masks with answers derived by hand (fast)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radstudy.segment import nnunet as segment
from tiny_nnunet import LABELS, SHAPE, SPACING, ellipsoid, synthetic_case, write  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- slow: real nnU-Net
@pytest.mark.slow
def test_raw_dataset_plans_and_training(tiny_nnunet):
    root, split = tiny_nnunet["root"], tiny_nnunet["split"]
    dataset = root / "nnUNet_raw" / "Dataset501_RadstudyTest"
    assert split["dataset"] == dataset.name
    # holdout per center: round(4 * 0.25) = 1 of each center's 4 annotated patients
    assert len(split["holdout"]) == 2 and len(split["train"]) == 6
    assert sorted(p[:2] for p in split["holdout"]) == ["C1", "C2"]
    assert not set(split["holdout"]) & set(split["train"])
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "CT"}
    assert info["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert info["numTraining"] == 6 and info["file_ending"] == ".nii.gz"
    assert info["radstudy_channels"] == ["CT"]
    images = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    assert images == sorted(f"{p}_0000.nii.gz" for p in split["train"])
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == sorted(f"{p}.nii.gz" for p in split["train"])
    label = sitk.ReadImage(str(dataset / "labelsTr" / f"{split['train'][0]}.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) == {0, 1, 2}
    # the same split again (seeded)
    again = segment.split_holdout(tiny_nnunet["cases"], holdout_fraction=0.25, seed=3)
    assert again == (split["train"], split["holdout"])

    plans = json.loads(tiny_nnunet["plans_file"].read_text())
    config = plans["configurations"]["2d"]
    n_stages = config["architecture"]["arch_kwargs"]["n_stages"]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [min(8 * 2**i, 128) for i in range(n_stages)]
    assert plans["radstudy_overrides"]["2d"]["features_per_stage"][0] == 8
    assert (tiny_nnunet["plans_file"].parent / "nnUNetPlans.planned.json").exists()

    model = tiny_nnunet["model"]
    assert model.name == "RadstudyTrainer__nnUNetPlans__2d"
    assert (model / "fold_all" / "checkpoint_final.pth").exists()
    assert (model / "plans.json").exists() and (model / "dataset.json").exists()
    summary = json.loads((model / "fold_all" / "radstudy_training.json").read_text())
    assert summary["epochs_run"] == 2 and summary["iterations_per_epoch"] == 10 and summary["seed"] == 11
    # training constructed the trainer directly: nnU-Net's trainer-name scan never ran
    assert not [m for m in sys.modules if m.startswith("nnunetv2.training.nnUNetTrainer.variants")
                or m.startswith("nnunetv2.training.nnUNetTrainer.primus")]
    assert "timm" not in sys.modules and "torchvision" not in sys.modules


@pytest.mark.slow
def test_predict_holdout_one_call(tiny_nnunet, tmp_path):
    holdout = [c for c in tiny_nnunet["cases"] if c["patient"] in tiny_nnunet["split"]["holdout"]]
    out = segment.predict(tiny_nnunet["model"], holdout, tmp_path / "C-all", device="cpu", npp=1, nps=1, threads=1)
    assert [p.name for p in out] == [f"{c['patient']}.nii.gz" for c in holdout]
    for case, path in zip(holdout, out):
        seg, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(case["images"]["CT"]))
        assert seg.GetSize() == image.GetSize()
        assert seg.GetOrigin() == image.GetOrigin()
        assert seg.GetSpacing() == image.GetSpacing()
        assert seg.GetDirection() == image.GetDirection()
        assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1, 2}
        rows = segment.overlap_metrics(seg, sitk.ReadImage(str(case["mask"])), LABELS)
        assert [r["region"] for r in rows] == ["liver", "tumour"]
        assert all(0.0 <= r["dsc"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_predict_user_model_folder_without_scan(tiny_nnunet, tmp_path):
    """A results folder trained elsewhere with the stock trainer (copied, no preprocessed data around),
    predicted in a fresh process, sequentially, with TTA: no trainer-name module scan (no timm, no nnU-Net
    trainer variants imported)."""
    import torch

    # as nnU-Net's stock trainer leaves it: its trainer name in the checkpoint, a dataset.json without our keys
    user_model = tmp_path / "their_results" / "Dataset501_Other" / "nnUNetTrainer__nnUNetPlans__2d"
    shutil.copytree(tiny_nnunet["model"], user_model)
    checkpoint = user_model / "fold_all" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["trainer_name"] = "nnUNetTrainer"
    torch.save(saved, checkpoint)
    info = json.loads((user_model / "dataset.json").read_text())
    del info["radstudy_channels"]
    (user_model / "dataset.json").write_text(json.dumps(info))
    case = next(c for c in tiny_nnunet["cases"] if c["patient"] in tiny_nnunet["split"]["holdout"])
    script = textwrap.dedent(f"""
        import json, sys
        from radstudy.segment import nnunet as segment
        out = segment.predict({str(user_model)!r},
                              [{{"patient": {case['patient']!r}, "images": {{"CT": {str(case['images']['CT'])!r}}}}}],
                              {str(tmp_path / 'out')!r}, device="cpu", tta=True, npp=0, nps=0, threads=1)
        scanned = [m for m in sys.modules if m.startswith(("nnunetv2.training.nnUNetTrainer.variants",
                                                            "nnunetv2.training.nnUNetTrainer.primus"))]
        print(json.dumps({{"out": [str(p) for p in out], "timm": "timm" in sys.modules,
                          "torchvision": "torchvision" in sys.modules, "scanned": scanned}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    env.pop("nnUNet_extTrainer", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"out": [str(tmp_path / "out" / f"{case['patient']}.nii.gz")], "timm": False,
                      "torchvision": False, "scanned": []}
    seg = sitk.ReadImage(report["out"][0])
    assert seg.GetSize() == SHAPE[::-1] and seg.GetSpacing() == SPACING
    assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1, 2}


# ----------------------------------------------------------------------------- fast: module hygiene
def test_import_is_light_and_side_effect_free():
    code = ("import os, sys; before = dict(os.environ); import radstudy.segment.nnunet; "
            "heavy = [m for m in ('torch', 'torchvision', 'timm', 'nnunetv2') if m in sys.modules]; "
            "print(heavy, before == dict(os.environ))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True"


def test_nnunet_environment_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/somewhere/else")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with segment.nnunet_environment(preprocessed=tmp_path, extra={"nnUNet_n_proc_DA": "0"}):
        assert os.environ["nnUNet_preprocessed"] == str(tmp_path.resolve())
        assert "nnUNet_raw" not in os.environ  # a user's setting cannot add dataset candidates
        assert os.environ["nnUNet_n_proc_DA"] == "0"
    assert os.environ["nnUNet_raw"] == "/somewhere/else"
    assert "nnUNet_preprocessed" not in os.environ and "nnUNet_results" not in os.environ


def test_split_holdout_per_center():
    cases = [{"patient": f"A-{i:04d}", "center": "A"} for i in range(10)] + \
            [{"patient": f"B-{i:04d}", "center": "B"} for i in range(2)] + \
            [{"patient": "C-0001", "center": "C"}]
    train, holdout = segment.split_holdout(cases, holdout_fraction=0.3, seed=1)
    assert sum(p.startswith("A") for p in holdout) == 3  # round(10 * 0.3)
    assert sum(p.startswith("B") for p in holdout) == 1  # at least one, at least one kept for training
    assert "C-0001" in train  # a center's only annotated patient trains
    assert sorted(train + holdout) == sorted(c["patient"] for c in cases)
    assert segment.split_holdout(cases, holdout_fraction=0.3, seed=1) == (train, holdout)
    assert segment.split_holdout(cases[:10], holdout_fraction=0.3, seed=1)[1] == [p for p in holdout if p[0] == "A"]


# ----------------------------------------------------------------------------- fast: evaluate()
def _image(array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing)
    return img


def _cube(shape, start, n, label=1, axis_shift=None, k=0):
    array = np.zeros(shape, np.uint8)
    lo = [start, start, start]
    if axis_shift is not None:
        lo[axis_shift] += k
    array[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n] = label
    return array


@pytest.mark.parametrize("axis, k", [(2, 3), (0, 3), (1, 1)])
def test_evaluate_offset_cubes_anisotropic(axis, k):
    """Two n=10 cubes offset by k voxels along one axis (spacing x=0.7, y=0.8, z=2.5 mm).

    DSC = 2 n^2 (n-k) / (2 n^3) = (n-k)/n. HD95, by hand: every surface voxel of one cube is at most k voxels
    (k * s_axis mm) from the other's surface along the shift axis (the face planes of the other cube cover it),
    and the n^2 voxels of its trailing face are exactly k * s_axis away (any other surface voxel of the other
    cube is farther); these are n^2 / (n^3 - (n-2)^3) = 100/488 = 20% > 5% of the surface voxels, so the
    95th percentile is k * s_axis in both directions."""
    spacing_xyz = (0.7, 0.8, 2.5)
    spacing_axis = spacing_xyz[::-1][axis]  # array axes are z, y, x
    shape = (20, 20, 20)
    auto = _image(_cube(shape, 4, 10), spacing_xyz)
    manual = _image(_cube(shape, 4, 10, axis_shift=axis, k=k), spacing_xyz)
    (row,) = segment.overlap_metrics(auto, manual, {"liver": 1})
    assert row["dsc"] == pytest.approx((10 - k) / 10)
    assert row["hd95"] == pytest.approx(k * spacing_axis)
    assert row["volume_auto_ml"] == pytest.approx(1000 * 0.7 * 0.8 * 2.5 / 1000)
    assert row["volume_manual_ml"] == row["volume_auto_ml"]


def test_evaluate_identical_touching_border_and_empty():
    shape = (12, 12, 12)
    cube = _cube(shape, 0, 6)  # touches the image border: the border counts as outside
    (row,) = segment.overlap_metrics(_image(cube), _image(cube), {"liver": 1})
    assert row["dsc"] == 1.0 and row["hd95"] == 0.0

    empty = np.zeros(shape, np.uint8)
    rows = segment.overlap_metrics(_image(empty), _image(empty), LABELS)
    assert [r["dsc"] for r in rows] == [1.0, 1.0] and all(math.isnan(r["hd95"]) for r in rows)
    assert all(r["volume_auto_ml"] == 0 and r["volume_manual_ml"] == 0 for r in rows)
    rows = segment.overlap_metrics(_image(empty), _image(cube), LABELS)
    assert rows[0]["dsc"] == 0.0 and math.isnan(rows[0]["hd95"])
    assert rows[0]["volume_manual_ml"] == pytest.approx(6**3 / 1000)
    assert rows[1]["dsc"] == 1.0  # no tumour in either


def test_evaluate_rejects_other_grid():
    a = _image(np.zeros((4, 4, 4)), (1, 1, 1))
    b = _image(np.zeros((4, 4, 4)), (1, 1, 2))
    with pytest.raises(ValueError):
        segment.overlap_metrics(a, b, LABELS)


# ----------------------------------------------------------------------------- fast: QC and post-processing
def _liver_with_tumour(spacing=(1.0, 1.0, 1.0)):
    array = np.zeros((30, 30, 30), np.uint8)
    array[5:25, 5:25, 5:25] = 1  # liver: 8000 voxels
    array[12:16, 12:16, 12:16] = 2  # tumour inside: 64 voxels
    return array


def test_qc_flags():
    limits = {"min_ml": {"liver": 5.0, "tumour": 0.005}, "max_ml": {"liver": 20.0}}
    normal = _liver_with_tumour()  # 1 mm voxels: liver 8 - 0.064 ml, tumour 0.064 ml
    assert segment.qc_segmentation(_image(normal), LABELS, **limits) == []

    no_tumour = normal.copy()
    no_tumour[no_tumour == 2] = 1
    assert segment.qc_segmentation(_image(no_tumour), LABELS, **limits) == ["empty:tumour"]

    oversize = _image(normal, (1.5, 1.5, 1.5))  # liver ~26.8 ml
    assert segment.qc_segmentation(oversize, LABELS, **limits) == ["too_large:liver"]
    small = _image(normal, (0.5, 0.5, 0.5))  # liver ~1 ml, tumour 0.008 ml
    assert segment.qc_segmentation(small, LABELS, **limits) == ["too_small:liver"]

    outside = normal.copy()
    outside[27:29, 27:29, 27:29] = 2  # a second 'tumour' away from the liver
    assert segment.qc_segmentation(_image(outside), LABELS, **limits) == ["tumour_outside_liver"]
    assert segment.qc_segmentation(_image(outside), LABELS, region_check=False, **limits) == []

    exophytic = normal.copy()
    exophytic[12:16, 12:16, 12:16] = 1
    exophytic[12:16, 12:16, 23:28] = 2  # straddles the liver surface
    assert segment.qc_segmentation(_image(exophytic), LABELS, **limits) == []
    assert segment.qc_segmentation(_image(exophytic), LABELS, tumour_outside_liver_expected=False,
                                   **limits) == ["tumour_not_enclosed_by_liver"]
    assert segment.qc_segmentation(_image(normal), LABELS, tumour_outside_liver_expected=False, **limits) == []


def test_postprocess_largest_component_per_label():
    array = _liver_with_tumour()
    array[27:29, 27:29, 27:29] = 1  # a stray liver island
    array[1:3, 1:3, 1:3] = 2  # a second tumour
    image = _image(array, (0.8, 0.8, 2.0))
    out = segment.postprocess(image, LABELS, largest_component={"liver": True, "tumour": False})
    result = sitk.GetArrayFromImage(out)
    assert (result[27:29, 27:29, 27:29] == 0).all()
    assert (result[1:3, 1:3, 1:3] == 2).all()
    assert (result[5:25, 5:25, 5:25] == array[5:25, 5:25, 5:25]).all()
    assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    default = sitk.GetArrayFromImage(segment.postprocess(image, LABELS, largest_component=None))
    assert (default == result).all()  # default: liver yes, tumour no
    both = sitk.GetArrayFromImage(segment.postprocess(image, LABELS, largest_component={"liver": True, "tumour": True}))
    assert (both[1:3, 1:3, 1:3] == 0).all()
    with pytest.raises(ValueError):
        segment.postprocess(image, LABELS, largest_component={"spleen": True})

    manual = _image(_liver_with_tumour(), (0.8, 0.8, 2.0))
    choice = _choose_postprocessing([(image, manual)], LABELS)
    assert choice == {"liver": True, "tumour": True}


def _choose_postprocessing(pairs, labels) -> dict[str, bool]:
    """nnU-Net's determine_postprocessing criterion on (auto, manual) pairs: per label, keep-largest-component
    is switched on if it raises that label's mean DSC (strictly)."""
    choice = {}
    for region, value in labels.items():
        before = [r["dsc"] for auto, manual in pairs for r in segment.overlap_metrics(auto, manual, {region: value})]
        after = [r["dsc"] for auto, manual in pairs
                 for r in segment.overlap_metrics(segment.postprocess(auto, {region: value},
                                                                      largest_component={region: True}),
                                                  manual, {region: value})]
        choice[region] = bool(pairs) and float(np.mean(after)) > float(np.mean(before))
    return choice


# ----------------------------------------------------------------------------- fast: raw dataset and channels
def test_build_raw_dataset_two_channels_and_checks(tmp_path):
    cases = []
    for center in ("C1", "C2"):
        for i in (1, 2):
            patient = f"{center}-{i:04d}"
            folder = tmp_path / "ingest" / center / patient
            mask = np.zeros((4, 8, 8), np.uint8)
            mask[1:3, 2:6, 2:6] = 1
            mask[2, 3:5, 3:5] = 2
            write(np.full((4, 8, 8), 100, np.int16), folder / "image_venous.nii.gz")
            write(np.full((4, 8, 8), 60.0, np.float32), folder / "image_arterial.nii.gz")
            write(mask, folder / "mask_manual.nii.gz", sitk.sitkInt16)
            cases.append({"patient": patient, "center": center, "mask": folder / "mask_manual.nii.gz",
                          "images": {"venous": folder / "image_venous.nii.gz",
                                     "arterial": folder / "image_arterial.nii.gz"}})
    split = segment.build_raw_dataset(cases, tmp_path / "raw", dataset_id=7, name="Two",
                                      channels=["arterial", "venous"], labels=LABELS, holdout_fraction=0.5,
                                      seed=0, normalization={"arterial": "CT", "venous": "zscore"})
    assert len(split["train"]) == 2 and len(split["holdout"]) == 2  # one of each center's two
    dataset = tmp_path / "raw" / "Dataset007_Two"
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "CT", "1": "zscore"}
    assert info["radstudy_channels"] == ["arterial", "venous"]
    patient = split["train"][0]
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "imagesTr" / f"{patient}_0000.nii.gz")))
    second = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "imagesTr" / f"{patient}_0001.nii.gz")))
    assert (first == 60).all() and (second == 100).all()  # channel order = `channels`
    assert sitk.ReadImage(str(dataset / "labelsTr" / f"{patient}.nii.gz")).GetPixelID() == sitk.sitkUInt8
    assert json.loads((dataset / "radstudy_split.json").read_text())["holdout"] == split["holdout"]

    bad = dict(cases[0], mask=tmp_path / "bad.nii.gz")
    wrong = np.zeros((4, 8, 8), np.uint8)
    wrong[0, 0, 0] = 5
    write(wrong, bad["mask"])
    with pytest.raises(ValueError, match="not in labels"):
        segment.build_raw_dataset([bad] + cases[1:], tmp_path / "raw", dataset_id=7, name="Two",
                                  channels=["venous"], labels=LABELS, holdout_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="no image for channel"):
        segment.build_raw_dataset(cases, tmp_path / "raw", dataset_id=7, name="Two", channels=["portal"],
                                  labels=LABELS, holdout_fraction=0.0, seed=0)
    with pytest.raises(FileExistsError):
        segment.build_raw_dataset(cases, tmp_path / "raw", dataset_id=7, name="Other", channels=["venous"],
                                  labels=LABELS, holdout_fraction=0.0, seed=0)


def test_channel_order_for_our_and_user_models():
    one = [{"patient": "A-0001", "images": {"venous": "v.nii.gz"}}]
    two = [{"patient": "A-0001", "images": {"venous": "v.nii.gz", "arterial": "a.nii.gz"}}]
    ours = {"channel_names": {"0": "CT", "1": "CT"}, "radstudy_channels": ["arterial", "venous"]}
    assert segment._channel_order(ours, two, None) == ["arterial", "venous"]
    named = {"channel_names": {"0": "venous"}}
    assert segment._channel_order(named, two, None) == ["venous"]  # a user model whose channel is named
    stock = {"channel_names": {"0": "CT"}}
    assert segment._channel_order(stock, one, None) is None  # one channel, one image
    assert segment._channel_order(stock, two, ["venous"]) == ["venous"]
    with pytest.raises(ValueError, match="channels="):
        segment._channel_order(stock, two, None)
    with pytest.raises(ValueError, match="takes 2"):
        segment._channel_order(ours, two, ["venous"])


# ----------------------------------------------------------------------------- slow (imports torch): the trainer
@pytest.mark.slow
def test_trainer_folder_is_usable_as_nnUNet_extTrainer():
    """The second half of nnU-Net's trainer lookup (what it does with nnUNet_extTrainer) finds our trainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from radstudy.segment.nnunet_trainers import FOLDER

    found = recursive_find_python_class(str(FOLDER), "RadstudyTrainer", None, base_folder=str(FOLDER),
                                        cleanup_imports_from_base_folder=True)
    assert found is not None and issubclass(found, nnUNetTrainer) and found.__module__ == "radstudy_trainer"


@pytest.mark.slow
def test_trainer_early_stopping_on_ema(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from radstudy.segment.nnunet_trainers.radstudy_trainer import RadstudyTrainer

    monkeypatch.setattr(nnUNetTrainer, "on_epoch_end", lambda self: None)
    trainer = RadstudyTrainer.__new__(RadstudyTrainer)  # only the early-stopping state
    trainer.early_stopping_patience, trainer.early_stopping_min_delta = 2, 0.01
    trainer._es_best, trainer._es_wait = None, 0
    ema = {"value": None}
    trainer.logger = type("Logger", (), {"get_value": lambda self, key, step: ema["value"]})()
    stops = []
    for value in (0.5, 0.6, 0.605, 0.61, 0.7, 0.69, 0.70):
        ema["value"] = value
        trainer.on_epoch_end()
        stops.append(trainer._should_stop_early())
    # 0.605 and 0.61 do not beat 0.6 by more than 0.01: the second of them reaches the patience
    assert stops == [False, False, False, True, False, False, True]


def test_the_study_gives_nnunet_a_zscore_scheme_for_every_channel_that_is_not_ct():
    """An MR study segmented by nnU-Net: each MR channel normalised per image (zscore), a CT channel as CT; the
    config's MRI demo (T2W + ADC) is the example."""
    import yaml

    from radstudy.config import validate_config
    from radstudy.segment.stage import nnunet_normalization

    repo = Path(__file__).resolve().parents[2]
    mri = validate_config(yaml.safe_load((repo / "config" / "mri" / "config.yaml").read_text()))
    assert nnunet_normalization(mri) == {"T2W": "zscore", "ADC": "zscore"}
    ct = validate_config(yaml.safe_load((repo / "config" / "config.yaml").read_text()))
    assert nnunet_normalization(ct) == {"CT": "CT"}
    ct["ingest"]["channels"]["PET"] = {"modality": "PT"}
    assert nnunet_normalization(ct) == {"CT": "CT", "PET": "zscore"}
