"""`radstudy <stage>` runs every ingestion stage without Snakemake, with the same files as the workflow."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dicom_factory import write_ct_series
from radstudy.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validate_default_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "--config", "config/config.yaml"]) == 0
    assert "C4 (external)" in capsys.readouterr().out


def test_invalid_config_exits_2_with_the_key(tmp_path, capsys):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["ingest"]["on_error"] = "shrug"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "ingest.on_error" in capsys.readouterr().err


def test_stages_chain_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config["centers"] = "centers.tsv"
    config["demo"]["enabled"] = False
    Path("config").mkdir()
    Path("config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the commands' default --config
    Path("centers.tsv").write_text("id\trole\tdicom_root\tclinical\nK\tdevelopment\tdata\tclin.csv\n")
    rng = np.random.default_rng(0)
    for patient in ["P2", "P1"]:
        write_ct_series(Path("data") / patient / "ct", rng.normal(1064, 20, (12, 16, 16)).astype(np.int16),
                        z_positions=np.arange(12) * 2.5, description="PORTAL VENOUS", patient_id=patient)
    variables = config["clinical"]["variables"]
    pd.DataFrame([[p, *range(len(variables)), 1, 10.0, 1] for p in ["P1", "P2"]],
                 columns=["patient_id", *variables, "synchronous_lm", "mfs_months", "mfs_event"]).to_csv("clin.csv", index=False)

    assert main(["discover", "--center", "K", "--out", "results/ingest/K/patients.tsv"]) == 0
    patients = pd.read_csv("results/ingest/K/patients.tsv", sep="\t")["patient"].tolist()
    assert patients == ["K-0001", "K-0002"]
    for patient in patients:
        assert main(["ingest", "--center", "K", "--patient", patient, "--out", f"results/ingest/K/{patient}"]) == 0
    assert main(["clinical", "--center", "K", "--patients", "results/ingest/K/patients.tsv",
                 "--out", "results/clinical/K.tsv", "--summary", "results/clinical/K.json"]) == 0
    assert main(["center-qc", "--ingest-dirs", *[f"results/ingest/K/{p}" for p in patients],
                 "--clinical", "results/clinical/K.tsv", "--out", "results/qc/K/patients.tsv"]) == 0
    assert main(["flow", "--center-qc", "results/qc/K/patients.tsv", "--clinical", "results/clinical/K.tsv"]) == 0
    flow = pd.read_csv("results/qc/patient_flow.tsv", sep="\t").set_index("center")
    assert flow.loc["K", ["delivered", "included", "excluded"]].tolist() == [2, 2, 0]
    assert len(pd.read_csv("results/clinical/clinical.tsv", sep="\t")) == 2
