"""Evaluation of the fitted models from their predictions: metrics tables and figures per model x cohort.

Input, one row per patient x model (x split x endpoint): the contract of radstudy.evaluate.inputs (columns,
types, errors, and the rows left out for a missing value, counted in `exclusions.csv`). Survival times are in
one declared unit (`time_unit`: days, weeks, months or years; radstudy.evaluate.time_units), which sets the
default horizons, the axis ticks and the labels.

A model whose score is constant on the reference cohort of its split (feature selection kept no feature) is
reported as "no feature selected: constant prediction" and left out of the figures, cut-offs and paired
comparisons. Hazard ratios of a score are per standard deviation of the score on the reference cohort.

Every cut-off (Youden on the training probability; survival risk groups; the Cox recalibration that turns a
survival score into an event probability by a horizon) is learnt on `reference_cohort` of the same split and
applied unchanged to the other cohorts. With several splits (k-fold, repeated random splits) every split is
evaluated on its own and `summary_*.csv` aggregate the splits as mean and 2.5/97.5 percentiles; figures show
the first split.

Outputs under `out_dir`: CSV tables (`manifest.json` lists them with titles), `figures/*.png|pdf`, and
`cohorts.csv` (patient, split, cohort, center) for the report. From the command line (radstudy.cli):

    radstudy evaluate --predictions results/models/predictions.tsv --out results/evaluation [--time-unit days] \\
        [--decimal ,] [--coefficients results/models/coefficients.tsv --design results/models/design.tsv] \\
        [--clinical results/clinical/clinical.tsv --flow results/qc/patient_flow.tsv ...]
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from radstudy.config import section_schema, settings
from radstudy.evaluate import metrics as M
from radstudy.evaluate import time_units as U
from radstudy.evaluate.inputs import PredictionsError, exclusion_counts, normalise_predictions
from radstudy.figures import save_figure
from radstudy.statistics.design import COHORTS
from radstudy.tables import read_table

log = logging.getLogger("radstudy.evaluate.performance")

# clinical, radiomic, deep, combined; then the end-to-end networks
MODEL_ORDER = section_schema("models.fit")["items"]["enum"] + section_schema("networks.fit")["items"]["enum"]
MODEL_COLORS = {"clinical": "#1b9e77", "radiomic": "#7570b3", "deep": "#e6ab02", "combined": "#d95f02",
                "cnn": "#e7298a", "cnn_clinical": "#1f78b4", "multitask": "#e31a1c"}
_EXTRA_COLORS = ["#66a61e", "#a6761d", "#666666", "#b15928", "#a6cee3", "#fb9a99"]
INTERCEPT_NAMES = {"(intercept)", "intercept", "const", "_intercept", "(const)"}
CONSTANT_NOTE = "no feature selected: constant prediction"
SUBGROUP_MAX_LEVELS = 6  # a numeric subgroup variable with more distinct values is split at the reference median
SUBGROUP_MISSING = "(missing)"
KM_SUBGROUP_COLUMNS = ["endpoint", "split", "cohort", "model", "variable", "level", "n", "events", "n_high", "n_low",
                       "logrank_p", "hr_high_vs_low", "hr_high_vs_low_ci_low", "hr_high_vs_low_ci_high", "note"]


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

def ordered(values, order) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def model_colors(models) -> dict:
    colors = dict(MODEL_COLORS)
    extra = iter(_EXTRA_COLORS * 4)
    for m in models:
        if m not in colors:
            colors[m] = next(extra)
    return colors


@dataclass
class LinearModel:
    """A fitted linear model (logistic for binary, Cox for survival) with the design matrix of its inputs."""

    endpoint: str
    model: str
    intercept: float
    coefficients: pd.Series  # feature -> coefficient
    design: pd.DataFrame  # index: patient; columns: the features
    log1p: tuple[str, ...] = ()  # predictors that enter as log(1 + x) (models.clinical.log_transform)

    @classmethod
    def from_tables(cls, coefficients: pd.DataFrame, design: pd.DataFrame, endpoint: str,
                    model: str = "combined") -> LinearModel:
        need = {"feature", "coefficient"}
        if not need <= set(coefficients.columns):
            raise KeyError(f"coefficients table needs columns {sorted(need)} (and endpoint, model); "
                           f"has {list(coefficients.columns)}")
        rows = coefficients
        if "endpoint" in rows.columns:
            rows = rows[rows["endpoint"].astype(str) == endpoint]
        if "model" in rows.columns:
            rows = rows[rows["model"].astype(str) == model]
        if rows.empty:
            raise KeyError(f"no coefficients for endpoint {endpoint!r}, model {model!r}")
        is_icpt = rows["feature"].astype(str).str.lower().isin(INTERCEPT_NAMES)
        coefs = rows.loc[~is_icpt].set_index("feature")["coefficient"].astype(float)
        coefs = coefs[coefs != 0]
        intercept = float(rows.loc[is_icpt, "coefficient"].sum())
        design = design.copy()
        if "patient" in design.columns:
            design = design.set_index("patient")
        design.index = design.index.astype(str)
        lacking = [f for f in coefs.index if f not in design.columns]
        if lacking:
            raise KeyError(f"design matrix lacks predictor column(s) {lacking} of the {endpoint} {model} model")
        x = design[list(coefs.index)].apply(pd.to_numeric, errors="coerce")
        return cls(endpoint=endpoint, model=model, intercept=intercept, coefficients=coefs, design=x)

    def linear_predictor(self) -> pd.Series:
        return self.intercept + self.design @ self.coefficients


def load_linear_models(coefficients_tsv, design, model: str = "combined", endpoints=("binary", "survival")):
    """LinearModels of `model` per endpoint found in the coefficients table.

    `design`: one table for all endpoints (path or DataFrame) or {endpoint: path}.
    """
    coefs = read_table(coefficients_tsv, id_columns=())
    designs = design if isinstance(design, dict) else {e: design for e in endpoints}
    found = []
    eps = coefs["endpoint"].astype(str).unique() if "endpoint" in coefs.columns else list(designs)
    for ep in eps:
        if ep not in designs:
            continue
        d = designs[ep]
        d = read_table(d, id_columns=())
        try:
            found.append(LinearModel.from_tables(coefs, d, ep, model))
        except KeyError as exc:
            log.warning("%s", exc)
    return found


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------

@dataclass
class _Outputs:
    out_dir: Path
    make_figures: bool = True
    tables: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)

    def table(self, name: str, df: pd.DataFrame, title: str, section: str, keep_empty: bool = False) -> None:
        """Write df as name.csv and list it in the manifest; an empty table only with keep_empty (its header)."""
        if df is None or (df.empty and not keep_empty):
            return
        path = self.out_dir / f"{name}.csv"
        df.to_csv(path, index=False)
        self.tables[name] = {"path": path.name, "title": title, "section": section}

    def figure(self, fig, name: str, caption: str, section: str, **meta) -> None:

        save_figure(fig, self.out_dir, name)
        self.figures.append({"name": name, "png": f"figures/{name}.png", "pdf": f"figures/{name}.pdf",
                             "caption": caption, "section": section, **meta})


def _seed(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(str(k).encode()) for k in keys])


def format_p(p, missing: str = "NA") -> str:
    """A P value for a table: <0.001, else 3 decimals; `missing` when there is none."""
    if p is None or not np.isfinite(p):
        return missing
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_ci(est, lo, hi, digits: int = 3) -> str:
    if est is None or not np.isfinite(est):
        return "NA"
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{est:.{digits}f}"
    return f"{est:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _cohort_frames(df: pd.DataFrame, models) -> tuple[pd.DataFrame, dict]:
    """Per-patient outcome table and per-model score/probability series, indexed by patient."""
    base = df.drop_duplicates("patient").set_index("patient")[["center", "outcome", "time", "event"]]
    per_model = {m: df[df["model"] == m].set_index("patient")[["score", "probability", "probability_from_score"]]
                 for m in models}
    return base, per_model


def constant_models(ref_df: pd.DataFrame, models) -> list:
    """Models whose score is constant on the reference cohort (feature selection kept no feature): a constant is
    no prediction, so they get no metric, figure, cut-off or comparison. Relative tolerance 1e-10."""
    found = []
    for m in models:
        if M.is_constant(ref_df.loc[ref_df["model"] == m, "score"]):
            found.append(m)
    return found


def _note_constant(rows: list, df: pd.DataFrame, endpoint: str, split, cohorts, constant, ref: str) -> None:
    """One row per cohort for each constant model: its patients, events and the note."""
    if constant:
        log.warning("%s split %s: model(s) %s predict a constant on the %s cohort (%s)", endpoint, split,
                    ", ".join(constant), ref, CONSTANT_NOTE)
    events = "outcome" if endpoint == "binary" else "event"
    for c in cohorts:
        for m in constant:
            sel = df[(df["cohort"] == c) & (df["model"] == m)]
            if len(sel):
                rows.append({"endpoint": endpoint, "split": split, "cohort": c, "model": m, "n": len(sel),
                             "events": int(sel[events].sum()), "note": CONSTANT_NOTE})


def _binary_split(df: pd.DataFrame, split, models, cohorts, ref: str, cfg: dict, out: _Outputs, colors, first: bool):
    rows, comps, reclass, cutoffs, cal_rows, dca_rows = [], [], [], [], [], []
    ref_df = df[df["cohort"] == ref]
    constant = constant_models(ref_df, models)
    _note_constant(rows, df, "binary", split, cohorts, constant, ref)
    models = [m for m in models if m not in constant]
    cut = {}
    for m in models:
        r = ref_df[ref_df["model"] == m].dropna(subset=["probability"])
        if r["outcome"].nunique() == 2:
            cut[m] = M.youden_cutoff(r["outcome"].astype(int), r["probability"])
            cutoffs.append({"endpoint": "binary", "split": split, "model": m, "method": "youden (probability)",
                            "learnt_on": ref, "cutoff": cut[m], "n": len(r)})
    ref_prev = float(ref_df.drop_duplicates("patient")["outcome"].mean()) if len(ref_df) else np.nan
    nri_cutoffs = cfg["nri_cutoffs"] if cfg["nri_cutoffs"] is not None else [round(ref_prev, 3)]
    plots = {}
    for c in cohorts:
        cdf = df[df["cohort"] == c]
        base, per = _cohort_frames(cdf, models)
        y_all = base["outcome"].astype(int)
        counts = M.bootstrap_counts(len(base), cfg["n_bootstrap"], _seed(cfg["seed"], "binary", split, c),
                                    strata=y_all.values)
        pos = {p: i for i, p in enumerate(base.index)}
        plots[c] = {}
        for m in models:
            s = per[m].dropna()
            if s.empty:
                continue
            idx = np.array([pos[p] for p in s.index])
            y = y_all.values[idx]
            row = {"endpoint": "binary", "split": split, "cohort": c, "model": m, "n": len(y), "events": int(y.sum())}
            if len(np.unique(y)) < 2:
                rows.append({**row, "note": "single outcome class: no AUC"})
                log.warning("binary: cohort %s (split %s) has a single outcome class: no AUC", c, split)
                continue
            prob, score = s["probability"].values, s["score"].values
            from_score = bool(s["probability_from_score"].iloc[0])
            d = M.auc_delong(y, score)
            boot = M.bootstrap_auc(y, score, counts[:, idx])
            lo, hi = M.percentile_ci(boot)
            row.update({"auc": d["auc"], "auc_se": d["se"], "auc_ci_low": d["ci_low"], "auc_ci_high": d["ci_high"],
                        "auc_boot_ci_low": lo, "auc_boot_ci_high": hi})
            if m in cut:
                cls = M.classification_metrics(y, prob, cut[m])
                row.update({k: v for k, v in cls.items()})
            row["brier"] = M.brier_score(y, prob)
            # a score without probability is on the log-odds scale: calibrated on the score itself
            row.update(M.calibration_intercept_slope(y, lp=score) if from_score
                       else M.calibration_intercept_slope(y, prob))
            row.update(M.hosmer_lemeshow(y, prob, g=10))
            rows.append(row)
            curve = M.calibration_curve(y, prob, n_bins=cfg["calibration_bins"])
            cal_rows.append(curve.assign(endpoint="binary", split=split, cohort=c, model=m))
            nb = M.net_benefit(y, prob)
            dca_rows.append(nb.assign(endpoint="binary", split=split, cohort=c, model=m))
            plots[c][m] = {"y": y, "score": score, "prob": prob, "row": row, "curve": curve, "nb": nb}
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                both = per[a].dropna().index.intersection(per[b].dropna().index)
                yy = y_all.loc[both].values
                if len(both) < 3 or len(np.unique(yy)) < 2:
                    continue
                t = M.delong_test(yy, per[a].loc[both, "score"].values, per[b].loc[both, "score"].values)
                comps.append({"endpoint": "binary", "split": split, "cohort": c, "model_a": a, "model_b": b,
                              "n": len(both), **t, "test": "DeLong (paired)"})
        if "clinical" in models:
            for m in models:
                if m == "clinical":
                    continue
                both = per[m].dropna().index.intersection(per["clinical"].dropna().index)
                yy = y_all.loc[both].values
                if len(both) < 3 or len(np.unique(yy)) < 2:
                    continue
                idx = np.array([pos[p] for p in both])
                r = M.reclassification(yy, per["clinical"].loc[both, "probability"].values,
                                       per[m].loc[both, "probability"].values, cutoffs=nri_cutoffs,
                                       counts=counts[:, idx])
                reclass.append({"endpoint": "binary", "split": split, "cohort": c, "horizon": np.nan,
                                "model_new": m, "model_old": "clinical", **r})
    if first and out.make_figures:
        _plot_binary(plots, models, cohorts, colors, split, out)
    return rows, comps, reclass, cutoffs, cal_rows, dca_rows


def subgroup_table(table: pd.DataFrame, columns=None, source: str = "subgroups table") -> pd.DataFrame:
    """The clinical subgroups of the KM curves: `table` (column `patient` + one column per variable) indexed by
    patient (as text) with `columns` (default: every column but patient). PredictionsError names a missing column
    or a repeated patient."""
    need = ["patient"] + (list(columns) if columns is not None else [])
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise PredictionsError(f"{source} lacks column(s) {missing}; it has {list(table.columns)}")
    columns = list(columns) if columns is not None else [c for c in table.columns if c != "patient"]
    sub = table.assign(patient=table["patient"].astype(str).str.strip())
    repeated = sub["patient"][sub["patient"].duplicated()].unique()
    if len(repeated):
        raise PredictionsError(f"{source}: several rows for patient(s) {', '.join(repeated[:5])}")
    return sub.set_index("patient")[columns]


def _level_text(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{value:g}"
    return str(value)


def subgroup_levels(values: pd.Series, reference: pd.Series) -> tuple[pd.Series, list[str]]:
    """Each patient's level of one variable (NaN where the value is missing) and the levels in order.

    A numeric variable with more than SUBGROUP_MAX_LEVELS distinct values is split at the median of `reference`
    (its values on the reference cohort): "age <= 63", "age > 63"; any other: one level per distinct value.
    """
    name = values.name
    present = values.dropna()
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and present.nunique() > SUBGROUP_MAX_LEVELS:
        ref = reference.dropna().astype(float)
        if ref.empty:
            log.warning("subgroup variable %s has no value on the reference cohort: split at the median of all "
                        "patients", name)
            ref = present.astype(float)
        med = float(np.median(ref))
        low, high = f"{name} <= {med:g}", f"{name} > {med:g}"
        labels = pd.Series(np.where(values.astype(float) <= med, low, high), index=values.index, dtype=object)
        return labels.where(values.notna()), [low, high]
    distinct = present.unique()
    distinct = sorted(distinct) if numeric else sorted(distinct, key=lambda v: (str(type(v)), str(v)))
    labels = pd.Series(values.map(_level_text), index=values.index, dtype=object)
    return labels.where(values.notna()), list(dict.fromkeys(_level_text(v) for v in distinct))


def _km_subgroups(df: pd.DataFrame, split, models, cohorts, ref: str, cut: dict, cfg: dict) -> tuple[list, dict]:
    """KM of high vs low risk (the reference cut-off of each model) within each level of each subgroup variable.

    Rows: one per cohort x model x variable x level, and one for the patients with a missing value (left out).
    A level with fewer than 2 patients in a risk group or no event gets a note and no test. Plots:
    {(variable, cohort): {model: {level: (km or None, row)}}}.
    """
    sub = cfg["subgroups"]
    patients = pd.Index(df["patient"].unique())
    ref_patients = pd.Index(df.loc[df["cohort"] == ref, "patient"].unique())
    rows, plots = [], {}
    for var in sub.columns:
        values = sub[var].reindex(patients)  # patients absent from the table: missing
        labels, levels = subgroup_levels(values, values.reindex(ref_patients))
        for c in cohorts:
            cdf = df[df["cohort"] == c]
            for m in (m for m in models if m in cut):
                s = cdf[cdf["model"] == m].dropna(subset=["score"]).set_index("patient")
                if s.empty:
                    continue
                lab = labels.reindex(s.index)
                key = {"endpoint": "survival", "split": split, "cohort": c, "model": m, "variable": var}
                if lab.isna().any():
                    rows.append({**key, "level": SUBGROUP_MISSING, "n": int(lab.isna().sum()),
                                 "events": int(s.loc[lab.isna(), "event"].sum()),
                                 "note": "missing value: left out of the subgroups"})
                for level in levels:
                    g = s[(lab == level).to_numpy()]
                    t, e = g["time"].to_numpy(dtype=float), g["event"].to_numpy(dtype=float).astype(bool)
                    high = g["score"].to_numpy(dtype=float) >= cut[m]
                    row = {**key, "level": level, "n": len(g), "events": int(e.sum()), "n_high": int(high.sum()),
                           "n_low": int((~high).sum())}
                    if len(g) == 0:
                        row["note"] = "no patient"
                    elif min(row["n_high"], row["n_low"]) < 2:
                        row["note"] = "fewer than 2 patients in a risk group: no test"
                    elif row["events"] == 0:
                        row["note"] = "no event: no test"
                    km = M.kaplan_meier_groups(t, e, high, cfg["at_risk_times"]) if len(g) else None
                    if "note" not in row:
                        hr = M.cox_hazard_ratio(t, e, high.astype(float))
                        row.update({"logrank_p": km["logrank_p"], "hr_high_vs_low": hr["hr"],
                                    "hr_high_vs_low_ci_low": hr["hr_ci_low"], "hr_high_vs_low_ci_high": hr["hr_ci_high"]})
                    rows.append(row)
                    plots.setdefault((var, c), {}).setdefault(m, {})[level] = (km, row)
    return rows, plots


def _survival_split(df: pd.DataFrame, split, models, cohorts, ref: str, cfg: dict, out: _Outputs, colors, first: bool):
    rows, comps, reclass, cutoffs, cal_rows, dca_rows, td_rows = [], [], [], [], [], [], []
    horizons = list(cfg["horizons"])
    ref_df = df[df["cohort"] == ref]
    ref_base = ref_df.drop_duplicates("patient")
    constant = constant_models(ref_df, models)
    _note_constant(rows, df, "survival", split, cohorts, constant, ref)
    models = [m for m in models if m not in constant]
    cut, recal, sd = {}, {}, {}
    for m in models:
        r = ref_df[ref_df["model"] == m]
        if len(r) > 1:
            sd[m] = float(r["score"].std(ddof=1))  # hazard ratios per SD of the score on the reference cohort
        if r.empty or r["event"].sum() == 0:
            continue
        t, e, s = r["time"].values, r["event"].values, r["score"].values
        cut[m] = M.survival_cutoff(t, e, s, method=cfg["survival_cutoff"],
                                   horizon=horizons[len(horizons) // 2] if horizons else None)
        recal[m] = M.CoxRecalibration.fit(t, e, s)
        cutoffs.append({"endpoint": "survival", "split": split, "model": m, "method": cfg["survival_cutoff"],
                        "learnt_on": ref, "cutoff": cut[m], "n": len(r), "cox_beta": recal[m].beta})
    tr_t, tr_e = ref_base["time"].values.astype(float), ref_base["event"].values.astype(bool)
    tau = max(horizons) if horizons else None
    plots = {}
    for c in cohorts:
        cdf = df[df["cohort"] == c]
        base, per = _cohort_frames(cdf, models)
        t_all, e_all = base["time"].values.astype(float), base["event"].values.astype(bool)
        counts = M.bootstrap_counts(len(base), cfg["n_bootstrap"], _seed(cfg["seed"], "survival", split, c),
                                    strata=e_all)
        pos = {p: i for i, p in enumerate(base.index)}
        in_follow_up = [h for h in horizons if h < t_all.max()]
        grid = np.quantile(t_all[e_all], np.linspace(0.05, 0.95, 25)) if e_all.sum() >= 5 else np.array([])
        grid = grid[grid < t_all.max()]
        plots[c] = {"models": {}, "horizons": in_follow_up, "train": (tr_t, tr_e)}
        boot_c = {}
        for m in models:
            s = per[m]["score"].dropna()
            if s.empty:
                continue
            idx = np.array([pos[p] for p in s.index])
            t, e, score = t_all[idx], e_all[idx], s.values
            row = {"endpoint": "survival", "split": split, "cohort": c, "model": m, "n": len(t), "events": int(e.sum())}
            if e.sum() == 0:
                rows.append({**row, "note": "no event: no concordance"})
                log.warning("survival: cohort %s (split %s) has no event: no concordance", c, split)
                continue
            cnt = counts[:, idx]
            hc = M.harrell_c(t, e, score)
            boot_c[m] = (s.index, M.harrell_c(t, e, score, counts=cnt))
            row.update({"c_harrell": hc})
            row["c_harrell_ci_low"], row["c_harrell_ci_high"] = M.percentile_ci(boot_c[m][1])
            row["c_uno"] = M.uno_c(tr_t, tr_e, t, e, score, tau=tau)
            row["c_uno_ci_low"], row["c_uno_ci_high"] = M.percentile_ci(M.uno_c(tr_t, tr_e, t, e, score, tau=tau, counts=cnt))
            row["c_uno_tau"] = tau
            if horizons:
                td = M.time_dependent_auc(tr_t, tr_e, t, e, score, horizons)
                td_b = M.time_dependent_auc(tr_t, tr_e, t, e, score, horizons, counts=cnt)
                for k, h in enumerate(horizons):
                    lo, hi = M.percentile_ci(td_b[:, k])
                    row[f"td_auc_{h:g}"] = td[k]
                    row[f"td_auc_{h:g}_ci_low"], row[f"td_auc_{h:g}_ci_high"] = lo, hi
                    td_rows.append({"endpoint": "survival", "split": split, "cohort": c, "model": m, "time": h,
                                    "auc": td[k], "ci_low": lo, "ci_high": hi, "horizon": True})
            curve = M.time_dependent_auc(tr_t, tr_e, t, e, score, grid) if len(grid) else np.array([])
            td_rows += [{"endpoint": "survival", "split": split, "cohort": c, "model": m, "time": g, "auc": a,
                         "horizon": False} for g, a in zip(grid, curve)]
            if m in sd:
                hr = M.cox_hazard_ratio(t, e, score / sd[m])
                row.update({"score_sd_reference": sd[m], "hr_per_sd": hr["hr"], "hr_per_sd_ci_low": hr["hr_ci_low"],
                            "hr_per_sd_ci_high": hr["hr_ci_high"], "hr_per_sd_p": hr["hr_p"]})
            km = None
            if m in cut:
                high = score >= cut[m]
                km = M.kaplan_meier_groups(t, e, high, cfg["at_risk_times"])
                g = M.cox_hazard_ratio(t, e, high.astype(float))
                row.update({"cutoff": cut[m], "n_high": int(high.sum()), "n_low": int((~high).sum()),
                            "logrank_chi2": km["logrank_chi2"], "logrank_p": km["logrank_p"],
                            "hr_high_vs_low": g["hr"], "hr_high_vs_low_ci_low": g["hr_ci_low"],
                            "hr_high_vs_low_ci_high": g["hr_ci_high"], "hr_high_vs_low_p": g["hr_p"],
                            "median_low": km["median"].get("low", np.nan), "median_high": km["median"].get("high", np.nan)})
                for k, at in enumerate(cfg["at_risk_times"]):
                    row[f"at_risk_low_{at:g}"] = km["at_risk"]["low"][k]
                    row[f"at_risk_high_{at:g}"] = km["at_risk"]["high"][k]
            risks, cals, nbs = {}, {}, {}
            if m in recal:
                for h in in_follow_up:
                    risks[h] = recal[m].risk(score, h)
                    cals[h] = M.survival_calibration(t, e, risks[h], h, n_groups=cfg["survival_calibration_groups"])
                    cal_rows.append(cals[h].assign(endpoint="survival", split=split, cohort=c, model=m, horizon=h))
                    nbs[h] = M.net_benefit_survival(t, e, risks[h], h)
                    dca_rows.append(nbs[h].assign(endpoint="survival", split=split, cohort=c, model=m, horizon=h))
            rows.append(row)
            plots[c]["models"][m] = {"t": t, "e": e, "score": score, "row": row, "km": km, "risks": risks, "cal": cals, "nb": nbs,
                                     "td_grid": grid, "td_curve": curve}
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                if a not in boot_c or b not in boot_c:
                    continue
                both = boot_c[a][0].intersection(boot_c[b][0])
                if not (len(both) == len(boot_c[a][0]) == len(boot_c[b][0])):
                    continue  # paired bootstrap difference only on identical patients
                ca, cb = plots[c]["models"][a]["row"]["c_harrell"], plots[c]["models"][b]["row"]["c_harrell"]
                diff = boot_c[a][1] - boot_c[b][1]
                lo, hi = M.percentile_ci(diff)
                p = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))
                comps.append({"endpoint": "survival", "split": split, "cohort": c, "model_a": a, "model_b": b,
                              "n": len(both), "c_a": ca, "c_b": cb, "difference": ca - cb, "ci_low": lo, "ci_high": hi,
                              "p": p, "test": "paired bootstrap of Harrell's C"})
        if "clinical" in models and "clinical" in recal:
            for m in models:
                if m == "clinical" or m not in recal:
                    continue
                both = per[m]["score"].dropna().index.intersection(per["clinical"]["score"].dropna().index)
                idx = np.array([pos[p] for p in both])
                t, e = t_all[idx], e_all[idx]
                for h in in_follow_up:
                    status, known = M.status_at_horizon(t, e, h)
                    if known.sum() < 3 or len(np.unique(status[known])) < 2:
                        continue
                    p_old = recal["clinical"].risk(per["clinical"].loc[both, "score"].values, h)
                    p_new = recal[m].risk(per[m].loc[both, "score"].values, h)
                    r = M.reclassification(status[known], p_old[known], p_new[known],
                                           cutoffs=cfg["nri_cutoffs"] or [round(float(np.median(p_old)), 3)],
                                           counts=counts[:, idx][:, known])
                    reclass.append({"endpoint": "survival", "split": split, "cohort": c, "horizon": h,
                                    "model_new": m, "model_old": "clinical", **r})
    sub_rows, sub_plots = [], {}
    if first and cfg.get("subgroups") is not None:  # the primary split only, as the KM figures
        sub_rows, sub_plots = _km_subgroups(df, split, models, cohorts, ref, cut, cfg)
    if first and out.make_figures:
        _plot_survival(plots, models, cohorts, colors, split, cfg, out, sub_plots)
    return rows, comps, reclass, cutoffs, cal_rows, dca_rows, td_rows, sub_rows


def _excluded_per_row(met: pd.DataFrame, exclusions: pd.DataFrame) -> list[int]:
    """Predictions left out for a missing value, for each metrics row (endpoint x split x cohort x model)."""
    keys = ["endpoint", "split", "cohort", "model"]
    counts = exclusions.groupby(keys)["n_excluded"].sum().to_dict() if len(exclusions) else {}
    return [int(counts.get(tuple(r), 0)) for r in met[keys].itertuples(index=False)]


def summarise_splits(metrics: pd.DataFrame) -> pd.DataFrame:
    """Long table per endpoint x model x cohort x metric: value over splits (mean, 2.5 and 97.5 percentiles)."""
    keys = ["endpoint", "model", "cohort"]
    skip = {"split"}
    value_cols = [c for c in metrics.columns if c not in keys and c not in skip
                  and pd.api.types.is_numeric_dtype(metrics[c])]
    rows = []
    for key, g in metrics.groupby(keys, sort=False):
        n_splits = g["split"].nunique()
        for col in value_cols:
            v = g[col].dropna().astype(float)
            if v.empty:
                continue
            rows.append({**dict(zip(keys, key)), "metric": col, "n_splits": n_splits, "mean": v.mean(),
                         "p2_5": np.percentile(v, 2.5) if n_splits > 1 else np.nan,
                         "p97_5": np.percentile(v, 97.5) if n_splits > 1 else np.nan})
    return pd.DataFrame(rows)


_BINARY_HEADLINE = [("AUC (95% CI)", "auc", "auc_ci_low", "auc_ci_high"),
                    ("AUC bootstrap CI", "auc", "auc_boot_ci_low", "auc_boot_ci_high"),
                    ("Accuracy", "accuracy", "accuracy_ci_low", "accuracy_ci_high"),
                    ("Sensitivity", "sensitivity", "sensitivity_ci_low", "sensitivity_ci_high"),
                    ("Specificity", "specificity", "specificity_ci_low", "specificity_ci_high"),
                    ("PPV", "ppv", "ppv_ci_low", "ppv_ci_high"), ("NPV", "npv", "npv_ci_low", "npv_ci_high"),
                    ("Brier", "brier", None, None),
                    ("Calibration intercept", "calibration_intercept", "calibration_intercept_ci_low",
                     "calibration_intercept_ci_high"),
                    ("Calibration slope", "calibration_slope", "calibration_slope_ci_low", "calibration_slope_ci_high"),
                    ("Hosmer-Lemeshow P", "hl_p", None, None)]


def _survival_headline(horizons):
    return ([("Harrell C (95% CI)", "c_harrell", "c_harrell_ci_low", "c_harrell_ci_high"),
             ("Uno C (95% CI)", "c_uno", "c_uno_ci_low", "c_uno_ci_high")]
            + [(f"AUC({h:g})", f"td_auc_{h:g}", f"td_auc_{h:g}_ci_low", f"td_auc_{h:g}_ci_high") for h in horizons]
            + [("HR per SD", "hr_per_sd", "hr_per_sd_ci_low", "hr_per_sd_ci_high"),
               ("HR high vs low", "hr_high_vs_low", "hr_high_vs_low_ci_low", "hr_high_vs_low_ci_high"),
               ("Log-rank P", "logrank_p", None, None)])


def headline_table(metrics: pd.DataFrame, spec, models, cohorts) -> pd.DataFrame:
    """One formatted row per model x cohort: 'estimate (low-high)'.

    One split: the within-split CIs. Several: mean over splits (2.5-97.5 percentiles over splits). Patients
    left out for a missing value (`excluded`) and a note (constant model, one outcome class; with several splits,
    in how many) are columns of their own, so that no number stands for what was not estimated.
    """
    rows = []
    n_splits = metrics["split"].nunique()
    notes = metrics["note"] if "note" in metrics.columns else pd.Series("", index=metrics.index)
    for c in cohorts:
        for m in models:
            sel = (metrics["cohort"] == c) & (metrics["model"] == m)
            g = metrics[sel]
            if g.empty:
                continue
            row = {"cohort": c, "model": m, "n": int(g["n"].iloc[0]) if n_splits == 1 else f"{g['n'].mean():.0f}",
                   "events": int(g["events"].iloc[0]) if n_splits == 1 else f"{g['events'].mean():.0f}"}
            if "excluded" in g.columns and g["excluded"].sum() > 0:
                row["excluded"] = int(g["excluded"].iloc[0]) if n_splits == 1 else f"{g['excluded'].mean():.0f}"
            note = notes[sel].fillna("")
            for text in dict.fromkeys(note[note != ""]):
                k = int((note == text).sum())
                row["note"] = "; ".join(filter(None, [row.get("note"), text if k == len(g) else
                                                      f"{text} in {k} of {len(g)} splits"]))
            if (note != "").all():
                rows.append(row)
                continue
            for label, est, lo, hi in spec:
                if est not in g.columns:
                    continue
                v = g[est].dropna().astype(float)
                if v.empty:
                    row[label] = "NA"
                elif est.endswith("_p") and n_splits == 1:
                    row[label] = format_p(v.iloc[0])
                elif n_splits == 1:
                    row[label] = _fmt_ci(v.iloc[0], g[lo].iloc[0] if lo else None, g[hi].iloc[0] if hi else None)
                elif "bootstrap" not in label:
                    row[label.replace(" (95% CI)", "")] = _fmt_ci(v.mean(), np.percentile(v, 2.5), np.percentile(v, 97.5))
            rows.append(row)
    table = pd.DataFrame(rows)
    return table[[c for c in table.columns if c != "note"] + (["note"] if "note" in table.columns else [])]


def reclassification_table(reclass: pd.DataFrame) -> pd.DataFrame:
    """Formatted NRI (continuous, categorical) and IDI per endpoint x horizon x cohort x model pair."""
    rows = []
    for r in reclass.to_dict("records"):
        row = {"endpoint": r["endpoint"], "horizon": "" if pd.isna(r["horizon"]) else f"{r['horizon']:g}",
               "cohort": r["cohort"], "split": r["split"], "comparison": f"{r['model_new']} vs {r['model_old']}",
               "n": r["n"], "events": r["events"]}
        for name, label in (("nri_continuous", "NRI continuous"), ("nri_categorical", "NRI categorical"), ("idi", "IDI")):
            if name in r and pd.notna(r.get(name)):
                row[label] = _fmt_ci(r[name], r[f"{name}_ci_low"], r[f"{name}_ci_high"])
                row[f"{label} P"] = format_p(r[f"{name}_p"])
        row["risk cut-offs"] = r.get("nri_cutoffs", "")
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate(predictions: pd.DataFrame, out_dir: str | Path, *, time_unit: str | None = None, horizons=None,
             decimal: str = ".", n_bootstrap: int | None = None, seed: int = 20240601,
             reference_cohort: str = "training", linear_models=(), survival_cutoff: str = "median",
             nri_cutoffs=None, calibration_bins: int = 10, survival_calibration_groups: int = 4,
             figures: bool = True, subgroups: pd.DataFrame | None = None) -> dict:
    """Evaluate every model on every cohort (and split); write tables, figures and `manifest.json`.

    linear_models: `LinearModel`s (the combined model per endpoint, from its coefficients and design matrix)
    for the SHAP figures and the nomogram. nri_cutoffs: risk-category cut-offs of the categorical NRI
    (default: the event rate of the reference cohort for binary, the clinical model's median risk for survival).
    time_unit / horizons / n_bootstrap: None takes the config schema's `evaluation` defaults (horizons: 1, 2 and 3
    years in the time unit). decimal: the decimal mark of numbers given as text ("." or ",", radstudy.evaluate.inputs).
    subgroups: patient + one column per clinical variable (values as in the clinical table): KM of high vs low risk
    (the reference cut-off) within each level of each variable, primary split (table and figures `km_subgroups`;
    `subgroup_levels`).
    Returns {"tables": {name: path}, "figures": [...], "metrics": {endpoint: DataFrame}, "exclusions": DataFrame}.
    Raises PredictionsError when the predictions break the input contract.
    """
    defaults = settings("evaluation")
    time_unit = U.check_unit(defaults["time_unit"] if time_unit is None else time_unit)
    horizons = defaults["horizons"] if horizons is None else horizons
    horizons = [float(h) for h in (U.default_horizons(time_unit) if horizons is None else horizons)]
    n_bootstrap = defaults["n_bootstrap"] if n_bootstrap is None else n_bootstrap
    checked = normalise_predictions(predictions, decimal=decimal)
    preds = checked[checked["excluded"] == ""]
    exclusions = exclusion_counts(checked)
    models = ordered(preds["model"], MODEL_ORDER)
    cohorts = ordered(preds["cohort"], COHORTS)
    if reference_cohort not in cohorts:
        raise PredictionsError(f"reference cohort {reference_cohort!r} is not among the cohorts {cohorts} of the "
                               "evaluated predictions (column 'cohort')")
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = _Outputs(out_dir, make_figures=figures)
    colors = model_colors(models)
    max_t = preds["time"].max() if preds["time"].notna().any() else np.nan
    cfg = {"n_bootstrap": n_bootstrap, "seed": seed, "nri_cutoffs": nri_cutoffs, "horizons": horizons,
           "time_unit": time_unit, "survival_cutoff": survival_cutoff, "calibration_bins": calibration_bins,
           "survival_calibration_groups": survival_calibration_groups,
           "at_risk_times": U.time_ticks(max_t, time_unit),
           "subgroups": subgroup_table(subgroups) if subgroups is not None else None}
    if cfg["subgroups"] is not None and cfg["subgroups"].columns.empty:
        cfg["subgroups"] = None
    if not np.isnan(max_t) and max(horizons, default=0) >= max_t:
        log.warning("horizon(s) %s %s lie beyond the longest follow-up (%g %s): check the time unit",
                    [h for h in horizons if h >= max_t], time_unit, max_t, time_unit)

    out.table("cohorts", checked.drop_duplicates(["patient", "split"])[["patient", "split", "cohort", "center"]],
              "Patients per split and cohort", "design")
    out.table("exclusions", exclusions, "Predictions left out for a missing value, per cohort and model "
              "(n_excluded of rows)", "exclusions", keep_empty=True)
    results: dict = {"metrics": {}}
    all_comps, all_reclass, all_cutoffs, all_subgroups = [], [], [], []
    for endpoint in ordered(preds["endpoint"], ["binary", "survival"]):
        edf = preds[preds["endpoint"] == endpoint]
        e_models = ordered(edf["model"], MODEL_ORDER)
        e_cohorts = ordered(edf["cohort"], COHORTS)
        rows, cal, dca, td = [], [], [], []
        for k, split in enumerate(sorted(edf["split"].unique(), key=str)):
            sdf = edf[edf["split"] == split]
            s_cohorts = [c for c in e_cohorts if c in set(sdf["cohort"])]
            if reference_cohort not in s_cohorts:
                log.warning("%s split %s has no %s cohort: skipped", endpoint, split, reference_cohort)
                continue
            if endpoint == "binary":
                r, cp, rc, ct, cl, dc = _binary_split(sdf, split, e_models, s_cohorts, reference_cohort, cfg, out,
                                                      colors, first=(k == 0))
            else:
                r, cp, rc, ct, cl, dc, tdr, sg = _survival_split(sdf, split, e_models, s_cohorts, reference_cohort,
                                                                 cfg, out, colors, first=(k == 0))
                td += tdr
                all_subgroups += sg
            rows += r
            all_comps += cp
            all_reclass += rc
            all_cutoffs += ct
            cal += cl
            dca += dc
        met = pd.DataFrame(rows)
        if met.empty:
            continue
        met["excluded"] = _excluded_per_row(met, exclusions)
        results["metrics"][endpoint] = met
        label = "binary endpoint" if endpoint == "binary" else "survival endpoint"
        out.table(f"metrics_{endpoint}", met, f"All metrics, {label}, per model x cohort x split", endpoint)
        spec = _BINARY_HEADLINE if endpoint == "binary" else _survival_headline(horizons)
        out.table(f"summary_{endpoint}", headline_table(met, spec, e_models, e_cohorts),
                  f"Performance, {label}" + (" (mean and 2.5-97.5 percentiles over splits)"
                                              if met["split"].nunique() > 1 else " (95% CI)"), endpoint)
        if met["split"].nunique() > 1:
            out.table(f"summary_{endpoint}_splits", summarise_splits(met),
                      f"Metrics aggregated over splits, {label}", endpoint)
        if cal:
            out.table(f"calibration_{endpoint}", pd.concat(cal, ignore_index=True),
                      f"Calibration by risk group, {label}", endpoint)
        if dca:
            out.table(f"decision_curve_{endpoint}", pd.concat(dca, ignore_index=True),
                      f"Decision curve (net benefit), {label}", endpoint)
        if td:
            out.table("time_dependent_auc", pd.DataFrame(td), "Time-dependent AUC (cumulative/dynamic, IPCW)", endpoint)
    comps = pd.DataFrame(all_comps)
    for ep in ("binary", "survival"):
        if not comps.empty and (comps["endpoint"] == ep).any():
            sub = comps[comps["endpoint"] == ep].dropna(axis=1, how="all")
            title = ("DeLong tests between models (paired, same patients)" if ep == "binary"
                     else "Harrell's C differences between models (paired bootstrap)")
            out.table(f"comparisons_{ep}", sub, title, ep)
    reclass = pd.DataFrame(all_reclass)
    out.table("reclassification", reclass, "NRI and IDI of each model over the clinical model (all columns)",
              "reclassification")
    out.table("summary_reclassification", reclassification_table(reclass),
              "NRI and IDI of each model over the clinical model (95% CI; P from the asymptotic z)", "reclassification")
    out.table("cutoffs", pd.DataFrame(all_cutoffs), f"Cut-offs learnt on the {reference_cohort} cohort", "cutoffs")
    if all_subgroups:
        sub = pd.DataFrame(all_subgroups).reindex(columns=KM_SUBGROUP_COLUMNS)
        sub[["n_high", "n_low"]] = sub[["n_high", "n_low"]].astype("Int64")  # none for the missing-value rows
        out.table("km_subgroups", sub,
                  f"Kaplan-Meier of high- vs low-risk groups within clinical subgroups (cut-off learnt on the "
                  f"{reference_cohort} cohort; primary split): log-rank P and hazard ratio", "survival")

    for lm in linear_models:
        if lm.coefficients.empty:  # nothing to explain, and SHAP of no predictor is no figure
            log.warning("the %s %s model has no predictor (%s): no SHAP or nomogram", lm.endpoint, lm.model,
                        CONSTANT_NOTE)
            continue
        _explain(lm, preds, reference_cohort, cfg, out)

    manifest = {"tables": out.tables, "figures": out.figures,
                "exclusions": exclusions.to_dict("records"),
                "settings": {"time_unit": time_unit, "horizons": horizons, "n_bootstrap": n_bootstrap, "seed": seed,
                             "reference_cohort": reference_cohort, "survival_cutoff": survival_cutoff,
                             "models": models, "cohorts": cohorts,
                             "endpoints": ordered(preds["endpoint"], ["binary", "survival"]),
                             "n_splits": int(preds["split"].nunique()), "n_patients": int(preds["patient"].nunique()),
                             "predictions_excluded": int(exclusions["n_excluded"].sum())}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    results.update({"tables": {k: out_dir / v["path"] for k, v in out.tables.items()}, "figures": out.figures,
                    "manifest": out_dir / "manifest.json", "exclusions": exclusions})
    return results


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def _ax_style(ax, xlabel, ylabel, title=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25, linewidth=0.5)


def _yerr(df: pd.DataFrame) -> np.ndarray:
    return np.clip([df["observed"] - df["observed_ci_low"], df["observed_ci_high"] - df["observed"]], 0, None)


def _plot_binary(plots, models, cohorts, colors, split, out: _Outputs):
    import matplotlib.pyplot as plt

    for c in cohorts:
        res = plots.get(c, {})
        if not res:
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        for m in models:
            if m not in res:
                continue
            fpr, tpr, _ = M.roc_curve_points(res[m]["y"], res[m]["score"])
            r = res[m]["row"]
            ax.plot(fpr, tpr, color=colors[m], lw=1.8,
                    label=f"{m}: AUC {r['auc']:.3f} ({r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        _ax_style(ax, "1 - specificity", "Sensitivity", f"ROC, {c} cohort")
        ax.legend(loc="lower right", fontsize=8, title="AUC (95% CI, DeLong)", title_fontsize=8)
        out.figure(fig, f"roc_binary_{c}", f"ROC curves of the binary endpoint, {c} cohort; AUC with DeLong 95% CI.",
                   "binary", cohort=c, kind="roc", split=str(split))

        fig, ax = plt.subplots(figsize=(5, 5))
        for m in models:
            if m not in res:
                continue
            cv, r = res[m]["curve"], res[m]["row"]
            ax.errorbar(cv["predicted"], cv["observed"],
                        yerr=_yerr(cv),
                        fmt="o", ms=3.5, color=colors[m], alpha=0.7, capsize=2, lw=0.8)
            sm = M.lowess_curve(res[m]["y"], res[m]["prob"])
            ax.plot(sm["predicted"], sm["observed"], color=colors[m], lw=1.6,
                    label=f"{m}: slope {r['calibration_slope']:.2f}, intercept {r['calibration_intercept']:.2f}, "
                          f"HL P {r['hl_p']:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="ideal")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _ax_style(ax, "Predicted probability", "Observed proportion", f"Calibration, {c} cohort")
        ax.legend(loc="upper left", fontsize=7)
        out.figure(fig, f"calibration_binary_{c}",
                   f"Calibration, {c} cohort: deciles of predicted probability (observed with Wilson 95% CI) and a "
                   f"locally weighted smooth; slope/intercept from logistic recalibration; Hosmer-Lemeshow (g=10).",
                   "binary", cohort=c, kind="calibration", split=str(split))

        fig, ax = plt.subplots(figsize=(6, 4.5))
        top = 0.05
        for m in models:
            if m not in res:
                continue
            nb = res[m]["nb"]
            ax.plot(nb["threshold"], nb["net_benefit"], color=colors[m], lw=1.6, label=m)
            top = max(top, nb["net_benefit"].max())
        nb = next(iter(res.values()))["nb"]
        ax.plot(nb["threshold"], nb["treat_all"], color="grey", lw=1.2, label="treat all")
        ax.axhline(0, color="black", lw=1.0, label="treat none")
        ax.set_ylim(-0.05, top * 1.15 + 0.01)
        ax.set_xlim(0, 1)
        _ax_style(ax, "Threshold probability", "Net benefit", f"Decision curves, {c} cohort")
        ax.legend(fontsize=8)
        out.figure(fig, f"decision_curve_binary_{c}", f"Decision curve analysis of the binary endpoint, {c} cohort.",
                   "binary", cohort=c, kind="decision", split=str(split))

        m = "combined" if "combined" in res else list(res)[-1]
        nb = res[m]["nb"]
        n = len(res[m]["y"])
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.plot(nb["threshold"], nb["n_high_risk"] * 1000 / n, color=colors[m], lw=1.8, label="number high risk")
        ax.plot(nb["threshold"], nb["n_high_risk_events"] * 1000 / n, color=colors[m], lw=1.4, ls="--",
                label="number high risk with event")
        ax.set_xlim(0, 1)
        _ax_style(ax, "Threshold probability", "Number per 1,000 patients", f"Clinical impact, {m} model, {c} cohort")
        ax.legend(fontsize=8)
        out.figure(fig, f"clinical_impact_binary_{c}", f"Clinical impact curve of the {m} model, {c} cohort.",
                   "binary", cohort=c, kind="clinical_impact", split=str(split))


def _km_panel(ax, km, color, t_end, at_times):
    """The high- and low-risk Kaplan-Meier curves (95% CI bands) of one panel, in the km_survival style."""
    for grp in ("low", "high"):
        if km is None or grp not in km["curves"]:
            continue
        cv = km["curves"][grp]
        col = color if grp == "high" else "#4d4d4d"
        ax.step(cv["time"], cv["survival"], where="post", color=col, lw=1.6, label=f"{grp} risk (n={km['n'][grp]})")
        ax.fill_between(cv["time"], cv["ci_low"], cv["ci_high"], step="post", color=col, alpha=0.12)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.06 * t_end, 1.03 * t_end)
    ax.set_xticks(at_times)


def _km_text(row: dict) -> str:
    """Log-rank P and the hazard ratio of high vs low risk (95% CI) of a KM panel."""
    p = row["logrank_p"]
    return (f"log-rank P {'<0.0001' if p < 1e-4 else f'{p:.4f}'}\nHR {row['hr_high_vs_low']:.2f} "
            f"({row['hr_high_vs_low_ci_low']:.2f}-{row['hr_high_vs_low_ci_high']:.2f})")


def _plot_km_subgroups(sub_plots, c, colors, split, cfg, out: _Outputs):
    """One figure per subgroup variable of cohort c: rows the models with a cut-off, columns the levels."""
    import matplotlib.pyplot as plt

    at_times, unit = cfg["at_risk_times"], cfg["time_unit"]
    for (var, cohort), per_model in sub_plots.items():
        if cohort != c:
            continue
        km_models = list(per_model)
        levels = list(dict.fromkeys(lv for m in km_models for lv in per_model[m]))
        fig, axes = plt.subplots(len(km_models), len(levels), figsize=(3.6 * len(levels), 3.2 * len(km_models)),
                                 squeeze=False)
        t_all = [float(max(km["curves"][g]["time"])) for m in km_models for km, _ in per_model[m].values()
                 if km is not None for g in km["curves"]]
        t_end = at_times[-1] if at_times else max(t_all, default=1.0)
        for i, m in enumerate(km_models):
            for j, level in enumerate(levels):
                ax = axes[i, j]
                km, row = per_model[m].get(level, (None, {"note": "no patient"}))
                _km_panel(ax, km, colors[m], t_end, at_times)
                ax.text(0.03, 0.05, row.get("note") or _km_text(row), transform=ax.transAxes, fontsize=7)
                title = level if str(level).startswith(f"{var} ") else f"{var} = {level}"
                _ax_style(ax, f"Time ({unit})" if i == len(km_models) - 1 else "",
                          "Event-free survival" if j == 0 else "", f"{m} model, {title}")
                ax.tick_params(labelsize=7)
                if km is not None:
                    ax.legend(fontsize=6, loc="upper right")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(var))
        out.figure(fig, f"km_subgroups_{safe}_{c}",
                   f"Kaplan-Meier curves of high- vs low-risk patients within each level of {var} "
                   f"({cfg['survival_cutoff']} cut-off learnt on the training cohort), {c} cohort.",
                   "survival", cohort=c, kind="km_subgroup", split=str(split), variable=str(var))


def _plot_survival(plots, models, cohorts, colors, split, cfg, out: _Outputs, sub_plots=None):
    import matplotlib.pyplot as plt

    at_times, unit = cfg["at_risk_times"], cfg["time_unit"]
    for c in cohorts:
        res = plots.get(c, {}).get("models", {})
        if not res:
            continue
        km_models = [m for m in models if m in res and res[m]["km"] is not None]
        if km_models:
            n = len(km_models)
            fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.2), gridspec_kw={"height_ratios": [4, 1]}, squeeze=False)
            for j, m in enumerate(km_models):
                ax, tab = axes[0, j], axes[1, j]
                km, r = res[m]["km"], res[m]["row"]
                _km_panel(ax, km, colors[m], at_times[-1] if at_times else float(max(res[m]["t"])), at_times)
                ax.text(0.03, 0.05, _km_text(r), transform=ax.transAxes, fontsize=8)
                _ax_style(ax, "", "Event-free survival probability" if j == 0 else "", f"{m} model, {c} cohort")
                ax.legend(fontsize=7, loc="upper right")
                tab.set_xlim(ax.get_xlim())
                tab.set_ylim(-0.5, 1.5)
                for k, at in enumerate(at_times):
                    tab.text(at, 1, str(km["at_risk"]["low"][k]), ha="center", va="center", fontsize=7, color="#4d4d4d")
                    tab.text(at, 0, str(km["at_risk"]["high"][k]), ha="center", va="center", fontsize=7, color=colors[m])
                tab.set_yticks([1, 0])
                tab.set_yticklabels(["low", "high"], fontsize=7)
                tab.set_xticks(at_times)
                tab.tick_params(axis="x", labelsize=7)
                tab.set_xlabel(f"Time ({unit})")
                tab.set_title("Number at risk", fontsize=8, loc="left")
                for side in ("top", "right", "left"):
                    tab.spines[side].set_visible(False)
            out.figure(fig, f"km_survival_{c}",
                       f"Kaplan-Meier curves of high- vs low-risk patients ({cfg['survival_cutoff']} cut-off learnt on the "
                       f"training cohort), {c} cohort, with log-rank P, hazard ratio and numbers at risk.",
                       "survival", cohort=c, kind="km", split=str(split))
        if sub_plots:
            _plot_km_subgroups(sub_plots, c, colors, split, cfg, out)

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in models:
            if m not in res or not len(res[m]["td_grid"]):
                continue
            ax.plot(res[m]["td_grid"], res[m]["td_curve"], color=colors[m], lw=1.5, label=m)
            r = res[m]["row"]
            for h in cfg["horizons"]:
                key = f"td_auc_{h:g}"
                if key in r and np.isfinite(r[key]):
                    ax.errorbar([h], [r[key]], yerr=[[r[key] - r[f"{key}_ci_low"]], [r[f"{key}_ci_high"] - r[key]]],
                                fmt="o", color=colors[m], ms=4, capsize=3)
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_ylim(0.3, 1.0)
        _ax_style(ax, f"Time ({unit})", "Time-dependent AUC", f"Cumulative/dynamic AUC(t), {c} cohort")
        ax.legend(fontsize=8)
        out.figure(fig, f"td_auc_survival_{c}", f"Time-dependent AUC (IPCW) over follow-up, {c} cohort; "
                   f"points: horizons with bootstrap 95% CI.", "survival", cohort=c, kind="td_auc", split=str(split))

        hs = plots[c]["horizons"]
        if hs:
            fig, axes = plt.subplots(1, len(hs), figsize=(4 * len(hs), 4), squeeze=False)
            for j, h in enumerate(hs):
                ax = axes[0, j]
                for m in models:
                    if m not in res:
                        continue
                    d = res[m]
                    fpr, tpr = M.time_dependent_roc(*plots[c]["train"], d["t"], d["e"], d["score"], h)
                    key = f"td_auc_{h:g}"
                    ax.plot(fpr, tpr, color=colors[m], lw=1.5,
                            label=f"{m}: {d['row'].get(key, np.nan):.3f}")
                ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
                _ax_style(ax, "1 - specificity", "Sensitivity" if j == 0 else "", f"{h:g} {unit}, {c} cohort")
                ax.legend(fontsize=7, loc="lower right", title="AUC(t)", title_fontsize=7)
            out.figure(fig, f"td_roc_survival_{c}", f"Time-dependent ROC curves at the horizons, {c} cohort.",
                       "survival", cohort=c, kind="td_roc", split=str(split))

            fig, axes = plt.subplots(1, len(hs), figsize=(4 * len(hs), 4), squeeze=False)
            for j, h in enumerate(hs):
                ax = axes[0, j]
                for m in models:
                    if m not in res or h not in res[m]["risks"]:
                        continue
                    d = res[m]
                    cal = d["cal"][h]
                    ax.errorbar(cal["predicted"], cal["observed"],
                                yerr=_yerr(cal),
                                fmt="o-", ms=4, color=colors[m], capsize=2, lw=1, label=m)
                ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                _ax_style(ax, f"Predicted event probability by {h:g} {unit}",
                          "Observed (1 - Kaplan-Meier)" if j == 0 else "", f"{h:g} {unit}, {c} cohort")
                ax.legend(fontsize=7)
            out.figure(fig, f"calibration_survival_{c}",
                       f"Calibration at the horizons, {c} cohort: risk quartiles, predicted (Cox recalibration of the "
                       f"score on the training cohort) vs observed (Kaplan-Meier, 95% CI).",
                       "survival", cohort=c, kind="calibration", split=str(split))

            fig, axes = plt.subplots(1, len(hs), figsize=(4 * len(hs), 4), squeeze=False)
            for j, h in enumerate(hs):
                ax = axes[0, j]
                top, all_line = 0.05, None
                for m in models:
                    if m not in res or h not in res[m]["risks"]:
                        continue
                    d = res[m]
                    nb = d["nb"][h]
                    ax.plot(nb["threshold"], nb["net_benefit"], color=colors[m], lw=1.5, label=m)
                    top = max(top, nb["net_benefit"].max())
                    all_line = nb
                if all_line is not None:
                    ax.plot(all_line["threshold"], all_line["treat_all"], color="grey", lw=1.1, label="treat all")
                ax.axhline(0, color="black", lw=1, label="treat none")
                ax.set_ylim(-0.05, top * 1.15 + 0.01)
                ax.set_xlim(0, 1)
                _ax_style(ax, "Threshold probability", "Net benefit" if j == 0 else "", f"{h:g} {unit}, {c} cohort")
                ax.legend(fontsize=7)
            out.figure(fig, f"decision_curve_survival_{c}", f"Decision curves at the horizons, {c} cohort.",
                       "survival", cohort=c, kind="decision", split=str(split))


# --------------------------------------------------------------------------------------------------
# explanation: SHAP and nomogram of a linear (combined) model
# --------------------------------------------------------------------------------------------------

def linear_shap(lm: LinearModel, background: pd.DataFrame, explain: pd.DataFrame):
    """Interventional SHAP values of a linear model (log-odds / log-hazard scale): shap.LinearExplainer."""
    import shap

    bg = background.dropna()
    x = explain.dropna()
    explainer = shap.LinearExplainer((lm.coefficients.values, lm.intercept), shap.maskers.Independent(bg.values, max_samples=len(bg)))
    values = explainer(x.values)
    values.feature_names = list(lm.coefficients.index)
    return values, x


def plot_nomogram(lm: LinearModel, reference: pd.DataFrame, *, outcome_axes: dict | None = None, title: str = ""):
    """Nomogram of a linear model: a points scale per predictor, total points, and outcome axes.

    reference: the training rows of the design matrix (ranges of the predictors). outcome_axes:
    {label: function(linear predictor) -> probability}; default the logistic probability.
    Points: the predictor with the widest effect range |beta| x (max - min) spans 0-100 points.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    coefs = lm.coefficients
    lo, hi = reference[coefs.index].min(), reference[coefs.index].max()
    # One axis per predictor; the 0/1 dummies of one categorical variable (`var[level]`) share one axis whose
    # ticks are its levels (the reference level: all dummies 0).
    axes: dict[str, list[str]] = {}
    level: dict[str, str] = {}  # dummy column -> its level
    for f in coefs.index:
        m = re.fullmatch(r"(.+)\[(.+)\]", str(f))
        if m is not None and set(np.unique(reference[f].dropna())) <= {0, 1}:
            level[f] = m.group(2)
        axes.setdefault(m.group(1) if f in level else str(f), []).append(f)
    ref = pd.Series(np.where(coefs > 0, lo, hi), index=coefs.index, dtype=float)
    spans = coefs.abs() * (hi - lo)
    for name, members in axes.items():
        if members[0] in level:  # categorical: levels at 0 (reference) and each coefficient
            c = coefs[members]
            lowest = c.idxmin() if c.min() < 0 else None
            ref[members] = [1.0 if f == lowest else 0.0 for f in members]
            spans[members] = max(0.0, c.max()) - min(0.0, c.min())
    spans = spans.replace(0, np.nan)
    scale = 100.0 / spans.max()
    max_points = float(sum(spans[m[0]] for m in axes.values() if np.isfinite(spans[m[0]])) * scale)
    lp0 = lm.intercept + float((coefs * ref).sum())
    if outcome_axes is None:
        outcome_axes = {"Predicted probability": expit}
    rows = ["Points"] + list(axes) + ["Total points"] + list(outcome_axes)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1))
    ax.set_xlim(-35, 105)
    ax.set_ylim(-len(rows) + 0.3, 0.8)
    ax.axis("off")

    def axis_row(y, label, positions, labels, min_gap: float = 4.5, every_label: bool = False):
        ax.text(-33, y, label, ha="left", va="center", fontsize=9, fontweight="bold" if label in ("Points", "Total points") else None)
        if len(positions):
            ax.plot([min(positions), max(positions)], [y, y], color="black", lw=1)
        last = -np.inf
        for x, t in sorted(zip(positions, labels)):
            ax.plot([x, x], [y, y + 0.12], color="black", lw=0.8)
            if x - last >= min_gap:  # label only ticks far enough apart to stay readable
                ax.text(x, y + 0.18, t, ha="center", va="bottom", fontsize=7)
                last = x
            elif every_label:  # a categorical level: always labelled, below the line when the one above is near
                ax.text(x, y - 0.1, t, ha="center", va="top", fontsize=7)

    axis_row(0, "Points", np.arange(0, 101, 10), [str(v) for v in range(0, 101, 10)])
    for i, (name, members) in enumerate(axes.items(), start=1):
        if members[0] in level:
            c = coefs[members]
            base = min(0.0, c.min())
            levels = ["ref"] + [level[f] for f in members]
            axis_row(-i, name, scale * (np.r_[0.0, c.to_numpy()] - base), levels, every_label=True)
            continue
        f = members[0]
        vals = np.unique(reference[f].dropna())
        if f in lm.log1p:  # ticks in the variable's own units (1, 2, 5, 10, ...), placed at log(1 + x)
            raw = np.r_[0.0, [m * 10.0 ** k for k in range(-2, 8) for m in (1, 2, 5)]]
            raw = raw[(np.log1p(raw) >= lo[f] - 1e-12) & (np.log1p(raw) <= hi[f] + 1e-12)]
            pts = scale * coefs[f] * (np.log1p(raw) - ref[f])
            axis_row(-i, f"{f} (log scale)", pts, [f"{v:g}" for v in raw])
            continue
        if len(vals) <= 6:
            ticks = vals
        else:
            n_bins = max(2, int(spans[f] * scale / 10))
            ticks = MaxNLocator(nbins=n_bins).tick_values(lo[f], hi[f])
            ticks = ticks[(ticks >= lo[f] - 1e-12) & (ticks <= hi[f] + 1e-12)]
        pts = scale * coefs[f] * (ticks - ref[f])
        axis_row(-i, f, pts, [f"{v:g}" for v in ticks])
    y_total = -(len(axes) + 1)
    total_ticks = np.linspace(0, max_points, 9)
    to_x = 100.0 / max_points
    axis_row(y_total, "Total points", total_ticks * to_x, [f"{v:.0f}" for v in total_ticks])
    for k, (label, fn) in enumerate(outcome_axes.items(), start=1):
        lp_at = lambda tp: lp0 + tp / scale  # noqa: E731  linear predictor at a total of points
        probs = fn(lp_at(np.linspace(0, max_points, 400)))
        nice = np.array([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
        nice = nice[(nice >= probs.min()) & (nice <= probs.max())]
        order = np.argsort(probs)
        xs = np.interp(nice, probs[order], np.linspace(0, max_points, 400)[order]) * to_x
        axis_row(y_total - k, label, xs, [f"{p:g}" for p in nice])
    if title:
        ax.set_title(title, fontsize=11)
    table = pd.DataFrame({"feature": coefs.index, "coefficient": coefs.values, "min": lo.values, "max": hi.values,
                          "zero_points_at": ref.values, "points_per_unit": (scale * coefs).values,
                          "max_points": (spans * scale).values,
                          "scale": ["log(1 + x)" if f in lm.log1p else "x" for f in coefs.index]})
    return fig, table


def _explain(lm: LinearModel, preds: pd.DataFrame, reference_cohort: str, cfg: dict, out: _Outputs) -> None:
    import matplotlib.pyplot as plt
    import shap

    ep = preds[preds["endpoint"] == lm.endpoint]
    first_split = sorted(ep["split"].unique(), key=str)[0] if len(ep) else None
    train_ids = set(ep.loc[(ep["cohort"] == reference_cohort) & (ep["split"] == first_split), "patient"])
    design = lm.design
    train = design[design.index.isin(train_ids)]
    if train.dropna().empty:
        log.warning("no %s patients in the %s design matrix: using all rows as reference", reference_cohort, lm.endpoint)
        train = design
    values, x = linear_shap(lm, train, design)
    scale = "log-odds" if lm.endpoint == "binary" else "log relative hazard"
    sv = pd.DataFrame(values.values, index=x.index, columns=lm.coefficients.index)
    out.table(f"shap_values_{lm.endpoint}", sv.reset_index().rename(columns={"index": "patient"}),
              f"SHAP values of the {lm.model} model ({lm.endpoint}, {scale} scale)", "explain")
    mean_abs = sv.abs().mean().sort_values(ascending=False)
    out.table(f"shap_importance_{lm.endpoint}", mean_abs.rename_axis("feature").reset_index(name="mean_abs_shap"),
              f"Mean |SHAP| of the {lm.model} model ({lm.endpoint})", "explain")
    if out.make_figures:
        n_show = min(20, len(lm.coefficients))
        fig = plt.figure(figsize=(7, 0.4 * n_show + 1.5))
        state = np.random.get_state()  # shap's beeswarm jitters with NumPy's global state: seeded, same figure
        np.random.seed(_seed(cfg["seed"], "shap", lm.endpoint).integers(2**32))
        try:
            shap.plots.beeswarm(values, max_display=n_show, show=False, ax=fig.gca(), plot_size=None)
        finally:
            np.random.set_state(state)
        fig.gca().set_xlabel(f"SHAP value ({scale})")
        fig.gca().set_title(f"SHAP, {lm.model} model ({lm.endpoint})", fontsize=10)
        out.figure(fig, f"shap_beeswarm_{lm.endpoint}",
                   f"SHAP values of the {lm.model} model per patient and predictor ({scale}; reference: "
                   f"{reference_cohort} cohort).", "explain", endpoint=lm.endpoint, kind="shap_beeswarm")
        fig, ax = plt.subplots(figsize=(7, 0.4 * n_show + 1.5))
        ax.barh(mean_abs.index[:n_show][::-1], mean_abs.values[:n_show][::-1], color=MODEL_COLORS["combined"])
        _ax_style(ax, f"mean |SHAP value| ({scale})", "", f"Predictor importance, {lm.model} model ({lm.endpoint})")
        out.figure(fig, f"shap_bar_{lm.endpoint}", f"Mean absolute SHAP value per predictor, {lm.model} model.",
                   "explain", endpoint=lm.endpoint, kind="shap_bar")
    if lm.endpoint == "binary":
        axes = {"Predicted probability": expit}
    else:
        tr = ep[(ep["cohort"] == reference_cohort) & (ep["split"] == first_split)].drop_duplicates("patient")
        tr = tr[tr["patient"].isin(train.dropna().index)]
        eta = lm.linear_predictor().reindex(tr["patient"]).values
        axes = {}
        for h in cfg["horizons"]:
            if len(tr) and h < tr["time"].max():
                h0 = M.breslow_cumhaz(tr["time"].values, tr["event"].values, eta, h)
                axes[f"{h:g}-{U.singular(cfg['time_unit'])} event probability"] = (lambda lp, h0=h0: 1 - np.exp(-h0 * np.exp(lp)))
        if not axes:
            axes = {"Linear predictor": lambda lp: expit(lp)}
    if out.make_figures:
        fig, table = plot_nomogram(lm, train.dropna(), outcome_axes=axes,
                                   title=f"Nomogram of the {lm.model} model ({lm.endpoint} endpoint)")
        out.figure(fig, f"nomogram_{lm.endpoint}", f"Nomogram of the {lm.model} model ({lm.endpoint}): read each "
                   f"predictor's points, add them, and read the outcome below the total.", "explain",
                   endpoint=lm.endpoint, kind="nomogram")
        out.table(f"nomogram_{lm.endpoint}", table, f"Nomogram scales of the {lm.model} model ({lm.endpoint})", "explain")
