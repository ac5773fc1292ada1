"""The MRI demo study (config/mri/, seeds 000 and 003) end to end at a test's size: the rectal MRI cohort written as
DICOM (oblique T2W, DWI b0/b800 with vendor b-value tags, the scanner's ADC map; manual masks as NIfTI label maps and
RTSTRUCT), ingested into a T2W + ADC study with manual masks (no nnU-Net), radiomics with a parameter file per channel,
k-fold design with an external center, CNN and CNN + clinical networks, and the report of seed 003 (Youden cut-off,
time-dependent AUC at 12/24/36 months, Kaplan-Meier by subgroup, NRI/IDI, decision and clinical impact curves).

Run once per pytest run (~1.5 minutes, in the background: tests/background_studies.py): the suite's one end-to-end
run of an MRI study.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from tiny_study import MRI_ANNOTATED, MRI_PATIENTS, phi_leaks

pytestmark = [pytest.mark.slow]
CENTERS = ("R1", "R2", "R3")


@pytest.fixture(scope="module")
def mri_study(tiny_mri_study):
    return tiny_mri_study


def _records(workdir):
    """The ingestion records of the patients ingested with a manual mask (those without one are ingested too, and
    excluded by the segmentation stage)."""
    records = [json.loads(p.read_text()) for p in sorted((workdir / "results" / "ingest").glob("*/*/qc.json"))]
    return [r for r in records if r["status"] == "included" and r["mask"]["source"] != "none"]


def test_manual_masks_study_runs_no_nnunet_job_and_excludes_the_patients_without_a_mask(mri_study):
    workdir, output = mri_study
    jobs = set(re.findall(r"^\s*(?:local)?rule (\w+):", output, flags=re.M))
    assert {"ingest_patient", "radiomics_patient", "networks", "statistics", "evaluate_report"} <= jobs, jobs
    assert not {j for j in jobs if j.startswith("nnunet")}, jobs
    qc = pd.read_csv(workdir / "results" / "qc" / "patients.tsv", sep="\t")
    assert len(qc) == len(CENTERS) * MRI_PATIENTS
    excluded = qc[qc["status"] == "excluded"]
    assert sorted(excluded["center"]) == list(CENTERS) and set(excluded["reason"]) == {"no_manual_mask"}, excluded
    flow = pd.read_csv(workdir / "results" / "qc" / "patient_flow.tsv", sep="\t").set_index("center")
    assert (flow.loc[list(CENTERS), "excluded"] == MRI_PATIENTS - MRI_ANNOTATED).all(), flow


def test_t2w_and_the_adc_map_are_selected_and_the_adc_lies_on_the_t2w_grid(mri_study):
    workdir, _ = mri_study
    centers = json.loads((workdir / "demo" / "ground_truth" / "centers.json").read_text())["centers"]
    names = {c["id"]: c["series_names"] for c in centers}
    tags = {c["b_value_tag"] for c in centers}
    assert tags - {"standard"}, tags  # at least one vendor writes the b-value in its private tag only
    records = _records(workdir)
    assert len(records) == len(CENTERS) * MRI_ANNOTATED
    oblique = 0
    for r in records:
        t2, adc = r["channels"]["T2W"], r["channels"]["ADC"]
        assert t2["series_description"] == names[r["center"]][0] and adc["series_description"] == names[r["center"]][2]
        assert t2["modality"] == adc["modality"] == "MR" and adc["resampled_to_reference"]
        assert (t2["size"], t2["spacing_mm"], t2["direction"]) == (adc["size"], adc["spacing_mm"], adc["direction"])
        oblique += abs(t2["direction"][4] - 1) > 1e-6
        folder = workdir / "results" / "ingest" / r["center"] / r["patient"]
        image = sitk.ReadImage(str(folder / "image_ADC.nii.gz"))
        assert sitk.ReadImage(str(folder / "image_T2W.nii.gz")).GetDirection() == pytest.approx(image.GetDirection())
        # the ADC map, not a DWI image: values in 1e-6 mm^2/s, the tumour's around 0.6-1.6e-3
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask_manual.nii.gz"))) > 0
        inside = sitk.GetArrayFromImage(image)[mask]
        assert 500 < np.median(inside) < 1600, (r["patient"], np.median(inside))
    assert oblique > 0  # some T2W series are oblique


def test_every_ingested_manual_mask_equals_the_drawn_mask(mri_study):
    """NIfTI label maps and RTSTRUCT contours on the oblique T2W series, voxel for voxel."""
    workdir, _ = mri_study
    key = pd.read_csv(workdir / "resources" / "private" / "pseudonym_key.tsv", sep="\t").set_index("pseudonym")
    sources = []
    for r in _records(workdir):
        sources.append(r["mask"]["source"])
        truth = workdir / "demo" / "ground_truth" / "masks" / r["center"] / f"{key.loc[r['patient'], 'original_id']}.nii.gz"
        ingested = workdir / "results" / "ingest" / r["center"] / r["patient"] / "mask_manual.nii.gz"
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (ingested, truth))
        assert a.any() and np.array_equal(a, b), (r["patient"], r["mask"]["source"], int((a != b).sum()))
    assert {"rtstruct", "label_map"} <= set(sources), sources


def test_radiomics_use_each_channels_parameter_file(mri_study):
    workdir, _ = mri_study
    features = pd.read_parquet(workdir / "results" / "features" / "features.parquet")
    columns = [c for c in features.columns if "original_" in c]
    t2w = [c for c in columns if "_T2W_" in c]
    adc = [c for c in columns if "_ADC_" in c]
    assert t2w and adc
    assert any("shape" in c for c in t2w) and not any("shape" in c for c in adc)  # the ADC file computes no shape
    # the ADC is quantitative (no normalisation): its first-order mean is the tumour's ADC in 1e-6 mm^2/s
    mean = features[[c for c in adc if c.endswith("firstorder_Mean")][0]]
    assert mean.between(400, 2000).all(), mean.describe()


def test_seed_000_and_003_designs_and_figures_are_in_the_report(mri_study):
    workdir, _ = mri_study
    predictions = pd.read_csv(workdir / "results" / "models" / "predictions.tsv", sep="\t")
    assert {f"fold{k}" for k in (1, 2, 3)} <= set(predictions["split"])
    assert {"clinical", "radiomic", "combined", "cnn", "cnn_clinical"} <= set(predictions["model"])
    external = predictions[predictions["center"] == "R3"]
    assert set(external["cohort"]) == {"test"}
    evaluation = workdir / "results" / "report" / "evaluation"
    manifest = json.loads((evaluation / "manifest.json").read_text())
    kinds = {f.get("kind") for f in manifest["figures"]}
    assert {"km", "km_subgroup", "clinical_impact", "decision"} <= kinds, kinds
    subgroups = pd.read_csv(evaluation / "km_subgroups.csv")
    assert set(subgroups["variable"]) == {"mrf", "ct_stage"}
    cutoffs = pd.read_csv(evaluation / "cutoffs.csv")
    assert set(cutoffs.loc[cutoffs["endpoint"] == "survival", "method"]) == {"youden"}
    survival = pd.read_csv(evaluation / "metrics_survival.csv")
    assert {"td_auc_12", "td_auc_24", "td_auc_36", "c_harrell"} <= set(survival.columns)
    reclass = pd.read_csv(evaluation / "reclassification.csv")
    assert {"nri_continuous", "idi"} <= set(reclass.columns) and len(reclass)
    html = (workdir / "results" / "report" / "report.html").read_text()
    assert "delivered manual masks" in html and "kfold" in html


def test_no_identifying_value_reaches_results_or_logs(mri_study):
    workdir, _ = mri_study
    leaks = phi_leaks(workdir)
    assert not leaks, leaks[:5]
