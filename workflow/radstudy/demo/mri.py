"""Synthetic multicenter multiparametric MRI cohort of rectal cancer (seeds 000 and 003), written as MR scanners deliver it.

`generate_mri_cohort` turns a seed into a rectal-cancer cohort: per patient an oblique axial T2-weighted TSE series
perpendicular to the tumour, an axial DWI series with b0 and b800 images (one series, the b-value in the standard tag or
the vendor's private tag), and the ADC map the scanner derived from it, on its own coarser grid and slice positions in the
same frame of reference; a manual tumour mask drawn on the T2W series for every annotated patient (NIfTI label map or
RTSTRUCT, by center); clinical variables of seeds 000 and 003; outcomes from a known latent risk that mixes clinical
variables with two tumour phenotypes (ADC heterogeneity and T2 texture). Per center: vendor, model and field strength,
signal scale, coil bias field, Rician noise level (SNR follows the field strength), an in-plane reconstruction filter
(k-space window or edge enhancement, acting on the tumour's texture and the noise alike), voxel sizes, ADC calibration,
and the CT demo's storage conventions (folder layout, file naming, PHI). The truth goes to `{out_dir}/ground_truth/`.

The body is a continuous model in patient coordinates (LPS mm): every series samples it on its own grid, with three
samples across the slice thickness (partial volume), so that T2W, DWI and ADC see the same tumour. Tumour textures are
band-limited random fields (sums of plane waves) evaluated at the sample points, independent of any grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from radstudy.demo import cohort as ct
from radstudy.demo.cohort import _ds, _rng
from radstudy.errors import ConfigError

LABELS = {"tumour": 1}

# ---------------------------------------------------------------------------------------------
# Per-center conventions: vendor (series names, sequence tags, where the b-value is written), field strength.
# ---------------------------------------------------------------------------------------------
# (manufacturer, models, b-value tag, (T2W, DWI, ADC) descriptions, (T2W, DWI) sequence names, ADC image type)
_VENDORS = (
    ("SIEMENS", ("MAGNETOM Skyra", "MAGNETOM Prisma", "MAGNETOM Aera"), "siemens",
     ("t2_tse_tra_obl_p2", "ep2d_diff_b0_800_tra_p2", "ep2d_diff_b0_800_tra_p2_ADC"), ("*tse2d1_21", "*ep_b0_800t"),
     ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND")),
    ("GE MEDICAL SYSTEMS", ("SIGNA Artist", "Discovery MR750w", "SIGNA Premier"), "ge",
     ("Ax T2 FRFSE Oblique", "Ax DWI b800 ASSET", "Apparent Diffusion Coefficient (mm2/s)"), ("frfse", "epi2"),
     ("DERIVED", "PRIMARY", "ADC", "ADC")),
    ("Philips Medical Systems", ("Ingenia", "Achieva dStream", "Ingenia Elition X"), "standard",
     ("T2W_TSE_obl", "DWI_b0_800 SENSE", "dADC_DWI_b0_800"), ("TSE", "DwiSE"),
     ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")),
)
# b-value tags as the vendors write them: (group, private creator, element offset, VR); "standard": DiffusionBValue
_B_VALUE_TAGS = {"siemens": (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
                 "ge": (0x0043, "GEMS_PARM_01", 0x39, "IS")}
_SERIES_NUMBERS = ((3, 5, 6), (4, 7, 700), (301, 501, 502))  # (T2W, DWI, ADC)
# The reconstruction's in-plane filter, from smooth to sharp: k-space apodization (a Hamming or Fermi window,
# broadening the point-spread function), none, or the vendor's edge-enhancing image filter; its response as
# (Gaussian PSF sigma, unsharp-masking amount) in the center's own pixels (applied by ct.in_plane_response, as the CT
# kernels). It filters the acquired data, signal and noise alike, before the magnitude: smoother filters erase fine
# tumour texture and lower the noise, sharper ones lift both. Milder than the CT kernels' range: a strong window (PSF
# sigma 1 pixel) on the 3 mm DWI pixels left no trace of the ADC phenotype.
_RECON_FILTERS = (("Hamming", 0.6, 0.0), ("Fermi", 0.3, 0.0), ("none", 0.0, 0.0), ("edge enhancement", 0.0, 0.3))
_MASK_FORMATS = ("nifti", "rtstruct")
_SEG_NAMES = ("{patient_id}_seg.nii.gz", "T2W_tumour_seg.nii.gz", "rectum_tumour_seg.nii.gz")
# Oblique tilts of the T2W plane about the left-right axis: (sin, cos) pairs exact in decimal, so that the written
# ImageOrientationPatient is exactly orthonormal.
_TILTS = ((0.0, 1.0), (0.28, 0.96), (0.352, 0.936), (-0.28, 0.96))


@dataclass(frozen=True)
class _SizePreset:
    t2_matrix: int
    t2_pixel: tuple[float, float]  # mm, range drawn per center
    t2_thickness: tuple[float, ...]
    t2_slices: int
    dwi_matrix: int
    dwi_pixel: tuple[float, float]
    dwi_thickness: tuple[float, ...]
    dwi_slices: int


_SIZES = {
    # A 96-matrix T2W (1.6-2 mm, 3-4 mm slices) and a 64-matrix DWI (3-3.5 mm, 5 mm): 2 minutes for 100 patients.
    "small": _SizePreset(96, (1.6, 2.0), (3.0, 3.5, 4.0), 24, 64, (3.0, 3.5), (5.0,), 18),
    # As scanned: T2W 0.5-0.7 mm in plane, 3 mm; DWI 1.6-2 mm, 4-5 mm.
    "realistic": _SizePreset(320, (0.5, 0.6875), (3.0,), 30, 128, (1.5625, 2.0), (4.0, 5.0), 24),
}


@dataclass(frozen=True)
class MRCenterProfile:
    """One center's MR scanner and delivery conventions (fixed for all its patients)."""

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
    field_strength: float  # T
    b_value_tag: str
    series_names: tuple[str, str, str]
    sequence_names: tuple[str, str]
    adc_image_type: tuple[str, ...]
    series_numbers: tuple[int, int, int]
    t2_scale: float  # stored value of muscle on T2W: the vendor's arbitrary signal scale
    dwi_scale: float  # stored value of muscle on b0
    snr: float  # muscle signal / noise sigma on T2W (b0: half of it), before the reconstruction filter
    recon_filter: str  # the in-plane reconstruction filter (_RECON_FILTERS), on T2W and DWI alike
    psf_sigma: float  # its response: Gaussian PSF sigma (pixels) ...
    edge_enhancement: float  # ... or unsharp-masking amount
    bias_amplitude: float  # coil sensitivity: sd of the log bias field
    adc_calibration: float  # multiplicative ADC error of the vendor's fit
    t2_pixel: float
    t2_thickness: float
    dwi_pixel: float
    dwi_thickness: float
    head_first: bool
    layout: str
    naming: str
    mask_format: str
    seg_name: str
    missing_rate: dict[str, float]


def _center_profiles(centers: list[dict], seed: int, size: str) -> list[MRCenterProfile]:
    preset = _SIZES[size]
    conv = _rng(seed, ct._COHORT, 11)
    perms = {name: conv.permutation(len(options)) for name, options in (
        ("vendor", _VENDORS), ("institution", ct._INSTITUTIONS), ("prefix", ct._ID_PREFIXES),
        ("numbers", _SERIES_NUMBERS), ("layout", ct._LAYOUTS), ("naming", ct._NAMINGS), ("seg", _SEG_NAMES))}
    # the first four centers' filters all differ; an external center's lies within the development centers' range,
    # as the CT kernels' (the models learn from the filters they are tested on; with the external center alone on
    # edge enhancement or on it within range, ComBat's full scale step cost the radiomic C alike: docs/validity.md)
    filter_order = ct.external_within_range(conv.permutation(len(_RECON_FILTERS)), [str(c["role"]) for c in centers])

    def pick(name, options, i):
        return options[perms[name][i % len(options)]]

    profiles = []
    for i, center in enumerate(centers):
        rng = _rng(seed, ct._CENTER, 100 + i)
        manufacturer, models, tag, names, sequences, adc_type = pick("vendor", _VENDORS, i)
        institution, address = pick("institution", ct._INSTITUTIONS, i)
        field = float(rng.choice([1.5, 3.0]))
        lo, hi = preset.t2_pixel
        dlo, dhi = preset.dwi_pixel
        profiles.append(MRCenterProfile(
            index=i, id=str(center["id"]), role=str(center["role"]), dicom_root=Path(center["dicom_root"]),
            clinical=Path(center["clinical"]), institution=institution, address=address,
            id_prefix=pick("prefix", ct._ID_PREFIXES, i), manufacturer=manufacturer, model=str(rng.choice(models)),
            field_strength=field, b_value_tag=tag, series_names=names, sequence_names=sequences,
            adc_image_type=adc_type, series_numbers=pick("numbers", _SERIES_NUMBERS, i),
            t2_scale=round(float(np.exp(rng.uniform(np.log(150), np.log(900)))), 1),
            dwi_scale=round(float(np.exp(rng.uniform(np.log(60), np.log(400)))), 1),
            snr=round(float((14 if field == 1.5 else 24) * rng.uniform(0.8, 1.2)), 1),
            **dict(zip(("recon_filter", "psf_sigma", "edge_enhancement"),
                       _RECON_FILTERS[filter_order[i % len(_RECON_FILTERS)]])),
            bias_amplitude=round(float(rng.uniform(0.08, 0.3)), 3),
            adc_calibration=round(float(rng.uniform(0.94, 1.06)), 3),
            t2_pixel=float(rng.integers(math.ceil(lo * 64), math.floor(hi * 64) + 1)) / 64,
            t2_thickness=float(rng.choice(preset.t2_thickness)),
            dwi_pixel=float(rng.integers(math.ceil(dlo * 64), math.floor(dhi * 64) + 1)) / 64,
            dwi_thickness=float(rng.choice(preset.dwi_thickness)),
            head_first=bool(rng.random() < 0.5), layout=pick("layout", ct._LAYOUTS, i),
            naming=pick("naming", ct._NAMINGS, i), mask_format=_MASK_FORMATS[0 if i % 3 < 2 else 1],
            seg_name=pick("seg", _SEG_NAMES, i),
            missing_rate={c: round(float(rng.uniform(0.03, 0.08)), 3) for c in _MISSABLE},
        ))
    return profiles


# ---------------------------------------------------------------------------------------------
# Patient: clinical variables of seeds 000 / 003, tumour phenotypes, outcomes.
# ---------------------------------------------------------------------------------------------
_CLINICAL_COLUMNS = (
    "patient_id", "patient_name", "birth_date", "age", "sex", "tumour_site", "tumour_height_cm", "cea", "ca19_9",
    "ct_stage", "cn_stage", "mrf", "emvi", "synchronous_lm", "dmfs_months", "dmfs_event",
)
_MISSABLE = ("cea", "ca19_9")
# Latent risk: centred linear predictor (term weight, population mean of the term). The two tumour phenotypes
# (uniform on [0, 1]) carry about half of its variance (sd 1.33 of 1.90), three clinical factors the other half (CEA,
# node stage, EMVI; sd 1.36 with their correlations); the other clinical variables are noise the models must leave out.
# Seven weak clinical terms (this table before issue 18) left the clinical model at external AUC 0.59 on the demo's
# ~80 development patients (docs/validity.md): as in the CT demo, three factors. Prevalence (~31%) and events (~55%)
# are unchanged (simulated over 100k patients).
_RISK_WEIGHTS = {
    "log_cea": (0.9, 1.50),
    "cn_stage": (0.9, 0.82),
    "emvi": (1.0, 0.35),
    "adc_heterogeneity": (3.5, 0.5),
    "t2_texture": (3.0, 0.5),
}
_SYNCHRONOUS_INTERCEPT = -1.3
_WEIBULL_SCALE_MONTHS, _WEIBULL_SHAPE = 60.0, 1.2
_FOLLOW_UP_MONTHS = 60.0


@dataclass(frozen=True)
class _Clinical:
    tumour_height_cm: float  # distance of the lower edge from the anal verge
    ct_stage: int  # 2-4
    cn_stage: int  # 0-2
    mrf: int  # mesorectal fascia involved (the tumour reaches the fascia on the images)
    emvi: int
    cea: float
    ca19_9: float
    adc_heterogeneity: float  # phenotype in [0, 1]: ADC texture amplitude and a necrotic (high-ADC) core
    t2_texture: float  # phenotype in [0, 1]: T2 texture amplitude and grain

    @property
    def site(self) -> str:
        return "low" if self.tumour_height_cm < 5 else "mid" if self.tumour_height_cm < 10 else "high"


def _clinical(rng: np.random.Generator) -> _Clinical:
    t = int(rng.choice([2, 3, 4], p=[0.2, 0.6, 0.2]))
    n = int(rng.choice(3, p=[0.4, 0.38, 0.22]))
    return _Clinical(
        tumour_height_cm=round(float(rng.uniform(2, 14)), 1),
        ct_stage=t,
        cn_stage=n,
        mrf=int(rng.random() < {2: 0.02, 3: 0.3, 4: 0.8}[t]),
        emvi=int(rng.random() < 0.15 + 0.12 * n + 0.1 * (t - 2)),
        cea=max(0.3, round(float(np.exp(rng.normal(np.log(3.5) + 0.3 * n, 0.9))), 1)),
        ca19_9=max(0.6, round(float(np.exp(rng.normal(np.log(12) + 0.25 * n, 0.9))), 1)),
        adc_heterogeneity=float(rng.uniform()),
        t2_texture=float(rng.uniform()),
    )


def _latent_risk(c: _Clinical) -> float:
    values = {"log_cea": math.log(c.cea), "log_ca19_9": math.log(c.ca19_9), "ct_stage": c.ct_stage,
              "cn_stage": c.cn_stage, "mrf": c.mrf, "emvi": c.emvi, "low_site": float(c.site == "low"),
              "adc_heterogeneity": c.adc_heterogeneity, "t2_texture": c.t2_texture}
    return sum(w * (values[k] - mean) for k, (w, mean) in _RISK_WEIGHTS.items())


@dataclass(frozen=True)
class _Outcome:
    synchronous_lm: int
    dmfs_months: float
    dmfs_event: int


def _outcome(rng: np.random.Generator, risk: float) -> _Outcome:
    return _Outcome(*ct._draw_outcome(rng, risk, intercept=_SYNCHRONOUS_INTERCEPT, weibull_scale=_WEIBULL_SCALE_MONTHS,
                                      weibull_shape=_WEIBULL_SHAPE, follow_up=_FOLLOW_UP_MONTHS))


# ---------------------------------------------------------------------------------------------
# The body: tissue classes and their MR properties, a continuous model in LPS mm.
# ---------------------------------------------------------------------------------------------
AIR, FAT, MUSCLE, WALL, LUMEN, FASCIA, MARROW, URINE, TUMOUR, NECROSIS = range(10)
# relative T2W signal (TSE: fat bright, urine brightest), b0 signal (fat suppressed), ADC (1e-3 mm^2/s)
_T2 = np.array([0.0, 2.6, 1.0, 1.25, 1.9, 0.55, 2.0, 4.5, 1.75, 2.8], np.float32)
_B0 = np.array([0.0, 0.12, 1.0, 1.25, 1.5, 0.6, 0.3, 3.2, 1.7, 2.0], np.float32)
_ADC = np.array([0.0, 0.35, 1.4, 1.5, 2.1, 1.0, 0.45, 3.0, 0.9, 2.2], np.float32)


@dataclass(frozen=True)
class _Waves:
    """A band-limited random field with unit variance: sum of plane waves, evaluated anywhere in LPS mm."""

    k: np.ndarray  # (n, 3) rad/mm
    phase: np.ndarray  # (n,)

    @staticmethod
    def draw(rng: np.random.Generator, grain_mm: float, n: int = 40) -> _Waves:
        # A Gaussian-smoothed white noise of sigma `grain_mm` has wave vectors ~ N(0, 1/grain^2) per axis
        return _Waves(rng.normal(0, 1 / grain_mm, (n, 3)).astype(np.float32),
                      rng.uniform(0, 2 * np.pi, n).astype(np.float32))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        out = np.zeros(points.shape[:-1], np.float32)
        for k, p in zip(self.k, self.phase):
            out += np.cos(points @ k + p)
        return out * np.float32(math.sqrt(2 / len(self.k)))


@dataclass(frozen=True)
class _Pelvis:
    """Landmarks of one patient's pelvis (mm, LPS; z = 0 at the tumour centre) and its tumour."""

    body: tuple[float, float, float]  # half width, half depth, subcutaneous fat
    axis_point: np.ndarray  # a point of the rectal axis
    axis: np.ndarray  # unit vector along the rectum, cranial
    wall_radius: float
    meso_radius: float  # mesorectal fascia
    sacrum: tuple[float, float, float, float]  # centre y, half width, half depth, tilt (dy/dz)
    femoral: tuple[float, float, float]  # x offset, y, radius (spheres at z -35)
    bladder: tuple[float, float, float, float, float, float]  # centre, semi-axes
    tumour_centre: np.ndarray
    tumour_radial: np.ndarray  # unit vector from the axis towards the tumour's bulk
    tumour_semi: tuple[float, float]  # along the axis, radial extent from its centre
    necrosis: float  # necrotic core radius (normalised)
    shape: _Waves  # lobulation
    t2_texture: _Waves
    adc_texture: _Waves
    t2_amplitude: float  # relative
    adc_amplitude: float  # 1e-3 mm^2/s
    adc_mean: float


def _pelvis(rng: np.random.Generator, c: _Clinical, tilt: float) -> _Pelvis:
    a, b = rng.uniform(150, 185), rng.uniform(110, 135)
    axis = np.array([0.0, math.sin(tilt + rng.normal(0, 0.04)), math.cos(tilt)], np.float64)
    axis /= np.linalg.norm(axis)
    wall, meso = rng.uniform(11, 14), rng.uniform(34, 42)
    axis_point = np.array([rng.uniform(-6, 6), rng.uniform(25, 38), 0.0])
    length = rng.uniform(*{2: (22, 32), 3: (30, 48), 4: (42, 60)}[c.ct_stage])
    # Radial extent: T2 stays in the wall, T3 grows into the mesorectum, MRF+ / T4 reach the fascia.
    if c.mrf or c.ct_stage == 4:
        reach = meso + rng.uniform(0.5, 3)
    elif c.ct_stage == 3:
        reach = wall + rng.uniform(3, 0.7 * (meso - wall))
    else:
        reach = wall + rng.uniform(-1, 0.5)
    angle = rng.uniform(0, 2 * np.pi)
    perp1 = np.cross(axis, [1.0, 0, 0])
    perp1 /= np.linalg.norm(perp1)
    perp2 = np.cross(axis, perp1)
    radial = math.cos(angle) * perp1 + math.sin(angle) * perp2
    # The tumour's centre sits off the axis towards its bulk: half its reach, so the far side keeps the lumen.
    offset = 0.45 * reach
    centre = axis_point + offset * radial
    semi_radial = reach - offset
    h = c.adc_heterogeneity
    return _Pelvis(
        body=(a, b, rng.uniform(10, 25)), axis_point=axis_point, axis=axis, wall_radius=wall, meso_radius=meso,
        sacrum=(axis_point[1] + meso + rng.uniform(12, 20), rng.uniform(40, 55), rng.uniform(12, 18),
                rng.uniform(0.2, 0.5)),
        femoral=(rng.uniform(85, 100), rng.uniform(-5, 10), rng.uniform(22, 27)),
        bladder=(rng.uniform(-10, 10), axis_point[1] - meso - rng.uniform(25, 35), rng.uniform(20, 40),
                 rng.uniform(35, 50), rng.uniform(22, 32), rng.uniform(25, 35)),
        tumour_centre=centre, tumour_radial=radial, tumour_semi=(length / 2, semi_radial),
        necrosis=max(0.0, 1.15 * (h - 0.4)),
        shape=_Waves.draw(rng, 9.0, 16),
        t2_texture=_Waves.draw(rng, 1.2 + 3.0 * c.t2_texture),
        adc_texture=_Waves.draw(rng, 2.0 + 3.0 * h),
        t2_amplitude=0.04 + 0.3 * c.t2_texture,
        adc_amplitude=0.04 + 0.3 * h,
        adc_mean=float(rng.uniform(0.8, 1.0)),
    )


def _tissue(p: _Pelvis, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue class of every point (..., 3) and the tumour's normalised radius there (inf outside it)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    a, b, fat_rim = p.body
    tissue = np.full(x.shape, AIR, np.uint8)
    tissue[(x / a) ** 2 + (y / b) ** 2 <= 1] = FAT
    tissue[(x / (a - fat_rim)) ** 2 + (y / (b - fat_rim)) ** 2 <= 1] = MUSCLE
    rel = points - p.axis_point
    along = rel @ p.axis
    rho = np.linalg.norm(rel - along[..., None] * p.axis, axis=-1)
    tissue[rho < p.meso_radius + 1.5] = FASCIA
    tissue[rho < p.meso_radius] = FAT
    tissue[rho < p.wall_radius] = WALL
    tissue[rho < p.wall_radius - 4] = LUMEN
    sy, sw, sd, stilt = p.sacrum
    tissue[((x / sw) ** 2 + ((y - sy - stilt * z) / sd) ** 2) <= 1] = MARROW
    fx, fy, fr = p.femoral
    for side in (-1, 1):
        tissue[(x - side * fx) ** 2 + (y - fy) ** 2 + (z + 35) ** 2 <= fr**2] = MARROW
    bx, by, bz, ba, bb, bc = p.bladder
    tissue[((x - bx) / ba) ** 2 + ((y - by) / bb) ** 2 + ((z - bz) / bc) ** 2 <= 1] = URINE
    rel_t = points - p.tumour_centre
    t_along = rel_t @ p.axis
    t_rho = np.linalg.norm(rel_t - t_along[..., None] * p.axis, axis=-1)
    radius = np.sqrt((t_along / p.tumour_semi[0]) ** 2 + (t_rho / p.tumour_semi[1]) ** 2)
    near = radius < 1.3
    radius = np.where(near, radius, np.inf).astype(np.float32)
    if near.any():
        radius[near] += np.float32(0.1) * p.shape(points[near].astype(np.float32))
    tumour = (radius < 1) & np.isin(tissue, (WALL, LUMEN, FAT, FASCIA))
    tissue[tumour] = TUMOUR
    tissue[tumour & (radius < p.necrosis)] = NECROSIS
    return tissue, radius


def _properties(p: _Pelvis, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tissue, T2W signal, b0 signal, ADC) at every point, tumour textures included."""
    tissue, _ = _tissue(p, points)
    t2, b0, adc = _T2[tissue], _B0[tissue], _ADC[tissue]
    inside = tissue == TUMOUR
    if inside.any():
        q = points[inside].astype(np.float32)
        t2[inside] *= 1 + np.float32(p.t2_amplitude) * p.t2_texture(q)
        adc[inside] = np.float32(p.adc_mean) + np.float32(p.adc_amplitude) * p.adc_texture(q)
        np.clip(adc, 0.3, None, out=adc)
    return tissue, t2, b0, adc


# ---------------------------------------------------------------------------------------------
# Grids and image formation.
# ---------------------------------------------------------------------------------------------
def _series_grid(centre: np.ndarray, matrix: int, pixel: float, thickness: float, slices: int,
                 tilt: tuple[float, float]) -> ct._Grid:
    """A grid of `slices` planes tilted by (sin, cos) about the left-right axis, centred on `centre`."""
    s, c = tilt
    # columns of the direction: i along x, j along (0, c, -s), k (slice normal) along (0, s, c)
    direction = (1.0, 0.0, 0.0, 0.0, c, s, 0.0, -s, c)
    half = np.array([(matrix - 1) / 2 * pixel, (matrix - 1) / 2 * pixel, (slices - 1) / 2 * thickness])
    origin = centre - np.asarray(direction).reshape(3, 3) @ half
    # positions on a 1/64 mm lattice: exact in DS text and float32 headers
    origin = np.round(origin * 64) / 64
    return ct._Grid(shape=(slices, matrix, matrix), spacing=(pixel, pixel, thickness),
                    origin=tuple(float(v) for v in origin), direction=direction)


def _sample(p: _Pelvis, grid: ct._Grid, sub: int = 3):
    """Mean T2W, b0 and ADC over `sub` samples across each voxel's slice thickness; the tumour mask at voxel
    centres (what a reader outlines); all (z, y, x)."""
    nz, ny, nx = grid.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    if sub % 2 == 0:
        raise ValueError("an odd number of samples across the slice: the middle one is the voxel centre")
    sums = [np.zeros(grid.shape, np.float32) for _ in range(3)]
    mask = None
    for offset in np.linspace(-1 / 3, 1 / 3, sub):
        tissue, t2, b0, adc = _properties(p, grid.physical(i, j, k + offset).astype(np.float32))
        for acc, value in zip(sums, (t2, b0, adc)):
            acc += value
        if abs(offset) < 1e-9:
            mask = np.isin(tissue, (TUMOUR, NECROSIS))
    return [s / sub for s in sums], mask


def _bias(rng: np.random.Generator, grid: ct._Grid, amplitude: float) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field (log-normal, ~200 mm wavelength)."""
    nz, ny, nx = grid.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    pts = grid.physical(i, j, k).astype(np.float32) / np.float32(120.0)
    field = ct._smooth_field(rng, pts[..., 0], pts[..., 1], pts[..., 2], waves=4, max_frequency=1.5)
    return np.exp(np.float32(amplitude) * field)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator, response=None) -> np.ndarray:
    """Magnitude image of a complex signal with Gaussian noise of `sigma` per channel; `response(channel)`: the
    reconstruction's in-plane filter, applied to both channels (signal and noise alike) before the magnitude."""
    real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
    if response is not None:
        real, imag = response(real), response(imag)
    return np.sqrt(real**2 + imag**2)


def _stored(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


B_VALUES = (0, 800)


@dataclass(frozen=True)
class _Images:
    t2_grid: ct._Grid
    dwi_grid: ct._Grid
    t2: np.ndarray  # uint16
    dwi: dict[int, np.ndarray]  # b -> uint16
    adc: np.ndarray  # uint16, 1e-6 mm^2/s
    mask: np.ndarray  # uint8 tumour mask on the T2W grid


def _render(p: _Pelvis, profile: MRCenterProfile, preset: _SizePreset, tilt, downsample: int,
            rng: np.random.Generator) -> _Images:
    centre = p.tumour_centre + rng.normal(0, 3, 3)  # the radiographer centres the slab on the tumour
    t2_grid = _series_grid(np.round(centre * 4) / 4, preset.t2_matrix // downsample, profile.t2_pixel * downsample,
                           profile.t2_thickness, preset.t2_slices, tilt)
    dwi_centre = np.round((centre + rng.normal(0, 4, 3)) * 4) / 4
    dwi_grid = _series_grid(dwi_centre, preset.dwi_matrix // downsample, profile.dwi_pixel * downsample,
                            profile.dwi_thickness, preset.dwi_slices, (0.0, 1.0))
    (t2, _, _), mask = _sample(p, t2_grid)
    t2 *= _bias(rng, t2_grid, profile.bias_amplitude)
    t2_sigma = 1.0 / profile.snr

    def response(channel):  # the center's filter, in its own pixels (1 / downsample of this grid's)
        return ct.in_plane_response(channel, profile.psf_sigma, profile.edge_enhancement, 1.0 / downsample)

    t2 = _stored(_rician(t2, t2_sigma, rng, response) * np.float32(profile.t2_scale))
    (_, b0, adc_true), _ = _sample(p, dwi_grid)
    bias = _bias(rng, dwi_grid, profile.bias_amplitude)
    dwi_sigma = 2.0 / profile.snr  # EPI: half the SNR of the TSE
    dwi = {}
    noisy = {}
    for b in B_VALUES:
        clean = b0 * np.exp(-np.float32(b / 1000) * adc_true) * bias
        noisy[b] = _rician(clean, dwi_sigma, rng, response)
        dwi[b] = _stored(noisy[b] * np.float32(profile.dwi_scale))
    # The scanner's ADC fit from the two noisy images; background (b0 below 3 sigma) set to 0, as scanners do.
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(noisy[0] / np.maximum(noisy[800], 1e-6)) / np.float32(0.8)
    adc = np.where(noisy[0] > 3 * dwi_sigma, np.clip(adc, 0, 4.0), 0) * np.float32(profile.adc_calibration)
    return _Images(t2_grid, dwi_grid, t2, dwi, _stored(adc * 1000), mask.astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# DICOM writing: MR Image Storage as the vendors write it.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MRJob:
    seed: int
    size: str
    downsample: int
    profile: MRCenterProfile
    patient_index: int
    patient_id: str
    mask_format: str  # nifti | rtstruct | none
    labels: dict[str, int]
    ground_truth: Path


def _write_mr_series(d: ct._Delivery, kind: str, grid: ct._Grid, volumes: list[tuple[np.ndarray, float | None]],
                     image_type: tuple[str, ...], echo_time: float, repetition_time: float, scanning_sequence: str,
                     sequence_name: str, minutes: int) -> list[str]:
    """One MR Image Storage file per slice of each volume (a DWI series holds one volume per b-value, as Siemens and
    GE deliver them); returns the SOP UIDs of the first volume by slice index."""
    profile = d.job.profile
    number = profile.series_numbers[("t2w", "dwi", "adc").index(kind)]
    description = profile.series_names[("t2w", "dwi", "adc").index(kind)]
    folder = d.folder(kind, number, description)
    ds = Dataset()
    ct._patient_study_tags(ds, d.person, profile, d.study_uid)
    ds.StudyDescription = "MRI PELVIS RECTUM"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.SeriesInstanceUID = d.uid("series", kind)
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ct._minutes_after(d.person.study_time, minutes)
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.MagneticFieldStrength = _ds(profile.field_strength)
    ds.ScanningSequence = scanning_sequence.split("\\")
    ds.SequenceVariant = ["SK", "SP"] if kind != "t2w" else ["SK", "SP", "OSP"]
    ds.SequenceName = sequence_name
    ds.EchoTime = _ds(echo_time)
    ds.RepetitionTime = _ds(repetition_time)
    ds.MRAcquisitionType = "2D"
    ds.ReceiveCoilName = "Body18" if profile.manufacturer == "SIEMENS" else "TORSOPA"
    ds.BodyPartExamined = "PELVIS"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = d.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = _ds(grid.spacing[2])
    ds.SpacingBetweenSlices = _ds(grid.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImageOrientationPatient = [_ds(v) for v in (*grid.direction[0::3], *grid.direction[1::3])]
    ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    order = list(range(grid.shape[0]))[:: -1 if profile.head_first else 1]
    first_uids = [""] * grid.shape[0]
    instance = 0
    for v, (volume, b_value) in enumerate(volumes):
        if b_value is not None:
            _write_b_value(ds, profile.b_value_tag, b_value)
        for k in order:
            instance += 1
            sop_uid = d.uid(kind, v, k)
            ds.file_meta = ct._file_meta(MRImageStorage, sop_uid)
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            ds.ImagePositionPatient = [_ds(float(c)) for c in grid.physical(0, 0, k)]
            ds.SliceLocation = _ds(float(grid.physical(0, 0, k)[2]))
            ds.PixelData = volume[k].astype("<u2").tobytes()
            ds.save_as(folder / d.namer(sop_uid, "MR"), enforce_file_format=True)
            if v == 0:
                first_uids[k] = sop_uid
    return first_uids


def _write_b_value(ds: Dataset, tag: str, b_value: float) -> None:
    if tag == "standard":
        ds.DiffusionBValue = float(b_value)
        return
    group, creator, offset, vr = _B_VALUE_TAGS[tag]
    block = ds.private_block(group, creator, create=True)
    # GE writes four values, the first the b-value (+1e9 on some software versions; not here)
    block.add_new(offset, vr, [str(int(b_value)), "8", "0", "0"] if tag == "ge" else str(int(b_value)))


_RT_ROIS = (("GTV_rectum", "tumour", "GTV", [255, 0, 0]),)


def _deliver(job: _MRJob, images: _Images, person) -> None:
    profile = job.profile
    files_rng = ct._patient_rngs(job.seed, 100 + profile.index, job.patient_index)[ct._FILES]
    n_files = images.t2_grid.shape[0] + 3 * images.dwi_grid.shape[0] + 1
    d = ct._Delivery(job=job, person=person, study_uid=ct._uid(job.seed, "mri", profile.index, job.patient_index),
                     frame_uid=ct._uid(job.seed, "mri-frame", profile.index, job.patient_index),
                     patient_dir=profile.dicom_root / job.patient_id,
                     namer=ct._FileNamer(profile.naming, files_rng, n_files))
    t2_seq, dwi_seq = profile.sequence_names
    t2_uids = _write_mr_series(d, "t2w", images.t2_grid, [(images.t2, None)], ("ORIGINAL", "PRIMARY", "M", "NORM"),
                               95.0, 4200.0, "SE", t2_seq, 5)
    _write_mr_series(d, "dwi", images.dwi_grid, [(images.dwi[b], float(b)) for b in B_VALUES],
                     ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), 62.0, 4800.0, "EP", dwi_seq, 12)
    _write_mr_series(d, "adc", images.dwi_grid, [(images.adc, None)], profile.adc_image_type, 62.0, 4800.0, "EP",
                     dwi_seq, 12)
    if job.mask_format == "nifti":
        path = d.patient_dir / "segmentation" / profile.seg_name.format(patient_id=job.patient_id)
        ct._write_label_map(path, images.mask * np.uint8(job.labels["tumour"]), images.t2_grid)
    elif job.mask_format == "rtstruct":
        ct._write_rtstruct(d, images.mask * np.uint8(job.labels["tumour"]), images.t2_grid, t2_uids,
                           profile.series_numbers[0], roi_spec=_RT_ROIS, image_class=MRImageStorage, series_kind="t2w",
                           structure_set_name="Rectal tumour")


def _clinical_row(job: _MRJob, person, c: _Clinical, o: _Outcome, missing) -> dict[str, str]:
    row = {
        "patient_id": job.patient_id, "patient_name": person.clinical_name, "birth_date": person.birth_date.isoformat(),
        "age": str(person.age), "sex": person.sex, "tumour_site": c.site, "tumour_height_cm": f"{c.tumour_height_cm:.1f}",
        "cea": f"{c.cea:.1f}", "ca19_9": f"{c.ca19_9:.1f}", "ct_stage": f"T{c.ct_stage}", "cn_stage": f"N{c.cn_stage}",
        "mrf": str(c.mrf), "emvi": str(c.emvi), "synchronous_lm": str(o.synchronous_lm),
        "dmfs_months": f"{o.dmfs_months:.1f}", "dmfs_event": str(o.dmfs_event),
    }
    for column in missing:
        row[column] = ""
    return row


def _generate_patient(job: _MRJob) -> dict:
    rngs = ct._patient_rngs(job.seed, 100 + job.profile.index, job.patient_index)
    clinical_rng, anatomy_rng, noise_rng = rngs[ct._CLINICAL], rngs[ct._ANATOMY], rngs[ct._NOISE]
    person = ct._person(clinical_rng, job.patient_id)
    c = _clinical(clinical_rng)
    risk = _latent_risk(c)
    o = _outcome(clinical_rng, risk)
    missing = [col for col in _MISSABLE if clinical_rng.random() < job.profile.missing_rate[col]]
    tilt = _TILTS[int(anatomy_rng.integers(len(_TILTS)))]
    pelvis = _pelvis(anatomy_rng, c, math.atan2(tilt[0], tilt[1]))
    images = _render(pelvis, job.profile, _SIZES[job.size], tilt, job.downsample, noise_rng)
    _deliver(job, images, person)
    truth_mask = job.ground_truth / "masks" / job.profile.id / f"{job.patient_id}.nii.gz"
    ct._write_label_map(truth_mask, images.mask * np.uint8(job.labels["tumour"]), images.t2_grid)
    return {
        "center": job.profile.id,
        "clinical": _clinical_row(job, person, c, o, missing),
        "truth": {
            "center": job.profile.id, "role": job.profile.role, "patient_id": job.patient_id,
            "latent_risk": f"{risk:.6f}", "adc_heterogeneity": f"{c.adc_heterogeneity:.6f}",
            "t2_texture": f"{c.t2_texture:.6f}", "tumour_voxels": str(int(images.mask.sum())),
            "synchronous_lm": str(o.synchronous_lm), "dmfs_months": f"{o.dmfs_months:.1f}",
            "dmfs_event": str(o.dmfs_event), "annotated": str(int(job.mask_format != "none")),
            "mask_format": job.mask_format,
        },
        "phi": [(job.profile.id, job.patient_id, f, v) for f, v in ct._phi_rows(person, job.profile)],
    }


_README = (
    "Ground truth of the synthetic rectal MRI demo cohort (radstudy.demo.mri). The pipeline must never read this "
    "folder.\npatients.tsv: latent risk, tumour phenotypes (adc_heterogeneity, t2_texture) and outcomes; phi.tsv: "
    "every identifying value written; masks/: true tumour masks on the T2W grid; oracle.json: AUC and C-index of "
    "the latent risk; centers.json: scanner and delivery conventions per center.\n")
_TRUTH_COLUMNS = ("center", "role", "patient_id", "latent_risk", "adc_heterogeneity", "t2_texture", "tumour_voxels",
                  "synchronous_lm", "dmfs_months", "dmfs_event", "annotated", "mask_format")


def generate_mri_cohort(centers: list[dict], out_dir: str | Path, *, seed: int, patients=(30, 40),
                        size: str = "small", annotated_fraction: float = 1.0, labels: dict[str, int] | None = None,
                        workers: int = 1, _downsample: int = 1) -> dict:
    """Generate the synthetic multicenter rectal MRI cohort (see the module's docstring).

    centers: [{"id", "role", "dicom_root", "clinical"}]; patients: a count per center or a (min, max) range;
    annotated_fraction: share of each center's patients delivered with a manual tumour mask (as the center delivers
    masks: NIfTI label map or RTSTRUCT); the others have none. labels: {"tumour": value}. Returns a summary with the
    oracle metrics of the latent risk.
    """
    labels = dict(LABELS if labels is None else labels)
    if set(labels) != {"tumour"} or not all(isinstance(v, int) and 1 <= v <= 255 for v in labels.values()):
        raise ConfigError(f"demo (mri): labels must map 'tumour' to an integer 1-255, got {labels!r}")
    ct._check_arguments(centers, seed, patients, "small", annotated_fraction, 0, 0, None, workers, 1)
    if size not in _SIZES:
        raise ConfigError(f"demo: size must be one of {sorted(_SIZES)}, got {size!r}")
    if _downsample < 1 or _SIZES[size].dwi_matrix // _downsample < 16:
        raise ConfigError(f"demo: _downsample must be >= 1 and leave >= 16 DWI pixels, got {_downsample!r}")
    gt = Path(out_dir) / "ground_truth"
    for folder in [gt, *(Path(c["dicom_root"]) for c in centers)]:
        ct._require_empty(folder)
    profiles = _center_profiles(centers, seed, size)
    rng = _rng(seed, ct._COHORT, 10)
    counts = [patients if isinstance(patients, int) else int(rng.integers(patients[0], patients[1] + 1))
              for _ in profiles]
    numbers = rng.choice(9_000_000, size=sum(counts), replace=False) + 1_000_000
    jobs, offset = [], 0
    for profile, n in zip(profiles, counts):
        annotated = set(rng.permutation(n)[: round(annotated_fraction * n)].tolist())
        for i in range(n):
            jobs.append(_MRJob(seed, size, _downsample, profile, i, f"{profile.id_prefix}{numbers[offset + i]}",
                               profile.mask_format if i in annotated else "none", labels, gt))
        offset += n
    records = ct._generate_all(_generate_patient, jobs, workers)
    for profile in profiles:
        ct._write_table(profile.clinical, _CLINICAL_COLUMNS,
                        [r["clinical"] for r in records if r["center"] == profile.id], ",")
    oracle = ct._oracle_metrics([r["truth"] for r in records], time="dmfs_months", event="dmfs_event")
    settings = {"kind": "mri", "seed": seed, "size": size, "annotated_fraction": annotated_fraction,
                "labels": labels, "downsample": _downsample, "risk_weights": _RISK_WEIGHTS}
    ct._write_ground_truth(gt, profiles, records, oracle, settings, readme=_README, columns=_TRUTH_COLUMNS)
    return {
        "seed": seed, "size": size, "kind": "mri",
        "patients": {p.id: counts[i] for i, p in enumerate(profiles)},
        "annotated": {p.id: {p.mask_format: sum(1 for j in jobs if j.profile.id == p.id and j.mask_format != "none")}
                      for p in profiles},
        "oracle": {"overall": oracle["overall"], "centers": oracle["centers"]},
        "ground_truth": str(gt),
    }
