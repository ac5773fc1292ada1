"""The tiny study every end-to-end test reads: 3 centers x 8 patients of the demo generator (A, B development,
C external), 2-epoch nnU-Net, light radiomics, robustness on, and five broken patients slipped into A's delivery.

It is generated and run once per pytest run (`tiny_study` in tests/workflow/conftest.py); a test that changes
the study works on a copy (`copy_study`).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
PATIENTS = 8  # per center: enough for the statistics stage to split, select and fit


def run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def _write_centers(workdir: Path, ids: tuple[str, str, str]) -> None:
    """The centers sheet of a tiny study: two development centers and an external one, delivered under demo/."""
    roles = ("development", "development", "external")
    (workdir / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\n" + "".join(
        f"{c}\t{r}\tdemo/dicom/{c}\tdemo/clinical/{c}.csv\n" for c, r in zip(ids, roles)))


def write_tiny_study(workdir: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = "centers.tsv"
    # 3 annotated patients per center: one RTSTRUCT, one DICOM SEG, one NIfTI label map
    # half-resolution matrices (48 x 48 in-plane, ~32 slices of twice the thickness): the same physical anatomy on
    # 8x fewer voxels, so that ingestion, nnU-Net prediction and radiomics (run again on SLURM) take a fraction
    config["demo"].update(patients=PATIENTS, annotated_fraction=0.4, rtstruct_per_center=1, seg_per_center=1, workers=2,
                          out_dir="demo", downsample=2)
    # a real but very short nnU-Net training: the test proves the chain, not the segmentation quality
    config["segmentation"].update(epochs=2, iterations_per_epoch=4, early_stopping_patience=None)
    config["segmentation"]["qc"]["on_flag"] = "warn"
    config["selection"]["lasso"]["cv_folds"] = 3
    config["features"]["robustness"] = {"enabled": True}  # ICC filter: perturbed-mask radiomics per patient
    config["evaluation"] = {"n_bootstrap": 100}
    # the end-to-end networks for a few epochs: the test proves the chain, not what they learn
    config["networks"].update(epochs=2, early_stopping_patience=None, saliency_patients=1)
    config["networks"]["multitask"]["warmup_epochs"] = 1  # below the 2 epochs: the heads train in epoch 2
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # Original-image first-order and GLCM features only: a 2-epoch nnU-Net segments badly, and filters or shape
    # (maximum diameters) of its oversized regions would dominate the test's run time (tests/test_features.py
    # covers them).
    params = yaml.safe_load((REPO / "config" / "radiomics" / "demo.yaml").read_text())
    params["imageType"] = {"Original": {}}
    params["featureClass"] = {"firstorder": None, "glcm": None}
    (workdir / "radiomics.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config["features"]["radiomics"]["params"] = "radiomics.yaml"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _write_centers(workdir, ('A', 'B', 'C'))


def _portal_files(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".nii.gz"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.Modality == "CT" and "LOCALIZER" not in ds.ImageType and int(ds.Rows) > 2:
                files.append((float(ds.SliceThickness), path))
    thinnest = min(t for t, _ in files)  # the portal series has the thinner slices
    return [p for t, p in files if t == thinnest]


def slip_in_bad_patients(root: Path, clinical_csv: Path) -> dict[str, str]:
    """Copies of good patients, each broken in one way; returns folder -> expected exclusion reason."""
    good = sorted(p for p in root.iterdir() if p.is_dir())
    with_nifti = next(p for p in good if list(p.glob("**/*_seg.nii.gz")))
    expected = {}

    broken = root / "ZZ_UNREADABLE"
    broken.mkdir()
    (broken / "IM0001").write_bytes(b"\x00" * 300)
    (broken / "notes.dcm").write_text("not dicom")
    expected[broken.name] = "unreadable_files"

    gap = root / "ZZ_GAP"
    shutil.copytree(good[0], gap)
    portal = sorted(_portal_files(gap), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    portal[len(portal) // 2].unlink()
    expected[gap.name] = "geometry_gap"

    no_series = root / "ZZ_NOSERIES"
    shutil.copytree(good[0], no_series)
    for path in _portal_files(no_series):
        path.unlink()
    # the remaining non-contrast series has no "portal" in its description: nothing matches
    expected[no_series.name] = "no_matching_series"

    grid = root / "ZZ_MASKGRID"
    shutil.copytree(with_nifti, grid)
    mask_path = next(grid.glob("**/*_seg.nii.gz"))
    mask = sitk.ReadImage(str(mask_path))
    mask.SetOrigin([o + 5.0 for o in mask.GetOrigin()])
    sitk.WriteImage(mask, str(mask_path))
    expected[grid.name] = "mask_grid_mismatch"

    no_clinical = root / "ZZ_NOCLINICAL"
    shutil.copytree(good[1], no_clinical)
    expected[no_clinical.name] = "no_clinical_record"

    clinical = pd.read_csv(clinical_csv)
    template = clinical[clinical["patient_id"] == good[0].name].iloc[0]
    for name in expected:
        if name != no_clinical.name:
            row = template.copy()
            row["patient_id"] = name
            clinical.loc[len(clinical)] = row
    clinical.to_csv(clinical_csv, index=False)
    return expected


@dataclass(frozen=True)
class Study:
    workdir: Path
    expected: dict[str, str]  # broken patient folder -> the exclusion reason it must get
    output: str  # snakemake's output of the full run


def copy_study(study: Study, to: Path) -> Path:
    """A copy of the study (results, Snakemake's metadata and modification times kept) that a test may change."""
    shutil.copytree(study.workdir, to, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("locks", "incomplete"))
    return to


# ------------------------------------------------------------------ what every study must keep out of results/ and logs

def _all_text(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".html":  # embedded figures: random base64 would match short values by chance
        return re.sub(rb"base64,[A-Za-z0-9+/=]+", b"base64,", data)
    return data


def phi_leaks(workdir: Path, demo_dir: str = "demo") -> list[tuple[Path, str]]:
    """(file, value) for every identifying value the demo wrote (ground_truth/phi.tsv; the original patient IDs, as
    folder names) found in a file under results/ or in Snakemake's logs: every text, table, NIfTI (decompressed) and
    HTML file (PNG/PDF figures are drawn from the pseudonymised tables). Each file is read once."""
    phi = pd.read_csv(workdir / demo_dir / "ground_truth" / "phi.tsv", sep="\t", dtype=str)
    phi = phi[~phi["field"].isin(["PatientSex", "PatientAge"])]  # not identifying on their own
    values = {v for v in phi["value"].dropna() if len(v) >= 4}
    values |= {p.name for p in (workdir / demo_dir / "dicom").glob("*/*")}  # original IDs (folder names)
    assert values
    files = [p for p in (workdir / "results").rglob("*") if p.is_file() and p.suffix not in (".png", ".pdf")]
    files += list((workdir / ".snakemake" / "log").glob("*.log"))
    assert len(files) > 20
    return [(f, v) for f in files for text in [_all_text(f)] for v in values if v.encode() in text]


# ------------------------------------------------------------------ the tiny MRI study (config/mri/, made small)

MRI_PATIENTS = 10  # per center; MRI_ANNOTATED of them with a mask: one per center is delivered without one
MRI_ANNOTATED = 9


def write_tiny_mri_study(workdir: Path) -> None:
    """config/mri/ (the MRI demo study) at a test's size: 3 centers x 8 patients on half-resolution matrices, light
    radiomics (original image, first order + GLCM; shape on T2W), 3 folds, 1-epoch networks, 50 bootstraps."""
    workdir.mkdir(parents=True, exist_ok=True)
    for item in (REPO / "config" / "mri").iterdir():
        shutil.copy2(item, workdir / item.name)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["demo"].update(patients=MRI_PATIENTS, annotated_fraction=MRI_ANNOTATED / MRI_PATIENTS, downsample=2,
                          out_dir="demo")
    config["design"]["kfold"]["folds"] = 3
    config["selection"]["lasso"]["cv_folds"] = 3
    config["networks"].update(epochs=1, early_stopping_patience=None, saliency_patients=1)
    config["evaluation"]["n_bootstrap"] = 50
    for channel in ("t2w", "adc"):
        params = yaml.safe_load((workdir / f"radiomics_{channel}.yaml").read_text())
        params["imageType"] = {"Original": {}}
        params["featureClass"] = {"firstorder": None, "glcm": None, **({"shape": None} if channel == "t2w" else {})}
        (workdir / f"radiomics_{channel}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _write_centers(workdir, ('R1', 'R2', 'R3'))


# ------------------------------------------------------------------ a study run in a process of its own

RUN_OUTPUT, EXPECTED = "snakemake_output.txt", "expected_exclusions.json"


def build_and_run(kind: str, workdir: Path) -> int:
    """Write the tiny study of `kind` (ct: the shared tiny study with its broken patients; mri: the tiny MRI study)
    into workdir and run it end to end; snakemake's output goes to workdir/RUN_OUTPUT, the broken patients' expected
    exclusion reasons to workdir/EXPECTED. Returns snakemake's exit code. Run by tests/conftest.py in a background
    process while the rest of the suite runs (most of it is single-threaded; the machine has a core to spare)."""
    if kind == "ct":  # the hospitals' deliveries first, then the broken patients slipped into A's
        write_tiny_study(workdir)
        demo = run(workdir, "demo_cohort")
        if demo.returncode != 0:
            (workdir / RUN_OUTPUT).write_text("demo_cohort failed:\n" + demo.stdout + demo.stderr)
            return demo.returncode
        expected = slip_in_bad_patients(workdir / "demo" / "dicom" / "A", workdir / "demo" / "clinical" / "A.csv")
        (workdir / EXPECTED).write_text(json.dumps(expected))
    else:
        write_tiny_mri_study(workdir)
    full = run(workdir)
    (workdir / RUN_OUTPUT).write_text(full.stdout + full.stderr)
    return full.returncode


if __name__ == "__main__":
    sys.exit(build_and_run(sys.argv[1], Path(sys.argv[2])))
