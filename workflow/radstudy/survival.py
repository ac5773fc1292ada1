"""Survival data and the one Cox partial-likelihood fitter with Efron's ties.

`univariable_cox` fits one univariable Cox model per column, all columns at once (Newton-Raphson with step
halving, vectorised over columns): the statistics stage screens ~1000 features with it and the evaluate stage
fits a score's or a risk group's hazard ratio and its recalibration with it. Multivariable Cox models are
lifelines' CoxPHFitter (statistics.models.fit_cox); lifelines is not used here because one fit per feature
would cost ~1000 times more.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def surv_arrays(time, event) -> tuple[np.ndarray, np.ndarray]:
    """(time as float, event as bool) arrays of equal length."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    if len(time) != len(event):
        raise ValueError("time and event differ in length")
    return time, event


def univariable_cox(X: np.ndarray, time: np.ndarray, event: np.ndarray, max_iter: int = 50, tol: float = 1e-9):
    """Univariable Cox model of every column at once (Efron ties, Newton-Raphson with step halving).

    Returns (beta, se, z, p) per column: the Wald test that lifelines' CoxPHFitter reports for a
    one-covariate model (tests/test_survival.py checks the agreement), vectorised over columns.
    Constant columns get beta 0 and P 1.
    """
    X = np.asarray(X, dtype=float)
    time, event = surv_arrays(time, event)
    n, p = X.shape
    beta_out, se_out = np.zeros(p), np.full(p, np.inf)
    mean, sd = X.mean(axis=0), X.std(axis=0)
    varying = sd > 0
    if not event.any() or not varying.any():
        return beta_out, se_out, np.zeros(p), np.ones(p)
    order = np.argsort(time, kind="stable")
    t, e = time[order], event[order].astype(bool)
    Z = (X[order][:, varying] - mean[varying]) / sd[varying]
    first = np.searchsorted(t, t, side="left")  # risk set of row i: rows first[i]: (time >= t_i)
    ev_rows = np.flatnonzero(e)
    groups, group_start, d = np.unique(t[ev_rows], return_index=True, return_counts=True)
    risk_start = first[ev_rows[group_start]]
    Ze = Z[ev_rows]
    sum_x_events = Ze.sum(axis=0)

    def pieces(b):
        w = np.exp(np.clip(Z * b, -700, 700))
        zw = Z * w
        s0 = np.cumsum(w[::-1], axis=0)[::-1][risk_start]
        s1 = np.cumsum(zw[::-1], axis=0)[::-1][risk_start]
        s2 = np.cumsum((Z * zw)[::-1], axis=0)[::-1][risk_start]
        d0 = np.add.reduceat(w[ev_rows], group_start, axis=0)
        d1 = np.add.reduceat(zw[ev_rows], group_start, axis=0)
        d2 = np.add.reduceat((Z * zw)[ev_rows], group_start, axis=0)
        ll = b * sum_x_events
        grad = sum_x_events.copy()
        info = np.zeros_like(b)
        for l in range(int(d.max())):
            active = (d > l)[:, None]
            frac = (l / d)[:, None]
            f0 = s0 - frac * d0
            f1 = s1 - frac * d1
            f2 = s2 - frac * d2
            f0 = np.where(active, f0, 1.0)
            m1 = np.where(active, f1 / f0, 0.0)
            ll = ll - np.where(active, np.log(f0), 0.0).sum(axis=0)
            grad = grad - m1.sum(axis=0)
            info = info + np.where(active, f2 / f0 - m1**2, 0.0).sum(axis=0)
        return ll, grad, info

    b = np.zeros(Z.shape[1])
    ll, grad, info = pieces(b)
    for _ in range(max_iter):
        step = np.where(info > 0, grad / np.where(info > 0, info, 1.0), 0.0)
        step = np.clip(step, -5, 5)
        for _halving in range(30):
            ll_new, grad_new, info_new = pieces(b + step)
            worse = ll_new < ll - 1e-12
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        b = b + step
        ll, grad, info = ll_new, grad_new, info_new
        if np.max(np.abs(step)) < tol:
            break
    with np.errstate(divide="ignore"):
        se = np.where(info > 0, 1 / np.sqrt(np.where(info > 0, info, 1.0)), np.inf)
    beta_out[varying] = b / sd[varying]
    se_out[varying] = se / sd[varying]
    z = np.where(np.isfinite(se_out), beta_out / se_out, 0.0)
    pval = 2 * stats.norm.sf(np.abs(z))
    return beta_out, se_out, z, pval
