"""DAG building and a dry run of the real Snakefile for a study of 10 centers x 100 patients (1,000 patients).

Target (issue "Scale-out"): `snakemake -n` under 30 s on the development machine (2 CPU cores).

The study is synthetic and cheap: no image is generated. What the DAG reads is written as the rules would
leave it, with stub (empty) files everywhere else:

    resources/dicom/{center}/                      the delivered folder (a dry run only stats it)
    resources/clinical/{center}.csv                the delivered clinical table (stub)
    results/ingest/{center}/patients.tsv           discover checkpoint: the `patient` column is read
    results/ingest/{center}/{patient}/             ingest_patient: image, manual mask, qc.json (stubs)
    results/clinical/{center}.tsv|.json            clinical_table (stubs)
    results/qc/{center}/patients.tsv               center_qc (stub)
    resources/nnunet/{raw,preprocessed,results}    nnunet_dataset / plan / train (stubs), split.tsv
    results/segmentation/{center}/                 segment_center checkpoint: {patient}.nii.gz stubs and
                                                   qc.tsv, whose `patient` and `status` columns are read

Every stage's files get a later modification time than the stage before it (and than the rules' scripts).
Three states are timed:

    discovered only the delivery and the discovery tables: the dry run lists one ingestion job per patient, the
               per-center jobs and nnU-Net; the segmentation checkpoints are still to run
    segmented  up to date through segmentation: the dry run lists one radiomics job per patient plus the study-level jobs
    complete   every output present (features and study-level stubs too): "Nothing to be done"

Each dry run is a fresh `snakemake` process (parsing, DAG, checkpoints, mtimes); best of --repeats.

    .venv/bin/python bench/dag_benchmark.py [--centers 10] [--patients 100] [--repeats 3] [--workdir resources/bench/dag]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from radstudy.config import validate_config
from radstudy.statistics.models import STATISTICS_TABLES, fitted_models

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TARGET_S = 30.0


class Stub:
    """Writes files stage by stage; each stage's files (and directories) get the stage's modification time."""

    def __init__(self, root: Path, t0: float):
        self.root = root
        self.t0 = t0
        self.stage = 0
        self.paths: list[Path] = []

    def file(self, rel: str, text: str = "") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.paths.append(path)
        return path

    def dir(self, rel: str) -> Path:
        path = self.root / rel
        path.mkdir(parents=True, exist_ok=True)
        self.paths.append(path)
        return path

    def done(self) -> None:
        """Close a stage: files first, then their directories (writing a file changes its folder's mtime)."""
        t = self.t0 + 2 * self.stage
        for path in sorted(self.paths, key=lambda p: (p.is_dir(), -len(p.parts))):
            os.utime(path, (t, t))
        self.stage += 1
        self.paths = []


def _start() -> float:
    """The first stage's time: a minute ago, but after the last edit of a rule's script (Snakemake reruns a job
    whose outputs are older than its script)."""
    scripts = max(p.stat().st_mtime for p in (REPO / "workflow" / "scripts").glob("*"))
    return max(time.time() - 60, scripts + 1)


def _after(workdir: Path) -> float:
    """A start time after every file written so far."""
    return max(_start(), max(p.stat().st_mtime for p in workdir.rglob("*") if p.is_file()) + 1)


def _tsv(rows: list[dict]) -> str:
    header = list(rows[0])
    return "\n".join(["\t".join(header), *("\t".join(str(r[h]) for h in header) for r in rows)]) + "\n"


def make_study(workdir: Path, n_centers: int, n_patients: int) -> dict:
    """The synthetic study's config, centers sheet, delivery and discovery tables; returns {center: [patients]}."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = "centers.tsv"
    config["demo"]["enabled"] = False
    config["pseudonymisation"]["key_file"] = "resources/private/pseudonym_key.tsv"
    params = workdir / "radiomics.yaml"
    shutil.copy(REPO / config["features"]["radiomics"]["params"], params)
    config["features"]["radiomics"]["params"] = params.name
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    centers = [f"C{i:02d}" for i in range(1, n_centers + 1)]
    roles = {c: "external" if i >= n_centers - max(1, n_centers // 5) else "development" for i, c in enumerate(centers)}
    (workdir / "centers.tsv").write_text(
        "id\trole\tdicom_root\tclinical\n"
        + "".join(f"{c}\t{roles[c]}\tresources/dicom/{c}\tresources/clinical/{c}.csv\n" for c in centers)
    )
    patients = {c: [f"{c}-{k:04d}" for k in range(1, n_patients + 1)] for c in centers}

    s = Stub(workdir, _start())
    for c in centers:  # the delivery
        s.dir(f"resources/dicom/{c}")
        s.file(f"resources/dicom/{c}/{c}_P001/IM0001")
        s.file(f"resources/clinical/{c}.csv", "patient_id,age\n")
    s.file(params.name, params.read_text())
    s.done()
    for c in centers:  # discover (checkpoint)
        s.file(f"results/ingest/{c}/patients.tsv", _tsv([{"patient": p, "center": c, "role": roles[c]} for p in patients[c]]))
    s.done()
    return patients


def segment_study(workdir: Path, patients: dict) -> None:
    """Ingestion, clinical tables, center QC, nnU-Net and every center's segmentation, later than the discovery."""
    centers = list(patients)
    n_patients = len(patients[centers[0]])
    annotated = {p for c in centers for p in patients[c][: max(1, n_patients * 3 // 10)]}
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    s = Stub(workdir, _after(workdir))
    for c in centers:  # ingest_patient, clinical_table
        for p in patients[c]:
            s.dir(f"results/ingest/{c}/{p}")
            s.file(f"results/ingest/{c}/{p}/image_CT.nii.gz")
            s.file(f"results/ingest/{c}/{p}/qc.json", "{}")
            if p in annotated:
                s.file(f"results/ingest/{c}/{p}/mask_manual.nii.gz")
        s.file(f"results/clinical/{c}.tsv")
        s.file(f"results/clinical/{c}.json", "{}")
    s.done()
    for c in centers:  # center_qc
        s.file(f"results/qc/{c}/patients.tsv")
    s.done()
    seg = validate_config(config)["segmentation"]  # with the schema's defaults
    dataset = f"Dataset{seg['dataset_id']:03d}_{seg['dataset_name']}"
    nnunet = seg["work_dir"]
    s.dir(f"{nnunet}/raw/{dataset}")
    s.file(f"{nnunet}/raw/{dataset}/dataset.json", "{}")
    s.file("results/segmentation/split.tsv")
    s.done()
    s.dir(f"{nnunet}/preprocessed/{dataset}")
    s.file(f"{nnunet}/preprocessed/{dataset}/nnUNetPlans.json", "{}")
    s.done()
    model = f"{nnunet}/results/{dataset}/RadstudyTrainer__nnUNetPlans__{seg['configuration']}"
    s.dir(model)  # nnunet_train's output: the model folder
    s.file(f"{model}/fold_all/checkpoint_final.pth")
    s.done()
    for c in centers:  # segment_center (checkpoint)
        s.dir(f"results/segmentation/{c}")
        for p in patients[c]:
            s.file(f"results/segmentation/{c}/{p}.nii.gz")
        s.file(f"results/segmentation/{c}/qc.tsv", _tsv([{"patient": p, "center": c, "status": "included"} for p in patients[c]]))
    s.done()


def complete_study(workdir: Path, patients: dict) -> None:
    """Features and every study-level output, later than the segmentation: nothing left to do."""
    s = Stub(workdir, _after(workdir))
    for c, ps in patients.items():
        for p in ps:
            s.file(f"results/features/{c}/{p}.parquet")
        for suffix in ("parquet", "issues.tsv", "meta.json"):  # deep features (features.deep.enabled)
            s.file(f"results/features/deep/{c}.{suffix}")
    for suffix in ("tsv", "png", "pdf"):
        s.file(f"results/segmentation/dsc.{suffix}")
    s.done()
    for rel in ["results/features/features.parquet", "results/features/features.meta.json", "results/features/qc.tsv"]:
        s.file(rel)
    s.done()
    for rel in ["qc/patients.tsv", "qc/exclusions.tsv", "qc/patient_flow.tsv", "clinical/clinical.tsv"]:
        s.file(f"results/{rel}")
    s.done()
    s.file("results/report/baseline.tsv")
    for rel in STATISTICS_TABLES:
        s.file(f"results/models/{rel}.tsv")
    for endpoint, model in fitted_models(yaml.safe_load((workdir / "config.yaml").read_text())):
        s.file(f"results/models/{endpoint}/{model}.joblib")
    s.done()
    s.file("results/report/report.html")
    s.dir("results/report/evaluation")
    s.done()


def dry_run(workdir: Path, *extra: str) -> tuple[float, str]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "2", "-n", *extra]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"dry run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return seconds, run.stdout + run.stderr


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's `Job stats` table (rule, count) of a dry run; {} when there is nothing to be done."""
    counts = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Job stats:"):
            for row in lines[i + 3:]:
                m = re.match(r"^(\S+)\s+(\d+)$", row.strip())
                if not m:
                    break
                counts[m.group(1)] = int(m.group(2))
            break
    return counts


def measure(workdir: Path, state: str, repeats: int) -> dict:
    times, counts = [], {}
    for _ in range(repeats):
        seconds, output = dry_run(workdir)
        times.append(seconds)
        counts = job_counts(output)
        nothing = "Nothing to be done" in output
    print(f"{state:10s} best {min(times):6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})  "
          f"jobs: {counts.get('total', 0)}{'  [nothing to be done]' if nothing else ''}")
    for rule, n in counts.items():
        if rule != "total":
            print(f"{'':12s}{rule:24s}{n:6d}")
    return {"state": state, "best_s": min(times), "times_s": times, "jobs": counts, "nothing_to_do": nothing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--centers", type=int, default=10)
    parser.add_argument("--patients", type=int, default=100, help="per center")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "resources" / "bench" / "dag")
    args = parser.parse_args()

    t0 = time.perf_counter()
    patients = make_study(args.workdir.resolve(), args.centers, args.patients)
    n = sum(len(p) for p in patients.values())
    print(f"synthetic study: {args.centers} centers x {args.patients} patients = {n} patients "
          f"({time.perf_counter() - t0:.1f} s to write) in {args.workdir}")
    results = [measure(args.workdir.resolve(), "discovered", args.repeats)]
    segment_study(args.workdir.resolve(), patients)
    results.append(measure(args.workdir.resolve(), "segmented", args.repeats))
    complete_study(args.workdir.resolve(), patients)
    results.append(measure(args.workdir.resolve(), "complete", args.repeats))
    worst = max(r["best_s"] for r in results)
    print(f"target: under {TARGET_S:.0f} s: {'met' if worst < TARGET_S else 'NOT met'} (slowest state best {worst:.2f} s)")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
