"""Ingestion of one patient through `ingest_patient`: the real CT reproduces IBSI's conversion, and every kind
of bad input becomes an exclusion record (or an error with on_error: fail) without breaking the study."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from radstudy.config import load_study
from radstudy.errors import PatientExcluded
from radstudy.ingest.patient import MASK_FILE, image_file, ingest_patient
from radstudy.ingest.pseudonym import assign_pseudonyms

from dicom_factory import write_ct_series, write_rtstruct

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _study(tmp_path: Path, *, channels=None, rtstruct_rois=None, on_error="exclude"):
    config = copy.deepcopy(BASE_CONFIG)
    config["centers"] = "centers.tsv"
    config["pseudonymisation"]["key_file"] = "private/key.tsv"
    config["demo"]["enabled"] = False
    if channels:
        config["ingest"]["channels"] = channels
    if rtstruct_rois:
        config["ingest"]["masks"]["rtstruct_rois"] = rtstruct_rois
    config["ingest"]["on_error"] = on_error
    (tmp_path / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\nT\tdevelopment\tdicom\tclinical.csv\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # channel order matters
    study = load_study(tmp_path / "config.yaml", base_dir=tmp_path)
    key = assign_pseudonyms(study.center("T"), study.key_file)
    return study, dict(zip(key["original_id"], key["pseudonym"]))


def _volume(slices=12, rows=24, cols=20, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(1064, 30, size=(slices, rows, cols))).astype(np.int16)  # ~40 HU with intercept -1024


def _good_patient(folder: Path, *, description="ABD PV 3mm", seed=0):
    """A portal series, a non-contrast distractor with fewer slices, and a scout, in one frame of reference."""
    frame = "1.2.826.0.1.3680043.8.498.1"
    write_ct_series(folder / "s1", _volume(seed=seed), z_positions=np.arange(12) * 2.0, description=description,
                    file_names=[f"X{i:03d}" for i in np.random.default_rng(seed).permutation(12)],
                    frame_of_reference_uid=frame)
    write_ct_series(folder / "s2", _volume(6, seed=seed + 1), z_positions=np.arange(6) * 4.0, description="NON CONTRAST",
                    frame_of_reference_uid=frame)
    write_ct_series(folder / "s3", _volume(1, 64, 64, seed=seed + 2), z_positions=[0.0], description="Scout",
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))


def test_real_ct_with_rtstruct_reproduces_ibsi_conversion(tmp_path, reference_dir):
    sts = reference_dir / "dicom" / "STS_001"
    shutil.copytree(sts / "CT", tmp_path / "dicom" / "STS001")
    study, ids = _study(tmp_path, channels={"CT": {"modality": "CT", "min_slices": 10}},
                        rtstruct_rois={"tumour": "gtv"})
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["STS001"], out)
    assert record["status"] == "included", record
    ours = sitk.ReadImage(str(out / image_file("CT")))
    theirs = sitk.ReadImage(str(sts / "nifti" / "CT_image.nii.gz"))
    assert ours.GetSize() == theirs.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ours).astype(np.float64), sitk.GetArrayFromImage(theirs).astype(np.float64))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))) == study.config["ingest"]["labels"]["tumour"]
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(sts / "nifti" / "CT_mask.nii.gz"))) > 0
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice >= 0.99
    assert record["mask"]["source"] == "rtstruct" and record["mask"]["rois"] == {"tumour": "GTV_Mass_CT"}


def test_good_patient_selects_portal_series_and_writes_label_map(tmp_path):
    folder = tmp_path / "dicom" / "MRN1"
    _good_patient(folder)
    study, ids = _study(tmp_path)
    image = sitk.ReadImage(str(next((folder / "s1").iterdir())))  # any slice, for the in-plane grid
    out = tmp_path / "out"
    # a manual label map on the portal series' grid
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included"
    ct = record["channels"]["CT"]
    assert ct["series_description"] == "ABD PV 3mm" and ct["slices"] == 12 and ct["series_in_folder"] == 3
    assert ct["spacing_mm"][2] == pytest.approx(2.0)
    converted = sitk.ReadImage(str(out / image_file("CT")))
    assert converted.GetSize() == (20, 24, 12) and image.GetSize()[:2] == (20, 24)
    assert record["mask"] == {"source": "none"}
    # now deliver a mask and ingest again
    mask = sitk.Image(converted.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(converted)
    mask[5:10, 5:10, 2:6] = 1
    mask[6:8, 6:8, 3:5] = 2
    (folder / "segmentation").mkdir()
    sitk.WriteImage(mask, str(folder / "segmentation" / "case_seg.nii.gz"))
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["mask"]["source"] == "label_map" and record["mask"]["file"] == "segmentation/case_seg.nii.gz"
    assert record["mask"]["labels"]["tumour"]["voxels"] == 8 and record["mask"]["labels"]["liver"]["voxels"] == 92


def _exclusion(tmp_path, make, **study_kwargs):
    folder = tmp_path / "dicom" / "MRN1"
    make(folder)
    study, ids = _study(tmp_path, **study_kwargs)
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert json.loads((out / "qc.json").read_text()) == record
    assert record["status"] == "excluded"
    assert ids["MRN1"] in record["message"]
    assert not list(out.glob("*.nii.gz"))
    return record


def test_unreadable_folder_is_excluded(tmp_path):
    def make(folder):
        folder.mkdir(parents=True)
        (folder / "IM1").write_bytes(b"\x01" * 500)
    record = _exclusion(tmp_path, make)
    assert record["reason"] == "unreadable_files" and record["file"] == "IM1"


def test_missing_slice_is_excluded_naming_the_gap(tmp_path):
    def make(folder):
        z = np.delete(np.arange(13) * 2.0, 6)
        write_ct_series(folder, _volume(), z_positions=z, description="PORTAL VENOUS")
    assert _exclusion(tmp_path, make)["reason"] == "geometry_gap"


def test_no_matching_series_is_excluded(tmp_path):
    def make(folder):
        write_ct_series(folder, _volume(), z_positions=np.arange(12) * 2.0, description="NON CONTRAST")
    record = _exclusion(tmp_path, make)
    assert record["reason"] == "no_matching_series" and "NON CONTRAST" in record["message"]


def test_mask_on_another_grid_is_excluded(tmp_path):
    def make(folder):
        write_ct_series(folder, _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS")
        mask = sitk.Image((20, 24, 11), sitk.sitkUInt8)  # one slice short
        (folder / "seg").mkdir()
        sitk.WriteImage(mask, str(folder / "seg" / "x_seg.nii.gz"))
    record = _exclusion(tmp_path, make)
    assert record["reason"] == "mask_grid_mismatch" and record["file"] == "seg/x_seg.nii.gz"


def test_rtstruct_outside_the_image_is_excluded(tmp_path):
    def make(folder):
        uids = write_ct_series(folder, _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS")
        far = np.array([[500.0, 500.0, 100.0], [510.0, 500.0, 100.0], [510.0, 510.0, 100.0]])
        write_rtstruct(folder / "rs.dcm", uids, {"Liver": [far]})
    assert _exclusion(tmp_path, make)["reason"] == "mask_unreadable"


def test_two_patients_in_one_folder_are_excluded(tmp_path):
    def make(folder):
        write_ct_series(folder / "a", _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS")
        write_ct_series(folder / "b", _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS",
                        patient_id="SOMEONE-ELSE")
    assert _exclusion(tmp_path, make)["reason"] == "multiple_patients"


def test_on_error_fail_raises_instead(tmp_path):
    (tmp_path / "dicom" / "MRN1").mkdir(parents=True)
    study, ids = _study(tmp_path, on_error="fail")
    with pytest.raises(PatientExcluded, match="unreadable_files"):
        ingest_patient(study, "T", ids["MRN1"], tmp_path / "out")


def test_second_channel_on_another_grid_is_resampled_onto_the_first(tmp_path):
    folder = tmp_path / "dicom" / "MRN1"
    _good_patient(folder)
    channels = {"PV": {"description": "PV"}, "NC": {"description": "NON CONTRAST", "min_slices": 2}}
    study, ids = _study(tmp_path, channels=channels)
    record = ingest_patient(study, "T", ids["MRN1"], tmp_path / "out")
    assert record["status"] == "included", record
    assert record["channels"]["NC"]["resampled_to_reference"] and not record["channels"]["PV"]["resampled_to_reference"]
    pv = sitk.ReadImage(str(tmp_path / "out" / image_file("PV")))
    nc = sitk.ReadImage(str(tmp_path / "out" / image_file("NC")))
    assert nc.GetSize() == pv.GetSize() and nc.GetOrigin() == pv.GetOrigin()


def test_identifying_values_in_file_names_and_descriptions_are_redacted(tmp_path):
    folder = tmp_path / "dicom" / "MRN7654321"
    write_ct_series(folder / "MRN7654321_ct", _volume(), z_positions=np.arange(12) * 2.0, patient_id="MRN7654321",
                    description="PORTAL VENOUS MRN7654321")
    (folder / "MRN7654321_broken.dcm").write_bytes(b"\x02" * 400)
    mask = sitk.Image((20, 24, 11), sitk.sitkUInt8)  # wrong grid: the message names the file
    sitk.WriteImage(mask, str(folder / "MRN7654321_seg.nii.gz"))
    study, ids = _study(tmp_path)
    record = ingest_patient(study, "T", ids["MRN7654321"], tmp_path / "out")
    assert record["reason"] == "mask_grid_mismatch"
    text = (tmp_path / "out" / "qc.json").read_text()
    assert "7654321" not in text
    assert record["file"] == f"{ids['MRN7654321']}_seg.nii.gz"


def test_redactor_covers_name_parts_and_nested_values():
    from radstudy.ingest.phi import Redactor

    redact = Redactor("H-0001", "DOE_JOHN", {"DOE^JOHN^Q", "ACC998877", "St. Elsewhere Hospital"})
    record = {"file": "DOE_JOHN/ct/doe-john.dcm", "notes": ["acc998877 scanned at St. Elsewhere Hospital"], "n": 3}
    assert redact(record) == {"file": "H-0001/ct/[redacted]-[redacted].dcm",
                              "notes": ["[redacted] scanned at [redacted]"], "n": 3}
