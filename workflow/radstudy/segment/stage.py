"""The segmentation stage at file level: which patients train nnU-Net, which are segmented, what is written.

The nnU-Net mechanics live in `radstudy.segment.nnunet`; this module turns the study's tables and config into its
calls, and its results into the files the later stages and the report read:

    results/segmentation/split.tsv                 annotated patients: train | holdout (| manual)
    results/segmentation/{center}/{patient}.nii.gz automatic label map (post-processed) on the image grid, or with
                                                   segmentation.method manual the patient's manual mask
    results/segmentation/{center}/qc.tsv           per patient: volumes, QC flags, status
    results/segmentation/dsc.tsv (+ dsc.png/.pdf)  holdout patients: automatic vs manual, per region

Every function takes the folders and files it reads and writes (patients' ingest folders, centers' segmentation
folders): the results/ layout is written in the rules only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from radstudy.segment import nnunet as segment
from radstudy.config import Study
from radstudy.figures import dsc_figure
from radstudy.errors import NO_MANUAL_MASK, REASONS, SEGMENTATION_QC, ConfigError
from radstudy.ingest.outputs import MASK_FILE, image_file, label_volumes
from radstudy.ingest.outputs import patient_folders

log = logging.getLogger(__name__)


def _cfg(study: Study) -> dict:
    return study.config["segmentation"]


def device(study: Study) -> str:
    return "cuda" if _cfg(study)["gpu"] else "cpu"


def dataset_name(study: Study) -> str:
    return segment.dataset_folder_name(_cfg(study)["dataset_id"], _cfg(study)["dataset_name"])


def trained_model_folder(study: Study, results_dir: str | Path) -> Path:
    """Where `train` puts the model: results_dir/Dataset.../RadstudyTrainer__nnUNetPlans__{configuration}."""
    return Path(results_dir) / dataset_name(study) / f"RadstudyTrainer__{segment.PLANS_NAME}__{_cfg(study)['configuration']}"


TRAIN_CENTERS_FILE = "radstudy_train_centers.txt"  # in the raw dataset folder: the centers it was built from


def study_model_folder(study: Study) -> Path:
    """The nnU-Net model the study uses: segmentation.model_folder when given, else the one trained under
    segmentation.work_dir."""
    seg = _cfg(study)
    return Path(seg["model_folder"]) if seg["model_folder"] else trained_model_folder(study, Path(seg["work_dir"]) / "results")


def eligible_train_centers(study: Study) -> list[str]:
    """Centers whose annotations `segmentation.train_centers` selects (development, all, or a list of ids)."""
    spec = _cfg(study)["train_centers"]
    ids = [c.id for c in study.centers]
    if isinstance(spec, list):
        unknown = sorted(set(spec) - set(ids))
        if unknown:
            raise ConfigError(f"segmentation.train_centers names unknown center(s) {', '.join(unknown)} "
                              f"(centers: {', '.join(ids)})")
        return [c for c in ids if c in spec]
    return [c.id for c in study.centers if spec == "all" or c.role == "development"]


def train_centers(study: Study, raw_dataset_dir: str | Path) -> list[str]:
    """Centers whose annotated patients train nnU-Net: the eligible ones, frozen to those the existing dataset was
    built from (TRAIN_CENTERS_FILE in `raw_dataset_dir`) unless `segmentation.retrain_on_new_centers` or an explicit
    list in `train_centers`. So a center added to the sheet does not retrain nnU-Net unless the config asks."""
    eligible = eligible_train_centers(study)
    record = Path(raw_dataset_dir) / TRAIN_CENTERS_FILE
    if isinstance(_cfg(study)["train_centers"], list) or _cfg(study)["retrain_on_new_centers"] or not record.is_file():
        return eligible
    frozen = set(record.read_text().split())
    return [c for c in eligible if c in frozen]


def _cases(study: Study, patients: pd.DataFrame, folders: dict[str, Path], with_mask: bool) -> list[dict]:
    channels = list(study.config["ingest"]["channels"])
    missing = sorted(set(patients["patient"]) - set(folders))
    if missing:
        raise ValueError(f"no ingest folder given for patient(s) {missing}")
    cases = []
    for row in patients.itertuples():
        folder = folders[row.patient]
        case = {"patient": row.patient, "center": row.center,
                "images": {c: str(folder / image_file(c)) for c in channels}}
        if with_mask:
            case["mask"] = str(folder / MASK_FILE)
        cases.append(case)
    return cases


def _included(qc_tables: list[str | Path]) -> pd.DataFrame:
    table = pd.concat([pd.read_csv(t, sep="\t", dtype={"file": str}) for t in qc_tables], ignore_index=True)
    return table[table["status"] == "included"]


def nnunet_normalization(config: dict) -> dict[str, str]:
    """nnU-Net's normalisation scheme per image channel (dataset.json channel_names): "CT" (clipping to the
    foreground's 0.5-99.5 percentiles, then the foreground's mean and SD over the dataset) for a CT channel,
    "zscore" (each image by its own mean and SD) for any other modality: MR values have no unit and their scale differs
    by scanner and protocol, so a dataset-wide scheme would mix scales."""
    return {str(name): "CT" if str(ch.get("modality", "CT")).upper() == "CT" else "zscore"
            for name, ch in config["ingest"]["channels"].items()}


def build_dataset(study: Study, qc_tables: list[str | Path], ingest_dirs: list[str | Path], raw_dir: str | Path,
                  out_split: str | Path, centers: list[str] | None = None) -> dict:
    """nnU-Net raw dataset from the annotated, included patients of the training `centers` (default: the eligible
    ones); split.tsv lists them, and the centers are recorded in the dataset folder (see `train_centers`).
    ingest_dirs: the patients' ingest folders (at least those of the annotated, included patients)."""
    cfg = _cfg(study)
    centers = eligible_train_centers(study) if centers is None else list(centers)
    patients = _included(qc_tables)
    annotated = patients[patients["annotated"].astype(str) == "True"]
    annotated = annotated[annotated["center"].astype(str).isin(centers)]
    if annotated.empty:
        raise ValueError("no annotated patient to train nnU-Net on: deliver manual masks or set segmentation.model_folder")
    split = segment.build_raw_dataset(
        _cases(study, annotated, patient_folders(ingest_dirs), with_mask=True), Path(raw_dir), dataset_id=cfg["dataset_id"],
        name=cfg["dataset_name"], channels=list(study.config["ingest"]["channels"]),
        labels=study.config["ingest"]["labels"], holdout_fraction=cfg["holdout_fraction"], seed=study.seed,
        normalization=nnunet_normalization(study.config),
    )
    (Path(split["dataset_dir"]) / TRAIN_CENTERS_FILE).write_text("".join(f"{c}\n" for c in centers))
    rows = [{"patient": p, "set": s} for s in ("train", "holdout") for p in split[s]]
    table = pd.DataFrame(rows).merge(annotated[["patient", "center"]], on="patient").sort_values(["set", "patient"])
    Path(out_split).parent.mkdir(parents=True, exist_ok=True)
    table[["patient", "center", "set"]].to_csv(out_split, sep="\t", index=False)
    log.info("nnU-Net dataset: %d training and %d holdout patients", len(split["train"]), len(split["holdout"]))
    return split


def holdout_only_split(study: Study, qc_tables: list[str | Path], out_split: str | Path) -> None:
    """With a trained model given in the config, every annotated patient is a holdout patient (none trained it);
    with segmentation.method manual there is no automatic segmentation to evaluate: every annotated patient's set
    is `manual`."""
    annotated = _included(qc_tables)
    annotated = annotated[annotated["annotated"].astype(str) == "True"]
    Path(out_split).parent.mkdir(parents=True, exist_ok=True)
    kind = "manual" if _cfg(study)["method"] == "manual" else "holdout"
    annotated.assign(set=kind)[["patient", "center", "set"]].to_csv(out_split, sep="\t", index=False)


def plan(study: Study, raw_dir: str | Path, preprocessed_dir: str | Path) -> Path:
    cfg = _cfg(study)
    return segment.plan_and_preprocess(
        Path(raw_dir), Path(preprocessed_dir), dataset_id=cfg["dataset_id"], configuration=cfg["configuration"],
        features_per_stage=cfg["features_per_stage"], batch_size=cfg["batch_size"], patch_size=cfg["patch_size"],
        num_processes=1,
        threads=cfg["threads"],
    )


def train(study: Study, preprocessed_dir: str | Path, results_dir: str | Path) -> Path:
    cfg = _cfg(study)
    return segment.train(
        Path(preprocessed_dir), Path(results_dir), dataset_id=cfg["dataset_id"], configuration=cfg["configuration"],
        epochs=cfg["epochs"], iterations_per_epoch=cfg["iterations_per_epoch"],
        early_stopping_patience=cfg["early_stopping_patience"], device=device(study), seed=study.seed,
        threads=cfg["threads"], compile=False, foreground_oversampling=cfg["foreground_oversampling"],
    )


QC_COLUMNS = ["patient", "center", "flags", "status", "stage", "reason", "reason_text", "message"]


def manual_center(study: Study, center_id: str, qc_table: str | Path, ingest_dirs: list[str | Path],
                  out_dir: str | Path) -> pd.DataFrame:
    """segmentation.method manual: every included patient's manual mask (its ingest folder's mask_manual.nii.gz)
    is its segmentation, copied unchanged into out_dir; a patient without one, or whose mask holds none of the
    configured labels, is excluded (reason no_manual_mask, the message names the patient and the file). Same
    qc.tsv as `segment_center` (volumes per label, status)."""
    labels = study.config["ingest"]["labels"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = patient_folders(ingest_dirs)
    rows = []
    for row in _included([qc_table]).itertuples():
        source = folders[row.patient] / MASK_FILE
        volumes, problem = {}, ""
        if not source.exists():
            problem = f"{row.patient}: no manual mask ({source} absent): segmentation.method is manual"
        else:
            mask = sitk.ReadImage(str(source))
            volumes = {f"volume_{region}_ml": v["volume_ml"] for region, v in label_volumes(mask, labels).items()}
            if not any(v > 0 for v in volumes.values()):
                problem = f"{row.patient}: manual mask {source} holds none of the labels {sorted(labels)}"
            else:
                sitk.WriteImage(mask, str(out_dir / f"{row.patient}.nii.gz"), useCompression=True)
        if problem:
            log.warning("%s (excluded)", problem)
        rows.append({"patient": row.patient, "center": center_id, **volumes, "flags": "",
                     "status": "excluded" if problem else "included", "stage": "segmentation" if problem else "",
                     "reason": NO_MANUAL_MASK if problem else "",
                     "reason_text": REASONS[NO_MANUAL_MASK] if problem else "", "message": problem})
    table = pd.DataFrame(rows, columns=["patient", "center", *[f"volume_{r}_ml" for r in labels], *QC_COLUMNS[2:]])
    table.to_csv(out_dir / "qc.tsv", sep="\t", index=False)
    log.info("center %s: %d manual masks, %d patients without one (excluded)", center_id,
             int((table["status"] == "included").sum()), int((table["status"] == "excluded").sum()))
    return table


def segment_center(study: Study, center_id: str, qc_table: str | Path, ingest_dirs: list[str | Path],
                   model_folder: str | Path | None, out_dir: str | Path) -> pd.DataFrame:
    """Segment every included patient of one center with the model loaded once; post-process and QC each.
    ingest_dirs: the center's patients' ingest folders (at least those of its included patients). With
    segmentation.method manual: `manual_center` (model_folder unused)."""
    cfg = _cfg(study)
    if cfg["method"] == "manual":
        return manual_center(study, center_id, qc_table, ingest_dirs, out_dir)
    labels = study.config["ingest"]["labels"]
    out_dir = Path(out_dir)
    patients = _included([qc_table])
    cases = _cases(study, patients, patient_folders(ingest_dirs), with_mask=False)
    log.info("center %s: segmenting %d patients with %s on %s", center_id, len(cases), model_folder, device(study))
    outputs = segment.predict(Path(model_folder), cases, out_dir, device=device(study), tta=cfg["tta"], npp=0, nps=0,
                              threads=cfg["threads"])
    rows = []
    for case, path in zip(cases, outputs):
        mask = segment.postprocess(sitk.ReadImage(str(path)), labels, largest_component=cfg["largest_component"])
        sitk.WriteImage(mask, str(path), useCompression=True)
        flags = segment.qc_segmentation(mask, labels, min_ml=cfg["qc"]["min_ml"], max_ml=cfg["qc"]["max_ml"],
                                        region_check=cfg["qc"]["region_check"])
        volumes = {f"volume_{region}_ml": v["volume_ml"] for region, v in label_volumes(mask, labels).items()}
        excluded = bool(flags) and cfg["qc"]["on_flag"] == "exclude"
        if flags:
            log.warning("%s: segmentation QC flags %s (%s)", case["patient"], flags, "excluded" if excluded else "kept")
        rows.append({
            "patient": case["patient"], "center": center_id, **volumes, "flags": ";".join(flags),
            "status": "excluded" if excluded else "included", "stage": "segmentation" if excluded else "",
            "reason": SEGMENTATION_QC if excluded else "", "reason_text": REASONS[SEGMENTATION_QC] if excluded else "",
            "message": f"{case['patient']}: automatic segmentation flagged {', '.join(flags)}" if flags else "",
        })
    table = pd.DataFrame(rows, columns=["patient", "center", *[f"volume_{r}_ml" for r in labels], "flags", "status",
                                        "stage", "reason", "reason_text", "message"])
    table.to_csv(out_dir / "qc.tsv", sep="\t", index=False)
    return table


def evaluate_holdout(study: Study, split_tsv: str | Path, segmentation_dirs: list[str | Path],
                     ingest_dirs: list[str | Path], out_tsv: str | Path, out_png: str | Path,
                     out_pdf: str | Path, networks_tsv: str | Path | None = None) -> pd.DataFrame:
    """DSC, HD95 and volumes of the automatic vs the manual masks of the holdout patients (method nnunet, scope
    image: on the whole image grid, cohort "segmentation holdout"), and with networks_tsv the multitask network's
    rows (`radstudy.networks.stage`: method multitask and, on the same crops, nnunet; scope crop).
    segmentation_dirs: the centers' segmentation folders (segment_center's out_dir, named after the center);
    ingest_dirs: the patients' ingest folders (at least those of the holdout patients)."""
    labels = study.config["ingest"]["labels"]
    split = pd.read_csv(split_tsv, sep="\t")
    centers = {Path(d).name: Path(d) for d in segmentation_dirs}
    folders = patient_folders(ingest_dirs)
    rows = []
    for row in split[split["set"] == "holdout"].itertuples():
        auto_path = centers[row.center] / f"{row.patient}.nii.gz" if row.center in centers else None
        if auto_path is None or not auto_path.exists():  # segmented patients only (one may be excluded later)
            continue
        manual = sitk.ReadImage(str(folders[row.patient] / MASK_FILE))
        for result in segment.overlap_metrics(sitk.ReadImage(str(auto_path)), manual, labels):
            rows.append({"patient": row.patient, "center": row.center, "region": result["region"],
                         "dsc": round(result["dsc"], 4), "hd95": round(result["hd95"], 3),
                         "volume_auto_ml": round(result["volume_auto_ml"], 3),
                         "volume_manual_ml": round(result["volume_manual_ml"], 3)})
    table = pd.DataFrame(rows, columns=["patient", "center", "region", "dsc", "hd95", "volume_auto_ml", "volume_manual_ml"])
    table = table.assign(method="nnunet", scope="image", cohort="segmentation holdout", nnunet_trained=False)
    if networks_tsv is not None:
        table = pd.concat([table, pd.read_csv(networks_tsv, sep="\t")], ignore_index=True)
    table = table.reindex(columns=DSC_COLUMNS)
    Path(out_tsv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_tsv, sep="\t", index=False)
    _save_dsc_figure(table, Path(out_png), Path(out_pdf))
    if not table.empty:
        log.info("holdout DSC medians: %s",
                 table.groupby(["region", "method", "scope"])["dsc"].median().round(3).to_dict())
    return table


DSC_COLUMNS = ["patient", "center", "region", "method", "scope", "crop_from", "cohort", "nnunet_trained", "dsc",
               "hd95", "volume_auto_ml", "volume_manual_ml"]


def _save_dsc_figure(table: pd.DataFrame, png: Path, pdf: Path) -> None:
    import matplotlib.pyplot as plt

    fig = dsc_figure(table)  # radstudy.figures: the report draws it with the same function
    fig.savefig(png, dpi=150, metadata={"Software": None})  # no version or date: same table, same bytes
    fig.savefig(pdf, metadata={"Creator": None, "Producer": None, "CreationDate": None})
    plt.close(fig)
