"""Performance metrics of prediction models: discrimination, calibration, clinical utility, survival.

Conventions: a score is a linear predictor where higher means more risk; a probability is the predicted
probability of the positive class (binary) or of the event by a horizon (survival). Every cut-off is learnt
on the training cohort by the caller and passed here unchanged for the other cohorts.

Bootstrap confidence intervals are vectorised: one matrix of resampling counts (replicates x patients) is
drawn once per cohort (`bootstrap_counts`) and every statistic is a weighted statistic of those counts, so
that 2,000 replicates cost a few matrix products rather than 2,000 library calls, and statistics of
different models computed from the same matrix are paired (same resampled patients).

Methods follow: DeLong et al. 1988 with the fast midrank algorithm of Sun & Xu 2014 (IEEE SPL 21:1389);
Wilson 1927 score intervals; Cox 1958 logistic recalibration; Hosmer & Lemeshow 1980 (groups at quantiles of
the predicted probability, as R ResourceSelection::hoslem.test); Vickers & Elkin 2006 net benefit;
Pencina et al. 2008/2011 NRI and IDI; Harrell 1982 and Uno et al. 2011 concordance (pairs and ties as
scikit-survival's concordance_index_censored / concordance_index_ipcw); Uno et al. 2007 / Hung & Chiang 2010
cumulative/dynamic time-dependent AUC (as sksurv.metrics.cumulative_dynamic_auc).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit, logit

from radstudy.concordance import auc as roc_auc
from radstudy.concordance import harrell_c  # noqa: F401 (one of the evaluate stage's metrics)
from radstudy.concordance import concordance_matrices, pair_statistic, weighted_auc, weighted_roc
from radstudy.survival import surv_arrays, univariable_cox

Z95 = stats.norm.ppf(0.975)
log = logging.getLogger("radstudy.evaluate.metrics")


# --------------------------------------------------------------------------------------------------
# bootstrap resampling counts
# --------------------------------------------------------------------------------------------------

def bootstrap_counts(n: int, n_bootstrap: int, seed: int | np.random.Generator, strata=None) -> np.ndarray:
    """Resampling counts, shape (n_bootstrap, n): how often each patient is drawn in each replicate.

    With `strata` (e.g. the outcome), each stratum is resampled within itself (stratified bootstrap, as
    pROC's `ci.auc(method="bootstrap")`), so every replicate keeps the numbers of events and non-events.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == s)
                                                      for s in np.unique(np.asarray(strata))]
    counts = np.zeros((n_bootstrap, n), dtype=np.int32)
    rows = np.arange(n_bootstrap)[:, None] * n
    for idx in groups:
        draws = idx[rng.integers(0, len(idx), size=(n_bootstrap, len(idx)))]
        counts += np.bincount((rows + draws).ravel(), minlength=n_bootstrap * n).reshape(n_bootstrap, n).astype(np.int32)
    return counts


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (np.nan, np.nan)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------------
# AUC: DeLong (fast midrank) and weighted AUC for the bootstrap
# --------------------------------------------------------------------------------------------------

def _binary(y) -> np.ndarray:
    y = np.asarray(y)
    values = set(np.unique(y[~pd.isna(y)]).tolist()) if y.dtype == object else set(np.unique(y).tolist())
    if not values <= {0, 1, True, False}:
        raise ValueError(f"binary outcome must be 0/1, got values {sorted(values)[:5]}")
    return y.astype(bool)


def delong_placements(y, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of k scores on the same patients (Sun & Xu 2014).

    Returns (auc[k], v10[k, m], v01[k, n]) for m positives and n negatives; O(k (m+n) log(m+n)).
    """
    y = _binary(y)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("AUC needs at least one positive and one negative patient")
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = roc_auc(y, scores.T)
    v10 = (tz[:, :m] - tx) / n  # for each positive: share of negatives scored lower (ties 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # for each negative: share of positives scored higher
    return auc, v10, v01


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix (k x k) for k correlated scores."""
    auc, v10, v01 = delong_placements(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(auc), len(auc)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(auc), len(auc)))
    return auc, s10 / m + s01 / n


def auc_delong(y, score, alpha: float = 0.05) -> dict:
    """AUC with its DeLong standard error and normal 1-alpha CI clipped to [0, 1] (as pROC ci.auc)."""
    auc, cov = delong_covariance(y, score)
    se = float(np.sqrt(cov[0, 0]))
    z = stats.norm.ppf(1 - alpha / 2)
    return {"auc": float(auc[0]), "se": se, "ci_low": max(0.0, auc[0] - z * se), "ci_high": min(1.0, auc[0] + z * se)}


def delong_test(y, score_a, score_b, alpha: float = 0.05) -> dict:
    """DeLong test of two correlated ROC curves (same patients): AUCs, difference a-b with CI, z, two-sided P.

    The P value is returned as a probability (not its log10, which the widespread Python snippet returns).
    """
    auc, cov = delong_covariance(y, np.vstack([score_a, score_b]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = np.sqrt(max(var, 0.0))
    if se == 0:
        z, p = 0.0, 1.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    q = stats.norm.ppf(1 - alpha / 2)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "se": float(se),
            "ci_low": diff - q * se, "ci_high": diff + q * se, "z": float(z), "p": p}


def bootstrap_auc(y, score, counts: np.ndarray) -> np.ndarray:
    """AUC in each bootstrap replicate given resampling counts (B, n)."""
    y = _binary(y)
    return weighted_auc(score, counts * y, counts * ~y)


def auc_bootstrap_ci(y, score, n_bootstrap: int = 2000, seed: int = 0, alpha: float = 0.05,
                     stratified: bool = True) -> dict:
    """AUC with a percentile bootstrap CI (stratified by outcome by default); same seed -> same CI."""
    y = _binary(y)
    counts = bootstrap_counts(len(y), n_bootstrap, seed, strata=y if stratified else None)
    boot = bootstrap_auc(y, score, counts)
    lo, hi = percentile_ci(boot, alpha)
    return {"auc": float(weighted_auc(score, y, ~y)[0]), "ci_low": lo, "ci_high": hi}


def roc_curve_points(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with 'positive if score >= threshold', from (0, 0) to (1, 1)."""
    y = _binary(y)
    return weighted_roc(score, y, ~y)


# --------------------------------------------------------------------------------------------------
# cut-offs and classification metrics
# --------------------------------------------------------------------------------------------------

def youden_cutoff(y, score) -> float:
    """Score threshold maximising sensitivity + specificity - 1 (positive if score >= threshold).

    Learn it on the training cohort; apply it unchanged to the others. Ties: the highest threshold wins.
    """
    fpr, tpr, thr = roc_curve_points(y, score)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # skip the (0, 0) point whose threshold is +inf
    return float(thr[best])


def wilson_ci(k, n, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return (np.nan, np.nan)
    z = stats.norm.ppf(1 - alpha / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact bounds at 0/n and n/n (rounding would put the bound a hair inside the estimate)
    return (0.0 if k == 0 else float(min(p, centre - half))), (1.0 if k == n else float(max(p, centre + half)))


def classification_metrics(y, score, cutoff: float, alpha: float = 0.05) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV (each with a Wilson CI) at 'positive if score >= cutoff'."""
    y = _binary(y)
    pred = np.asarray(score, dtype=float) >= cutoff
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    tn, fn = int((~pred & ~y).sum()), int((~pred & y).sum())
    out = {"cutoff": float(cutoff), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in [("accuracy", tp + tn, tp + tn + fp + fn), ("sensitivity", tp, tp + fn),
                       ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)]:
        out[name] = k / n if n else np.nan
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = wilson_ci(k, n, alpha)
    return out


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------

def _clip_prob(p) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=float), 1e-8, 1 - 1e-8)


# A coefficient whose effect over its covariate's range is this large (log-odds or log-hazard units) is a likelihood that
# keeps rising, not an estimate: the data are (quasi-)separated, e.g. every event in one risk group of a small fold, and
# no finite maximum-likelihood estimate exists. Cox: beta x SD of the covariate (a 1-SD change multiplying the hazard by
# e^30); logistic: coefficient x the largest |value| of its column (the intercept's column is 1), e^1e4 on the odds.
_NO_FINITE_MLE = {"cox": 30.0, "logistic": 1e4}


def _logistic_glm(y: np.ndarray, x: np.ndarray, offset: np.ndarray | None = None):
    """Maximum-likelihood logistic regression (statsmodels GLM, binomial, IRLS with a convergence test);
    None when it does not converge or the data are separated (no finite maximum-likelihood estimate)."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            fit = sm.GLM(y, x, family=sm.families.Binomial(), offset=offset).fit(tol=1e-12, maxiter=200)
        except (PerfectSeparationWarning, ConvergenceWarning) as exc:
            log.warning("logistic recalibration has no finite maximum-likelihood estimate: %s", exc)
            return None
    if not fit.converged:
        return None
    effect = np.abs(np.asarray(fit.params)) * np.maximum(np.abs(x).max(axis=0), 1.0)
    if not np.all(effect < _NO_FINITE_MLE["logistic"]):  # quasi-separation that IRLS "converged" on: no finite MLE
        log.warning("logistic recalibration has no finite maximum-likelihood estimate (coefficients %s)",
                    np.round(fit.params, 1))
        return None
    return fit


def is_constant(x, rtol: float = 1e-10) -> bool:
    """Whether the values of `x` are all equal, up to `rtol` relative to their size (a constant prediction)."""
    x = np.asarray(x, dtype=float)
    return bool(len(x)) and bool(np.ptp(x) <= rtol * max(1.0, float(np.abs(x).max())))


def calibration_intercept_slope(y, p=None, *, lp=None, alpha: float = 0.05) -> dict:
    """Calibration-in-the-large and calibration slope of a prediction (Cox 1958; Van Calster et al. 2016).

    intercept: of glm(y ~ offset(lp), binomial); slope: the coefficient of lp in glm(y ~ lp, binomial), with
    Wald CIs, as R's glm. lp is the prediction on the log-odds scale: logit(p) for a predicted probability `p`,
    or `lp` itself when the prediction is a score that is not a probability (a linear predictor or a raw
    marker: logit(expit(score)) would lose it to rounding). Ideal: intercept 0, slope 1. NaN where the fit has
    no finite estimate (separated data) or, for the slope, when the prediction is constant.
    """
    if (p is None) == (lp is None):
        raise ValueError("calibration_intercept_slope needs either a probability p or a linear predictor lp")
    y = _binary(y).astype(float)
    lp = logit(_clip_prob(p)) if lp is None else np.asarray(lp, dtype=float)
    z = stats.norm.ppf(1 - alpha / 2)
    out = {}
    fits = {"intercept": (_logistic_glm(y, np.ones((len(y), 1)), offset=lp), 0)}
    constant = is_constant(lp, rtol=1e-12)
    fits["slope"] = (None if constant else _logistic_glm(y, np.column_stack([np.ones(len(y)), lp])), 1)
    for name, (fit, k) in fits.items():
        est, se = (float(fit.params[k]), float(fit.bse[k])) if fit is not None else (np.nan, np.nan)
        out.update({f"calibration_{name}": est, f"calibration_{name}_ci_low": float(est - z * se),
                    f"calibration_{name}_ci_high": float(est + z * se)})
    return out


def brier_score(y, p) -> float:
    return float(np.mean((np.asarray(p, dtype=float) - _binary(y)) ** 2))


def _quantile_groups(p: np.ndarray, g: int) -> np.ndarray:
    """Group index per patient: cut at the quantiles of p, lowest included (R: cut(p, quantile(p, 0:g/g)))."""
    breaks = np.unique(np.quantile(p, np.linspace(0, 1, g + 1)))
    if len(breaks) < 2:
        return np.zeros(len(p), dtype=int)
    return np.clip(np.searchsorted(breaks, p, side="left") - 1, 0, len(breaks) - 2)


def hosmer_lemeshow(y, p, g: int = 10) -> dict:
    """Hosmer-Lemeshow goodness of fit: chi2 over g risk groups (quantiles of p), df = groups - 2."""
    y = _binary(y).astype(float)
    p = np.asarray(p, dtype=float)
    grp = _quantile_groups(p, g)
    k = grp.max() + 1
    obs1, exp1 = np.bincount(grp, y, k), np.bincount(grp, p, k)
    n = np.bincount(grp, minlength=k).astype(float)
    obs0, exp0 = n - obs1, n - exp1
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(exp1 > 0, (obs1 - exp1) ** 2 / exp1, 0) + np.where(exp0 > 0, (obs0 - exp0) ** 2 / exp0, 0)
    chi2 = float(terms.sum())
    df = int(k - 2)
    return {"hl_chi2": chi2, "hl_df": df, "hl_p": float(stats.chi2.sf(chi2, df)) if df > 0 else np.nan,
            "hl_groups": int(k)}


def calibration_curve(y, p, n_bins: int = 10, alpha: float = 0.05) -> pd.DataFrame:
    """Binned calibration: per quantile bin of p, mean predicted, observed proportion with Wilson CI, n."""
    y = _binary(y)
    p = np.asarray(p, dtype=float)
    grp = _quantile_groups(p, n_bins)
    rows = []
    for b in np.unique(grp):
        sel = grp == b
        k, n = int(y[sel].sum()), int(sel.sum())
        lo, hi = wilson_ci(k, n, alpha)
        rows.append({"bin": int(b), "n": n, "events": k, "predicted": float(p[sel].mean()),
                     "observed": k / n, "observed_ci_low": lo, "observed_ci_high": hi})
    return pd.DataFrame(rows)


def lowess_curve(y, p, frac: float = 0.67, n_points: int = 50) -> pd.DataFrame:
    """Smoothed (locally weighted linear, tricube) observed proportion against predicted probability."""
    y = _binary(y).astype(float)
    p = np.asarray(p, dtype=float)
    grid = np.linspace(np.quantile(p, 0.02), np.quantile(p, 0.98), n_points)
    k = max(int(np.ceil(frac * len(p))), 3)
    out = []
    for x0 in grid:
        d = np.abs(p - x0)
        h = np.partition(d, min(k, len(d) - 1))[min(k, len(d) - 1)] + 1e-12
        w = np.clip(1 - (d / h) ** 3, 0, None) ** 3
        sw = w.sum()
        mx, my = (w * p).sum() / sw, (w * y).sum() / sw
        vx = (w * (p - mx) ** 2).sum()
        slope = (w * (p - mx) * (y - my)).sum() / vx if vx > 0 else 0.0
        out.append(my + slope * (x0 - mx))
    return pd.DataFrame({"predicted": grid, "observed": np.clip(out, 0, 1)})


# --------------------------------------------------------------------------------------------------
# decision curves
# --------------------------------------------------------------------------------------------------

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def net_benefit(y, p, thresholds=DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Net benefit of treating patients with p >= threshold, and of treating all / none (Vickers & Elkin 2006)."""
    y = _binary(y)
    p = np.asarray(p, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    n = len(y)
    pos = p[None, :] >= t[:, None]
    tp = (pos & y).sum(axis=1) / n
    fp = (pos & ~y).sum(axis=1) / n
    odds = t / (1 - t)
    prev = y.mean()
    return pd.DataFrame({"threshold": t, "net_benefit": tp - fp * odds, "treat_all": prev - (1 - prev) * odds,
                         "treat_none": 0.0, "n_high_risk": pos.sum(axis=1), "n_high_risk_events": (pos & y).sum(axis=1)})


def net_benefit_survival(time, event, risk, horizon: float, thresholds=DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Net benefit at a horizon for a predicted event probability by that horizon (KM among the high-risk, as dcurves)."""
    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    t = np.asarray(thresholds, dtype=float)
    odds = t / (1 - t)
    surv_all = km_at(time, event, horizon)
    rows = []
    for thr, o in zip(t, odds):
        high = risk >= thr
        share = high.mean()
        s = km_at(time[high], event[high], horizon) if high.any() else 1.0
        rows.append({"threshold": thr, "net_benefit": (1 - s) * share - s * share * o,
                     "treat_all": (1 - surv_all) - surv_all * o, "treat_none": 0.0,
                     "n_high_risk": int(high.sum()), "n_high_risk_events": float((1 - s) * high.sum())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# reclassification: NRI and IDI
# --------------------------------------------------------------------------------------------------

def _nri_from_weights(y: np.ndarray, up: np.ndarray, down: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NRI (events + non-events) for rows of weights w (B, n)."""
    we, wn = w * y, w * ~y
    ne, nn = we.sum(axis=1), wn.sum(axis=1)
    nri_e = (we @ up - we @ down) / ne
    nri_n = (wn @ down - wn @ up) / nn
    return np.column_stack([nri_e + nri_n, nri_e, nri_n])


def _categories(p: np.ndarray, cutoffs) -> np.ndarray:
    return np.searchsorted(np.sort(np.asarray(cutoffs, float)), p, side="right")


def reclassification(y, p_old, p_new, *, cutoffs=None, counts: np.ndarray | None = None,
                     alpha: float = 0.05) -> dict:
    """Continuous NRI, categorical NRI (risk categories cut at `cutoffs`) and IDI of p_new over p_old.

    Asymptotic z and P after Pencina et al. 2008; percentile CIs from the bootstrap `counts` when given
    (paired: the same resampled patients for both models), else normal CIs from the asymptotic SE.
    """
    y = _binary(y)
    p_old, p_new = np.asarray(p_old, float), np.asarray(p_new, float)
    ne, nn = y.sum(), (~y).sum()
    out: dict = {"n": int(len(y)), "events": int(ne)}
    moves = {"nri_continuous": (p_new > p_old, p_new < p_old)}
    if cutoffs is not None and len(cutoffs):
        c_old, c_new = _categories(p_old, cutoffs), _categories(p_new, cutoffs)
        moves["nri_categorical"] = (c_new > c_old, c_new < c_old)
        out["nri_cutoffs"] = ";".join(f"{c:g}" for c in cutoffs)
    q = stats.norm.ppf(1 - alpha / 2)
    for name, (up, down) in moves.items():
        up, down = up.astype(float), down.astype(float)
        pue, pde = up[y].mean(), down[y].mean()
        pun, pdn = up[~y].mean(), down[~y].mean()
        nri_e, nri_n = pue - pde, pdn - pun
        se = np.sqrt((pue + pde - (pue - pde) ** 2) / ne + (pun + pdn - (pun - pdn) ** 2) / nn)
        est = nri_e + nri_n
        out.update({name: est, f"{name}_events": nri_e, f"{name}_nonevents": nri_n,
                    f"{name}_z": est / se if se > 0 else np.nan,
                    f"{name}_p": float(2 * stats.norm.sf(abs(est / se))) if se > 0 else np.nan})
        if counts is not None:
            lo, hi = percentile_ci(_nri_from_weights(y, up, down, counts)[:, 0], alpha)
        else:
            lo, hi = est - q * se, est + q * se
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    d = p_new - p_old
    idi = d[y].mean() - d[~y].mean()
    se = np.sqrt(d[y].var(ddof=1) / ne + d[~y].var(ddof=1) / nn) if min(ne, nn) > 1 else np.nan
    out.update({"idi": float(idi), "idi_events": float(d[y].mean()), "idi_nonevents": float(-d[~y].mean()),
                "idi_z": idi / se if se > 0 else np.nan,
                "idi_p": float(2 * stats.norm.sf(abs(idi / se))) if se > 0 else np.nan})
    if counts is not None:
        w = counts.astype(float)
        we, wn = w * y, w * ~y
        boot = (we @ d) / we.sum(axis=1) - (wn @ d) / wn.sum(axis=1)
        out["idi_ci_low"], out["idi_ci_high"] = percentile_ci(boot, alpha)
    else:
        out["idi_ci_low"], out["idi_ci_high"] = idi - q * se, idi + q * se
    return out


# --------------------------------------------------------------------------------------------------
# survival: concordance, time-dependent AUC, Kaplan-Meier, Cox
# --------------------------------------------------------------------------------------------------

def censoring_weights(train_time, train_event, time, event, tau: float | None = None) -> np.ndarray:
    """1 / G(T_i) for events (0 otherwise), G = KM of censoring on the training data (as sksurv's IPCW)."""
    from sksurv.nonparametric import CensoringDistributionEstimator
    from sksurv.util import Surv

    train_time, train_event = surv_arrays(train_time, train_event)
    time, event = surv_arrays(time, event)
    cens = CensoringDistributionEstimator().fit(Surv.from_arrays(train_event, train_time))
    w = np.zeros(len(time))
    keep = event & (time < tau) if tau is not None else event.copy()
    if keep.any():
        g = cens.predict_proba(time[keep])
        w[keep] = np.where(g > 0, 1.0 / np.where(g > 0, g, 1), 0.0)
    return w


def uno_c(train_time, train_event, time, event, score, tau: float | None = None,
          counts: np.ndarray | None = None) -> np.ndarray | float:
    """Uno's IPCW concordance truncated at tau (censoring distribution from the training cohort).

    Same estimator as sksurv.metrics.concordance_index_ipcw; with `counts`, one value per replicate
    (the censoring weights stay those of the training data, as with a fixed `survival_train`).
    """
    time, event = surv_arrays(time, event)
    w = censoring_weights(train_time, train_event, time, event, tau) ** 2
    a, d = concordance_matrices(time, event, score, weights=w)
    out = pair_statistic(a, d, counts)
    return float(out[0]) if counts is None else out


def time_dependent_auc(train_time, train_event, time, event, score, horizons,
                       counts: np.ndarray | None = None) -> np.ndarray:
    """Cumulative/dynamic AUC(t) with IPCW (as sksurv.metrics.cumulative_dynamic_auc), per horizon.

    Returns shape (len(horizons),), or (B, len(horizons)) with bootstrap `counts`. A horizon outside the
    follow-up of the data (no control alive after it, or no case before it) gives NaN.
    """
    time, event = surv_arrays(time, event)
    ipcw = censoring_weights(train_time, train_event, time, event)
    c = np.ones((1, len(time))) if counts is None else counts.astype(float)
    out = np.full((len(c), len(horizons)), np.nan)
    for k, t in enumerate(horizons):
        case = (time <= t) & event
        control = time > t
        if not case.any() or not control.any() or t >= time.max():
            continue
        out[:, k] = weighted_auc(score, c * (case * ipcw), c * control)
    return out[0] if counts is None else out


def time_dependent_roc(train_time, train_event, time, event, score, horizon: float):
    """(fpr, tpr) of the cumulative/dynamic ROC curve at a horizon (IPCW-weighted cases)."""
    time, event = surv_arrays(time, event)
    ipcw = censoring_weights(train_time, train_event, time, event)
    fpr, tpr, _ = weighted_roc(score, ((time <= horizon) & event) * ipcw, (time > horizon).astype(float))
    return fpr, tpr


def km_at(time, event, t: float) -> float:
    """Kaplan-Meier survival probability at time t (product over event times <= t)."""
    time, event = surv_arrays(time, event)
    if len(time) == 0:
        return np.nan
    d, at_risk = _km_steps(time, event, t)
    return float(np.prod(1 - d / at_risk))


def _km_steps(time: np.ndarray, event: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Events and numbers at risk at each distinct event time <= t (the Kaplan-Meier factors)."""
    u, d = np.unique(time[event & (time <= t)], return_counts=True)
    return d, len(time) - np.searchsorted(np.sort(time), u, side="left")


def survival_cutoff(time, event, score, method: str = "median", horizon: float | None = None,
                    min_group: float = 0.1) -> float:
    """Risk-group cut-off learnt on training data ('high risk' if score >= cut-off).

    median: the median score. maxstat: the score maximising the log-rank statistic between groups, each
    with at least `min_group` of the patients (maximally selected rank statistic). youden: Youden index of
    the cumulative/dynamic ROC at `horizon`.
    """
    from lifelines.statistics import logrank_test

    time, event = surv_arrays(time, event)
    score = np.asarray(score, dtype=float)
    if method == "median":
        return float(np.median(score))
    if method == "maxstat":
        # candidate cut-offs: the observed scores nearest to the 2% quantiles between the group-size limits
        qs = np.quantile(score, np.arange(min_group, 1 - min_group + 1e-9, 0.02), method="inverted_cdf")
        candidates = np.unique(qs)
        best, best_stat = float(np.median(score)), -np.inf
        for c in candidates:
            high = score >= c
            if high.all() or not high.any():
                continue
            stat = logrank_test(time[high], time[~high], event[high], event[~high]).test_statistic
            if stat > best_stat:
                best, best_stat = float(c), stat
        return best
    if method == "youden":
        if horizon is None:
            raise ValueError("survival_cutoff(method='youden') needs a horizon")
        fpr, tpr = time_dependent_roc(time, event, time, event, score, horizon)
        thr = np.r_[np.inf, np.unique(score)[::-1]]
        return float(thr[int(np.argmax((tpr - fpr)[1:])) + 1])
    raise ValueError(f"unknown survival cut-off method {method!r} (median, maxstat, youden)")


def kaplan_meier_groups(time, event, high, at_times) -> dict:
    """KM of high- vs low-risk groups: curves, medians, numbers at risk at `at_times`, log-rank chi2 and P."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    time, event = surv_arrays(time, event)
    high = np.asarray(high, dtype=bool)
    out: dict = {"curves": {}, "at_risk": {}, "median": {}, "n": {}, "events": {}}
    for name, sel in (("low", ~high), ("high", high)):
        out["n"][name], out["events"][name] = int(sel.sum()), int(event[sel].sum())
        out["at_risk"][name] = [int((time[sel] >= t).sum()) for t in at_times]
        if sel.any():
            kmf = KaplanMeierFitter().fit(time[sel], event[sel], label=name)
            ci = kmf.confidence_interval_survival_function_
            out["curves"][name] = pd.DataFrame({"time": kmf.survival_function_.index.values,
                                                "survival": kmf.survival_function_.iloc[:, 0].values,
                                                "ci_low": ci.iloc[:, 0].values, "ci_high": ci.iloc[:, 1].values})
            out["median"][name] = float(kmf.median_survival_time_)
    if high.any() and (~high).any():
        res = logrank_test(time[high], time[~high], event[high], event[~high])
        out["logrank_chi2"], out["logrank_p"] = float(res.test_statistic), float(res.p_value)
    else:
        out["logrank_chi2"], out["logrank_p"] = np.nan, np.nan
    return out


def cox_univariable(time, event, x) -> tuple[float, float]:
    """Coefficient and standard error of a one-covariate Cox model, Efron's ties (as lifelines and R coxph)."""
    time, event = surv_arrays(time, event)
    beta, se, _, _ = univariable_cox(np.asarray(x, dtype=float)[:, None], time, event)
    if not np.isfinite(se[0]):  # a constant covariate or no event: nothing to estimate
        return np.nan, np.nan
    return float(beta[0]), float(se[0])


def cox_hazard_ratio(time, event, covariate, alpha: float = 0.05) -> dict:
    """Univariable Cox hazard ratio of one covariate (score per unit, or a 0/1 group) with Wald CI and P."""
    time, event = surv_arrays(time, event)
    x = np.asarray(covariate, dtype=float)
    if np.nanstd(x) == 0 or event.sum() == 0:
        return {"hr": np.nan, "hr_ci_low": np.nan, "hr_ci_high": np.nan, "hr_p": np.nan}
    groups = np.unique(x[np.isfinite(x)])
    one_sided = len(groups) == 2 and any(not event[x == g].any() for g in groups)  # every event in one group
    beta, se = (np.nan, np.nan) if one_sided else cox_univariable(time, event, x)
    if not (np.isfinite(beta) and abs(beta) * np.nanstd(x) < _NO_FINITE_MLE["cox"]):  # monotone likelihood
        log.warning("Cox hazard ratio has no finite maximum-likelihood estimate (%s): reported as NaN",
                    "every event in one group" if one_sided else f"beta {beta:.3g}")
        return {"hr": np.nan, "hr_ci_low": np.nan, "hr_ci_high": np.nan, "hr_p": np.nan}
    z = stats.norm.ppf(1 - alpha / 2)
    return {"hr": float(np.exp(beta)), "hr_ci_low": float(np.exp(beta - z * se)),
            "hr_ci_high": float(np.exp(beta + z * se)), "hr_p": float(2 * stats.norm.sf(abs(beta / se)))}


def breslow_cumhaz(time, event, eta, horizon: float) -> float:
    """Breslow baseline cumulative hazard at `horizon` for linear predictors eta (relative risks exp(eta))."""
    time, event = surv_arrays(time, event)
    order = np.argsort(time, kind="mergesort")
    ts, risk = time[order], np.exp(np.asarray(eta, dtype=float))[order]
    risk_from = np.cumsum(risk[::-1])[::-1]  # sum of risk over patients with time >= ts[k]
    u, d = np.unique(time[event & (time <= horizon)], return_counts=True)
    return float((d / risk_from[np.searchsorted(ts, u, side="left")]).sum())


@dataclass
class CoxRecalibration:
    """Cox model of the score fitted on training data: event probability by a horizon for any score."""

    beta: float
    time: np.ndarray  # training data
    event: np.ndarray
    score: np.ndarray

    @classmethod
    def fit(cls, time, event, score) -> CoxRecalibration:
        time, event = surv_arrays(time, event)
        score = np.asarray(score, dtype=float)
        return cls(beta=cox_univariable(time, event, score)[0], time=time, event=event, score=score)

    def risk(self, score, horizon: float) -> np.ndarray:
        h0 = breslow_cumhaz(self.time, self.event, self.beta * self.score, horizon)
        return 1 - np.exp(-h0 * np.exp(self.beta * np.asarray(score, dtype=float)))


def km_with_ci(time, event, t: float, alpha: float = 0.05) -> tuple[float, float, float]:
    """Kaplan-Meier S(t) with the exponential Greenwood (log(-log)) CI, as lifelines' KaplanMeierFitter."""
    time, event = surv_arrays(time, event)
    d, n = _km_steps(time, event, t)
    s = float(np.prod(1 - d / n))
    if s <= 0 or s >= 1:
        return s, s, s
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.nansum(d / (n * (n - d))) / np.log(s) ** 2
    z = stats.norm.ppf(1 - alpha / 2)
    lo, hi = s ** np.exp(z * np.sqrt(var)), s ** np.exp(-z * np.sqrt(var))
    return s, float(lo), float(hi)


def survival_calibration(time, event, risk, horizon: float, n_groups: int = 4) -> pd.DataFrame:
    """Observed (1 - KM, Greenwood CI) vs mean predicted event probability by `horizon`, per risk group."""
    time, event = surv_arrays(time, event)
    risk = np.asarray(risk, dtype=float)
    grp = _quantile_groups(risk, n_groups)
    rows = []
    for g in np.unique(grp):
        sel = grp == g
        s, lo_s, hi_s = km_with_ci(time[sel], event[sel], horizon)
        rows.append({"group": int(g) + 1, "n": int(sel.sum()), "events": int(event[sel].sum()),
                     "predicted": float(risk[sel].mean()), "observed": 1 - s,
                     "observed_ci_low": 1 - hi_s, "observed_ci_high": 1 - lo_s,
                     "followed_beyond": int((time[sel] > horizon).sum())})
    return pd.DataFrame(rows)


def status_at_horizon(time, event, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Binary status by a horizon: 1 event by t, 0 event-free beyond t; mask drops those censored before t."""
    time, event = surv_arrays(time, event)
    known = (event & (time <= horizon)) | (time > horizon)
    return (event & (time <= horizon)).astype(int), known
