"""Tests of the synthetic demo cohort (radstudy.demo.cohort): determinism, DICOM geometry and conventions,
PHI, masks (NIfTI and RTSTRUCT), clinical table, and the image/outcome signal the study must find."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import CTImageStorage, RTStructureSetStorage
from scipy import ndimage
from scipy.stats import spearmanr
from skimage.draw import polygon2mask

from radstudy.concordance import auc, harrell_c
from radstudy.demo import cohort as demo
from radstudy.errors import ConfigError

SEED = 20261123
SMALL = {"patients": 3, "annotated_fraction": 0.67, "rtstruct_per_center": 1, "_downsample": 2}
PORTAL_SELECTOR = re.compile(r"portal|venous|\bPV\b", re.IGNORECASE)  # the study config's CT selector


def _centers(root: Path, roles=("development", "external")) -> list[dict]:
    return [
        {"id": f"C{i}", "role": role, "dicom_root": root / "dicom" / f"C{i}",
         "clinical": root / "clinical" / f"C{i}.csv"}
        for i, role in enumerate(roles, start=1)
    ]


def _generate(root: Path, seed: int = SEED, roles=("development", "external"), **kwargs) -> tuple[list[dict], dict]:
    centers = _centers(root, roles)
    return centers, demo.generate_cohort(centers, root, seed=seed, **({**SMALL, **kwargs}))


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _dicom_headers(patient_dir: Path) -> dict[Path, pydicom.Dataset]:
    return {
        p: pydicom.dcmread(p, stop_before_pixels=True)
        for p in sorted(patient_dir.rglob("*"))
        if p.is_file() and "segmentation" not in p.relative_to(patient_dir).parts
    }


def _ct_series(headers: dict[Path, pydicom.Dataset]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    series = defaultdict(list)
    for path, ds in headers.items():
        if ds.Modality == "CT":
            series[ds.SeriesInstanceUID].append((path, ds))
    return dict(series)


def _kind(files: list[tuple[Path, pydicom.Dataset]]) -> str:
    ds = files[0][1]
    if "LOCALIZER" in ds.ImageType:
        return "scout"
    return "portal" if PORTAL_SELECTOR.search(ds.SeriesDescription) else "native"


def _series_by_kind(patient_dir: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    by_kind = {}
    for files in _ct_series(_dicom_headers(patient_dir)).values():
        assert _kind(files) not in by_kind, f"two {_kind(files)} series in {patient_dir}"
        by_kind[_kind(files)] = files
    return by_kind


def _read_portal(patient_dir: Path) -> sitk.Image:
    """The portal series as the pipeline reads it: files sorted by GDCM (ImagePositionPatient)."""
    files = _series_by_kind(patient_dir)["portal"]
    folders = {p.parent for p, _ in files}
    assert len(folders) == 1
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folders.pop()), files[0][1].SeriesInstanceUID)
    assert len(names) == len(files)
    return sitk.ReadImage(names)


def _assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-9)


def _fingerprint(root: Path) -> dict[str, str]:
    """Hash of every delivered file and every ground-truth file but centers.json (it names absolute paths)."""
    files = [*root.joinpath("dicom").rglob("*"), *root.joinpath("clinical").rglob("*"),
             *root.joinpath("ground_truth").rglob("*.*")]
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file() and p.name != "centers.json"
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """2 centers x 3 patients at half the small matrix (48x48, ~34 slices)."""
    root = tmp_path_factory.mktemp("cohort")
    centers, summary = _generate(root)
    return root, centers, summary


@pytest.fixture(scope="module")
def outcome_cohort(tmp_path_factory) -> Path:
    """1 center x 60 patients at a third of the small matrix, enough to see the outcome signal."""
    root = tmp_path_factory.mktemp("outcome")
    _generate(root, roles=("development",), patients=60, annotated_fraction=0.0, rtstruct_per_center=0, _downsample=3)
    return root


def _patients(root: Path) -> list[dict]:
    return _read_tsv(root / "ground_truth" / "patients.tsv")


def _patient_dir(root: Path, row: dict) -> Path:
    return root / "dicom" / row["center"] / row["patient_id"]


def _true_mask(root: Path, center: str, patient_id: str) -> sitk.Image:
    return sitk.ReadImage(str(root / "ground_truth" / "masks" / center / f"{patient_id}.nii.gz"))


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_whatever_the_worker_count(cohort, tmp_path):
    root, _, summary = cohort
    _, again = _generate(tmp_path, workers=2)
    first, second = _fingerprint(root), _fingerprint(tmp_path)
    assert sum(name.startswith("dicom") for name in first) > 100
    assert first == second  # file names, UIDs, pixel data, clinical CSVs and truth tables
    assert {k: v for k, v in again.items() if k != "ground_truth"} == {
        k: v for k, v in summary.items() if k != "ground_truth"
    }


def test_different_seed_gives_other_patients_uids_and_pixels(cohort, tmp_path):
    root, _, _ = cohort
    _generate(tmp_path, seed=SEED + 1)

    def uids_and_pixels(base: Path) -> tuple[set, set]:
        uids, pixels = set(), set()
        for path in base.joinpath("dicom").rglob("*"):
            if path.is_file() and "segmentation" not in path.parts:
                ds = pydicom.dcmread(path)
                uids.add(ds.SOPInstanceUID)
                if "PixelData" in ds:
                    pixels.add(hashlib.sha1(ds.PixelData).hexdigest())
        return uids, pixels

    (uids_a, pixels_a), (uids_b, pixels_b) = uids_and_pixels(root), uids_and_pixels(tmp_path)
    assert uids_a and pixels_a and not uids_a & uids_b and not pixels_a & pixels_b
    assert {r["patient_id"] for r in _patients(root)}.isdisjoint(r["patient_id"] for r in _patients(tmp_path))
    assert (root / "clinical" / "C1.csv").read_text() != (tmp_path / "clinical" / "C1.csv").read_text()


# --- images and geometry ------------------------------------------------------------------------


def test_portal_series_reads_back_as_the_true_volume_and_masks_share_its_grid(cohort):
    root, centers, _ = cohort
    jobs = demo._plan_cohort(centers, root, seed=SEED, patients=3, size="small", annotated_fraction=0.67,
                             rtstruct_per_center=1, seg_per_center=0, labels=demo.DEFAULT_LABELS, downsample=2)
    formats = {r["patient_id"]: r["mask_format"] for r in _patients(root)}
    assert sorted(formats) == sorted(job.patient_id for job in jobs)
    for job in jobs:
        truth = demo._synthesise(job)
        patient_dir = job.profile.dicom_root / job.patient_id
        image = _read_portal(patient_dir)
        assert image.GetSize() == truth.grid.shape[::-1]
        assert image.GetSpacing() == pytest.approx(truth.grid.spacing, abs=1e-6)
        assert image.GetOrigin() == pytest.approx(truth.grid.origin, abs=1e-6)
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), truth.portal)

        true_mask = _true_mask(root, job.profile.id, job.patient_id)
        _assert_same_grid(true_mask, image)
        labels = sitk.GetArrayFromImage(true_mask)
        np.testing.assert_array_equal(labels, truth.label_map)
        liver, tumour = labels == 1, labels == 2
        assert liver.sum() > 300 and tumour.sum() > 50
        # Liver in the upper abdomen on the patient's right (-x), the primary tumour lower down.
        z_liver, z_tumour = np.nonzero(liver)[0].mean(), np.nonzero(tumour)[0].mean()
        assert z_tumour < z_liver
        assert np.nonzero(liver)[2].mean() < labels.shape[2] / 2
        hu = truth.portal
        assert hu[liver].mean() > hu[labels == 0].mean()  # enhancing liver vs. air/fat/soft tissue mix

        segmentations = sorted(patient_dir.glob("segmentation/*_seg.nii.gz"))
        assert len(segmentations) == (job.mask_format == "nifti") == (formats[job.patient_id] == "nifti")
        for path in segmentations:
            delivered = sitk.ReadImage(str(path))
            _assert_same_grid(delivered, image)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(delivered), labels)


def test_each_patient_has_portal_native_and_scout_series(cohort):
    root, _, _ = cohort
    profiles = {p["id"]: p for p in json.loads((root / "ground_truth" / "centers.json").read_text())["centers"]}
    for row in _patients(root):
        patient_dir = _patient_dir(root, row)
        profile = profiles[row["center"]]
        headers = _dicom_headers(patient_dir)
        series = _series_by_kind(patient_dir)
        assert sorted(series) == ["native", "portal", "scout"]
        nz = _true_mask(root, row["center"], row["patient_id"]).GetSize()[2]
        portal, native, scout = series["portal"], series["native"], series["scout"]
        assert len(portal) == nz
        assert len(native) == math.ceil(nz / 2) < nz
        assert len(scout) == profile["scout_views"] in (1, 2)
        assert not PORTAL_SELECTOR.search(native[0][1].SeriesDescription)
        assert all(list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] for _, ds in portal + native)

        def z(files):
            return np.array([float(ds.ImagePositionPatient[2]) for _, ds in files])

        thin, thick = float(portal[0][1].SliceThickness), float(native[0][1].SliceThickness)
        assert thick == 2 * thin
        assert z(native).min() == z(portal).min() and z(portal).max() - z(native).max() < thick
        # InstanceNumber runs 1..n along z, cranio-caudal or caudo-cranial depending on the center.
        for files in (portal, native):
            order = np.argsort([int(ds.InstanceNumber) for _, ds in files])
            assert sorted(int(ds.InstanceNumber) for _, ds in files) == list(range(1, len(files) + 1))
            steps = np.diff(z(files)[order])
            assert np.all(steps < 0) if profile["head_first"] else np.all(steps > 0)
        # One study, one frame of reference; the three series differ.
        assert len({ds.StudyInstanceUID for ds in headers.values()}) == 1
        assert len({ds.FrameOfReferenceUID for ds in headers.values() if ds.Modality == "CT"}) == 1
        assert len({ds.SeriesInstanceUID for ds in headers.values()}) == 3 + (row["mask_format"] in ("rtstruct", "seg"))
        for _, ds in portal:
            assert ds.SOPClassUID == CTImageStorage
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.Manufacturer == profile["manufacturer"] and ds.ConvolutionKernel == profile["kernel"]
            assert int(ds.RescaleIntercept) == profile["storage"]["intercept"]
            assert int(ds.BitsStored) == profile["storage"]["bits_stored"]
            assert int(ds.PixelRepresentation) == profile["storage"]["signed"]


def test_centers_differ_in_scanner_effects_and_delivery_conventions(cohort):
    root, _, _ = cohort
    first, second = json.loads((root / "ground_truth" / "centers.json").read_text())["centers"]
    conventions = ("hu_offset", "noise_sigma", "pixel_spacing", "storage", "manufacturer", "layout", "naming",
                   "series_names")
    for key in conventions:
        assert first[key] != second[key], key
    for profile in (first, second):
        assert 10 <= abs(profile["hu_offset"]) <= 30 and 0.9 <= profile["hu_scale"] <= 1.1
        assert 6 <= profile["noise_sigma"] <= 18 and 3.2 <= profile["pixel_spacing"] <= 4.2
        assert 60 <= profile["portal_delay"] <= 80
    # the kernels take a permutation: two centers never share one, and a kernel either blurs or sharpens
    assert (first["psf_sigma"], first["edge_enhancement"]) != (second["psf_sigma"], second["edge_enhancement"])
    assert all((p["psf_sigma"] > 0) != (p["edge_enhancement"] > 0) for p in (first, second))


def test_the_external_centers_kernel_lies_within_the_development_centers_range():
    centers = _centers(Path("/nonexistent"), ("development",) * 3 + ("external",))
    for seed in range(8):
        profiles = demo._center_profiles(centers, seed, "small")
        mtf = [(p.psf_sigma, p.edge_enhancement) for p in profiles]
        assert sorted(mtf) == sorted(demo._KERNEL_MTF)  # four centers, four different kernels
        assert mtf[3] not in (demo._KERNEL_MTF[0], demo._KERNEL_MTF[-1]), seed


def test_voxel_averaging_of_texture_matches_numerical_integration():
    from scipy import integrate

    for voxel, grain in ((3.0, 2.5), (5.0, 2.5), (4.0, 8.0), (0.5, 3.0)):
        numeric = integrate.dblquad(lambda x, y, g=grain: math.exp(-((x - y) ** 2) / (4 * g**2)), 0, voxel, 0, voxel)[0]
        assert demo._voxel_average_variance(voxel, grain) == pytest.approx(numeric / voxel**2, rel=1e-6)
    # thicker slices keep less of a fine texture
    assert demo._voxel_average_variance(5.0, 2.5) < demo._voxel_average_variance(3.0, 2.5) < 1


def _texture_image(psf_sigma: float, edge: float, delay: float) -> tuple[np.ndarray, np.ndarray]:
    """One patient's noiseless portal image through a center with the given kernel and contrast timing, and its
    tumour mask (the same anatomy and per-patient draws whatever the center)."""
    centers = _centers(Path("/nonexistent"))
    profile = demo._center_profiles(centers, SEED, "small")[0]
    profile = dataclasses.replace(profile, psf_sigma=psf_sigma, edge_enhancement=edge, portal_delay=delay,
                                  noise_sigma=0.0, hu_offset=0.0, hu_scale=1.0)
    clinical = dataclasses.replace(demo._clinical(np.random.default_rng(1)), tumour_heterogeneity=0.6)
    rng = np.random.default_rng(2)
    anatomy = demo._anatomy(rng, demo._grid(rng, profile, "small", 1), clinical)
    phase = demo._phases(rng, profile.portal_delay)["portal"]
    # the tumour's interior, 2 pixels in from its outline: the kernels' edge responses stay outside
    interior = ndimage.binary_erosion(anatomy.tissue == demo.TUMOUR, np.ones((1, 5, 5), bool))
    return demo._render_portal(anatomy, phase, profile, np.random.default_rng(3)), interior


def test_scanner_effects_change_the_tumour_texture_not_only_the_noise():
    soft, tumour = _texture_image(1.0, 0.0, 70)
    sharp, _ = _texture_image(0.0, 0.8, 70)
    late, _ = _texture_image(1.0, 0.0, 80)
    # same tissue, no noise: a soft kernel blurs the texture, a sharp one lifts it (by ~23% in sd here)
    assert sharp[tumour].std() > 1.15 * soft[tumour].std()
    # a later portal-venous scan enhances the tumour more, and its pattern of enhancement with it
    assert late[tumour].mean() > soft[tumour].mean() + 5
    assert late[tumour].std() > 1.1 * soft[tumour].std()


# --- PHI ----------------------------------------------------------------------------------------


def test_phi_is_in_every_file_of_the_patient_and_listed_in_phi_tsv(cohort):
    root, _, _ = cohort
    phi = defaultdict(dict)
    for row in _read_tsv(root / "ground_truth" / "phi.tsv"):
        phi[row["center"], row["patient_id"]][row["field"]] = row["value"]
    dicom_fields = {"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
                    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OperatorsName", "StudyID",
                    "PatientSex", "PatientAge"}
    patients = _patients(root)
    assert set(phi) == {(r["center"], r["patient_id"]) for r in patients}
    clinical = {}
    for center in ("C1", "C2"):
        clinical.update({r["patient_id"]: r for r in _read_csv(root / "clinical" / f"{center}.csv")[1]})
    for row in patients:
        values = phi[row["center"], row["patient_id"]]
        assert set(values) == dicom_fields | {"patient_name", "birth_date"}
        assert values["PatientID"] == row["patient_id"] and all(values.values())
        headers = _dicom_headers(_patient_dir(root, row))
        assert any(ds.Modality == "RTSTRUCT" for ds in headers.values()) == (row["mask_format"] == "rtstruct")
        for ds in headers.values():
            for field in dicom_fields:
                assert str(ds.data_element(field).value) == values[field], field
        assert clinical[row["patient_id"]]["patient_name"] == values["patient_name"]
        assert clinical[row["patient_id"]]["birth_date"] == values["birth_date"]
    # Institutions are per center.
    assert len({phi[k]["InstitutionName"] for k in phi}) == 2


# --- RTSTRUCT -----------------------------------------------------------------------------------


def test_rtstruct_references_the_portal_slices_and_rasterises_to_the_true_mask(cohort):
    root, _, summary = cohort
    rows = [r for r in _patients(root) if r["mask_format"] == "rtstruct"]
    assert len(rows) == 2 and all(v["rtstruct"] == 1 for v in summary["annotated"].values())
    for row in rows:
        patient_dir = _patient_dir(root, row)
        headers = _dicom_headers(patient_dir)
        [rt_path] = [p for p, ds in headers.items() if ds.Modality == "RTSTRUCT"]
        assert not list(patient_dir.glob("segmentation/*"))  # delivered only as RTSTRUCT
        rt = pydicom.dcmread(rt_path)
        assert rt.SOPClassUID == rt.file_meta.MediaStorageSOPClassUID == RTStructureSetStorage
        portal = _series_by_kind(patient_dir)["portal"]
        portal_ds = portal[0][1]
        slice_z = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for _, ds in portal}

        frame = rt.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == portal_ds.FrameOfReferenceUID
        study = frame.RTReferencedStudySequence[0]
        assert study.ReferencedSOPInstanceUID == portal_ds.StudyInstanceUID == rt.StudyInstanceUID
        series = study.RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == portal_ds.SeriesInstanceUID
        assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == set(slice_z)

        names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
        assert sorted(names.values()) == ["GTV_Tumour", "Liver"]
        assert {o.ReferencedROINumber for o in rt.RTROIObservationsSequence} == set(names)

        mask = _true_mask(root, row["center"], row["patient_id"])
        labels = sitk.GetArrayFromImage(mask)
        (x0, y0, z0), (dx, dy, dz) = mask.GetOrigin(), mask.GetSpacing()
        nz, ny, nx = labels.shape
        for roi in rt.ROIContourSequence:
            raster = np.zeros(labels.shape, bool)
            for contour in roi.ContourSequence:
                assert contour.ContourGeometricType == "CLOSED_PLANAR"
                points = np.array(contour.ContourData, float).reshape(-1, 3)
                assert len(points) == contour.NumberOfContourPoints >= 3
                [image_ref] = contour.ContourImageSequence
                assert np.allclose(points[:, 2], slice_z[image_ref.ReferencedSOPInstanceUID])
                assert np.all((points[:, 0] > x0 - dx / 2) & (points[:, 0] < x0 + (nx - 0.5) * dx))
                assert np.all((points[:, 1] > y0 - dy / 2) & (points[:, 1] < y0 + (ny - 0.5) * dy))
                k = int(round((points[0, 2] - z0) / dz))
                # Even-odd fill of voxel centres inside the polygon (row, column coordinates).
                rows_cols = np.column_stack([(points[:, 1] - y0) / dy, (points[:, 0] - x0) / dx])
                raster[k] ^= polygon2mask((ny, nx), rows_cols)
            label = 1 if names[roi.ReferencedROINumber] == "Liver" else 2
            np.testing.assert_array_equal(raster, labels == label)


# --- clinical table and outcomes ----------------------------------------------------------------


def test_clinical_table_lists_every_delivered_patient(cohort):
    root, centers, summary = cohort
    truth = {r["patient_id"]: r for r in _patients(root)}
    for center in centers:
        columns, rows = _read_csv(Path(center["clinical"]))
        assert columns == list(demo._CLINICAL_COLUMNS)
        folders = sorted(p.name for p in Path(center["dicom_root"]).iterdir())
        assert sorted(r["patient_id"] for r in rows) == folders and len(rows) == summary["patients"][center["id"]]
        for r in rows:
            assert r["sex"] in {"M", "F"} and r["tumour_site"] in {"colon", "rectum"}
            assert re.fullmatch(r"T[1-4]", r["t_stage"]) and re.fullmatch(r"N[0-2]", r["n_stage"])
            assert 30 <= int(r["age"]) <= 90
            for column in ("synchronous_lm", "mfs_months", "mfs_event"):
                assert r[column] == truth[r["patient_id"]][column]
            assert 0 < float(r["mfs_months"]) <= 60


def test_clinical_table_has_missing_lab_values_like_real_data(outcome_cohort):
    columns, rows = _read_csv(outcome_cohort / "clinical" / "C1.csv")
    missing = {c: sum(r[c] == "" for r in rows) for c in columns}
    missable = ("cea", "ca19_9", "afp", "dissected_lymph_nodes")
    assert 0 < sum(missing[c] for c in missable) <= 0.2 * len(missable) * len(rows)
    assert all(missing[c] == 0 for c in columns if c not in missable)


def test_outcomes_follow_the_latent_risk(outcome_cohort):
    oracle = json.loads((outcome_cohort / "ground_truth" / "oracle.json").read_text())
    rows = _patients(outcome_cohort)
    assert len(rows) == oracle["overall"]["n"] == oracle["centers"]["C1"]["n"] == 60
    assert "vs mfs_months/mfs_event" in oracle["note"]  # the column names, not their values
    assert oracle["overall"]["auc"] > 0.75
    assert oracle["overall"]["c_index"] > 0.65
    assert 0.15 <= oracle["overall"]["prevalence"] <= 0.6 and 0.25 <= oracle["overall"]["event_rate"] <= 0.8
    risk = np.array([float(r["latent_risk"]) for r in rows])
    label = np.array([int(r["synchronous_lm"]) for r in rows])
    assert auc(label, risk) == pytest.approx(oracle["overall"]["auc"])
    assert auc(label, -risk) == pytest.approx(1 - oracle["overall"]["auc"])


def test_oracle_metrics_agree_with_sklearn_and_lifelines(outcome_cohort):
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    concordance_index = pytest.importorskip("lifelines.utils").concordance_index
    rows = _patients(outcome_cohort)
    risk = np.array([float(r["latent_risk"]) for r in rows])
    time = np.array([float(r["mfs_months"]) for r in rows])
    event = np.array([int(r["mfs_event"]) for r in rows])
    label = np.array([int(r["synchronous_lm"]) for r in rows])
    assert auc(label, risk) == pytest.approx(roc_auc_score(label, risk))
    assert harrell_c(time, event, risk) == pytest.approx(concordance_index(time, -risk, event), abs=0.01)


def test_image_texture_parameters_show_in_the_voxel_statistics(outcome_cohort):
    tumour_sd, liver_sd, heterogeneity, texture = [], [], [], []
    for row in _patients(outcome_cohort):
        image = sitk.GetArrayFromImage(_read_portal(_patient_dir(outcome_cohort, row)))
        labels = sitk.GetArrayFromImage(_true_mask(outcome_cohort, "C1", row["patient_id"]))
        tumour_sd.append(image[labels == 2].std())
        liver_sd.append(image[labels == 1].std())
        heterogeneity.append(float(row["tumour_heterogeneity"]))
        texture.append(float(row["liver_texture"]))
    assert spearmanr(heterogeneity, tumour_sd)[0] > 0.5
    assert spearmanr(texture, liver_sd)[0] > 0.5


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"centers": [{"id": "C1", "role": "training", "dicom_root": "x", "clinical": "y"}]},
        {"centers": [{"id": "C1", "role": "external", "dicom_root": "x", "clinical": "y"}] * 2},
        {"centers": [{"id": "C1", "role": "external", "dicom_root": "x"}]},
        {"seed": -1},
        {"patients": (5, 2)},
        {"size": "huge"},
        {"labels": {"liver": 1, "tumour": 1}},
        {"annotated_fraction": 1.5},
    ],
)
def test_invalid_arguments_are_config_errors(tmp_path, change):
    args = {"centers": _centers(tmp_path), "seed": 1, **change}
    with pytest.raises(ConfigError):
        demo.generate_cohort(args.pop("centers"), tmp_path, **args)
    assert not (tmp_path / "dicom").exists()


def test_refuses_to_write_into_a_non_empty_center_folder(tmp_path):
    centers = _centers(tmp_path)
    Path(centers[0]["dicom_root"]).mkdir(parents=True)
    (Path(centers[0]["dicom_root"]) / "OLD_PATIENT").mkdir()
    with pytest.raises(FileExistsError):
        demo.generate_cohort(centers, tmp_path, seed=1, **SMALL)


# --- DICOM SEG ----------------------------------------------------------------------------------


def test_seg_delivery_reads_back_as_the_true_mask(tmp_path):
    """A patient delivered with a DICOM SEG (highdicom) on the portal series: radstudy's reader gives back the true
    label map voxel for voxel, segment labels as 3D Slicer names them."""
    from radstudy.ingest import masks

    _, summary = _generate(tmp_path, roles=("development",), patients=1, annotated_fraction=1.0,
                           rtstruct_per_center=0, seg_per_center=1, _downsample=3)
    assert summary["annotated"]["C1"] == {"nifti": 0, "rtstruct": 0, "seg": 1}
    [row] = _patients(tmp_path)
    assert row["mask_format"] == "seg"
    patient_dir = _patient_dir(tmp_path, row)
    [seg_path] = [p for p, ds in _dicom_headers(patient_dir).items() if ds.Modality == "SEG"]
    assert not list(patient_dir.glob("segmentation/*"))  # delivered only as SEG
    portal = _read_portal(patient_dir)
    source = masks.read_seg(seg_path)
    assert source.names == ["Liver", "Tumour"]
    assert source.referenced_series_uid == _series_by_kind(patient_dir)["portal"][0][1].SeriesInstanceUID
    truth = sitk.GetArrayFromImage(_true_mask(tmp_path, "C1", row["patient_id"]))
    for name, value in (("Liver", 1), ("Tumour", 2)):
        region = sitk.GetArrayFromImage(source.region(name, portal))
        np.testing.assert_array_equal(region, truth == value)


def test_an_external_center_holding_an_extreme_setting_swaps_with_a_development_center_in_the_middle():
    """external_within_range, shared by the CT kernels and the MR reconstruction filters."""
    roles = ["development", "development", "external"]
    assert demo.external_within_range([2, 0, 3, 1], roles) == [3, 0, 2, 1]  # external 3 (sharpest) <-> dev 2
    assert demo.external_within_range([3, 0, 1, 2], roles) == [3, 0, 1, 2]  # external 1 (middle): unchanged
    assert demo.external_within_range([0, 3, 2, 1], ["external", "development", "development"]) == [2, 3, 0, 1]
    assert demo.external_within_range([0, 1], ["external", "development"]) == [0, 1]  # no middle level to swap in
