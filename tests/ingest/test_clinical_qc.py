"""Clinical tables keep only configured columns under pseudonyms; the patient flow counts every patient once."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from radstudy.ingest.clinical import pseudonymised_clinical
from radstudy.config import load_study
from radstudy.errors import ConfigError
from radstudy.ingest.pseudonym import assign_pseudonyms
from radstudy.ingest.qc import center_patients, patient_flow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def study(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = "centers.tsv"
    config["pseudonymisation"]["key_file"] = "private/key.tsv"
    (tmp_path / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\nH\tdevelopment\tdicom\tclin.csv\n")
    for name in ["MRN2", "MRN1", "MRN3"]:
        (tmp_path / "dicom" / name).mkdir(parents=True)
    columns = ["patient_id", "patient_name", *config["clinical"]["variables"], "synchronous_lm", "mfs_months", "mfs_event"]
    rows = [["MRN1", "DOE^JANE", *range(11), 1, 12.5, 1], ["MRN2", "ROE^RICHARD", *range(11), 0, 40.0, 0],
            ["MRN9", "POE^EDGAR", *range(11), 0, 30.0, 0]]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "clin.csv", index=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return load_study(tmp_path / "config.yaml", base_dir=tmp_path), tmp_path


def _patients(study, tmp_path):
    key = assign_pseudonyms(study.center("H"), tmp_path / "private" / "key.tsv")
    return pd.DataFrame({"patient": key["pseudonym"]})


def test_clinical_table_is_pseudonymised_and_reduced(study):
    study, tmp_path = study
    table, summary = pseudonymised_clinical(study, "H", _patients(study, tmp_path))
    assert table["patient"].tolist() == ["H-0001", "H-0002", "H-0003"]
    assert table["has_clinical_record"].tolist() == [True, True, False]
    assert table.loc[0, "synchronous_lm"] == 1 and table.loc[1, "mfs_months"] == 40.0
    assert "patient_name" not in table.columns and "patient_id" not in table.columns
    assert not any("MRN" in str(v) or "^" in str(v) for v in table.to_numpy().ravel())
    assert summary["clinical_rows_without_images"] == 1  # MRN9 has a row but no folder


def test_clinical_table_missing_configured_column_is_named(study):
    study, tmp_path = study
    broken = copy.deepcopy(study.config)
    broken["clinical"]["variables"] = broken["clinical"]["variables"] + ["ecog"]
    study = type(study)(config=broken, centers=study.centers)
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['ecog'\]"):
        pseudonymised_clinical(study, "H", _patients(study, tmp_path))


def _qc(tmp_path, patient, status="included", reason=None, mask="none"):
    folder = tmp_path / "ingest" / patient
    folder.mkdir(parents=True)
    record = {"patient": patient, "center": "H", "role": "development", "status": status, "mask": {"source": mask}}
    if reason:
        record.update(stage="ingest", reason=reason, message=f"{patient}: broken")
    (folder / "qc.json").write_text(json.dumps(record))
    return folder


def test_center_table_excludes_patients_without_clinical_record_and_flow_counts_them(tmp_path):
    dirs = [_qc(tmp_path, "H-0001", mask="rtstruct"), _qc(tmp_path, "H-0002", "excluded", "geometry_gap"),
            _qc(tmp_path, "H-0003")]
    clinical = pd.DataFrame({"patient": ["H-0001", "H-0002", "H-0003"], "has_clinical_record": [True, True, False]})
    table = center_patients(dirs, clinical)
    assert table.set_index("patient")["status"].to_dict() == {"H-0001": "included", "H-0002": "excluded", "H-0003": "excluded"}
    assert table.set_index("patient").loc["H-0003", "reason"] == "no_clinical_record"
    assert table.set_index("patient").loc["H-0002", "reason"] == "geometry_gap"  # the first reason is kept
    assert table["annotated"].tolist() == [True, False, False]
    flow = patient_flow(table, [{"center": "H", "clinical_rows_without_images": 2}]).set_index("center")
    assert flow.loc["H", ["delivered", "included", "excluded"]].tolist() == [3, 1, 2]
    assert flow.loc["H", "excluded:geometry_gap"] == 1 and flow.loc["H", "excluded:no_clinical_record"] == 1
    assert flow.loc["H", "clinical_rows_without_images"] == 2
    assert flow.loc["total", "delivered"] == 3
