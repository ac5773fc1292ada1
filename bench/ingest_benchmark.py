"""Ingestion of one realistic-size patient vs a bare SimpleITK read + NIfTI write of the same series.

Target (issue 3): wall time within 1.5x of the bare read+write; peak memory within 3x the volume's size.
Each measurement runs in a fresh subprocess; memory is the peak RSS (VmHWM, reset after the imports) above
the RSS after the imports.

    .venv/bin/python bench/ingest_benchmark.py [--repeats 3] [--workdir resources/bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
from pathlib import Path
import SimpleITK as sitk
import radstudy.ingest.patient, radstudy.config  # imports before the baseline
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
mode, arg, out = sys.argv[1], sys.argv[2], sys.argv[3]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' own peak must not count
base = status_kb("VmRSS")
t0 = time.perf_counter()
if mode == "bare":
    folder, uid = arg.split("::")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, uid))
    image = reader.Execute()
    sitk.WriteImage(image, out, useCompression=True)
    voxels = image.GetNumberOfPixels(); bytes_per = image.GetSizeOfPixelComponent()
else:
    cfg, center, patient = arg.split("::")
    study = radstudy.config.load_study(cfg, base_dir=Path(cfg).parent)
    record = radstudy.ingest.patient.ingest_patient(study, center, patient, out)
    assert record["status"] == "included", record
    voxels = bytes_per = 0
seconds = time.perf_counter() - t0
peak = status_kb("VmHWM")
print(json.dumps({"seconds": seconds, "peak_above_baseline_mb": (peak - base) / 1024, "voxels": voxels, "bytes_per_voxel": bytes_per}))
"""


def _measure(mode: str, arg: str, out: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, mode, arg, out], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "resources" / "bench" / "ingest"))
    parser.add_argument("--seed", type=int, default=3, help="demo seed (3 gives 2.0 mm slices: ~150 slices)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "workflow"))
    from radstudy.demo.cohort import generate_cohort

    work = Path(args.workdir)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    root = work / "dicom" / "B1"
    if not root.exists():
        t0 = time.perf_counter()
        generate_cohort([{"id": "B1", "role": "development", "dicom_root": root, "clinical": work / "clinical.csv"}],
                        work, seed=args.seed, patients=2, size="realistic", annotated_fraction=0.5, rtstruct_per_center=0)
        print(f"generated two realistic patients (one with a manual mask) in {time.perf_counter() - t0:.1f} s")
    (work / "centers.tsv").write_text(f"id\trole\tdicom_root\tclinical\nB1\tdevelopment\t{root}\t{work / 'clinical.csv'}\n")
    config.update(centers=str(work / "centers.tsv"))
    config["pseudonymisation"]["key_file"] = str(work / "key.tsv")
    config["demo"]["enabled"] = False
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    from radstudy.config import load_study
    from radstudy.ingest.pseudonym import assign_pseudonyms

    study = load_study(work / "config.yaml", base_dir=work)
    key = assign_pseudonyms(study.center("B1"), work / "key.tsv")
    for patient, original in zip(key["pseudonym"], key["original_id"]):
        _compare(study, work, patient, root / original, args.repeats)


def _compare(study, work: Path, patient: str, folder: Path, repeats: int) -> None:
    import pydicom

    from radstudy.ingest.dicomio import group_series, scan_folder, select_series

    headers, _ = scan_folder(folder)
    series = group_series(headers)
    portal = select_series(series, study.config["ingest"]["channels"]["CT"], patient=patient)
    series_dir = Path(portal.headers[0].path).parent
    n_files = sum(1 for p in folder.rglob("*") if p.is_file())
    has_mask = bool(list(folder.glob(study.config["ingest"]["masks"]["label_map_glob"])))
    print(f"\n{patient}: {n_files} files in {len([s for s in series if s.modality == 'CT'])} CT series; "
          f"portal series {len(portal.headers)} slices of {pydicom.dcmread(portal.headers[0].path, stop_before_pixels=True).Rows}^2; "
          f"manual mask: {'yes' if has_mask else 'no'}")

    results = {"bare": [], "radstudy": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # alternate, so drifts of the machine hit both alike
            results["bare"].append(_measure("bare", f"{series_dir}::{portal.uid}", f"{tmp}/bare.nii.gz"))
            results["radstudy"].append(_measure("radstudy", f"{work / 'config.yaml'}::B1::{patient}", f"{tmp}/ours"))
    bare_s = min(r["seconds"] for r in results["bare"])
    ours_s = min(r["seconds"] for r in results["radstudy"])
    volume_mb = results["bare"][0]["voxels"] * results["bare"][0]["bytes_per_voxel"] / 2**20
    ours_mem = max(r["peak_above_baseline_mb"] for r in results["radstudy"])
    bare_mem = max(r["peak_above_baseline_mb"] for r in results["bare"])
    print(f"bare SimpleITK read+write: {bare_s:.2f} s (best of {repeats}), peak +{bare_mem:.0f} MB")
    print(f"radstudy ingest_patient:   {ours_s:.2f} s (best of {repeats}), peak +{ours_mem:.0f} MB "
          "(includes scanning every file, the mask, QC)")
    print(f"time ratio {ours_s / bare_s:.2f} (target <= 1.5); volume {volume_mb:.0f} MB, "
          f"peak/volume {ours_mem / volume_mb:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
