"""Radiomic features (pyradiomics) per patient: one row per patient, one block of columns per region and channel.

Column names are `{region}_{channel}_{imagetype}_{class}_{feature}`, e.g. `tumour_CT_original_firstorder_Mean`,
`liver_CT_wavelet-LLH_glcm_Contrast`, `tumour_CT_log-sigma-2-0-mm-3D_glszm_ZonePercentage`. Shape features do not
depend on the image, so they are written once, for the first (reference) channel.

Pipeline per patient (`extract_patient`), free of global state so that patients run as independent jobs:

1. The label mask is read once and split into binary regions (`derive_regions`): one per configured label, plus
   derived regions (a peritumoural ring in mm, a subtraction, union or intersection of other regions).
2. Each channel image is read once. For every region the image and the region mask are cropped to the region's
   bounding box plus a margin that exceeds the support of every filter (LoG sigma, wavelet length, interpolation);
   pyradiomics' filters then run on the crop only, so memory stays bounded on 512x512x150 CTs (a wavelet
   decomposition of the whole volume is pyradiomics' known out-of-memory case).
3. Resampling, when the parameter file asks for it (`radstudy.resample`), is done here, IBSI-style, on a grid that is
   defined on the *whole* image (grid centres aligned, IBSI 1 section 2.4) and evaluated on the crop only: the
   features therefore do not depend on the crop. Intensities are rounded to integers after interpolation (IBSI, CT),
   the mask is interpolated linearly and thresholded at 0.5 (partial volume). pyradiomics' own resampling
   (`setting.resampledPixelSpacing`) aligns its grid to the crop's corner, i.e. its result would depend on the crop,
   so it is refused.
4. pyradiomics computes the features on the prepared crop (no diagnostics columns).

Channels that do not cover the reference grid (an MR or PET field of view smaller than the CT's) come with a
field-of-view mask (`fovs`: channel -> file, uint8 1 inside, on the channel image's grid; ingestion writes one for
such channels only). Every feature of that channel is computed on region AND field of view, and the filters never
see the fill value outside it: in the crop, outside voxels take the value of the nearest voxel inside (as beyond the
image border, where IBSI and mirp extrapolate with the nearest voxel), before resampling and filtering. The
fractions of the region and of the crop (its box + margin) outside the field of view are returned as a note
(`partly_outside_field_of_view`, with `channel`, `outside_region`, `outside_crop`); a region more than half outside
(`MAX_OUTSIDE_FOV`), or with fewer than 2 voxels inside, is a bad region of that channel only
(`outside_field_of_view`): that channel's block is NaN, the other channels' are kept.

Bad regions (empty, 1 voxel, mask outside the image, constant image, nothing left after re-segmentation, any
pyradiomics failure, region outside a channel's field of view) never crash: each gives an issue `{patient, region, reason, message}` naming the patient, the
region and the file; with `on_bad_region="nan"` that region's features are NaN, with `"exclude"` the patient's row
is flagged (`excluded`, `exclusion_reason`).

The parameter file is a pyradiomics parameter file (`setting`, `imageType`, `featureClass`) plus an optional
`radstudy:` block for the steps done here (see config/radiomics/ct.yaml).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
from scipy import ndimage

from radstudy.images import geometry, grid_differences, same_grid
from radstudy.statistics.robustness import FLAG_COLUMNS, ID_COLUMNS
from radstudy.tables import read_table

log = logging.getLogger(__name__)

BAD_REGION_POLICIES = ("nan", "exclude")
DEFAULT_MARGIN_MM = 10.0
NAME_TEMPLATE = "{region}_{channel}_{imagetype}_{class}_{feature}"

# Issue reasons (stable strings).
EMPTY_REGION = "empty_region"
SINGLE_VOXEL = "single_voxel"
OUTSIDE_IMAGE = "outside_image"
UNREADABLE_MASK = "unreadable_mask"
UNREADABLE_IMAGE = "unreadable_image"
CONSTANT_IMAGE = "constant_image"
EMPTY_AFTER_RESEGMENTATION = "empty_after_resegmentation"
TOO_SMALL_AFTER_RESAMPLING = "too_small_after_resampling"
EXTRACTION_FAILED = "extraction_failed"
FEATURES_MISSING = "features_missing"
OUTSIDE_FOV = "outside_field_of_view"
PARTLY_OUTSIDE_FOV = "partly_outside_field_of_view"
NOTES = frozenset({FEATURES_MISSING, PARTLY_OUTSIDE_FOV})  # recorded, but the region's features stand

# A region with more than this fraction of its voxels outside a channel's field of view is a bad region of that
# channel (radiomics and deep features): what is left would describe another part of the lesion.
MAX_OUTSIDE_FOV = 0.5

# Wavelet filter lengths are read from PyWavelets; LoG support is taken as 4 sigma (Gaussian tail < 1e-4).
LOG_SUPPORT_SIGMAS = 4.0

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
_RADSTUDY_DEFAULTS: dict[str, Any] = {
    "resample": None,  # {spacing: [x, y, z] mm (0 keeps the axis), interpolator, round_intensities, mask_...}
    "resegment": None,  # {range: [lo, hi], sigma: k}: range first, then mean +- k SD of what is left (IBSI)
}
_RESAMPLE_DEFAULTS: dict[str, Any] = {
    "interpolator": "linear",
    "round_intensities": True,
    "mask_interpolator": "linear",
    "mask_threshold": 0.5,
}
_FORCED_SETTINGS = {"label": 1, "additionalInfo": False}  # binary region masks; no diagnostics columns


class _BenignPyradiomicsWarnings(logging.Filter):
    """Drops pyradiomics' advice that it repeats for every region and image (not about the data)."""

    PREFIXES = ("GLCM is symmetrical, therefore Sum Average", "Fixed bin Count enabled!")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _quiet_pyradiomics() -> None:
    """pyradiomics logs at WARNING and above only (idempotent; patients stay independent)."""
    import radiomics

    radiomics.setVerbosity(logging.WARNING)
    logger = logging.getLogger("radiomics")
    logger.setLevel(logging.WARNING)
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, _BenignPyradiomicsWarnings) for f in target.filters):
            target.addFilter(_BenignPyradiomicsWarnings())


# --------------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ExtractionParams:
    """A parameter file split into pyradiomics' part and radstudy's pre-processing part."""

    pyradiomics: dict[str, Any]
    radstudy: dict[str, Any]
    source: str  # file path, or "<dict>"
    sha256: str

    @property
    def setting(self) -> dict[str, Any]:
        return self.pyradiomics.get("setting") or {}

    @property
    def resample(self) -> dict[str, Any] | None:
        return self.radstudy.get("resample")


def load_params(params: str | Path | Mapping | ExtractionParams) -> ExtractionParams:
    """Read and check a parameter file (or dict). pyradiomics validates its own part (pykwalify schema)."""
    if isinstance(params, ExtractionParams):
        return params
    if isinstance(params, Mapping):
        raw = copy.deepcopy(dict(params))
        source = "<dict>"
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    else:
        path = Path(params)
        data = path.read_bytes()
        raw = yaml.safe_load(data) or {}
        source = str(path)
        digest = hashlib.sha256(data).hexdigest()
    if not isinstance(raw, dict):
        raise TypeError(f"{source}: a radiomics parameter file must be a mapping")
    rs = dict(_RADSTUDY_DEFAULTS)
    rs.update(raw.pop("radstudy", None) or {})
    unknown = set(rs) - set(_RADSTUDY_DEFAULTS)
    if unknown:
        raise ValueError(f"{source}: unknown keys in radstudy: {sorted(unknown)} (known: {sorted(_RADSTUDY_DEFAULTS)})")
    if rs["resample"] is not None:
        rs["resample"] = _check_resample(rs["resample"], source)
    if rs["resegment"] is not None:
        rs["resegment"] = _check_resegment(rs["resegment"], source)
    setting = dict(raw.get("setting") or {})
    for key in ("resampledPixelSpacing", "interpolator"):
        if setting.get(key) is not None:
            raise ValueError(
                f"{source}: setting.{key} is not supported: pyradiomics aligns its resampling grid to the crop, so the "
                "features would depend on the crop; use radstudy.resample (IBSI grid on the whole image) instead"
            )
    if rs["resegment"] is not None and setting.get("resegmentRange") is not None:
        raise ValueError(f"{source}: give either setting.resegmentRange or radstudy.resegment, not both")
    setting.update(_FORCED_SETTINGS)
    raw["setting"] = setting
    raw.setdefault("imageType", {"Original": {}})
    ep = ExtractionParams(pyradiomics=raw, radstudy=rs, source=source, sha256=digest)
    _new_extractor(ep)  # validates pyradiomics' part now, with the file named in the error
    return ep


def _check_resample(r: Mapping, source: str) -> dict[str, Any]:
    out = dict(_RESAMPLE_DEFAULTS)
    out.update(r)
    unknown = set(out) - set(_RESAMPLE_DEFAULTS) - {"spacing"}
    if unknown:
        raise ValueError(f"{source}: unknown keys in radstudy.resample: {sorted(unknown)}")
    spacing = out.get("spacing")
    if not isinstance(spacing, (list, tuple)) or len(spacing) != 3 or any(float(s) < 0 for s in spacing):
        raise ValueError(f"{source}: radstudy.resample.spacing must be 3 values >= 0 (mm; 0 keeps that axis)")
    out["spacing"] = [float(s) for s in spacing]
    for key in ("interpolator", "mask_interpolator"):
        if out[key] not in _INTERPOLATORS:
            raise ValueError(f"{source}: radstudy.resample.{key} must be one of {sorted(_INTERPOLATORS)}")
    if not 0 < float(out["mask_threshold"]) <= 1:
        raise ValueError(f"{source}: radstudy.resample.mask_threshold must be in (0, 1]")
    out["mask_threshold"] = float(out["mask_threshold"])
    out["round_intensities"] = bool(out["round_intensities"])
    return out


def _check_resegment(r: Mapping, source: str) -> dict[str, Any]:
    unknown = set(r) - {"range", "sigma"}
    if unknown:
        raise ValueError(f"{source}: unknown keys in radstudy.resegment: {sorted(unknown)}")
    out: dict[str, Any] = {"range": None, "sigma": None}
    if r.get("range") is not None:
        lo, hi = (float(v) for v in r["range"])
        if lo > hi:
            raise ValueError(f"{source}: radstudy.resegment.range must be [low, high]")
        out["range"] = [lo, hi]
    if r.get("sigma") is not None:
        out["sigma"] = float(r["sigma"])
        if out["sigma"] <= 0:
            raise ValueError(f"{source}: radstudy.resegment.sigma must be > 0")
    return out


def _new_extractor(ep: ExtractionParams):
    from radiomics import featureextractor

    _quiet_pyradiomics()
    with warnings.catch_warnings():
        # pykwalify loads pyradiomics' schema functions with the deprecated importlib load_module()
        warnings.filterwarnings("ignore", message="the load_module", category=DeprecationWarning)
        return featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(ep.pyradiomics))


def feature_names(params: str | Path | Mapping | ExtractionParams, *, shape: bool = True) -> list[str]:
    """`{imagetype}_{class}_{feature}` names that pyradiomics yields for these parameters (deprecated features, which
    pyradiomics does not compute, are left out). Used to give bad regions a full block of NaN columns."""
    import pywt
    from radiomics import getFeatureClasses

    ep = load_params(params)
    extractor = _new_extractor(ep)
    classes = getFeatureClasses()
    setting = extractor.settings
    image_types: list[str] = []
    for itype, custom in extractor.enabledImagetypes.items():
        args = {**setting, **(custom or {})}
        if itype == "Original":
            image_types.append("original")
        elif itype == "LoG":
            image_types += [f"log-sigma-{str(s).replace('.', '-')}-mm-3D" for s in args.get("sigma", [])]
        elif itype == "Wavelet":
            n_axes = 2 if args.get("force2D", False) else 3
            levels = int(args.get("level", 1))
            pywt.Wavelet(args.get("wavelet", "coif1"))  # unknown wavelets fail here, as in pyradiomics
            for idx in range(1, levels + 1):
                prefix = "wavelet" if idx == 1 else f"wavelet{idx}"
                for combo in itertools.product("LH", repeat=n_axes):
                    if "H" in combo:
                        image_types.append(f"{prefix}-{''.join(combo)}")
            image_types.append(("wavelet" if levels == 1 else f"wavelet{levels}") + "-" + "L" * n_axes)
        elif itype in ("Square", "SquareRoot", "Logarithm", "Exponential", "Gradient"):
            image_types.append(itype.lower())
        else:
            raise ValueError(
                f"{ep.source}: image type {itype} is not supported by radstudy "
                "(Original, LoG, Wavelet, Square, SquareRoot, Logarithm, Exponential, Gradient)"
            )
    names: list[str] = []
    enabled = extractor.enabledFeatures
    if shape and "shape" in enabled:
        names += [f"original_shape_{f}" for f in _class_features(classes["shape"], enabled["shape"])]
    for itype in image_types:
        for cls, feats in enabled.items():
            if cls in ("shape", "shape2D"):
                continue
            names += [f"{itype}_{cls}_{f}" for f in _class_features(classes[cls], feats)]
    return names


def _class_features(cls, enabled: Sequence[str] | None) -> list[str]:
    available = cls.getFeatureNames()  # name -> deprecated
    if not enabled:
        return [f for f, deprecated in available.items() if not deprecated]
    return [f for f in enabled if not available.get(f, True)]


def channel_extraction_params(params, channel_params: Mapping | None, channels) -> dict[str, ExtractionParams]:
    """Each channel's parameters, each file read once: `channel_params[channel]` where given, else `params`. A
    channel of channel_params that is not one of `channels` is a ValueError naming it."""
    channel_params = dict(channel_params or {})
    unknown = sorted(set(map(str, channel_params)) - set(map(str, channels)))
    if unknown:
        raise ValueError(f"radiomics parameters given for channel(s) {unknown}, which are not image channels "
                         f"({', '.join(map(str, channels))})")
    loaded: dict[str, ExtractionParams] = {}

    def once(source) -> ExtractionParams:
        key = str(source) if isinstance(source, (str, Path)) else id(source)
        if key not in loaded:
            loaded[key] = load_params(source)
        return loaded[key]

    return {str(c): once(channel_params.get(str(c), params)) for c in channels}


def feature_metadata(params: str | Path | Mapping | ExtractionParams) -> dict[str, Any]:
    """Provenance written beside the feature table: versions, sha256 of the parameter file, settings actually used."""
    import pywt
    import radiomics

    ep = load_params(params)
    extractor = _new_extractor(ep)
    names = feature_names(ep)
    return _jsonable(
        {
            "pyradiomics_version": str(radiomics.__version__),
            "simpleitk_version": sitk.Version.VersionString(),
            "pywavelets_version": pywt.__version__,
            "numpy_version": np.__version__,
            "params_file": ep.source,
            "params_sha256": ep.sha256,
            "settings": dict(extractor.settings),
            "image_types": {k: dict(v or {}) for k, v in extractor.enabledImagetypes.items()},
            "feature_classes": {k: (list(v) if v else None) for k, v in extractor.enabledFeatures.items()},
            "preprocessing": ep.radstudy,
            "name_template": NAME_TEMPLATE,
            "shape_features": "first channel only",
            "features_per_region_channel": len(names),
            "crop_margin": f"max(margin_mm (default {DEFAULT_MARGIN_MM:g}), required_margin_mm(): LoG "
            f"{LOG_SUPPORT_SIGMAS:g} sigma or wavelet length, + 3 original voxels)",
        }
    )


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def required_margin_mm(params: str | Path | Mapping | ExtractionParams, spacing: Sequence[float]) -> float:
    """Crop margin (mm) that exceeds the support of every filter, for an image of this (original) spacing.

    LoG: 4 sigma. Wavelet (stationary, level L): the filter length times 2**(L-1) voxels of the (resampled) grid.
    Interpolation: 2 original voxels (cubic B-spline needs 2, linear 1) plus 1 for the mask's partial volume."""
    import pywt

    ep = load_params(params)
    setting = ep.setting
    spacing = np.asarray(spacing, float)
    grid = spacing
    if ep.resample:
        target = np.asarray(ep.resample["spacing"], float)
        grid = np.where(target > 0, target, spacing)
    support = 0.0
    for itype, custom in (ep.pyradiomics.get("imageType") or {}).items():
        args = {**setting, **(custom or {})}
        if itype == "LoG" and args.get("sigma"):
            support = max(support, LOG_SUPPORT_SIGMAS * max(float(s) for s in args["sigma"]))
        elif itype == "Wavelet":
            length = pywt.Wavelet(args.get("wavelet", "coif1")).dec_len
            levels = int(args.get("start_level", 0)) + int(args.get("level", 1))
            support = max(support, length * 2 ** (levels - 1) * float(grid.max()))
    return support + 3.0 * float(spacing.max())


# --------------------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------------------


def derive_regions(
    mask: sitk.Image, labels: Mapping[str, int], derived: Mapping | None = None
) -> dict[str, sitk.Image]:
    """Binary region masks (uint8 0/1, on the mask's grid): one per label, then the derived regions in order.

    Derived region specs (they may refer to labels and to derived regions defined before them):
      {"ring_of": "tumour", "mm": 5}                 voxels within 5 mm of the region, the region itself excluded;
      {"ring_of": "tumour", "mm": 5, "within": "liver"}   ... and restricted to another region;
      {"subtract": ["liver", "tumour", ...]}         the first region minus the others;
      {"union": [...]}, {"intersect": [...]}.
    In a label map a voxel has one label, so `liver` (label 1) already excludes the tumour (label 2); use
    {"union": ["liver", "tumour"]} for the whole organ."""
    arrays = _region_arrays(sitk.GetArrayViewFromImage(mask), mask.GetSpacing(), labels, derived)
    out = {}
    for name, arr in arrays.items():
        img = sitk.GetImageFromArray(arr.astype(np.uint8))
        img.CopyInformation(mask)
        out[name] = img
    return out


def _region_arrays(
    mask: np.ndarray,
    spacing_xyz: Sequence[float],
    labels: Mapping[str, int],
    derived: Mapping | None,
    perturbation: str | None = None,
    radius: int = 1,
) -> dict[str, np.ndarray]:
    regions: dict[str, np.ndarray] = {}
    for name, value in labels.items():
        regions[str(name)] = mask == int(value)
        if perturbation:
            regions[str(name)] = perturb_region(regions[str(name)], perturbation, radius)
    for name, spec in (derived or {}).items():
        name = str(name)
        if name in regions:
            raise ValueError(f"derived region {name!r} has the name of a label or of another region")
        regions[name] = _derive_one(name, spec, regions, spacing_xyz)
    return regions


def _derive_one(
    name: str, spec: Mapping, regions: Mapping[str, np.ndarray], spacing_xyz: Sequence[float]
) -> np.ndarray:
    def get(ref) -> np.ndarray:
        if ref not in regions:
            raise ValueError(f"derived region {name!r} refers to unknown region {ref!r} (known: {sorted(regions)})")
        return regions[ref]

    if not isinstance(spec, Mapping):
        raise TypeError(f"derived region {name!r}: spec must be a mapping, got {spec!r}")
    kinds = [k for k in ("ring_of", "subtract", "union", "intersect") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"derived region {name!r}: give exactly one of ring_of / subtract / union / intersect")
    kind = kinds[0]
    if kind == "ring_of":
        mm = float(spec.get("mm", 0))
        if mm <= 0:
            raise ValueError(f"derived region {name!r}: ring_of needs mm > 0")
        out = _ring(get(spec["ring_of"]), mm, spacing_xyz)
        if spec.get("within") is not None:
            out &= get(spec["within"])
        return out
    refs = spec[kind]
    if isinstance(refs, str) or not refs:
        raise ValueError(f"derived region {name!r}: {kind} needs a list of regions")
    arrs = [get(r) for r in refs]
    if kind == "subtract":
        out = arrs[0].copy()
        for a in arrs[1:]:
            out &= ~a
    elif kind == "union":
        out = np.logical_or.reduce(arrs)
    else:
        out = np.logical_and.reduce(arrs)
    return out


def _ring(region: np.ndarray, mm: float, spacing_xyz: Sequence[float]) -> np.ndarray:
    """Voxels whose centre lies within `mm` of a region voxel's centre, the region excluded (distance on a crop)."""
    out = np.zeros(region.shape, bool)
    if not region.any():
        return out
    spacing_zyx = np.asarray(spacing_xyz, float)[::-1]
    lo, hi = _bbox(region)
    pad = np.ceil(mm / spacing_zyx).astype(int) + 1
    lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad, np.array(region.shape) - 1)
    sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    sub = region[sl]
    dist = ndimage.distance_transform_edt(~sub, sampling=spacing_zyx)
    out[sl] = (dist > 0) & (dist <= mm + 1e-6)
    return out


def _bbox(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive bounding box of a boolean array, in array (z, y, x) order."""
    lo, hi = [], []
    for axis in range(arr.ndim):
        other = tuple(a for a in range(arr.ndim) if a != axis)
        idx = np.flatnonzero(arr.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.array(lo), np.array(hi)


def perturb_region(region: np.ndarray, how: str, radius: int = 1) -> np.ndarray:
    """Region eroded or dilated by `radius` voxels (6-connected ball, radius 1 = face neighbours)."""
    if how not in ("erode", "dilate"):
        raise ValueError(f"unknown mask perturbation {how!r} (erode or dilate)")
    structure = ndimage.generate_binary_structure(region.ndim, 1)
    if how == "erode":
        return ndimage.binary_erosion(region, structure, iterations=radius, border_value=0)
    return ndimage.binary_dilation(region, structure, iterations=radius)


# --------------------------------------------------------------------------------------------------------------------
# Geometry: crop and (IBSI) resampling
# --------------------------------------------------------------------------------------------------------------------


def _region_inside(region: np.ndarray, mask_img: sitk.Image, image: sitk.Image) -> str | None:
    """None when the region's bounding box lies within the image; otherwise 'outside' or 'partly outside'."""
    lo, hi = _bbox(region)
    corners = []
    for zyx in itertools.product(*zip(lo - 0.5, hi + 0.5)):
        point = mask_img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
        corners.append(image.TransformPhysicalPointToContinuousIndex(point))
    corners = np.array(corners)
    size = np.array(image.GetSize(), float)
    tol = 1e-3
    inside = (corners >= -0.5 - tol) & (corners <= size - 0.5 + tol)
    if inside.all():
        return None
    cmin, cmax = corners.min(axis=0), corners.max(axis=0)
    if np.any(cmax < -0.5) or np.any(cmin > size - 0.5):
        return "outside"
    return "partly outside"


def _to_image_grid(region: np.ndarray, mask_img: sitk.Image, image: sitk.Image) -> np.ndarray:
    src = sitk.GetImageFromArray(region.astype(np.uint8))
    src.CopyInformation(mask_img)
    out = sitk.Resample(src, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


@dataclass
class IbsiGrid:
    """Resampling grid of a whole image (per axis x, y, z): centres of old and new grids aligned (IBSI 1, 2.4)."""

    spacing: np.ndarray  # new spacing
    size: np.ndarray  # new size
    old_spacing: np.ndarray
    old_size: np.ndarray

    @classmethod
    def of(cls, image: sitk.Image, spacing: Sequence[float]) -> IbsiGrid:
        old_sp = np.array(image.GetSpacing(), float)
        old_n = np.array(image.GetSize(), int)
        target = np.asarray(spacing, float)
        new_sp = np.where(target > 0, target, old_sp)
        new_n = np.ceil(old_n * old_sp / new_sp - 1e-6).astype(int)
        return cls(new_sp, new_n, old_sp, old_n)

    @property
    def ratio(self) -> np.ndarray:
        return self.spacing / self.old_spacing

    def old_index(self, j) -> np.ndarray:
        """Continuous index on the old grid of new-grid index j."""
        return (self.old_size - 1) / 2 + (np.asarray(j, float) - (self.size - 1) / 2) * self.ratio

    def new_index(self, i) -> np.ndarray:
        return (np.asarray(i, float) - (self.old_size - 1) / 2) / self.ratio + (self.size - 1) / 2


@dataclass
class PreparedRegion:
    image: sitk.Image  # float32, cropped (and resampled, rounded)
    mask: sitk.Image  # uint8 0/1 on the same grid
    voxels: int  # ROI voxels after resampling
    grid_size: tuple[int, int, int]  # size of the whole-image grid the crop was cut from


def crop_box(region: np.ndarray, spacing_xyz: Sequence[float], margin_mm: float) -> tuple[slice, slice, slice]:
    """The region's bounding box plus `margin_mm` on every side, within the array (slices in z, y, x)."""
    lo, hi = _bbox(region)
    m = np.ceil(margin_mm / np.asarray(spacing_xyz, float)[::-1]).astype(int)
    a, b = np.maximum(lo - m, 0), np.minimum(hi + m, np.array(region.shape) - 1)
    return tuple(slice(int(i), int(j) + 1) for i, j in zip(a, b))


def read_fov(path: str | Path, image: sitk.Image) -> np.ndarray:
    """A channel's field-of-view mask (bool, z y x; nonzero = inside), which must lie on the channel image's grid."""
    fov = sitk.ReadImage(str(path))
    if fov.GetNumberOfComponentsPerPixel() != 1 or fov.GetDimension() != 3:
        raise ValueError("expected a 3D scalar mask")
    differences = grid_differences(fov, image, direction_tolerance=1e-4)
    if differences:
        raise ValueError("not on the image's grid: " + "; ".join(differences))
    return sitk.GetArrayFromImage(fov) > 0


def outside_share(region: np.ndarray, fov: np.ndarray) -> float:
    """Fraction of the region's voxels that lie outside the field of view (0 for an empty region)."""
    n = int(region.sum())
    return float((region & ~fov).sum()) / n if n else 0.0


def fill_outside_fov(values: np.ndarray, inside: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """`values` with every voxel outside the field of view replaced by the nearest voxel inside it (in mm), so
    that filters and interpolation never read the fill value: the field of view's edge is treated as the image's
    border is (nearest-voxel extrapolation, IBSI). `inside` must hold at least one voxel."""
    if inside.all():
        return values
    nearest = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx, return_distances=False,
                                             return_indices=True)
    return values[tuple(nearest)]


def _crop_image(image: sitk.Image, lo_xyz, hi_xyz, fov: np.ndarray | None) -> sitk.Image:
    """image[lo:hi+1] (x, y, z, inclusive) as float32, outside the field of view filled by `fill_outside_fov`."""
    img = sitk.Cast(image[lo_xyz[0] : hi_xyz[0] + 1, lo_xyz[1] : hi_xyz[1] + 1, lo_xyz[2] : hi_xyz[2] + 1],
                    sitk.sitkFloat32)
    if fov is None:
        return img
    inside = fov[lo_xyz[2] : hi_xyz[2] + 1, lo_xyz[1] : hi_xyz[1] + 1, lo_xyz[0] : hi_xyz[0] + 1]
    filled = sitk.GetImageFromArray(
        fill_outside_fov(sitk.GetArrayFromImage(img), inside, image.GetSpacing()[::-1]))
    filled.CopyInformation(img)
    return filled


def prepare_region(image: sitk.Image, region: np.ndarray, ep: ExtractionParams, margin_mm: float,
                   fov: np.ndarray | None = None) -> PreparedRegion:
    """Crop image and region mask (array in z, y, x on the image grid) to the region's bounding box plus the
    margin, resampling onto the whole-image IBSI grid if the parameters ask for it. `fov`: the channel's field of
    view (bool, z y x; None: the whole image): the region must lie within it, the image outside it is filled with
    the nearest voxel inside (`fill_outside_fov`) before anything reads it."""
    lo_zyx, hi_zyx = _bbox(region)
    lo, hi = lo_zyx[::-1].astype(float), hi_zyx[::-1].astype(float)  # x, y, z
    spacing = np.array(image.GetSpacing(), float)
    size = np.array(image.GetSize(), int)
    rs = ep.resample
    if not rs:
        box = crop_box(region, spacing, margin_mm)
        a, b = [s.start for s in box[::-1]], [s.stop - 1 for s in box[::-1]]
        img = _crop_image(image, a, b, fov)
        sub = region[box]
        msk = sitk.GetImageFromArray(sub.astype(np.uint8))
        msk.CopyInformation(img)
        return PreparedRegion(img, msk, int(sub.sum()), tuple(int(v) for v in size))

    grid = IbsiGrid.of(image, rs["spacing"])
    m_old = margin_mm / spacing
    j_lo = np.floor(grid.new_index(lo - m_old)).astype(int)
    j_hi = np.ceil(grid.new_index(hi + m_old)).astype(int)
    j_lo, j_hi = np.maximum(j_lo, 0), np.minimum(j_hi, grid.size - 1)
    pad = int(np.ceil(grid.ratio.max())) + 3
    i_lo = np.maximum(np.floor(grid.old_index(j_lo)).astype(int) - pad, 0)
    i_hi = np.minimum(np.ceil(grid.old_index(j_hi)).astype(int) + pad, size - 1)
    src = _crop_image(image, i_lo, i_hi, fov)
    # Edge replication beyond the image border (IBSI/mirp extrapolate with the nearest voxel).
    src = sitk.ZeroFluxNeumannPad(src, [pad] * 3, [pad] * 3)
    ref = sitk.Image([int(v) for v in (j_hi - j_lo + 1)], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in grid.spacing])
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in grid.old_index(j_lo)]))
    img = sitk.Resample(src, ref, sitk.Transform(), _INTERPOLATORS[rs["interpolator"]], 0.0, sitk.sitkFloat32)
    if rs["round_intensities"]:
        arr = np.round(sitk.GetArrayFromImage(img))
        rounded = sitk.GetImageFromArray(arr.astype(np.float32))
        rounded.CopyInformation(img)
        img = rounded
    sub = region[i_lo[2] : i_hi[2] + 1, i_lo[1] : i_hi[1] + 1, i_lo[0] : i_hi[0] + 1]
    msrc = sitk.GetImageFromArray(sub.astype(np.float32))
    msrc.SetSpacing(image.GetSpacing())
    msrc.SetDirection(image.GetDirection())
    msrc.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in i_lo]))
    msrc = sitk.ConstantPad(msrc, [pad] * 3, [pad] * 3, 0.0)
    mres = sitk.Resample(msrc, ref, sitk.Transform(), _INTERPOLATORS[rs["mask_interpolator"]], 0.0, sitk.sitkFloat32)
    marr = (sitk.GetArrayFromImage(mres) >= rs["mask_threshold"] - 1e-6).astype(np.uint8)
    msk = sitk.GetImageFromArray(marr)
    msk.CopyInformation(img)
    return PreparedRegion(img, msk, int(marr.sum()), tuple(int(v) for v in grid.size))


def _resegment_range(values: np.ndarray, ep: ExtractionParams) -> tuple[float, float] | None:
    """The absolute intensity range that re-segmentation keeps (None: no re-segmentation)."""
    rr = ep.radstudy.get("resegment")
    if rr:
        lo, hi = rr["range"] if rr["range"] else (-np.inf, np.inf)
        if rr["sigma"]:
            kept = values[(values >= lo) & (values <= hi)]
            if kept.size:
                mu, sd = float(kept.mean()), float(kept.std())
                lo, hi = max(lo, mu - rr["sigma"] * sd), min(hi, mu + rr["sigma"] * sd)
        return float(lo), float(hi)
    setting = ep.setting
    rng = setting.get("resegmentRange")
    if not rng:
        return None
    mode = setting.get("resegmentMode", "absolute")
    th = sorted(float(v) for v in rng)
    if mode == "relative":
        th = [float(values.max()) * t for t in th]
    elif mode == "sigma":
        th = [float(values.mean()) + float(values.std()) * t for t in th]
    if len(th) == 1:
        return th[0], np.inf
    return th[0], th[1]


# --------------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------------


class _BadRegion(Exception):
    def __init__(self, reason: str, message: str, **record):
        super().__init__(message)
        self.reason, self.record = reason, record


def within_fov(region: np.ndarray, fov: np.ndarray, spacing_xyz: Sequence[float], margin_mm: float, *, where: str,
               channel: str, fov_file: str) -> tuple[np.ndarray, dict | None]:
    """The region within a channel's field of view, and the record of what lay outside (None when nothing of the
    region or of its crop, the box + `margin_mm`, did): channel, outside_region, outside_crop (fractions) and a
    message. A region more than `MAX_OUTSIDE_FOV` outside, or with fewer than 2 voxels inside, raises _BadRegion
    (reason OUTSIDE_FOV) with the same record."""
    share = outside_share(region, fov)
    crop_share = 1.0 - float(fov[crop_box(region, spacing_xyz, margin_mm)].mean())
    inside = region & fov
    n = int(inside.sum())
    record = {"channel": channel, "outside_region": share, "outside_crop": crop_share}
    text = (f"{where}: {share:.1%} of the region and {crop_share:.1%} of its box + {margin_mm:g} mm lie outside the "
            f"field of view of {channel} ({fov_file}); {n} voxel(s) inside")
    if share > MAX_OUTSIDE_FOV or n < 2:
        raise _BadRegion(OUTSIDE_FOV, f"{text}: more than {MAX_OUTSIDE_FOV:.0%} outside or fewer than 2 voxels "
                                      f"inside, so the {channel} features of this region are NaN", **record)
    if share == 0.0 and crop_share == 0.0:
        return inside, None
    return inside, {**record, "message": f"{text}: features computed on them, the filters reading the nearest "
                                         "voxel inside in place of the outside"}


def extract_patient(
    images: Mapping[str, str | Path],
    mask: str | Path,
    *,
    patient: str,
    center: str,
    labels: Mapping[str, int],
    params: str | Path | Mapping | ExtractionParams,
    derived: Mapping | None = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
    on_bad_region: str = "nan",
    mask_perturbation: str | None = None,
    perturbation_radius: int = 1,
    fovs: Mapping[str, str | Path] | None = None,
    channel_params: Mapping[str, str | Path | Mapping | ExtractionParams] | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """One patient's feature row (patient, center, excluded, exclusion_reason, features...) and its issues.

    `channel_params`: channel -> parameter file for the channels that take their own (an MR or PET channel beside
    a CT one: a HU window and 25-HU bins would put a whole MR tumour into one or two bins); the others take
    `params`. Shape features come from the first channel's parameters.

    `images`: channel name -> image file (all channels on one grid, the first is the reference).
    `mask`: label-map file; `labels`: region name -> label value; `derived`: see `derive_regions`.
    `margin_mm`: crop margin around each region; it is raised to `required_margin_mm` when filters need more.
    `on_bad_region`: "nan" (that region's features NaN) or "exclude" (row flagged for exclusion).
    `mask_perturbation`: "erode" / "dilate" the label regions by `perturbation_radius` voxels (robustness analysis).
    `fovs`: channel -> field-of-view mask file, for the channels that do not cover the whole grid (module docstring).
    Issues about one channel's field of view also carry `channel`, `outside_region` and `outside_crop`."""
    if on_bad_region not in BAD_REGION_POLICIES:
        raise ValueError(f"on_bad_region must be one of {BAD_REGION_POLICIES}, got {on_bad_region!r}")
    if not images:
        raise ValueError(f"{patient}: no image channels given")
    _quiet_pyradiomics()
    channels = [str(c) for c in images]
    eps = channel_extraction_params(params, channel_params, channels)
    region_names = list(labels) + list(derived or {})
    per_channel = {c: feature_names(eps[c], shape=(i == 0)) for i, c in enumerate(channels)}
    values: dict[str, float] = {}
    for region in region_names:
        for c in channels:
            for n in per_channel[c]:
                values[f"{region}_{c}_{n}"] = np.nan
    issues: list[dict] = []
    bad: dict[str, str] = {}  # region, or "region (channel)" for one channel's block -> reason (exclusion flag)
    fovs = {str(c): str(f) for c, f in (fovs or {}).items()}

    def issue(region: str, reason: str, message: str, **record) -> None:
        """record: `channel` when the issue concerns that channel's block of the region only (field of view)."""
        issues.append({"patient": patient, "region": region, "reason": reason, "message": message, **record})
        log.warning(message)
        if reason not in NOTES:
            bad.setdefault(f"{region} ({record['channel']})" if "channel" in record else region, reason)

    mask_file = str(mask)
    try:
        mask_img = sitk.ReadImage(mask_file)
        if mask_img.GetNumberOfComponentsPerPixel() != 1 or mask_img.GetDimension() != 3:
            raise ValueError("expected a 3D scalar label map")
        label_arr = sitk.GetArrayFromImage(mask_img)
    except Exception as exc:  # noqa: BLE001 - any read failure is reported, never raised
        for region in region_names:
            issue(region, UNREADABLE_MASK, f"{patient}: region {region!r}: mask {mask_file} cannot be read ({exc})")
        return feature_row(patient, center, values, bad, on_bad_region), issues

    # Label regions (perturbed for robustness analyses), then the derived ones; config errors raise.
    regions = _region_arrays(label_arr, mask_img.GetSpacing(), labels, derived, mask_perturbation, perturbation_radius)
    del label_arr

    for region in region_names:
        n = int(regions[region].sum())
        if n == 0:
            what = f"label {labels[region]}" if region in labels else "derived region"
            issue(
                region,
                EMPTY_REGION,
                f"{patient}: region {region!r} is empty (no voxel of the {what}) in mask {mask_file}",
            )
        elif n == 1:
            issue(
                region, SINGLE_VOXEL, f"{patient}: region {region!r} has a single voxel in mask {mask_file}; no texture"
            )

    ref_grid: tuple | None = None  # geometry the regions were brought onto
    on_grid: dict[str, np.ndarray] = {}
    for ci, channel in enumerate(channels):
        image_file = str(images[channel])
        todo = [r for r in region_names if r not in bad]
        if not todo:
            break
        try:
            image = sitk.ReadImage(image_file)  # once per channel, for all regions
            if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
                raise ValueError("expected a 3D scalar image")
        except Exception as exc:  # noqa: BLE001
            for region in todo:
                issue(
                    region,
                    UNREADABLE_IMAGE,
                    f"{patient}: region {region!r}: image {image_file} ({channel}) cannot be read ({exc})",
                )
            continue
        if ref_grid is None or not same_grid(ref_grid, image, direction_tolerance=1e-4):
            ref_grid = geometry(image)
            on_grid = {}
            same = same_grid(mask_img, image, direction_tolerance=1e-4)
            for region in todo:
                if same:
                    on_grid[region] = regions[region]
                    continue
                where = _region_inside(regions[region], mask_img, image)
                if where:
                    issue(
                        region,
                        OUTSIDE_IMAGE,
                        f"{patient}: region {region!r} of mask {mask_file} lies {where} the image {image_file}",
                    )
                    continue
                on_grid[region] = _to_image_grid(regions[region], mask_img, image)
        fov = None
        if channel in fovs:
            try:
                fov = read_fov(fovs[channel], image)
            except Exception as exc:  # noqa: BLE001 - reported, never raised
                for region in todo:
                    issue(region, UNREADABLE_IMAGE, f"{patient}: region {region!r}: field-of-view mask {fovs[channel]} "
                                                     f"of image {image_file} ({channel}) cannot be used ({exc})",
                          channel=channel)
                continue
        ep = eps[channel]
        margin = max(float(margin_mm), required_margin_mm(ep, image.GetSpacing()))
        extractor = _new_extractor(ep)
        if ci > 0 and "shape" in extractor.enabledFeatures:
            del extractor.enabledFeatures["shape"]
        base_settings = dict(extractor.settings)
        for region in todo:
            if region in bad or region not in on_grid:
                continue
            where = f"{patient}: region {region!r}, image {image_file} ({channel})"
            try:
                used = on_grid[region]
                if fov is not None and used.any():
                    used, note = within_fov(used, fov, image.GetSpacing(), margin, where=where, channel=channel,
                                            fov_file=fovs[channel])
                    if note:
                        issue(region, PARTLY_OUTSIDE_FOV, **note)
                feats = _extract_region(extractor, base_settings, image, used, ep, margin, where, fov)
            except _BadRegion as exc:
                issue(region, exc.reason, str(exc), **exc.record)
                continue
            except Exception as exc:  # noqa: BLE001 - pyradiomics failures become issues
                issue(
                    region,
                    EXTRACTION_FAILED,
                    f"{patient}: region {region!r}, image {image_file} ({channel}): pyradiomics failed: {exc}",
                )
                continue
            missing = []
            for name in per_channel[channel]:
                key = f"{region}_{channel}_{name}"
                if name in feats:
                    values[key] = feats[name]
                else:
                    missing.append(name)
            if missing:
                issue(
                    region,
                    FEATURES_MISSING,
                    f"{patient}: region {region!r}, image {image_file} ({channel}): {len(missing)} features not "
                    f"computed (e.g. {missing[0]}); left NaN",
                )
        del image
    # Regions that failed after others succeeded keep NaN for all channels (a failed channel block stayed NaN).
    for region in (r for r in region_names if r in bad):
        for c in channels:
            for n in per_channel[c]:
                values[f"{region}_{c}_{n}"] = np.nan
    return feature_row(patient, center, values, bad, on_bad_region), issues


def _extract_region(
    extractor,
    base_settings: dict,
    image: sitk.Image,
    region: np.ndarray,
    ep: ExtractionParams,
    margin: float,
    where: str,
    fov: np.ndarray | None = None,
) -> dict[str, float]:
    if not region.any():
        raise _BadRegion(EMPTY_REGION, f"{where}: region is empty on the image grid")
    prep = prepare_region(image, region, ep, margin, fov)
    if prep.voxels < 2:
        raise _BadRegion(
            TOO_SMALL_AFTER_RESAMPLING,
            f"{where}: {prep.voxels} voxel(s) on the "
            + (f"{ep.resample['spacing']} mm grid" if ep.resample else "image grid"),
        )
    vals = sitk.GetArrayViewFromImage(prep.image)[sitk.GetArrayViewFromImage(prep.mask) > 0]
    settings = dict(base_settings)
    rng = _resegment_range(vals, ep)
    if rng is not None:
        kept = vals[(vals >= rng[0]) & (vals <= rng[1])]
        if kept.size < 2:
            raise _BadRegion(
                EMPTY_AFTER_RESEGMENTATION,
                f"{where}: {kept.size} voxel(s) left after re-segmentation to [{rng[0]:g}, {rng[1]:g}]",
            )
        vals = kept
        if ep.radstudy.get("resegment"):
            settings["resegmentRange"] = [rng[0], rng[1]]
            settings["resegmentMode"] = "absolute"
    if float(np.ptp(vals)) == 0.0:
        raise _BadRegion(CONSTANT_IMAGE, f"{where}: the image is constant ({float(vals[0]):g}) inside the region")
    extractor.settings = settings
    result = extractor.execute(prep.image, prep.mask, label=1)
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def feature_row(patient: str, center: str, values: dict[str, float], bad: dict[str, str], policy: str) -> pd.DataFrame:
    """One patient's feature row: ids, the exclusion flags (excluded when `policy` is "exclude" and a region is
    bad; `bad`: region -> reason) and the feature values as float64."""
    excluded = policy == "exclude" and bool(bad)
    reason = "; ".join(f"{r}: {why}" for r, why in bad.items()) if excluded else ""
    row: dict[str, Any] = {"patient": patient, "center": center, "excluded": excluded, "exclusion_reason": reason}
    row.update(values)
    df = pd.DataFrame([row])
    feats = [c for c in df.columns if c not in ID_COLUMNS + FLAG_COLUMNS]
    df[feats] = df[feats].astype("float64")
    return df


# --------------------------------------------------------------------------------------------------------------------
# Study table
# --------------------------------------------------------------------------------------------------------------------


def read_row(path: str | Path) -> pd.DataFrame:
    df = read_table(path, id_columns=())
    if Path(path).suffix != ".parquet" and "exclusion_reason" in df:
        df["exclusion_reason"] = df["exclusion_reason"].fillna("").astype(str)
    return df


def write_row(row: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        row.to_parquet(path, index=False)
    else:
        row.to_csv(path, sep="," if path.suffix == ".csv" else "\t", index=False)


def study_table(rows: Iterable[pd.DataFrame] | Iterable[str | Path]) -> pd.DataFrame:
    """Patients x features: patient, center (and the exclusion flags) first, then the features in sorted order;
    rows sorted by patient. Rows may be DataFrames or files (.parquet, .tsv, .csv) written by `write_row`."""
    frames = [r if isinstance(r, pd.DataFrame) else read_row(r) for r in rows]
    if not frames:
        return pd.DataFrame(columns=list(ID_COLUMNS + FLAG_COLUMNS))
    table = pd.concat(frames, ignore_index=True, sort=False)
    for col in ID_COLUMNS:
        if col not in table:
            raise ValueError(f"feature rows lack the {col!r} column")
    dup = table["patient"][table["patient"].duplicated()].tolist()
    if dup:
        raise ValueError(f"patients appear more than once: {sorted(set(dup))}")
    if "excluded" not in table:
        table["excluded"] = False
    if "exclusion_reason" not in table:
        table["exclusion_reason"] = ""
    table["excluded"] = table["excluded"].fillna(False).astype(bool)
    table["exclusion_reason"] = table["exclusion_reason"].fillna("").astype(str)
    front = list(ID_COLUMNS + FLAG_COLUMNS)
    features = sorted(c for c in table.columns if c not in front)
    table = table[front + features].sort_values(["patient", "center"], kind="stable").reset_index(drop=True)
    table[features] = table[features].astype("float64")
    return table


def write_study(rows, out: str | Path, params, meta_out: str | Path | None = None,
                channel_params: Mapping | None = None) -> tuple[pd.DataFrame, Path]:
    """Study table to `out` (.parquet/.tsv/.csv) and its metadata to `meta_out` (default: `<out stem>.meta.json`
    beside it; channel_params: each channel's own parameters, recorded under channel_params)."""
    out = Path(out)
    table = study_table(rows)
    write_row(table, out)
    meta_path = Path(meta_out) if meta_out is not None else out.with_name(out.name.split(".")[0] + ".meta.json")
    meta = feature_metadata(params)
    if channel_params:
        by_file = {str(p): None for p in channel_params.values()}  # each file described once
        by_file = {p: feature_metadata(p) for p in by_file}
        meta["channel_params"] = {str(c): by_file[str(p)] for c, p in channel_params.items()}
    meta["patients"] = len(table)
    meta["features"] = int(len(table.columns) - len(ID_COLUMNS) - len(FLAG_COLUMNS))
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return table, meta_path


# --------------------------------------------------------------------------------------------------------------------
# IBSI 1 names of pyradiomics features
# --------------------------------------------------------------------------------------------------------------------

# (pyradiomics class, feature) -> IBSI 1 tag(s), without the texture aggregation suffix. Only features whose
# definition is the IBSI one are listed; `IBSI_TRANSFORMS` gives the few that need a documented conversion.
# Texture classes get the suffix of the aggregation pyradiomics performs (see `ibsi_tags`).
IBSI_FEATURES: dict[tuple[str, str], tuple[str, ...]] = {
    # morphology (pyradiomics computes these on the non-resegmented mask, as IBSI does)
    ("shape", "MeshVolume"): ("morph_volume",),
    ("shape", "VoxelVolume"): ("morph_vol_approx",),
    ("shape", "SurfaceArea"): ("morph_area_mesh",),
    ("shape", "SurfaceVolumeRatio"): ("morph_av",),
    ("shape", "Sphericity"): ("morph_sphericity",),
    ("shape", "Maximum3DDiameter"): ("morph_diam",),
    ("shape", "MajorAxisLength"): ("morph_pca_maj_axis",),
    ("shape", "MinorAxisLength"): ("morph_pca_min_axis",),
    ("shape", "LeastAxisLength"): ("morph_pca_least_axis",),
    ("shape", "Elongation"): ("morph_pca_elongation",),
    ("shape", "Flatness"): ("morph_pca_flatness",),
    # intensity statistics (raw intensities) and the two intensity-histogram features pyradiomics has
    ("firstorder", "Mean"): ("stat_mean",),
    ("firstorder", "Variance"): ("stat_var",),
    ("firstorder", "Skewness"): ("stat_skew",),
    ("firstorder", "Kurtosis"): ("stat_kurt",),
    ("firstorder", "Median"): ("stat_median",),
    ("firstorder", "Minimum"): ("stat_min",),
    ("firstorder", "10Percentile"): ("stat_p10",),
    ("firstorder", "90Percentile"): ("stat_p90",),
    ("firstorder", "Maximum"): ("stat_max",),
    ("firstorder", "InterquartileRange"): ("stat_iqr",),
    ("firstorder", "Range"): ("stat_range",),
    ("firstorder", "MeanAbsoluteDeviation"): ("stat_mad",),
    ("firstorder", "RobustMeanAbsoluteDeviation"): ("stat_rmad",),
    ("firstorder", "Energy"): ("stat_energy",),
    ("firstorder", "RootMeanSquared"): ("stat_rms",),
    ("firstorder", "Entropy"): ("ih_entropy",),
    # the NGLDM's normalised grey level non-uniformity equals the discretised histogram's uniformity
    ("firstorder", "Uniformity"): ("ih_uniformity", "ngl_glnu_norm@"),
    # grey level co-occurrence matrix
    ("glcm", "MaximumProbability"): ("cm_joint_max",),
    ("glcm", "JointAverage"): ("cm_joint_avg",),
    ("glcm", "SumSquares"): ("cm_joint_var",),
    ("glcm", "JointEntropy"): ("cm_joint_entr",),
    ("glcm", "DifferenceAverage"): ("cm_diff_avg", "cm_dissimilarity"),
    ("glcm", "DifferenceVariance"): ("cm_diff_var",),
    ("glcm", "DifferenceEntropy"): ("cm_diff_entr",),
    ("glcm", "SumAverage"): ("cm_sum_avg",),
    ("glcm", "ClusterTendency"): ("cm_clust_tend", "cm_sum_var"),
    ("glcm", "SumEntropy"): ("cm_sum_entr",),
    ("glcm", "JointEnergy"): ("cm_energy",),
    ("glcm", "Contrast"): ("cm_contrast",),
    ("glcm", "Id"): ("cm_inv_diff",),
    ("glcm", "Idn"): ("cm_inv_diff_norm",),
    ("glcm", "Idm"): ("cm_inv_diff_mom",),
    ("glcm", "Idmn"): ("cm_inv_diff_mom_norm",),
    ("glcm", "InverseVariance"): ("cm_inv_var",),
    ("glcm", "Correlation"): ("cm_corr",),
    ("glcm", "Autocorrelation"): ("cm_auto_corr",),
    ("glcm", "ClusterShade"): ("cm_clust_shade",),
    ("glcm", "ClusterProminence"): ("cm_clust_prom",),
    ("glcm", "Imc1"): ("cm_info_corr1",),
    ("glcm", "Imc2"): ("cm_info_corr2",),
    # grey level run length matrix
    ("glrlm", "ShortRunEmphasis"): ("rlm_sre",),
    ("glrlm", "LongRunEmphasis"): ("rlm_lre",),
    ("glrlm", "LowGrayLevelRunEmphasis"): ("rlm_lgre",),
    ("glrlm", "HighGrayLevelRunEmphasis"): ("rlm_hgre",),
    ("glrlm", "ShortRunLowGrayLevelEmphasis"): ("rlm_srlge",),
    ("glrlm", "ShortRunHighGrayLevelEmphasis"): ("rlm_srhge",),
    ("glrlm", "LongRunLowGrayLevelEmphasis"): ("rlm_lrlge",),
    ("glrlm", "LongRunHighGrayLevelEmphasis"): ("rlm_lrhge",),
    ("glrlm", "GrayLevelNonUniformity"): ("rlm_glnu",),
    ("glrlm", "GrayLevelNonUniformityNormalized"): ("rlm_glnu_norm",),
    ("glrlm", "RunLengthNonUniformity"): ("rlm_rlnu",),
    ("glrlm", "RunLengthNonUniformityNormalized"): ("rlm_rlnu_norm",),
    ("glrlm", "RunPercentage"): ("rlm_r_perc",),
    ("glrlm", "GrayLevelVariance"): ("rlm_gl_var",),
    ("glrlm", "RunVariance"): ("rlm_rl_var",),
    ("glrlm", "RunEntropy"): ("rlm_rl_entr",),
    # grey level size zone matrix
    ("glszm", "SmallAreaEmphasis"): ("szm_sze",),
    ("glszm", "LargeAreaEmphasis"): ("szm_lze",),
    ("glszm", "LowGrayLevelZoneEmphasis"): ("szm_lgze",),
    ("glszm", "HighGrayLevelZoneEmphasis"): ("szm_hgze",),
    ("glszm", "SmallAreaLowGrayLevelEmphasis"): ("szm_szlge",),
    ("glszm", "SmallAreaHighGrayLevelEmphasis"): ("szm_szhge",),
    ("glszm", "LargeAreaLowGrayLevelEmphasis"): ("szm_lzlge",),
    ("glszm", "LargeAreaHighGrayLevelEmphasis"): ("szm_lzhge",),
    ("glszm", "GrayLevelNonUniformity"): ("szm_glnu",),
    ("glszm", "GrayLevelNonUniformityNormalized"): ("szm_glnu_norm",),
    ("glszm", "SizeZoneNonUniformity"): ("szm_zsnu",),
    ("glszm", "SizeZoneNonUniformityNormalized"): ("szm_zsnu_norm",),
    ("glszm", "ZonePercentage"): ("szm_z_perc",),
    ("glszm", "GrayLevelVariance"): ("szm_gl_var",),
    ("glszm", "ZoneVariance"): ("szm_zs_var",),
    ("glszm", "ZoneEntropy"): ("szm_zs_entr",),
    # neighbourhood grey tone difference matrix
    ("ngtdm", "Coarseness"): ("ngt_coarseness",),
    ("ngtdm", "Contrast"): ("ngt_contrast",),
    ("ngtdm", "Busyness"): ("ngt_busyness",),
    ("ngtdm", "Complexity"): ("ngt_complexity",),
    ("ngtdm", "Strength"): ("ngt_strength",),
    # grey level dependence matrix = IBSI NGLDM with alpha = 0, Chebyshev distance 1
    ("gldm", "SmallDependenceEmphasis"): ("ngl_lde",),
    ("gldm", "LargeDependenceEmphasis"): ("ngl_hde",),
    ("gldm", "LowGrayLevelEmphasis"): ("ngl_lgce",),
    ("gldm", "HighGrayLevelEmphasis"): ("ngl_hgce",),
    ("gldm", "SmallDependenceLowGrayLevelEmphasis"): ("ngl_ldlge",),
    ("gldm", "SmallDependenceHighGrayLevelEmphasis"): ("ngl_ldhge",),
    ("gldm", "LargeDependenceLowGrayLevelEmphasis"): ("ngl_hdlge",),
    ("gldm", "LargeDependenceHighGrayLevelEmphasis"): ("ngl_hdhge",),
    ("gldm", "GrayLevelNonUniformity"): ("ngl_glnu",),
    ("gldm", "DependenceNonUniformity"): ("ngl_dcnu",),
    ("gldm", "DependenceNonUniformityNormalized"): ("ngl_dcnu_norm",),
    ("gldm", "GrayLevelVariance"): ("ngl_gl_var",),
    ("gldm", "DependenceVariance"): ("ngl_dc_var",),
    ("gldm", "DependenceEntropy"): ("ngl_dc_entr",),
}

# pyradiomics' kurtosis is not corrected by -3; IBSI's is the excess kurtosis.
IBSI_TRANSFORMS = {"stat_kurt": lambda v: v - 3.0}

# Aggregation suffix per class: pyradiomics computes one GLCM / GLRLM per direction over the whole ROI and averages
# the features over directions (IBSI "3D, averaged"; with force2D "2.5D, direction-merged"); GLSZM, NGTDM and GLDM
# build one matrix over the ROI (IBSI "3D"; with force2D in-plane neighbourhoods, merged over slices: "2.5D").
_SUFFIX = {
    (False, "glcm"): "_3D_avg",
    (True, "glcm"): "_2_5D_avg",
    (False, "glrlm"): "_3D_avg",
    (True, "glrlm"): "_2_5D_avg",
    (False, "glszm"): "_3D",
    (True, "glszm"): "_2_5D",
    (False, "ngtdm"): "_3D",
    (True, "ngtdm"): "_2_5D",
    (False, "gldm"): "_3D",
    (True, "gldm"): "_2_5D",
}
_GLDM_LIKE = {"ngl_glnu_norm@": "gldm"}


def ibsi_tags(cls: str, feature: str, *, force2d: bool = False) -> list[str]:
    """IBSI 1 tags (e.g. 'cm_joint_avg_3D_avg') that the pyradiomics feature `cls`/`feature` reproduces."""
    out = []
    for tag in IBSI_FEATURES.get((cls, feature), ()):
        if tag.endswith("@"):
            out.append(tag[:-1] + _SUFFIX[(force2d, _GLDM_LIKE[tag])])
        elif (force2d, cls) in _SUFFIX:
            out.append(tag + _SUFFIX[(force2d, cls)])
        else:
            out.append(tag)
    return out


def to_ibsi(features: Mapping[str, float], *, prefix: str = "", force2d: bool = False) -> dict[str, float]:
    """IBSI tag -> value for the features of one region/channel (`prefix` is `{region}_{channel}_`); original image
    only. Conversions of `IBSI_TRANSFORMS` applied."""
    out = {}
    for name, value in features.items():
        if not name.startswith(prefix + "original_"):
            continue
        _, cls, feat = name[len(prefix) :].split("_", 2)
        for tag in ibsi_tags(cls, feat, force2d=force2d):
            base = tag
            out[tag] = IBSI_TRANSFORMS[base](value) if base in IBSI_TRANSFORMS else value
    return out
