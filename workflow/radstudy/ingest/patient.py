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

from radstudy.ingest import dicomio
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
from radstudy.ingest.phi import Redactor
from radstudy.ingest.pseudonym import patient_folder

log = logging.getLogger(__name__)

QC_FILE = "qc.json"
MASK_FILE = "mask_manual.nii.gz"


def image_file(channel: str) -> str:
    return f"image_{channel}.nii.gz"


def fov_file(channel: str) -> str:
    """The channel's field-of-view mask (uint8, 1 inside), written only for a channel that does not cover the
    whole reference grid: voxels outside it hold a fill value and are kept out of every feature."""
    return f"fov_{channel}.nii.gz"


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
        raise PatientExcluded(
            UNREADABLE_FILES,
            f"{pseudonym}: no readable DICOM image in the patient's folder "
            f"({len(unreadable)} unreadable/non-DICOM file(s){first})",
            file=unreadable[0][0] if unreadable else None,
        )
    if len({h.patient_key for h in images}) > 1:
        raise PatientExcluded(MULTIPLE_PATIENTS, f"{pseudonym}: the folder holds images of {len({h.patient_key for h in images})} different PatientIDs")
    series = dicomio.group_series(headers)
    geometry = cfg["geometry"]
    channels: dict[str, dict] = {}
    reference: sitk.Image | None = None
    reference_for: str | None = None
    for name, selector in cfg["channels"].items():
        chosen = dicomio.select_series(series, selector, patient=pseudonym)
        grid = dicomio.check_geometry(
            chosen, patient=pseudonym, spacing_tolerance=geometry["spacing_tolerance"], gap_factor=geometry["gap_factor"]
        )
        image = dicomio.read_series(grid, patient=pseudonym)
        frame = chosen.headers[0].frame_of_reference_uid
        resampled = False
        if reference is None:
            reference, reference_for = image, frame
        elif not same_grid(image, reference, geometry["grid_tolerance"], direction_tolerance=1e-6):
            if frame is None or frame != reference_for:
                raise PatientExcluded(
                    CHANNEL_GRID_MISMATCH,
                    f"{pseudonym}: channel {name} is on another grid and another frame of reference than "
                    f"{next(iter(cfg['channels']))}; registration is not part of ingestion",
                )
            # Same frame of reference: the scanner placed both series in one patient coordinate system.
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, image.GetPixelID())
            resampled = True
        sitk.WriteImage(image, str(out_dir / image_file(name)), useCompression=True)
        channels[name] = _channel_record(chosen, grid, image, folder, len(series), resampled)
    mask = _ingest_mask(folder, series, reference, pseudonym, cfg, out_dir)
    return {"channels": channels, "mask": mask, "unreadable_files": len(unreadable)}


def _channel_record(series, grid, image: sitk.Image, folder: Path, n_series: int, resampled: bool) -> dict:
    first = series.headers[0]
    voxels = sitk.GetArrayViewFromImage(image)
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
    }


def _ingest_mask(folder, series, reference: sitk.Image, pseudonym: str, cfg: dict, out_dir: Path) -> dict:
    """Manual mask as a label map on the reference grid: a label-map file if delivered, else an RTSTRUCT."""
    labels: dict[str, int] = cfg["labels"]
    masks_cfg = cfg["masks"]
    label_files = sorted(folder.glob(masks_cfg["label_map_glob"]))
    rtstructs = [s for s in series if s.modality == "RTSTRUCT"]
    if label_files:
        path = label_files[0]
        rel = str(path.relative_to(folder))
        mask = dicomio.read_label_mask(path, patient=pseudonym, file=rel)
        dicomio.check_same_grid(mask, reference, patient=pseudonym, file=rel, tolerance=cfg["geometry"]["grid_tolerance"])
        unknown = set(_label_counts(mask)) - set(labels.values())
        if unknown:
            raise PatientExcluded(
                MASK_UNREADABLE,
                f"{pseudonym}: mask holds label value(s) {sorted(unknown)}; the config's labels are {labels}",
                file=rel,
            )
        mask.CopyInformation(reference)  # within tolerance: take the image's exact geometry
        source = {"source": "label_map", "file": rel}
    elif rtstructs:
        mask, source = _mask_from_rtstruct(rtstructs, folder, reference, pseudonym, labels, masks_cfg["rtstruct_rois"])
    else:
        return {"source": "none"}
    sitk.WriteImage(mask, str(out_dir / MASK_FILE), useCompression=True)
    source["labels"] = label_volumes(mask, labels)
    return source


def _mask_from_rtstruct(rtstructs, folder, reference, pseudonym, labels, roi_patterns) -> tuple[sitk.Image, dict]:
    path = rtstructs[0].headers[0].path
    rel = str(Path(path).relative_to(folder))
    structure = dicomio.read_rtstruct(Path(path), patient=pseudonym, file=rel)
    label_map = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    found = {}
    # Higher label values are painted last, so a tumour drawn inside the liver stays tumour.
    for region, value in sorted(labels.items(), key=lambda kv: kv[1]):
        pattern = roi_patterns.get(region)
        if pattern is None:
            continue
        names = [n for n in structure.roi_names if re.search(pattern, n, re.IGNORECASE)]
        if not names:
            continue
        roi = dicomio.rasterise_roi(structure, names[0], reference, patient=pseudonym)
        label_map[sitk.GetArrayViewFromImage(roi) > 0] = value
        found[region] = names[0]
    if not found:
        raise PatientExcluded(
            MASK_UNREADABLE,
            f"{pseudonym}: RTSTRUCT has no ROI matching the configured regions "
            f"({roi_patterns}); its ROIs: {structure.roi_names}",
            file=rel,
        )
    mask = sitk.GetImageFromArray(label_map)
    mask.CopyInformation(reference)
    return mask, {"source": "rtstruct", "file": rel, "rois": found}


def _label_counts(mask: sitk.Image) -> dict[int, int]:
    """Voxels per non-zero label, counted in C++ (np.bincount would widen a 512x512x150 mask to 8 bytes per voxel)."""
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.ComputePerimeterOff()
    shapes.Execute(mask)
    return {int(label): int(shapes.GetNumberOfPixels(label)) for label in shapes.GetLabels()}


def label_volumes(mask: sitk.Image, labels: dict[str, int]) -> dict:
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    counts = _label_counts(mask)
    return {region: {"voxels": counts.get(v, 0), "volume_ml": round(counts.get(v, 0) * voxel_ml, 3)}
            for region, v in labels.items()}
