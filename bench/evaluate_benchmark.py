"""Evaluation + report of a simulated study: 1,000 patients, 4 models, both endpoints, 2,000 bootstrap replicates.

Target: under 5 minutes on 2 cores. The bootstrap is vectorised (resampling-count matrices; AUC by ranks in
O(B n), C-index and Uno's C as matrix products), so its cost is a few seconds per endpoint; most of the
remaining time is drawing the figures (PNG + PDF).

    PYTHONPATH=workflow python bench/evaluate_benchmark.py [--patients 1000] [--n-bootstrap 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workflow"), str(REPO / "tests")]

from radstudy.evaluate import performance as E  # noqa: E402
from radstudy.report.html import write_report  # noqa: E402
from radstudy.tables import read_table  # noqa: E402
from simulated_study import simulate_study  # noqa: E402  (tests/simulated_study.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--splits", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"cpu cores visible: {os.cpu_count()}, OMP/BLAS threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    out = Path(args.out or tempfile.mkdtemp(prefix="evaluate_bench_"))
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    study = simulate_study(args.patients, seed=args.seed, n_splits=args.splits)
    inputs = out / "inputs"
    inputs.mkdir(exist_ok=True)
    for name in ("predictions", "coefficients", "design", "clinical", "flow", "dsc"):
        study[name].to_csv(inputs / f"{name}.tsv", sep="\t", index=False)
    t_sim = time.perf_counter() - t0
    preds = study["predictions"]
    print(f"simulated: {preds['patient'].nunique()} patients, {preds['model'].nunique()} models, "
          f"{preds['endpoint'].nunique()} endpoints, {preds['split'].nunique()} split(s), {len(preds)} prediction rows "
          f"({t_sim:.1f} s)")

    t0 = time.perf_counter()
    models = E.load_linear_models(inputs / "coefficients.tsv", inputs / "design.tsv")
    result = E.evaluate(read_table(inputs / "predictions.tsv", id_columns=()), out, n_bootstrap=args.n_bootstrap, seed=args.seed,
                        linear_models=models)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    html = write_report(out, out / "report.html", study_name="benchmark (simulated)",
                        design_text="Simulated four-center study; C4 is the external test center.",
                        flow_tsv=inputs / "flow.tsv", clinical_tsv=inputs / "clinical.tsv", dsc_tsv=inputs / "dsc.tsv",
                        coefficients_tsv=inputs / "coefficients.tsv")
    t_report = time.perf_counter() - t0
    total = t_eval + t_report
    print(f"evaluation: {t_eval:.1f} s ({len(result['tables'])} tables, {len(result['figures'])} figures x PNG+PDF)")
    print(f"report:     {t_report:.1f} s ({html}, {html.stat().st_size / 1e6:.1f} MB)")
    print(f"wall time evaluation + report: {total:.1f} s (target < 300 s): {'PASS' if total < 300 else 'FAIL'}")
    return 0 if total < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
