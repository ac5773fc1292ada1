"""`radstudy <stage> ...`: every stage without Snakemake.

    radstudy validate  --config config/config.yaml
    radstudy demo      --config config/config.yaml
    radstudy discover  --config config/config.yaml --center C1 --out results/ingest/C1/patients.tsv
    radstudy ingest    --config config/config.yaml --center C1 --patient C1-0001 --out results/ingest/C1/C1-0001
    radstudy clinical  --config config/config.yaml --center C1 --patients results/ingest/C1/patients.tsv \\
                       --out results/clinical/C1.tsv --summary results/clinical/C1.json
    radstudy center-qc --ingest-dirs results/ingest/C1/C1-* --clinical results/clinical/C1.tsv --out results/qc/C1/patients.tsv
    radstudy flow      --center-qc results/qc/*/patients.tsv --clinical results/clinical/*.tsv --out-dir results/qc
    radstudy evaluate  --predictions results/models/predictions.tsv --out results/evaluation [--time-unit days]
                       [--decimal ,] [--coefficients ...] [--subgroups clinical.tsv --subgroup-columns sex t_stage]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from radstudy import __version__
from radstudy.config import load_study, section_schema, settings
from radstudy.ingest import stage as stages
from radstudy.errors import ConfigError, PatientExcluded
from radstudy.logs import setup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radstudy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"radstudy {__version__}")
    parser.add_argument("--log", help="also write the log to this file")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default="config/config.yaml", help="study config (default: %(default)s)")
        return p

    with_config("validate", "validate the config and the centers sheet")
    with_config("demo", "generate the synthetic demo cohort named by the centers sheet")
    p = with_config("discover", "pseudonymise one center's delivered patients")
    p.add_argument("--center", required=True)
    p.add_argument("--out", required=True, help="patients table (pseudonyms only)")
    p = with_config("ingest", "ingest one patient: DICOM -> NIfTI per channel, manual mask, QC record")
    p.add_argument("--center", required=True)
    p.add_argument("--patient", required=True, help="pseudonym, e.g. C1-0001")
    p.add_argument("--out", required=True, help="output folder")
    p = with_config("clinical", "pseudonymised clinical table of one center")
    p.add_argument("--center", required=True)
    p.add_argument("--patients", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--summary", required=True)
    p = sub.add_parser("center-qc", help="one center's patient table from its ingestion QC records")
    p.add_argument("--ingest-dirs", nargs="+", required=True)
    p.add_argument("--clinical", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("flow", help="study patient table, exclusions and patient flow")
    p.add_argument("--center-qc", nargs="+", required=True)
    p.add_argument("--clinical", nargs="+", required=True, help="per-center clinical tables (their .json summaries beside them)")
    p.add_argument("--out-dir", default="results/qc")
    p.add_argument("--out-clinical", default="results/clinical/clinical.tsv")
    _add_evaluate_parser(sub)
    return parser


def _add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """`radstudy evaluate ...` (evaluation tables and figures, then the HTML report)."""
    defaults = settings("evaluation")
    p = subparsers.add_parser("evaluate", help="metrics, figures and the HTML report from model predictions",
                              description="Metrics tables and figures of any predictions table (the input contract: "
                                          "radstudy.evaluate.inputs and the README), then the HTML report.")
    p.add_argument("--predictions", required=True, help="predictions table (TSV/CSV)")
    p.add_argument("--out", required=True, help="evaluation folder (tables, figures/, report.html)")
    p.add_argument("--time-unit", choices=section_schema("evaluation.time_unit")["enum"],
                   default=defaults["time_unit"], help="unit of the time column (default: %(default)s)")
    p.add_argument("--horizons", type=float, nargs="+", default=defaults["horizons"],
                   help="horizons in the time unit (default: 1, 2 and 3 years in that unit)")
    p.add_argument("--decimal", choices=[".", ","], default=".",
                   help="decimal mark of the numbers in the table (default: %(default)s)")
    p.add_argument("--n-bootstrap", type=int, default=defaults["n_bootstrap"])
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--reference-cohort", default="training")
    p.add_argument("--survival-cutoff", choices=["median", "maxstat", "youden"], default="median")
    p.add_argument("--nri-cutoffs", type=float, nargs="*", default=None, help="risk categories of the categorical NRI")
    p.add_argument("--coefficients", help="coefficients.tsv (endpoint, model, feature, coefficient; intercept row)")
    p.add_argument("--design", nargs="*", default=[],
                   help="design matrix TSV(s) of the combined model's inputs (patient + predictors): PATH or ENDPOINT=PATH")
    p.add_argument("--explain-model", default="combined", help="model of the SHAP and nomogram figures")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--subgroups", help="table (CSV/TSV) of patient + clinical columns: Kaplan-Meier of high- vs "
                                       "low-risk groups within each level of --subgroup-columns")
    p.add_argument("--subgroup-columns", nargs="+", default=None, metavar="COLUMN",
                   help="the --subgroups columns to split by (needed with --subgroups)")
    report = p.add_argument_group("report")
    report.add_argument("--report", help="HTML report path (default: OUT/report.html); 'none' to skip")
    report.add_argument("--study-name", default="radstudy")
    report.add_argument("--design-text", help="text or a file with the study design description")
    report.add_argument("--flow", help="results/qc/patient_flow.tsv")
    report.add_argument("--clinical", help="results/clinical/clinical.tsv (Table 1)")
    report.add_argument("--cohorts", help="cohorts table (patient, split, cohort); default: from the predictions")
    report.add_argument("--dsc", help="results/segmentation/dsc.tsv")
    report.add_argument("--tables", nargs="*", default=[], help="further TSVs to show (selected features, ...)")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from radstudy.evaluate.inputs import read_predictions
    from radstudy.evaluate.performance import evaluate, load_linear_models, subgroup_table
    from radstudy.report.html import write_report
    from radstudy.tables import read_table

    preds = read_predictions(args.predictions)
    linear_models = []
    if args.coefficients and args.design:
        if any("=" in item for item in args.design):
            designs = dict(item.split("=", 1) for item in args.design)
        else:
            designs = args.design[0]
        linear_models = load_linear_models(args.coefficients, designs, model=args.explain_model)
    subgroups = None
    if bool(args.subgroups) != bool(args.subgroup_columns):
        raise ValueError("--subgroups and --subgroup-columns go together: the table and its columns to split by")
    if args.subgroups:
        table = read_table(args.subgroups, id_columns=("patient",))
        subgroups = subgroup_table(table, args.subgroup_columns, source=f"subgroups table {args.subgroups}")
        subgroups = subgroups.reset_index()
    evaluate(preds, args.out, time_unit=args.time_unit, horizons=args.horizons, decimal=args.decimal,
             n_bootstrap=args.n_bootstrap, seed=args.seed,
             reference_cohort=args.reference_cohort, linear_models=linear_models, survival_cutoff=args.survival_cutoff,
             nri_cutoffs=args.nri_cutoffs, figures=not args.no_figures, subgroups=subgroups)
    if (args.report or "").lower() != "none":
        design_text = args.design_text
        if design_text and Path(design_text).is_file():
            design_text = Path(design_text).read_text()
        write_report(args.out, args.report or Path(args.out) / "report.html", study_name=args.study_name,
                     design_text=design_text, flow_tsv=args.flow, clinical_tsv=args.clinical,
                     cohorts_tsv=args.cohorts, dsc_tsv=args.dsc, extra_tables=args.tables,
                     coefficients_tsv=args.coefficients)
    return 0


def _evaluate_cleanly(args: argparse.Namespace) -> int:
    """`radstudy evaluate` with its input errors as one message and exit code 2 (a predictions table made elsewhere
    is where a ValueError comes from: PredictionsError names the column, patients and values)."""
    try:
        return _evaluate(args)
    except ValueError as exc:
        logging.getLogger("radstudy").error("radstudy evaluate: %s: %s", args.predictions, exc)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup(args.log)
    try:
        if args.command == "evaluate":
            return _evaluate_cleanly(args)
        if args.command == "center-qc":
            stages.center_qc(args.ingest_dirs, args.clinical, args.out)
            return 0
        if args.command == "flow":
            out = Path(args.out_dir)
            summaries = [Path(c).with_suffix(".json") for c in args.clinical]
            stages.flow(args.center_qc, summaries, args.clinical, out / "patients.tsv", out / "exclusions.tsv",
                        out / "patient_flow.tsv", args.out_clinical)
            return 0
        study = load_study(args.config)
        if args.command == "validate":
            roles = ", ".join(f"{c.id} ({c.role})" for c in study.centers)
            print(f"{args.config}: valid; study {study.config['study']['name']}; centers: {roles}")
        elif args.command == "demo":
            from radstudy.demo import stage as demo  # the generator's imports: only for the demo

            demo.generate(study)
        elif args.command == "discover":
            stages.discover(study, args.center, args.out)
        elif args.command == "ingest":
            record = stages.ingest(study, args.center, args.patient, args.out)
            print(f"{args.patient}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""))
        elif args.command == "clinical":
            stages.clinical(study, args.center, args.patients, args.out, args.summary)
    except (ConfigError, PatientExcluded, FileNotFoundError, KeyError) as exc:
        logging.getLogger("radstudy").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
