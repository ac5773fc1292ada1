"""The networks' inputs: per patient a normalised crop around the region in every channel, cached per center.

A crop (`patient_input`) is taken with the deep-feature code's geometry (`radstudy.features.deep`): an isotropic
grid of `networks.crop_size` voxels centred on the region's bounding box, `networks.spacing` mm per voxel, or with
spacing null the box plus `margin_mm` on every side fitted into the grid (the region is never cut). Every channel is
resampled (linearly) onto the same grid, so the channels of a crop are aligned voxel for voxel.

Intensities, as the segmentation model normalises them: a CT channel (its DICOM modality, config
`ingest.channels.*.modality`) is clipped to `networks.window` (HU) on the image, before resampling (nnU-Net's order:
no out-of-window value, e.g. metal, bleeds into its neighbours through the interpolation), and then z-scored within
the crop; other modalities (MR sequences, PET) are z-scored within the crop. A constant crop gives zeros, never NaN.

Fields of view: a channel with a field-of-view mask (`fov_{channel}.nii.gz`, see `radstudy.features.deep`) is
z-scored with the statistics of the crop voxels inside it, and the voxels outside it are 0, the neutral value of the
normalised input; the fraction of the crop outside is recorded per channel. A region more than
`radiomics.MAX_OUTSIDE_FOV` outside a channel's field of view leaves the patient out, as for deep features.

dims 2 (seed 003's design): the region's largest axial slice of the image (`deep.largest_slice`, the slice index
recorded) cropped on a grid of crop_size[1:] (y x) voxels, as the deep-feature ResNet-2D takes it: one native slice,
no interpolation across slices, the z size of crop_size unused (the schema's contract).

`mask_channel`: the region resampled onto the crop grid (`deep.region_on_grid`) as the last channel (0 / 1), named
``{region}_mask``.

A patient whose mask or image cannot be read, whose region is empty, whose mask is not on its images' grid or
whose region lies outside a channel's field of view raises `PatientExcluded` (the message names the patient, the
region, the channel and the file); `write_center_inputs` turns it into an issue row and leaves the patient out of
the arrays. Everything is deterministic (no random step; SimpleITK's resampling is exact per voxel).

Segmentation targets (the multitask network, `radstudy.networks.multitask`): the region of the patient's manual
mask (ingestion's mask_manual.nii.gz, where one was delivered) and of its automatic segmentation (nnU-Net's) on the
same crop grid, each with a flag telling whether the patient has one; a manual mask that cannot be read, is not on
the images' grid or holds no voxel of the region gives no target (a warning names the file), the patient keeps its
input. The crop grid's origin and direction are stored too, so a mask predicted in the crop can be written as an
image that ITK-SNAP or 3D Slicer lays over the patient's scan.

Storage: one compressed .npz per center (`np.savez_compressed`, read without pickle): patients (N,), inputs
(N, C, ...) float16, channels (C,), spacing_mm (N, 3) z y x, origin (N, 3) and direction (N, 9) of the crop grid
(x y z, SimpleITK's order), outside_fov (N, image channels), slice (N,) (dims 2; -1 for dims 3), manual and
automatic (N, ...) uint8 (the region in the crop, 0 where there is none) with has_manual and has_automatic (N,)
bool, crop_from (N,): "manual" when the crop was placed by the patient's manual mask (the mask the features use,
segmentation.masks_for_features / method manual), else "automatic", dims and region.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from radstudy.config import settings
from radstudy.errors import FEATURE_EXTRACTION, ConfigError, PatientExcluded
from radstudy.features import deep, radiomics
from radstudy.images import same_grid

log = logging.getLogger(__name__)

ISSUE_COLUMNS = ["patient", "region", "reason", "message", "file"]


def input_channels(images: Mapping[str, str | Path], cfg: Mapping) -> list[str]:
    """The image channels a network reads, in order: `networks.channels`, or null: every image given, in order."""
    return [str(c) for c in (cfg["channels"] if cfg["channels"] is not None else images)]


def channel_names(images: Mapping[str, str | Path], cfg: Mapping) -> list[str]:
    """The input's channel names: the image channels, then ``{region}_mask`` with `mask_channel`."""
    return input_channels(images, cfg) + ([f"{cfg['region']}_mask"] if cfg["mask_channel"] else [])


def input_shape(cfg: Mapping) -> tuple[int, ...]:
    """Spatial shape of one channel: crop_size (z y x) for dims 3, its y x for dims 2."""
    size = tuple(int(s) for s in cfg["crop_size"])
    return size if int(cfg["dims"]) == 3 else size[1:]


def _label(labels: Mapping[str, int], region: str) -> int:
    if region not in labels:
        raise ConfigError(f"networks.region: {region!r} is not one of the labels {sorted(labels)} (ingest.labels)")
    return int(labels[region])


def _is_ct(modalities: Mapping[str, str], channel: str) -> bool:
    if channel not in modalities:
        raise ConfigError(f"networks: no modality for channel {channel!r} (ingest.channels.{channel}.modality); "
                          f"modalities given for {sorted(modalities)}")
    return str(modalities[channel]).strip().upper() == "CT"


def _read_region(mask: Path, *, patient: str, region: str, label: int) -> tuple[sitk.Image, np.ndarray]:
    """The mask image and the region's voxels (bool z y x); unreadable or empty -> PatientExcluded."""
    try:
        image = sitk.ReadImage(str(mask))
        voxels = sitk.GetArrayFromImage(image) == label
    except Exception as exc:  # any unreadable file excludes the patient, with its message
        raise PatientExcluded(FEATURE_EXTRACTION, f"{patient}: network input: mask {mask} for region {region!r} "
                                                  f"cannot be read ({exc})", file=str(mask)) from exc
    if not voxels.any():
        raise PatientExcluded(FEATURE_EXTRACTION, f"{patient}: network input: region {region!r} is empty (no voxel "
                                                  f"of label {label}) in mask {mask}", file=str(mask))
    return image, voxels


def _read_channel(path: Path, fov_path: Path | None, mask_image: sitk.Image, voxels: np.ndarray, *, patient: str,
                  region: str, channel: str, mask: Path) -> tuple[sitk.Image, np.ndarray | None, float]:
    """One channel's image, its field of view (None: it covers the grid) and the share of the region outside it."""
    def excluded(what: str, file: Path) -> PatientExcluded:
        return PatientExcluded(FEATURE_EXTRACTION, f"{patient}: network input: region {region!r}, channel "
                                                   f"{channel!r}: {what}", file=str(file))

    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:
        raise excluded(f"image {path} cannot be read ({exc})", path) from exc
    if not same_grid(mask_image, image, direction_tolerance=1e-4):
        raise excluded(f"mask {mask} is not on the grid of image {path}", path)
    if fov_path is None:
        return image, None, 0.0
    try:
        fov = radiomics.read_fov(fov_path, image)
    except Exception as exc:
        raise excluded(f"field-of-view mask {fov_path} of image {path} cannot be used ({exc})", fov_path) from exc
    share = radiomics.outside_share(voxels, fov)
    if share > radiomics.MAX_OUTSIDE_FOV:
        raise excluded(f"{share:.1%} of the region lies outside the field of view ({fov_path}), more than "
                       f"{radiomics.MAX_OUTSIDE_FOV:.0%}", fov_path)
    return image, fov, share


def _normalised(image: sitk.Image, valid: np.ndarray | None, grid: sitk.Image, ct: bool,
                window: Sequence[float]) -> np.ndarray:
    """One channel on the crop grid, z-scored within the crop (statistics of the voxels inside the field of view
    `valid`, 0 outside it). A CT image is clipped to the window before it is resampled, as nnU-Net normalises
    before resampling: a value outside the window then never reaches the crop beyond the window's bound."""
    if ct:
        image = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, float(window[0]), float(window[1]))
    crop = deep.resample_to(image, grid, float(sitk.GetArrayViewFromImage(image).min()))
    return deep.standardise(crop, valid)


def _target_on_grid(path: Path | None, reference: sitk.Image, grid: sitk.Image, *, patient: str, label: int,
                    what: str, slice_index: int | None, read: Mapping[Path, sitk.Image]) -> np.ndarray | None:
    """The region of a target mask file on the crop grid (bool), None when there is no file or it is unusable (a
    warning names the file: the patient keeps its input, without this target). read: mask files already read (the
    crop's own mask is usually one of the targets)."""
    if path is None or not Path(path).exists():
        return None
    try:
        image = read[path] if path in read else sitk.ReadImage(str(path))
    except Exception as exc:  # an unreadable target leaves the patient without it, with the reason
        log.warning("%s: %s mask %s cannot be read (%s): no segmentation target", patient, what, path, exc)
        return None
    if not same_grid(reference, image, direction_tolerance=1e-4):
        log.warning("%s: %s mask %s is not on the images' grid: no segmentation target", patient, what, path)
        return None
    voxels = sitk.GetArrayFromImage(image) == label
    if slice_index is not None:  # dims 2: the target of the input's slice
        voxels = np.where(np.arange(len(voxels))[:, None, None] == slice_index, voxels, False)
    if not voxels.any():
        where = "" if slice_index is None else f" on slice {slice_index}"
        log.warning("%s: %s mask %s holds no voxel of label %d%s: no segmentation target", patient, what, path, label,
                    where)
        return None
    return deep.region_on_grid(voxels, reference, grid)


def patient_input(images: Mapping[str, str | Path], mask: str | Path, *, patient: str, labels: Mapping[str, int],
                  cfg: Mapping, modalities: Mapping[str, str],
                  fovs: Mapping[str, str | Path] | None = None, manual: str | Path | None = None,
                  automatic: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """One patient's network input, float32 (C, D, H, W) (dims 3) or (C, H, W) (dims 2), channels as
    `channel_names`, and an info dict: spacing_mm (z y x of the crop grid), outside_fov and outside_region (per image
    channel: fractions of the crop / of the region outside its field of view), slice (dims 2: the image's axial
    slice index; dims 3: None). cfg: the `networks` section (defaults from the schema). A patient that cannot give
    an input raises PatientExcluded naming the patient, region, channel and file; a bad config raises ConfigError."""
    cfg = settings("networks", dict(cfg))
    region = str(cfg["region"])
    label = _label(labels, region)
    channels = input_channels(images, cfg)
    if not channels:
        raise ConfigError(f"{patient}: network input: no image channel (networks.channels is empty or no image given)")
    ct = {c: _is_ct(modalities, c) for c in channels}
    fovs = {str(c): Path(f) for c, f in (fovs or {}).items()}
    mask = Path(mask)
    mask_image, voxels = _read_region(mask, patient=patient, region=region, label=label)
    loaded = []
    for channel in channels:
        if channel not in images:
            raise PatientExcluded(FEATURE_EXTRACTION, f"{patient}: network input: region {region!r}: no image for "
                                                      f"channel {channel!r} (given: {sorted(images)})")
        loaded.append(_read_channel(Path(images[channel]), fovs.get(channel), mask_image, voxels, patient=patient,
                                    region=region, channel=channel, mask=mask))
    slice_index = None
    crop_region = voxels
    size = [int(s) for s in cfg["crop_size"]]
    if int(cfg["dims"]) == 2:
        slice_index = deep.largest_slice(voxels)
        crop_region = np.zeros_like(voxels)
        crop_region[slice_index] = voxels[slice_index]
        size[0] = 1
    spacing = None if cfg["spacing"] is None else [float(cfg["spacing"])] * 3
    reference = loaded[0][0]
    grid = deep.crop_grid(reference, crop_region, size, spacing, float(cfg["margin_mm"]))
    arrays, outside = [], {}
    for channel, (image, fov, _) in zip(channels, loaded):
        valid = deep.valid_on_grid(fov, image, grid)
        if valid is not None and not valid.any():
            raise PatientExcluded(FEATURE_EXTRACTION, f"{patient}: network input: region {region!r}, channel "
                                                      f"{channel!r}: no voxel of the crop lies inside the field of "
                                                      f"view ({fovs[channel]})", file=str(fovs[channel]))
        arrays.append(_normalised(image, valid, grid, ct[channel], cfg["window"]))
        outside[channel] = deep.crop_outside(valid)
    if cfg["mask_channel"]:
        arrays.append(deep.region_on_grid(crop_region, reference, grid).astype(np.float32))
    x = np.stack(arrays).astype(np.float32)
    targets = {what: _target_on_grid(None if path is None else Path(path), mask_image, grid, patient=patient,
                                     label=label, what=what, slice_index=slice_index, read={mask: mask_image})
               for what, path in (("manual", manual), ("automatic", automatic))}
    if slice_index is not None:
        x = x[:, 0]
        targets = {k: None if v is None else v[0] for k, v in targets.items()}
    info = {"spacing_mm": tuple(float(s) for s in grid.GetSpacing()[::-1]), "outside_fov": outside,
            "outside_region": {c: share for c, (_, _, share) in zip(channels, loaded)}, "slice": slice_index,
            "origin": tuple(grid.GetOrigin()), "direction": tuple(grid.GetDirection()), **targets}
    return x, info


def write_center_inputs(items: Iterable[tuple[str, Mapping[str, str | Path], str | Path,
                                              Mapping[str, str | Path] | None]],
                        out_npz: str | Path, *, labels: Mapping[str, int], cfg: Mapping,
                        modalities: Mapping[str, str],
                        targets: Mapping[str, tuple[str | Path | None, str | Path | None]] | None = None
                        ) -> pd.DataFrame:
    """Every patient's input of one center into one compressed .npz (module docstring); returns the issues
    (patient, region, reason, message, file): one row per patient left out, none dropped silently. items:
    (patient, images channel -> file, mask file, fovs channel -> file or None); targets: patient -> (manual mask
    file, automatic mask file), each None when there is none. One log line per patient and a summary."""
    cfg = settings("networks", dict(cfg))
    out_npz = Path(out_npz)
    patients, inputs, spacings, outside, slices, issues = [], [], [], [], [], []
    origins, directions, crop_from, masks = [], [], [], {"manual": [], "automatic": []}
    targets = targets or {}
    channels = image_channels = None
    for patient, images, mask, fovs in items:
        names = channel_names(images, cfg)
        if channels is None:
            channels, image_channels = names, input_channels(images, cfg)
        elif names != channels:
            raise ValueError(f"{patient}: channels {names} differ from the center's {channels} ({out_npz}); "
                             "set networks.channels")
        try:
            manual, automatic = targets.get(patient, (None, None))
            placed_by = "manual" if manual is not None and Path(mask) == Path(manual) else "automatic"
            x, info = patient_input(images, mask, patient=patient, labels=labels, cfg=cfg, modalities=modalities,
                                    fovs=fovs, manual=manual, automatic=automatic)
        except PatientExcluded as exc:
            issues.append({"patient": patient, "region": cfg["region"], "reason": exc.reason, "message": exc.message,
                           "file": exc.file or ""})
            log.warning("%s: left out: %s", patient, exc.message)
            continue
        patients.append(patient)
        inputs.append(x.astype(np.float16))
        spacings.append(info["spacing_mm"])
        outside.append([info["outside_fov"][c] for c in image_channels])
        slices.append(-1 if info["slice"] is None else info["slice"])
        origins.append(info["origin"])
        crop_from.append(placed_by)
        directions.append(info["direction"])
        for what in masks:
            masks[what].append(info[what])
        log.info("%s: input %s at %.3g mm, outside the field of view: %s", patient, "x".join(map(str, x.shape)),
                 info["spacing_mm"][-1], ", ".join(f"{c} {s:.1%}" for c, s in info["outside_fov"].items()))
    if channels is None:  # no patient given: the channels are known only when the config names them
        channels = channel_names({}, cfg) if cfg["channels"] is not None else []
    shape = input_shape(cfg)
    empty = np.zeros((0, len(channels), *shape), np.float16)
    stored = {}
    for what, found in masks.items():
        stored[what] = np.stack([np.zeros(shape, np.uint8) if m is None else m.astype(np.uint8) for m in found]) \
            if found else np.zeros((0, *shape), np.uint8)
        stored[f"has_{what}"] = np.array([m is not None for m in found], dtype=bool)
    # a center none of whose patients has an input (all excluded upstream): empty arrays of the right width
    image_channels = max(0, len(channels) - int(bool(cfg["mask_channel"])))
    outside_fov = (np.array(outside, dtype=np.float64).reshape(len(patients), -1) if patients
                   else np.zeros((0, image_channels), np.float64))
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_npz, patients=np.array(patients, dtype=str),
                        inputs=np.stack(inputs) if inputs else empty,
                        channels=np.array(channels, dtype=str),
                        spacing_mm=np.array(spacings, dtype=np.float64).reshape(-1, 3),
                        outside_fov=outside_fov,
                        slice=np.array(slices, dtype=np.int64), dims=np.int64(cfg["dims"]),
                        region=np.array(cfg["region"]),
                        origin=np.array(origins, dtype=np.float64).reshape(-1, 3),
                        direction=np.array(directions, dtype=np.float64).reshape(-1, 9),
                        crop_from=np.array(crop_from, dtype=str), **stored)
    log.info("%s: %d patient(s) with an input (%d with a manual mask), %d left out (issues)", out_npz.name,
             len(patients), int(stored["has_manual"].sum()), len(issues))
    return pd.DataFrame(issues, columns=ISSUE_COLUMNS)
