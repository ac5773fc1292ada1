"""Ingestion of one patient: DICOM folder -> NIfTI image per channel (HU) + manual mask on the same grid + QC record.

Nothing identifying leaves this step: outputs are named by pseudonym, NIfTI headers carry geometry
only, and the QC record holds technical header values (series description, scanner) but no names,
IDs, dates or institutions. File names in messages are relative to the patient's folder, and every
string written or logged passes through the patient's `Redactor` (hospitals name files after patients).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import UID

from radstudy.ingest import dicomio, masks
from radstudy.config import Study
from radstudy.errors import (
    CHANNEL_GRID_MISMATCH,
    MASK_UNREADABLE,
    MULTIPLE_PATIENTS,
    REASONS,
    UNREADABLE_FILES,
    PatientExcluded,
)
from radstudy.images import same_grid
from radstudy.ingest.outputs import MASK_FILE, QC_FILE, fov_file, image_file, label_counts, label_volumes  # noqa: F401 (re-export)
from radstudy.ingest.phi import Redactor
from radstudy.ingest.pseudonym import patient_folder

log = logging.getLogger(__name__)

def ingest_patient(study: Study, center_id: str, pseudonym: str, out_dir: str | Path) -> dict:
    """Ingest one patient into `out_dir` (created); always writes `qc.json`. An unusable patient gets
    status 'excluded' with the reason, unless the config's ingest.on_error is 'fail' (then it raises)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    center = study.center(center_id)
    cfg = study.config["ingest"]
    record: dict = {"patient": pseudonym, "center": center_id, "role": center.role, "status": "included"}
    started = time.perf_counter()
    folder = patient_folder(center, study.key_file, pseudonym)
    redact = Redactor(pseudonym, folder.name)
    try:
        headers, unreadable = dicomio.scan_folder(folder)
        redact = Redactor.from_dicom(pseudonym, folder, headers[0].path if headers else None)
        record.update(_convert(folder, headers, unreadable, pseudonym, cfg, out_dir, redact))
    except PatientExcluded as exc:
        message, file = redact(exc.message), redact(exc.file)
        if cfg["on_error"] == "fail":
            raise PatientExcluded(exc.reason, message, file) from None
        for stale in out_dir.glob("*.nii.gz"):  # an excluded patient leaves no half-written images behind
            stale.unlink()
        record.update(
            status="excluded", stage="ingest", reason=exc.reason, reason_text=REASONS[exc.reason], message=message, file=file
        )
        log.warning("%s excluded: %s: %s", pseudonym, exc.reason, message)
    except Exception as exc:
        # A bug or an unforeseen input: fail loudly, but without the original paths in the traceback's message.
        raise RuntimeError(redact(f"{pseudonym}: unexpected error during ingestion: {type(exc).__name__}: {exc}")) from None
    record = redact(record)
    record["seconds"] = round(time.perf_counter() - started, 3)
    (out_dir / QC_FILE).write_text(json.dumps(record, indent=2, default=_json_default))
    return record


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _convert(folder: Path, headers, unreadable, pseudonym: str, cfg: dict, out_dir: Path, redact: Redactor) -> dict:
    if unreadable:
        log.info("%s: %d unreadable or non-DICOM file(s), e.g. %s", pseudonym, len(unreadable), redact(unreadable[0]))
    images = [h for h in headers if h.position is not None]
    if not images:
        first = f" e.g. {unreadable[0][0]}: {unreadable[0][1]}" if unreadable else ""
        # DICOM objects with pixel data but no image plane (secondary captures, SEG without images, reports...)
        others = sorted({(h.relative_path, UID(h.sop_class_uid).name) for h in headers if h.has_pixels})
        other = (f"; {len(others)} DICOM file(s) with pixel data but no image position, e.g. {others[0][0]} "
                 f"({others[0][1]})") if others else ""
        raise PatientExcluded(
            UNREADABLE_FILES,
            f"{pseudonym}: no readable DICOM image in the patient's folder "
            f"({len(unreadable)} unreadable/non-DICOM file(s){first}{other})",
            file=unreadable[0][0] if unreadable else others[0][0] if others else None,
        )
    if len({h.patient_key for h in images}) > 1:
        raise PatientExcluded(MULTIPLE_PATIENTS, f"{pseudonym}: the folder holds images of {len({h.patient_key for h in images})} different PatientIDs")
    series = dicomio.group_series(headers)
    geometry = cfg["geometry"]
    channels: dict[str, dict] = {}
    reference: sitk.Image | None = None
    reference_for: str | None = None
    reference_series = None
    used_series: list[str] = []
    fovs: dict[str, sitk.Image] = {}  # channels not covering the whole grid
    for name, selector in cfg["channels"].items():
        chosen = dicomio.select_series(series, selector, patient=pseudonym)
        grid = dicomio.check_geometry(
            chosen, patient=pseudonym, spacing_tolerance=geometry["spacing_tolerance"], gap_factor=geometry["gap_factor"]
        )
        image = dicomio.read_series(grid, patient=pseudonym)
        bias = selector.get("bias_correction", "none")
        if bias == "n4":
            image = n4_bias_correction(image)
        frame = chosen.headers[0].frame_of_reference_uid
        resampled, fov = False, None
        if reference is None:
            reference, reference_for, reference_series = image, frame, chosen
        elif frame is not None and reference_for is not None and frame != reference_for:
            # another frame of reference: another patient coordinate system (another session, or moved between
            # acquisitions), whatever the grids say; voxels would not correspond without registration
            raise PatientExcluded(
                CHANNEL_GRID_MISMATCH,
                f"{pseudonym}: channel {name} (series {chosen.summary()}) is in another frame of reference than "
                f"channel {next(iter(cfg['channels']))} (series {reference_series.summary()}); registration is not "
                "part of ingestion",
            )
        elif not same_grid(image, reference, geometry["grid_tolerance"], direction_tolerance=1e-6):
            if frame is None or frame != reference_for:
                raise PatientExcluded(
                    CHANNEL_GRID_MISMATCH,
                    f"{pseudonym}: channel {name} (series {chosen.summary()}) is on another grid than channel "
                    f"{next(iter(cfg['channels']))} (series {reference_series.summary()}) and its frame of reference "
                    "is not given, so the two cannot be put on one grid; registration is not part of ingestion",
                )
            # Same frame of reference: the scanner placed both series in one patient coordinate system.
            image, fov = resample_channel(image, reference, chosen.modality)
            resampled = True
        sitk.WriteImage(image, str(out_dir / image_file(name)), useCompression=True)
        channels[name] = _channel_record(chosen, grid, image, len(series), resampled, fov)
        channels[name]["bias_correction"] = bias
        if fov is not None and fov_outside(fov) > 0:  # the exact fraction: the record's is rounded
            sitk.WriteImage(fov, str(out_dir / fov_file(name)), useCompression=True)
            fovs[name] = fov
        used_series.append(chosen.uid)
    unused = _unused_series(series, used_series)
    mask, mask_image = _ingest_mask(folder, series, reference, reference_series, pseudonym, cfg, out_dir, unused)
    if mask_image is not None:
        for name, fov in fovs.items():
            channels[name]["fov_outside_fraction"]["manual_mask"] = _outside_per_label(fov, mask_image, cfg["labels"])
    unused += [{"file": file, "why": why} for file, why in unreadable]
    unused += [{"file": file, "why": "not read: a mask/table/notes file that is not the patient's mask"}
               for file in _files_skipped_by_name(folder, mask)]
    return {"channels": channels, "mask": mask, "unreadable_files": len(unreadable), "unused_files": unused}


# A fill value that no feature treats as tissue is not enough on its own (a ring or texture feature still sees it):
# the fill marks "no data" in the image, and fov_{channel}.nii.gz keeps those voxels out of every feature.
FILL_VALUES = {"CT": -1024.0}  # air; MR, PT and other modalities: 0


def n4_bias_correction(image: sitk.Image, shrink: int = 4) -> sitk.Image:
    """N4 bias-field correction (SimpleITK's N4BiasFieldCorrectionImageFilter, Tustison et al. 2010) of an MR image:
    the field is fitted on the image shrunk by `shrink` in-plane (and along z where the image has enough slices),
    inside an Otsu foreground mask (the body: air has no field to estimate), then the full-resolution image is
    divided by the field (exp of the log field). Returns float32 on the same grid; deterministic (no sampling)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    positive = sitk.Maximum(image, 0.0) + 1.0  # N4 works on log intensities: strictly positive values
    mask = sitk.OtsuThreshold(positive, 0, 1, 200)
    factors = [shrink if size >= 4 * shrink else 1 for size in positive.GetSize()]
    small, small_mask = sitk.Shrink(positive, factors), sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50, 50, 30])
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(positive)
    corrected = sitk.Cast(positive / sitk.Exp(log_field) - 1.0, sitk.sitkFloat32)
    corrected.CopyInformation(image)
    return corrected


def resample_channel(image: sitk.Image, reference: sitk.Image, modality: str) -> tuple[sitk.Image, sitk.Image]:
    """The channel on the reference grid (linear) and its field of view there (uint8, 1 where the channel has
    data: voxel centres inside its own image extent, the same nearest-neighbour rule as ITK's interpolators)."""
    fill = FILL_VALUES.get(modality.upper(), 0.0)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, fill, image.GetPixelID())
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    fov = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return resampled, fov


def fov_outside(fov: sitk.Image) -> float:
    """Fraction of the reference grid outside the channel's field of view."""
    return 1.0 - float(sitk.GetArrayViewFromImage(fov).mean(dtype=np.float64))


def _outside_per_label(fov: sitk.Image, mask: sitk.Image, labels: dict[str, int]) -> dict[str, float | None]:
    inside = sitk.GetArrayViewFromImage(fov) > 0
    mask = sitk.GetArrayViewFromImage(mask)
    fractions = {}
    for region, value in labels.items():
        voxels = mask == value
        fractions[region] = round(float((voxels & ~inside).sum() / voxels.sum()), 4) if voxels.any() else None
    return fractions


def _unused_series(series, used: list[str]) -> list[dict]:
    """Image series of the folder that no channel took (other phases, localizers, secondary captures); masks
    are accounted for by the mask step."""
    unused = []
    for one in series:
        if one.uid in used or one.modality in MASK_MODALITIES:
            continue
        files = sorted({h.relative_path for h in one.headers})  # an enhanced multi-frame file: one header per frame
        unused.append({"file": files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)",
                       "series": one.summary(), "why": "series not selected by any channel"})
    return unused


def _files_skipped_by_name(folder: Path, mask: dict) -> list[str]:
    """Files that scanning skips by their name (NIfTI, NRRD, JSON, text...) and the mask step did not use."""
    used = set(mask.get("files", []))
    return [rel for path in sorted(folder.rglob("*")) if path.is_file()
            and (rel := path.relative_to(folder).as_posix()) not in used and dicomio._skipped_by_name(path.name)
            and not path.name.startswith(".") and path.name.lower() != "dicomdir"]


def _channel_record(series, grid, image: sitk.Image, n_series: int, resampled: bool, fov: sitk.Image | None) -> dict:
    first = series.headers[0]
    voxels = sitk.GetArrayViewFromImage(image)
    if fov is not None:  # the value range of the channel's own data, not of the fill
        voxels = voxels[sitk.GetArrayViewFromImage(fov) > 0]
    return {
        "series_description": first.series_description,
        "series_number": first.series_number,
        "manufacturer": first.manufacturer,
        "convolution_kernel": first.convolution_kernel,
        "slices": len(grid.files),
        "series_in_folder": n_series,
        "size": list(image.GetSize()),
        "spacing_mm": [round(s, 6) for s in image.GetSpacing()],
        "origin_mm": [round(o, 4) for o in image.GetOrigin()],
        "direction": [round(d, 6) for d in image.GetDirection()],
        "hu_min": float(voxels.min()),
        "hu_max": float(voxels.max()),
        "hu_mean": round(float(voxels.mean(dtype=np.float64)), 2),
        "resampled_to_reference": resampled,
        # MR: what the selector saw (None where the files do not carry it)
        "modality": series.modality,
        "echo_time_ms": first.echo_time,
        "repetition_time_ms": first.repetition_time,
        "b_value": first.b_value,
        "b_value_source": first.b_value_source,
        # fractions of the reference grid (and of each manual-mask label) outside the channel's field of view
        "fov_outside_fraction": {"grid": round(fov_outside(fov), 4) if fov is not None else 0.0},
    }


MASK_MODALITIES = ("RTSTRUCT", "SEG")


def _ingest_mask(folder, series, reference: sitk.Image, reference_series, pseudonym: str, cfg: dict, out_dir: Path,
                 unused: list[dict]) -> tuple[dict, sitk.Image | None]:
    """The manual mask as a label map on the reference grid, from a label-map file if one is delivered, else from
    the RTSTRUCT / SEG files that reference the reference channel's series. Every mask file not used is added to
    `unused` with the reason. Returns the mask's QC record (its source, the files and the regions each label came
    from, the label volumes) and the mask itself (None without one)."""
    labels: dict[str, int] = cfg["labels"]
    masks_cfg = cfg["masks"]
    globs = [masks_cfg["label_map_glob"]] if isinstance(masks_cfg["label_map_glob"], str) else masks_cfg["label_map_glob"]
    label_files = sorted({path for pattern in globs for path in folder.glob(pattern) if path.is_file()})
    dicom_masks = [s for s in series if s.modality in MASK_MODALITIES]
    if label_files:
        used, *others = label_files
        unused += [{"file": _relative(p, folder), "why": f"another label-map file was used ({_relative(used, folder)})"}
                   for p in others]
        unused += [{"file": h.relative_path, "series": s.summary(), "why": "a label-map file was used"}
                   for s in dicom_masks for h in s.headers]
        mask, record = _mask_from_label_file(used, folder, reference, pseudonym, cfg)
    elif dicom_masks:
        sources = _dicom_mask_sources(series, reference_series, pseudonym, masks_cfg["other_series"], unused)
        mask, record = _mask_from_sources(sources, reference, pseudonym, labels, masks_cfg)
        unused += [{"file": s.file, "why": f"no region matches a configured label (regions: {s.names})"}
                   for s in sources if s.file not in record["files"]]
    else:
        return {"source": "none"}, None
    sitk.WriteImage(mask, str(out_dir / MASK_FILE), useCompression=True)
    record["labels"] = label_volumes(mask, labels)
    return record, mask


def _relative(path: Path, folder: Path) -> str:
    return Path(path).relative_to(folder).as_posix()


def _mask_from_label_file(path: Path, folder: Path, reference: sitk.Image, pseudonym: str, cfg: dict):
    rel = _relative(path, folder)
    labels = cfg["labels"]
    source = masks.read_label_file(path, patient=pseudonym, file=rel, grid_tolerance=cfg["geometry"]["grid_tolerance"])
    if source.names:  # a segmentation that names its segments (3D Slicer .seg.nrrd): mapped by name
        mask, record = _mask_from_sources([source], reference, pseudonym, labels, cfg["masks"])
        record["source"] = "label_map"
        return mask, record
    mask = source.image
    dicomio.check_same_grid(mask, reference, patient=pseudonym, file=rel, tolerance=cfg["geometry"]["grid_tolerance"])
    unknown = set(label_counts(mask)) - set(labels.values())
    if unknown:
        raise PatientExcluded(
            MASK_UNREADABLE, f"{pseudonym}: mask holds label value(s) {sorted(unknown)}; the config's labels are {labels}",
            file=rel)
    mask.CopyInformation(reference)  # within tolerance: take the image's exact geometry
    return mask, {"source": "label_map", "file": rel, "files": [rel]}


def _dicom_mask_sources(series, reference_series, pseudonym: str, other_series: str, unused: list[dict]) -> list:
    """The RTSTRUCT / SEG files that reference the reference channel's series (by SeriesInstanceUID; by frame of
    reference where a file names no series); with other_series 'allow', also those that only share its frame of
    reference. Each file not taken goes to `unused` with the reason. PatientExcluded, naming the files and both
    series, when none is usable."""
    readable, problems = [], []
    for one in (s for s in series if s.modality in MASK_MODALITIES):
        for header in one.headers:
            try:
                source = (masks.read_rtstruct if one.modality == "RTSTRUCT" else masks.read_seg)(
                    header.path, patient=pseudonym, file=header.relative_path)
            except PatientExcluded as exc:
                problems.append(exc)
                unused.append({"file": header.relative_path, "series": one.summary(), "why": exc.message})
                continue
            readable.append((source, one))
    reference_frame = reference_series.frame_of_reference_uid

    def references(source) -> str | None:
        if source.referenced_series_uid == reference_series.uid:
            return "series"
        if source.referenced_series_uid is None and reference_frame and source.frame_of_reference_uid == reference_frame:
            return "frame_of_reference"
        if other_series == "allow" and reference_frame and source.frame_of_reference_uid == reference_frame:
            return "other_series"
        return None

    chosen = []
    for source, one in readable:
        how = references(source)
        if how is None:
            unused.append({"file": source.file, "series": one.summary(), "why": "references "
                           f"{_series_named(source, series, reference_series)}, not the reference channel's series"})
        else:
            source.reference_match, source.drawn_on = how, _series_named(source, series, reference_series)
            chosen.append(source)
    if chosen:
        return chosen
    if problems and not readable:
        raise PatientExcluded(problems[0].reason, problems[0].message, file=problems[0].file)
    files = ", ".join(f"{s.file} ({_series_named(s, series, reference_series)})" for s, _ in readable)
    raise PatientExcluded(
        MASK_UNREADABLE,
        f"{pseudonym}: no RTSTRUCT / SEG references the reference series {reference_series.summary()}: {files}"
        + ("" if other_series == "allow" else "; set ingest.masks.other_series: allow to use a mask drawn on another "
           "series of the same frame of reference"),
        file=readable[0][0].file if readable else None)


def _series_named(source, series, reference_series) -> str:
    """The series a mask file references, as the folder's series list names it (no UIDs in messages)."""
    uid = source.referenced_series_uid
    if uid is None:
        same = source.frame_of_reference_uid == reference_series.frame_of_reference_uid
        return f"no series, {'the same' if same else 'another'} frame of reference"
    named = [s.summary() for s in series if s.uid == uid]
    return f"series {named[0]}" if named else "a series that is not in the patient's folder"


def _multiple_policy(masks_cfg: dict, region: str) -> str:
    policy = masks_cfg["multiple_matches"]
    return policy if isinstance(policy, str) else policy.get(region, "union")


def _mask_from_sources(sources, reference, pseudonym, labels, masks_cfg) -> tuple[sitk.Image, dict]:
    """The label map from the regions (ROIs, segments) whose names match each label's pattern, searched across
    `sources`; several matches of one label are combined by ingest.masks.multiple_matches."""
    patterns = masks_cfg["rtstruct_rois"]
    label_map = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    regions = {}
    # Higher label values are painted last, so a tumour drawn inside the liver stays tumour.
    for region, value in sorted(labels.items(), key=lambda kv: kv[1]):
        pattern = patterns.get(region, f"^{re.escape(region)}$")
        matches = [(source, name) for source in sources for name in source.names
                   if re.search(pattern, name, re.IGNORECASE)]
        if not matches:
            continue
        policy = _multiple_policy(masks_cfg, region)
        if len(matches) > 1 and policy == "error":
            raise PatientExcluded(
                MASK_UNREADABLE,
                f"{pseudonym}: {len(matches)} regions match label {region!r} ({pattern!r}): "
                + ", ".join(f"{name!r} in {source.file}" for source, name in matches)
                + " (ingest.masks.multiple_matches: error; union or largest would combine or choose)",
                file=matches[0][0].file)
        arrays = [sitk.GetArrayFromImage(source.region(name, reference, patient=pseudonym)) > 0
                  for source, name in matches]
        record = {"matched": [name for _, name in matches], "taken": "union" if len(matches) > 1 else "single"}
        if policy == "largest" and len(matches) > 1:
            largest = int(np.argmax([a.sum() for a in arrays]))
            record["taken"] = "largest"
            matches, arrays = [matches[largest]], [arrays[largest]]
        label_map[np.logical_or.reduce(arrays)] = value
        record.update(names=[name for _, name in matches], files=sorted({s.file for s, _ in matches}),
                      reference=sorted({getattr(s, "reference_match", "grid") for s, _ in matches}),
                      drawn_on=sorted({getattr(s, "drawn_on", "the image grid") for s, _ in matches}))
        regions[region] = record
    if not regions:
        raise PatientExcluded(
            MASK_UNREADABLE,
            f"{pseudonym}: no region of the mask file(s) matches the configured labels ({patterns or labels}); "
            + "; ".join(f"{s.file}: {s.names}" for s in sources),
            file=sources[0].file)
    mask = sitk.GetImageFromArray(label_map)
    mask.CopyInformation(reference)
    files = sorted({f for r in regions.values() for f in r["files"]})
    kinds = sorted({s.kind for s in sources if s.file in files})
    return mask, {"source": "+".join(kinds), "file": files[0], "files": files, "regions": regions,
                  "rois": {region: r["names"][0] if len(r["names"]) == 1 else r["names"] for region, r in regions.items()}}
