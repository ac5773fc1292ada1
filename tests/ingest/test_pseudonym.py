"""Pseudonyms are stable, append-only and deterministic; the key never lands in results/."""

from __future__ import annotations

from radstudy.config import Center
from radstudy.ingest.pseudonym import assign_pseudonyms, patient_folder, read_key


def _center(tmp_path, folders):
    root = tmp_path / "dicom"
    for name in folders:
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / ".hidden").mkdir(exist_ok=True)
    (root / "stray_file.dcm").write_text("not a folder")
    return Center(id="H1", role="development", dicom_root=root, clinical=tmp_path / "c.csv")


def test_pseudonyms_follow_sorted_folders_and_skip_hidden_and_files(tmp_path):
    center = _center(tmp_path, ["MRN9", "MRN1", "MRN5"])
    table = assign_pseudonyms(center, tmp_path / "key.tsv")
    assert table["pseudonym"].tolist() == ["H1-0001", "H1-0002", "H1-0003"]
    assert table["original_id"].tolist() == ["MRN1", "MRN5", "MRN9"]


def test_existing_pseudonyms_are_kept_when_patients_are_added(tmp_path):
    key = tmp_path / "key.tsv"
    center = _center(tmp_path, ["MRN5", "MRN9"])
    first = assign_pseudonyms(center, key).set_index("original_id")["pseudonym"].to_dict()
    _center(tmp_path, ["MRN1"])  # delivered later, sorts first
    second = assign_pseudonyms(center, key).set_index("original_id")["pseudonym"].to_dict()
    assert second["MRN5"] == first["MRN5"] and second["MRN9"] == first["MRN9"]
    assert second["MRN1"] == "H1-0003"
    assert len(read_key(key)) == 3
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_rerun_is_deterministic_from_scratch(tmp_path):
    center = _center(tmp_path, ["B", "A", "C"])
    a = assign_pseudonyms(center, tmp_path / "k1.tsv")
    b = assign_pseudonyms(center, tmp_path / "k2.tsv")
    assert a.equals(b)


def test_patient_folder_resolves_through_the_key(tmp_path):
    center = _center(tmp_path, ["MRN1"])
    assign_pseudonyms(center, tmp_path / "key.tsv")
    assert patient_folder(center, tmp_path / "key.tsv", "H1-0001") == center.dicom_root / "MRN1"
