"""A simulated study for the evaluate and report tests and bench/evaluate_benchmark.py: predictions of fitted
models with known structure (no imaging, no workflow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit


def simulate_study(n_patients: int = 300, seed: int = 0, n_splits: int = 1) -> dict:
    """A synthetic four-center study with both endpoints and four fitted models per split.

    Returns DataFrames: predictions (documented columns), coefficients and design (combined models, split 0),
    clinical (Table 1 columns), flow (patient_flow.tsv form) and dsc (segmentation evaluation).
    Center C4 is the external test cohort; C1-C3 are split 70/30 into training/validation per split.
    """
    from lifelines import CoxPHFitter
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    n = n_patients
    center = rng.choice(["C1", "C2", "C3", "C4"], size=n, p=[0.3, 0.25, 0.25, 0.2])
    patient = [f"{c}-{i:04d}" for i, c in enumerate(center, start=1)]
    clin = pd.DataFrame({
        "patient": patient, "center": center, "age": rng.normal(63, 11, n).round(0),
        "sex": rng.choice(["M", "F"], n, p=[0.6, 0.4]), "tumour_site": rng.choice(["colon", "rectum"], n),
        "t_stage": rng.choice(["T1", "T2", "T3", "T4"], n, p=[0.05, 0.2, 0.5, 0.25]),
        "n_stage": rng.choice(["N0", "N1", "N2"], n, p=[0.45, 0.35, 0.2]),
        "cea": np.exp(rng.normal(1.3, 1.0, n)).round(1), "ca19_9": np.exp(rng.normal(2.7, 0.9, n)).round(1),
        "afp": np.exp(rng.normal(0.9, 0.5, n)).round(1), "dissected_lymph_nodes": rng.poisson(15, n).astype(float),
        "perineural_invasion": rng.binomial(1, 0.3, n), "tumour_nodules": rng.binomial(1, 0.25, n)})
    rad = rng.normal(size=(n, 6))
    deep = rad[:, :3] @ rng.normal(0.5, 0.2, (3, 3)) + rng.normal(size=(n, 3))
    clin_lp = (0.9 * clin["perineural_invasion"] + 0.7 * clin["tumour_nodules"] + 0.8 * np.log(clin["afp"])
               - 0.04 * (clin["dissected_lymph_nodes"] - 15))
    rad_lp = rad @ np.array([0.9, -0.7, 0.5, 0.0, 0.0, 0.3])
    risk = (clin_lp + rad_lp).values
    clin["synchronous_lm"] = rng.binomial(1, expit(-1.6 + risk))
    event_time = rng.exponential(1 / (0.012 * np.exp(0.8 * risk)))
    censor = rng.uniform(18, 72, n)
    clin["mfs_months"] = np.minimum(event_time, censor).round(1).clip(0.5)
    clin["mfs_event"] = (event_time <= censor).astype(int)
    feats = pd.DataFrame(np.column_stack([rad, deep]), columns=[f"rad_{i}" for i in range(1, 7)] + ["deep_1", "deep_2", "deep_3"])
    x_all = pd.concat([clin[["patient"]], feats,
                       pd.DataFrame({"log_afp": np.log(clin["afp"]), "dissected_lymph_nodes": clin["dissected_lymph_nodes"],
                                     "perineural_invasion": clin["perineural_invasion"],
                                     "tumour_nodules": clin["tumour_nodules"]})], axis=1)
    clinical_vars = ["log_afp", "dissected_lymph_nodes", "perineural_invasion", "tumour_nodules"]
    model_vars = {"clinical": clinical_vars, "radiomic": [f"rad_{i}" for i in range(1, 7)],
                  "deep": ["deep_1", "deep_2", "deep_3"]}
    external = center == "C4"
    rows, coef_rows, design = [], [], None
    for split in range(n_splits):
        srng = np.random.default_rng([seed, split])
        cohort = np.where(external, "test", np.where(srng.random(n) < 0.7, "training", "validation"))
        train = cohort == "training"
        x = x_all.copy()
        for endpoint in ("binary", "survival"):
            lps = {}
            for name, cols in list(model_vars.items()) + [("combined", clinical_vars + ["rad_score"])]:
                if name == "combined":
                    x["rad_score"] = lps["radiomic"]
                xs = x[cols].values
                if endpoint == "binary":
                    fit = LogisticRegression(C=1e4, max_iter=1000).fit(xs[train], clin["synchronous_lm"][train])
                    beta, icpt = fit.coef_[0], float(fit.intercept_[0])
                else:
                    df = pd.DataFrame(xs[train], columns=cols).assign(t=clin["mfs_months"][train].values,
                                                                      e=clin["mfs_event"][train].values)
                    cph = CoxPHFitter(penalizer=0.01).fit(df, "t", "e")
                    beta, icpt = cph.params_[cols].values, 0.0
                lps[name] = icpt + xs @ beta
                if split == 0 and name in ("combined", "clinical"):
                    coef_rows += [{"endpoint": endpoint, "model": name, "feature": f, "coefficient": float(b)}
                                  for f, b in zip(cols, beta)]
                    coef_rows.append({"endpoint": endpoint, "model": name, "feature": "(Intercept)", "coefficient": icpt})
                part = pd.DataFrame({"patient": patient, "center": center, "cohort": cohort, "split": split,
                                     "endpoint": endpoint, "model": name, "score": lps[name]})
                if endpoint == "binary":
                    part["probability"] = expit(lps[name])
                    part["outcome"] = clin["synchronous_lm"].values
                else:
                    part["time"] = clin["mfs_months"].values
                    part["event"] = clin["mfs_event"].values
                rows.append(part)
            if split == 0 and endpoint == "binary":
                design = x[["patient"] + clinical_vars + ["rad_score"]].copy()
    flow = (clin.groupby("center").size().rename("included").reset_index()
            .assign(role=lambda d: np.where(d["center"] == "C4", "external", "development")))
    flow["excluded:no_matching_series"] = rng.integers(0, 3, len(flow))
    flow["delivered"] = flow["included"] + flow["excluded:no_matching_series"]
    flow["excluded"] = flow["excluded:no_matching_series"]
    flow = flow[["center", "role", "delivered", "included", "excluded", "excluded:no_matching_series"]]
    flow.loc[len(flow)] = {"center": "total", "role": "", **flow.drop(columns=["center", "role"]).sum().to_dict()}
    dsc = pd.concat([pd.DataFrame({"patient": patient, "center": center, "region": region,
                                   "dsc": np.clip(rng.normal(mu, 0.06, n), 0, 1),
                                   "hd95": np.abs(rng.normal(hd, hd / 3, n)),
                                   "volume_manual_ml": vol, "volume_auto_ml": vol * rng.normal(1, 0.08, n)})
                     for region, mu, hd, vol in (("tumour", 0.84, 6.0, np.exp(rng.normal(3, 0.8, n))),
                                                 ("liver", 0.96, 3.0, rng.normal(1500, 200, n)))], ignore_index=True)
    return {"predictions": pd.concat(rows, ignore_index=True), "coefficients": pd.DataFrame(coef_rows),
            "design": design, "clinical": clin, "flow": flow, "dsc": dsc}
