"""The demo as a simulation study (issue 18): one generated cohort's features, the outcomes drawn K times from the
generator's latent risk, the statistics stage run for each draw.

    python bench/validity_study.py STUDY_DIR --draws K --seed S [--null]

STUDY_DIR is a finished demo study (`make demo`, `make demo-mri`). No image work per draw: the study's
features.parquet, patient table and clinical table are read once; in each draw k the outcome columns of the clinical
table (clinical.endpoints) are replaced by the generator's own draw (radstudy.demo.cohort._outcome, or
radstudy.demo.mri._outcome with demo.kind mri) from every patient's latent risk (ground_truth/patients.tsv, joined via
the pseudonymisation key), with numpy.random.default_rng([S, k]). The statistics stage
(radstudy.statistics.models.run_statistics) then runs with harmonization.method combat and none on the same draw,
networks left out (networks.enabled false, cnn dropped from models.combined_scores), into a temporary folder.

Per draw and harmonization, on the external (test) cohort of the primary split: AUC and Harrell's C of the clinical,
radiomic and combined models; the oracle's (the latent risk as the score) on the same patients and draw; the gap
oracle - combined; the combined model's DeLong 95% CI of the AUC and the DeLong test combined vs clinical.
--null draws every outcome with the risk 0 (independent of features and clinical variables): the external AUCs should
sit near 0.5 and P < 0.05 should come in ~5% of draws.

Written into the study: results/benchmarks/validity_study.tsv (one row per draw and harmonization) and
validity_study_summary.tsv (validity_study_null*.tsv with --null); nothing else of the study is changed.
Coverage of the CIs against the population truth is not computed: see docs/validity.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import open_study, write_result
from radstudy.concordance import auc, harrell_c
from radstudy.evaluate.metrics import auc_delong, delong_test
from radstudy.statistics.design import primary_split
from radstudy.statistics.models import run_statistics

MODELS = ("clinical", "radiomic", "combined")
METHODS = ("combat", "none")
WITHIN = 0.10  # the target: combined within 0.10 of the oracle


def generator_outcome(kind: str):
    """The generator's own outcome model `_outcome(rng, risk)` of demo.kind (ct or mri)."""
    if kind == "mri":
        from radstudy.demo import mri
        return mri._outcome
    from radstudy.demo import cohort
    return cohort._outcome


def latent_risk(work: Path, config: dict, patients) -> pd.Series:
    """The generator's latent risk of each pseudonym in `patients` (ground_truth/patients.tsv via the key)."""
    truth = pd.read_csv(work / config["demo"]["out_dir"] / "ground_truth" / "patients.tsv", sep="\t",
                        dtype={"patient_id": str})
    key = pd.read_csv(work / config["pseudonymisation"]["key_file"], sep="\t", dtype=str)
    original = key.set_index("pseudonym")["original_id"]
    risk = pd.Series(list(patients), index=list(patients)).map(original).map(truth.set_index("patient_id")["latent_risk"])
    if risk.isna().any():
        raise ValueError(f"no latent risk for {risk.index[risk.isna()].tolist()[:5]}")
    return risk.astype(float)


def draw_outcomes(clinical: pd.DataFrame, risk: pd.Series, outcome, endpoints: dict, rng: np.random.Generator,
                  null: bool = False) -> pd.DataFrame:
    """`clinical` with its outcome columns redrawn for every patient (row order) by the generator's `outcome`;
    the generator's fields are (binary, survival time, survival event) in this order. null: risk 0 for all."""
    fields = [f.name for f in dataclasses.fields(outcome(np.random.default_rng(0), 0.0))]
    draws = pd.DataFrame([dataclasses.astuple(outcome(rng, 0.0 if null else float(r)))
                          for r in clinical["patient"].map(risk)], columns=fields, index=clinical.index)
    out = clinical.copy()
    if "binary" in endpoints:
        out[endpoints["binary"]["column"]] = draws[fields[0]]
    if "survival" in endpoints:
        out[endpoints["survival"]["time"]] = draws[fields[1]]
        out[endpoints["survival"]["event"]] = draws[fields[2]]
    return out


def statistics_config(config: dict, method: str) -> dict:
    """The study's config with harmonization.method `method` and the networks left out."""
    config = copy.deepcopy(config)
    config["harmonization"]["method"] = method
    config.setdefault("networks", {})["enabled"] = False
    models = config.setdefault("models", {})
    if "combined_scores" in models:
        models["combined_scores"] = [s for s in models["combined_scores"] if s != "cnn"]
    return config


def external_row(predictions: pd.DataFrame, cohorts: pd.DataFrame, external: list[str], risk: pd.Series) -> dict:
    """One draw's external-test metrics of the primary split: AUC and C of each model and of the oracle, the combined
    model's DeLong CI and its DeLong test against the clinical model."""
    split = primary_split(cohorts)
    test = predictions[(predictions["split"] == split) & (predictions["cohort"] == "test")
                       & predictions["center"].astype(str).isin(external)]
    row: dict = {"split": split}
    binary = test[test["endpoint"] == "binary"].pivot(index="patient", columns="model", values="score")
    if len(binary):
        y = test[test["endpoint"] == "binary"].groupby("patient")["outcome"].first().loc[binary.index].to_numpy(int)
        oracle = risk.loc[binary.index].to_numpy(float)
        row.update({"n_test": len(y), "positives": int(y.sum()), "auc_oracle": auc(y, oracle)})
        for m in MODELS:
            row[f"auc_{m}"] = auc(y, binary[m].to_numpy(float))
        row["radiomic_constant_binary"] = binary["radiomic"].nunique() <= 1  # the LASSO kept no feature
        ci = auc_delong(y, binary["combined"].to_numpy(float))
        row.update({"auc_combined_ci_low": ci["ci_low"], "auc_combined_ci_high": ci["ci_high"],
                    "auc_combined_ci_excludes_half": not ci["ci_low"] <= 0.5 <= ci["ci_high"],
                    "delong_p_combined_vs_clinical": delong_test(y, binary["combined"].to_numpy(float),
                                                                 binary["clinical"].to_numpy(float))["p"]})
    surv = test[test["endpoint"] == "survival"]
    scores = surv.pivot(index="patient", columns="model", values="score")
    if len(scores):
        first = surv.groupby("patient")[["time", "event"]].first().loc[scores.index]
        t, e = first["time"].to_numpy(float), first["event"].to_numpy(int)
        row.update({"events": int(e.sum()), "c_oracle": harrell_c(t, e, risk.loc[scores.index].to_numpy(float))})
        for m in MODELS:
            row[f"c_{m}"] = harrell_c(t, e, scores[m].to_numpy(float))
        row["radiomic_constant_survival"] = scores["radiomic"].nunique() <= 1
    if "auc_oracle" in row:
        row["gap_auc"] = row["auc_oracle"] - row["auc_combined"]
    if "c_oracle" in row:
        row["gap_c"] = row["c_oracle"] - row["c_combined"]
    return row


def _mean_ci(x: pd.Series) -> tuple[float, float, float]:
    x = x.dropna().to_numpy(float)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.nan
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def summarise(table: pd.DataFrame, null: bool) -> pd.DataFrame:
    """The summary over draws: per harmonization, the share of draws with the combined model within 0.10 of the
    oracle (gap <= 0.10), the gap's median and IQR, the models' mean AUC / C, the null control's rates; and
    ComBat's gain (combat - none) on the external radiomic AUC and C with mean +- 1.96 sd / sqrt(K)."""
    rows = []

    def add(harmonization, statistic, value, low=np.nan, high=np.nan):
        rows.append({"harmonization": harmonization, "statistic": statistic, "value": value, "ci_low": low,
                     "ci_high": high, "draws": table["draw"].nunique()})

    for method, g in table.groupby("harmonization", sort=False):
        for metric in ("auc", "c"):
            if f"{metric}_combined" not in g:
                continue
            for m in (*MODELS, "oracle"):
                add(method, f"mean {metric}_{m}", *_mean_ci(g[f"{metric}_{m}"]))
            gap = g[f"gap_{metric}"].dropna()
            add(method, f"share gap_{metric} <= {WITHIN}", float((gap <= WITHIN).mean()))
            add(method, f"median gap_{metric}", float(gap.median()), float(gap.quantile(0.25)),
                float(gap.quantile(0.75)))
        if "delong_p_combined_vs_clinical" in g:
            add(method, "rate delong P < 0.05 (combined vs clinical)",
                float((g["delong_p_combined_vs_clinical"] < 0.05).mean()))
            add(method, "rate combined AUC DeLong CI excludes 0.5", float(g["auc_combined_ci_excludes_half"].mean()))
        for endpoint in ("binary", "survival"):
            if f"radiomic_constant_{endpoint}" in g:
                add(method, f"share radiomic score constant ({endpoint}: no feature kept)",
                    float(g[f"radiomic_constant_{endpoint}"].mean()))
    wide = table.pivot(index="draw", columns="harmonization")
    for metric in ("auc", "c"):
        column = f"{metric}_radiomic"
        if column in table and set(METHODS) <= set(table["harmonization"]):
            gain = wide[(column, "combat")] - wide[(column, "none")]
            add("combat - none", f"gain {column}", *_mean_ci(gain))
            add("combat - none", f"share of draws gain {column} > 0", float((gain > 0).mean()))
    add("both", "seconds per draw (mean)", float(table.groupby("draw")["seconds"].sum().mean()))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a finished demo study folder")
    parser.add_argument("--draws", type=int, default=20, help="K outcome draws")
    parser.add_argument("--seed", type=int, default=0, help="draw k uses numpy.random.default_rng([seed, k])")
    parser.add_argument("--null", action="store_true", help="outcomes independent of everything (risk 0)")
    parser.add_argument("--n-jobs", type=int, default=2, help="run_statistics' n_jobs (splits in parallel)")
    args = parser.parse_args(argv)
    logging.getLogger("radstudy").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    work, study, _ = open_study(args.study)
    config = study.config
    external = [c.id for c in study.centers if c.role == "external"]
    if not external:
        raise SystemExit("the study has no external center: no external test cohort to evaluate")
    kind = config.get("demo", {}).get("kind", "ct")
    outcome = generator_outcome(kind)
    features = pd.read_parquet(work / "results" / "features" / "features.parquet")
    patients = pd.read_csv(work / "results" / "qc" / "patients.tsv", sep="\t", dtype={"patient": str})
    clinical = pd.read_csv(work / "results" / "clinical" / "clinical.tsv", sep="\t", dtype={"patient": str})
    risk = latent_risk(work, config, clinical["patient"])
    endpoints = config["clinical"]["endpoints"]
    print(f"{work.name}: demo.kind {kind}, design {config['design']['type']}, external {external}, "
          f"{len(clinical)} patients, {args.draws} draws (seed {args.seed}){', NULL outcomes' if args.null else ''}")

    rows, started = [], time.perf_counter()
    for k in range(args.draws):
        drawn = draw_outcomes(clinical, risk, outcome, endpoints, np.random.default_rng([args.seed, k]), args.null)
        t0 = time.perf_counter()
        for method in METHODS:
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                paths = run_statistics(features, drawn, patients, statistics_config(config, method), out_dir=tmp,
                                       n_jobs=args.n_jobs, networks=None)
                predictions = pd.read_csv(paths["predictions"], sep="\t", dtype={"patient": str})
                cohorts = pd.read_csv(paths["cohorts"], sep="\t", dtype={"patient": str})
            row = external_row(predictions, cohorts, external, risk)
            rows.append({"draw": k, "harmonization": method, **row, "seconds": round(time.perf_counter() - t1, 2)})
        r = {m: rows[-2 + i] for i, m in enumerate(METHODS)}
        print(f"draw {k:3d}: {time.perf_counter() - t0:5.1f} s | oracle AUC {r['combat'].get('auc_oracle', np.nan):.3f}"
              f" C {r['combat'].get('c_oracle', np.nan):.3f} | combined AUC combat "
              f"{r['combat'].get('auc_combined', np.nan):.3f} none {r['none'].get('auc_combined', np.nan):.3f} | "
              f"radiomic AUC combat {r['combat'].get('auc_radiomic', np.nan):.3f} "
              f"none {r['none'].get('auc_radiomic', np.nan):.3f}", flush=True)
    total = time.perf_counter() - started
    per_draw = total / max(args.draws, 1)
    print(f"{args.draws} draws in {total:.0f} s: {per_draw:.1f} s per draw; K=100 would take ~{100 * per_draw / 60:.0f} min")

    table = pd.DataFrame(rows)
    summary = summarise(table, args.null)
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.max_colwidth", 90):
        print(summary.round(3).to_string(index=False))
    name = "validity_study_null" if args.null else "validity_study"
    write_result(work, table, name)
    write_result(work, summary, f"{name}_summary")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
