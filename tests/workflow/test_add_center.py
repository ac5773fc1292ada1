"""Scale-out: adding a center is one row in the centers sheet plus its data.

A copy of the shared tiny study (A, B development, C external, already run) is delivered a fourth center D,
external, as a hospital would send it (the demo generator writes it in a scratch folder), and `snakemake` runs
again. Snakemake's own job list (the dry run's and the run's) must show exactly D's per-center and per-patient
jobs plus the study-level steps; nothing of A, B or C is recomputed (their outputs keep their modification
times), nnU-Net is not retrained, the report and the patient flow count D, and a third run has nothing to do.
A fifth center E joining development is checked by dry runs: not trained on by default (the training set is
frozen), retrained when the config sets segmentation.retrain_on_new_centers.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from radstudy.segment import stage as segmentation_stage
from radstudy.config import load_study
from radstudy.errors import ConfigError
from tiny_study import PATIENTS, REPO, copy_study, run, write_tiny_study

slow = pytest.mark.slow
e2e = pytest.mark.e2e

HEADER = "id\trole\tdicom_root\tclinical\n"
ROWS = {c: f"{c}\t{role}\tdemo/dicom/{c}\tdemo/clinical/{c}.csv\n"
        for c, role in [("A", "development"), ("B", "development"), ("C", "external"), ("D", "external"),
                        ("E", "development")]}
# study-level jobs: their inputs list every center, so a new center reruns them
# (the tiny study runs with features.robustness on: perturbed_table collects every patient's perturbed radiomics)
# the end-to-end networks retrain on the new patients too: every split's training partition may change
STUDY_LEVEL = {"segmentation_quality", "feature_table", "perturbed_table", "patient_flow", "statistics",
               "evaluate_report", "networks", "all"}
NNUNET = {"nnunet_dataset", "nnunet_plan", "nnunet_train"}
JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")


def _sheet(workdir: Path, *centers: str) -> None:
    (workdir / "centers.tsv").write_text(HEADER + "".join(ROWS[c] for c in centers))


def _jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job block Snakemake printed (a run's executed jobs, or a dry run's plan)."""
    jobs, lines = [], output.splitlines()
    for i, line in enumerate(lines):
        match = JOB.match(line)
        if not match:
            continue
        wildcards = {}
        for follow in lines[i + 1:]:
            if not follow.startswith("    "):
                break
            key, _, value = follow.strip().partition(": ")
            if key == "wildcards":
                wildcards = dict(item.split("=", 1) for item in value.split(", "))
        jobs.append((match.group(1), wildcards))
    return jobs


def _job_stats(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run (rule -> count, and total)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:")) + 3
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def _by_center(jobs) -> dict[str, set[str]]:
    centers: dict[str, set[str]] = {}
    for rule, wildcards in jobs:
        centers.setdefault(wildcards.get("center", "-"), set()).add(rule)
    return centers


def _mtimes(workdir: Path, patterns: list[str]) -> dict[str, float]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
            for pattern in patterns for p in workdir.glob(pattern) if p.is_file()}


EXISTING = [f"results/{kind}/{c}/**/*" for kind in ("ingest", "segmentation", "features", "qc") for c in "ABC"]
EXISTING += [f"results/{kind}/{c}.*" for kind in ("clinical", "features/deep") for c in "ABC"]
EXISTING += [f"results/features/perturbed/{c}/*" for c in "ABC"] + ["resources/nnunet/**/*"]
STUDY_OUTPUTS = ["results/features/features.parquet", "results/qc/patient_flow.tsv", "results/clinical/clinical.tsv",
                 "results/models/predictions.tsv", "results/report/report.html", "results/segmentation/dsc.tsv"]


def _study(tmp_path: Path, **segmentation):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = str(tmp_path / "centers.tsv")
    config["segmentation"].update(segmentation)
    return load_study(config)


def test_training_centers_are_frozen_once_the_dataset_is_built(tmp_path):
    _sheet(tmp_path, "A", "B", "C", "E")
    raw = tmp_path / "raw" / "Dataset501_CRLM"
    assert segmentation_stage.train_centers(_study(tmp_path), raw) == ["A", "B", "E"]  # no dataset yet
    raw.mkdir(parents=True)
    (raw / segmentation_stage.TRAIN_CENTERS_FILE).write_text("A\nB\n")  # built before E joined
    assert segmentation_stage.train_centers(_study(tmp_path), raw) == ["A", "B"]
    assert segmentation_stage.train_centers(_study(tmp_path, retrain_on_new_centers=True), raw) == ["A", "B", "E"]
    assert segmentation_stage.train_centers(_study(tmp_path, train_centers="all"), raw) == ["A", "B"]
    assert segmentation_stage.train_centers(_study(tmp_path, train_centers=["B", "E"]), raw) == ["B", "E"]
    with pytest.raises(ConfigError, match="unknown center"):
        segmentation_stage.train_centers(_study(tmp_path, train_centers=["B", "F"]), raw)


def _deliver(center: str, workdir: Path, scratch: Path) -> None:
    """Center `center`'s delivery (DICOM folders and clinical table), written by the demo generator elsewhere."""
    scratch.mkdir(parents=True, exist_ok=True)
    write_tiny_study(scratch)
    _sheet(scratch, "A", center)  # the generator wants a development center beside it
    demo = run(scratch, "demo_cohort")
    assert demo.returncode == 0, demo.stderr[-3000:]
    shutil.copytree(scratch / "demo" / "dicom" / center, workdir / "demo" / "dicom" / center)
    shutil.copy2(scratch / "demo" / "clinical" / f"{center}.csv", workdir / "demo" / "clinical" / f"{center}.csv")


@pytest.fixture(scope="module")
def added(tiny_study, tmp_path_factory):
    """The shared study, copied, with D added; returns (workdir, dry run before, run, mtimes before)."""
    workdir = copy_study(tiny_study, tmp_path_factory.mktemp("add_center"))
    _deliver("D", workdir, tmp_path_factory.mktemp("delivery"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["demo"]["enabled"] = False  # a real study: the hospitals deliver, nothing regenerates their folders
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = _mtimes(workdir, EXISTING + STUDY_OUTPUTS)

    _sheet(workdir, "A", "B", "C", "D")
    dry = run(workdir, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    again = run(workdir)
    assert again.returncode == 0, again.stderr[-5000:]
    return workdir, dry.stdout + dry.stderr, again.stdout + again.stderr, before


@slow
@e2e
def test_dry_run_plans_only_the_new_center_and_the_study_level_steps(added):
    _, dry, _, _ = added
    stats = _job_stats(dry)
    assert not NNUNET & set(stats), stats  # nnU-Net is not retrained
    centers = _by_center(_jobs(dry))
    assert set(centers) == {"D", "-"}, centers  # per-center jobs of C only ("-": no center wildcard)
    assert {"discover", "clinical_table", "center_qc", "segment_center"} <= centers["D"]
    assert centers["-"] == STUDY_LEVEL
    assert stats["discover"] == stats["segment_center"] == 1


@slow
@e2e
def test_run_executes_exactly_the_new_centers_jobs_and_the_study_level_steps(added):
    workdir, _, run, _ = added
    jobs = _jobs(run)
    centers = _by_center(jobs)
    assert set(centers) == {"D", "-"}, centers
    assert centers["-"] == STUDY_LEVEL, centers["-"]
    assert {"discover", "clinical_table", "center_qc", "segment_center", "ingest_patient",
            "radiomics_patient", "network_inputs"} <= centers["D"]
    per_center = [rule for rule, w in jobs if "center" in w and "patient" not in w]
    assert len(per_center) == len(set(per_center))  # each per-center rule once
    delivered = pd.read_csv(workdir / "results/ingest/D/patients.tsv", sep="\t")["patient"]
    qc = pd.read_csv(workdir / "results/segmentation/D/qc.tsv", sep="\t")
    ingested = sorted(w["patient"] for rule, w in jobs if rule == "ingest_patient")
    extracted = sorted(w["patient"] for rule, w in jobs if rule == "radiomics_patient")
    perturbed = sorted(w["patient"] for rule, w in jobs if rule == "radiomics_perturbed")
    assert ingested == sorted(delivered) and len(ingested) == PATIENTS
    assert extracted == perturbed == sorted(qc.loc[qc["status"] == "included", "patient"])


@slow
@e2e
def test_existing_centers_are_not_recomputed_and_study_outputs_are(added):
    workdir, _, _, before = added
    after = _mtimes(workdir, EXISTING + STUDY_OUTPUTS)
    existing = {k for k in before if k not in STUDY_OUTPUTS}
    assert any(k.startswith("results/features/A/") for k in existing)
    assert any(k.startswith("results/features/C/") for k in existing)
    assert any(k.endswith("checkpoint_final.pth") for k in existing)
    changed = sorted(k for k in existing if after.get(k) != before[k])
    assert not changed, changed[:10]  # A's, B's and C's per-patient and per-center outputs, and the nnU-Net model
    for output in STUDY_OUTPUTS:
        assert after[output] > before[output], output


@slow
@e2e
def test_report_and_patient_flow_count_the_new_center(added, tiny_study):
    workdir, _, _, _ = added
    flow = pd.read_csv(workdir / "results/qc/patient_flow.tsv", sep="\t", keep_default_na=False).set_index("center")
    assert flow.loc["D", "role"] == "external"
    assert flow.loc["D", "delivered"] == flow.loc["D", "included"] == PATIENTS
    total = 4 * PATIENTS + len(tiny_study.expected)  # the broken patients slipped into A are delivered too
    assert flow.loc["total", "delivered"] == total
    clinical = pd.read_csv(workdir / "results/clinical/clinical.tsv", sep="\t")
    assert (clinical["patient"].str.startswith("D-")).sum() == PATIENTS
    features = pd.read_parquet(workdir / "results/features/features.parquet")
    assert (features["center"] == "D").sum() == PATIENTS
    predictions = pd.read_csv(workdir / "results/models/predictions.tsv", sep="\t")
    assert set(predictions.loc[predictions["cohort"] == "test", "center"]) == {"C", "D"}  # the external test centers
    html = (workdir / "results/report/report.html").read_text()
    rows = [re.findall(r"<td>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)]
    assert ["D", "external", str(PATIENTS), str(PATIENTS)] in [r[:4] for r in rows]  # the report's flow table
    assert ["total", "", str(total), str(total - len(tiny_study.expected))] in [r[:4] for r in rows]


@slow
@e2e
def test_next_run_has_nothing_to_do(added):
    workdir, _, _, _ = added
    dry = run(workdir, "--dry-run")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]


@slow
@e2e
def test_new_development_center_retrains_nnunet_only_when_the_config_asks(added, tmp_path):
    workdir, _, _, _ = added
    record = workdir / "resources/nnunet/raw/Dataset501_CRLM" / segmentation_stage.TRAIN_CENTERS_FILE
    assert record.read_text().split() == ["A", "B"]  # the centers nnU-Net's dataset was built from
    _deliver("E", workdir, tmp_path / "delivery")
    _sheet(workdir, "A", "B", "C", "D", "E")
    config_file = workdir / "config.yaml"
    original = config_file.read_text()
    try:
        frozen = run(workdir, "--dry-run")
        assert frozen.returncode == 0, frozen.stderr[-3000:]
        stats = _job_stats(frozen.stdout + frozen.stderr)
        assert not NNUNET & set(stats), stats
        assert set(_by_center(_jobs(frozen.stdout + frozen.stderr))) == {"E", "-"}
        config = yaml.safe_load(original)
        config["segmentation"]["retrain_on_new_centers"] = True
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        retrain = run(workdir, "--dry-run")
        assert retrain.returncode == 0, retrain.stderr[-3000:]
        stats = _job_stats(retrain.stdout + retrain.stderr)
        assert NNUNET <= set(stats) and stats["segment_center"] == 5, stats  # every center segmented again
    finally:
        config_file.write_text(original)
        _sheet(workdir, "A", "B", "C", "D")
