"""Metrics against numbers computed by others (R pROC, lifelines' documentation, scikit-survival, dcurves)
and against hand-computed examples.

Reference data embedded here, with sources:
- aSAH (113 patients with aneurysmal subarachnoid haemorrhage; outcome Poor/Good, WFNS grade, S100B, NDKA),
  from R pROC's `data/aSAH.RData` (github.com/xrobin/pROC @ ee2877e, GPL >= 3; Turck et al. 2010, Intensive
  Care Med 36:107), read with the Python `rdata` package. Expected values are pROC's own results, asserted
  in its test suite at the same commit: tests/testthat/test-roc.test.R (roc.test DeLong Z, P and CI of the
  difference), test-var.R (DeLong variance), test-ci.auc.R (ci.auc DeLong for NDKA).
- lifelines' bundled datasets (rossi, dd) with the values printed in lifelines' documentation
  (github.com/CamDavidsonPilon/lifelines @ ad023a0, docs/Survival Regression.rst and
  docs/Survival analysis with lifelines.rst).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import expit, logit

from radstudy.evaluate import metrics as M

ASAH_POOR = "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
ASAH_WFNS = "11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125225552445111"
ASAH_S100B = (
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71, 0.04, 0.08, 0.49, 0.04, 0.07,
    0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48,
    0.09, 0.96, 0.25, 0.5, 0.46, 0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09, 0.27, 0.71, 0.08, 0.26, 0.08,
    0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28, 0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15,
    0.08, 0.14, 0.1, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5, 0.48)
ASAH_NDKA = (
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18, 8.9, 13.41, 20.75, 11.6, 16.11,
    32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29, 12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03,
    14.04, 21.93, 8.02, 7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87, 9.44,
    7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73, 10.4, 58.83, 6.39, 11.09, 12.22, 13.67, 17.21, 22.63,
    12.9, 9.7, 21.57, 8.23, 72.57, 15.54, 10.51, 10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07,
    19.46, 10.83, 5.37, 11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01, 9.57, 34.06,
    11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45)


@pytest.fixture(scope="module")
def asah():
    y = np.array([int(c) for c in ASAH_POOR])
    wfns = np.array([int(c) for c in ASAH_WFNS], dtype=float)  # ordered factor 1..5, as.numeric in pROC
    assert len(y) == len(wfns) == len(ASAH_S100B) == len(ASAH_NDKA) == 113 and y.sum() == 41
    return y, wfns, np.array(ASAH_S100B), np.array(ASAH_NDKA)


# ---------------------------------------------------------------------------------------------- AUC / DeLong

def test_delong_test_matches_proc_roc_test_on_asah(asah):
    y, wfns, s100b, ndka = asah
    # pROC tests/testthat/test-roc.test.R: roc.test(r.wfns, r.s100b), (r.wfns, r.ndka), (r.ndka, r.s100b)
    expected = [((wfns, s100b), 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
                ((wfns, ndka), 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
                ((ndka, s100b), -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094)]
    for (a, b), z, p, lo, hi in expected:
        t = M.delong_test(y, a, b)
        assert t["z"] == pytest.approx(z, rel=1e-9)
        assert t["p"] == pytest.approx(p, rel=1e-9)  # the P value itself, not log10(P)
        assert (t["ci_low"], t["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    # reversed order: same P, opposite Z (test-roc.test.R "produces identical p values when reversed")
    r = M.delong_test(y, s100b, wfns)
    assert r["z"] == pytest.approx(-2.20898359144091, rel=1e-9) and r["p"] == pytest.approx(0.0271757822291882, rel=1e-9)
    # identical curves: Z = 0, P = 1 (test-roc.test.R)
    same = M.delong_test(y, wfns, wfns)
    assert same["z"] == 0 and same["p"] == 1


def test_auc_delong_variance_and_ci_match_proc_on_asah(asah):
    y, wfns, s100b, ndka = asah
    # pROC tests/testthat/test-var.R: var(r.wfns), var(r.ndka), var(r.s100b) (DeLong)
    for score, var in ((wfns, 0.00146991470882363), (ndka, 0.0031908105493913), (s100b, 0.00266868245717244)):
        assert M.auc_delong(y, score)["se"] ** 2 == pytest.approx(var, rel=1e-9)
    # pROC tests/testthat/test-ci.auc.R: ci.auc(r.ndka) = 0.501244999271703, 0.611957994579946, 0.722670989888189
    d = M.auc_delong(y, ndka)
    assert (d["ci_low"], d["auc"], d["ci_high"]) == pytest.approx(
        (0.501244999271703, 0.611957994579946, 0.722670989888189), rel=1e-9)
    # the AUCs printed by roc.test (sample estimates): wfns 0.8236789, s100b 0.7313686
    assert M.auc_delong(y, wfns)["auc"] == pytest.approx(0.8236789, abs=1e-7)
    assert M.auc_delong(y, s100b)["auc"] == pytest.approx(0.7313686, abs=1e-7)


def test_delong_variance_agrees_with_bootstrap_variance_on_a_large_sample():
    rng = np.random.default_rng(11)
    n = 3000
    y = rng.binomial(1, 0.3, n)
    a = rng.normal(size=n) + 1.0 * y
    b = 0.6 * a + rng.normal(size=n) + 0.4 * y  # correlated with a
    counts = M.bootstrap_counts(n, 1000, seed=5)
    boot_a, boot_b = M.bootstrap_auc(y, a, counts), M.bootstrap_auc(y, b, counts)
    auc, cov = M.delong_covariance(y, np.vstack([a, b]))
    assert np.sqrt(cov[0, 0]) == pytest.approx(boot_a.std(ddof=1), rel=0.1)
    assert np.sqrt(cov[1, 1]) == pytest.approx(boot_b.std(ddof=1), rel=0.1)
    diff_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert np.sqrt(diff_var) == pytest.approx((boot_a - boot_b).std(ddof=1), rel=0.1)


def test_weighted_auc_is_the_auc_of_the_resampled_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.binomial(1, 0.4, 80)
    s = np.round(rng.normal(size=80) + y, 1)  # ties on purpose
    assert M.weighted_auc(s, y, 1 - y)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    counts = M.bootstrap_counts(80, 5, seed=1, strata=y)
    boot = M.bootstrap_auc(y, s, counts)
    for b in range(5):
        idx = np.repeat(np.arange(80), counts[b])
        assert boot[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        assert y[idx].sum() == y.sum()  # stratified: the numbers of events are kept


def test_bootstrap_ci_is_reproducible_with_its_seed(asah):
    y, _, s100b, _ = asah
    first = M.auc_bootstrap_ci(y, s100b, n_bootstrap=500, seed=42)
    assert M.auc_bootstrap_ci(y, s100b, n_bootstrap=500, seed=42) == first
    other = M.auc_bootstrap_ci(y, s100b, n_bootstrap=500, seed=43)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])
    # and close to the DeLong interval (pROC: 0.6301-0.8326) on this sample
    assert first["ci_low"] == pytest.approx(0.630, abs=0.03) and first["ci_high"] == pytest.approx(0.833, abs=0.03)


# ---------------------------------------------------------------------------------------------- cut-offs

def test_youden_cutoff_and_classification_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # thresholds >= 0.7: sens 3/4, spec 4/4 -> J 0.75; >= 0.4: sens 1, spec 3/4 -> J 0.75; tie -> highest (0.7)
    assert M.youden_cutoff(y, p) == 0.7
    c = M.classification_metrics(y, p, 0.4)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (4, 1, 3, 0)
    assert (c["sensitivity"], c["specificity"], c["ppv"], c["npv"], c["accuracy"]) == (1.0, 0.75, 0.8, 1.0, 7 / 8)


def test_wilson_interval():
    # 0 of 10: the Wilson 95% interval is (0, 0.2775) (z^2 / (n + z^2) for the upper bound)
    z = stats.norm.ppf(0.975)
    lo, hi = M.wilson_ci(0, 10)
    assert lo == 0 and hi == pytest.approx(z * z / (10 + z * z), rel=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    sm = pytest.importorskip("statsmodels.stats.proportion")
    assert M.wilson_ci(81, 263) == pytest.approx(sm.proportion_confint(81, 263, method="wilson"), rel=1e-12)


# ---------------------------------------------------------------------------------------------- calibration

def test_hosmer_lemeshow_by_hand():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    # g = 4: quantile breaks 0.1, 0.275, 0.5, 0.725, 0.9 -> groups {0.1, 0.2}, {0.3, 0.4}, {0.6, 0.7}, {0.8, 0.9}
    # group 1: O1 = 1, E1 = 0.3, O0 = 1, E0 = 1.7 -> 0.49/0.3 + 0.49/1.7 = 0.98/0.51
    # group 2: O1 = 1, E1 = 0.7, O0 = 1, E0 = 1.3 -> 0.09/0.7 + 0.09/1.3 = 0.18/0.91; groups 3, 4 mirror 2, 1
    chi2 = 2 * (0.98 / 0.51 + 0.18 / 0.91)  # = 4.2387...
    hl = M.hosmer_lemeshow(y, p, g=4)
    assert hl["hl_chi2"] == pytest.approx(chi2, rel=1e-12)
    assert hl["hl_df"] == 2 and hl["hl_p"] == pytest.approx(np.exp(-chi2 / 2), rel=1e-12)  # chi2 sf with 2 df


def test_calibration_slope_and_intercept():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 20000)
    y = rng.binomial(1, p)
    good = M.calibration_intercept_slope(y, p)
    assert good["calibration_slope"] == pytest.approx(1, abs=0.05)
    assert good["calibration_intercept"] == pytest.approx(0, abs=0.05)
    over = M.calibration_intercept_slope(y, expit(2 * logit(p)))  # overconfident predictions: slope 1/2
    assert over["calibration_slope"] == pytest.approx(0.5, abs=0.03)
    sm = pytest.importorskip("statsmodels.api")
    lp = logit(p[:500])
    fit = sm.GLM(y[:500], sm.add_constant(lp), family=sm.families.Binomial()).fit()
    ours = M.calibration_intercept_slope(y[:500], p[:500])
    assert ours["calibration_slope"] == pytest.approx(fit.params[1], rel=1e-8)
    assert ours["calibration_slope_ci_low"] == pytest.approx(fit.conf_int()[1, 0], rel=1e-6)
    assert M.brier_score([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)


def _binomial_mle(y, x, offset=0.0):
    """Logistic regression by another route than the code's (statsmodels' IRLS): the exact binomial
    log-likelihood maximised by scipy (trust-region on its analytic gradient and Hessian), polished by MINPACK's
    root finder on the score equations to 1e-14; standard errors from the observed information."""
    from scipy import optimize
    from scipy.special import log_expit

    def nll(b):
        eta = x @ b + offset
        return -np.sum(y * log_expit(eta) + (1 - y) * log_expit(-eta))

    def grad(b):
        return -x.T @ (y - expit(x @ b + offset))

    def info(b):
        p = expit(x @ b + offset)
        return (x * (p * (1 - p))[:, None]).T @ x

    start = optimize.minimize(nll, np.zeros(x.shape[1]), jac=grad, hess=info, method="trust-exact").x
    root = optimize.root(grad, start, jac=info, method="hybr", tol=1e-14)
    assert np.abs(grad(root.x)).max() < 1e-9  # the score equations hold (MINPACK may stop short of its tol)
    return root.x, np.sqrt(np.diag(np.linalg.inv(info(root.x))))


@pytest.mark.parametrize("shift", [0.0, 100.0, 400.0])
def test_calibration_of_a_raw_score_is_the_binomial_mle(asah, shift):
    """aSAH's NDKA (a raw marker, 3-419) as the linear predictor, as R's glm(poor ~ offset(ndka), binomial) and
    glm(poor ~ ndka, binomial) define them (R is not at hand: the reference is `_binomial_mle`). The hand-written
    Newton iteration this replaced gave an intercept of -7.97e10 here; shifting the score by a constant must
    shift the intercept by exactly that constant and leave the slope alone."""
    y, _, _, ndka = asah
    lp = ndka + shift
    ours = M.calibration_intercept_slope(y, lp=lp)
    (b0,), (se0,) = _binomial_mle(y.astype(float), np.ones((len(y), 1)), offset=lp)
    (_, b1), (_, se1) = _binomial_mle(y.astype(float), np.column_stack([np.ones(len(y)), lp]))
    assert ours["calibration_intercept"] == pytest.approx(b0, abs=1e-6)
    assert ours["calibration_slope"] == pytest.approx(b1, abs=1e-6)
    assert ours["calibration_intercept"] == pytest.approx(-14.2474357305 - shift, abs=1e-6)
    assert ours["calibration_slope"] == pytest.approx(0.0185584709, abs=1e-8)
    z = stats.norm.ppf(0.975)
    assert ours["calibration_intercept_ci_high"] - ours["calibration_intercept"] == pytest.approx(z * se0, rel=1e-6)
    assert ours["calibration_slope_ci_high"] - ours["calibration_slope"] == pytest.approx(z * se1, rel=1e-6)


def test_calibration_of_a_published_logit_fit_is_ideal():
    """Spector & Mazzeo's data (statsmodels.datasets.spector) with the logit coefficients Stata 11 published for
    grade ~ gpa + tuce + psi (statsmodels/discrete/tests/results/results_discrete.py, class Spector): the linear
    predictor of a maximum-likelihood fit, recalibrated on its own data, has intercept 0 and slope 1 exactly (the
    score equations of the full model imply those of the recalibration models)."""
    sm = pytest.importorskip("statsmodels.api")
    data = sm.datasets.spector.load_pandas().data
    lp = data[["GPA", "TUCE", "PSI"]].to_numpy() @ [2.82611297201, 0.0951576702557, 2.37868772835] - 13.0213483201
    ours = M.calibration_intercept_slope(data["GRADE"].to_numpy(), lp=lp)
    assert ours["calibration_intercept"] == pytest.approx(0, abs=1e-6)
    assert ours["calibration_slope"] == pytest.approx(1, abs=1e-6)


def test_calibration_of_separated_data_has_no_estimate():
    out = M.calibration_intercept_slope([0, 0, 0, 1, 1, 1], lp=[-3.0, -2, -1, 1, 2, 3])
    assert np.isnan(out["calibration_slope"]) and np.isfinite(out["calibration_intercept"])


def test_calibration_curve_bins_hold_every_patient():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=500)
    y = rng.binomial(1, p)
    curve = M.calibration_curve(y, p, n_bins=10)
    assert curve["n"].sum() == 500 and len(curve) == 10
    assert (curve["observed_ci_low"] <= curve["observed"]).all() and (curve["observed"] <= curve["observed_ci_high"]).all()


# ---------------------------------------------------------------------------------------------- decision curves

def test_net_benefit_matches_dcurves():
    dcurves = pytest.importorskip("dcurves")
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.95, 300)
    y = rng.binomial(1, p)
    ref = dcurves.dca(data=pd.DataFrame({"y": y, "p": p}), outcome="y", modelnames=["p"], thresholds=M.DEFAULT_THRESHOLDS)
    ours = M.net_benefit(y, p)
    np.testing.assert_allclose(ours["net_benefit"], ref.loc[ref["model"] == "p", "net_benefit"], atol=1e-12)
    np.testing.assert_allclose(ours["treat_all"], ref.loc[ref["model"] == "all", "net_benefit"], atol=1e-12)


def test_survival_net_benefit_matches_dcurves():
    dcurves = pytest.importorskip("dcurves")
    rng = np.random.default_rng(1)
    t = np.minimum(rng.exponential(20, 300), rng.uniform(5, 60, 300))
    e = (rng.uniform(size=300) < 0.7).astype(int)
    risk = rng.uniform(size=300)
    thresholds = M.DEFAULT_THRESHOLDS[::4]
    ref = dcurves.dca(data=pd.DataFrame({"e": e, "t": t, "r": risk}), outcome="e", modelnames=["r"],
                      thresholds=thresholds, time=12, time_to_outcome_col="t")
    ours = M.net_benefit_survival(t, e, risk, 12, thresholds)
    np.testing.assert_allclose(ours["net_benefit"], ref.loc[ref["model"] == "r", "net_benefit"].astype(float), atol=1e-12)
    np.testing.assert_allclose(ours["treat_all"], ref.loc[ref["model"] == "all", "net_benefit"].astype(float), atol=1e-12)


# ---------------------------------------------------------------------------------------------- NRI / IDI

def test_nri_and_idi_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0])
    old = np.array([0.2, 0.5, 0.4, 0.3, 0.6, 0.1])
    new = np.array([0.3, 0.4, 0.6, 0.2, 0.5, 0.2])
    r = M.reclassification(y, old, new, cutoffs=[0.45])
    # events: up, down, up -> 1/3; non-events: down, down, up -> 1/3
    assert r["nri_continuous_events"] == pytest.approx(1 / 3) and r["nri_continuous_nonevents"] == pytest.approx(1 / 3)
    assert r["nri_continuous"] == pytest.approx(2 / 3)
    # categories at 0.45: events 0,1,0 -> 0,0,1 (one up, one down); non-events 0,1,0 -> 0,1,0
    assert r["nri_categorical"] == pytest.approx(0)
    # IDI: mean change among events (0.1 - 0.1 + 0.2)/3 minus among non-events (-0.1 - 0.1 + 0.1)/3 = 0.1
    assert r["idi"] == pytest.approx(0.1)
    counts = M.bootstrap_counts(6, 200, seed=1, strata=y)
    boot = M.reclassification(y, old, new, counts=counts)
    assert boot["idi_ci_low"] <= boot["idi"] <= boot["idi_ci_high"]


# ---------------------------------------------------------------------------------------------- survival

@pytest.fixture(scope="module")
def rossi_lp():
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_rossi

    rossi = load_rossi()
    cph = CoxPHFitter().fit(rossi, duration_col="week", event_col="arrest")
    return rossi["week"].values.astype(float), rossi["arrest"].values, cph.predict_log_partial_hazard(rossi).values, cph


def test_harrell_c_on_rossi_matches_lifelines_documentation_and_libraries(rossi_lp):
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    t, e, lp, cph = rossi_lp
    c = M.harrell_c(t, e, lp)
    # lifelines docs, Survival Regression.rst, CoxPHFitter on rossi: "Concordance = 0.64"
    assert round(c, 2) == 0.64
    assert c == pytest.approx(concordance_index(t, -lp, e), abs=1e-12)
    assert c == pytest.approx(cph.concordance_index_, abs=1e-12)
    assert c == pytest.approx(concordance_index_censored(e.astype(bool), t, lp)[0], abs=1e-12)


def test_bootstrap_c_is_the_c_of_the_resampled_data(rossi_lp):
    from sksurv.metrics import concordance_index_censored

    t, e, lp, _ = rossi_lp
    counts = M.bootstrap_counts(len(t), 4, seed=9)
    boot = M.harrell_c(t, e, lp, counts=counts)
    for b in range(4):
        idx = np.repeat(np.arange(len(t)), counts[b])
        assert boot[b] == pytest.approx(concordance_index_censored(e[idx].astype(bool), t[idx], lp[idx])[0], rel=1e-5)


def test_uno_c_and_time_dependent_auc_match_scikit_survival():
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc

    x, y = load_veterans_lung_cancer()
    t, e = y["Survival_in_days"].astype(float), y["Status"]
    s = -x["Karnofsky_score"].values.astype(float)
    test = np.arange(len(t)) % 2 == 1
    assert M.uno_c(t, e, t[test], e[test], s[test], tau=365) == pytest.approx(
        concordance_index_ipcw(y, y[test], s[test], tau=365)[0], abs=1e-12)
    horizons = [30, 90, 180]
    np.testing.assert_allclose(M.time_dependent_auc(t, e, t[test], e[test], s[test], horizons),
                               cumulative_dynamic_auc(y, y[test], s[test], horizons)[0], atol=1e-12)


def test_logrank_and_km_median_match_lifelines_documentation():
    from lifelines.datasets import load_dd

    dd = load_dd()
    t, e = dd["duration"].values.astype(float), dd["observed"].values
    dem = (dd["democracy"] == "Democracy").values
    # lifelines docs, "Survival analysis with lifelines.rst": logrank_test(T[dem], T[~dem], ...) -> 260.47;
    # kmf.median_survival_time_ of all leaders -> 4.0
    km = M.kaplan_meier_groups(t, e, dem, at_times=[0, 5, 10])
    assert round(km["logrank_chi2"], 2) == 260.47 and km["logrank_p"] < 0.005
    overall = M.kaplan_meier_groups(t, e, np.zeros(len(t), bool), at_times=[0])
    assert overall["median"]["low"] == 4.0
    assert M.km_at(t, e, 4.0) <= 0.5 < M.km_at(t, e, 3.0)  # our own KM agrees on the median
    assert km["at_risk"]["high"][0] == dem.sum() and km["at_risk"]["low"][1] == int(((t >= 5) & ~dem).sum())


def test_km_with_greenwood_ci_matches_lifelines(rossi_lp):
    from lifelines import KaplanMeierFitter

    t, e, _, _ = rossi_lp
    kmf = KaplanMeierFitter().fit(t, e)
    ci = kmf.confidence_interval_survival_function_
    for h in (10, 30, 52):
        s, lo, hi = M.km_with_ci(t, e, h)
        assert s == pytest.approx(float(kmf.survival_function_at_times(h).iloc[0]), abs=1e-12)
        assert (lo, hi) == pytest.approx(tuple(ci.loc[h].values), abs=1e-9)


def test_km_at_matches_lifelines():
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(4)
    t = rng.integers(1, 30, 200).astype(float)
    e = rng.uniform(size=200) < 0.6
    kmf = KaplanMeierFitter().fit(t, e)
    for h in (0.5, 5, 10.5, 29, 40):
        assert M.km_at(t, e, h) == pytest.approx(float(kmf.survival_function_at_times(h).iloc[0]), abs=1e-12)


def test_cox_hazard_ratio_and_recalibration(rossi_lp):
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_rossi

    rossi = load_rossi()
    for col in ("prio", "fin"):  # tied event times: Efron's method, as lifelines
        ref = CoxPHFitter().fit(rossi[["week", "arrest", col]], "week", "arrest")
        beta, se = M.cox_univariable(rossi["week"], rossi["arrest"], rossi[col])
        assert beta == pytest.approx(ref.params_[col], rel=1e-6) and se == pytest.approx(ref.standard_errors_[col], rel=1e-6)
    t, e, lp, _ = rossi_lp
    hr = M.cox_hazard_ratio(t, e, lp)
    assert hr["hr"] == pytest.approx(np.e, rel=1e-3)  # the model's own linear predictor has coefficient 1
    assert hr["hr_ci_low"] < hr["hr"] < hr["hr_ci_high"] and hr["hr_p"] < 1e-4
    recal = M.CoxRecalibration.fit(t, e, lp)
    cph = CoxPHFitter().fit(pd.DataFrame({"t": t, "e": e, "x": lp}), "t", "e")
    ref = 1 - cph.predict_survival_function(pd.DataFrame({"x": lp[:5]}), times=[26]).values[0]
    np.testing.assert_allclose(recal.risk(lp[:5], 26), ref, rtol=1e-5)  # lifelines converges to ~1e-7 in beta


def test_survival_cutoffs_are_learnt_values():
    rng = np.random.default_rng(5)
    s = rng.normal(size=300)
    t = rng.exponential(np.exp(-s))
    e = np.ones(300, dtype=bool)
    assert M.survival_cutoff(t, e, s, "median") == pytest.approx(np.median(s))
    cut = M.survival_cutoff(t, e, s, "maxstat")
    assert np.quantile(s, 0.1) <= cut <= np.quantile(s, 0.9)
    assert np.isfinite(M.survival_cutoff(t, e, s, "youden", horizon=float(np.median(t))))


def test_survival_calibration_of_a_correct_model_is_near_the_diagonal():
    rng = np.random.default_rng(6)
    s = rng.normal(size=4000)
    t = rng.exponential(20 * np.exp(-s))
    c = rng.uniform(10, 60, 4000)
    time, event = np.minimum(t, c), t <= c
    recal = M.CoxRecalibration.fit(time, event, s)
    cal = M.survival_calibration(time, event, recal.risk(s, 12), 12, n_groups=4)
    np.testing.assert_allclose(cal["observed"], cal["predicted"], atol=0.04)
    assert cal["n"].sum() == 4000


def test_calibration_of_constant_predictions_has_no_slope_but_an_intercept():
    from radstudy.evaluate import metrics as M

    y = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    out = M.calibration_intercept_slope(y, np.full(8, 0.5))
    assert np.isnan(out["calibration_slope"])
    assert out["calibration_intercept"] == pytest.approx(np.log(3 / 5), abs=1e-6)  # logit(3/8) - logit(0.5)


def test_no_finite_estimate_is_reported_as_nan_not_as_a_huge_number():
    """Small folds separate: every event in the high-risk group (monotone likelihood) or a calibration whose IRLS
    'converges' on a runaway intercept. Both have no finite maximum-likelihood estimate: NaN, not HR 4.7e15."""
    time = np.array([2.0, 3, 5, 7, 11, 13, 17, 19])
    event = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    high = np.array([1, 1, 1, 1, 0, 0, 0, 0], float)
    hr = M.cox_hazard_ratio(time, event, high)
    assert np.isnan(hr["hr"]) and np.isnan(hr["hr_ci_low"]) and np.isnan(hr["hr_p"])
    interleaved = np.array([2.0, 3, 5, 7, 4, 13, 17, 19])  # a low-risk event while high-risk patients are at risk
    with_an_event_in_each = M.cox_hazard_ratio(interleaved, np.array([1, 1, 1, 0, 1, 0, 0, 0]), high)
    assert 1 < with_an_event_in_each["hr"] < 100 and with_an_event_in_each["hr_ci_low"] > 0
    # the same data as a continuous score: the Newton steps run away too
    assert np.isnan(M.cox_hazard_ratio(time, event, high * 3 + 0.5)["hr"])
    # calibration: separated by the linear predictor -> no intercept / slope instead of -4e14
    y = np.array([0, 0, 0, 1, 1])
    cal = M.calibration_intercept_slope(y, lp=np.array([-30.0, -25, -20, 20, 25]))
    assert np.isnan(cal["calibration_slope"]) and np.isnan(cal["calibration_slope_ci_low"])
