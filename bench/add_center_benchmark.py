"""Rerun after adding a center: is the per-patient work of the rerun proportional to the new center's patients?

Target (issue "Scale-out"): rerunning `snakemake` after a center of n patients joins a study of N recomputes the
per-patient and per-center work of the new center only, so the rerun's wall time over the full run's is close to
n/N of the per-patient share plus the study-level share (harmonization, selection, models, evaluation, report).

Steps, in a scratch working directory (--work; the repository's Snakefile, its config/ copied):

  1. full run   the demo study as shipped (config/config.yaml, config/centers.tsv: 4 centers), `snakemake --cores 2`
                with the local profile, timed (or --study DIR: a copy of a directory where it already ran, whose
                Snakemake log is then read for the full run's numbers).
  2. new data   the demo generator writes the same cohort with one more center (C5, --patients n, --role); only
                C5's delivery (DICOM folder, clinical CSV) is kept, under delivered/, as a hospital would send it.
  3. rerun      config: demo.enabled false (the data is delivered, nothing to generate), centers sheet + one row for
                C5. A dry run lists the jobs (none of C1..C4 may appear), then `snakemake --cores 2`, timed.

Each run's Snakemake log gives every job's start and end (1 s resolution): the jobs are summed by kind --
per patient / per center (ingestion, segmentation, radiomics, deep features: the work proportional to patients),
nnU-Net (dataset, planning, training: one-off), study level (everything else) -- and the job-seconds and wall
times compared.

    nice .venv/bin/python bench/add_center_benchmark.py [--patients 30] [--role external] [--work DIR]
        [--study DIR] [--out results/benchmarks/add_center_benchmark.tsv]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "bench"))

from predict_benchmark import load_average, warn_if_busy

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
NEW = "C5"
NNUNET = {"nnunet_dataset", "nnunet_plan", "nnunet_train"}
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
ELAPSED = re.compile(r"^Elapsed time: (\d+):(\d\d):(\d\d(?:\.\d+)?)$")


def parse_log(text: str) -> tuple[pd.DataFrame, float | None]:
    """Every job of a Snakemake run's log: rule, center, patient, start, end, seconds; and the elapsed time."""
    jobs: dict[int, dict] = {}
    stamp, elapsed = None, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := STAMP.match(line):
            stamp = dt.datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        elif match := JOB.match(line):
            fields = {}
            for follow in lines[i + 1:]:
                if not follow.startswith("    "):
                    break
                key, _, value = follow.strip().partition(": ")
                fields[key] = value
            wildcards = dict(item.split("=", 1) for item in fields.get("wildcards", "").split(", ") if "=" in item)
            jobs[int(fields["jobid"])] = {"rule": match.group(1), "center": wildcards.get("center", ""),
                                          "patient": wildcards.get("patient", ""), "start": stamp}
        elif (match := FINISHED.match(line)) and int(match.group(1)) in jobs:
            jobs[int(match.group(1))]["end"] = stamp
        elif match := ELAPSED.match(line):
            elapsed = int(match.group(1)) * 3600 + int(match.group(2)) * 60 + float(match.group(3))
    table = pd.DataFrame(jobs.values(), columns=["rule", "center", "patient", "start", "end"])
    table["seconds"] = (pd.to_datetime(table["end"]) - pd.to_datetime(table["start"])).dt.total_seconds()
    return table, elapsed


def kind(row) -> str:
    if row["rule"] in NNUNET:
        return "nnunet"
    if row["rule"] == "demo_cohort":
        return "demo"  # generating the synthetic cohort: not part of a real study's run
    return "per_center" if row["center"] else "study"


def snakemake(work: Path, config: Path, *args: str) -> tuple[int, str, float]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(config),
           "--workflow-profile", str(REPO / "workflow" / "profiles" / "default"), "--cores", "2", *args]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
    return run.returncode, run.stdout + run.stderr, time.perf_counter() - t0


def newest_log(work: Path, before: set[Path]) -> str:
    logs = sorted(set((work / ".snakemake" / "log").glob("*.snakemake.log")) - before)
    return logs[-1].read_text()


def deliver_new_center(work: Path, patients: int, role: str) -> None:
    """The demo generator's cohort with C5 appended; C5's delivery copied to delivered/ (the rest discarded)."""
    from radstudy.demo import stage as demo
    from radstudy.config import load_study

    gen = work / "generator"
    shutil.rmtree(gen, ignore_errors=True)
    gen.mkdir()
    sheet = pd.read_csv(work / "config" / "centers.tsv", sep="\t")
    sheet = pd.concat([sheet, pd.DataFrame([{"id": NEW, "role": role, "dicom_root": f"dicom/{NEW}",
                                             "clinical": f"clinical/{NEW}.csv"}])])
    sheet["dicom_root"] = [f"dicom/{c}" for c in sheet["id"]]
    sheet["clinical"] = [f"clinical/{c}.csv" for c in sheet["id"]]
    sheet.to_csv(gen / "centers.tsv", sep="\t", index=False)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["centers"] = "centers.tsv"
    config["demo"].update(out_dir=".", patients=patients)
    cwd = os.getcwd()
    os.chdir(gen)
    try:
        demo.generate(load_study(config))
    finally:
        os.chdir(cwd)
    delivered = work / "delivered"
    shutil.rmtree(delivered, ignore_errors=True)
    (delivered / "clinical").mkdir(parents=True)
    shutil.move(gen / "dicom" / NEW, delivered / NEW)
    shutil.move(gen / "clinical" / f"{NEW}.csv", delivered / "clinical" / f"{NEW}.csv")
    shutil.rmtree(gen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=30, help="patients of the new center (default 30)")
    parser.add_argument("--role", default="external", choices=["external", "development"])
    parser.add_argument("--work", type=Path, default=REPO / "resources" / "bench" / "add_center")
    parser.add_argument("--study", type=Path, help="a directory where the demo already ran (copied, not rerun)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "add_center_benchmark.tsv")
    args = parser.parse_args()
    print("Command:", " ".join([sys.executable, *sys.argv]), flush=True)
    warn_if_busy()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    if args.study:
        shutil.copytree(args.study, work, symlinks=True, ignore=shutil.ignore_patterns(".git", "locks", "incomplete"))
        logs = sorted((work / ".snakemake" / "log").glob("*.snakemake.log"), key=lambda p: len(p.read_text()))
        full_log, full_wall = logs[-1].read_text(), None  # the longest log: the full run
        print(f"full run: read from {args.study} ({logs[-1].name})")
    else:
        work.mkdir(parents=True)
        shutil.copytree(REPO / "config", work / "config")
        print(f"full run: the demo study in {work} (load average {load_average()}) ...", flush=True)
        code, output, full_wall = snakemake(work, work / "config" / "config.yaml")
        if code != 0:
            print(output[-5000:])
            return 1
        full_log = newest_log(work, set())
    full, full_elapsed = parse_log(full_log)
    full_wall = full_wall or full_elapsed

    print(f"new center {NEW}: {args.patients} patients, role {args.role} (demo generator) ...", flush=True)
    deliver_new_center(work, args.patients, args.role)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["demo"]["enabled"] = False
    config["centers"] = "config/centers_added.tsv"
    (work / "config" / "config_added.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sheet = (work / "config" / "centers.tsv").read_text().rstrip("\n") + "\n"
    sheet += f"{NEW}\t{args.role}\tdelivered/{NEW}\tdelivered/clinical/{NEW}.csv\n"
    (work / "config" / "centers_added.tsv").write_text(sheet)
    added_config = work / "config" / "config_added.yaml"

    code, dry, _ = snakemake(work, added_config, "--dry-run")
    if code != 0:
        print(dry[-5000:])
        return 1
    planned = parse_log(dry)[0]
    touched = sorted({c for c in planned["center"] if c and c != NEW})
    print(f"dry run: {len(planned)} jobs ({planned.groupby('rule').size().to_dict()}); "
          f"jobs of existing centers: {touched or 'none'}")

    before = set((work / ".snakemake" / "log").glob("*.snakemake.log"))
    print(f"rerun (load average {load_average()}) ...", flush=True)
    code, output, rerun_wall = snakemake(work, added_config)
    if code != 0:
        print(output[-5000:])
        return 1
    rerun, _ = parse_log(newest_log(work, before))

    rows = []
    for name, table, wall in (("full", full, full_wall), ("rerun", rerun, rerun_wall)):
        table["kind"] = table.apply(kind, axis=1)
        sums = table.groupby("kind")["seconds"].sum()
        counts = table.groupby("kind").size()
        patients = table.loc[table["patient"] != "", ["center", "patient"]].drop_duplicates()
        rows.append({"run": name, "wall_s": round(wall, 1), "jobs": len(table),
                     "patients_with_jobs": len(patients),
                     "centers": ",".join(sorted({c for c in table["center"] if c})),
                     **{f"{k}_jobs": int(counts.get(k, 0)) for k in ("per_center", "nnunet", "study")},
                     **{f"{k}_job_s": float(sums.get(k, 0.0)) for k in ("per_center", "nnunet", "study")}})
    result = pd.DataFrame(rows)
    full_row, rerun_row = result.iloc[0], result.iloc[1]
    n_new = int(rerun_row["patients_with_jobs"])
    n_old = int(full_row["patients_with_jobs"])
    per, nnunet, study = (full_row[f"{k}_job_s"] for k in ("per_center", "nnunet", "study"))
    ratio = {
        # the new center's patients over the study's, and its per-patient/per-center work over the full run's
        "patients n/N": n_new / n_old,
        "per-center job-seconds rerun/full": rerun_row["per_center_job_s"] / per,
        "study-level job-seconds rerun/full": rerun_row["study_job_s"] / study,
        "nnU-Net jobs in the rerun": rerun_row["nnunet_jobs"],
        # if the per-patient work scales with patients and the study level reruns whole, nnU-Net not at all
        "wall expected rerun/full": (n_new / n_old * per + study) / (per + study + nnunet),
        "wall measured rerun/full": rerun_row["wall_s"] / full_row["wall_s"],
    }
    pd.set_option("display.width", 200)
    print(result.to_string(index=False))
    for key, value in ratio.items():
        print(f"  {key}: {value:.3f}")
    by_rule = rerun.groupby("rule").agg(jobs=("seconds", "size"), job_s=("seconds", "sum"))
    print("rerun jobs by rule:\n" + by_rule.to_string())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.assign(**{re.sub(r"\W+", "_", k): v for k, v in ratio.items()}).to_csv(args.out, sep="\t", index=False)
    print(f"written {args.out}")
    return 0 if not touched else 1


if __name__ == "__main__":
    sys.exit(main())
