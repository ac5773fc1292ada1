"""End to end: the real `snakemake` on a tiny demo study, with bad patients slipped into the delivery.

Proves: every rule that exists runs (ingestion, nnU-Net training and prediction, radiomics); unusable
patients are excluded with the right reason and counted in the patient flow, while the rest of the study
goes on; no identifying DICOM value reaches results/ or the logs; a second run has nothing to do;
`snakemake --lint` is clean.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
pytestmark = pytest.mark.slow
PATIENTS = 8  # per center: enough for the statistics stage to split, select and fit


def _run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def _tiny_study(workdir: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = "centers.tsv"
    config["demo"].update(patients=PATIENTS, annotated_fraction=0.3, rtstruct_per_center=1, workers=2, out_dir="demo")
    # a real but very short nnU-Net training: the test proves the chain, not the segmentation quality
    config["segmentation"].update(epochs=2, iterations_per_epoch=4, early_stopping_patience=None)
    config["segmentation"]["qc"]["on_flag"] = "warn"
    config["selection"]["lasso"]["cv_folds"] = 3
    config["features"]["robustness"] = {"enabled": True}  # ICC filter: perturbed-mask radiomics per patient
    config["evaluation"] = {"n_bootstrap": 100}
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
    (workdir / "centers.tsv").write_text(
        "id\trole\tdicom_root\tclinical\n"
        "A\tdevelopment\tdemo/dicom/A\tdemo/clinical/A.csv\n"
        "B\tdevelopment\tdemo/dicom/B\tdemo/clinical/B.csv\n"
        "C\texternal\tdemo/dicom/C\tdemo/clinical/C.csv\n"
    )


def _portal_files(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".nii.gz"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.Modality == "CT" and "LOCALIZER" not in ds.ImageType and int(ds.Rows) > 2:
                files.append((float(ds.SliceThickness), path))
    thinnest = min(t for t, _ in files)  # the portal series has the thinner slices
    return [p for t, p in files if t == thinnest]


def _slip_in_bad_patients(root: Path, clinical_csv: Path) -> dict[str, str]:
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


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    _tiny_study(workdir)
    demo = _run(workdir, "demo_cohort")
    assert demo.returncode == 0, demo.stderr[-3000:]
    expected = _slip_in_bad_patients(workdir / "demo" / "dicom" / "A", workdir / "demo" / "clinical" / "A.csv")
    run = _run(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir, expected, run


def test_bad_patients_are_excluded_with_their_reason(study):
    workdir, expected, _ = study
    key = pd.read_csv(workdir / "resources" / "private" / "pseudonym_key.tsv", sep="\t").set_index("original_id")
    exclusions = pd.read_csv(workdir / "results" / "qc" / "exclusions.tsv", sep="\t").set_index("patient")
    got = {name: exclusions.loc[key.loc[name, "pseudonym"], "reason"] for name in expected}
    assert got == expected
    assert len(exclusions) == len(expected)  # the generated patients all pass
    for patient, row in exclusions.iterrows():
        assert patient in row["message"]  # messages name the patient (pseudonym)


def test_patient_flow_counts_every_delivered_patient(study):
    workdir, expected, _ = study
    flow = pd.read_csv(workdir / "results" / "qc" / "patient_flow.tsv", sep="\t").set_index("center")
    assert flow.loc["A", "delivered"] == PATIENTS + len(expected)
    assert flow.loc["A", "included"] == PATIENTS and flow.loc["B", "included"] == PATIENTS
    assert flow.loc["A", "excluded"] == len(expected)
    for reason in set(expected.values()):
        assert flow.loc["A", f"excluded:{reason}"] == 1
    assert flow.loc["total", "delivered"] == 3 * PATIENTS + len(expected)


def test_included_patients_have_images_masks_and_clinical_rows(study):
    workdir, _, _ = study
    patients = pd.read_csv(workdir / "results" / "qc" / "patients.tsv", sep="\t")
    included = patients[patients["status"] == "included"]
    for _, row in included.iterrows():
        folder = workdir / "results" / "ingest" / row["center"] / row["patient"]
        image = sitk.ReadImage(str(folder / "image_CT.nii.gz"))
        assert image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32)
        if row["annotated"]:
            mask = sitk.ReadImage(str(folder / "mask_manual.nii.gz"))
            assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
            labels = set(sitk.GetArrayViewFromImage(mask).ravel().tolist())
            assert labels == {0, 1, 2}
    assert included["annotated"].sum() >= 6  # 30% of each center, one of them as RTSTRUCT
    clinical = pd.read_csv(workdir / "results" / "clinical" / "clinical.tsv", sep="\t")
    assert set(clinical["patient"]) == set(included["patient"])
    assert "patient_name" not in clinical.columns and "birth_date" not in clinical.columns


def test_every_included_patient_is_segmented_and_has_features(study):
    workdir, _, _ = study
    patients = pd.read_csv(workdir / "results" / "qc" / "patients.tsv", sep="\t")
    included = patients[patients["status"] == "included"]
    for row in included.itertuples():
        auto = sitk.ReadImage(str(workdir / "results" / "segmentation" / row.center / f"{row.patient}.nii.gz"))
        image = sitk.ReadImage(str(workdir / "results" / "ingest" / row.center / row.patient / "image_CT.nii.gz"))
        assert auto.GetSize() == image.GetSize() and auto.GetOrigin() == image.GetOrigin()
    dsc = pd.read_csv(workdir / "results" / "segmentation" / "dsc.tsv", sep="\t")
    assert set(dsc["region"]) == {"liver", "tumour"} and dsc["dsc"].between(0, 1).all()
    split = pd.read_csv(workdir / "results" / "segmentation" / "split.tsv", sep="\t")
    assert set(split["center"]) <= {"A", "B"}  # only development centers' annotations train nnU-Net
    table = pd.read_parquet(workdir / "results" / "features" / "features.parquet")
    assert set(table["patient"]) == set(included["patient"])
    names = [c for c in table.columns if c not in ("patient", "center", "excluded", "exclusion_reason")]
    assert "tumour_CT_original_firstorder_Mean" in names and "liver_CT_original_glcm_Contrast" in names
    assert all(n.split("_")[0] in {"tumour", "liver", "peritumoural"} and n.split("_")[1] == "CT" for n in names)
    # deep features (the study's nnU-Net encoder, one job per center): every included patient has them, or NaN
    # with the reason in the features qc.tsv (a 2-epoch nnU-Net may find no tumour)
    deep = [n for n in names if n.startswith("tumour_CT_deep_nnunet_")]
    meta = json.loads((workdir / "results" / "features" / "deep" / "A.meta.json").read_text())
    assert deep == [f"tumour_CT_deep_nnunet_{i:04d}" for i in range(meta["n_features"])] and len(deep) > 10
    qc = pd.read_csv(workdir / "results" / "features" / "qc.tsv", sep="\t", keep_default_na=False).set_index("patient")
    finite = table.set_index("patient")[deep].notna().all(axis=1)
    assert finite.sum() >= len(table) // 2
    assert all("deep features" in qc.loc[p, "message"] for p in finite.index[~finite])


def test_models_and_report(study):
    workdir, _, _ = study
    predictions = pd.read_csv(workdir / "results" / "models" / "predictions.tsv", sep="\t")
    assert set(predictions["endpoint"]) == {"binary", "survival"}
    assert {"clinical", "radiomic", "combined"} <= set(predictions["model"])
    assert set(predictions["cohort"]) == {"training", "validation", "test"}
    assert set(predictions.loc[predictions["cohort"] == "test", "center"]) == {"C"}
    html = (workdir / "results" / "report" / "report.html").read_text()
    assert "<img" in html and "ROC" in html and len(html) > 50_000
    # features.robustness on: perturbed-mask radiomics for every patient, ICC on the training patients
    perturbed = pd.read_parquet(workdir / "results" / "features" / "perturbed.parquet")
    features = pd.read_parquet(workdir / "results" / "features" / "features.parquet")
    assert set(perturbed["perturbation"]) == {"erode", "dilate"}
    assert set(perturbed["patient"]) == set(features["patient"])
    icc = pd.read_csv(workdir / "results" / "models" / "robustness.tsv", sep="\t")
    assert len(icc) and icc["icc"].notna().any() and set(icc["split"]) == {"holdout"}


def test_rtstruct_masks_are_ingested(study):
    workdir, _, _ = study
    import json

    sources = [json.loads(p.read_text())["mask"].get("source") for p in (workdir / "results" / "ingest").glob("*/*/qc.json")
               if json.loads(p.read_text())["status"] == "included"]
    assert sources.count("rtstruct") >= 3 and sources.count("label_map") >= 3


def _all_text(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".html":  # embedded figures: random base64 would match short values by chance
        return re.sub(rb"base64,[A-Za-z0-9+/=]+", b"base64,", data)
    return data


def test_no_identifying_value_reaches_results_or_logs(study):
    workdir, _, _ = study
    phi = pd.read_csv(workdir / "demo" / "ground_truth" / "phi.tsv", sep="\t", dtype=str)
    phi = phi[~phi["field"].isin(["PatientSex", "PatientAge"])]  # not identifying on their own
    values = {v for v in phi["value"].dropna() if len(v) >= 4}
    values |= {p.name for p in (workdir / "demo" / "dicom").glob("*/*")}  # original IDs (folder names)
    assert values
    # every text, table, NIfTI (decompressed) and HTML file; PNG/PDF figures are drawn from the pseudonymised tables
    files = [p for p in (workdir / "results").rglob("*") if p.is_file() and p.suffix not in (".png", ".pdf")]
    files += [p for p in (workdir / ".snakemake" / "log").glob("*.log")]
    assert len(files) > 20
    leaks = [(f, v) for f in files for v in values if v.encode() in _all_text(f)]
    assert not leaks, leaks[:5]


def test_second_run_has_nothing_to_do(study):
    workdir, _, _ = study
    dry = _run(workdir, "--dry-run")
    assert dry.returncode == 0
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_snakemake_lint_is_clean():
    run = subprocess.run([SNAKEMAKE, "--lint", "-s", str(REPO / "Snakefile")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Congratulations" in run.stdout + run.stderr, run.stdout + run.stderr


def test_a_trained_model_folder_in_the_config_is_used_without_training(study):
    """Runs last (it re-segments the study): the model trained above, copied as if from an earlier study."""
    workdir, _, _ = study
    trained = next((workdir / "resources" / "nnunet" / "results").rglob("plans.json")).parent
    given = workdir / "given_model"
    shutil.copytree(trained, given)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["segmentation"]["model_folder"] = "given_model"
    (workdir / "config_given.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config_given.yaml"), "--cores", "2", "--forcerun", "segment_center",
           "results/segmentation/dsc.tsv"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    jobs = set(re.findall(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", run.stdout + run.stderr, flags=re.M))
    assert {"segment_center", "segmentation_split", "segmentation_quality"} <= jobs
    assert not {j for j in jobs if j.startswith("nnunet_")}, jobs
    log = (workdir / "results" / "logs" / "segmentation" / "A.log").read_text()
    assert "given_model" in log
    assert (workdir / "results" / "segmentation" / "dsc.tsv").stat().st_size > 0
