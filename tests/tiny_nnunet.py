"""The suite's one tiny trained nnU-Net: synthetic ingest-shaped CTs of two centers, a raw dataset, plans, and a
2-epoch 2d training on CPU. Built once per pytest run (`tiny_nnunet` in tests/conftest.py) and read by the
segmentation and deep-feature tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from radstudy.segment import nnunet as segment

LABELS = {"liver": 1, "tumour": 2}
SHAPE = (32, 64, 64)  # z, y, x
SPACING = (1.5, 1.5, 3.0)  # x, y, z (mm)


def ellipsoid(shape, centre, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    distance = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    return distance + ((x - centre[2]) / radii[2]) ** 2 <= 1


def synthetic_case(rng: np.random.Generator, offset_hu: float):
    """A CT-like volume (HU): air, a body, a bright 'liver' ellipsoid with a darker 'tumour' blob, noise."""
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    body = ellipsoid(SHAPE, (16, 32, 32), (20, 28, 30))
    image[body] = 50.0  # soft tissue: between tumour and liver after CT normalisation
    liver_centre = (16 + rng.integers(-2, 3), 30 + rng.integers(-4, 5), 26 + rng.integers(-4, 5))
    liver = ellipsoid(SHAPE, liver_centre, (9 + rng.integers(0, 3), 14 + rng.integers(0, 4), 13 + rng.integers(0, 4)))
    tumour_centre = (liver_centre[0], liver_centre[1] + rng.integers(-3, 4), liver_centre[2] + rng.integers(-3, 4))
    tumour = ellipsoid(SHAPE, tumour_centre, (3.5, 6 + rng.integers(0, 3), 6 + rng.integers(0, 3))) & liver
    image[liver] = 130.0
    image[tumour] = 20.0
    image += offset_hu + rng.normal(0, 12, SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[liver] = 1
    mask[tumour] = 2
    return image, mask


def write(array, path: Path, pixel=None):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin((-40.0, 12.5, 100.0))
    if pixel is not None:
        img = sitk.Cast(img, pixel)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def make_ingest(root: Path, per_center: int = 4) -> list[dict]:
    rng = np.random.default_rng(7)
    cases = []
    for center, offset in (("C1", 0.0), ("C2", 25.0)):
        for i in range(1, per_center + 1):
            patient = f"{center}-{i:04d}"
            folder = root / "ingest" / center / patient
            image, mask = synthetic_case(rng, offset)
            write(np.round(image).astype(np.int16), folder / "image_CT.nii.gz")
            write(mask, folder / "mask_manual.nii.gz")
            (folder / "qc.json").write_text("{}")
            cases.append({"patient": patient, "center": center, "images": {"CT": folder / "image_CT.nii.gz"},
                          "mask": folder / "mask_manual.nii.gz"})
    return cases


def train_tiny_nnunet(root: Path) -> dict:
    """Ingest-shaped data -> raw dataset -> plans -> a tiny training: {root, cases, split, plans_file, model}."""
    cases = make_ingest(root)
    split = segment.build_raw_dataset(cases, root / "nnUNet_raw", dataset_id=501, name="RadstudyTest",
                                      channels=["CT"], labels=LABELS, holdout_fraction=0.25, seed=3)
    plans_file = segment.plan_and_preprocess(root / "nnUNet_raw", root / "nnUNet_preprocessed", dataset_id=501,
                                             configuration="2d", features_per_stage=8, num_processes=1)
    model = segment.train(root / "nnUNet_preprocessed", root / "nnUNet_results", dataset_id=501,
                          configuration="2d", epochs=2, iterations_per_epoch=10, val_iterations_per_epoch=2,
                          early_stopping_patience=None, device="cpu", seed=11, threads=1)
    return {"root": root, "cases": cases, "split": split, "plans_file": plans_file, "model": model}
