"""Segmentation: nnU-Net v2 (liver and tumour) trained on the annotated patients, applied to every patient.

Stages, each a function the Snakemake rules call (no Snakemake needed):

1. `build_raw_dataset`: the annotated patients -> an nnU-Net raw dataset (`Dataset{id:03d}_{name}`), holding
   out a seeded fraction of each center's annotated patients for evaluation.
2. `plan_and_preprocess`: nnU-Net's fingerprint extraction, `ExperimentPlanner` and preprocessing, through its
   Python API, with overrides applied to the plans (e.g. fewer features per stage for the demo).
3. `train`: `RadstudyTrainer` (radstudy/nnunet_trainers) on all training cases (fold "all"), with a
   configurable length, early stopping on nnU-Net's EMA pseudo-Dice and seeds.
4. `predict`: loads a model once and segments a list of cases (a whole center), writing
   `{patient}.nii.gz` on each case's image grid. Works as well on a results folder trained elsewhere with
   nnU-Net's stock trainer (plans.json, dataset.json, fold_*/checkpoint_*.pth). `load_trained_network` is the
   one loader of such a folder (plans, dataset.json, checkpoint, the network built from the plans with its
   weights): `predict`, the deep features' nnU-Net encoder and the multitask network's initialisation use it.
5. `postprocess`, `qc_segmentation`, `overlap_metrics`: per-label largest connected component, plausibility
   flags, DSC / HD95 / volumes against manual masks.

Importing this module is cheap and has no side effects: torch and nnU-Net are imported inside the functions,
and nnU-Net's folder variables are set only for the duration of a call (see below).

nnU-Net pitfalls handled here
-----------------------------
* Trainer lookup by name. `nnUNetv2_train -tr NAME` and `nnUNetPredictor.initialize_from_trained_model_folder`
  find the trainer class with `recursive_find_trainer_class_by_name`, which imports every module under
  nnunetv2/training/nnUNetTrainer until it finds the name. Some of them (the Primus trainers) import timm,
  which imports torchvision; with a CPU build of torch and the CUDA torchvision wheel from PyPI that import
  fails ("operator torchvision::nms does not exist"), so any trainer that is not found before that module
  (ours included) cannot be looked up by name in such an environment, even one given via nnUNet_extTrainer.
  radstudy never looks a trainer up by name: `train` constructs `RadstudyTrainer` directly, and `predict`
  builds the network itself (the trainer class's `build_network_architecture` for RadstudyTrainer and the
  stock trainer, otherwise the architecture class named in plans.json, or a `trainer_class` you pass),
  loads the checkpoint weights and hands both to `nnUNetPredictor.manual_initialization`. No module scan,
  no timm, no torchvision. For nnU-Net's own command line, the trainer is shipped in a folder usable as
  `nnUNet_extTrainer` (see radstudy.segment.nnunet_trainers); that route still needs an importable torchvision
  (a torchvision build matching torch, or nnU-Net's lookup finding the name before the Primus module).
* Folder variables. nnU-Net locates data through nnUNet_raw / nnUNet_preprocessed / nnUNet_results
  (nnunetv2.paths; older releases read them once at import). Each function here sets the variables it needs
  (and unsets the others, so a user's shell settings cannot add duplicate dataset candidates) for the
  duration of the call and restores them afterwards. With an nnU-Net old enough to read them at import
  time, a call with folders different from those seen at import raises instead of silently using others.
* Data-augmentation workers. nnU-Net starts nnUNet_n_proc_DA augmentation processes (12 by default) that
  slow training down on a few CPU cores; `train` sets nnUNet_n_proc_DA=0 (augmentation in the main process,
  which also makes it seedable) unless told otherwise. Planning must not see nnUNet_n_proc_DA=0 (the
  planner calls torch.set_num_threads with it), so `plan_and_preprocess` sets it to >= 1.
* Multiprocessing. Fingerprint extraction, preprocessing and prediction with npp/nps > 0 use "spawn" process
  pools, which re-import the caller's __main__ module in each worker: call these functions from a function
  or under `if __name__ == "__main__":` in scripts. `predict(..., npp=0, nps=0)` runs in-process.
* CPU. Prediction on CPU uses perform_everything_on_device=False (as nnU-Net recommends), torch.compile is
  never used on CPU (nnU-Net disables it there), and torch threads can be set per call (`threads`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from radstudy.images import DEFAULT_LABELS, same_grid
from radstudy.torch_tools import ModelError, torch_threads  # noqa: F401 (also used by callers of this module)

log = logging.getLogger(__name__)

PLANS_NAME = "nnUNetPlans"
FILE_ENDING = ".nii.gz"
DEFAULT_LARGEST_COMPONENT = {"liver": True, "tumour": False}
_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_TRAINER_FOLDER_PATTERN = "{trainer}__{plans}__{configuration}"


# ============================================================================ nnU-Net environment
@contextlib.contextmanager
def nnunet_environment(*, raw: Path | None = None, preprocessed: Path | None = None,
                        results: Path | None = None, extra: Mapping[str, str | None] | None = None):
    """Set nnU-Net's folder variables (None unsets one) and `extra` variables for the duration of a block."""
    values: dict[str, str | None] = {
        "nnUNet_raw": str(Path(raw).resolve()) if raw is not None else None,
        "nnUNet_preprocessed": str(Path(preprocessed).resolve()) if preprocessed is not None else None,
        "nnUNet_results": str(Path(results).resolve()) if results is not None else None,
    }
    values.update(extra or {})
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        _check_nnunet_reads_paths_lazily(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_nnunet_reads_paths_lazily(values: Mapping[str, str | None]) -> None:
    import nnunetv2.paths as paths  # cheap: no torch

    for name in _PATH_VARIABLES:
        current = getattr(paths, name, None)
        if current is None or isinstance(current, str):  # nnU-Net < 2.7 froze the value at import
            if current != values.get(name) and values.get(name) is not None:
                raise RuntimeError(
                    f"this nnU-Net read {name}={current!r} when it was first imported and cannot be pointed at "
                    f"{values.get(name)!r} now: run this step in a fresh process, or upgrade nnunetv2 (>= 2.7)")


def _torch_device(device: Any):
    import torch

    if isinstance(device, torch.device):
        return device
    device = str(device).lower()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device='mps' was requested but torch sees no MPS device")
    return torch.device(device)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def _find_dataset(folder: Path, dataset_id: int) -> Path:
    matches = sorted(Path(folder).glob(f"Dataset{int(dataset_id):03d}_*"))
    matches = [m for m in matches if m.is_dir()]
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected exactly one Dataset{int(dataset_id):03d}_* folder in {folder}, found "
            f"{[m.name for m in matches] or 'none'}")
    return matches[0]


def _load_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _save_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


# ============================================================================ 1. raw dataset
def split_holdout(cases: Sequence[Mapping], *, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Per center: hold out round(n * fraction) annotated patients (at least 1 when the fraction is > 0 and the
    center has >= 2; never all of them, so each center keeps >= 1 training patient where it has any).
    Seeded per center (random.Random(f"{seed}:{center}") on the sorted ids), so a center's split does not
    depend on the other centers. Returns (train ids, holdout ids), each sorted."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    by_center: dict[str, list[str]] = {}
    for case in cases:
        by_center.setdefault(str(case["center"]), []).append(str(case["patient"]))
    train, holdout = [], []
    for center in sorted(by_center):
        patients = sorted(by_center[center])
        n = len(patients)
        n_holdout = int(math.floor(n * holdout_fraction + 0.5))
        if holdout_fraction > 0 and n >= 2:
            n_holdout = max(n_holdout, 1)
        n_holdout = min(n_holdout, max(n - 1, 0))
        chosen = set(random.Random(f"{seed}:{center}").sample(patients, n_holdout))
        holdout += [p for p in patients if p in chosen]
        train += [p for p in patients if p not in chosen]
    return sorted(train), sorted(holdout)


def build_raw_dataset(cases: list[dict], raw_dir: Path, *, dataset_id: int, name: str, channels: list[str],
                      labels: Mapping[str, int] = DEFAULT_LABELS, holdout_fraction: float, seed: int,
                      normalization: str | Mapping[str, str] = "CT") -> dict:
    """Write the nnU-Net raw dataset of the annotated patients, minus a per-center holdout.

    cases: [{"patient", "center", "images": {channel: path}, "mask": path}] (annotated patients only).
    Writes raw_dir/Dataset{id:03d}_{name}/ (replacing an earlier one): imagesTr/{patient}_{0000..}.nii.gz in the
    order of `channels`, labelsTr/{patient}.nii.gz (uint8) and dataset.json. dataset.json's channel_names map
    the channel index to nnU-Net's normalisation scheme (`normalization`: "CT" for HU images, "zscore" for MR;
    one for all channels or per channel), since that is what nnU-Net reads them for; the radstudy channel names
    are kept in the extra key "radstudy_channels" (nnU-Net ignores it, `predict` uses it). The split is
    written to radstudy_split.json next to dataset.json.

    Returns {"train": [...], "holdout": [...]} (patient ids) plus "dataset" (folder name) and "dataset_dir".
    """
    if not channels:
        raise ValueError("channels must name at least one image channel")
    labels = {str(k): int(v) for k, v in labels.items()}
    if any(v <= 0 for v in labels.values()) or len(set(labels.values())) != len(labels):
        raise ValueError(f"labels must be distinct positive integers, got {labels}")
    seen = set()
    for case in cases:
        patient = str(case["patient"])
        if patient in seen:
            raise ValueError(f"patient {patient} is listed twice")
        seen.add(patient)
        missing = [c for c in channels if c not in case.get("images", {})]
        if missing:
            raise ValueError(f"patient {patient}: no image for channel(s) {missing}")
        if not case.get("mask"):
            raise ValueError(f"patient {patient}: no manual mask (only annotated patients can be used)")
    train, holdout = split_holdout(cases, holdout_fraction=holdout_fraction, seed=seed)
    if not train:
        raise ValueError("no training patients: need at least one annotated patient")

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    folder_name = dataset_folder_name(dataset_id, name)
    for other in raw_dir.glob(f"Dataset{int(dataset_id):03d}_*"):
        if other.name != folder_name:
            raise FileExistsError(f"{other} uses dataset id {dataset_id} too; nnU-Net needs unique ids")
    dataset_dir = raw_dir / folder_name
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    images_dir, labels_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    images_dir.mkdir(parents=True)
    labels_dir.mkdir()

    allowed = {0, *labels.values()}
    by_patient = {str(c["patient"]): c for c in cases}
    for patient in train:
        case = by_patient[patient]
        reference = None
        for index, channel in enumerate(channels):
            source = Path(case["images"][channel])
            target = images_dir / f"{patient}_{index:04d}{FILE_ENDING}"
            if source.name.endswith(FILE_ENDING):
                shutil.copyfile(source, target)
            else:
                sitk.WriteImage(sitk.ReadImage(str(source)), str(target), True)
            if reference is None:
                reference = _read_header(target)
        mask = sitk.ReadImage(str(case["mask"]))
        values = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
        if not values <= allowed:
            raise ValueError(f"patient {patient}: mask values {sorted(values - allowed)} are not in labels {labels}")
        if not same_grid(reference, mask, 1e-4):
            raise ValueError(f"patient {patient}: the mask is not on the image grid")
        sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(labels_dir / f"{patient}{FILE_ENDING}"), True)

    if isinstance(normalization, str):
        schemes = [normalization] * len(channels)
    else:
        schemes = [normalization.get(c, "CT") for c in channels]
    dataset_json = {
        "channel_names": {str(i): scheme for i, scheme in enumerate(schemes)},
        "labels": {"background": 0, **dict(sorted(labels.items(), key=lambda kv: kv[1]))},
        "numTraining": len(train),
        "file_ending": FILE_ENDING,
        "name": folder_name,
        "description": "radstudy: annotated patients minus the per-center evaluation holdout",
        "radstudy_channels": list(channels),
    }
    _save_json(dataset_json, dataset_dir / "dataset.json")
    centers = {str(c["patient"]): str(c["center"]) for c in cases}
    split = {"train": train, "holdout": holdout, "holdout_fraction": holdout_fraction, "seed": seed,
             "center": {p: centers[p] for p in sorted(centers)}}
    _save_json(split, dataset_dir / "radstudy_split.json")
    log.info("%s: %d training and %d holdout patients", folder_name, len(train), len(holdout))
    return {"train": train, "holdout": holdout, "dataset": folder_name, "dataset_dir": str(dataset_dir)}


# ============================================================================ 2. planning and preprocessing
def _features_for(n_stages: int, features_per_stage: int | Sequence[int], max_features: int) -> list[int]:
    if isinstance(features_per_stage, (int, np.integer)):
        base = int(features_per_stage)
        cap = max(base, int(round(max_features * base / 32)))  # nnU-Net's cap, scaled like its 32 base features
        return [min(base * 2**i, cap) for i in range(n_stages)]
    features = [int(f) for f in features_per_stage]
    if not features:
        raise ValueError("features_per_stage is empty")
    if len(features) < n_stages:  # the number of stages depends on the data: repeat the last value
        features += [features[-1]] * (n_stages - len(features))
    return features[:n_stages]


def plan_and_preprocess(raw_dir: Path, preprocessed_dir: Path, *, dataset_id: int, configuration: str = "2d",
                        features_per_stage: int | Sequence[int] | None = None, batch_size: int | None = None,
                        patch_size: Sequence[int] | None = None, overrides: Mapping[str, Any] | None = None,
                        num_processes: int = 1, gpu_memory_target_gb: float | None = None,
                        check_integrity: bool = False, threads: int | None = None) -> Path:
    """Fingerprint, plan and preprocess one configuration with nnU-Net's Python API; returns the plans file.

    nnU-Net's planner writes preprocessed_dir/Dataset.../nnUNetPlans.json; it is first kept unchanged as
    nnUNetPlans.planned.json, then the overrides are applied to the configuration in nnUNetPlans.json (a
    readable JSON you can edit and train from; the applied overrides are listed under "radstudy_overrides"),
    and only then is the data preprocessed, so preprocessing and training use the same plans.

    features_per_stage: an int (base number of features, doubled per stage like nnU-Net's 32, e.g. 8 ->
    8, 16, 32, 64, 128 for 5 stages in 2d) or a list (padded with its last value to the planned number of
    stages). batch_size / patch_size: replace the planned ones (a patch size must suit the planned pooling:
    divisible by 2**number of poolings per axis). overrides: any other configuration keys, set as given.
    """
    raw_dir, preprocessed_dir = Path(raw_dir), Path(preprocessed_dir)
    dataset_dir = _find_dataset(raw_dir, dataset_id)
    preprocessed_dir.mkdir(parents=True, exist_ok=True)
    extra = {"nnUNet_n_proc_DA": str(max(1, int(num_processes)))}  # 0 would crash the planner
    with torch_threads(threads), nnunet_environment(raw=raw_dir, preprocessed=preprocessed_dir, extra=extra):
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
            DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

        if check_integrity:
            verify_dataset_integrity(str(dataset_dir), max(1, num_processes))
        extractor = DatasetFingerprintExtractor(dataset_dir.name, max(1, num_processes), verbose=False)
        extractor.show_progress_bar = False
        extractor.run(overwrite_existing=True)

        target = preprocessed_dir / dataset_dir.name
        plans_file = target / f"{PLANS_NAME}.json"
        if plans_file.exists():  # the planner merges old configurations in: start from scratch
            plans_file.unlink()
        kwargs = {"plans_name": PLANS_NAME}
        if gpu_memory_target_gb is not None:
            kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target_gb)
        planner = ExperimentPlanner(dataset_dir.name, **kwargs)
        planner.plan_experiment()

        plans = _load_json(plans_file)
        shutil.copyfile(plans_file, target / f"{PLANS_NAME}.planned.json")
        if configuration not in plans["configurations"]:
            raise ValueError(f"nnU-Net planned {sorted(plans['configurations'])} for {dataset_dir.name}, "
                             f"not {configuration!r}")
        config = plans["configurations"][configuration]
        applied: dict[str, Any] = {}
        if features_per_stage is not None:
            if "architecture" not in config:
                raise ValueError(f"configuration {configuration!r} has no architecture to change")
            arch = config["architecture"]["arch_kwargs"]
            max_features = planner.UNet_max_features_2d if len(config["patch_size"]) == 2 \
                else planner.UNet_max_features_3d
            arch["features_per_stage"] = _features_for(int(arch["n_stages"]), features_per_stage, max_features)
            applied["features_per_stage"] = arch["features_per_stage"]
        if batch_size is not None:
            config["batch_size"] = applied["batch_size"] = int(batch_size)
        if patch_size is not None:
            if len(patch_size) != len(config["patch_size"]):
                raise ValueError(f"patch_size {list(patch_size)} does not match the {configuration} "
                                 f"configuration's {config['patch_size']}")
            config["patch_size"] = applied["patch_size"] = [int(p) for p in patch_size]
        for key, value in (overrides or {}).items():
            config[key] = applied[key] = value
        if applied:
            plans.setdefault("radstudy_overrides", {})[configuration] = applied
            log.info("plans overrides for %s: %s", configuration, applied)
        _save_json(plans, plans_file)

        preprocess_dataset(dataset_id=int(dataset_id), plans_identifier=PLANS_NAME,
                           configurations=[configuration], num_processes=[max(1, int(num_processes))],
                           verbose=False, show_progress_bar=False)
    return plans_file


# ============================================================================ 3. training
def _trainer_class(trainer: str | type):
    if isinstance(trainer, type):
        return trainer
    if trainer == "RadstudyTrainer":
        from radstudy.segment.nnunet_trainers.radstudy_trainer import RadstudyTrainer

        return RadstudyTrainer
    if trainer == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    raise ValueError(
        f"trainer {trainer!r}: radstudy does not look trainers up by name (nnU-Net's lookup imports every "
        "trainer module, see the module docstring); pass the class itself")


def train(preprocessed_dir: Path, results_dir: Path, *, dataset_id: int, configuration: str = "2d",
          fold: int | str = "all", trainer: str | type = "RadstudyTrainer", epochs: int,
          iterations_per_epoch: int, val_iterations_per_epoch: int | None = None,
          early_stopping_patience: int | None = None, early_stopping_min_delta: float = 0.0,
          device: str = "cpu", seed: int, threads: int | None = None, num_da_processes: int = 0,
          compile: bool | None = None, continue_training: bool = False,
          foreground_oversampling: float | None = None) -> Path:
    """Train an nnU-Net model; returns the model folder results_dir/Dataset.../{trainer}__nnUNetPlans__{cfg}.

    The trainer class is constructed directly (no lookup by name). fold "all" trains on every case of the
    raw dataset (i.e. all training patients; the holdout was never part of it); nnU-Net's pseudo-Dice is then
    measured on training patches, so early stopping on it is a plateau criterion, not a validation one.
    val_iterations_per_epoch defaults to iterations_per_epoch / 5 (nnU-Net's 250:50), at least 1.
    num_da_processes: nnUNet_n_proc_DA for this run (0: augmentation in this process, seeded).
    nnU-Net's final validation (perform_actual_validation) is not run; `predict` on the holdout replaces it.
    """
    preprocessed_dir, results_dir = Path(preprocessed_dir), Path(results_dir)
    dataset_dir = _find_dataset(preprocessed_dir, dataset_id)
    if isinstance(fold, str) and fold != "all":
        fold = int(fold)
    if val_iterations_per_epoch is None:
        val_iterations_per_epoch = max(1, round(iterations_per_epoch / 5))
    torch_device = _torch_device(device)
    extra: dict[str, str | None] = {"nnUNet_n_proc_DA": str(int(num_da_processes))}
    if compile is not None:
        extra["nnUNet_compile"] = "1" if compile else "0"
    results_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads), nnunet_environment(preprocessed=preprocessed_dir, results=results_dir,
                                                       extra=extra):
        trainer_cls = _trainer_class(trainer)
        plans = _load_json(dataset_dir / f"{PLANS_NAME}.json")
        plans["continue_training"] = bool(continue_training)  # nnUNetTrainer.__init__ pops this key
        dataset_json = _load_json(dataset_dir / "dataset.json")
        nnunet_trainer = trainer_cls(plans=plans, configuration=configuration, fold=fold,
                                     dataset_json=dataset_json, device=torch_device)
        if hasattr(nnunet_trainer, "configure"):
            nnunet_trainer.configure(epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                                     val_iterations_per_epoch=val_iterations_per_epoch,
                                     early_stopping_patience=early_stopping_patience,
                                     early_stopping_min_delta=early_stopping_min_delta, seed=seed,
                                     foreground_oversampling=foreground_oversampling)
        else:  # a stock-like trainer: length only
            nnunet_trainer.num_epochs = int(epochs)
            nnunet_trainer.num_iterations_per_epoch = int(iterations_per_epoch)
            nnunet_trainer.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
            import torch

            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        if continue_training:
            for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
                checkpoint = Path(nnunet_trainer.output_folder) / name
                if checkpoint.exists():
                    nnunet_trainer.load_checkpoint(str(checkpoint))
                    break
        nnunet_trainer.run_training()
        model_folder = Path(nnunet_trainer.output_folder_base)
    return model_folder


# ============================================================================ 4. prediction
def resolve_model_folder(model_folder: Path, folds: Sequence[int | str] | None,
                          checkpoint: str) -> tuple[Path, list[str]]:
    model_folder = Path(model_folder)
    if not (model_folder / "plans.json").exists() and model_folder.name.startswith("fold_") \
            and (model_folder.parent / "plans.json").exists():
        folds = [model_folder.name[len("fold_"):]] if folds is None else folds
        model_folder = model_folder.parent
    for required in ("plans.json", "dataset.json"):
        if not (model_folder / required).exists():
            raise FileNotFoundError(f"{model_folder} is not an nnU-Net model folder: {required} is missing")
    if folds is None:
        available = sorted(p.name[len("fold_"):] for p in model_folder.glob("fold_*") if (p / checkpoint).exists())
        folds = ["all"] if "all" in available else available
    folds = [str(f) for f in folds]
    missing = [f for f in folds if not (model_folder / f"fold_{f}" / checkpoint).exists()]
    if not folds or missing:
        raise FileNotFoundError(f"{model_folder}: no {checkpoint} for fold(s) {missing or '(none found)'}")
    return model_folder, folds


def network_builder(trainer_name: str, trainer_class: type | None):
    """build_network_architecture of the trainer named in the checkpoint, without nnU-Net's module scan."""
    if trainer_class is not None:
        return trainer_class.build_network_architecture
    if trainer_name == "RadstudyTrainer":
        from radstudy.segment.nnunet_trainers.radstudy_trainer import RadstudyTrainer

        return RadstudyTrainer.build_network_architecture
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if trainer_name != "nnUNetTrainer":
        log.info("checkpoint trainer %s: building the architecture named in plans.json (as nnUNetTrainer "
                 "does); pass trainer_class= if that trainer builds a different network", trainer_name)
    return nnUNetTrainer.build_network_architecture


@dataclass
class TrainedNetwork:
    """One fold of a trained nnU-Net model folder, loaded by `load_trained_network`.

    network: the architecture built from plans.json (deep supervision off) with the checkpoint's weights, on the
    CPU; weights: the checkpoint's state dict; configuration: the configuration it was trained with (the
    checkpoint's init_args); n_inputs / n_outputs: its input channels and segmentation heads."""

    folder: Path
    fold: str
    path: Path  # the checkpoint file
    trainer_name: str
    configuration: str
    plans: dict
    dataset_json: dict
    plans_manager: Any
    configuration_manager: Any
    n_inputs: int
    n_outputs: int
    mirror_axes: Any
    weights: dict
    network: Any


def load_trained_network(model_folder: Path, checkpoint: str = "checkpoint_final.pth", *,
                         fold: int | str | None = None, trainer_class: type | None = None) -> TrainedNetwork:
    """Load one fold of an nnU-Net model folder: plans.json, dataset.json, fold_{fold}/{checkpoint}, the network
    built by the checkpoint trainer's build_network_architecture (see `network_builder`: no lookup by name) from
    the plans' configuration named in the checkpoint, with the trained weights loaded (strict).

    model_folder: as `predict` takes it (a fold_X folder inside it is accepted too); fold: default "all" if
    present, else the first fold_N with the checkpoint. Raises FileNotFoundError for a folder without the files
    and ModelError (a ValueError) naming the checkpoint and plans.json when the weights do not fit the network
    built from the plans (e.g. a plans.json edited after training). Only load checkpoints you trust: nnU-Net
    checkpoints are pickles (torch.load(weights_only=False))."""
    folder, folds = resolve_model_folder(Path(model_folder), None if fold is None else [fold], checkpoint)
    fold = folds[0]  # an ensemble's first fold: one network
    with nnunet_environment():  # loading needs none of nnU-Net's folders
        import torch
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = _load_json(folder / "plans.json")
        dataset_json = _load_json(folder / "dataset.json")
        path = folder / f"fold_{fold}" / checkpoint
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # nnU-Net checkpoints are pickles
        plans_manager = PlansManager(plans)
        configuration = ckpt["init_args"]["configuration"]
        manager = plans_manager.get_configuration(configuration)
        n_inputs = determine_num_input_channels(plans_manager, manager, dataset_json)
        n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        build = network_builder(ckpt["trainer_name"], trainer_class)
        network = build(plans_manager, manager, n_inputs, n_outputs, enable_deep_supervision=False)
        try:
            network.load_state_dict(ckpt["network_weights"])
        except RuntimeError as error:
            raise ModelError(f"the weights in {path} do not fit the network built from "
                             f"{folder / 'plans.json'}: {error}") from error
    return TrainedNetwork(folder=folder, fold=fold, path=path, trainer_name=ckpt["trainer_name"],
                          configuration=configuration, plans=plans, dataset_json=dataset_json,
                          plans_manager=plans_manager, configuration_manager=manager, n_inputs=n_inputs,
                          n_outputs=n_outputs, mirror_axes=ckpt.get("inference_allowed_mirroring_axes"),
                          weights=ckpt["network_weights"], network=network)


def _channel_order(dataset_json: Mapping, cases: Sequence[Mapping], channels: Sequence[str] | None) -> list[str] | None:
    n_channels = len(dataset_json["channel_names"])
    if channels is not None:
        order = list(channels)
    elif "radstudy_channels" in dataset_json:
        order = list(dataset_json["radstudy_channels"])
    else:
        names = [dataset_json["channel_names"][str(i)] for i in range(n_channels)]
        if all(set(names) <= set(case["images"]) for case in cases):
            order = names
        elif n_channels == 1 and all(len(case["images"]) == 1 for case in cases):
            return None  # one channel, one image per case
        else:
            raise ValueError(
                f"cannot tell which of the case images feed the model's {n_channels} channel(s) "
                f"({names}): pass channels=[...] in the model's channel order")
    if len(order) != n_channels:
        raise ValueError(f"the model takes {n_channels} channel(s), {len(order)} named: {order}")
    return order


def _read_header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def predict(model_folder: Path, cases: list[dict], out_dir: Path, *, device: str = "cpu", tta: bool = False,
            npp: int = 1, nps: int = 1, checkpoint: str = "checkpoint_final.pth",
            folds: Sequence[int | str] | None = None, channels: Sequence[str] | None = None,
            threads: int | None = None, tile_step_size: float = 0.5, trainer_class: type | None = None,
            verbose: bool = False) -> list[Path]:
    """Segment `cases` with one model loaded once; returns out_dir/{patient}.nii.gz in the order of `cases`.

    model_folder: a folder with plans.json, dataset.json and fold_*/<checkpoint> (what `train` returns, or a
    model trained elsewhere with nnU-Net's stock trainer; a fold_X folder inside it is accepted too). folds:
    default fold "all" if present, else every fold_N with the checkpoint (an ensemble, as nnU-Net does).
    cases: [{"patient", "images": {channel: path}, ...}]; the channels fed to the model are `channels`, else
    dataset.json's "radstudy_channels", else its channel_names if they are the case's channel names, else
    the single image of single-channel cases. tta: nnU-Net's mirroring test-time augmentation (on the axes
    saved in the checkpoint). npp / nps: nnU-Net's background preprocessing / export processes; npp=0 or
    nps=0 runs everything sequentially in this process (no process pools). Each output is checked to lie on
    the grid of the case's first model channel image (same size, origin, spacing and direction).
    Only load checkpoints you trust: nnU-Net checkpoints are pickles (torch.load(weights_only=False)).
    out_dir also receives nnU-Net's provenance files (plans.json, dataset.json, predict_from_raw_data_args.json).
    """
    model_folder, folds = resolve_model_folder(Path(model_folder), folds, checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cases:
        return []
    patients = [str(c["patient"]) for c in cases]
    if len(set(patients)) != len(patients):
        raise ValueError("a patient is listed twice")
    torch_device = _torch_device(device)

    with torch_threads(threads), nnunet_environment():  # prediction needs none of nnU-Net's folders
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        dataset_json = _load_json(model_folder / "dataset.json")
        dataset_json["file_ending"] = FILE_ENDING  # our outputs are NIfTI whatever the model was trained on
        order = _channel_order(dataset_json, cases, channels)  # fail before loading anything heavy
        if order is not None:
            inputs = [[str(c["images"][ch]) for ch in order] for c in cases]
        else:
            inputs = [[str(next(iter(c["images"].values())))] for c in cases]
        try:
            trained = load_trained_network(model_folder, checkpoint, fold=folds[0], trainer_class=trainer_class)
        except ModelError as error:
            raise RuntimeError(f"{error}; if the checkpoint's trainer builds another architecture, pass "
                               "trainer_class= (that trainer's class) to build it") from error
        network, trainer_name, configuration_name = trained.network, trained.trainer_name, trained.configuration
        parameters = [trained.weights]
        for fold in folds[1:]:  # an ensemble: the other folds' weights, loaded by the predictor in turn
            parameters.append(torch.load(model_folder / f"fold_{fold}" / checkpoint, map_location="cpu",
                                         weights_only=False)["network_weights"])

        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=bool(tta),
                                    perform_everything_on_device=torch_device.type == "cuda",
                                    device=torch_device, verbose=verbose, verbose_preprocessing=False,
                                    allow_tqdm=False)
        predictor.manual_initialization(network, trained.plans_manager, trained.configuration_manager, parameters,
                                        dataset_json, trainer_name, trained.mirror_axes)

        outputs = [str(out_dir / p) for p in patients]
        for output in outputs:  # never mistake an earlier run's file for this run's
            Path(output + FILE_ENDING).unlink(missing_ok=True)
        log.info("predicting %d case(s) with %s (%s, fold(s) %s, trainer %s, tta=%s) on %s", len(cases),
                 model_folder.name, configuration_name, folds, trainer_name, tta, torch_device)
        if npp <= 0 or nps <= 0:
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=False, overwrite=True)
        else:
            predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=int(npp),
                                         num_processes_segmentation_export=int(nps))

    written = []
    for patient, images in zip(patients, inputs):
        path = out_dir / f"{patient}{FILE_ENDING}"
        if not path.exists():
            raise RuntimeError(f"nnU-Net wrote no segmentation for {patient} ({path})")
        reference = _read_header(Path(images[0]))
        seg = sitk.ReadImage(str(path))
        if not same_grid(reference, seg, tolerance=0):
            if not same_grid(reference, seg, 1e-4):
                raise RuntimeError(f"{path}: the segmentation is not on the grid of {images[0]}")
            seg.SetOrigin(reference.GetOrigin())  # rounding only: take the image's exact values
            seg.SetSpacing(reference.GetSpacing())
            seg.SetDirection(reference.GetDirection())
            sitk.WriteImage(seg, str(path), True)
        written.append(path)
    return written


# ============================================================================ 5. post-processing, QC, evaluation
def _as_labels(labels: Mapping[str, int] | None) -> dict[str, int]:
    labels = DEFAULT_LABELS if labels is None else labels
    return {str(k): int(v) for k, v in labels.items() if int(v) != 0}


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # 26-connectivity in 3D
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def postprocess(mask: sitk.Image, labels: Mapping[str, int] | None = None, *,
                largest_component: Mapping[str, bool] | None = None) -> sitk.Image:
    """Keep only the largest connected component (26-connected) of each label where configured (default:
    liver yes, tumour no: metastases are often several). Removed voxels become background. Labels are
    processed in the order given; the image geometry is kept."""
    labels = _as_labels(labels)
    largest_component = DEFAULT_LARGEST_COMPONENT if largest_component is None else largest_component
    unknown = set(largest_component) - set(labels)
    if unknown:
        raise ValueError(f"largest_component names unknown region(s) {sorted(unknown)}; labels are {labels}")
    array = sitk.GetArrayFromImage(mask)
    out = array.copy()
    for region, value in labels.items():
        if largest_component.get(region, False):
            this = array == value
            out[this & ~_largest_component(this)] = 0
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(mask)
    return result


def qc_segmentation(mask: sitk.Image, labels: Mapping[str, int] | None = None, *,
                    min_ml: Mapping[str, float] | None = None, max_ml: Mapping[str, float] | None = None,
                    tumour_outside_liver_expected: bool = True, region_check: bool = True,
                    organ: str = "liver", min_enclosed_fraction: float = 0.5) -> list[str]:
    """Plausibility flags of a label map (empty list: nothing to report).

    "empty:<region>": no voxel of the region; "too_small:<region>" / "too_large:<region>": volume below
    min_ml / above max_ml (ml; regions not named are not checked). Region check (region_check=True; the
    lesions are all labels other than `organ`): "<lesion>_outside_<organ>" when a connected component of the
    lesion does not touch the organ (a tumour that is not a liver metastasis, or a misplaced segmentation).
    tumour_outside_liver_expected=True (default) accepts lesions that extend beyond the organ outline
    (exophytic / subcapsular metastases: touching is enough); False also flags
    "<lesion>_not_enclosed_by_<organ>" when less than min_enclosed_fraction of the voxels bordering a lesion
    component are organ.
    """
    labels = _as_labels(labels)
    min_ml, max_ml = dict(min_ml or {}), dict(max_ml or {})
    unknown = (set(min_ml) | set(max_ml)) - set(labels)
    if unknown:
        raise ValueError(f"volume limits for unknown region(s) {sorted(unknown)}; labels are {labels}")
    array = sitk.GetArrayViewFromImage(mask)
    voxel_ml = _voxel_ml(mask)
    flags = []
    for region, value in labels.items():
        n = int(np.count_nonzero(array == value))
        if n == 0:
            flags.append(f"empty:{region}")
            continue
        volume = n * voxel_ml
        if region in min_ml and volume < min_ml[region]:
            flags.append(f"too_small:{region}")
        if region in max_ml and volume > max_ml[region]:
            flags.append(f"too_large:{region}")
    if region_check and organ in labels:
        organ_mask = array == labels[organ]
        structure = ndimage.generate_binary_structure(array.ndim, array.ndim)
        for region, value in labels.items():
            if region == organ:
                continue
            components, n = ndimage.label(array == value, structure=structure)
            outside = not_enclosed = False
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
                component = components[box] == index
                border = ndimage.binary_dilation(component, structure=structure) & ~component
                organ_border = np.count_nonzero(border & organ_mask[box])
                if organ_border == 0:
                    outside = True
                elif organ_border / max(np.count_nonzero(border), 1) < min_enclosed_fraction:
                    not_enclosed = True
            if outside:
                flags.append(f"{region}_outside_{organ}")
            if not_enclosed and not tumour_outside_liver_expected:
                flags.append(f"{region}_not_enclosed_by_{organ}")
    return flags


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between the surfaces of two boolean arrays.

    Surface voxels as in `_surface`; for every surface voxel of one mask, the Euclidean distance (in mm, using
    `spacing`, given in array axis order) to the nearest surface voxel of the other; the result is the larger
    of the two directed 95th percentiles (numpy's linear interpolation), as in MedPy's and MONAI's hd95.
    NaN if either mask is empty.
    """
    if not a.any() or not b.any():
        return float("nan")
    union = a | b
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(union.astype(np.uint8))[0])
    a, b = a[box], b[box]  # surfaces lie inside the union's box: distances are unchanged
    surface_a, surface_b = _surface(a), _surface(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    distance_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return float(max(np.percentile(distance_to_b[surface_a], 95), np.percentile(distance_to_a[surface_b], 95)))


def overlap_metrics(auto: sitk.Image, manual: sitk.Image, labels: Mapping[str, int] | None = None) -> list[dict]:
    """Per region: {"region", "label", "dsc", "hd95", "volume_auto_ml", "volume_manual_ml"}.

    dsc = 2|A∩M| / (|A| + |M|); 1.0 when both are empty, 0.0 when only one is. hd95 in mm (see `hd95`),
    computed on the physical grid (the image spacing); NaN when either is empty. The two images must share
    their grid (size, spacing, origin, direction).
    """
    if not same_grid(auto, manual, 1e-4):
        raise ValueError("the automatic and manual masks are not on the same grid")
    labels = _as_labels(labels)
    a_array, m_array = sitk.GetArrayViewFromImage(auto), sitk.GetArrayViewFromImage(manual)
    spacing = tuple(reversed(manual.GetSpacing()))  # numpy axis order
    voxel_ml = _voxel_ml(manual)
    rows = []
    for region, value in labels.items():
        a, m = a_array == value, m_array == value
        n_a, n_m = int(np.count_nonzero(a)), int(np.count_nonzero(m))
        if n_a + n_m == 0:
            dsc = 1.0
        else:
            dsc = 2.0 * int(np.count_nonzero(a & m)) / (n_a + n_m)
        rows.append({"region": region, "label": value, "dsc": dsc, "hd95": hd95(a, m, spacing),
                     "volume_auto_ml": n_a * voxel_ml, "volume_manual_ml": n_m * voxel_ml})
    return rows
