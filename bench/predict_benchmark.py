"""Segmentation of N cases: the pipeline's segment_center job vs nnU-Net's own predictor vs one process per patient.

Targets (segmentation issue): prediction loads the model once per job and segments a whole center in that job, never
one process per patient; the pipeline's (GPU) prediction stays within 1.3x of nnU-Net's own predictor on the same
machine; seconds per case with and without test-time augmentation (TTA) are reported.

Variants, each on the same cases, model and device, each in a fresh process (wall time includes the imports):

  pipeline     radstudy.segment.stage.segment_center, the function the segment_center rule's script calls: one
               process for all cases, model loaded once, in-process prediction (npp=0/nps=0, as the rule does), then
               post-processing and QC of every case and qc.tsv.
  nnunet       nnUNetPredictor.predict_from_files (nnU-Net's batch prediction) with nnUNetv2_predict's defaults: -npp 3
               -nps 3 background processes (or $nnUNet_npp / $nnUNet_nps; --npp/--nps), step size 0.5, Gaussian,
               perform_everything_on_device (cuda only), torch threads as nnUNetv2_predict sets them (all cores on CPU,
               1 on CUDA). Initialised like nnUNetv2_predict (initialize_from_trained_model_folder, trainer looked up by
               name, nnUNet_extTrainer=workflow/radstudy/segment/nnunet_trainers for RadstudyTrainer) where that lookup can work;
               where it cannot (a CPU torch with the CUDA torchvision wheel: the lookup imports timm -> torchvision and
               crashes), the same network is built with nnU-Net's get_network_from_plans (exactly what
               nnUNetTrainer.build_network_architecture does, RadstudyTrainer does not override it) and handed to
               manual_initialization. --nnunet-init auto|folder|manual; the table says which was used.
               No post-processing (nnU-Net's predictor does none).
  per-patient  the anti-pattern: segment_center once per patient, each in its own process (model reloaded each time).

Peak memory: VmHWM of the variant's main process (read by the process itself at its end), and the peak of the summed
RSS of its whole process tree (nnU-Net's worker processes included), polled every 0.2 s with psutil.

The pipeline's threads follow config/config.yaml (segmentation.threads), nnU-Net's its own rule; --threads N sets
both. Timings on a busy machine are not comparable: the load average is printed before and after.

    nice .venv/bin/python bench/predict_benchmark.py [--cases 20] [--tta [on|off|both]] [--device cpu|cuda]
        [--realistic] [--variants pipeline,nnunet,per-patient] [--repeats 1] [--out results/benchmarks/predict_benchmark.tsv]

Cases: --realistic uses realistic-size CTs (512x512, 100-160 slices) made by radstudy.demo.cohort's generator and ingested
by radstudy (cached under resources/bench/, see `realistic_cases`; a cohort made by bench/ingest_benchmark.py is
reused); otherwise the first N ingested demo patients of results/ingest/{center} (--center, default C1). The demo
model is trained on the small demo CTs: on realistic CTs it is slow-ish and its masks are poor, which does not matter
for timing (nnU-Net resamples every case to the plans' spacing first).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"
TRAINERS = WORKFLOW / "radstudy" / "nnunet_trainers"
BENCH_ROOT = REPO / "resources" / "bench"
DEFAULT_OUT = REPO / "results" / "benchmarks" / "predict_benchmark.tsv"
VARIANTS = ("pipeline", "nnunet", "per-patient")


# ============================================================================ measuring a process
def run_measured(argv: list[str], *, log: Path, cwd: Path = REPO, env: dict | None = None, poll: float = 0.2) -> dict:
    """Run argv to completion; wall seconds, exit code and memory.

    seconds: from the start to the reaping of the process (os.wait4, exact). tree_max_rss_mb: ru_maxrss from wait4,
    the largest peak RSS of any single process of the tree (the process itself and its reaped descendants).
    tree_sum_rss_mb: the largest sum of the RSS of the process and all its live descendants, polled every `poll` s.
    per_process: {pid: {"peak_rss_mb", "cpu_s", "name"}} of every process seen (peak polled RSS, last polled CPU time)."""
    import psutil

    with open(log, "w") as handle:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        stop = threading.Event()
        peaks: dict[int, list] = {}
        tree_sum = [0]

        def sample() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                total = 0
                try:
                    members = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                for member in members:
                    try:
                        rss = member.memory_info().rss
                        cpu = sum(member.cpu_times()[:2])
                        name = " ".join(member.cmdline()[:3])[:80]
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    entry = peaks.setdefault(member.pid, [0, 0.0, name])
                    entry[0], entry[1] = max(entry[0], rss), cpu
                tree_sum[0] = max(tree_sum[0], total)
                stop.wait(poll)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    return {
        "seconds": seconds,
        "pid": proc.pid,
        "returncode": proc.returncode,
        "tree_max_rss_mb": usage.ru_maxrss / 1024,
        "tree_sum_rss_mb": tree_sum[0] / 2**20,
        "per_process": {pid: {"peak_rss_mb": rss / 2**20, "cpu_s": cpu, "name": name}
                        for pid, (rss, cpu, name) in peaks.items()},
    }


def check_ok(result: dict, log: Path, what: str) -> None:
    if result["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed with exit code {result['returncode']} (log {log}):\n{tail}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def warn_if_busy(cores: int | None = None) -> None:
    cores = cores or os.cpu_count() or 1
    one = os.getloadavg()[0]
    if one > 0.5:
        print(f"WARNING: load average {load_average()} on {cores} core(s) before the run: other work is running, "
              "the timings are disturbed (take final numbers on a quiet machine)")


# ============================================================================ cases
def demo_cases(center: str, n: int) -> list[dict]:
    """First n included patients of an ingested demo center (results/ingest, results/qc)."""
    import pandas as pd

    table = pd.read_csv(REPO / "results" / "qc" / center / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    table = table[table["status"] == "included"].sort_values("patient")
    cases = []
    for patient in table["patient"]:
        image = REPO / "results" / "ingest" / center / patient / "image_CT.nii.gz"
        if image.exists():
            cases.append({"patient": patient, "center": center, "image": image,
                          "mask": REPO / "results" / "segmentation" / center / f"{patient}.nii.gz"})
        if len(cases) == n:
            break
    if len(cases) < n:
        raise SystemExit(f"only {len(cases)} ingested included patients in results/ingest/{center}; run the demo first "
                         "(radstudy demo / snakemake) or ask for fewer --cases")
    return cases


def _realistic_cohorts(root: Path) -> list[tuple[int, Path]]:
    """(patients, folder) of every cached realistic-size demo cohort under root (ground_truth/centers.json)."""
    found = []
    for info in sorted(root.glob("*/ground_truth/centers.json")):
        settings = json.loads(info.read_text()).get("settings", {})
        folder = info.parent.parent
        if settings.get("size") != "realistic" or settings.get("downsample", 1) != 1:
            continue
        truth = folder / "ground_truth" / "patients.tsv"
        n = len(truth.read_text().splitlines()) - 1 if truth.exists() else 0
        found.append((n, folder))
    return sorted(found)


def realistic_cases(n: int, *, root: Path = BENCH_ROOT, seed: int = 3, workers: int = 2) -> list[dict]:
    """n realistic-size patients, ingested by radstudy, with their true label maps (liver 1, tumour 2).

    Reuses the smallest cached realistic cohort under `root` with >= n patients (bench/ingest_benchmark.py's
    resources/bench/ingest has 2); otherwise generates root/realistic_n{n}_s{seed} with radstudy.demo.cohort.generate_cohort
    (one center "B1", DICOM, as the ingest benchmark does; minutes per patient). The first n patients (by pseudonym) are
    ingested with radstudy.ingest.patient.ingest_patient into root/cases/{cohort}/ingest/B1/{pseudonym}/image_CT.nii.gz and
    their true masks (ground_truth/masks, on the portal series' grid) copied to
    root/cases/{cohort}/segmentation/B1/{pseudonym}.nii.gz; both are kept for later runs.
    Returns [{"patient", "center", "image", "mask"}]."""
    sys.path.insert(0, str(WORKFLOW))
    import SimpleITK as sitk

    cohorts = [(count, folder) for count, folder in _realistic_cohorts(root) if count >= n]
    if cohorts:
        cohort = cohorts[0][1]
    else:
        from radstudy.demo.cohort import generate_cohort

        cohort = root / f"realistic_n{n}_s{seed}"
        dicom = cohort / "dicom" / "B1"
        if cohort.exists():
            raise SystemExit(f"{cohort} exists but holds no complete cohort (interrupted?): remove it and run again")
        t0 = time.perf_counter()
        print(f"generating {n} realistic-size patients into {cohort} (seed {seed}, {workers} worker(s)) ...", flush=True)
        generate_cohort([{"id": "B1", "role": "development", "dicom_root": dicom, "clinical": cohort / "clinical.csv"}],
                        cohort, seed=seed, patients=n, size="realistic", annotated_fraction=0.1,
                        rtstruct_per_center=0, workers=workers)
        print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
    centers = json.loads((cohort / "ground_truth" / "centers.json").read_text())["centers"]
    center = centers[0]
    work = root / "cases" / cohort.name
    work.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (work / "centers.tsv").write_text("id\trole\tdicom_root\tclinical\n"
                                      f"B1\tdevelopment\t{center['dicom_root']}\t{center['clinical']}\n")
    config.update(centers=str(work / "centers.tsv"))
    config["pseudonymisation"]["key_file"] = str(work / "key.tsv")
    config["demo"]["enabled"] = False
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    from radstudy.config import load_study
    from radstudy.ingest.patient import ingest_patient
    from radstudy.ingest.pseudonym import assign_pseudonyms

    study = load_study(config_file, base_dir=work)
    key = assign_pseudonyms(study.center("B1"), work / "key.tsv").sort_values("pseudonym")
    cases = []
    for patient, original in list(zip(key["pseudonym"], key["original_id"]))[:n]:
        folder = work / "ingest" / "B1" / patient
        image = folder / "image_CT.nii.gz"
        mask = work / "segmentation" / "B1" / f"{patient}.nii.gz"
        if not image.exists():
            t0 = time.perf_counter()
            record = ingest_patient(study, "B1", patient, folder)
            if record["status"] != "included":
                raise RuntimeError(f"{patient}: ingestion excluded the patient: {record}")
            print(f"ingested {patient} in {time.perf_counter() - t0:.0f} s", flush=True)
        if not mask.exists():
            truth = sitk.ReadImage(str(cohort / "ground_truth" / "masks" / "B1" / f"{original}.nii.gz"))
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(image))
            reader.ReadImageInformation()
            if tuple(truth.GetSize()) != tuple(reader.GetSize()):
                raise RuntimeError(f"{patient}: the true mask is not on the ingested image's grid")
            truth.SetOrigin(reader.GetOrigin())
            truth.SetSpacing(reader.GetSpacing())
            truth.SetDirection(reader.GetDirection())
            mask.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.Cast(truth, sitk.sitkUInt8), str(mask), useCompression=True)
        cases.append({"patient": patient, "center": "B1", "image": image, "mask": mask})
    if len(cases) < n:
        raise SystemExit(f"{cohort} yielded only {len(cases)} patients")
    return cases


def link_layout(cases: list[dict], ingest_root: Path) -> None:
    """ingest_root/{center}/{patient}/image_CT.nii.gz -> each case's image (the layout segment_center reads)."""
    for case in cases:
        folder = ingest_root / case["center"] / case["patient"]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "image_CT.nii.gz"
        if not link.exists():
            link.symlink_to(Path(case["image"]).resolve())


def write_qc_table(cases: list[dict], path: Path) -> None:
    """The ingest QC table segment_center reads (results/qc/{center}/patients.tsv): these cases, all included."""
    rows = ["patient\tcenter\trole\tstatus\tannotated"]
    rows += [f"{c['patient']}\t{c['center']}\tdevelopment\tincluded\tFalse" for c in cases]
    path.write_text("\n".join(rows) + "\n")


# ============================================================================ model and nnU-Net initialisation
def find_model(root: Path = REPO / "resources" / "nnunet") -> Path:
    found = sorted(p.parent for p in root.rglob("plans.json") if (p.parent / "fold_all" / "checkpoint_final.pth").exists())
    if not found:
        raise SystemExit(f"no trained nnU-Net model (plans.json + fold_all/checkpoint_final.pth) under {root}: --model")
    return found[0]


def model_folds(model: Path) -> list[str]:
    available = sorted(p.name[len("fold_"):] for p in model.glob("fold_*") if (p / "checkpoint_final.pth").exists())
    return ["all"] if "all" in available else available


def _local_tag(package: str) -> str | None:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return version.split("+", 1)[1] if "+" in version else ""


def choose_nnunet_init(requested: str) -> tuple[str, str]:
    """'folder' (initialize_from_trained_model_folder, as nnUNetv2_predict) or 'manual', and why. auto: 'folder' unless
    the trainer lookup is known to fail here: nnU-Net's module scan imports timm -> torchvision, which fails when
    torchvision is missing or not built for this torch (e.g. torch 2.x+cpu with the PyPI CUDA torchvision: the local
    version tags differ). Decided from the installed packages' metadata, without importing torchvision."""
    if requested != "auto":
        return requested, f"--nnunet-init {requested}"
    torch_tag, vision_tag = _local_tag("torch"), _local_tag("torchvision")
    if vision_tag is None:
        return "manual", "torchvision is not installed: nnU-Net's trainer lookup (timm -> torchvision) cannot work"
    if torch_tag != vision_tag:
        return "manual", (f"torch {metadata.version('torch')} and torchvision {metadata.version('torchvision')} are "
                          "different builds: nnU-Net's trainer lookup would crash importing timm -> torchvision")
    return "folder", "torch and torchvision builds match: nnU-Net's own initialize_from_trained_model_folder"


# ============================================================================ the measured processes
_PREAMBLE = r"""
import json, sys, time
T0 = time.perf_counter()
def vmhwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
"""

PIPELINE = _PREAMBLE + r"""
def main():
    workflow, config_file, center, qc, ingest_root, model, out, log, result = sys.argv[1:10]
    sys.path.insert(0, workflow)  # as workflow/scripts/segment_center.py does
    import yaml
    from radstudy.segment import stage as segmentation_stage
    from radstudy.config import load_study
    from radstudy.logs import setup
    setup(log)
    t1 = time.perf_counter()
    from pathlib import Path
    ingest_dirs = [d for d in (Path(ingest_root) / center).iterdir() if d.is_dir()]
    table = segmentation_stage.segment_center(load_study(yaml.safe_load(open(config_file))), center, qc, ingest_dirs,
                                              model, out)
    t2 = time.perf_counter()
    json.dump({"import_s": t1 - T0, "call_s": t2 - t1, "vmhwm_mb": vmhwm_mb(), "cases": len(table),
               "statuses": table["status"].value_counts().to_dict()}, open(result, "w"))

if __name__ == "__main__":
    main()
"""

NNUNET = _PREAMBLE + r"""
def main():
    model, folds, lists, device, tta, npp, nps, threads, init, result = sys.argv[1:11]
    import multiprocessing, os
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    device = torch.device(device)
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    elif device.type == "cpu":  # what nnUNetv2_predict does
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    t1 = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta == "on",
                                perform_everything_on_device=True, device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    folds = folds.split(",")
    if init == "folder":
        predictor.initialize_from_trained_model_folder(model, folds, checkpoint_name="checkpoint_final.pth")
    else:  # initialize_from_trained_model_folder, with get_network_from_plans instead of the trainer lookup by name
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        dataset_json = load_json(join(model, "dataset.json"))
        plans_manager = PlansManager(load_json(join(model, "plans.json")))
        parameters = []
        for i, f in enumerate(folds):
            checkpoint = torch.load(join(model, f"fold_{f}", "checkpoint_final.pth"), map_location=torch.device("cpu"),
                                    weights_only=False)
            if i == 0:
                trainer_name = checkpoint["trainer_name"]
                configuration_name = checkpoint["init_args"]["configuration"]
                mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
            parameters.append(checkpoint["network_weights"])
        configuration_manager = plans_manager.get_configuration(configuration_name)
        network = get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, allow_init=True,
            deep_supervision=False)
        network.load_state_dict(parameters[0])
        predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                        trainer_name, mirror_axes)
    t2 = time.perf_counter()
    inputs, outputs = json.load(open(lists))
    predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=int(npp), num_processes_segmentation_export=int(nps))
    t3 = time.perf_counter()
    json.dump({"import_s": t1 - T0, "init_s": t2 - t1, "call_s": t3 - t2, "vmhwm_mb": vmhwm_mb(),
               "cases": len(outputs), "torch_threads": torch.get_num_threads()}, open(result, "w"))

if __name__ == "__main__":
    main()
"""


def _study_config(tmp: Path, *, device: str, tta: bool, threads: int | None) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = str(REPO / config["centers"]) if not Path(config["centers"]).is_absolute() else config["centers"]
    config["segmentation"]["gpu"] = device == "cuda"
    config["segmentation"]["tta"] = bool(tta)
    if threads:
        config["segmentation"]["threads"] = int(threads)
    path = tmp / f"config_tta-{'on' if tta else 'off'}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_pipeline(cases: list[dict], tmp: Path, tag: str, model: Path, config_file: Path, ingest_root: Path) -> dict:
    out = tmp / tag
    shutil.rmtree(out, ignore_errors=True)
    qc = tmp / f"{tag}.patients.tsv"
    write_qc_table(cases, qc)
    result_file, log = tmp / f"{tag}.json", tmp / f"{tag}.log"
    result = run_measured([sys.executable, "-c", PIPELINE, str(WORKFLOW), str(config_file), cases[0]["center"], str(qc),
                           str(ingest_root), str(model), str(out), str(tmp / f"{tag}.radstudy.log"), str(result_file)],
                          log=log)
    check_ok(result, log, f"pipeline run {tag}")
    result.update(json.loads(result_file.read_text()))
    result["out"] = out
    return result


def run_nnunet(cases: list[dict], tmp: Path, tag: str, model: Path, *, device: str, tta: bool, npp: int, nps: int,
               threads: int | None, init: str) -> dict:
    out = tmp / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lists = tmp / f"{tag}.lists.json"
    lists.write_text(json.dumps([[[str(c["image"])] for c in cases], [str(out / c["patient"]) for c in cases]]))
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = str(TRAINERS)  # where nnU-Net's lookup by name finds RadstudyTrainer (init "folder")
    result_file, log = tmp / f"{tag}.json", tmp / f"{tag}.log"
    result = run_measured([sys.executable, "-c", NNUNET, str(model), ",".join(model_folds(model)), str(lists), device,
                           "on" if tta else "off", str(npp), str(nps), str(threads or 0), init, str(result_file)],
                          log=log, env=env)
    check_ok(result, log, f"nnU-Net run {tag}")
    result.update(json.loads(result_file.read_text()))
    result["out"] = out
    return result


def agreement(a: Path, b: Path, cases: list[dict]) -> float:
    """Mean fraction of voxels with the same label in two output folders (pipeline: after post-processing)."""
    import numpy as np
    import SimpleITK as sitk

    fractions = []
    for case in cases:
        x = sitk.GetArrayViewFromImage(sitk.ReadImage(str(a / f"{case['patient']}.nii.gz")))
        y = sitk.GetArrayViewFromImage(sitk.ReadImage(str(b / f"{case['patient']}.nii.gz")))
        fractions.append(float(np.mean(x == y)))
    return float(np.mean(fractions))


def _nnunet_default_processes() -> tuple[int, int]:
    """nnUNetv2_predict's -npp / -nps defaults: 3, or $nnUNet_npp / $nnUNet_nps."""
    return int(os.environ.get("nnUNet_npp", "3")), int(os.environ.get("nnUNet_nps", "3"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    parser.add_argument("--tta", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                        help="test-time augmentation (mirroring): --tta alone = on; 'both' runs every variant twice")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--realistic", action="store_true", help="realistic-size CTs (512x512, 100-160 slices)")
    parser.add_argument("--center", default="C1", help="demo center whose ingested patients are used (not --realistic)")
    parser.add_argument("--model", type=Path, help="nnU-Net model folder (default: the one under resources/nnunet)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--npp", type=int, help="nnU-Net's preprocessing processes (default: nnUNetv2_predict's, 3)")
    parser.add_argument("--nps", type=int, help="nnU-Net's export processes (default: nnUNetv2_predict's, 3)")
    parser.add_argument("--threads", type=int, help="torch threads for every variant (default: each its own rule)")
    parser.add_argument("--nnunet-init", default="auto", choices=["auto", "folder", "manual"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (alternating); the best is reported")
    parser.add_argument("--seed", type=int, default=3, help="demo seed of a generated realistic cohort")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"TSV of the results (default {DEFAULT_OUT})")
    parser.add_argument("--keep", type=Path, help="keep the segmentations and logs in this folder")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}")

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cpu cores visible: {os.cpu_count()}; load average {load_average()}")
    warn_if_busy()
    model = (args.model or find_model()).resolve()
    init, why = choose_nnunet_init(args.nnunet_init)
    npp_default, nps_default = _nnunet_default_processes()
    npp, nps = args.npp if args.npp is not None else npp_default, args.nps if args.nps is not None else nps_default
    cases = realistic_cases(args.cases, seed=args.seed) if args.realistic else demo_cases(args.center, args.cases)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(cases[0]["image"]))
    reader.ReadImageInformation()
    size_text = f"{'realistic' if args.realistic else 'demo'} CTs, first {'x'.join(map(str, reader.GetSize()))}"
    print(f"{len(cases)} cases ({size_text}); model {model.relative_to(REPO) if model.is_relative_to(REPO) else model} "
          f"fold(s) {','.join(model_folds(model))}; device {args.device}")
    print(f"nnU-Net variant: init {init} ({why}); npp {npp}, nps {nps}")

    tmp = Path(tempfile.mkdtemp(prefix="predict_bench_")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    ingest_root = tmp / "ingest"
    link_layout(cases, ingest_root)
    tta_values = {"off": [False], "on": [True], "both": [False, True]}[args.tta]
    rows = []
    try:
        for tta in tta_values:
            config_file = _study_config(tmp, device=args.device, tta=tta, threads=args.threads)
            pipeline_threads = yaml.safe_load(config_file.read_text())["segmentation"]["threads"]
            best: dict[str, dict] = {}
            for repeat in range(args.repeats):
                suffix = f"tta-{'on' if tta else 'off'}_r{repeat}"
                for variant in variants:
                    if variant == "pipeline":
                        r = run_pipeline(cases, tmp, f"pipeline_{suffix}", model, config_file, ingest_root)
                    elif variant == "nnunet":
                        r = run_nnunet(cases, tmp, f"nnunet_{suffix}", model, device=args.device, tta=tta, npp=npp,
                                       nps=nps, threads=args.threads, init=init)
                    else:
                        parts = [run_pipeline([c], tmp, f"per-patient_{suffix}_{c['patient']}", model, config_file,
                                              ingest_root) for c in cases]
                        r = {"seconds": sum(p["seconds"] for p in parts),
                             "vmhwm_mb": max(p["vmhwm_mb"] for p in parts),
                             "tree_max_rss_mb": max(p["tree_max_rss_mb"] for p in parts),
                             "tree_sum_rss_mb": max(p["tree_sum_rss_mb"] for p in parts),
                             "import_s": sum(p["import_s"] for p in parts), "call_s": sum(p["call_s"] for p in parts),
                             "processes": len(parts)}
                    print(f"  {variant:<12} tta {'on ' if tta else 'off'} run {repeat + 1}: {r['seconds']:.1f} s "
                          f"(load average {load_average()})", flush=True)
                    if variant not in best or r["seconds"] < best[variant]["seconds"]:
                        best[variant] = r
            if "pipeline" in best and "nnunet" in best:
                best["pipeline"]["agreement"] = agreement(best["pipeline"]["out"], best["nnunet"]["out"], cases)
            reference = best.get("nnunet", {}).get("seconds")
            for variant in variants:
                r = best[variant]
                threads = (r.get("torch_threads") if variant == "nnunet" else pipeline_threads)
                processes = {"pipeline": 1, "nnunet": f"1+{npp}+{nps}", "per-patient": len(cases)}[variant]
                rows.append({
                    "variant": variant, "device": args.device, "tta": "on" if tta else "off", "cases": len(cases),
                    "ct_size": "realistic" if args.realistic else "demo", "seconds": round(r["seconds"], 2),
                    "seconds_per_case": round(r["seconds"] / len(cases), 2),
                    "ratio_to_nnunet": round(r["seconds"] / reference, 3) if reference else "",
                    "peak_rss_main_mb": round(r["vmhwm_mb"]), "peak_rss_tree_sum_mb": round(r["tree_sum_rss_mb"]),
                    "import_s": round(r["import_s"], 1), "torch_threads": threads, "processes": processes,
                    "nnunet_init": init if variant == "nnunet" else "",
                    "label_agreement_with_nnunet": round(r["agreement"], 4) if "agreement" in r else "",
                    "repeats": args.repeats, "load_average_after": load_average(),
                })
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    _print_table(rows)
    for tta in sorted({r["tta"] for r in rows}):
        pipe = [r for r in rows if r["tta"] == tta and r["variant"] == "pipeline"]
        if pipe and pipe[0]["ratio_to_nnunet"] != "":
            ratio = pipe[0]["ratio_to_nnunet"]
            print(f"tta {tta}: pipeline / nnU-Net = {ratio:.2f} (target <= 1.3 on the GPU machine): "
                  f"{'PASS' if ratio <= 1.3 else 'FAIL'}{'' if args.device == 'cuda' else ' [measured on CPU]'}")
    import pandas as pd

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False)
    print(f"written {args.out}")
    if args.keep is not None:
        print(f"segmentations and logs kept in {tmp}")
    return 0


def _print_table(rows: list[dict]) -> None:
    header = (f"{'variant':<12} {'tta':<4} {'cases':>5} {'seconds':>9} {'s/case':>8} {'x nnU-Net':>9} "
              f"{'peak RSS main MB':>16} {'peak RSS tree MB':>16} {'threads':>7} {'processes':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['ratio_to_nnunet']:.2f}" if r["ratio_to_nnunet"] != "" else "-"
        print(f"{r['variant']:<12} {r['tta']:<4} {r['cases']:>5} {r['seconds']:>9.1f} {r['seconds_per_case']:>8.2f} "
              f"{ratio:>9} {r['peak_rss_main_mb']:>16} {r['peak_rss_tree_sum_mb']:>16} {r['torch_threads']!s:>7} "
              f"{r['processes']!s:>9}")
    print("peak RSS main: VmHWM of the variant's process (per-patient: the largest of its processes); tree: the largest "
          "polled sum over the process and its workers")


if __name__ == "__main__":
    sys.exit(main())
