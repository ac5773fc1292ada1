"""Synthetic multicenter CT cohort, written the way hospitals deliver data.

`generate_cohort` turns a seed into a colorectal-cancer cohort whose images and clinical tables
exercise the whole pipeline: per-center scanner effects that act on the signal as real scanners do
(the reconstruction kernel filters the whole image, organs' texture included, soft kernels blurring
and sharp ones enhancing it; voxels average the tissue's texture over their size, so thick slices
keep less of it; the portal-venous delay shifts liver and tumour enhancement and their texture;
calibration error, kernel-shaped noise, vendor tags), per-center case mix (referral patterns that
shift node stage, CEA and perineural invasion, so prevalence differs between centers as their
scanners do), per-center DICOM storage conventions and folder layouts, series the pipeline must
tell apart (portal venous vs. non-contrast vs. scout), fake PHI in every file, manual masks as
NIfTI or RTSTRUCT for a subset, and outcomes driven by a known latent risk that mixes three
clinical variables with two image-texture parameters. The truth behind it all goes to
`{out_dir}/ground_truth/`, which the pipeline must never read.

Everything random is derived from the seed through numpy `SeedSequence` keys (cohort, center,
patient), so output is identical whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from scipy import ndimage
from skimage import measure

from radstudy.concordance import auc, harrell_c
from radstudy.errors import ConfigError
from radstudy.images import DEFAULT_LABELS

ROLES = ("development", "external")

# ---------------------------------------------------------------------------------------------
# Random streams. Each key is (domain, ...) so that cohort, center and patient draws never share
# a stream, and a patient's draws depend only on (seed, center index, patient index).
# ---------------------------------------------------------------------------------------------
_COHORT, _CENTER, _PATIENT = 0, 1, 2
# Per-patient sub-streams: clinical data and outcomes do not depend on image size or downsampling.
_CLINICAL, _ANATOMY, _NOISE, _FILES = 0, 1, 2, 3


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _patient_rngs(seed: int, center_index: int, patient_index: int) -> list[np.random.Generator]:
    """The patient's sub-streams, indexed by _CLINICAL, _ANATOMY, _NOISE, _FILES."""
    streams = np.random.SeedSequence(seed, spawn_key=(_PATIENT, center_index, patient_index)).spawn(4)
    return [np.random.default_rng(s) for s in streams]


def _uid(seed: int, *parts: object) -> str:
    """Deterministic DICOM UID: reruns with the same seed give the same UIDs."""
    return generate_uid(entropy_srcs=["radstudy-demo", str(seed), *map(str, parts)])


# ---------------------------------------------------------------------------------------------
# Size presets. Spacings are multiples of 1/64 mm and slice positions multiples of 1/4 mm, so
# every geometry value is exact in binary (float32 NIfTI headers included) and in DICOM DS text.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SizePreset:
    matrix: int  # in-plane rows = columns
    pixel_spacing: tuple[float, float]  # mm, range drawn per center
    slice_thickness: tuple[float, ...]  # mm, choices per center (portal series)
    scan_length: tuple[float, float]  # mm, liver dome to pelvis, drawn per patient


_SIZES = {
    # ~64 slices on average (48-93): the physical scan length is fixed, the slice count follows.
    "small": _SizePreset(96, (3.2, 4.2), (3.0, 3.75, 4.0, 5.0), (240.0, 280.0)),
    # 100-160 slices.
    "realistic": _SizePreset(512, (0.65, 0.85), (2.0, 2.5, 3.0), (300.0, 320.0)),
}

# ---------------------------------------------------------------------------------------------
# Per-center conventions. Centers take entries in a seeded permutation, so the first
# len(options) centers of a cohort all differ.
# ---------------------------------------------------------------------------------------------
_VENDORS = (  # manufacturer, models, kernels from smooth to sharp
    ("SIEMENS", ("SOMATOM Definition AS+", "SOMATOM Force", "SOMATOM Definition Edge"),
     ("I26f", "B30f", "I40f", "B45f")),
    ("GE MEDICAL SYSTEMS", ("Revolution CT", "LightSpeed VCT", "Discovery CT750 HD"),
     ("SOFT", "STANDARD", "DETAIL", "LUNG")),
    ("Philips", ("iCT 256", "Brilliance 64", "IQon - Spectral CT"), ("A", "B", "C", "D")),
    ("TOSHIBA", ("Aquilion ONE", "Aquilion PRIME"), ("FC08", "FC13", "FC18", "FC30")),
)
# The in-plane response of each vendor's four kernels (smooth to sharp; _VENDORS' order): (Gaussian PSF sigma in
# pixels, edge-enhancement amount). Soft-tissue kernels blur (MTF50 well below the pixel's Nyquist frequency), detail
# and bone/lung kernels overshoot edges and lift fine texture. In pixels because the demo's pixels are coarse (3-4 mm);
# at clinical 0.7 mm pixels the same kernels blur over ~1 pixel.
_KERNEL_MTF = ((1.0, 0.0), (0.6, 0.0), (0.0, 0.3), (0.0, 0.6))
_INSTITUTIONS = (
    ("St. Elsewhere University Hospital", "1 Elsewhere Plaza, Boston MA 02115"),
    ("Klinikum Musterstadt", "Musterstrasse 12, 12345 Musterstadt"),
    ("Hopital Saint-Imaginaire", "3 Rue de la Sante, 69003 Lyon"),
    ("Ospedale Fittizio di Pavia", "Via Roma 1, 27100 Pavia"),
    ("Sunnydale General Hospital", "1630 Revello Drive, Sunnydale CA 95037"),
    ("Royal Fictional Infirmary", "22 Castle Street, Edinburgh EH1 2AB"),
)
_ID_PREFIXES = ("MRN", "PID", "KH", "HSP", "PAT", "ID")
# (portal, non-contrast, scout) descriptions; {t} is the series' slice thickness.
_SERIES_NAMES = (
    ("ABD PV {t}mm", "ABD NON CONTRAST", "Scout"),
    ("Portal venous", "Native", "Topogram"),
    ("PORTAL VENOUS", "NON CONTRAST {t}mm", "SCOUT"),
    ("Abdomen PV 70s {t}mm", "Abdomen nativ {t}mm", "Localizer"),
)
_SERIES_NUMBERS = ((3, 2, 1), (5, 2, 1), (4, 3, 1), (201, 101, 1))  # (portal, native, scout)
_LAYOUTS = ("flat", "dated", "dicom_s", "accession")
_NAMINGS = ("im_numbered", "sop_uid_dcm", "hex_noext", "modality_uid_dcm")
_SEG_NAMES = ("{patient_id}_seg.nii.gz", "CT_PV_seg.nii.gz", "liver_tumour_seg.nii.gz")


@dataclass(frozen=True)
class _Storage:
    """How a center stores HU in pixel data."""

    signed: bool
    bits_stored: int
    intercept: int

    @property
    def hu_range(self) -> tuple[int, int]:
        # Scanners clip reconstructions to [-1024, 3071]; an unsigned store with intercept -1000
        # cannot go below -1000 HU.
        stored_min = -(2 ** (self.bits_stored - 1)) if self.signed else 0
        stored_max = 2 ** (self.bits_stored - 1) - 1 if self.signed else 2**self.bits_stored - 1
        return max(-1024, stored_min + self.intercept), min(3071, stored_max + self.intercept)


_STORAGES = (
    _Storage(signed=True, bits_stored=16, intercept=-1024),
    _Storage(signed=False, bits_stored=12, intercept=-1024),
    _Storage(signed=False, bits_stored=16, intercept=-1000),
    _Storage(signed=True, bits_stored=16, intercept=0),
)


@dataclass(frozen=True)
class CenterProfile:
    """One center's scanner and delivery conventions (fixed for all its patients)."""

    index: int
    id: str
    role: str
    dicom_root: Path
    clinical: Path
    institution: str
    address: str
    id_prefix: str
    manufacturer: str
    model: str
    kernel: str
    kvp: int
    hu_offset: float  # calibration error, HU
    hu_scale: float  # calibration error, multiplicative on tissue HU
    # The reconstruction kernel filters the whole image (organs, texture and noise alike): an in-plane Gaussian
    # point-spread function (sigma in pixels; soft and standard kernels) or edge enhancement (unsharp masking of
    # that amount; sharp kernels)
    psf_sigma: float
    edge_enhancement: float
    noise_sigma: float  # HU, voxel-level standard deviation of the image noise
    noise_correlation: float  # in-plane Gaussian sigma (voxels) of the noise: the kernel's noise power spectrum
    portal_delay: float  # s after injection: later scans see more liver and tumour enhancement
    # referral pattern in [-1, 1]: tertiary centers see more node-positive, CEA-high, perineural-invasive disease, so
    # prevalence and event rates differ between centers as their scanners do (the confounding that harmonization
    # exists for; the image phenotypes are drawn from one population everywhere)
    case_mix: float
    pixel_spacing: float  # mm
    slice_thickness: float  # mm, portal series; the non-contrast series is twice as thick
    storage: _Storage
    head_first: bool  # InstanceNumber 1 is the most cranial slice (else the most caudal)
    layout: str
    naming: str
    series_names: tuple[str, str, str]
    series_numbers: tuple[int, int, int]
    scout_views: int
    seg_name: str
    missing_rate: dict[str, float]  # clinical columns left empty at this rate


def _center_profiles(centers: list[dict], seed: int, size: str) -> list[CenterProfile]:
    preset = _SIZES[size]
    conv = _rng(seed, _COHORT, 1)
    perms = {
        name: conv.permutation(len(options))
        for name, options in (
            ("vendor", _VENDORS),
            ("institution", _INSTITUTIONS),
            ("prefix", _ID_PREFIXES),
            ("storage", _STORAGES),
            ("names", _SERIES_NAMES),
            ("numbers", _SERIES_NUMBERS),
            ("layout", _LAYOUTS),
            ("naming", _NAMINGS),
            ("seg", _SEG_NAMES),
        )
    }
    head_first = conv.permutation([True, False])
    # An external center's kernel lies within the development centers' range: with the sharpest kernel at the
    # external center and only smoother ones to learn from, the demo's small nnU-Net segmented no tumour there (DSC
    # 0.04-0.2) -- a domain shift, not what the demo shows.
    kernel_order = external_within_range(conv.permutation(len(_KERNEL_MTF)), [str(c["role"]) for c in centers])
    # evenly spread referral patterns in a seeded order, so that the development centers differ in case mix
    spread = np.linspace(-1, 1, len(centers)) if len(centers) > 1 else np.zeros(1)
    case_mix = conv.permutation(spread)

    def pick(name, options, i):
        return options[perms[name][i % len(options)]]

    profiles = []
    for i, center in enumerate(centers):
        rng = _rng(seed, _CENTER, i)
        manufacturer, models, kernels = pick("vendor", _VENDORS, i)
        institution, address = pick("institution", _INSTITUTIONS, i)
        # Kernels from smooth to sharp take a seeded permutation, so the first four centers all differ; sharper
        # kernels resolve more texture and keep more, finer-grained noise: one sharpness drives both.
        kernel_index = int(kernel_order[i % len(_KERNEL_MTF)])
        sharpness = (kernel_index + rng.uniform(0.0, 1.0)) / len(_KERNEL_MTF)
        psf_sigma, edge_enhancement = _KERNEL_MTF[kernel_index]
        lo, hi = preset.pixel_spacing
        profiles.append(
            CenterProfile(
                index=i,
                id=str(center["id"]),
                role=str(center["role"]),
                dicom_root=Path(center["dicom_root"]),
                clinical=Path(center["clinical"]),
                institution=institution,
                address=address,
                id_prefix=pick("prefix", _ID_PREFIXES, i),
                manufacturer=manufacturer,
                model=str(rng.choice(models)),
                kernel=kernels[kernel_index],
                kvp=int(rng.choice([100, 120, 120])),
                hu_offset=round(float(rng.choice([-1, 1]) * rng.uniform(10, 30)), 1),
                hu_scale=round(float(rng.uniform(0.9, 1.1)), 3),
                psf_sigma=psf_sigma,
                edge_enhancement=edge_enhancement,
                noise_sigma=round(6 + 10 * sharpness + float(rng.uniform(0, 2)), 1),
                noise_correlation=round(1.4 - 0.9 * sharpness, 2),
                portal_delay=float(rng.integers(60, 81)),
                case_mix=round(float(case_mix[i]), 3),
                pixel_spacing=float(rng.integers(math.ceil(lo * 64), math.floor(hi * 64) + 1)) / 64,
                slice_thickness=float(rng.choice(preset.slice_thickness)),
                storage=pick("storage", _STORAGES, i),
                head_first=bool(head_first[i % 2]),
                layout=pick("layout", _LAYOUTS, i),
                naming=pick("naming", _NAMINGS, i),
                series_names=pick("names", _SERIES_NAMES, i),
                series_numbers=pick("numbers", _SERIES_NUMBERS, i),
                scout_views=int(rng.integers(1, 3)),
                seg_name=pick("seg", _SEG_NAMES, i),
                missing_rate={c: round(float(rng.uniform(0.03, 0.08)), 3) for c in _MISSABLE},
            )
        )
    return profiles


# ---------------------------------------------------------------------------------------------
# Patient: demographics, PHI, clinical variables, image parameters and outcomes.
# ---------------------------------------------------------------------------------------------
_LAST_NAMES = (
    "MUELLER", "SCHMIDT", "SMITH", "JOHNSON", "MARTIN", "BERNARD", "ROSSI", "RUSSO", "GARCIA", "LOPEZ",
    "JANSEN", "DE VRIES", "NOWAK", "KOWALSKI", "NIELSEN", "HANSEN", "DUBOIS", "MOREAU", "FERRARI",
    "BIANCHI", "WAGNER", "BECKER", "BROWN", "TAYLOR", "WILSON", "EVANS", "PETERS", "LAMBERT", "COSTA",
    "SILVA", "HOFFMANN", "KLEIN", "WALSH", "MURPHY", "BERG", "LINDQVIST", "ANDERSEN", "ESPOSITO",
)
_FIRST_NAMES = {
    "F": ("ANNA", "MARIA", "SOPHIE", "EMMA", "LAURA", "CLAIRE", "GIULIA", "ELENA", "KATHARINA", "SARAH",
          "JULIA", "INGRID", "MARTA", "HELEN", "NADIA", "CHIARA", "LOTTE", "AGNES", "RUTH", "IRIS"),
    "M": ("THOMAS", "PETER", "MICHAEL", "JAN", "PIERRE", "MARCO", "LUCA", "ANDREAS", "JOHN", "DAVID",
          "STEFAN", "LARS", "PAUL", "MARTIN", "HENRIK", "JAVIER", "KARL", "OLIVER", "TOMASZ", "ERIK"),
}
_STAFF_FIRST_NAMES = _FIRST_NAMES["F"] + _FIRST_NAMES["M"]
_CLINICAL_COLUMNS = (
    "patient_id", "patient_name", "birth_date", "age", "sex", "tumour_site", "t_stage", "n_stage",
    "cea", "ca19_9", "afp", "dissected_lymph_nodes", "perineural_invasion", "tumour_nodules",
    "synchronous_lm", "mfs_months", "mfs_event",
)
_MISSABLE = ("cea", "ca19_9", "afp", "dissected_lymph_nodes")

# Latent risk: centred linear predictor. The centring constants are the population means of each
# term, so latent_risk averages ~0. The two image parameters (uniform on [0, 1]) carry more weight
# than the clinical terms together (sd ~1.5 vs ~1.2), so images add information over clinical data.
# Three clinical predictors carry the clinical risk; the other clinical variables are noise the models must leave
# out. (With seven weak clinical terms, a model given the two image parameters themselves came within 0.10 of the
# oracle's external AUC in only 70% of outcome draws on ~80 training patients: the oracle was out of any model's
# reach, see docs/validity.md.)
_RISK_WEIGHTS = {
    "log_cea": (0.9, 1.68),
    "n_stage": (0.9, 0.85),
    "perineural_invasion": (1.0, 0.285),
    "tumour_heterogeneity": (4.0, 0.5),
    "liver_texture": (3.5, 0.5),
}
# Calibrated by simulating 200k patients: intercept -1.0 gives ~35% synchronous metastases; a
# Weibull scale of 70 months (shape 1.3) with administrative censoring at 60 months and uniform
# 12-150 month dropout gives ~50% events.
_SYNCHRONOUS_INTERCEPT = -1.0
_WEIBULL_SCALE_MONTHS, _WEIBULL_SHAPE = 70.0, 1.3
_FOLLOW_UP_MONTHS = 60.0


@dataclass(frozen=True)
class _Person:
    """Identifying data, as it appears in DICOM headers and the clinical table."""

    patient_id: str
    last_name: str
    first_name: str
    sex: str
    birth_date: date
    study_date: date
    study_time: str
    accession: str
    study_id: str
    other_id: str
    referring_physician: str
    operator: str

    @property
    def age(self) -> int:
        d, b = self.study_date, self.birth_date
        return d.year - b.year - ((d.month, d.day) < (b.month, b.day))

    @property
    def dicom_name(self) -> str:
        return f"{self.last_name}^{self.first_name}"

    @property
    def clinical_name(self) -> str:
        return f"{self.last_name.title()}, {self.first_name.title()}"


def _person(rng: np.random.Generator, patient_id: str) -> _Person:
    sex = "M" if rng.random() < 0.57 else "F"
    study_date = date(2012, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
    age_days = int(np.clip(rng.normal(64, 11), 30, 90) * 365.25)
    return _Person(
        patient_id=patient_id,
        last_name=str(rng.choice(_LAST_NAMES)),
        first_name=str(rng.choice(_FIRST_NAMES[sex])),
        sex=sex,
        birth_date=study_date - timedelta(days=age_days),
        study_date=study_date,
        study_time=f"{rng.integers(7, 18):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}",
        accession=f"A{study_date.year}{rng.integers(0, 10**6):06d}",
        study_id=f"S{rng.integers(10**6, 10**7)}",
        other_id=f"INS{rng.integers(10**8, 10**9)}",
        referring_physician=f"{rng.choice(_LAST_NAMES)}^{rng.choice(_STAFF_FIRST_NAMES)}^^^DR",
        operator=f"{rng.choice(_LAST_NAMES)}^{rng.choice(_STAFF_FIRST_NAMES)}",
    )


@dataclass(frozen=True)
class _Clinical:
    tumour_site: str
    t_stage: int
    n_stage: int
    cea: float
    ca19_9: float
    afp: float
    dissected_lymph_nodes: int
    perineural_invasion: int
    tumour_nodules: int
    tumour_heterogeneity: float  # image parameter in [0, 1]: tumour texture amplitude/grain, necrosis
    liver_texture: float  # image parameter in [0, 1]: parenchymal pattern amplitude/grain


def _clinical(rng: np.random.Generator, case_mix: float = 0.0) -> _Clinical:
    """One patient's clinical variables and image parameters; `case_mix` (the center's, in [-1, 1]) shifts the
    node stage, CEA and perineural invasion (a mean latent risk of about +-0.6 around the population's)."""
    n = int(rng.choice(3, p=[0.40 - 0.15 * case_mix, 0.35, 0.25 + 0.15 * case_mix]))
    return _Clinical(
        tumour_site="rectum" if rng.random() < 0.35 else "colon",
        t_stage=int(rng.choice(4, p=[0.05, 0.15, 0.55, 0.25])) + 1,
        n_stage=n,
        # Values are rounded as a lab reports them; the latent risk uses the reported values.
        cea=max(0.2, round(float(np.exp(rng.normal(np.log(4) + 0.35 * n + 0.2 * case_mix, 1.0))), 1)),
        ca19_9=max(0.5, round(float(np.exp(rng.normal(np.log(14) + 0.3 * n, 1.0))), 1)),
        afp=max(0.5, round(float(np.exp(rng.normal(np.log(3), 0.45))), 1)),
        dissected_lymph_nodes=int(max(1, round(rng.normal(17, 6)))),
        perineural_invasion=int(rng.random() < 0.2 + 0.1 * n + 0.05 * case_mix),
        tumour_nodules=int(rng.random() < 0.12 + 0.1 * n),
        tumour_heterogeneity=float(rng.uniform()),
        liver_texture=float(rng.uniform()),
    )


def _latent_risk(c: _Clinical) -> float:
    values = {
        "log_cea": math.log(c.cea),
        "n_stage": c.n_stage,
        "perineural_invasion": c.perineural_invasion,
        "tumour_heterogeneity": c.tumour_heterogeneity,
        "liver_texture": c.liver_texture,
    }
    return sum(w * (values[k] - mean) for k, (w, mean) in _RISK_WEIGHTS.items())


@dataclass(frozen=True)
class _Outcome:
    synchronous_lm: int
    mfs_months: float
    mfs_event: int


def _draw_outcome(rng: np.random.Generator, risk: float, *, intercept: float, weibull_scale: float,
                  weibull_shape: float, follow_up: float) -> tuple[int, float, int]:
    """One patient's outcomes from the latent risk (both demos): the binary endpoint from a logistic model, the event
    time from Weibull proportional hazards (hazard ∝ exp(risk)), censored at `follow_up` months or by a uniform
    12-150 month dropout. Returns (binary, time in months rounded to 0.1, event)."""
    binary = int(rng.random() < 1 / (1 + math.exp(-(risk + intercept))))
    event_time = weibull_scale * (rng.exponential() * math.exp(-risk)) ** (1 / weibull_shape)
    censor_time = min(follow_up, rng.uniform(12, 150))
    return binary, max(0.1, round(min(event_time, censor_time), 1)), int(event_time <= censor_time)


def _outcome(rng: np.random.Generator, risk: float) -> _Outcome:
    return _Outcome(*_draw_outcome(rng, risk, intercept=_SYNCHRONOUS_INTERCEPT, weibull_scale=_WEIBULL_SCALE_MONTHS,
                                   weibull_shape=_WEIBULL_SHAPE, follow_up=_FOLLOW_UP_MONTHS))


# ---------------------------------------------------------------------------------------------
# Geometry and anatomy.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """Axial CT grid. Array index [k, j, i] <-> (x0 + i*dx, y0 + j*dy, z0 + k*dz) in DICOM LPS mm;
    slice 0 is the most caudal, as SimpleITK's series reader orders it."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z)
    origin: tuple[float, float, float]  # (x, y, z)
    # row-major 3x3 (SimpleITK's order): columns are the directions of the i, j and k axes in LPS; the CT series are
    # axial (identity), the MRI demo's T2W series oblique
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def axis(self, a: str) -> np.ndarray:
        n = {"x": self.shape[2], "y": self.shape[1], "z": self.shape[0]}[a]
        i = "xyz".index(a)
        return (self.origin[i] + np.arange(n) * self.spacing[i]).astype(np.float32)

    def physical(self, i, j, k) -> np.ndarray:
        """LPS mm of (continuous) voxel indices i (column), j (row), k (slice): arrays of one shape -> (..., 3)."""
        index = np.stack(np.broadcast_arrays(i, j, k), axis=-1).astype(np.float64) * np.asarray(self.spacing)
        return np.asarray(self.origin) + index @ np.asarray(self.direction, dtype=np.float64).reshape(3, 3).T


def _grid(rng: np.random.Generator, profile: CenterProfile, size: str, downsample: int) -> _Grid:
    preset = _SIZES[size]
    n = preset.matrix // downsample
    dxy = profile.pixel_spacing * downsample
    dz = profile.slice_thickness * downsample
    nz = int(round(rng.uniform(*preset.scan_length) / dz))
    table_offset = float(rng.integers(-16, 17)) / 4  # body not exactly centred in the image
    z_top = float(rng.integers(-240, 81)) / 4  # table position of the most cranial slice
    return _Grid(
        shape=(nz, n, n),
        spacing=(dxy, dxy, dz),
        origin=(-(n - 1) / 2 * dxy, -(n - 1) / 2 * dxy + table_offset, z_top - (nz - 1) * dz),
    )


# Tissue classes of the label volume; each phase maps them to HU through a per-patient table.
AIR, FAT, SOFT, CORTEX, MARROW, LIVER, TUMOUR, NECROSIS = range(8)


@dataclass(frozen=True)
class _Texture:
    """A correlated-noise pattern (HU per unit gain) inside one organ, stored in its bounding box."""

    organ: str
    box: tuple[slice, slice, slice]
    field: np.ndarray  # float32, zero outside the organ


@dataclass(frozen=True)
class _Anatomy:
    grid: _Grid
    tissue: np.ndarray  # uint8 (z, y, x) tissue classes
    textures: tuple[_Texture, ...]


def _smooth_field(rng: np.random.Generator, u, v, w, waves: int = 6, max_frequency: float = 2.5):
    """Unit-variance smooth random field: a sum of random low-frequency plane waves evaluated on
    broadcastable normalised coordinates. Used to make organ outlines irregular."""
    field = None
    for _ in range(waves):
        k = rng.normal(size=3)
        k *= rng.uniform(0.8, max_frequency) / np.linalg.norm(k)
        k = k.astype(np.float32)
        wave = np.cos(k[0] * u + k[1] * v + k[2] * w + np.float32(rng.uniform(0, 2 * np.pi)))
        field = wave if field is None else field + wave
    return field * np.float32(math.sqrt(2 / waves))


def _box(grid: _Grid, centre: tuple[float, float, float], half: tuple[float, float, float]):
    """Index bounding box (z, y, x slices) of an axis-aligned physical box, clipped to the grid."""
    out = []
    for a, c, h in zip("zyx", centre[::-1], half[::-1]):
        idx = np.nonzero(np.abs(grid.axis(a) - c) <= h)[0]
        if idx.size == 0:
            raise ValueError(f"organ box outside the grid along {a}")
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _normalised(grid: _Grid, box, centre, semi):
    """Broadcastable normalised coordinates (x-cx)/ax, (y-cy)/ay, (z-cz)/az inside a box."""
    z = (grid.axis("z")[box[0]] - centre[2]) / semi[2]
    y = (grid.axis("y")[box[1]] - centre[1]) / semi[1]
    x = (grid.axis("x")[box[2]] - centre[0]) / semi[0]
    return x[None, None, :], y[None, :, None], z[:, None, None]


@dataclass(frozen=True)
class _Trunk:
    """Landmarks of the body that place the organs (mm, LPS)."""

    half_width: float  # inside the subcutaneous fat
    half_depth: float
    spine_y: float  # centre of the vertebral body
    spine_radius: float


def _trunk(rng: np.random.Generator, grid: _Grid, tissue: np.ndarray) -> _Trunk:
    """Elliptical trunk with a subcutaneous fat rim and gently varying girth; lumbar spine with
    vertebral bodies (cortex, marrow, discs between), canal and neural arch. Fills `tissue`."""
    x, y = grid.axis("x"), grid.axis("y")
    a, b = rng.uniform(125, 145), rng.uniform(100, 118)
    fat = rng.uniform(8, 22)
    girth_phase, girth_period = rng.uniform(0, 2 * np.pi), rng.uniform(250, 400)
    rv, rc = rng.uniform(15, 18), rng.uniform(6.5, 8.0)
    ys = (b - fat) - (rv + 2 + 2 * rc + 5 + 6)  # the arch ends ~6 mm inside the muscle wall
    disc_period, disc_height, disc_phase = rng.uniform(32, 38), rng.uniform(7, 10), rng.uniform(0, 40)
    canal_y = ys + rv + 2 + rc
    X, Y = x[None, :], y[:, None]
    vertebra_r = np.hypot(X / rv, (Y - ys) / (rv * 0.85))
    canal_r = np.hypot(X, Y - canal_y)
    arch = (canal_r > rc) & (canal_r <= rc + 5) & (Y >= canal_y - rc)
    for k, zk in enumerate(grid.axis("z")):  # slice by slice: 2D temporaries only
        girth = 1 + 0.04 * math.sin(2 * math.pi * zk / girth_period + girth_phase)
        ab, bb = a * girth, b * girth
        sl = tissue[k]
        sl[(X / ab) ** 2 + (Y / bb) ** 2 <= 1] = FAT
        sl[(X / (ab - fat)) ** 2 + (Y / (bb - fat)) ** 2 <= 1] = SOFT
        if (zk - disc_phase) % disc_period >= disc_height:  # vertebral body, not a disc
            sl[vertebra_r <= 1] = CORTEX
            sl[vertebra_r <= 1 - 2.5 / rv] = MARROW
        sl[arch] = CORTEX
    return _Trunk(half_width=a - fat, half_depth=b - fat, spine_y=ys, spine_radius=rv)


def _voxel_average_variance(voxel_mm: float, grain_mm: float) -> float:
    """Variance left, along one axis, when a voxel of that size averages a field of unit variance whose correlation
    is exp(-r^2 / (4 grain^2)) (white noise smoothed by a Gaussian of sigma `grain`): (1/D^2) * double integral
    over the voxel of the correlation, in closed form. 1 - D^2 / (24 grain^2) for small voxels, ~2 sqrt(pi) grain / D
    for large ones."""
    ratio, a = grain_mm / voxel_mm, voxel_mm / (2 * grain_mm)
    return 2 * math.sqrt(math.pi) * ratio * math.erf(a) - 4 * ratio**2 * (1 - math.exp(-a * a))


def _organ_texture(rng: np.random.Generator, grid: _Grid, organ: str, box, mask: np.ndarray, grain_mm: float,
                   amplitude_hu: float) -> _Texture:
    """Correlated noise of the given grain and amplitude inside the organ: the image phenotype. `amplitude_hu` is
    the tissue's own variation; each voxel averages it over its volume (partial volume), so thicker slices and
    larger pixels show less of it, the more so the finer the grain."""
    noise = rng.standard_normal(mask.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, [grain_mm / s for s in grid.spacing[::-1]], truncate=3.0)
    seen = math.sqrt(math.prod(_voxel_average_variance(s, grain_mm) for s in grid.spacing))
    noise *= np.float32(seen * amplitude_hu / max(float(noise.std()), 1e-6))
    noise[~mask] = 0
    return _Texture(organ, box, noise)


def _liver(rng: np.random.Generator, grid: _Grid, tissue: np.ndarray, trunk: _Trunk,
           liver_texture: float) -> _Texture:
    """Wedge-shaped irregular blob in the upper right abdomen (patient right = -x), thinning towards
    its left lobe, clipped by the abdominal wall and the spine. Parenchymal pattern amplitude and
    grain grow with `liver_texture`."""
    a_in, b_in = trunk.half_width, trunk.half_depth
    ax, ay, az = rng.uniform(0.7, 0.8) * a_in, rng.uniform(0.6, 0.72) * b_in, rng.uniform(65, 85)
    z_top = float(grid.axis("z")[-1])
    centre = (-a_in + 0.9 * ax, -0.15 * b_in, z_top - rng.uniform(10, 25) - az)
    box = _box(grid, centre, (1.15 * ax, 1.15 * ay, 1.15 * az))
    u, v, w = _normalised(grid, box, centre, (ax, ay, az))
    taper = 1 - 0.45 * np.clip((u + 1) / 2, 0, 1)
    distance = np.sqrt(u**2 + (v / taper) ** 2 + (w / taper) ** 2) + 0.12 * _smooth_field(rng, u, v, w)
    region = tissue[box]
    liver = (distance < 1) & (region == SOFT)
    region[liver] = LIVER
    return _organ_texture(rng, grid, "liver", box, liver, 2 + 5 * liver_texture, 3 + 15 * liver_texture)


def _tumour(rng: np.random.Generator, grid: _Grid, tissue: np.ndarray, trunk: _Trunk,
            clinical: _Clinical) -> _Texture:
    """Primary tumour: lobulated ellipsoid in the pelvis (rectum, in front of the spine) or the left
    lower abdomen (sigmoid colon), larger with T stage, in a rim of pericolic fat. Only soft tissue becomes
    tumour, so it never overlaps liver, bone or fat. Heterogeneity raises texture amplitude and grain and carves a
    necrotic low-density core."""
    heterogeneity = clinical.tumour_heterogeneity
    diameter = rng.uniform(*{1: (45, 52), 2: (46, 60), 3: (50, 72), 4: (58, 85)}[clinical.t_stage])
    rx, ry, rz = (diameter / 2 * rng.uniform(0.85, 1.15) for _ in range(3))
    z_bottom = float(grid.axis("z")[0])
    if clinical.tumour_site == "rectum":
        x, y = rng.uniform(-10, 10), trunk.spine_y - trunk.spine_radius - 0.9 * ry
        z = z_bottom + rz + rng.uniform(5, 30)
    else:
        x, y = trunk.spine_radius + 0.9 * rx + rng.uniform(5, 20), rng.uniform(-0.2, 0.1) * trunk.half_depth
        z = z_bottom + rz + rng.uniform(20, 70)
    box = _box(grid, (x, y, z), (1.45 * rx, 1.45 * ry, 1.45 * rz))
    u, v, w = _normalised(grid, box, (x, y, z), (rx, ry, rz))
    radius = np.sqrt(u**2 + v**2 + w**2)
    region = tissue[box]
    tumour = (radius + 0.12 * _smooth_field(rng, u, v, w) < 1) & (region == SOFT)
    # The bowel runs in pericolic / mesorectal fat: a fat rim outlines the tumour as on real CTs (without it
    # the tumour is a faint 35 HU step inside soft tissue, which a short demo training does not learn).
    region[(radius < 1.35) & ~tumour & (region == SOFT)] = FAT
    necrotic_radius = max(0.0, 1.1 * (heterogeneity - 0.35))
    necrosis = tumour & (radius + 0.15 * _smooth_field(rng, u, v, w) < necrotic_radius)
    region[tumour] = TUMOUR
    region[necrosis] = NECROSIS
    return _organ_texture(rng, grid, "tumour", box, tumour, 3 + 2 * heterogeneity, 6 + 24 * heterogeneity)


def _anatomy(rng: np.random.Generator, grid: _Grid, clinical: _Clinical) -> _Anatomy:
    tissue = np.zeros(grid.shape, np.uint8)
    trunk = _trunk(rng, grid, tissue)
    liver = _liver(rng, grid, tissue, trunk, clinical.liver_texture)
    tumour = _tumour(rng, grid, tissue, trunk, clinical)
    return _Anatomy(grid, tissue, (liver, tumour))


def _label_map(anatomy: _Anatomy, labels: dict[str, int]) -> np.ndarray:
    lut = np.zeros(NECROSIS + 1, np.uint8)
    lut[LIVER] = labels["liver"]
    lut[[TUMOUR, NECROSIS]] = labels["tumour"]
    return lut[anatomy.tissue]


# ---------------------------------------------------------------------------------------------
# Image formation: tissue HU per phase + organ textures, then the center's scanner effects.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Phase:
    hu: np.ndarray  # float32 HU per tissue class
    texture_gain: dict[str, float]


# Enhancement over the native scan at a 70 s portal-venous delay (liver ~65 HU, the primary ~37 HU), and its change
# per second of delay within the 60-80 s protocols in use: tens of HU between centers.
_LIVER_ENHANCEMENT, _TUMOUR_ENHANCEMENT, _REFERENCE_DELAY = 65.0, 37.0, 70.0
_LIVER_ENHANCEMENT_PER_S, _TUMOUR_ENHANCEMENT_PER_S = 1.5, 1.0


def _phases(rng: np.random.Generator, portal_delay: float = _REFERENCE_DELAY) -> dict[str, _Phase]:
    fat, soft = rng.normal(-100, 8), rng.normal(40, 4)
    cortex, marrow = rng.normal(650, 60), rng.normal(230, 30)
    # Portal venous phase: enhanced liver ~120 HU, the primary ~75 HU in pericolic fat, bowel wall / muscle ~40 HU.
    # nnU-Net's CT normalisation windows on the labelled organs (liver and tumour), so the tumour must sit inside
    # that window, apart from both the liver and the surrounding soft tissue. The center's contrast timing shifts
    # both enhancements, and the organs' textures (patterns of enhancement) scale with them.
    dt = portal_delay - _REFERENCE_DELAY
    liver_gain = rng.normal(1, 0.08) * (1 + _LIVER_ENHANCEMENT_PER_S * dt / _LIVER_ENHANCEMENT)
    tumour_gain = rng.normal(1, 0.12) * (1 + _TUMOUR_ENHANCEMENT_PER_S * dt / _TUMOUR_ENHANCEMENT)
    necrosis = rng.normal(20, 5)
    liver_nc, tumour_nc = rng.normal(55, 4), rng.normal(38, 4)
    liver_pv = liver_nc + _LIVER_ENHANCEMENT * liver_gain
    tumour_pv = tumour_nc + _TUMOUR_ENHANCEMENT * tumour_gain

    def table(soft_, liver, tumour, necrotic):  # HU per tissue class, in class order
        return np.array([-1000, fat, soft_, cortex, marrow, liver, tumour, necrotic], np.float32)

    return {
        "portal": _Phase(table(soft, liver_pv, tumour_pv, necrosis),
                         {"liver": float(liver_gain), "tumour": float(tumour_gain)}),
        # Without contrast the liver is ~55 HU, the tumour enhances less and its pattern fades.
        "native": _Phase(table(soft - 7, liver_nc, tumour_nc, necrosis - 5), {"liver": 0.7, "tumour": 0.5}),
    }


_CHUNK = 16  # slices rendered at a time: bounds float32 temporaries at realistic size


def _clean_hu(anatomy: _Anatomy, phase: _Phase, k0: int, k1: int) -> np.ndarray:
    hu = phase.hu[anatomy.tissue[k0:k1]]
    for tex in anatomy.textures:
        start = tex.box[0].start
        lo, hi = max(k0, start), min(k1, tex.box[0].stop)
        if lo < hi:
            gain = np.float32(phase.texture_gain[tex.organ])
            hu[lo - k0 : hi - k0, tex.box[1], tex.box[2]] += gain * tex.field[lo - start : hi - start]
    return hu


def _scanner(hu: np.ndarray, air: np.ndarray, profile: CenterProfile, rng: np.random.Generator,
             pixel_mm: float) -> np.ndarray:
    """Apply the center's calibration error, its kernel's in-plane response to the whole image, and kernel-shaped
    noise; round and clip like a scanner. `pixel_mm`: the rendered grid's pixel (coarser than the center's own when
    downsampled), so that the kernel's response stays the same in mm."""
    hu *= np.float32(profile.hu_scale)
    hu += np.float32(profile.hu_offset)
    hu[air] = -1000  # calibration is anchored on air; the error shows in tissue
    native = profile.pixel_spacing / pixel_mm  # the center's pixel, in pixels of this grid
    in_plane_response(hu, profile.psf_sigma, profile.edge_enhancement, native)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    s = profile.noise_correlation
    # Reconstruction kernels blur noise in-plane only; rescale so the voxel sd is noise_sigma.
    noise = ndimage.gaussian_filter(noise, (0, s, s))
    hu += noise * np.float32(profile.noise_sigma / _gaussian_noise_gain(s))
    np.rint(hu, out=hu)
    np.clip(hu, *profile.storage.hu_range, out=hu)
    return hu.astype(np.int16)


def external_within_range(order, roles: list[str]) -> list[int]:
    """A seeded order of a scanner setting's levels (smooth to sharp) over the first len(order) centers, with each
    external center holding an extreme level swapped with a development center holding a middle one, so that the
    external centers' settings lie within the range the models learn from."""
    order = [int(k) for k in order]
    extremes, roles = {0, len(order) - 1}, roles[: len(order)]
    for i, role in enumerate(roles):
        if role == "external" and order[i] in extremes:
            middle = [j for j, r in enumerate(roles) if r != "external" and order[j] not in extremes]
            if middle:
                j = middle[0]
                order[i], order[j] = order[j], order[i]
    return order


def in_plane_response(image: np.ndarray, psf_sigma: float, edge_enhancement: float, native: float) -> np.ndarray:
    """A reconstruction's in-plane response (CT kernel, MR k-space filter), applied in place to a (slices, rows,
    columns) float32 image and returned: a Gaussian point-spread function of `psf_sigma` native pixels (smooth
    kernels), or unsharp masking of that `edge_enhancement` amount (the detail above a one-pixel blur, amplified;
    sharp kernels). `native`: the scanner's own pixel in pixels of this grid."""
    if psf_sigma > 0:
        sigma = psf_sigma * native
        image[:] = ndimage.gaussian_filter(image, (0, sigma, sigma))
    if edge_enhancement > 0:
        image += np.float32(edge_enhancement) * (image - ndimage.gaussian_filter(image, (0, native, native)))
    return image


def _gaussian_noise_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after 2D Gaussian smoothing (from the impulse response)."""
    r = int(4 * sigma + 0.5) + 1
    impulse = np.zeros((2 * r + 1, 2 * r + 1))
    impulse[r, r] = 1
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma) ** 2).sum()))


def _render_portal(anatomy: _Anatomy, phase: _Phase, profile: CenterProfile, rng) -> np.ndarray:
    nz = anatomy.grid.shape[0]
    out = np.empty(anatomy.grid.shape, np.int16)
    for k0 in range(0, nz, _CHUNK):
        k1 = min(nz, k0 + _CHUNK)
        out[k0:k1] = _scanner(_clean_hu(anatomy, phase, k0, k1), anatomy.tissue[k0:k1] == AIR, profile, rng,
                              anatomy.grid.spacing[0])
    return out


def _render_native(anatomy: _Anatomy, phase: _Phase, profile: CenterProfile, rng) -> np.ndarray:
    """Thick slices: each is a [1/4, 1/2, 1/4] slab average of the thin grid around its centre."""
    nz = anatomy.grid.shape[0]
    centres = np.arange(0, nz, 2)  # thin-grid slices at which the thick slices are centred
    out = np.empty((len(centres), *anatomy.grid.shape[1:]), np.int16)
    for j0 in range(0, len(centres), _CHUNK):
        ks = centres[j0 : j0 + _CHUNK]
        lo, hi = max(0, int(ks[0]) - 1), min(nz, int(ks[-1]) + 2)
        clean = _clean_hu(anatomy, phase, lo, hi)
        below, above = np.maximum(ks - 1, 0) - lo, np.minimum(ks + 1, nz - 1) - lo
        slab = np.float32(0.5) * clean[ks - lo] + np.float32(0.25) * (clean[below] + clean[above])
        out[j0 : j0 + len(ks)] = _scanner(slab, anatomy.tissue[ks] == AIR, profile, rng, anatomy.grid.spacing[0])
    return out


def _scout_views(portal: np.ndarray, views: int) -> list[np.ndarray]:
    """Localizer projections (AP, then lateral), rows from head to feet."""
    projections = [portal.mean(axis=1), portal.mean(axis=2)][:views]
    return [np.rint(p[::-1]).astype(np.int16) for p in projections]


# ---------------------------------------------------------------------------------------------
# Cohort plan: who is generated where, with which mask delivery.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PatientJob:
    seed: int
    size: str
    downsample: int
    profile: CenterProfile
    patient_index: int
    patient_id: str
    mask_format: str
    labels: dict[str, int]
    ground_truth: Path


def _plan_cohort(centers, out_dir, *, seed, patients, size, annotated_fraction, rtstruct_per_center,
                 seg_per_center, labels, downsample) -> list[_PatientJob]:
    profiles = _center_profiles(centers, seed, size)
    rng = _rng(seed, _COHORT, 0)
    counts = [
        patients if isinstance(patients, int) else int(rng.integers(patients[0], patients[1] + 1)) for _ in profiles
    ]
    # Hospital IDs unique across the cohort.
    numbers = rng.choice(9_000_000, size=sum(counts), replace=False) + 1_000_000
    jobs, offset = [], 0
    for profile, n in zip(profiles, counts):
        n_annotated = min(n, max(1 if profile.role == "development" else 0, round(annotated_fraction * n)))
        chosen = rng.permutation(n)[:n_annotated]
        formats = ["none"] * n
        for rank, p in enumerate(chosen):
            formats[p] = ("rtstruct" if rank < rtstruct_per_center else
                          "seg" if rank < rtstruct_per_center + seg_per_center else "nifti")
        for p in range(n):
            jobs.append(
                _PatientJob(
                    seed=seed,
                    size=size,
                    downsample=downsample,
                    profile=profile,
                    patient_index=p,
                    patient_id=f"{profile.id_prefix}{numbers[offset + p]}",
                    mask_format=formats[p],
                    labels=dict(labels),
                    ground_truth=Path(out_dir) / "ground_truth",
                )
            )
        offset += n
    return jobs


@dataclass(frozen=True)
class _SyntheticPatient:
    person: _Person
    clinical: _Clinical
    risk: float
    outcome: _Outcome
    missing: frozenset[str]  # clinical columns delivered empty
    grid: _Grid
    native_grid: _Grid
    portal: np.ndarray  # int16 HU on grid
    native: np.ndarray  # int16 HU on native_grid
    scouts: list[np.ndarray]
    label_map: np.ndarray  # uint8 on grid


def _synthesise(job: _PatientJob) -> _SyntheticPatient:
    """Everything about one patient, in memory (no files)."""
    rngs = _patient_rngs(job.seed, job.profile.index, job.patient_index)
    clinical_rng, anatomy_rng, noise_rng = rngs[_CLINICAL], rngs[_ANATOMY], rngs[_NOISE]

    person = _person(clinical_rng, job.patient_id)
    clinical = _clinical(clinical_rng, job.profile.case_mix)
    risk = _latent_risk(clinical)
    outcome = _outcome(clinical_rng, risk)
    missing = frozenset(c for c in _MISSABLE if clinical_rng.random() < job.profile.missing_rate[c])

    grid = _grid(anatomy_rng, job.profile, job.size, job.downsample)
    anatomy = _anatomy(anatomy_rng, grid, clinical)
    phases = _phases(anatomy_rng, job.profile.portal_delay)
    portal = _render_portal(anatomy, phases["portal"], job.profile, noise_rng)
    native = _render_native(anatomy, phases["native"], job.profile, noise_rng)
    native_grid = _Grid(
        shape=(native.shape[0], *grid.shape[1:]),
        spacing=(grid.spacing[0], grid.spacing[1], 2 * grid.spacing[2]),
        origin=grid.origin,
    )
    return _SyntheticPatient(
        person=person,
        clinical=clinical,
        risk=risk,
        outcome=outcome,
        missing=missing,
        grid=grid,
        native_grid=native_grid,
        portal=portal,
        native=native,
        scouts=_scout_views(portal, job.profile.scout_views),
        label_map=_label_map(anatomy, job.labels),
    )


# ---------------------------------------------------------------------------------------------
# DICOM writing.
# ---------------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """Decimal string for DICOM DS; geometry values here are exact in a few decimals."""
    text = f"{value:.7f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


class _FileNamer:
    """Per-center file naming; numbered names are shuffled so that name order means nothing."""

    def __init__(self, scheme: str, rng: np.random.Generator, count: int):
        self.scheme = scheme
        self.numbers = iter(rng.permutation(count) + 1)

    def __call__(self, sop_uid: str, modality: str) -> str:
        if self.scheme == "im_numbered":
            return f"IM{next(self.numbers):04d}"
        if self.scheme == "sop_uid_dcm":
            return f"{sop_uid}.dcm"
        if self.scheme == "hex_noext":
            return hashlib.sha1(sop_uid.encode()).hexdigest()[:8].upper()
        return f"{ {'RTSTRUCT': 'RS', 'SEG': 'SEG'}.get(modality, modality)}.{sop_uid}.dcm"


def _series_dir(patient_dir: Path, profile: CenterProfile, person: _Person, position: int, number: int,
                description: str) -> Path:
    """Folder of one series under the center's layout (position = 1-based order in the folder)."""
    if profile.layout == "flat":
        return patient_dir
    if profile.layout == "dated":
        safe = "".join(ch if ch.isalnum() else "_" for ch in description)
        return patient_dir / person.study_date.strftime("%Y%m%d") / f"{number}_{safe}"
    if profile.layout == "dicom_s":
        return patient_dir / "DICOM" / f"S{position:05d}"
    return patient_dir / person.accession / f"SERIES_{number:03d}"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient_study_tags(ds: Dataset, person: _Person, profile: CenterProfile, study_uid: str) -> None:
    """Patient, study and institution tags shared by every file of the patient (the PHI)."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = person.dicom_name
    ds.PatientID = person.patient_id
    ds.PatientBirthDate = person.birth_date.strftime("%Y%m%d")
    ds.PatientSex = person.sex
    ds.PatientAge = f"{person.age:03d}Y"
    ds.OtherPatientIDs = person.other_id
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = person.study_date.strftime("%Y%m%d")
    ds.StudyTime = person.study_time
    ds.StudyID = person.study_id
    ds.StudyDescription = "CT ABDOMEN PELVIS"
    ds.AccessionNumber = person.accession
    ds.ReferringPhysicianName = person.referring_physician
    ds.OperatorsName = person.operator
    ds.InstitutionName = profile.institution
    ds.InstitutionAddress = profile.address


def _phi_rows(person: _Person, profile: CenterProfile) -> list[tuple[str, str]]:
    """Every identifying value written for the patient: DICOM keywords, then clinical-table columns."""
    return [
        ("PatientName", person.dicom_name),
        ("PatientID", person.patient_id),
        ("PatientBirthDate", person.birth_date.strftime("%Y%m%d")),
        ("OtherPatientIDs", person.other_id),
        ("AccessionNumber", person.accession),
        ("InstitutionName", profile.institution),
        ("InstitutionAddress", profile.address),
        ("ReferringPhysicianName", person.referring_physician),
        ("OperatorsName", person.operator),
        ("StudyID", person.study_id),
        ("PatientSex", person.sex),
        ("PatientAge", f"{person.age:03d}Y"),
        ("patient_name", person.clinical_name),
        ("birth_date", person.birth_date.isoformat()),
    ]


def _minutes_after(hhmmss: str, minutes: int) -> str:
    t = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:]) + 60 * minutes
    return f"{t // 3600 % 24:02d}{t // 60 % 60:02d}{t % 60:02d}"


@dataclass(frozen=True)
class _Frame:
    pixels: np.ndarray  # int16 HU (rows, columns)
    position: tuple[float, float, float]  # ImagePositionPatient of the first pixel, mm
    orientation: tuple[int, ...]  # ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # DICOM order: between rows, between columns


@dataclass(frozen=True)
class _SeriesSpec:
    kind: str  # portal | native | scout
    number: int
    description: str
    image_type: tuple[str, ...]
    minutes: int  # acquisition time after the study start
    thickness: float | None


# Order of the series in the patient's folder (the dicom_s layout numbers folders by it).
_FOLDER_POSITION = {"scout": 1, "native": 2, "portal": 3, "rtstruct": 4, "seg": 4,
                    "t2w": 2, "dwi": 3, "adc": 5}  # the MRI demo's series (radstudy.demo.mri)


@dataclass(frozen=True)
class _Delivery:
    """What every file of one patient shares."""

    job: _PatientJob
    person: _Person
    study_uid: str
    frame_uid: str
    patient_dir: Path
    namer: _FileNamer

    def uid(self, *parts: object) -> str:
        return _uid(self.job.seed, self.job.profile.index, self.job.patient_index, *parts)

    def folder(self, kind: str, number: int, description: str) -> Path:
        position = _FOLDER_POSITION[kind]
        folder = _series_dir(self.patient_dir, self.job.profile, self.person, position, number, description)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _write_ct_series(d: _Delivery, spec: _SeriesSpec, frames: list[_Frame]) -> list[str]:
    """One CT Image Storage file per frame, InstanceNumber in frame order. Returns the SOP UIDs."""
    profile, storage = d.job.profile, d.job.profile.storage
    folder = d.folder(spec.kind, spec.number, spec.description)
    ds = Dataset()
    _patient_study_tags(ds, d.person, profile, d.study_uid)
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = d.uid("series", spec.kind)
    ds.SeriesNumber = spec.number
    ds.SeriesDescription = spec.description
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _minutes_after(d.person.study_time, spec.minutes)
    ds.AcquisitionNumber = 1
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.ConvolutionKernel = profile.kernel
    ds.KVP = profile.kvp
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = d.frame_uid
    ds.PositionReferenceIndicator = ""
    if spec.kind == "portal":
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusRoute = "IV"
    if spec.thickness is not None:
        ds.SliceThickness = _ds(spec.thickness)
        ds.SpacingBetweenSlices = _ds(spec.thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = int(storage.signed)
    ds.RescaleIntercept = str(storage.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    stored_dtype = "<i2" if storage.signed else "<u2"

    uids = []
    for n, frame in enumerate(frames, start=1):
        sop_uid = d.uid(spec.kind, n)
        ds.file_meta = _file_meta(CTImageStorage, sop_uid)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = n
        ds.ImagePositionPatient = [_ds(v) for v in frame.position]
        ds.ImageOrientationPatient = [_ds(v) for v in frame.orientation]
        ds.PixelSpacing = [_ds(v) for v in frame.pixel_spacing]
        if spec.kind != "scout":
            ds.SliceLocation = _ds(frame.position[2])
        ds.Rows, ds.Columns = frame.pixels.shape
        ds.PixelData = (frame.pixels.astype(np.int32) - storage.intercept).astype(stored_dtype).tobytes()
        ds.save_as(folder / d.namer(sop_uid, "CT"), enforce_file_format=True)
        uids.append(sop_uid)
    return uids


def _write_axial(d: _Delivery, spec: _SeriesSpec, volume: np.ndarray, grid: _Grid) -> list[str]:
    """Axial series in the center's InstanceNumber direction; returns SOP UIDs indexed by slice."""
    x0, y0, z0 = grid.origin
    order = list(range(grid.shape[0]))
    if d.job.profile.head_first:
        order.reverse()
    frames = [
        _Frame(volume[k], (x0, y0, z0 + k * grid.spacing[2]), (1, 0, 0, 0, 1, 0), (grid.spacing[1], grid.spacing[0]))
        for k in order
    ]
    uids = _write_ct_series(d, spec, frames)
    by_slice = [""] * grid.shape[0]
    for k, uid in zip(order, uids):
        by_slice[k] = uid
    return by_slice


def _write_scout(d: _Delivery, spec: _SeriesSpec, scouts: list[np.ndarray], grid: _Grid) -> None:
    """Localizer: coronal (AP) and sagittal (lateral) projections, first row most cranial."""
    x0, y0, z0 = grid.origin
    z_top = z0 + (grid.shape[0] - 1) * grid.spacing[2]
    frames = [
        _Frame(scouts[0], (x0, 0.0, z_top), (1, 0, 0, 0, 0, -1), (grid.spacing[2], grid.spacing[0])),
        _Frame(scouts[-1], (0.0, y0, z_top), (0, 1, 0, 0, 0, -1), (grid.spacing[2], grid.spacing[1])),
    ]
    _write_ct_series(d, spec, frames[: len(scouts)])


def _slice_contours(mask: np.ndarray, grid: _Grid) -> list[tuple[int, np.ndarray]]:
    """Closed planar contours, (slice index, (n, 3) LPS mm points), traced at level 0.5 between
    voxel centres so that rasterising the polygons gives back the mask."""
    contours = []
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        rows, cols = np.nonzero(mask[k].any(axis=1))[0], np.nonzero(mask[k].any(axis=0))[0]
        # Crop for speed and pad so that every contour closes inside the array.
        crop = np.pad(mask[k, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 1).astype(np.float32)
        for c in measure.find_contours(crop, 0.5):
            c = c[:-1]  # the closing point repeats the first; CLOSED_PLANAR implies it
            contours.append((int(k), grid.physical(c[:, 1] + cols[0] - 1, c[:, 0] + rows[0] - 1, k)))
    return contours


_RT_ROIS = (  # (name, label key, interpreted type, display colour)
    ("Liver", "liver", "ORGAN", [220, 160, 60]),
    ("GTV_Tumour", "tumour", "GTV", [255, 0, 0]),
)


def _write_rtstruct(d: _Delivery, label_map: np.ndarray, grid: _Grid, portal_uids: list[str],
                    portal_number: int, *, roi_spec=_RT_ROIS, image_class: str = CTImageStorage,
                    series_kind: str = "portal", structure_set_name: str = "Liver and tumour") -> None:
    """RT Structure Set with the manual contours, referencing every slice of the contoured series (the portal-venous
    CT; the MRI demo's T2W series: `roi_spec`, `image_class`, `series_kind`)."""
    sop_uid = d.uid("rtstruct")
    ds = Dataset()
    ds.file_meta = _file_meta(RTStructureSetStorage, sop_uid)
    _patient_study_tags(ds, d.person, d.job.profile, d.study_uid)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = d.uid("series", "rtstruct")
    ds.SeriesNumber = 900 + portal_number
    ds.SeriesDescription = "Manual contours"
    # Contoured for the study a week after the scan.
    ds.SeriesDate = ds.StructureSetDate = (d.person.study_date + timedelta(days=7)).strftime("%Y%m%d")
    ds.SeriesTime = ds.StructureSetTime = d.person.study_time
    ds.Manufacturer = "Varian Medical Systems"
    ds.ManufacturerModelName = "ARIA RadOnc"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "MANUAL"
    ds.StructureSetName = structure_set_name

    def image_ref(uid: str) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image_class
        ref.ReferencedSOPInstanceUID = uid
        return ref

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = d.uid("series", series_kind)
    series_ref.ContourImageSequence = Sequence([image_ref(u) for u in portal_uids])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, by convention
    study_ref.ReferencedSOPInstanceUID = d.study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = d.frame_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    rois, roi_contours, observations = [], [], []
    for number, (name, key, interpreted, colour) in enumerate(roi_spec, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = d.frame_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        contour_items = []
        for n, (k, points) in enumerate(_slice_contours(label_map == d.job.labels[key], grid), start=1):
            item = Dataset()
            item.ContourImageSequence = Sequence([image_ref(portal_uids[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = n
            item.ContourData = [f"{v:.3f}" for v in points.ravel()]
            contour_items.append(item)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = colour
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = Sequence(contour_items)
        roi_contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = interpreted
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    folder = d.folder("rtstruct", ds.SeriesNumber, ds.SeriesDescription)
    ds.save_as(folder / d.namer(sop_uid, "RTSTRUCT"), enforce_file_format=True)


_SEG_SEGMENTS = (  # (segment label, label key, SNOMED category, SNOMED type): as 3D Slicer / OHIF label them
    ("Liver", "liver", "Organ", "Liver"),
    ("Tumour", "tumour", "MorphologicallyAbnormalStructure", "Neoplasm"),
)


def _write_seg(d: _Delivery, label_map: np.ndarray, portal_number: int) -> None:
    """DICOM SEG (binary, written by highdicom) of the manual mask on the portal-venous series, as TCIA collections
    and 3D Slicer / OHIF deliver them: one segment per label, frames only where a segment has voxels."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    portal_uid = d.uid("series", "portal")
    files = [path for path in sorted(d.patient_dir.rglob("*")) if path.is_file()
             and pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
                 "SeriesInstanceUID") == portal_uid]
    sources = sorted((pydicom.dcmread(path) for path in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    masks = np.stack([label_map == d.job.labels[key] for _, key, _, _ in _SEG_SEGMENTS], axis=-1)  # z ascending
    algorithm = hd.seg.SegmentAlgorithmTypeValues.MANUAL
    segments = [hd.seg.SegmentDescription(segment_number=number, segment_label=label,
                                          segmented_property_category=getattr(codes.SCT, category),
                                          segmented_property_type=getattr(codes.SCT, kind), algorithm_type=algorithm)
                for number, (label, _, category, kind) in enumerate(_SEG_SEGMENTS, start=1)]
    sop_uid = d.uid("seg")
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=d.uid("series", "seg"), series_number=950 + portal_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="3D Slicer", manufacturer_model_name="Slicer",
        software_versions="5.6", device_serial_number="0", series_description="Segmentation")
    folder = d.folder("seg", seg.SeriesNumber, seg.SeriesDescription)
    seg.save_as(folder / d.namer(sop_uid, "SEG"), enforce_file_format=True)


def _write_label_map(path: Path, label_map: np.ndarray, grid: _Grid) -> None:
    """NIfTI label map on exactly the portal series' grid (identity direction, LPS origin)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(label_map)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def _deliver(job: _PatientJob, patient: _SyntheticPatient) -> None:
    """Write the patient's folder as the hospital would hand it over."""
    profile = job.profile
    files_rng = _patient_rngs(job.seed, profile.index, job.patient_index)[_FILES]
    n_files = patient.grid.shape[0] + patient.native_grid.shape[0] + len(patient.scouts) + 1
    d = _Delivery(
        job=job,
        person=patient.person,
        study_uid=_uid(job.seed, profile.index, job.patient_index, "study"),
        frame_uid=_uid(job.seed, profile.index, job.patient_index, "frame-of-reference"),
        patient_dir=profile.dicom_root / job.patient_id,
        namer=_FileNamer(profile.naming, files_rng, n_files),
    )
    portal_name, native_name, scout_name = profile.series_names
    portal_no, native_no, scout_no = profile.series_numbers
    axial = ("ORIGINAL", "PRIMARY", "AXIAL")
    thin, thick = patient.grid.spacing[2], patient.native_grid.spacing[2]
    scout = _SeriesSpec("scout", scout_no, scout_name, ("ORIGINAL", "PRIMARY", "LOCALIZER"), 0, None)
    native = _SeriesSpec("native", native_no, native_name.format(t=f"{thick:g}"), axial, 1, thick)
    portal = _SeriesSpec("portal", portal_no, portal_name.format(t=f"{thin:g}"), axial, 3, thin)
    _write_scout(d, scout, patient.scouts, patient.grid)
    _write_axial(d, native, patient.native, patient.native_grid)
    portal_uids = _write_axial(d, portal, patient.portal, patient.grid)
    if job.mask_format == "nifti":
        seg_path = d.patient_dir / "segmentation" / profile.seg_name.format(patient_id=job.patient_id)
        _write_label_map(seg_path, patient.label_map, patient.grid)
    elif job.mask_format == "rtstruct":
        _write_rtstruct(d, patient.label_map, patient.grid, portal_uids, portal_no)
    elif job.mask_format == "seg":
        _write_seg(d, patient.label_map, portal_no)


# ---------------------------------------------------------------------------------------------
# Tables and ground truth.
# ---------------------------------------------------------------------------------------------
def _clinical_row(job: _PatientJob, p: _SyntheticPatient) -> dict[str, str]:
    c, o = p.clinical, p.outcome
    row = {
        "patient_id": job.patient_id,
        "patient_name": p.person.clinical_name,
        "birth_date": p.person.birth_date.isoformat(),
        "age": str(p.person.age),
        "sex": p.person.sex,
        "tumour_site": c.tumour_site,
        "t_stage": f"T{c.t_stage}",
        "n_stage": f"N{c.n_stage}",
        "cea": f"{c.cea:.1f}",
        "ca19_9": f"{c.ca19_9:.1f}",
        "afp": f"{c.afp:.1f}",
        "dissected_lymph_nodes": str(c.dissected_lymph_nodes),
        "perineural_invasion": str(c.perineural_invasion),
        "tumour_nodules": str(c.tumour_nodules),
        "synchronous_lm": str(o.synchronous_lm),
        "mfs_months": f"{o.mfs_months:.1f}",
        "mfs_event": str(o.mfs_event),
    }
    for column in p.missing:
        row[column] = ""
    return row


def _generate_patient(job: _PatientJob) -> dict:
    """Synthesise and write one patient; returns its rows for the cohort tables."""
    patient = _synthesise(job)
    _deliver(job, patient)
    truth_mask = job.ground_truth / "masks" / job.profile.id / f"{job.patient_id}.nii.gz"
    _write_label_map(truth_mask, patient.label_map, patient.grid)
    c, o = patient.clinical, patient.outcome
    return {
        "center": job.profile.id,
        "clinical": _clinical_row(job, patient),
        "truth": {
            "center": job.profile.id,
            "role": job.profile.role,
            "patient_id": job.patient_id,
            "latent_risk": f"{patient.risk:.6f}",
            "tumour_heterogeneity": f"{c.tumour_heterogeneity:.6f}",
            "liver_texture": f"{c.liver_texture:.6f}",
            "synchronous_lm": str(o.synchronous_lm),
            "mfs_months": f"{o.mfs_months:.1f}",
            "mfs_event": str(o.mfs_event),
            "annotated": str(int(job.mask_format != "none")),
            "mask_format": job.mask_format,
        },
        "phi": [(job.profile.id, job.patient_id, f, v) for f, v in _phi_rows(patient.person, job.profile)],
    }


def _write_table(path: Path, columns, rows, delimiter: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] if isinstance(row, dict) else row for row in rows)


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _oracle_metrics(truth_rows: list[dict], binary: str = "synchronous_lm", time: str = "mfs_months",
                    event: str = "mfs_event") -> dict:
    """AUC and Harrell's C of the latent risk against the outcomes (columns `binary`, `time`, `event` of the truth
    rows), overall and per center: the best any model can do on the cohort."""
    risk = np.array([float(r["latent_risk"]) for r in truth_rows])
    label = np.array([int(r[binary]) for r in truth_rows])
    times = np.array([float(r[time]) for r in truth_rows])
    events = np.array([int(r[event]) for r in truth_rows])
    centers = np.array([r["center"] for r in truth_rows])

    def metrics(sel: np.ndarray) -> dict:
        return {
            "n": int(sel.sum()),
            "auc": _finite_or_none(auc(label[sel], risk[sel])),
            "c_index": _finite_or_none(harrell_c(times[sel], events[sel], risk[sel])),
            "prevalence": round(float(label[sel].mean()), 4),
            "event_rate": round(float(events[sel].mean()), 4),
        }

    return {
        "note": f"latent risk vs {binary} (AUC) and vs {time}/{event} (Harrell's C): "
        "the best any model can do on this cohort",
        "overall": metrics(np.ones(len(truth_rows), bool)),
        "centers": {c: metrics(centers == c) for c in dict.fromkeys(centers.tolist())},
    }


_TRUTH_COLUMNS = (
    "center", "role", "patient_id", "latent_risk", "tumour_heterogeneity", "liver_texture",
    "synchronous_lm", "mfs_months", "mfs_event", "annotated", "mask_format",
)


def _profile_record(profile: CenterProfile) -> dict:
    record = dataclasses.asdict(profile)
    record["dicom_root"], record["clinical"] = str(profile.dicom_root), str(profile.clinical)
    return record


_README = (
    "Ground truth of the synthetic demo cohort (radstudy.demo.cohort). The pipeline must never read "
    "this folder: it is for checking results only.\n"
    "patients.tsv: latent risk, image parameters and outcomes per patient; phi.tsv: every "
    "identifying value written; masks/: true label maps on the portal-venous grid; "
    "oracle.json: AUC and C-index of the latent risk; centers.json: scanner and delivery "
    "conventions per center.\n"
)


def _write_ground_truth(gt: Path, profiles: list, records: list[dict], oracle: dict, settings: dict, *,
                        readme: str = _README, columns=_TRUTH_COLUMNS) -> None:
    """The ground-truth folder of a demo cohort (both demos: the MRI one gives its README and truth columns)."""
    gt.mkdir(parents=True, exist_ok=True)
    (gt / "README.txt").write_text(readme)
    _write_table(gt / "patients.tsv", columns, [r["truth"] for r in records], "\t")
    phi = [row for r in records for row in r["phi"]]
    _write_table(gt / "phi.tsv", ("center", "patient_id", "field", "value"), phi, "\t")
    (gt / "oracle.json").write_text(json.dumps(oracle, indent=2) + "\n")
    (gt / "centers.json").write_text(
        json.dumps({"settings": settings, "centers": [_profile_record(p) for p in profiles]}, indent=2) + "\n"
    )


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------
def _check_arguments(centers, seed, patients, size, annotated_fraction, rtstruct_per_center, seg_per_center, labels,
                     workers, downsample) -> dict[str, int]:
    """Validate generate_cohort's arguments; returns the label values to use."""
    if not centers:
        raise ConfigError("demo: at least one center is required")
    ids = [str(c.get("id", "")) for c in centers]
    for c in centers:
        missing = {"id", "role", "dicom_root", "clinical"} - set(c)
        if missing:
            raise ConfigError(f"demo: center {c.get('id', '?')!r} lacks {sorted(missing)}")
        if c["role"] not in ROLES:
            raise ConfigError(f"demo: center {c['id']!r} has role {c['role']!r}; expected one of {ROLES}")
    if len(set(ids)) != len(ids) or "" in ids:
        raise ConfigError(f"demo: center ids must be unique and non-empty, got {ids}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"demo: seed must be a non-negative integer, got {seed!r}")
    if isinstance(patients, int) and not isinstance(patients, bool):
        ok = patients >= 1
    else:
        ok = len(patients) == 2 and all(isinstance(v, int) for v in patients) and 1 <= patients[0] <= patients[1]
    if not ok:
        raise ConfigError(f"demo: patients must be a count >= 1 or a (min, max) range, got {patients!r}")
    if size not in _SIZES:
        raise ConfigError(f"demo: size must be one of {sorted(_SIZES)}, got {size!r}")
    if not 0 <= annotated_fraction <= 1:
        raise ConfigError(f"demo: annotated_fraction must lie in [0, 1], got {annotated_fraction!r}")
    if rtstruct_per_center < 0 or seg_per_center < 0:
        raise ConfigError(f"demo: rtstruct_per_center and seg_per_center must be >= 0, got {rtstruct_per_center!r} "
                          f"and {seg_per_center!r}")
    labels = dict(DEFAULT_LABELS if labels is None else labels)
    values = list(labels.values())
    valid_values = len(set(values)) == 2 and all(isinstance(v, int) and 1 <= v <= 255 for v in values)
    if set(labels) != set(DEFAULT_LABELS) or not valid_values:
        raise ConfigError(f"demo: labels must map 'liver' and 'tumour' to distinct integers 1-255, got {labels!r}")
    if workers < 1:
        raise ConfigError(f"demo: workers must be >= 1, got {workers!r}")
    if downsample < 1 or _SIZES[size].matrix // downsample < 16:
        raise ConfigError(f"demo: _downsample must be >= 1 and leave >= 16 pixels, got {downsample!r}")
    return labels


def _generate_all(generate, jobs: list, workers: int) -> list[dict]:
    """generate(job) for every job, in a process pool of `workers` (both demos); the records in job order."""
    if workers > 1 and len(jobs) > 1:
        # fork, not spawn: spawn re-runs the caller's main script in every worker, and scripts such
        # as Snakemake's have no __main__ guard. Workers use SimpleITK after the fork; that works.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            return list(pool.map(generate, jobs))
    return [generate(job) for job in jobs]


def _require_empty(folder: Path) -> None:
    # Stale patients from another seed would silently join the cohort.
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"demo: {folder} is not empty; the demo cohort is written into empty folders")


def generate_cohort(
    centers: list[dict], out_dir: str | Path, *, seed: int, patients: int | tuple[int, int] = (30, 40),
    size: str = "small", annotated_fraction: float = 0.3, rtstruct_per_center: int = 1, seg_per_center: int = 0,
    labels: dict[str, int] | None = None, workers: int = 1, _downsample: int = 1,
) -> dict:
    """Generate a synthetic multicenter CT cohort.

    centers: [{"id": "C1", "role": "development"|"external", "dicom_root": path, "clinical": path}, ...]
    Writes each center's patients to {dicom_root}/{original_patient_id}/..., its clinical CSV to
    `clinical`, and the ground truth (never read by the pipeline) under {out_dir}/ground_truth/.
    `patients` is a count per center or a (min, max) range drawn per center; `size` is "small"
    (96x96, ~64 slices) or "realistic" (512x512, 100-160 slices). `annotated_fraction` of each
    center's patients (at least one at development centers) get a manual mask in their folder, as
    NIfTI except for `rtstruct_per_center` of them, delivered as RTSTRUCT only, and the next `seg_per_center`,
    delivered as DICOM SEG only. `workers` > 1 uses a
    process pool; the output does not depend on it. `_downsample` (tests only) divides the matrix
    and multiplies the voxel size. Returns a summary: patients and annotations per center, oracle
    metrics of the latent risk. labels default {"liver": 1, "tumour": 2}.
    """
    labels = _check_arguments(
        centers, seed, patients, size, annotated_fraction, rtstruct_per_center, seg_per_center, labels, workers,
        _downsample)
    gt = Path(out_dir) / "ground_truth"
    for folder in [gt, *(Path(c["dicom_root"]) for c in centers)]:
        _require_empty(folder)
    jobs = _plan_cohort(
        centers, out_dir, seed=seed, patients=tuple(patients) if not isinstance(patients, int) else patients,
        size=size, annotated_fraction=annotated_fraction, rtstruct_per_center=rtstruct_per_center,
        seg_per_center=seg_per_center, labels=labels, downsample=_downsample,
    )
    records = _generate_all(_generate_patient, jobs, workers)

    profiles = list({job.profile.id: job.profile for job in jobs}.values())
    for profile in profiles:
        rows = [r["clinical"] for r in records if r["center"] == profile.id]
        _write_table(profile.clinical, _CLINICAL_COLUMNS, rows, ",")
    oracle = _oracle_metrics([r["truth"] for r in records])
    settings = {"seed": seed, "size": size, "annotated_fraction": annotated_fraction,
                "rtstruct_per_center": rtstruct_per_center, "seg_per_center": seg_per_center, "labels": labels,
                "downsample": _downsample}
    _write_ground_truth(gt, profiles, records, oracle, settings)

    def count(center: str, fmt: str) -> int:
        return sum(1 for j in jobs if j.profile.id == center and j.mask_format == fmt)

    return {
        "seed": seed,
        "size": size,
        "patients": {p.id: sum(1 for j in jobs if j.profile.id == p.id) for p in profiles},
        "annotated": {p.id: {f: count(p.id, f) for f in ("nifti", "rtstruct", "seg")} for p in profiles},
        "oracle": {"overall": oracle["overall"], "centers": oracle["centers"]},
        "ground_truth": str(gt),
    }
