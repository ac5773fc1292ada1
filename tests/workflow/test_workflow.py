"""End to end: the real `snakemake` on the shared tiny study (tests/workflow/tiny_study.py), with bad patients
slipped into the delivery.

Proves: every rule runs (ingestion, nnU-Net training and prediction, radiomics, deep features, robustness,
statistics, report); unusable patients are excluded with the right reason and counted in the patient flow, while
the rest of the study goes on; no identifying DICOM value reaches results/ or the logs; a second run has nothing
to do; a model folder given in the config is used without training (on a copy). The lint of every config
variant is tests/test_lint.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from tiny_study import PATIENTS, REPO, SNAKEMAKE, copy_study, phi_leaks, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_bad_patients_are_excluded_with_their_reason(tiny_study):
    workdir, expected = tiny_study.workdir, tiny_study.expected
    key = pd.read_csv(workdir / "resources" / "private" / "pseudonym_key.tsv", sep="\t").set_index("original_id")
    exclusions = pd.read_csv(workdir / "results" / "qc" / "exclusions.tsv", sep="\t").set_index("patient")
    got = {name: exclusions.loc[key.loc[name, "pseudonym"], "reason"] for name in expected}
    assert got == expected
    assert len(exclusions) == len(expected)  # the generated patients all pass
    for patient, row in exclusions.iterrows():
        assert patient in row["message"]  # messages name the patient (pseudonym)


def test_patient_flow_counts_every_delivered_patient(tiny_study):
    workdir, expected = tiny_study.workdir, tiny_study.expected
    flow = pd.read_csv(workdir / "results" / "qc" / "patient_flow.tsv", sep="\t").set_index("center")
    assert flow.loc["A", "delivered"] == PATIENTS + len(expected)
    assert flow.loc["A", "included"] == PATIENTS and flow.loc["B", "included"] == PATIENTS
    assert flow.loc["A", "excluded"] == len(expected)
    for reason in set(expected.values()):
        assert flow.loc["A", f"excluded:{reason}"] == 1
    assert flow.loc["total", "delivered"] == 3 * PATIENTS + len(expected)


def test_included_patients_have_images_masks_and_clinical_rows(tiny_study):
    workdir = tiny_study.workdir
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
    assert included["annotated"].sum() >= 9  # 40% of each center: NIfTI, RTSTRUCT and SEG
    clinical = pd.read_csv(workdir / "results" / "clinical" / "clinical.tsv", sep="\t")
    assert set(clinical["patient"]) == set(included["patient"])
    assert "patient_name" not in clinical.columns and "birth_date" not in clinical.columns


def test_every_included_patient_is_segmented_and_has_features(tiny_study):
    workdir = tiny_study.workdir
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


def test_models_and_report(tiny_study):
    workdir = tiny_study.workdir
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


def test_end_to_end_networks_join_the_predictions_and_the_report(tiny_study):
    """cnn and cnn_clinical for both endpoints and every cohort, in the study's predictions with the study's
    cohorts; learning curves, saliency maps and the saved networks; the report shows them."""
    workdir = tiny_study.workdir
    predictions = pd.read_csv(workdir / "results" / "models" / "predictions.tsv", sep="\t")
    networks = predictions[predictions["model"].isin(["cnn", "cnn_clinical"])]
    for (endpoint, model), rows in networks.groupby(["endpoint", "model"]):
        assert set(rows["cohort"]) == {"training", "validation", "test"}, (endpoint, model)
        assert rows["score"].notna().all() and rows["score"].std() > 0, (endpoint, model)
    assert set(map(tuple, networks[["endpoint", "model"]].drop_duplicates().to_numpy())) == {
        (e, m) for e in ("binary", "survival") for m in ("cnn", "cnn_clinical")}
    clinical = predictions[predictions["model"] == "clinical"].set_index(["split", "endpoint", "patient"])["cohort"]
    assert (networks.set_index(["split", "endpoint", "patient"])["cohort"] == clinical.reindex(
        networks.set_index(["split", "endpoint", "patient"]).index)).all()  # the statistics stage's cohorts
    history = pd.read_csv(workdir / "results" / "networks" / "history.tsv", sep="\t")
    assert {"train_loss", "inner_loss", "best_epoch"} <= set(history.columns) and len(history) >= 4
    saliency = pd.read_csv(workdir / "results" / "networks" / "saliency" / "index.tsv", sep="\t")
    assert len(saliency) and all((workdir / "results" / "networks" / "saliency" / f).is_file() for f in saliency["file"])
    for endpoint in ("binary", "survival"):
        for model in ("cnn", "cnn_clinical"):
            assert (workdir / "results" / "networks" / endpoint / f"{model}.pt").is_file()
    html = (workdir / "results" / "report" / "report.html").read_text()
    assert "End-to-end networks" in html and "cnn_clinical" in html


def test_the_multitask_network_predicts_both_endpoints_segments_and_is_evaluated_beside_nnunet(tiny_study):
    """The multitask network (seed 004): scores for both endpoints in every cohort, one saved network, its masks in
    the crop as images in patient space (they lie on the patient's scan), and its DSC in the crop of the held-out
    annotated patients beside nnU-Net's rows in results/segmentation/dsc.tsv; the report evaluates it."""
    workdir = tiny_study.workdir
    predictions = pd.read_csv(workdir / "results" / "models" / "predictions.tsv", sep="\t")
    multitask = predictions[predictions["model"] == "multitask"]
    assert set(multitask["endpoint"]) == {"binary", "survival"}
    for endpoint, rows in multitask.groupby("endpoint"):
        assert set(rows["cohort"]) == {"training", "validation", "test"}, endpoint
        assert rows["score"].notna().all() and rows["score"].std() > 0, endpoint
    assert (workdir / "results" / "networks" / "multitask" / "multitask.pt").is_file()
    history = pd.read_csv(workdir / "results" / "networks" / "history.tsv", sep="\t")
    assert {"inner_dice", "inner_auc"} <= set(history.columns) and (history["model"] == "multitask").any()
    masks = workdir / "results" / "networks" / "masks"
    index = pd.read_csv(masks / "index.tsv", sep="\t")
    primary = multitask[multitask["endpoint"] == "binary"]
    assert set(index["patient"]) == set(primary.loc[primary["split"] == primary["split"].iloc[0], "patient"])
    first = index.iloc[0]
    mask = sitk.ReadImage(str(masks / first["file"]))
    folder = next((workdir / "results" / "ingest").glob(f"*/{first['patient']}"))
    scan = sitk.ReadImage(str(next(folder.glob("image_*.nii.gz"))))
    centre = mask.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in mask.GetSize()])
    inside = scan.TransformPhysicalPointToContinuousIndex(centre)
    assert all(0 <= i < s for i, s in zip(inside, scan.GetSize()))  # the crop lies in the patient's scan
    dsc = pd.read_csv(workdir / "results" / "segmentation" / "dsc.tsv", sep="\t")
    assert {"method", "scope"} <= set(dsc.columns)
    assert set(dsc.loc[dsc["scope"] == "image", "method"]) == {"nnunet"}
    crop = dsc[dsc["scope"] == "crop"]
    assert set(crop["method"]) == {"multitask", "nnunet"} and set(crop["cohort"]) <= {"validation", "test"}
    held_out = primary[primary["cohort"].isin(["validation", "test"])]
    assert set(crop["patient"]) <= set(held_out["patient"])
    assert crop["dsc"].between(0, 1).all()
    html = (workdir / "results" / "report" / "report.html").read_text()
    assert "multitask" in html


def test_rtstruct_seg_and_label_map_masks_equal_the_drawn_masks(tiny_study):
    """Each center delivers masks as NIfTI, RTSTRUCT and DICOM SEG: every ingested manual mask equals the mask
    the demo drew (its ground truth), voxel for voxel."""
    workdir = tiny_study.workdir
    key = pd.read_csv(workdir / "resources" / "private" / "pseudonym_key.tsv", sep="\t").set_index("pseudonym")
    sources = []
    for path in sorted((workdir / "results" / "ingest").glob("*/*/qc.json")):
        record = json.loads(path.read_text())
        if record["status"] != "included" or record["mask"]["source"] == "none":
            continue
        original = key.loc[record["patient"], "original_id"]
        if original in tiny_study.expected:  # the broken copies slipped into A's delivery have no truth of their own
            continue
        sources.append(record["mask"]["source"])
        truth = workdir / "demo" / "ground_truth" / "masks" / record["center"] / f"{original}.nii.gz"
        ingested = sitk.GetArrayFromImage(sitk.ReadImage(str(path.parent / "mask_manual.nii.gz")))
        assert np.array_equal(ingested, sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))), record["patient"]
    assert sources.count("rtstruct") == sources.count("seg") == 3 and sources.count("label_map") >= 3


def test_no_identifying_value_reaches_results_or_logs(tiny_study):
    leaks = phi_leaks(tiny_study.workdir)
    assert not leaks, leaks[:5]


def test_second_run_has_nothing_to_do(tiny_study):
    workdir = tiny_study.workdir
    dry = run(workdir, "--dry-run")
    assert dry.returncode == 0
    assert "Nothing to be done" in dry.stdout + dry.stderr


# files Snakemake lists as untracked that are declared all the same: inside a declared directory() output (a
# patient's ingest folder, a center's segmentation folder, the report's evaluation folder, the networks' saliency
# maps and the multitask network's masks), benchmarks and logs
DECLARED_FOLDERS = re.compile(r"^results/(ingest/[A-Z]+/[A-Z]+-\d{4}/|segmentation/[A-Z]+/|report/evaluation/"
                              r"|networks/saliency/|networks/masks/|benchmarks/|logs/)")


def test_every_file_under_results_is_declared(tiny_study):
    listed = run(tiny_study.workdir, "--list-untracked")
    assert listed.returncode == 0, listed.stderr[-3000:]
    results = [line for line in listed.stdout.splitlines() if line.startswith("results/")]
    assert any(line.startswith("results/report/evaluation/") for line in results)  # the listing did list
    undeclared = [line for line in results if not DECLARED_FOLDERS.match(line)]
    assert not undeclared, undeclared[:20]


def test_a_deleted_fitted_model_reruns_the_statistics_and_the_report_only(tiny_study, tmp_path):
    """Dry run only: the shared study is put back as it was (the model file, with its modification time)."""
    model = tiny_study.workdir / "results" / "models" / "binary" / "radiomic.joblib"
    kept = tmp_path / model.name
    shutil.move(model, kept)
    try:
        dry = run(tiny_study.workdir, "--dry-run")
    finally:
        shutil.move(kept, model)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", dry.stdout + dry.stderr, flags=re.M)
    assert sorted(jobs) == ["all", "evaluate_report", "statistics"], jobs
    assert "Missing output files: results/models/binary/radiomic.joblib" in dry.stdout + dry.stderr


def test_a_study_with_manual_masks_runs_no_nnunet_job_and_excludes_patients_without_a_mask(tiny_study, tmp_path):
    """segmentation.method manual (seeds 000, 002, 003): the whole study plans without any nnU-Net rule; a center's
    segmentation is its patients' manual masks, unchanged; a patient delivered without one is excluded, reason
    no_manual_mask, its message naming the file."""
    workdir = copy_study(tiny_study, tmp_path / "manual")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["segmentation"]["method"] = "manual"
    config["features"]["deep"]["enabled"] = False  # its nnunet backbone needs the nnU-Net route (a ConfigError)
    (workdir / "config_manual.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    base = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
            str(workdir / "config_manual.yaml"), "--cores", "2"]
    plan = subprocess.run(base + ["--dry-run", "--forceall"], capture_output=True, text=True, cwd=workdir)
    assert plan.returncode == 0, plan.stderr[-5000:]
    planned = set(re.findall(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", plan.stdout + plan.stderr, flags=re.M))
    assert "segment_center" in planned and not {r for r in planned if r.startswith("nnunet")}, planned
    done = subprocess.run(base + ["results/segmentation/B", "results/segmentation/split.tsv", "--forcerun",
                                  "segment_center"], capture_output=True, text=True, cwd=workdir)
    assert done.returncode == 0, done.stderr[-5000:]
    qc = pd.read_csv(workdir / "results" / "segmentation" / "B" / "qc.tsv", sep="\t")
    ingest = pd.read_csv(workdir / "results" / "qc" / "B" / "patients.tsv", sep="\t")
    annotated = set(ingest.loc[ingest["annotated"] & (ingest["status"] == "included"), "patient"])
    assert annotated and set(qc.loc[qc["status"] == "included", "patient"]) == annotated
    without = qc[qc["status"] == "excluded"]
    assert len(without) and (without["reason"] == "no_manual_mask").all()
    assert all("mask_manual.nii.gz" in m for m in without["message"])
    for patient in annotated:
        mine = workdir / "results" / "segmentation" / "B" / f"{patient}.nii.gz"
        manual = next((workdir / "results" / "ingest" / "B").glob(f"{patient}")) / "mask_manual.nii.gz"
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(mine))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(manual))))
    assert set(pd.read_csv(workdir / "results" / "segmentation" / "split.tsv", sep="\t")["set"]) == {"manual"}


def test_a_trained_model_folder_in_the_config_is_used_without_training(tiny_study, tmp_path):
    """A copy of the study given the model it trained, as if from an earlier study: only segmentation reruns."""
    workdir = copy_study(tiny_study, tmp_path / "given")
    trained = next((workdir / "resources" / "nnunet" / "results").rglob("plans.json")).parent
    shutil.copytree(trained, workdir / "given_model")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["segmentation"]["model_folder"] = "given_model"
    (workdir / "config_given.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # the target before --forcerun: --forcerun takes several values and would swallow it (then `all` runs)
    # one center (the others would only repeat it): its segmentation with the given model
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config_given.yaml"), "--cores", "2", "results/segmentation/B",
           "results/segmentation/split.tsv", "--forcerun", "segment_center"]
    given = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert given.returncode == 0, given.stderr[-5000:]
    jobs = re.findall(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", given.stdout + given.stderr, flags=re.M)
    # exactly: the center segmented with the given model and the split of the annotated patients (all of them
    # holdout: nothing was trained); no nnU-Net dataset, plan or training
    assert sorted(jobs) == ["segment_center", "segmentation_split"], jobs
    log = (workdir / "results" / "logs" / "segmentation" / "B.log").read_text()
    assert "given_model" in log
    split = pd.read_csv(workdir / "results" / "segmentation" / "split.tsv", sep="\t")
    qc = pd.concat([pd.read_csv(workdir / "results" / "qc" / c / "patients.tsv", sep="\t") for c in ("A", "B", "C")])
    assert set(split["set"]) == {"holdout"}  # every annotated patient: nothing is trained
    assert set(split["patient"]) == set(qc.loc[qc["annotated"] & (qc["status"] == "included"), "patient"])
    # the model is the one the study trained: the same masks as the study's own run
    masks = sorted((workdir / "results" / "segmentation" / "B").glob("*.nii.gz"))
    assert len(masks) >= PATIENTS  # every included patient of B re-segmented
    for mine in masks:
        theirs = tiny_study.workdir / mine.relative_to(workdir)
        assert (sitk.GetArrayFromImage(sitk.ReadImage(str(mine)))
                == sitk.GetArrayFromImage(sitk.ReadImage(str(theirs)))).all(), mine
