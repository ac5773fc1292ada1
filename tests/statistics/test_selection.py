"""Feature selection estimators: outcome conventions, univariate tests, filters, LASSO and the full chain."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sksurv.util import Surv

from radstudy.errors import ConfigError
from radstudy.statistics.selection import (
    LassoSelector,
    SelectionPipeline,
    NearZeroVariance,
    RobustnessFilter,
    SpearmanRedundancy,
    UnivariateFilter,
    as_outcome,
    build_selector,
    make_survival,
    mann_whitney,
    selection_summary,
)

INFORMATIVE = ["tumour_CT_original_firstorder_Mean", "liver_CT_original_glcm_Contrast",
               "tumour_CT_wavelet-LLH_glszm_ZoneEntropy"]


def _data(n=240, noise=60, seed=0, missing=0.02):
    """Three informative features (effects 1.2, -1.0, 0.8 on the linear predictor) among noise."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 3 + noise)),
                     columns=INFORMATIVE + [f"liver_CT_original_firstorder_Noise{j}" for j in range(noise)])
    lp = X[INFORMATIVE].to_numpy() @ np.array([1.2, -1.0, 0.8])
    y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    t_event = rng.exponential(20, n) * np.exp(-lp)
    censor = rng.uniform(5, 60, n)
    surv = make_survival(np.minimum(t_event, censor).round(1) + 0.1, t_event <= censor)
    X = X.mask(rng.random(X.shape) < missing)
    return X, y, surv


# ---------------------------------------------------------------------------- conventions
def test_outcome_conventions_agree():
    time, event = np.array([5.0, 3.0, 8.0]), np.array([1, 0, 1])
    y = make_survival(time, event)
    assert y.dtype.names == ("event", "time") and y["event"].dtype == bool
    for form in (Surv.from_arrays(event.astype(bool), time), pd.DataFrame({"time": time, "event": event}), y):
        kind, out = as_outcome(form)
        assert kind == "survival"
        np.testing.assert_array_equal(out["time"], time)
        np.testing.assert_array_equal(out["event"], event.astype(bool))
    assert as_outcome(np.array([0, 1, 1]))[0] == "binary"
    with pytest.raises(ValueError, match="0/1"):
        as_outcome(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="survival endpoint got a binary"):
        as_outcome(np.array([0, 1]), endpoint="survival")
    with pytest.raises(ValueError, match="missing"):
        make_survival([1.0, np.nan], [1, 0])


def test_mann_whitney_matches_scipy():
    X, y, _ = _data(missing=0)
    X = X.to_numpy()
    p, auc = mann_whitney(X, y)
    for j in (0, 1, 5):
        ref = stats.mannwhitneyu(X[y == 1, j], X[y == 0, j])
        assert p[j] == pytest.approx(ref.pvalue)
        assert auc[j] == pytest.approx(ref.statistic / (y.sum() * (1 - y).sum()))


# ---------------------------------------------------------------------------------- filters
def test_near_zero_variance_drops_constant_and_rare_features():
    rng = np.random.default_rng(0)
    n = 100
    X = pd.DataFrame({
        "continuous": rng.normal(size=n),
        "constant": np.ones(n),
        "rare": np.r_[np.zeros(97), [1, 2, 3]],  # freq ratio 97, 4 % distinct values
        "binary": rng.integers(0, 2, n).astype(float),  # 2 % distinct but balanced: kept
    })
    nzv = NearZeroVariance().fit(X)
    assert nzv.selected_features_ == ["continuous", "binary"]
    assert list(nzv.transform(X).columns) == ["continuous", "binary"]


def test_robustness_filter_keep_and_evaluated():
    X = pd.DataFrame(np.zeros((3, 4)), columns=["a", "b", "deep1", "c"])
    assert RobustnessFilter().fit(X).selected_features_ == ["a", "b", "deep1", "c"]
    assert RobustnessFilter(keep=["a", "c"]).fit(X).selected_features_ == ["a", "c"]
    # features that were never assessed (deep1) pass; assessed but not robust (b) are dropped
    assert RobustnessFilter(keep=["a", "c"], evaluated=["a", "b", "c"]).fit(X).selected_features_ == ["a", "deep1", "c"]
    with pytest.raises(ValueError, match="none of the 4 features"):
        RobustnessFilter(keep=["zzz"]).fit(X)
    # no feature reached the ICC threshold: none is kept, and that is not an error (unassessed ones still pass)
    assert RobustnessFilter(keep=[]).fit(X).selected_features_ == []
    assert RobustnessFilter(keep=[], evaluated=["a", "b", "c"]).fit(X).selected_features_ == ["deep1"]


def test_no_robust_feature_gives_a_constant_score_not_an_error():
    X, y, surv = _data(missing=0)
    for target, endpoint in ((y, "binary"), (surv, "survival")):
        pipe = build_selector({}, endpoint, 0, robust_keep=[], robust_evaluated=list(X.columns)).fit(X, target)
        assert pipe[-1].selected_features_ == [] and np.ptp(pipe.decision_function(X)) == 0


def test_univariate_filter_binary_and_survival_and_fallback():
    X, y, surv = _data(missing=0)
    for target in (y, surv):
        f = UnivariateFilter(alpha=0.01).fit(X, target)
        assert set(INFORMATIVE) <= set(f.selected_features_)
        assert len(f.selected_features_) <= 6
    rng = np.random.default_rng(1)
    noise = pd.DataFrame(rng.normal(size=(60, 20)), columns=[f"n{j}" for j in range(20)])
    yb = rng.integers(0, 2, 60)
    f = UnivariateFilter(alpha=1e-6, fallback_top_k=4).fit(noise, yb)
    assert f.used_fallback_ and len(f.selected_features_) == 4
    assert set(f.selected_features_) == set(noise.columns[np.argsort(f.pvalues_)[:4]])
    assert UnivariateFilter(alpha=1e-6, fallback_top_k=0).fit(noise, yb).support_.sum() == 0
    capped = UnivariateFilter(alpha=0.5, max_features=2).fit(X, y)
    assert capped.support_.sum() == 2
    fdr = UnivariateFilter(alpha=0.05, correction="fdr_bh").fit(X, y)
    assert fdr.support_.sum() <= UnivariateFilter(alpha=0.05).fit(X, y).support_.sum()


@pytest.mark.parametrize("endpoint", ["binary", "survival"])
def test_spearman_keeps_the_more_associated_of_a_correlated_pair(endpoint):
    rng = np.random.default_rng(2)
    n = 300
    signal = rng.normal(size=n)
    strong = signal + 0.1 * rng.normal(size=n)
    weak = strong + 0.25 * rng.normal(size=n)  # rho ~ 0.97 with strong, less associated with the outcome
    other = rng.normal(size=n)
    X = pd.DataFrame({"weak": weak, "other": other, "strong": strong})  # weak comes first on purpose
    lp = 1.5 * signal
    if endpoint == "binary":
        y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    else:
        y = make_survival(rng.exponential(10, n) * np.exp(-lp), np.ones(n, bool))
    red = SpearmanRedundancy(threshold=0.9).fit(X, y)
    assert stats.spearmanr(weak, strong).statistic > 0.9
    assert red.strength_[2] > red.strength_[0]
    assert red.selected_features_ == ["other", "strong"]
    assert SpearmanRedundancy(threshold=0.99).fit(X, y).selected_features_ == ["weak", "other", "strong"]


# ------------------------------------------------------------------------------------ LASSO
@pytest.mark.parametrize("endpoint", ["binary", "survival"])
def test_chain_keeps_informative_features_and_drops_noise(endpoint):
    X, y, surv = _data()
    target = y if endpoint == "binary" else surv
    pipe = build_selector({}, endpoint, random_state=0).fit(X, target)
    lasso = pipe[-1]
    chosen = lasso.selected_features_
    assert set(INFORMATIVE) <= set(chosen)
    assert len(chosen) <= 8  # at most a few of the 60 noise features survive
    signs = np.sign(lasso.coefficients_[INFORMATIVE].to_numpy())
    np.testing.assert_array_equal(signs, [1, -1, 1])
    # transform = the selected columns; decision_function = the rad-score (LASSO linear predictor)
    out = pipe.transform(X)
    assert list(out.columns) == chosen
    score = pipe.decision_function(X)
    np.testing.assert_allclose(score, out.to_numpy() @ lasso.coefficients_.to_numpy() + lasso.intercept_)
    funnel = selection_summary(pipe)
    assert funnel["n_features"].tolist()[0] == X.shape[1]
    assert funnel["n_features"].is_monotonic_decreasing


@pytest.mark.parametrize("endpoint", ["binary", "survival"])
def test_one_standard_error_rule_selects_no_more_than_min(endpoint):
    X, y, surv = _data(n=160, noise=40, seed=4)
    target = y if endpoint == "binary" else surv
    Xs = X.fillna(X.median())
    Xs = (Xs - Xs.mean()) / Xs.std()
    fits = {rule: LassoSelector(rule=rule, random_state=1).fit(Xs, target) for rule in ("min", "1se")}
    assert fits["1se"].penalty_ >= fits["min"].penalty_
    assert fits["1se"].support_.sum() <= fits["min"].support_.sum()
    cv = fits["min"].cv_results_
    assert fits["min"].penalty_ == cv.loc[cv["mean_score"].idxmax(), "penalty"]
    best = cv.loc[cv["mean_score"].idxmax()]
    assert cv.loc[cv["penalty"] == fits["1se"].penalty_, "mean_score"].item() >= best["mean_score"] - best["se_score"]
    capped = LassoSelector(rule="min", random_state=1, max_features=2).fit(Xs, target)
    assert capped.support_.sum() <= 2


def test_lasso_is_deterministic_for_a_seed_and_handles_no_features():
    X, y, _ = _data(n=120, noise=10)
    Xs = X.fillna(0)
    a = LassoSelector(random_state=3).fit(Xs, y)
    b = LassoSelector(random_state=3).fit(Xs, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    empty = LassoSelector().fit(Xs.iloc[:, :0], y)
    assert empty.support_.sum() == 0
    assert np.allclose(empty.decision_function(Xs.iloc[:, :0]), np.log(y.mean() / (1 - y.mean())))


def test_chain_survives_when_nothing_passes_the_univariate_filter():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(80, 15)), columns=[f"f{j}" for j in range(15)])
    y = rng.integers(0, 2, 80)
    cfg = {"selection": {"univariate": {"alpha": 1e-9, "fallback_top_k": 0}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pipe = build_selector(cfg, "binary").fit(X, y)
        score = pipe.decision_function(X)
    assert pipe[-1].support_.sum() == 0 and np.ptp(score) == 0


def test_build_selector_validates_config_and_endpoint():
    with pytest.raises(ConfigError, match="lasoo"):
        build_selector({"selection": {"lasoo": {}}}, "binary")
    with pytest.raises(ValueError, match="endpoint"):
        build_selector({}, "ordinal")
    X, y, surv = _data(n=80, noise=5)
    with pytest.raises(ValueError, match="binary endpoint got a survival"):
        build_selector({}, "binary").fit(X, surv)


def test_chain_cross_validation_is_not_fooled_by_prefiltered_noise():
    """With many noise features the univariate filter keeps ~5 % of them. Cross-validated on the filtered
    features alone (cv_scope "lasso") the LASSO takes them for signal: its CV score is far better than the
    data support and it picks a small penalty. Refitting the filters in every fold (cv_scope "chain") gives
    an honest CV curve and a larger penalty."""
    X, y, _ = _data(n=120, noise=400, seed=6, missing=0)
    fits = {scope: build_selector({"selection": {"lasso": {"n_penalties": 20, "cv_scope": scope}}}, "binary").fit(X, y)
            for scope in ("chain", "lasso")}
    chain, naive = fits["chain"], fits["lasso"]
    assert isinstance(chain, SelectionPipeline) and chain[-1].cv_scope_ == "chain" and naive[-1].cv_scope_ == "lasso"
    # the filters themselves are the same fit on all training samples in both
    np.testing.assert_array_equal(chain.named_steps["univariate"].support_, naive.named_steps["univariate"].support_)
    best = {scope: fit[-1].cv_results_["mean_score"].max() for scope, fit in fits.items()}
    assert best["lasso"] > best["chain"] + 0.1  # mean held-out log-likelihood per patient
    assert chain[-1].penalty_ > 2 * naive[-1].penalty_
    assert set(INFORMATIVE[:2]) <= set(chain[-1].selected_features_)
