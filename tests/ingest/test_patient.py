"""Ingestion of one patient through `ingest_patient`: the real CT reproduces IBSI's conversion, and every kind
of bad input becomes an exclusion record (or an error with on_error: fail) without breaking the study."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from radstudy.config import load_study
from radstudy.errors import CHANNEL_GRID_MISMATCH, PatientExcluded
from radstudy.ingest import dicomio
from radstudy.ingest.patient import MASK_FILE, fov_file, image_file, ingest_patient
from radstudy.ingest.pseudonym import assign_pseudonyms

from dicom_factory import write_ct_series, write_mr_series, write_rtstruct, write_seg

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _study(tmp_path: Path, *, channels=None, rtstruct_rois=None, on_error="exclude", masks=None):
    config = copy.deepcopy(BASE_CONFIG)
    config["centers"] = "centers.tsv"
    config["pseudonymisation"]["key_file"] = "private/key.tsv"
    config["demo"]["enabled"] = False
    if channels:
        config["ingest"]["channels"] = channels
    if rtstruct_rois:
        config["ingest"]["masks"]["rtstruct_rois"] = rtstruct_rois
    config["ingest"]["masks"].update(masks or {})
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


def _reproduces_ibsi_conversion(tmp_path, reference_dir, series: str, channel: str, modality: str) -> dict:
    """The IBSI team's STS_001 series with its RTSTRUCT, ingested: the image equals their NIfTI voxel for voxel
    (same size, origin, spacing, direction) and the GTV reaches Dice >= 0.99 with their mask. Returns the record."""
    sts = reference_dir / "dicom" / "STS_001"
    shutil.copytree(sts / series, tmp_path / "dicom" / "STS001")
    study, ids = _study(tmp_path, channels={channel: {"modality": modality, "min_slices": 10}},
                        rtstruct_rois={"tumour": "gtv"})
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["STS001"], out)
    assert record["status"] == "included", record
    ours = sitk.ReadImage(str(out / image_file(channel)))
    theirs = sitk.ReadImage(str(sts / "nifti" / f"{series}_image.nii.gz"))
    assert ours.GetSize() == theirs.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ours).astype(np.float64),
                          sitk.GetArrayFromImage(theirs).astype(np.float64))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))) == study.config["ingest"]["labels"]["tumour"]
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(sts / "nifti" / f"{series}_mask.nii.gz"))) > 0
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice >= 0.99, dice
    assert record["mask"]["source"] == "rtstruct"
    return record


def test_real_ct_with_rtstruct_reproduces_ibsi_conversion(tmp_path, reference_dir):
    record = _reproduces_ibsi_conversion(tmp_path, reference_dir, "CT", "CT", "CT")
    assert record["mask"]["rois"] == {"tumour": "GTV_Mass_CT"}


def test_real_mr_with_rtstruct_reproduces_ibsi_conversion(tmp_path, reference_dir):
    """The T1-weighted MR of STS_001 (issue 17): raw MR values, no rescale to HU."""
    record = _reproduces_ibsi_conversion(tmp_path, reference_dir, "MR_T1", "T1", "MR")
    first = pydicom.dcmread(sorted((reference_dir / "dicom" / "STS_001" / "MR_T1" / "image").iterdir())[0],
                            stop_before_pixels=True)
    for keyword, key in (("EchoTime", "echo_time_ms"), ("RepetitionTime", "repetition_time_ms")):
        value = first.get(keyword)  # this export keeps the elements without a value: None, not 0
        assert record["channels"]["T1"][key] == (None if value in (None, "") else pytest.approx(float(value)))


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


@pytest.mark.parametrize("same_grid", [True, False])
def test_a_channel_in_another_frame_of_reference_is_excluded_naming_both_series(tmp_path, same_grid):
    """Two sessions (two frames of reference) are two coordinate systems: even on identical grids their voxels do
    not correspond without registration."""
    folder = tmp_path / "dicom" / "MRN1"
    write_ct_series(folder / "s1", _volume(), z_positions=np.arange(12) * 2.0, description="ABD PV 3mm",
                    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1")
    write_ct_series(folder / "s2", _volume(seed=4) if same_grid else _volume(6, seed=4),
                    z_positions=np.arange(12) * 2.0 if same_grid else np.arange(6) * 4.0,
                    description="NON CONTRAST", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2")
    channels = {"PV": {"description": "PV"}, "NC": {"description": "NON CONTRAST", "min_slices": 2}}
    study, ids = _study(tmp_path, channels=channels)
    record = ingest_patient(study, "T", ids["MRN1"], tmp_path / "out")
    assert record["status"] == "excluded" and record["reason"] == CHANNEL_GRID_MISMATCH, record
    assert "another frame of reference" in record["message"]
    assert "NON CONTRAST" in record["message"] and "ABD PV 3mm" in record["message"]


def test_n4_bias_correction_of_an_mr_channel_flattens_a_bias_field(tmp_path):
    """ingest.channels.*.bias_correction n4: a smooth multiplicative field over a homogeneous body is removed (the
    coefficient of variation inside the body falls to the noise's), the qc.json record says so; none keeps the
    scanner's values."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices((12, 64, 64))
    body = ((y - 32) / 26) ** 2 + ((x - 32) / 26) ** 2 <= 1
    field = np.exp(0.4 * (x - 32) / 32 + 0.2 * (y - 32) / 32)
    volume = np.round((np.where(body, 400.0, 0.0) + rng.normal(0, 6, body.shape) * body) * field + 20).astype(np.int16)
    write_mr_series(tmp_path / "dicom" / "MRN1" / "t2", volume, z_positions=np.arange(12) * 3.0)

    def cv(channels: dict) -> tuple[float, dict]:
        study, ids = _study(tmp_path, channels=channels)
        out = tmp_path / f"out_{channels['T2'].get('bias_correction', 'none')}"
        record = ingest_patient(study, "T", ids["MRN1"], out)
        assert record["status"] == "included", record
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image_file("T2"))))[body]
        return float(values.std() / values.mean()), record["channels"]["T2"]

    raw, raw_record = cv({"T2": {"modality": "MR", "min_slices": 10}})
    corrected, record = cv({"T2": {"modality": "MR", "min_slices": 10, "bias_correction": "n4"}})
    assert raw > 0.15 and corrected < 0.05
    assert record["bias_correction"] == "n4" and raw_record["bias_correction"] == "none"


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


# --------------------------------------------------------------------------- masks as hospitals deliver them


def _square(x0, y0, x1, y1, z):
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def _rasterised(folder: Path, rtstruct: str, roi: str, out: Path) -> np.ndarray:
    """The ROI rasterised alone onto the ingested CT: what the mask must equal."""
    structure = dicomio.read_rtstruct(folder / rtstruct)
    return sitk.GetArrayFromImage(dicomio.rasterise_roi(structure, roi, sitk.ReadImage(str(out / image_file("CT"))))) > 0


def _one_rtstruct_per_modality(folder: Path) -> None:
    """A PET/CT/MR delivery: CT, PT (same frame of reference, other grid) and MR series, each with its own
    RTSTRUCT (all SeriesNumber 1, as treatment-planning exports number them) and ROIs named per modality; the
    PT and MR contours lie elsewhere, so a mask taken from them is visibly wrong."""
    frame = "1.2.826.0.1.3680043.8.498.77"
    ct = write_ct_series(folder / "ct", _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS",
                         frame_of_reference_uid=frame)
    pt = write_ct_series(folder / "pt", _volume(6, 10, 10), z_positions=np.arange(6) * 4.0, description="PET AC",
                         modality="PT", pixel_spacing=(2.0, 2.0), frame_of_reference_uid=frame, series_number=3)
    mr = write_ct_series(folder / "mr", _volume(8, 16, 16), z_positions=np.arange(8) * 3.0, description="T2 AX",
                         modality="MR", series_number=4)
    for name, uids, roi, box in [("rs_mr.dcm", mr, "GTV_MR", (-9, -19, -5, -15)),
                                 ("rs_ct.dcm", ct, "GTV_CT", (-6, -14, 0, -6)),
                                 ("rs_pt.dcm", pt, "GTV_PT", (-3, -10, 3, -3))]:
        contours = [_square(*box, z) for z in (4.0, 6.0, 8.0)]
        path = write_rtstruct(folder / name, uids, {roi: contours, "BODY": [_square(-10, -20, 3, -2, 6.0)]})
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = 1
        ds.save_as(path)


@pytest.mark.parametrize("pattern", ["^GTV_CT$", "gtv"])
def test_mask_comes_from_the_structure_set_of_the_reference_series(tmp_path, pattern):
    folder = tmp_path / "dicom" / "MRN1"
    _one_rtstruct_per_modality(folder)
    study, ids = _study(tmp_path, rtstruct_rois={"tumour": pattern})
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included", record.get("message")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE)))
    expected = _rasterised(folder, "rs_ct.dcm", "GTV_CT", out)
    assert expected.sum() > 0 and np.array_equal(mask == 2, expected)  # Dice 1.0 with the CT's own contour
    tumour = record["mask"]["regions"]["tumour"]
    assert tumour["names"] == ["GTV_CT"] and tumour["files"] == ["rs_ct.dcm"] and tumour["reference"] == ["series"]
    assert tumour["drawn_on"] == ["series #2 CT 'PORTAL VENOUS' [ORIGINAL\\PRIMARY\\AXIAL] 12 slices"]
    unused = {u["file"]: u["why"] for u in record["unused_files"]}
    assert "references series #4 MR 'T2 AX'" in unused["rs_mr.dcm"] and "#3 PT 'PET AC'" in unused["rs_pt.dcm"]
    assert any(f.startswith("pt/") for f in unused) and any(f.startswith("mr/") for f in unused)


def test_no_structure_set_of_the_reference_series_is_an_exclusion_unless_allowed(tmp_path):
    folder = tmp_path / "dicom" / "MRN1"
    _one_rtstruct_per_modality(folder)
    (folder / "rs_ct.dcm").unlink()
    record = _exclusion(tmp_path, lambda f: None, rtstruct_rois={"tumour": "gtv_pt"})
    assert record["reason"] == "mask_unreadable" and "no RTSTRUCT / SEG references the reference series" in record["message"]
    assert "rs_pt.dcm" in record["message"] and "PORTAL VENOUS" in record["message"] and "other_series" in record["message"]
    # the PT shares the CT's frame of reference: its contour may be used when the config allows it
    study, ids = _study(tmp_path, rtstruct_rois={"tumour": "gtv_pt"}, masks={"other_series": "allow"})
    out = tmp_path / "allowed"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included", record.get("message")
    assert record["mask"]["regions"]["tumour"]["reference"] == ["other_series"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))) == 2,
                          _rasterised(folder, "rs_pt.dcm", "GTV_PT", out))
    assert "rs_mr.dcm" in {u["file"] for u in record["unused_files"]}  # another frame of reference: never


def _two_lesions(folder: Path) -> None:
    uids = write_ct_series(folder, _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS")
    write_rtstruct(folder / "rs.dcm", uids, {"GTV-1": [_square(-9, -19, -6, -16, 6.0)],
                                             "GTV-2": [_square(-4, -12, 2, -4, z) for z in (4.0, 6.0)]})


@pytest.mark.parametrize("policy", ["union", "largest", "error"])
def test_several_rois_matching_one_label(tmp_path, policy):
    folder = tmp_path / "dicom" / "MRN1"
    if policy == "error":
        record = _exclusion(tmp_path, _two_lesions, masks={"multiple_matches": {"tumour": policy}})
        assert "2 regions match label 'tumour'" in record["message"] and "'GTV-1'" in record["message"]
        return
    _two_lesions(folder)
    study, ids = _study(tmp_path, masks={"multiple_matches": policy})
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))) == 2
    one, two = (_rasterised(folder, "rs.dcm", roi, out) for roi in ("GTV-1", "GTV-2"))
    assert two.sum() > one.sum() > 0
    tumour = record["mask"]["regions"]["tumour"]
    assert tumour["matched"] == ["GTV-1", "GTV-2"] and tumour["taken"] == policy
    assert np.array_equal(mask, one | two if policy == "union" else two)
    assert tumour["names"] == (["GTV-1", "GTV-2"] if policy == "union" else ["GTV-2"])


def test_files_delivered_and_not_used_are_listed(tmp_path):
    folder = tmp_path / "dicom" / "MRN1"
    _good_patient(folder)
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    (folder / "notes.txt").write_text("reader notes")
    study, ids = _study(tmp_path)
    record = ingest_patient(study, "T", ids["MRN1"], tmp_path / "out")
    unused = {u["file"]: u for u in record["unused_files"]}
    assert unused["report.pdf"]["why"] == "not a DICOM file" and "notes.txt" in unused
    assert "NON CONTRAST" in next(u["series"] for f, u in unused.items() if f.startswith("s2/"))
    assert "Scout" in next(u["series"] for f, u in unused.items() if f.startswith("s3/"))
    assert not any(f.startswith("s1/") for f in unused)  # the series the CT channel took


def test_a_channel_smaller_than_the_reference_keeps_its_outside_out(tmp_path):
    """An MR covering half the CT's extent: filled with 0 (not CT air) outside, with its field-of-view mask and
    the fractions outside recorded for the grid and for each manual-mask label."""
    folder = tmp_path / "dicom" / "MRN1"
    frame = "1.2.826.0.1.3680043.8.498.5"
    ct = write_ct_series(folder / "ct", _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS",
                         frame_of_reference_uid=frame)
    write_ct_series(folder / "mr", _volume(6, 24, 20), z_positions=np.arange(6) * 2.0, description="T2",
                    modality="MR", frame_of_reference_uid=frame, intercept=0.0)
    write_rtstruct(folder / "rs.dcm", ct, {"GTV": [_square(-8, -18, -2, -6, z) for z in (8.0, 10.0, 12.0, 14.0)]})
    channels = {"CT": {"description": "PORTAL"}, "MR": {"modality": "MR", "min_slices": 2}}
    study, ids = _study(tmp_path, channels=channels)
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included", record.get("message")
    fov = sitk.GetArrayFromImage(sitk.ReadImage(str(out / fov_file("MR"))))
    assert fov[:6].all() and not fov[6:].any()  # MR slices at z 0..10 mm of the CT's 0..22 mm
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image_file("MR"))))
    assert (mr[6:] == 0).all() and mr[:6].min() > 900  # MR's own values inside, 0 outside (not -1024)
    fractions = record["channels"]["MR"]["fov_outside_fraction"]
    assert fractions["grid"] == pytest.approx(0.5)
    assert fractions["manual_mask"]["tumour"] == pytest.approx(0.5) and fractions["manual_mask"]["liver"] is None
    assert record["channels"]["MR"]["hu_min"] > 900  # the channel's own value range, not the fill
    assert not (out / fov_file("CT")).exists() and record["channels"]["CT"]["fov_outside_fraction"]["grid"] == 0.0


def _ct_with_label_map(folder: Path):
    """A portal CT series and the label map that its masks (SEG, .seg.nrrd) are made from: liver 1 on slices
    2-8, tumour 2 inside it on slices 4-5 only."""
    uids = write_ct_series(folder / "ct", _volume(), z_positions=np.arange(12) * 2.0, description="PORTAL VENOUS")
    labels = np.zeros((12, 24, 20), dtype=np.uint8)
    labels[2:9, 4:18, 3:15] = 1
    labels[4:6, 8:12, 6:10] = 2
    return uids, labels


def test_a_dicom_seg_gives_the_same_mask_as_the_label_map(tmp_path):
    folder = tmp_path / "dicom" / "MRN1"
    uids, labels = _ct_with_label_map(folder)
    write_seg(folder / "seg.dcm", uids, {"Liver": labels >= 1, "Tumor": labels == 2})
    study, ids = _study(tmp_path)
    out = tmp_path / "out"
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included", record.get("message")
    assert record["mask"]["source"] == "seg" and record["mask"]["files"] == ["seg.dcm"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))), labels)  # Dice 1.0
    assert not record["unused_files"]


def test_a_seg_of_another_series_is_refused_naming_both(tmp_path):
    def make(folder):
        uids, labels = _ct_with_label_map(folder)
        other = write_ct_series(folder / "other", _volume(), z_positions=np.arange(12) * 2.0, description="ARTERIAL",
                                frame_of_reference_uid=uids.frame_of_reference_uid, series_number=5)
        write_seg(folder / "seg.dcm", other, {"Liver": labels >= 1})
    record = _exclusion(tmp_path, make)
    assert record["reason"] == "mask_unreadable" and "seg.dcm" in record["message"]
    assert "PORTAL VENOUS" in record["message"] and "ARTERIAL" in record["message"]


def _slicer_seg_nrrd(path: Path, labels: np.ndarray, segments: dict[str, int], grid: sitk.Image, origin=None):
    """A 3D Slicer segmentation file: `labels` (z, y, x) with Slicer's segment header fields (name -> label value),
    on `grid`'s spacing and axes with its origin or `origin`."""
    import nrrd

    header = {"space": "left-posterior-superior", "space origin": np.array(origin or grid.GetOrigin()),
              "space directions": np.diag(grid.GetSpacing()), "kinds": ["domain"] * 3}
    for i, (name, value) in enumerate(segments.items()):
        header.update({f"Segment{i}_Name": name, f"Segment{i}_LabelValue": str(value), f"Segment{i}_Layer": "0",
                       f"Segment{i}_ID": f"Segment_{i + 1}"})
    nrrd.write(str(path), labels.transpose(2, 1, 0), header)  # NRRD: x fastest


def _ingested_slicer_seg(tmp_path: Path, write) -> tuple[dict, np.ndarray, np.ndarray]:
    """Ingest a patient, add the .seg.nrrd that `write(folder, image)` writes, ingest again: (record, mask, labels)."""
    folder = tmp_path / "dicom" / "MRN1"
    _, labels = _ct_with_label_map(folder)
    study, ids = _study(tmp_path)
    out = tmp_path / "out"
    assert ingest_patient(study, "T", ids["MRN1"], out)["status"] == "included"
    write(folder, sitk.ReadImage(str(out / image_file("CT"))), labels)
    record = ingest_patient(study, "T", ids["MRN1"], out)
    assert record["status"] == "included", record.get("message")
    return record, sitk.GetArrayFromImage(sitk.ReadImage(str(out / MASK_FILE))), labels


def test_a_slicer_seg_nrrd_is_mapped_by_segment_name(tmp_path):
    def write(folder, image, labels):
        # Slicer's own label values (3 = tumour, 7 = liver) differ from the config's: the names decide
        slicer = np.where(labels == 2, 3, np.where(labels == 1, 7, 0)).astype(np.uint8)
        _slicer_seg_nrrd(folder / "case.seg.nrrd", slicer, {"Liver": 7, "Tumor 1": 3}, image)

    record, mask, labels = _ingested_slicer_seg(tmp_path, write)
    assert record["mask"]["source"] == "label_map" and record["mask"]["regions"]["tumour"]["names"] == ["Tumor 1"]
    assert np.array_equal(mask, labels)  # Dice 1.0 with the label map


def test_a_slicer_seg_nrrd_cropped_to_its_content_is_placed_back(tmp_path):
    """3D Slicer saves a .seg.nrrd cropped to the segments' extent by default: same spacing and axes, origin on a
    voxel of the reference; it is pasted back voxel for voxel."""
    def write(folder, image, labels):
        crop = labels[2:9, 4:18, 3:15]  # (z, y, x) extent of the liver
        _slicer_seg_nrrd(folder / "cropped.seg.nrrd", crop, {"liver": 1, "tumour": 2}, image,
                         origin=image.TransformIndexToPhysicalPoint((3, 4, 2)))

    _, mask, labels = _ingested_slicer_seg(tmp_path, write)
    assert np.array_equal(mask, labels)


def test_a_folder_with_only_a_seg_names_what_it_holds(tmp_path):
    """No image the pipeline can read, but DICOM with pixel data: the exclusion says what was delivered."""
    def make(folder):
        uids, labels = _ct_with_label_map(tmp_path / "elsewhere")
        write_seg(folder / "seg.dcm", uids, {"Liver": labels >= 1})
    record = _exclusion(tmp_path, make)
    assert record["reason"] == "unreadable_files" and record["file"] == "seg.dcm"
    assert "1 DICOM file(s) with pixel data but no image position, e.g. seg.dcm (Segmentation Storage)" in record["message"]
