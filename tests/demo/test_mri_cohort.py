"""Tests of the synthetic rectal MRI demo cohort (radstudy.demo.mri): MR Image Storage series and their geometry, the
DWI b-values as the ingestion reads them (standard and vendor private tags), the scanner's ADC map against its DWI
images, manual masks (NIfTI and RTSTRUCT), determinism, the latent risk and the phenotypes the images must carry."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import MRImageStorage, RTStructureSetStorage
from radstudy.demo import cohort as ct
from radstudy.demo import mri
from radstudy.errors import ConfigError
from radstudy.ingest import dicomio, masks
from scipy.stats import spearmanr

SEED = 20261206
# 3 centers x 3 patients at half the small matrix (T2W 48x48x24, DWI 32x32x18); 2 of 3 patients per center annotated
SMALL = {"patients": 3, "annotated_fraction": 0.67, "_downsample": 2}
ROLES = ("development", "development", "external")
ROI_PATTERN = re.compile(r"gtv|tumou?r", re.IGNORECASE)  # the MRI study config's rtstruct_rois (ingest, IGNORECASE)
CLINICAL_VARIABLES = ("age", "sex", "tumour_site", "cea", "ca19_9", "ct_stage", "cn_stage", "mrf", "emvi",
                      "synchronous_lm", "dmfs_months", "dmfs_event")  # seeds 000 / 003
TRUTH_ONLY = ("latent_risk", "adc_heterogeneity", "t2_texture", "tumour_voxels", "annotated", "mask_format")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _centers(root: Path) -> list[dict]:
    return [{"id": f"C{i}", "role": role, "dicom_root": root / "dicom" / f"C{i}",
             "clinical": root / "clinical" / f"C{i}.csv"} for i, role in enumerate(ROLES, start=1)]


def _generate(root: Path, **kwargs) -> dict:
    return mri.generate_mri_cohort(_centers(root), root, seed=SEED, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mri")
    _generate(root)
    return root


@pytest.fixture(scope="module")
def phenotype_cohort(tmp_path_factory) -> Path:
    """3 centers x 8 patients at the small matrix (no delivered masks: the true masks are enough). At half of it
    (DWI pixels 6-7 mm, tumours of ~10-50 ADC voxels) partial volume and noise hide the phenotype."""
    root = tmp_path_factory.mktemp("mri_phenotypes")
    _generate(root, patients=8, annotated_fraction=0.0, _downsample=1)
    return root


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _patients(root: Path) -> list[dict]:
    return _read_tsv(root / "ground_truth" / "patients.tsv")


def _center_profiles(root: Path) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((root / "ground_truth" / "centers.json").read_text())["centers"]}


def _patient_dir(root: Path, row: dict) -> Path:
    return root / "dicom" / row["center"] / row["patient_id"]


def _dicom_files(patient_dir: Path) -> dict[Path, pydicom.Dataset]:
    return {p: pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(patient_dir.rglob("*"))
            if p.is_file() and not p.name.endswith(".nii.gz")}


def _kind(ds: pydicom.Dataset) -> str:
    image_type = [v.upper() for v in ds.ImageType]
    return "adc" if "ADC" in image_type else "dwi" if "DIFFUSION" in image_type else "t2w"


def _series(patient_dir: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """The patient's image series by kind (t2w, dwi, adc), and its RTSTRUCT files under 'rtstruct'."""
    by_uid = defaultdict(list)
    for path, ds in _dicom_files(patient_dir).items():
        by_uid[ds.SeriesInstanceUID].append((path, ds))
    series = {"rtstruct": []}
    for files in by_uid.values():
        ds = files[0][1]
        kind = "rtstruct" if ds.Modality == "RTSTRUCT" else _kind(ds)
        if kind == "rtstruct":
            series[kind] += files
            continue
        assert kind not in series, f"two {kind} series in {patient_dir}"
        assert {_kind(d) for _, d in files} == {kind}
        series[kind] = files
    return series


def _read_series(files: list[tuple[Path, pydicom.Dataset]]) -> sitk.Image:
    """A single-volume series as SimpleITK's series reader reads it (GDCM sorts the files)."""
    folders = {p.parent for p, _ in files}
    assert len(folders) == 1
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folders.pop()), files[0][1].SeriesInstanceUID)
    assert len(names) == len(files)
    return sitk.ReadImage(names)


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def _position_key(ds: pydicom.Dataset) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in ds.ImagePositionPatient)


def _true_mask(root: Path, row: dict) -> sitk.Image:
    return sitk.ReadImage(str(root / "ground_truth" / "masks" / row["center"] / f"{row['patient_id']}.nii.gz"))


# --- 1. series, SOP classes, frame of reference, geometry -----------------------------------------


def test_three_mr_series_per_patient_in_one_frame_oblique_t2w_axial_dwi(cohort):
    rows = _patients(cohort)
    assert len(rows) == 9
    oblique = 0
    for row in rows:
        series = _series(_patient_dir(cohort, row))
        assert set(series) - {"rtstruct"} == {"t2w", "dwi", "adc"}, row["patient_id"]
        images = [ds for kind in ("t2w", "dwi", "adc") for _, ds in series[kind]]
        for ds in images:
            assert ds.SOPClassUID == MRImageStorage and ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
            assert ds.Modality == "MR"
        everything = images + [ds for _, ds in series["rtstruct"]]
        assert len({ds.StudyInstanceUID for ds in everything}) == 1
        assert len({ds.FrameOfReferenceUID for ds in images}) == 1
        assert len({ds.SeriesInstanceUID for ds in images}) == 3

        t2 = [ds for _, ds in series["t2w"]]
        iop = {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in t2}
        assert len(iop) == 1
        row_dir, col_dir = np.array(iop.pop()).reshape(2, 3)
        np.testing.assert_allclose([row_dir @ row_dir, col_dir @ col_dir, row_dir @ col_dir], [1, 1, 0], atol=1e-9)
        oblique += not np.allclose([*row_dir, *col_dir], AXIAL, atol=1e-6)
        # the T2W slices are stacked along their normal, one slice thickness apart
        offsets = sorted(np.array([float(v) for v in ds.ImagePositionPatient]) @ _normal(ds) for ds in t2)
        np.testing.assert_allclose(np.diff(offsets), float(t2[0].SliceThickness), atol=1e-3)
        for kind in ("dwi", "adc"):
            for _, ds in series[kind]:
                assert tuple(float(v) for v in ds.ImageOrientationPatient) == AXIAL, (row["patient_id"], kind)

        dwi = series["dwi"][0][1]
        assert float(t2[0].SliceThickness) != float(dwi.SliceThickness)
        assert [float(v) for v in t2[0].PixelSpacing] != [float(v) for v in dwi.PixelSpacing]
        assert (t2[0].Rows, t2[0].Columns) != (dwi.Rows, dwi.Columns)
        assert len(series["adc"]) * 2 == len(series["dwi"])  # the ADC map: one image per DWI slice position
        assert {_position_key(ds) for _, ds in series["adc"]} == {_position_key(ds) for _, ds in series["dwi"]}
    assert oblique >= 1  # some T2W planes are tilted (tilt 0 is one of the options)


# --- 2. b-values ------------------------------------------------------------------------------------


def test_dwi_holds_b0_and_b800_per_position_as_the_ingestion_reads_them(cohort):
    profiles = _center_profiles(cohort)
    assert {p["b_value_tag"] for p in profiles.values()} == {"standard", "siemens", "ge"}
    sources = {}
    for row in _patients(cohort):
        patient_dir = _patient_dir(cohort, row)
        series = _series(patient_dir)
        dwi_uid = series["dwi"][0][1].SeriesInstanceUID
        headers, bad = dicomio.scan_folder(patient_dir)
        assert bad == []
        by_position = defaultdict(list)
        for h in headers:
            if h.series_uid == dwi_uid:
                by_position[tuple(round(v, 3) for v in h.position)].append(h.b_value)
            else:
                assert h.b_value is None  # T2W, ADC and the RTSTRUCT carry none
        assert len(by_position) == len(series["dwi"]) // 2
        assert all(sorted(values) == [0.0, 800.0] for values in by_position.values()), row["patient_id"]
        tag = profiles[row["center"]]["b_value_tag"]
        sources[tag] = {h.b_value_source for h in headers if h.series_uid == dwi_uid}
        for path, _ in series["dwi"]:
            full = pydicom.dcmread(path, stop_before_pixels=True)
            assert ("DiffusionBValue" in full) == (tag == "standard"), (row["center"], path)
            assert dicomio._b_value(full)[0] in (0.0, 800.0)
    assert sources == {"standard": {"DiffusionBValue (0018,9087)"}, "siemens": {"Siemens private (0019,100C)"},
                       "ge": {"GE private (0043,1039)"}}


# --- 3. the scanner's ADC map -----------------------------------------------------------------------


def test_adc_map_is_the_two_point_fit_of_the_dwi_images_times_the_center_calibration(cohort):
    profiles = _center_profiles(cohort)
    checked = 0
    for row in _patients(cohort):
        profile = profiles[row["center"]]
        series = _series(_patient_dir(cohort, row))
        images = {}
        for path, _ in series["dwi"]:
            ds = pydicom.dcmread(path)
            images[(_position_key(ds), dicomio._b_value(ds)[0])] = ds.pixel_array.astype(np.float64)
        for path, _ in series["adc"]:
            ds = pydicom.dcmread(path)
            adc = ds.pixel_array.astype(np.float64)
            s0, s800 = images[(_position_key(ds), 0.0)], images[(_position_key(ds), 800.0)]
            # b0 well above the noise (sigma of b0 = 2 / snr in units of the stored muscle signal dwi_scale)
            sigma = 2 / profile["snr"] * profile["dwi_scale"]
            with np.errstate(divide="ignore", invalid="ignore"):
                fit = np.log(s0 / s800) / 0.8 * 1000 * profile["adc_calibration"]
                # the stored images' rounding (+-0.5) propagated through the log, and the ADC's own rounding
                tolerance = (0.5 / s0 + 0.5 / np.maximum(s800 - 0.5, 0.5)) / 0.8 * 1000 * profile["adc_calibration"] + 1
            usable = (s0 > 10 * sigma) & (s800 >= 5) & (fit > 50) & (fit < 3900 * profile["adc_calibration"])
            np.testing.assert_array_less(np.abs(adc - fit)[usable], tolerance[usable] + 0.5)
            assert np.all(adc[s0 < 2.5 * sigma] == 0)  # background: no fit, as scanners write it
            checked += int(usable.sum())
            precise = usable & (s0 > 300) & (s800 > 300)
            assert np.all(np.abs(adc - fit)[precise] <= 6)
    assert checked > 500


# --- 4. masks -----------------------------------------------------------------------------------------


def test_nifti_mask_has_the_t2w_geometry_and_equals_the_truth(cohort):
    rows = [r for r in _patients(cohort) if r["mask_format"] == "nifti"]
    assert len(rows) == 4  # 2 NIfTI centers x 2 annotated patients
    for row in rows:
        patient_dir = _patient_dir(cohort, row)
        files = list((patient_dir / "segmentation").glob("*.nii.gz"))
        assert len(files) == 1
        label_map = sitk.ReadImage(str(files[0]))
        t2 = _read_series(_series(patient_dir)["t2w"])
        assert label_map.GetSize() == t2.GetSize()
        np.testing.assert_allclose(label_map.GetOrigin(), t2.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(label_map.GetSpacing(), t2.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(label_map.GetDirection(), t2.GetDirection(), atol=1e-3)
        array = sitk.GetArrayFromImage(label_map)
        np.testing.assert_array_equal(array, sitk.GetArrayFromImage(_true_mask(cohort, row)))
        assert set(np.unique(array).tolist()) == {0, mri.LABELS["tumour"]}
        assert int((array > 0).sum()) == int(row["tumour_voxels"])


def test_rtstruct_references_the_t2w_series_with_a_tumour_roi(cohort):
    rows = [r for r in _patients(cohort) if r["mask_format"] == "rtstruct"]
    assert len(rows) == 2
    for row in rows:
        patient_dir = _patient_dir(cohort, row)
        series = _series(patient_dir)
        assert len(series["rtstruct"]) == 1
        rs = pydicom.dcmread(series["rtstruct"][0][0])
        assert rs.SOPClassUID == RTStructureSetStorage
        t2 = {ds.SOPInstanceUID: ds for _, ds in series["t2w"]}
        t2_uid = series["t2w"][0][1].SeriesInstanceUID
        frame_ref = rs.ReferencedFrameOfReferenceSequence[0]
        assert frame_ref.FrameOfReferenceUID == series["t2w"][0][1].FrameOfReferenceUID
        series_ref = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series_ref.SeriesInstanceUID == t2_uid
        assert {item.ReferencedSOPInstanceUID for item in series_ref.ContourImageSequence} == set(t2)
        names = [roi.ROIName for roi in rs.StructureSetROISequence]
        assert len(names) == 1 and ROI_PATTERN.search(names[0]), names
        contours = rs.ROIContourSequence[0].ContourSequence
        assert len(contours) >= 1
        for item in contours:
            ds = t2[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.array([float(v) for v in item.ContourData]).reshape(-1, 3)
            # every contour lies in the plane of the (oblique) T2W slice it references
            distance = (points - np.array([float(v) for v in ds.ImagePositionPatient])) @ _normal(ds)
            np.testing.assert_allclose(distance, 0, atol=1e-2)
        # contoured slices: the slices of the true mask that hold tumour
        truth = sitk.GetArrayFromImage(_true_mask(cohort, row))
        t2_image = _read_series(series["t2w"])
        normal = np.array(t2_image.GetDirection()).reshape(3, 3)[:, 2]
        origin = np.array(t2_image.GetOrigin())
        slice_of = {uid: round(float((np.array([float(v) for v in ds.ImagePositionPatient]) - origin) @ normal
                                     / t2_image.GetSpacing()[2])) for uid, ds in t2.items()}
        contoured = {slice_of[item.ContourImageSequence[0].ReferencedSOPInstanceUID] for item in contours}
        assert contoured == set(np.flatnonzero(truth.any(axis=(1, 2))).tolist())
        # as the ingestion rasterises it onto the T2W series: the true mask
        rasterised = masks.read_rtstruct(series["rtstruct"][0][0]).region(names[0], t2_image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(rasterised), truth > 0)


def test_patient_without_mask_has_no_mask_file(cohort):
    rows = _patients(cohort)
    without = [r for r in rows if r["annotated"] == "0"]
    assert {r["center"] for r in without} == {"C1", "C2", "C3"}  # one per center
    for row in rows:
        assert (row["annotated"] == "0") == (row["mask_format"] == "none")
    for row in without:
        patient_dir = _patient_dir(cohort, row)
        assert not list(patient_dir.rglob("*.nii*"))
        assert _series(patient_dir)["rtstruct"] == []


# --- 5. determinism ---------------------------------------------------------------------------------


def _pixel_data(files: list[tuple[Path, pydicom.Dataset]]) -> dict[str, bytes]:
    return {ds.SOPInstanceUID: pydicom.dcmread(path).PixelData for path, ds in files}


def test_same_seed_gives_identical_tables_and_pixels_whatever_the_worker_count(cohort, tmp_path):
    _generate(tmp_path, workers=2)
    for name in ("clinical/C1.csv", "clinical/C2.csv", "clinical/C3.csv", "ground_truth/patients.tsv"):
        assert (cohort / name).read_bytes() == (tmp_path / name).read_bytes(), name
    row = _patients(cohort)[-1]
    first, second = _series(_patient_dir(cohort, row)), _series(_patient_dir(tmp_path, row))
    for kind in ("dwi", "t2w"):
        pixels = _pixel_data(first[kind])
        assert len(pixels) == len(first[kind]) and pixels == _pixel_data(second[kind])


# --- 6. latent risk and the clinical table -------------------------------------------------------------


def test_latent_risk_is_recomputed_from_the_clinical_table_and_the_phenotypes(cohort):
    truth = {(r["center"], r["patient_id"]): r for r in _patients(cohort)}
    checked = 0
    for center in ("C1", "C2", "C3"):
        columns, rows = _read_csv(cohort / "clinical" / f"{center}.csv")
        assert set(CLINICAL_VARIABLES) <= set(columns)
        assert not set(TRUTH_ONLY) & set(columns)
        for row in rows:
            if not row["cea"] or not row["ca19_9"]:
                continue
            t = truth[(center, row["patient_id"])]
            c = mri._Clinical(
                tumour_height_cm=float(row["tumour_height_cm"]), ct_stage=int(row["ct_stage"].removeprefix("T")),
                cn_stage=int(row["cn_stage"].removeprefix("N")), mrf=int(row["mrf"]), emvi=int(row["emvi"]),
                cea=float(row["cea"]), ca19_9=float(row["ca19_9"]), adc_heterogeneity=float(t["adc_heterogeneity"]),
                t2_texture=float(t["t2_texture"]))
            assert c.site == row["tumour_site"]
            assert math.isclose(mri._latent_risk(c), float(t["latent_risk"]), abs_tol=2e-5), row["patient_id"]
            for column in ("synchronous_lm", "dmfs_months", "dmfs_event"):
                assert row[column] == t[column]
            checked += 1
    assert checked >= 6


# --- 7. the phenotypes reach the images ---------------------------------------------------------------


def test_adc_heterogeneity_shows_in_the_adc_map_inside_the_tumour(phenotype_cohort):
    """Within each center: the centers' reconstruction filters and noise levels shift the ADC's spread (the center
    effect ComBat removes), so the spread is compared after standardising it per center. Spearman's rho 0.59 here
    (within the three centers 0.93 / 0.43 / 0.48: edge enhancement, a Hamming window, no filter); 0.37 pooled raw."""
    rows = _patients(phenotype_cohort)
    assert len(rows) == 24
    heterogeneity, spread, centers = [], [], []
    for row in rows:
        adc = _read_series(_series(_patient_dir(phenotype_cohort, row))["adc"])
        mask = sitk.Resample(_true_mask(phenotype_cohort, row), adc, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             sitk.sitkUInt8)
        inside = sitk.GetArrayFromImage(mask) > 0
        assert inside.sum() >= 20, row["patient_id"]
        heterogeneity.append(float(row["adc_heterogeneity"]))
        spread.append(float(sitk.GetArrayFromImage(adc)[inside].std()))
        centers.append(row["center"])
    spread, centers = np.array(spread), np.array(centers)
    for center in set(centers):
        s = spread[centers == center]
        spread[centers == center] = (s - s.mean()) / s.std()
    rho = spearmanr(heterogeneity, spread).statistic
    assert rho > 0.45, (rho, heterogeneity, spread)


def test_each_center_reconstructs_with_its_own_in_plane_filter(cohort):
    """The MR centers' reconstruction filters differ (the first four all do) and are the CT kernels' response:
    a smoothing window lowers white noise by the Gaussian's gain, edge enhancement raises it."""
    profiles = _center_profiles(cohort)
    assert len({p["recon_filter"] for p in profiles.values()}) == len(profiles)
    assert {(p["recon_filter"], p["psf_sigma"], p["edge_enhancement"]) for p in profiles.values()} <= set(
        mri._RECON_FILTERS)
    noise = np.random.default_rng(0).standard_normal((4, 128, 128)).astype(np.float32)
    smooth = ct.in_plane_response(noise.copy(), 0.6, 0.0, 2.0)  # sigma 1.2 pixels of this grid
    assert math.isclose(smooth[:, 8:-8, 8:-8].std(), ct._gaussian_noise_gain(1.2), rel_tol=0.05)
    sharp = ct.in_plane_response(noise.copy(), 0.0, 0.3, 1.0)
    assert sharp.std() > 1.1 * noise.std()
    unchanged = ct.in_plane_response(noise.copy(), 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(unchanged, noise)


# --- 8. arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [{"tumor": 1}, {"tumour": 1, "rectum": 2}, {"tumour": 0}, {"tumour": 256},
                                    {"tumour": 1.0}, {}])
def test_labels_other_than_one_tumour_value_are_refused(tmp_path, labels):
    with pytest.raises(ConfigError, match="labels"):
        _generate(tmp_path, labels=labels)
    assert not (tmp_path / "ground_truth").exists()


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="size"):
        _generate(tmp_path, size="huge")
    assert not (tmp_path / "ground_truth").exists()
