"""Radiomics of N realistic-size patients (tumour + liver): radstudy's per-patient jobs vs pyradiomics' batch command.

Target (features issue): for 20 realistic-size patients with tumour and liver and the default image types
(config/radiomics/ct.yaml: original, LoG 1/2/3 mm, 8 wavelet decompositions, all classes, 1 mm isotropic), the total
time is no more than pyradiomics' own batch command on the same cases, parameters and cores, and the peak memory
of every job stays under 4 GB.

  radstudy     radstudy.features.stage.patient_radiomics, the function the radiomics_patient rule's script calls, one
               fresh process per patient, --jobs of them at a time (as `snakemake --cores 2` runs the rule): read the
               label map and the CT once, per region crop to the bounding box + margin, resample (IBSI grid), filter,
               extract. Peak memory per job: ru_maxrss of each job's process (os.wait4, exact).
  pyradiomics  `pyradiomics cases.csv -p params.yaml --jobs N -o out.csv -f csv`: one CSV row per (patient, region)
               (Image, Mask, Label: pyradiomics extracts one label per row, so tumour and liver are two rows reading
               the same files). Peak memory per job: the largest polled RSS (psutil, every 0.2 s) of its worker
               processes; the main process's is reported apart (note: pyradiomics' main process waits for its pool in
               a busy loop, `while not task.ready(): pass`, so it takes a core of its own; its CPU time is reported).
               Its pool gets the rows in chunks of min(10, rows): 20 patients x 2 regions are 4 chunks of 10 for the
               2 workers, while 2 patients (4 rows) are one chunk, i.e. run one after the other by one worker.

Parameters. radstudy reads the parameter file (default config/radiomics/ct.yaml); pyradiomics gets the same file
with radstudy's `radstudy.resample` block translated to pyradiomics' settings: resampledPixelSpacing = the same
spacing, interpolator = the same (sitkLinear); additionalInfo false (radstudy writes no diagnostics either); every other
setting, image type and feature class unchanged. Remaining differences, none of them a difference in the work asked
for: pyradiomics aligns its resampled grid to the cropped box and resamples the mask by nearest neighbour (radstudy:
IBSI grid on the whole image, linear mask interpolation thresholded at 0.5, intensities rounded to HU), and pads the
crop by padDistance = 5 voxels (radstudy: the filters' support, here ~20 mm, so radstudy filters a larger crop:
--pad-distance sets pyradiomics' padding). A `radstudy.resegment` block has no pyradiomics equivalent and is refused.
Regions: tumour (label 2) and liver (label 1, without the tumour, as radstudy's label map regions); the study's derived
regions (peritumoural ring) are left out of both unless --with-ring, which adds the config's derived regions to
radstudy's jobs and gives pyradiomics the same ring as extra mask files (written before the timing).

Masks: the generator's true label maps. SimpleITK and the BLAS libraries run with their default thread counts in
both (the same environment); --jobs processes at a time in both.

    nice .venv/bin/python bench/radiomics_benchmark.py [--cases 20] [--jobs 2] [--params config/radiomics/ct.yaml]
        [--quick] [--with-ring] [--variants radstudy,pyradiomics] [--out results/benchmarks/radiomics_benchmark.tsv]

--quick: a cheap parameter variant for trying the benchmark out (original image only; shape, first order, GLCM;
2 mm voxels); its numbers say nothing about the target. Realistic patients are generated and ingested once and cached
under resources/bench/ (see bench/predict_benchmark.py: realistic_cases).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_benchmark import (
    _PREAMBLE,
    REPO,
    WORKFLOW,
    check_ok,
    load_average,
    realistic_cases,
    run_measured,
    warn_if_busy,
)

DEFAULT_PARAMS = REPO / "config" / "radiomics" / "ct.yaml"
DEFAULT_OUT = REPO / "results" / "benchmarks" / "radiomics_benchmark.tsv"
LABELS = {"liver": 1, "tumour": 2}
VARIANTS = ("radstudy", "pyradiomics")
MEMORY_LIMIT_MB = 4096
_INTERPOLATORS = {"linear": "sitkLinear", "bspline": "sitkBSpline", "nearest": "sitkNearestNeighbor"}

RADSTUDY_JOB = _PREAMBLE + r"""
def main():
    workflow, config_file, center, patient, ingest_root, segmentation_root, out, log, result = sys.argv[1:10]
    sys.path.insert(0, workflow)  # as workflow/scripts/radiomics_patient.py does
    import yaml
    from radstudy.features import stage as features_stage
    from radstudy.config import load_study
    from radstudy.logs import setup
    setup(log)
    t1 = time.perf_counter()
    row = features_stage.patient_radiomics(load_study(yaml.safe_load(open(config_file))), center, patient,
                                           f"{ingest_root}/{center}/{patient}", f"{segmentation_root}/{center}", out)
    json.dump({"import_s": t1 - T0, "call_s": time.perf_counter() - t1, "vmhwm_mb": vmhwm_mb(),
               "columns": int(row.shape[1]), "nan": int(row.isna().sum().sum())}, open(result, "w"))

if __name__ == "__main__":
    main()
"""


# ============================================================================ parameters
def quick_params(raw: dict) -> dict:
    """A cheap variant of a parameter file, for trying the benchmark out."""
    raw = copy.deepcopy(raw)
    raw["imageType"] = {"Original": {}}
    raw["featureClass"] = {"shape": None, "firstorder": None, "glcm": None}
    resample = (raw.get("radstudy") or {}).get("resample")
    if resample:
        resample["spacing"] = [2.0, 2.0, 2.0]
    return raw


def pyradiomics_params(raw: dict, pad_distance: int | None) -> dict:
    """The pyradiomics parameter file equivalent to a radstudy one (see the module docstring)."""
    raw = copy.deepcopy(raw)
    radstudy = raw.pop("radstudy", None) or {}
    setting = dict(raw.get("setting") or {})
    if radstudy.get("resegment"):
        raise SystemExit("radstudy.resegment (mean +- k SD) has no pyradiomics equivalent: use setting.resegmentRange")
    resample = radstudy.get("resample")
    if resample:
        setting["resampledPixelSpacing"] = [float(s) for s in resample["spacing"]]
        setting["interpolator"] = _INTERPOLATORS[resample.get("interpolator", "linear")]
    setting["additionalInfo"] = False
    setting.pop("label", None)  # per row: the CSV's Label column
    if pad_distance is not None:
        setting["padDistance"] = int(pad_distance)
    raw["setting"] = setting
    return raw


# ============================================================================ the two variants
def run_radstudy(cases: list[dict], tmp: Path, config_file: Path, jobs: int) -> dict:
    """Every patient in its own fresh process, `jobs` at a time; per job: seconds and ru_maxrss (exact)."""
    out = tmp / "radstudy"
    out.mkdir(parents=True, exist_ok=True)
    pending = list(cases)
    running: dict[int, tuple[dict, subprocess.Popen, float, Path]] = {}
    done = []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            patient = case["patient"]
            log = tmp / f"radstudy_{patient}.log"
            argv = [sys.executable, "-c", RADSTUDY_JOB, str(WORKFLOW), str(config_file), case["center"], patient,
                    str(Path(case["image"]).parents[2]), str(Path(case["mask"]).parents[1]),
                    str(out / f"{patient}.parquet"), str(tmp / f"radstudy_{patient}.radstudy.log"),
                    str(tmp / f"radstudy_{patient}.json")]
            with open(log, "w") as handle:
                proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
            running[proc.pid] = (case, proc, time.perf_counter(), log)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        case, proc, t0, log = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        result = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode,
                  "tree_max_rss_mb": usage.ru_maxrss / 1024, "patient": case["patient"]}
        check_ok(result, log, f"radstudy job {case['patient']}")
        result.update(json.loads((tmp / f"radstudy_{case['patient']}.json").read_text()))
        print(f"  radstudy {case['patient']}: {result['seconds']:.1f} s, peak {result['tree_max_rss_mb']:.0f} MB "
              f"(load average {load_average()})", flush=True)
        done.append(result)
    total = time.perf_counter() - start
    return {"seconds": total, "jobs": done, "peak_job_mb": max(j["tree_max_rss_mb"] for j in done),
            "out": out}


def write_ring_masks(cases: list[dict], derived: dict, folder: Path) -> dict[tuple[str, str], Path]:
    """The config's derived regions as binary mask files (label 1), for pyradiomics (--with-ring)."""
    sys.path.insert(0, str(WORKFLOW))
    import SimpleITK as sitk
    from radstudy.features.radiomics import derive_regions

    files = {}
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        regions = derive_regions(sitk.ReadImage(str(case["mask"])), LABELS, derived)
        for name in derived:
            path = folder / f"{case['patient']}_{name}.nii.gz"
            sitk.WriteImage(regions[name], str(path), useCompression=True)
            files[(case["patient"], name)] = path
    return files


def run_pyradiomics(cases: list[dict], tmp: Path, params_file: Path, jobs: int, extra_masks: dict) -> dict:
    rows = ["Image,Mask,Label,patient,region"]
    for case in cases:
        for region in ("tumour", "liver"):
            rows.append(f"{case['image']},{case['mask']},{LABELS[region]},{case['patient']},{region}")
        for (patient, region), path in extra_masks.items():
            if patient == case["patient"]:
                rows.append(f"{case['image']},{path},1,{patient},{region}")
    cases_csv, out_csv, log = tmp / "cases.csv", tmp / "pyradiomics.csv", tmp / "pyradiomics.log"
    cases_csv.write_text("\n".join(rows) + "\n")
    out_csv.unlink(missing_ok=True)  # pyradiomics appends to -o
    pyradiomics = Path(sys.executable).with_name("pyradiomics")
    argv = [str(pyradiomics), str(cases_csv), "-p", str(params_file), "--jobs", str(jobs), "-o", str(out_csv),
            "-f", "csv"]
    print(f"  {shlex.join(argv)}", flush=True)
    result = run_measured(argv, log=log)
    check_ok(result, log, "pyradiomics")
    main_pid = result["pid"]
    workers = {pid: p for pid, p in result["per_process"].items() if pid != main_pid}
    result["rows"] = len(rows) - 1
    main = result["per_process"].get(main_pid, {"peak_rss_mb": float("nan"), "cpu_s": float("nan")})
    result["main_peak_mb"], result["main_cpu_s"] = main["peak_rss_mb"], main["cpu_s"]
    result["workers"] = len(workers)
    result["peak_job_mb"] = max((p["peak_rss_mb"] for p in workers.values()), default=result["tree_max_rss_mb"])
    result["out"] = out_csv
    return result


def compare_features(radstudy_dir: Path, pyradiomics_csv: Path, cases: list[dict]) -> dict:
    """Features per region in each output and the median relative difference of the shared ones (informative: the
    resampling grids and crops differ, see the module docstring)."""
    import numpy as np
    import pandas as pd

    theirs = pd.read_csv(pyradiomics_csv)
    ours = pd.concat([pd.read_parquet(radstudy_dir / f"{c['patient']}.parquet") for c in cases], ignore_index=True)
    ours = ours.set_index("patient")
    feature_columns = [c for c in theirs.columns if c.startswith(("original_", "log-", "wavelet", "square", "gradient",
                                                                  "exponential", "logarithm"))]
    differences, counts = [], {}
    for row in theirs.to_dict("records"):
        patient, region = row["patient"], row["region"]
        names = [f for f in feature_columns if pd.notna(row[f])]
        counts.setdefault(region, [0, 0])[1] = len(names)
        shared = [f for f in names if f"{region}_CT_{f}" in ours.columns]
        counts[region][0] = sum(1 for c in ours.columns if c.startswith(f"{region}_CT_"))
        a = ours.loc[patient, [f"{region}_CT_{f}" for f in shared]].to_numpy(float)
        b = np.asarray([row[f] for f in shared], float)
        scale = (np.abs(a) + np.abs(b)) / 2
        ok = np.isfinite(a) & np.isfinite(b) & (scale > 0)
        differences += list(np.abs(a - b)[ok] / scale[ok])
    return {"features": counts, "median_rel_diff": float(np.median(differences)) if differences else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20, help="realistic-size patients (default 20)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs, both variants (default 2)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="radstudy parameter file (default ct.yaml)")
    parser.add_argument("--quick", action="store_true", help="cheap variant of the parameters (development only)")
    parser.add_argument("--with-ring", action="store_true",
                        help="also the config's derived regions (peritumoural ring), as mask files for pyradiomics")
    parser.add_argument("--pad-distance", type=int, help="pyradiomics' padDistance (default: its own, 5 voxels)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=3, help="demo seed of a generated realistic cohort")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"TSV of the results (default {DEFAULT_OUT})")
    parser.add_argument("--keep", type=Path, help="keep parameter files, outputs and logs in this folder")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(set(variants) - set(VARIANTS))}")

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cpu cores visible: {os.cpu_count()}; load average {load_average()}")
    warn_if_busy()
    cases = realistic_cases(args.cases, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="radiomics_bench_")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)

    raw = yaml.safe_load(args.params.read_text())
    if args.quick:
        raw = quick_params(raw)
    ours_params, their_params = tmp / "params_radstudy.yaml", tmp / "params_pyradiomics.yaml"
    ours_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    their_params.write_text(yaml.safe_dump(pyradiomics_params(raw, args.pad_distance), sort_keys=False))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["centers"] = str(REPO / config["centers"]) if not Path(config["centers"]).is_absolute() else config["centers"]
    radiomics = config["features"]["radiomics"]
    derived = dict(radiomics.get("derived") or {}) if args.with_ring else {}
    radiomics.update(params=str(ours_params), derived=derived)
    config["segmentation"]["masks_for_features"] = "automatic"  # the true masks, placed as the segmentation
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    regions = ["tumour", "liver", *derived]
    print(f"{len(cases)} realistic patients, regions {', '.join(regions)}; parameters {args.params}"
          f"{' (quick variant)' if args.quick else ''}; {args.jobs} jobs")

    results: dict[str, dict] = {}
    try:
        extra = write_ring_masks(cases, derived, tmp / "derived_masks") if derived else {}
        for variant in variants:
            print(f"{variant} ...", flush=True)
            if variant == "radstudy":
                results[variant] = run_radstudy(cases, tmp, config_file, args.jobs)
            else:
                results[variant] = run_pyradiomics(cases, tmp, their_params, args.jobs, extra)
            print(f"  {variant}: {results[variant]['seconds']:.1f} s (load average {load_average()})", flush=True)
        comparison = (compare_features(results["radstudy"]["out"], results["pyradiomics"]["out"], cases)
                      if len(results) == 2 else None)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    reference = results.get("pyradiomics", {}).get("seconds")
    rows = []
    for variant, r in results.items():
        rows.append({
            "variant": variant, "cases": len(cases), "regions": ",".join(regions), "jobs": args.jobs,
            "params": f"{args.params.name}{' quick' if args.quick else ''}", "seconds": round(r["seconds"], 1),
            "seconds_per_patient": round(r["seconds"] / len(cases), 1),
            "ratio_to_pyradiomics": round(r["seconds"] / reference, 3) if reference else "",
            "peak_rss_per_job_mb": round(r["peak_job_mb"]),
            "main_process_peak_mb": round(r["main_peak_mb"]) if "main_peak_mb" in r else "",
            "main_process_cpu_s": round(r["main_cpu_s"], 1) if "main_cpu_s" in r else "",
            "processes": len(r["jobs"]) if "jobs" in r else f"1+{r['workers']}",
            "load_average_after": load_average(),
        })
    header = (f"{'variant':<12} {'patients':>8} {'seconds':>9} {'s/patient':>9} {'x pyradiomics':>13} "
              f"{'peak RSS/job MB':>15} {'processes':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        ratio = f"{row['ratio_to_pyradiomics']:.2f}" if row["ratio_to_pyradiomics"] != "" else "-"
        print(f"{row['variant']:<12} {row['cases']:>8} {row['seconds']:>9.1f} {row['seconds_per_patient']:>9.1f} "
              f"{ratio:>13} {row['peak_rss_per_job_mb']:>15} {row['processes']!s:>9}")
    if "pyradiomics" in results:
        r = results["pyradiomics"]
        chunk = min(10, r["rows"])  # pyradiomics' pool.map_async(..., chunksize=min(10, case_count))
        print(f"pyradiomics: {r['rows']} case rows in {-(-r['rows'] // chunk)} pool task(s) of up to {chunk} rows for "
              f"{args.jobs} job(s); main process peak {r['main_peak_mb']:.0f} MB, CPU {r['main_cpu_s']:.0f} s (its busy "
              f"wait for the pool), {r['workers']} worker process(es)")
    if "radstudy" in results:
        jobs = results["radstudy"]["jobs"]
        print(f"radstudy: per job {min(j['seconds'] for j in jobs):.1f}-{max(j['seconds'] for j in jobs):.1f} s, of "
              f"which imports {sum(j['import_s'] for j in jobs) / len(jobs):.1f} s on average")
    if comparison:
        counts = ", ".join(f"{k}: {a} radstudy / {b} pyradiomics" for k, (a, b) in comparison["features"].items())
        print(f"features per region ({counts}; radstudy's count includes the shape features and NaN blocks); "
              f"median relative difference of the shared features {comparison['median_rel_diff']:.3f} "
              "(different resampling grids and crops)")
    status = 0
    if reference and "radstudy" in results:
        ratio = results["radstudy"]["seconds"] / reference
        verdict = "PASS" if ratio <= 1.0 else "FAIL"
        print(f"time radstudy / pyradiomics = {ratio:.2f} (target <= 1.0): {verdict}"
              f"{' [quick parameters: not the target configuration]' if args.quick else ''}")
        status |= verdict == "FAIL"
    if "radstudy" in results:
        peak = results["radstudy"]["peak_job_mb"]
        print(f"peak memory per radstudy job {peak:.0f} MB (target < {MEMORY_LIMIT_MB}): "
              f"{'PASS' if peak < MEMORY_LIMIT_MB else 'FAIL'}")
        status |= peak >= MEMORY_LIMIT_MB
    import pandas as pd

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False)
    print(f"written {args.out}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
