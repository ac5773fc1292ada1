"""The demo as a simulation study (issue 18): one generated cohort's features, the outcomes drawn K times from the
generator's latent risk, the statistics stage run for each draw.

    python bench/validity_study.py STUDY_DIR [--draws 100] [--null-draws 100] [--seed S] [--workers 2]
                                   [--null] [--methods combat,none]

STUDY_DIR is a finished demo study (`make demo`, `make demo-mri`). No image work per draw: the study's
features.parquet, patient table and clinical table are read once; in each draw k the outcome columns of the clinical
table (clinical.endpoints) are replaced by the generator's own draw (radstudy.demo.cohort._outcome, or
radstudy.demo.mri._outcome with demo.kind mri) from every patient's latent risk (ground_truth/patients.tsv, joined via
the pseudonymisation key), with numpy.random.default_rng([S, k]). The statistics stage
(radstudy.statistics.models.run_statistics) then runs with harmonization.method combat and none (--methods) on the
same draw, networks left out (networks.enabled false, cnn dropped from models.combined_scores), the primary split's
models only (`only_primary`: with the MRI demo's k-fold design the 5 folds' models are not fitted), into a temporary
folder.

Per draw and harmonization, on the external (test) cohort of the primary split: AUC and Harrell's C of the clinical,
radiomic and combined models; the oracle's (the latent risk as the score) on the same patients and draw; the gap
oracle - combined; the combined model's DeLong 95% CI of the AUC and the DeLong test combined vs clinical.
--null draws every outcome with the risk 0 (independent of features and clinical variables): the external AUCs should
sit near 0.5 and P < 0.05 should come in ~5% of draws.

Coverage of the reported 95% CIs: the population is the external centers' patients (the pool, all scored by the
draw's fitted combined model as the primary split's test cohort), each patient equally likely, with the generator's
outcome model at the patient's latent risk (0 with --null). The fitted model's true performance on it: the AUC
exactly (population_auc, event probabilities logistic(risk + the generator's _SYNCHRONOUS_INTERCEPT)) and Harrell's
C by Monte Carlo (population_c, 20,000 patients with fresh outcomes). Per draw one test sample as large as the pool
is drawn from it with replacement, every row with a fresh outcome (numpy.random.default_rng([S, k, 1]), the same
patients and outcomes for both harmonizations, whatever K), and the evaluate stage's CIs are computed on it: the
DeLong CI and the outcome-stratified bootstrap percentile CI of the AUC, and a bootstrap percentile CI of Harrell's C
(1,000 replicates each, the evaluate stage's default is 2,000; stratified by outcome and by event, as the evaluate
stage does). The summary gives each CI's coverage (share of draws whose CI holds the truth,
with a Wilson 95% CI), its mean width and the mean error sample - truth. The actual external cohort is not used for
coverage: its outcomes are one draw, whereas the truth is the expectation over draws and patients.

Draws run `--workers` at a time in forked processes (the statistics stage on one core each); a draw's numbers do
not depend on the worker count. `--null-draws N` runs the null control after the K draws in the same command (its
draws use streams of their own, [S + 1000003, k]); `--null` runs the null control alone.

Written into the study: results/benchmarks/validity_study.tsv (one row per draw and harmonization) and
validity_study_summary.tsv (validity_study_null*.tsv for the null control). Where the workflow ran to its models
(results/models/predictions.tsv), the summary ends with the study's own draw: the combined model's and the oracle's
external AUC and C as the workflow fitted them, and whether each gap is within 0.10 (the one draw that the share over
the K draws should agree with). Nothing else of the study is changed.
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
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import ground_truth, open_study, write_result
from radstudy.concordance import auc, concordance_matrices, harrell_c, weighted_auc
from radstudy.evaluate.metrics import (
    auc_bootstrap_ci,
    auc_delong,
    bootstrap_counts,
    delong_test,
    percentile_ci,
    wilson_ci,
)
from radstudy.statistics.design import primary_split
from radstudy.statistics.models import run_statistics
from radstudy.survival import surv_arrays
from scipy.special import expit

MODELS = ("clinical", "radiomic", "combined")
METHODS = ("combat", "none")
WITHIN = 0.10  # the target: combined within 0.10 of the oracle
N_BOOTSTRAP = 1000  # replicates of the coverage sample's bootstrap CIs
_NULL_SEED_OFFSET = 1_000_003  # the null control's draws use streams of their own ([seed + offset, k])
POPULATION_C_PATIENTS, POPULATION_C_CHUNK = 20_000, 2_500  # Monte Carlo of the true C; pairs within chunks
CIS = (("delong", "auc"), ("boot_auc", "auc"), ("boot_c", "c"))  # the CIs whose coverage is measured, of what


def generator(kind: str):
    """The generator module of demo.kind (ct or mri), looked up at run time: its outcome model `_outcome(rng, risk)`
    and its binary endpoint's intercept `_SYNCHRONOUS_INTERCEPT` (P(event) = logistic(risk + intercept))."""
    if kind == "mri":
        from radstudy.demo import mri
        return mri
    from radstudy.demo import cohort
    return cohort


def latent_risk(work: Path, config: dict, patients) -> pd.Series:
    """The generator's latent risk of each pseudonym in `patients` (ground_truth/patients.tsv via the key)."""
    risk = pd.Series(list(patients), index=list(patients)).map(ground_truth(work, config)["latent_risk"])
    if risk.isna().any():
        raise ValueError(f"no latent risk for {risk.index[risk.isna()].tolist()[:5]}")
    return risk.astype(float)


def outcome_draws(outcome, risk, rng: np.random.Generator) -> pd.DataFrame:
    """One draw of the generator's `outcome` per entry of `risk`, in order: the generator's fields as columns,
    (binary, survival time, survival event) in this order."""
    fields = [f.name for f in dataclasses.fields(outcome(np.random.default_rng(0), 0.0))]
    return pd.DataFrame([dataclasses.astuple(outcome(rng, float(r))) for r in risk], columns=fields)


def draw_outcomes(clinical: pd.DataFrame, risk: pd.Series, outcome, endpoints: dict, rng: np.random.Generator,
                  null: bool = False) -> pd.DataFrame:
    """`clinical` with its outcome columns redrawn for every patient (row order) by the generator's `outcome`.
    null: risk 0 for all."""
    draws = outcome_draws(outcome, np.zeros(len(clinical)) if null else clinical["patient"].map(risk), rng)
    draws.index = clinical.index
    fields = list(draws.columns)
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


def external_test(predictions: pd.DataFrame, cohorts: pd.DataFrame, external: list[str]) -> tuple[str, pd.DataFrame]:
    """(the primary split, its predictions of the test cohort's patients of the external centers)."""
    split = primary_split(cohorts)
    return split, predictions[(predictions["split"] == split) & (predictions["cohort"] == "test")
                              & predictions["center"].astype(str).isin(external)]


def external_row(split: str, test: pd.DataFrame, risk: pd.Series) -> dict:
    """One draw's external-test metrics of the primary split: AUC and C of each model and of the oracle, the combined
    model's DeLong CI and its DeLong test against the clinical model."""
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


def own_draw(work: Path, external: list[str], risk: pd.Series, harmonization: str) -> pd.DataFrame:
    """The study's own draw as the workflow ran it (results/models/predictions.tsv: its models, its outcomes): the
    external-test AUC and C of the combined model and of the oracle, and whether the gap is within 0.10 -- the
    one draw that the K draws' share should agree with. Rows in the summary's columns (draws 1)."""
    predictions = pd.read_csv(work / "results" / "models" / "predictions.tsv", sep="\t", dtype={"patient": str})
    cohorts = pd.read_csv(work / "results" / "models" / "cohorts.tsv", sep="\t", dtype={"patient": str})
    split, test = external_test(predictions, cohorts, external)
    row = external_row(split, test, risk)
    rows = []
    for metric in ("auc", "c"):
        if f"gap_{metric}" in row:
            label = f"the study's own draw ({harmonization}, split {split})"
            for name in ("oracle", "combined"):
                rows.append({"harmonization": label, "statistic": f"{metric}_{name}", "value": row[f"{metric}_{name}"]})
            rows.append({"harmonization": label, "statistic": f"gap_{metric} <= {WITHIN}",
                         "value": float(row[f"gap_{metric}"] <= WITHIN)})
    return pd.DataFrame(rows).assign(ci_low=np.nan, ci_high=np.nan, draws=1)


def population_auc(score, p) -> float:
    """The exact expected AUC of `score` over a population whose patients are equally likely and have the event with
    probability `p`: sum_ij p_i (1 - p_j) H(s_i - s_j) / sum_ij p_i (1 - p_j), H(0) = 1/2, i == j included (two
    rows of a sample drawn with replacement can be the same patient with different outcomes)."""
    p = np.asarray(p, dtype=float)
    return float(weighted_auc(score, p, 1.0 - p)[0])


def population_c(score, risk, outcome, rng: np.random.Generator, n: int = POPULATION_C_PATIENTS,
                 chunk: int = POPULATION_C_CHUNK) -> float:
    """Harrell's C of `score` over a population of equally likely patients with the generator's `outcome` at their
    `risk`, by Monte Carlo: n patients drawn with replacement, each with a fresh outcome; the concordant and the
    comparable pairs are summed within chunks of `chunk` patients (memory chunk^2) and C is their ratio, the limit of
    Harrell's C of ever larger samples."""
    score, risk = np.asarray(score, dtype=float), np.asarray(risk, dtype=float)
    idx = rng.integers(0, len(score), n)
    draws = outcome_draws(outcome, risk[idx], rng)
    time, event = surv_arrays(draws.iloc[:, 1], draws.iloc[:, 2])
    concordant = comparable = 0.0
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        a, d = concordance_matrices(time[part], event[part], score[idx[part]])
        concordant, comparable = concordant + a.sum(), comparable + d.sum()
    return concordant / comparable


def _ci_columns(name: str, low: float, high: float, truth: float) -> dict:
    covers = low <= truth <= high if np.isfinite([low, high, truth]).all() else np.nan
    return {f"{name}_low": low, f"{name}_high": high, f"{name}_covers": covers}


def coverage_row(test: pd.DataFrame, risk: pd.Series, outcome, intercept: float, seed: int, k: int,
                 population_patients: int = POPULATION_C_PATIENTS) -> dict:
    """Draw k's combined model on the population (the patients of `test`, external test cohort): its true AUC and C
    and, on a test sample of the pool's size drawn with replacement with fresh outcomes, the sample's AUC and C with
    the evaluate stage's 95% CIs and whether each holds the truth. `risk`: each patient's latent risk (0 under the
    null). Same patients, risk, seed and k -> the same sample and Monte Carlo, whatever the harmonization."""
    pool = test[test["model"] == "combined"].pivot(index="patient", columns="endpoint", values="score").dropna()
    r = risk.loc[pool.index].to_numpy(float)
    rng = np.random.default_rng([seed, k, 1])
    idx = rng.integers(0, len(pool), len(pool))
    draws = outcome_draws(outcome, r[idx], rng)
    row: dict = {"pool": len(pool)}
    if "binary" in pool:
        score = pool["binary"].to_numpy(float)
        truth = population_auc(score, expit(r + intercept))
        y, s = draws.iloc[:, 0].to_numpy(int), score[idx]
        row.update({"auc_true": truth, "sample_positives": int(y.sum())})
        if 0 < y.sum() < len(y):
            delong = auc_delong(y, s)
            boot = auc_bootstrap_ci(y, s, n_bootstrap=N_BOOTSTRAP, seed=np.random.default_rng([seed, k, 3]))
            row.update({"auc_sample": delong["auc"],
                        **_ci_columns("delong", delong["ci_low"], delong["ci_high"], truth),
                        **_ci_columns("boot_auc", boot["ci_low"], boot["ci_high"], truth)})
    if "survival" in pool:
        score = pool["survival"].to_numpy(float)
        truth = population_c(score, r, outcome, np.random.default_rng([seed, k, 2]), n=population_patients)
        t, e, s = draws.iloc[:, 1].to_numpy(float), draws.iloc[:, 2].to_numpy(int), score[idx]
        row.update({"c_true": truth, "sample_events": int(e.sum())})
        if e.sum() > 0:
            counts = bootstrap_counts(len(s), N_BOOTSTRAP, np.random.default_rng([seed, k, 4]), strata=e)
            row.update({"c_sample": harrell_c(t, e, s),
                        **_ci_columns("boot_c", *percentile_ci(harrell_c(t, e, s, counts=counts)), truth)})
    return row


def _mean_ci(x: pd.Series) -> tuple[float, float, float]:
    x = x.dropna().to_numpy(float)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.nan
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def summarise(table: pd.DataFrame, null: bool) -> pd.DataFrame:
    """The summary over draws: per harmonization, the share of draws with the combined model within 0.10 of the
    oracle (gap <= 0.10), the gap's median and IQR, the models' mean AUC / C, the null control's rates, the
    coverage of each 95% CI of the combined model (with a Wilson CI), its mean width, the mean error sample - truth,
    the share of the misses where the sample lies above the truth and the correlation of the error with the CI's
    half-width (negative: the interval narrows as the estimate rises, so misses fall on the high side); and
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
        for metric in ("auc", "c"):
            if f"{metric}_true" in g:
                add(method, f"mean {metric}_true (combined, population)", *_mean_ci(g[f"{metric}_true"]))
            if f"{metric}_sample" in g:
                add(method, f"mean {metric}_sample - {metric}_true",
                    *_mean_ci(g[f"{metric}_sample"] - g[f"{metric}_true"]))
        for ci, metric in CIS:
            if f"{ci}_covers" in g:
                covers = g[f"{ci}_covers"].dropna().astype(bool)
                add(method, f"coverage {ci} 95% CI of {metric}_true", float(covers.mean()),
                    *wilson_ci(int(covers.sum()), len(covers)))
                width = g[f"{ci}_high"] - g[f"{ci}_low"]
                add(method, f"mean width {ci} 95% CI", *_mean_ci(width))
                miss = g[~g[f"{ci}_covers"].fillna(True).astype(bool)]
                if len(miss):  # a Wald interval whose SE shrinks as the estimate rises misses on the high side
                    add(method, f"{ci} misses with the sample above the truth (share of misses)",
                        float((miss[f"{metric}_sample"] > miss[f"{metric}_true"]).mean()))
                half_width = width / 2
                error = g[f"{metric}_sample"] - g[f"{metric}_true"]
                if len(g) > 2 and half_width.std() > 0 and error.std() > 0:
                    add(method, f"corr(sample - truth, {ci} half-width)", float(np.corrcoef(error, half_width)[0, 1]))
    wide = table.pivot(index="draw", columns="harmonization")
    for metric in ("auc", "c"):
        column = f"{metric}_radiomic"
        if column in table and set(METHODS) <= set(table["harmonization"]):
            gain = wide[(column, "combat")] - wide[(column, "none")]
            add("combat - none", f"gain {column}", *_mean_ci(gain))
            add("combat - none", f"share of draws gain {column} > 0", float((gain > 0).mean()))
    add("all", "seconds per draw (mean)", float(table.groupby("draw")["seconds"].sum().mean()))
    add("all", "of which coverage (mean)", float(table.groupby("draw")["seconds_coverage"].sum().mean()))
    return pd.DataFrame(rows)


_CONTEXT: dict = {}  # the study's tables and settings, set once per worker process (fork)


def run_draw(k: int, null: bool) -> list[dict]:
    """Draw k: the outcomes, the statistics stage per harmonization, the external-test and coverage rows."""
    c = _CONTEXT
    seed = c["seed"] + (_NULL_SEED_OFFSET if null else 0)
    drawn = draw_outcomes(c["clinical"], c["risk"], c["outcome"], c["endpoints"], np.random.default_rng([seed, k]), null)
    population_risk = c["risk"] * 0.0 if null else c["risk"]  # the risk the outcomes are drawn with
    rows = []
    for method in c["methods"]:
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            paths = run_statistics(c["features"], drawn, c["patients"], statistics_config(c["config"], method),
                                   out_dir=tmp, n_jobs=1, networks=None, only_primary=True)
            predictions = pd.read_csv(paths["predictions"], sep="\t", dtype={"patient": str})
            cohorts = pd.read_csv(paths["cohorts"], sep="\t", dtype={"patient": str})
        split, test = external_test(predictions, cohorts, c["external"])
        t2 = time.perf_counter()
        coverage = coverage_row(test, population_risk, c["outcome"], c["intercept"], seed, k)
        rows.append({"draw": k, "harmonization": method, **external_row(split, test, c["risk"]), **coverage,
                     "seconds": round(time.perf_counter() - t1, 2),
                     "seconds_coverage": round(time.perf_counter() - t2, 2)})
    return rows


def _progress(k: int, rows: list[dict], seconds: float) -> str:
    r = {row["harmonization"]: row for row in rows}
    first = rows[0]
    return (f"draw {k:3d}: {seconds:5.1f} s | oracle AUC {first.get('auc_oracle', np.nan):.3f} C "
            f"{first.get('c_oracle', np.nan):.3f} | "
            + " | ".join(f"{m}: combined AUC {x.get('auc_combined', np.nan):.3f} radiomic "
                         f"{x.get('auc_radiomic', np.nan):.3f}, true AUC {x.get('auc_true', np.nan):.3f} C "
                         f"{x.get('c_true', np.nan):.3f}, covers delong/boot_auc/boot_c "
                         + "/".join(str(x.get(f'{ci}_covers', np.nan)) for ci, _ in CIS)
                         for m, x in r.items()))


def run_draws(draws: int, null: bool, workers: int) -> pd.DataFrame:
    """All draws, `workers` at a time (processes forked with the study's tables), in draw order."""
    started, rows = time.perf_counter(), []
    label = "null " if null else ""
    if workers <= 1:
        results = (run_draw(k, null) for k in range(draws))
        for k, draw_rows in enumerate(results):
            rows += draw_rows
            print(_progress(k, draw_rows, sum(r["seconds"] for r in draw_rows)), flush=True)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            for k, draw_rows in enumerate(pool.map(run_draw, range(draws), [null] * draws)):
                rows += draw_rows
                print(_progress(k, draw_rows, sum(r["seconds"] for r in draw_rows)), flush=True)
    total = time.perf_counter() - started
    print(f"{draws} {label}draws in {total:.0f} s with {workers} worker(s): {total / max(draws, 1):.1f} s per draw "
          f"(wall)", flush=True)
    return pd.DataFrame(rows)


def report(work: Path, table: pd.DataFrame, null: bool, own: pd.DataFrame | None = None) -> pd.DataFrame:
    """Print the true performance's range and the summary (with `own`, the study's own draw, appended); write both
    tables into the study."""
    for metric in ("auc", "c"):
        if f"{metric}_true" in table:
            truth = table[f"{metric}_true"]
            print(f"combined model's true {metric.upper()} on the population: mean {truth.mean():.4f}, range "
                  f"[{truth.min():.4f}, {truth.max():.4f}]{' (null: should be ~0.5)' if null else ''}")
    summary = summarise(table, null)
    if own is not None and len(own):
        summary = pd.concat([summary, own], ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.max_colwidth", 90):
        print(summary.round(3).to_string(index=False))
    name = "validity_study_null" if null else "validity_study"
    write_result(work, table, name)
    write_result(work, summary, f"{name}_summary")
    return summary


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a finished demo study folder")
    parser.add_argument("--draws", type=int, default=100, help="K outcome draws from the latent risk")
    parser.add_argument("--null-draws", type=int, default=0,
                        help="then as many draws of the null control (outcomes independent of everything)")
    parser.add_argument("--null", action="store_true", help="only the null control (--draws of them)")
    parser.add_argument("--seed", type=int, default=0, help="draw k uses numpy.random.default_rng([seed, k])")
    parser.add_argument("--workers", type=int, default=2, help="draws run in parallel in this many processes")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="harmonization methods, comma-separated (e.g. combat alone for a coverage-only run)")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    if not methods or not set(methods) <= set(METHODS):
        parser.error(f"--methods: a comma-separated subset of {','.join(METHODS)}")
    logging.getLogger("radstudy").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    work, study, _ = open_study(args.study)
    config = study.config
    external = [c.id for c in study.centers if c.role == "external"]
    if not external:
        raise SystemExit("the study has no external center: no external test cohort to evaluate")
    kind = config.get("demo", {}).get("kind", "ct")
    clinical = pd.read_csv(work / "results" / "clinical" / "clinical.tsv", sep="\t", dtype={"patient": str})
    _CONTEXT.update(
        config=config, external=external, methods=methods, seed=args.seed, endpoints=config["clinical"]["endpoints"],
        outcome=generator(kind)._outcome, intercept=generator(kind)._SYNCHRONOUS_INTERCEPT,
        features=pd.read_parquet(work / "results" / "features" / "features.parquet"),
        patients=pd.read_csv(work / "results" / "qc" / "patients.tsv", sep="\t", dtype={"patient": str}),
        clinical=clinical, risk=latent_risk(work, config, clinical["patient"]))
    runs = [(args.draws, True)] if args.null else [(args.draws, False)] + (
        [(args.null_draws, True)] if args.null_draws else [])
    own = None
    if (work / "results" / "models" / "predictions.tsv").exists():
        own = own_draw(work, external, _CONTEXT["risk"], config["harmonization"]["method"])
    summary = None
    for draws, null in runs:
        print(f"{work.name}: demo.kind {kind}, design {config['design']['type']}, external {external}, "
              f"{len(clinical)} patients, {draws} draws (seed {args.seed}), harmonization {', '.join(methods)}"
              f"{', NULL outcomes' if null else ''}", flush=True)
        table = run_draws(draws, null, args.workers)
        out = report(work, table, null, None if null else own)
        summary = out if summary is None else summary
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
