"""Models per endpoint and split: leakage safety, ComBat modes, clinical model statistics, outputs."""

import copy
import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from radstudy.errors import ConfigError
from radstudy.statistics.design import assign_cohorts
from radstudy.statistics.models import (
    ClinicalEncoder,
    Harmonizer,
    assemble,
    fit_clinical_model,
    fit_cox,
    fit_logistic,
    fit_split,
    load_model,
    run_statistics,
    statistics_settings,
)

RADIOMIC = ["tumour_CT_original_firstorder_Mean", "liver_CT_original_glcm_Contrast"]
CONFIG = {
    "study": {"seed": 7},
    "clinical": {
        "variables": ["age", "sex", "t_stage", "cea", "afp", "perineural_invasion"],
        "endpoints": {"binary": {"column": "synchronous_lm"},
                      "survival": {"time": "mfs_months", "event": "mfs_event"}},
    },
    "models": {"clinical": {"log_transform": ["cea", "afp"], "ordinal": {"t_stage": ["T1", "T2", "T3", "T4"]}}},
    "selection": {"lasso": {"n_penalties": 25}},  # a coarser penalty grid keeps the tests fast
}


def make_study(n=(70, 70, 70, 60, 60), roles=("development",) * 3 + ("external",) * 2, seed=0,
               center_effect=True, n_noise=30, n_deep=8, missing=0.03, scale=4.0, offset=3.0, jitter=0.3):
    """Synthetic multicenter study: two informative radiomic features (+ a near-duplicate), noise features,
    deep features, clinical variables with missing values, a binary and a survival endpoint. Every center
    shifts every feature by its own random offset (sd `offset`) and rescales all features by a center factor
    (log-uniform within 1/scale..scale) with a feature-specific jitter (log-sd `jitter`): scanner effects."""
    rng = np.random.default_rng(seed)
    pts = pd.DataFrame([{"patient": f"C{c + 1}-{i:04d}", "center": f"C{c + 1}", "role": role}
                        for c, (nc, role) in enumerate(zip(n, roles)) for i in range(nc)])
    N = len(pts)
    u1, u2 = rng.normal(size=N), rng.normal(size=N)
    cea = np.exp(rng.normal(1.4, 1.0, N)).round(1)
    pni = (rng.random(N) < 0.3).astype(int)
    risk = 1.2 * u1 + 1.0 * u2 + 0.6 * (np.log(cea) - 1.4) + 1.0 * (pni - 0.3)
    t_event = 30 * rng.exponential(size=N) * np.exp(-risk)
    censor = rng.uniform(12, 80, N)
    clin = pd.DataFrame({
        "patient": pts["patient"], "center": pts["center"], "age": rng.normal(64, 10, N).round(),
        "sex": rng.choice(["F", "M"], N), "t_stage": rng.choice(["T1", "T2", "T3", "T4"], N, p=[.1, .2, .5, .2]),
        "cea": cea, "afp": np.exp(rng.normal(1.1, 0.4, N)).round(1), "perineural_invasion": pni,
        "synchronous_lm": (rng.random(N) < 1 / (1 + np.exp(-(risk - 0.5)))).astype(int),
        "mfs_months": np.minimum(t_event, censor).round(1) + 0.1, "mfs_event": (t_event <= censor).astype(int),
    })
    for col in ("cea", "afp", "sex"):
        clin.loc[rng.random(N) < missing, col] = np.nan
    clean = {RADIOMIC[0]: u1 + 0.3 * rng.normal(size=N), RADIOMIC[1]: u2 + 0.3 * rng.normal(size=N)}
    clean["tumour_CT_original_firstorder_Median"] = clean[RADIOMIC[0]] + 0.1 * rng.normal(size=N)
    for j in range(n_noise):
        clean[f"liver_CT_wavelet-LLH_glszm_Noise{j}"] = rng.normal(size=N)
    for j in range(n_deep):
        clean[f"tumour_CT_deep_resnet18_{j}"] = {0: 0.8 * u1, 1: 0.8 * u2}.get(j, 0) + rng.normal(size=N)
    centers = pts["center"].to_numpy()
    center_scale = {c: np.exp(rng.uniform(-np.log(scale), np.log(scale))) for c in np.unique(centers)}
    feats = {}
    for name, x in clean.items():
        x = x.copy()
        if center_effect:
            for c in np.unique(centers):
                m = centers == c
                x[m] = rng.normal(0, offset) + center_scale[c] * np.exp(rng.normal(0, jitter)) * x[m]
        feats[name] = x
    feats = pd.DataFrame(feats)
    feats = feats.mask(rng.random(feats.shape) < missing)
    feats.insert(0, "center", pts["center"])
    feats.insert(0, "patient", pts["patient"])
    return feats, clin, pts.assign(status="included")


def _config(**sections):
    cfg = copy.deepcopy(CONFIG)
    for key, value in sections.items():
        if key == "endpoints":
            cfg["clinical"]["endpoints"] = {k: CONFIG["clinical"]["endpoints"][k] for k in value}
        else:
            cfg.setdefault(key, {}).update(value)
    return cfg


def _split(data, seed=0, design=None):
    cohorts = assign_cohorts(data[["patient", "center", "role", "synchronous_lm"]], design or {}, seed,
                             outcome="synchronous_lm")
    first = cohorts[cohorts["split"] == cohorts["split"].iloc[0]]
    return data["patient"].map(first.set_index("patient")["cohort"])


@pytest.fixture(scope="module")
def study():
    feats, clin, pts = make_study()
    return feats, clin, pts, assemble(feats, clin, pts)


# ---------------------------------------------------------------------------- leakage safety
def _fitted_state(result) -> dict:
    """Every attribute learnt in a split, flattened to arrays (the training-only part of the fit)."""
    state = {}
    for fs, harm in result["harmonizers"].items():
        state[f"{fs}.imputer"] = harm.imputer_.statistics_
        for attr in ("grand_mean_", "var_pooled_", "beta_", "gamma_hat_", "delta_hat_", "gamma_star_",
                     "delta_star_", "mod_mean_"):
            state[f"{fs}.combat.{attr}"] = getattr(harm.combat_, attr)
        state[f"{fs}.combat.batches"] = harm.combat_.batches_.astype(str)
    for (endpoint, name), model in result["models"].items():
        key = f"{endpoint}.{name}"
        reg = model.regression
        state[f"{key}.coef"], state[f"{key}.se"] = reg.coef.to_numpy(), reg.se.to_numpy()
        state[f"{key}.terms"] = np.array(reg.coef.index, dtype=str)
        if reg.baseline_cumhaz is not None:
            state[f"{key}.baseline"] = reg.baseline_cumhaz
        if model.encoder is not None:
            state[f"{key}.encoder"] = np.array([repr(model.encoder.fill_), repr(model.encoder.levels_)])
        for step in model.scores:
            pipe = step.pipeline
            state[f"{key}.{step.name}.impute"] = pipe.named_steps["impute"].statistics_
            state[f"{key}.{step.name}.scale_mean"] = pipe.named_steps["scale"].mean_
            state[f"{key}.{step.name}.scale_sd"] = pipe.named_steps["scale"].scale_
            for sel in ("robustness", "near_zero_variance", "univariate", "redundancy", "lasso"):
                state[f"{key}.{step.name}.{sel}"] = pipe.named_steps[sel].support_
            lasso = pipe.named_steps["lasso"]
            state[f"{key}.{step.name}.lasso_coef"] = np.r_[lasso.coef_, lasso.intercept_, lasso.penalty_]
            state[f"{key}.{step.name}.selected"] = np.array(lasso.selected_features_, dtype=str)
    for name in ("selected", "coefficients"):
        frame = result[name]
        state[name] = frame.to_numpy().astype(str)
    clinical = result["clinical"]
    state["clinical_model"] = clinical.to_numpy().astype(str)
    return state


@pytest.mark.parametrize("external", ["unseen", "none"])
def test_validation_and_test_patients_change_nothing_fitted(study, external):
    *_, data = study
    cohort = _split(data)
    settings = statistics_settings(_config(harmonization={"external": external, "covariates": ["age", "sex"]}))
    base = fit_split(data, cohort, settings, "holdout")

    rng = np.random.default_rng(99)
    other = (cohort != "training").to_numpy()
    perturbed = data.copy()
    k = int(other.sum())
    perturbed.loc[other, "synchronous_lm"] = 1 - perturbed.loc[other, "synchronous_lm"]
    perturbed.loc[other, "mfs_months"] = rng.permutation(perturbed.loc[other, "mfs_months"].to_numpy())
    perturbed.loc[other, "mfs_event"] = rng.integers(0, 2, k)
    perturbed.loc[other, ["age", "cea"]] = rng.uniform(1, 100, (k, 2))
    perturbed.loc[other, "sex"] = rng.choice(["F", "M"], k)
    features = [c for c in data.columns if c.startswith(("tumour_", "liver_"))]
    perturbed.loc[other, features] = perturbed.loc[other, features] * 3 + rng.normal(0, 5, (k, len(features)))
    changed = fit_split(perturbed, cohort, settings, "holdout")

    a, b = _fitted_state(base), _fitted_state(changed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # and the training patients' scores are identical
    pa, pb = base["predictions"], changed["predictions"]
    train = pa["cohort"] == "training"
    np.testing.assert_array_equal(pa.loc[train, "score"], pb.loc[train, "score"])
    # while the scores of the perturbed patients did change (the test is not vacuous)
    assert not np.allclose(pa.loc[~train, "score"], pb.loc[~train, "score"])


def test_out_of_fold_rad_score_takes_no_weight_from_the_selections_optimism(seed=3):
    """Radiomic features unrelated to the outcome (rows permuted): the in-sample rad-score, selected and fitted on
    the same patients, looks like a strong predictor in the combined model (Wald z > 2); out of fold
    (models.combined_fit: out_of_fold) it does not."""
    feats, clin, pts = make_study(n=(40, 40, 40, 40, 40), seed=seed, n_noise=60)
    cols = [c for c in feats.columns if c.startswith(("tumour_", "liver_"))]
    feats[cols] = feats[cols].to_numpy()[np.random.default_rng(seed).permutation(len(feats))]
    data = assemble(feats, clin, pts)
    cohort = _split(data)
    z = {}
    for how in ("in_sample", "out_of_fold"):
        settings = statistics_settings(_config(models={"combined_fit": how},
                                               selection={"lasso": {"max_features": 5, "binary_scoring": "auc"}}))
        reg = fit_split(data, cohort, settings, "holdout")["models"][("binary", "combined")].regression
        z[how] = reg.coef["radscore"] / reg.se["radscore"]
    assert z["in_sample"] > 2 and abs(z["out_of_fold"]) < 1.96, z


def test_out_of_fold_rad_score_scores_new_patients_with_the_whole_training_fit(study):
    *_, data = study
    cohort = _split(data)
    config = {how: _config(models={"combined_fit": how}, endpoints=["survival"]) for how in ("in_sample", "out_of_fold")}
    fits = {how: fit_split(data, cohort, statistics_settings(cfg), "holdout") for how, cfg in config.items()}
    test = data[(cohort == "test").to_numpy()]
    for endpoint in ("survival",):
        steps = {how: fit["models"][(endpoint, "combined")].scores[0] for how, fit in fits.items()}
        np.testing.assert_array_equal(steps["in_sample"](test), steps["out_of_fold"](test))
        coefs = [fit["models"][(endpoint, "combined")].regression.coef for fit in fits.values()]
        assert not np.allclose(coefs[0], coefs[1])  # the combined model itself is fitted on other scores
    # blind to the patients outside the training partition
    other = (cohort != "training").to_numpy()
    perturbed = data.copy()
    perturbed.loc[other, "mfs_event"] = 1 - perturbed.loc[other, "mfs_event"]
    again = fit_split(perturbed, cohort, statistics_settings(config["out_of_fold"]), "holdout")
    for key in (("survival", "combined"),):
        np.testing.assert_array_equal(fits["out_of_fold"]["models"][key].regression.coef,
                                      again["models"][key].regression.coef)


def test_combat_covariates_may_not_include_the_outcome(study):
    for outcome in ("synchronous_lm", "mfs_event", "mfs_months"):
        with pytest.raises(ValueError, match="must not see the outcome"):
            statistics_settings(_config(harmonization={"covariates": ["age", outcome]}))
    feats, clin, pts, data = study
    with pytest.raises(ValueError, match="must not see the outcome"):
        Harmonizer(covariates=["synchronous_lm"], forbidden=["synchronous_lm"]).fit(
            data[RADIOMIC], data["center"], data)
    with pytest.raises(ValueError, match="outcome"):
        statistics_settings(_config(models={"clinical": {"variables": ["age", "mfs_event"]}}))


def test_harmonizer_unseen_mode_keeps_training_estimates_and_refuses_unknown_centers(study):
    *_, data = study
    train = data["role"] == "development"
    cols = RADIOMIC + ["tumour_CT_original_firstorder_Median"]
    harm = Harmonizer().fit(data.loc[train, cols], data.loc[train, "center"])
    before = harm.combat_.gamma_star_.copy()
    ext = ~train
    with pytest.raises(ValueError, match="not in the training cohort"):
        harm.transform(data.loc[ext, cols], data.loc[ext, "center"])
    harm.adapt(data.loc[ext, cols], data.loc[ext, "center"])
    np.testing.assert_array_equal(harm.combat_.gamma_star_, before)
    assert harm.modes_ == {"C1": "combat", "C2": "combat", "C3": "combat", "C4": "unseen", "C5": "unseen"}
    out = harm.transform(data.loc[ext, cols], data.loc[ext, "center"])
    for c in ("C4", "C5"):  # each external center is mapped onto the training location/scale
        part = out[data.loc[ext, "center"].to_numpy() == c]
        gap = np.abs(part.mean().to_numpy() - harm.combat_.grand_mean_)
        assert np.all(gap < 0.6 * np.sqrt(harm.combat_.var_pooled_))
    none = Harmonizer(external="none").fit(data.loc[train, cols], data.loc[train, "center"])
    none.adapt(data.loc[ext, cols], data.loc[ext, "center"])
    raw = none.transform(data.loc[ext, cols], data.loc[ext, "center"])
    np.testing.assert_allclose(raw.to_numpy(), none.imputer_.transform(data.loc[ext, cols]).to_numpy())


def test_combat_unseen_mode_improves_external_auc_under_center_effects():
    """The issue's acceptance criterion, on synthetic data with strong center offsets and scales."""
    aucs = {"unseen": [], "none": [], "no_combat": []}
    for seed in range(3):
        feats, clin, pts = make_study(seed=seed, n_deep=0, offset=6.0)
        data = assemble(feats, clin, pts)
        cohort = _split(data, seed)
        for mode in aucs:
            harm = {"method": "none"} if mode == "no_combat" else {"external": mode}
            settings = statistics_settings(_config(harmonization=harm, models={"fit": ["radiomic"]},
                                                   endpoints=["binary"]))
            pred = fit_split(data, cohort, settings, "holdout")["predictions"]
            test = pred[pred["cohort"] == "test"]
            aucs[mode].append(roc_auc_score(test["outcome"], test["score"]))
    unseen, none, raw = (np.array(aucs[k]) for k in ("unseen", "none", "no_combat"))
    assert np.all(unseen > none) and np.all(unseen > raw)
    assert unseen.mean() > none.mean() + 0.05 and unseen.mean() > raw.mean() + 0.05


# ---------------------------------------------------------------------------- clinical models
def test_logistic_odds_ratios_and_wald_intervals():
    rng = np.random.default_rng(0)
    n = 2000
    X = pd.DataFrame({"x": rng.normal(size=n), "b": rng.integers(0, 2, n).astype(float)})
    beta = np.array([-0.5, 0.8, -0.6])
    y = (rng.random(n) < 1 / (1 + np.exp(-(beta[0] + X.to_numpy() @ beta[1:])))).astype(int)
    fit = fit_logistic(X, y)
    table = fit.table().set_index("term")
    for term, true in zip(["x", "b"], beta[1:]):  # true OR inside the 95 % CI
        assert table.loc[term, "ci_low"] < np.exp(true) < table.loc[term, "ci_high"]
    ref = LogisticRegression(C=np.inf, solver="lbfgs", tol=1e-10, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(fit.coef[["x", "b"]], ref.coef_[0], rtol=1e-5)
    np.testing.assert_allclose(fit.coef["(intercept)"], ref.intercept_[0], rtol=1e-5)
    # one binary predictor: the Wald SE of the log OR is the 2x2-table formula sqrt(1/a + 1/b + 1/c + 1/d)
    single = fit_logistic(X[["b"]], y)
    cells = pd.crosstab(X["b"], y).to_numpy()
    assert single.se["b"] == pytest.approx(np.sqrt((1 / cells).sum()), rel=1e-6)
    assert single.coef["b"] == pytest.approx(np.log(cells[1, 1] * cells[0, 0] / (cells[1, 0] * cells[0, 1])), rel=1e-6)
    # coverage of the 95 % Wald interval over repeated samples
    hits = 0
    for r in range(200):
        x = rng.normal(size=300)
        yy = (rng.random(300) < 1 / (1 + np.exp(-(0.2 + 0.7 * x)))).astype(int)
        row = fit_logistic(pd.DataFrame({"x": x}), yy).table().set_index("term").loc["x"]
        hits += row["ci_low"] < np.exp(0.7) < row["ci_high"]
    assert 0.90 <= hits / 200 <= 0.99


def test_cox_hazard_ratios_match_lifelines_and_risk_at_horizon():
    rng = np.random.default_rng(1)
    n = 400
    X = pd.DataFrame({"x": rng.normal(size=n), "b": rng.integers(0, 2, n).astype(float)})
    lp = 0.7 * X["x"] - 0.5 * X["b"]
    t = rng.exponential(20, n) * np.exp(-lp)
    c = rng.uniform(5, 60, n)
    time, event = np.minimum(t, c), (t <= c).astype(int)
    fit = fit_cox(X, time, event)
    ref = CoxPHFitter().fit(X.assign(T=time, E=event), "T", "E")
    np.testing.assert_allclose(fit.coef.to_numpy(), ref.params_.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(fit.se.to_numpy(), ref.standard_errors_.to_numpy(), rtol=1e-6)
    table = fit.table().set_index("term")
    np.testing.assert_allclose(table["ratio"], ref.summary["exp(coef)"], rtol=1e-6)
    np.testing.assert_allclose(table["ci_low"], ref.summary["exp(coef) lower 95%"], rtol=1e-6)
    np.testing.assert_allclose(table["ci_high"], ref.summary["exp(coef) upper 95%"], rtol=1e-6)
    assert table.loc["x", "ci_low"] < np.exp(0.7) < table.loc["x", "ci_high"]
    # Breslow step function; lifelines interpolates between event times, so compare at an event time
    horizon = float(np.sort(time[event == 1])[np.searchsorted(np.sort(time[event == 1]), 12.0)])
    risk = fit.probability(X.iloc[:20], horizon)
    expected = 1 - ref.predict_survival_function(X.iloc[:20], times=[horizon]).to_numpy()[0]
    np.testing.assert_allclose(risk, expected, rtol=1e-6)


def test_clinical_screening_and_retention_rules():
    rng = np.random.default_rng(2)
    n = 600
    df = pd.DataFrame({"strong": rng.normal(size=n), "weak_noise": rng.normal(size=n),
                       "site": rng.choice(["colon", "rectum"], n), "noise2": rng.normal(size=n)})
    lp = 1.0 * df["strong"] + 0.9 * (df["site"] == "rectum") - 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    df.loc[:20, "strong"] = np.nan
    enc = ClinicalEncoder(["strong", "weak_noise", "site", "noise2"]).fit(df)
    X = enc.transform(df)
    assert list(X.columns) == ["strong", "weak_noise", "site[rectum]", "noise2"]
    assert X["strong"].iloc[0] == pytest.approx(df["strong"].median())
    base = {"screening_alpha": 0.05, "ci_level": 0.95, "min_variables": 1}
    for rule in ("ci_excludes_1", "backward"):
        final, retained, table = fit_clinical_model(X, enc.terms_, y, "binary", dict(base, retain=rule))
        assert set(retained) == {"strong", "site"}
        fin = table[table["stage"] == "final"]
        assert (fin["ci_low"] > 1).all() or ((fin["ci_low"] > 1) | (fin["ci_high"] < 1)).all()
        assert set(table["stage"]) == {"univariable", "multivariable", "final"}
    _, retained, _ = fit_clinical_model(X, enc.terms_, y, "binary", dict(base, retain="all", screening_alpha=1.0))
    assert retained == ["strong", "weak_noise", "site", "noise2"]
    surv_t = rng.exponential(10, n) * np.exp(-lp)
    from radstudy.statistics.selection import make_survival
    _, retained, table = fit_clinical_model(X, enc.terms_, make_survival(surv_t, np.ones(n)), "survival",
                                            dict(base, retain="ci_excludes_1"))
    assert set(retained) == {"strong", "site"} and set(table["measure"]) == {"HR"}


def test_clinical_encoder_learns_from_training_only():
    train = pd.DataFrame({"sex": ["F", "M", "M", None], "t": ["T1", "T3", None, "T4"], "cea": [1.0, 3.0, np.nan, 9.0],
                          "pni": [0, 1, 1, np.nan]})
    enc = ClinicalEncoder(["sex", "t", "cea", "pni"], ordinal={"t": ["T1", "T2", "T3", "T4"]},
                          log_transform=["cea"]).fit(train)
    assert enc.fill_ == {"sex": "M", "t": 2.0, "cea": 3.0, "pni": 1.0}
    new = pd.DataFrame({"sex": ["X", None], "t": ["T2", None], "cea": [np.nan, 0.0], "pni": [np.nan, 0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = enc.transform(new)
    assert out["sex[M]"].tolist() == [1.0, 1.0]  # unseen and missing -> training mode
    assert out["t"].tolist() == [1.0, 2.0]
    assert out["cea"].tolist() == pytest.approx([np.log1p(3.0), 0.0])
    assert out["pni"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------- whole stage
def test_run_statistics_writes_every_model_endpoint_and_cohort(study, tmp_path):
    feats, clin, pts, _ = study
    paths = run_statistics(feats, clin, pts, _config(), tmp_path)
    for name in ("predictions", "cohorts", "selected_features", "coefficients", "clinical_model", "harmonization",
                 "selection_summary", "versions"):
        assert paths[name].exists(), name
    pred = pd.read_csv(paths["predictions"], sep="\t")
    assert list(pred.columns) == ["patient", "center", "split", "cohort", "endpoint", "model", "score",
                                  "probability", "outcome", "time", "event"]
    combos = pred.groupby(["endpoint", "model", "cohort"]).size()
    assert len(combos) == 2 * 4 * 3
    assert combos.nunique() == 3  # every model scores the same patients of each cohort
    assert pred["score"].notna().all()
    binary, survival = pred[pred["endpoint"] == "binary"], pred[pred["endpoint"] == "survival"]
    assert binary["probability"].between(0, 1).all() and binary["outcome"].notna().all()
    assert survival["probability"].between(0, 1).all() and survival["time"].notna().all()
    test = binary[(binary["cohort"] == "test") & (binary["model"] == "combined")]
    assert roc_auc_score(test["outcome"], test["score"]) > 0.7

    harm = pd.read_csv(paths["harmonization"], sep="\t")
    assert set(harm.loc[harm["center"].isin(["C4", "C5"]), "mode"]) == {"unseen"}
    clinical = pd.read_csv(paths["clinical_model"], sep="\t")
    assert {"univariable", "multivariable", "final"} <= set(clinical["stage"])
    assert set(clinical["measure"]) == {"OR", "HR"}
    selected = pd.read_csv(paths["selected_features"], sep="\t")
    assert set(selected["model"]) == {"radiomic", "deep"}

    data = assemble(feats, clin, pts)
    for endpoint in ("binary", "survival"):
        for name in ("clinical", "radiomic", "deep", "combined"):
            model = load_model(tmp_path / endpoint / f"{name}.joblib")
            assert model.versions["scikit-learn"]
            expected = pred[(pred["endpoint"] == endpoint) & (pred["model"] == name)].set_index("patient")
            scored = model.predict(data).set_index(data["patient"])
            np.testing.assert_allclose(scored["score"], expected.loc[data["patient"], "score"], rtol=1e-9)
            np.testing.assert_allclose(scored["probability"], expected.loc[data["patient"], "probability"],
                                       rtol=1e-9)
            # a single new patient of a known center, with only the model's columns
            needed = ["center", *model.features, *model.clinical_variables]
            one = model.predict(data.loc[[3], needed])
            assert one["score"].iloc[0] == pytest.approx(scored["score"].iloc[3])


def test_only_primary_fits_the_primary_split_alone_with_the_same_predictions(study, tmp_path):
    # bench/validity_study.py reads only the delivered (primary) split: with a k-fold design `final`, 1 split of 3
    feats, clin, pts, _ = study
    cfg = _config(design={"type": "kfold", "kfold": {"folds": 2}}, models={"fit": ["clinical", "radiomic"]},
                  endpoints=["binary"])
    every = run_statistics(feats, clin, pts, cfg, tmp_path / "every")
    alone = run_statistics(feats, clin, pts, cfg, tmp_path / "alone", only_primary=True)
    cohorts = pd.read_csv(alone["cohorts"], sep="\t")
    assert cohorts.equals(pd.read_csv(every["cohorts"], sep="\t")) and cohorts["split"].nunique() == 3
    pred, ref = (pd.read_csv(p["predictions"], sep="\t") for p in (alone, every))
    assert set(pred["split"]) == {"final"} and set(ref["split"]) == {"final", "fold1", "fold2"}
    pd.testing.assert_frame_equal(pred, ref[ref["split"] == "final"].reset_index(drop=True))


def test_run_statistics_writes_exactly_the_declared_files(study, tmp_path):
    """The workflow declares every output (tables, one file per fitted model) from the config: run_statistics
    writes those paths and nothing else; a declared model the data cannot fit is an error, not a missing file."""
    from radstudy.statistics.models import STATISTICS_TABLES, fitted_models

    feats, clin, pts, _ = study
    config = _config()
    assert fitted_models(config) == [(e, m) for e in ("binary", "survival")
                                     for m in ("clinical", "radiomic", "combined")]
    assert ("binary", "deep") in fitted_models({**config, "features": {"deep": {"enabled": True}}})
    outputs = {name: tmp_path / "tables" / f"t_{name}.tsv" for name in STATISTICS_TABLES}
    outputs["models"] = {key: tmp_path / "fitted" / f"{key[0]}-{key[1]}.bin" for key in fitted_models(config)}
    outputs["split_models"] = None
    run_statistics(feats, clin, pts, config, outputs=outputs)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    expected = [p.relative_to(tmp_path) for p in [*(outputs[n] for n in STATISTICS_TABLES),
                                                  *outputs["models"].values()]]
    assert written == sorted(expected)  # the deep model is fitted (deep columns) but not declared: not written
    assert pd.read_csv(outputs["robustness"], sep="\t").empty  # no perturbed features: the ICC table's header only
    radiomic_only = feats[[c for c in feats.columns if "_deep_" not in c]]
    outputs["models"] = {("binary", "deep"): tmp_path / "deep.bin"}
    with pytest.raises(ValueError, match="not fitted"):
        run_statistics(radiomic_only, clin, pts, config, outputs=outputs)


def test_kfold_design_and_missing_deep_features(study, tmp_path):
    feats, clin, pts, _ = study
    radiomic_only = feats[[c for c in feats.columns if "_deep_" not in c]]
    cfg = _config(design={"type": "kfold", "kfold": {"folds": 3}}, endpoints=["binary"],
                  models={"fit": ["clinical", "radiomic", "deep", "combined"], "n_jobs": 2})
    # the stage's real inputs: files as the earlier stages write them
    radiomic_only.to_parquet(tmp_path / "features.parquet")
    clin.to_csv(tmp_path / "clinical.tsv", sep="\t", index=False)
    pts.to_csv(tmp_path / "patients.tsv", sep="\t", index=False)
    paths = run_statistics(tmp_path / "features.parquet", tmp_path / "clinical.tsv", tmp_path / "patients.tsv",
                           cfg, tmp_path)
    pred = pd.read_csv(paths["predictions"], sep="\t")
    assert set(pred["split"]) == {"fold1", "fold2", "fold3", "final"}
    assert set(pred["model"]) == {"clinical", "radiomic", "combined"}  # no deep features: no deep model
    val = pred[(pred["cohort"] == "validation") & (pred["model"] == "radiomic")]
    assert val["patient"].is_unique and len(val) == (pts["role"] == "development").sum()
    assert (tmp_path / "binary" / "radiomic.joblib").exists()
    assert not (tmp_path / "binary" / "deep.joblib").exists()
    model = load_model(tmp_path / "binary" / "combined.joblib")
    assert model.split == "final" and "radscore" in model.predictors


def test_combined_model_takes_only_the_configured_scores(study, tmp_path):
    feats, clin, pts, _ = study
    cfg = _config(endpoints=["binary"], models={"combined_scores": ["radiomic"]})
    run_statistics(feats, clin, pts, cfg, tmp_path)
    combined = load_model(tmp_path / "binary" / "combined.joblib")
    assert "radscore" in combined.predictors and "deepscore" not in combined.predictors
    assert (tmp_path / "binary" / "deep.joblib").exists()  # the deep model itself is still fitted
    with pytest.raises(ConfigError, match="combined_scores"):
        run_statistics(feats, clin, pts, _config(models={"combined_scores": ["texture"]}), tmp_path / "bad")


def _perturbed(feats, unstable, rng, patients_noise=None):
    rows = []
    radiomic = [c for c in feats.columns if c not in ("patient", "center") and "_deep_" not in c]
    for how in ("erode", "dilate"):
        t = feats[["patient", "center", *radiomic]].copy()
        for c in radiomic:
            sd = t[c].std()
            scale = 3.0 if c in unstable else 0.05  # unstable: perturbation noise swamps the patients' spread
            t[c] = t[c] + rng.normal(0, scale * sd, len(t))
        if patients_noise is not None:  # wild values for some patients only
            hit = t["patient"].isin(patients_noise)
            wild = np.random.default_rng(99)  # its own stream: the training patients' values stay as in the first run
            t.loc[hit, radiomic] = wild.normal(0, 1e3, (int(hit.sum()), len(radiomic)))
        rows.append(t.assign(perturbation=how))
    return pd.concat(rows, ignore_index=True)


def test_robustness_icc_is_computed_on_training_patients_only(study, tmp_path):
    feats, clin, pts, _ = study
    radiomic = [c for c in feats.columns if c not in ("patient", "center") and "_deep_" not in c]
    unstable = set(radiomic[::2])
    cfg = _config(endpoints=["binary"])
    run_statistics(feats, clin, pts, cfg, tmp_path / "a", perturbed=_perturbed(feats, unstable, np.random.default_rng(0)))
    icc = pd.read_csv(tmp_path / "a" / "robustness.tsv", sep="\t")
    assert set(icc["feature"]) == set(radiomic)  # deep features are not assessed: they pass
    assert set(icc.loc[~icc["robust"], "feature"]) == unstable
    selected = pd.read_csv(tmp_path / "a" / "selected_features.tsv", sep="\t")
    assert not set(selected["feature"]) & unstable
    funnel = pd.read_csv(tmp_path / "a" / "selection_summary.tsv", sep="\t").set_index(["model", "step"])["n_features"]
    assert funnel[("deep", "robustness")] == funnel[("deep", "input")] > 0  # deep features are not filtered
    assert funnel[("radiomic", "robustness")] == len(radiomic) - len(unstable)
    # wild perturbed values for every non-training patient change nothing fitted
    cohorts = pd.read_csv(tmp_path / "a" / "cohorts.tsv", sep="\t")
    others = cohorts.loc[cohorts["cohort"] != "training", "patient"].tolist()
    run_statistics(feats, clin, pts, cfg, tmp_path / "b",
                   perturbed=_perturbed(feats, unstable, np.random.default_rng(0), patients_noise=others))
    for name in ("robustness", "selected_features", "coefficients"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / f"{name}.tsv", sep="\t"),
                                      pd.read_csv(tmp_path / "b" / f"{name}.tsv", sep="\t"))


def _network_table(feats, clin, pts, config, signal) -> pd.DataFrame:
    """A networks stage's predictions (model cnn, both endpoints) on the statistics stage's own cohorts, with the
    score `signal` per patient."""
    from radstudy.statistics.models import assemble, statistics_settings, study_cohorts

    cohorts = study_cohorts(assemble(feats, clin, pts), statistics_settings(config))
    rows = [cohorts.assign(endpoint=endpoint, model="cnn", score=cohorts["patient"].map(signal))
            for endpoint in ("binary", "survival")]
    return pd.concat(rows, ignore_index=True)


def test_the_cnn_signature_joins_the_combined_model_and_the_predictions(study, tmp_path):
    """Seed 003's design: the end-to-end CNN's output is one more predictor of the combined model
    (models.combined_scores: cnn); its rows join the predictions table; other cohorts are refused."""
    feats, clin, pts, _ = study
    cfg = _config(models={"combined_scores": ["radiomic", "cnn"]})
    signal = pd.Series(feats[RADIOMIC[0]].to_numpy(), index=feats["patient"]).fillna(0)
    networks = _network_table(feats, clin, pts, cfg, signal)
    networks.to_csv(tmp_path / "networks.tsv", sep="\t", index=False)
    paths = run_statistics(feats, clin, pts, cfg, tmp_path / "out", networks=tmp_path / "networks.tsv")
    combined = load_model(paths["model_binary_combined"])
    assert "cnn" in combined.predictors and "radscore" in combined.predictors
    coefficients = pd.read_csv(paths["coefficients"], sep="\t")
    assert {"cnn"} <= set(coefficients.loc[coefficients["model"] == "combined", "term"])
    predictions = pd.read_csv(paths["predictions"], sep="\t")
    assert len(predictions[predictions["model"] == "cnn"]) == len(networks)
    swapped = networks.copy()
    first = swapped.index[swapped["cohort"] == "validation"][0]
    swapped.loc[first, "cohort"] = "training"
    swapped.to_csv(tmp_path / "swapped.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="another cohort than the statistics stage"):
        run_statistics(feats, clin, pts, cfg, tmp_path / "bad", networks=tmp_path / "swapped.tsv")
