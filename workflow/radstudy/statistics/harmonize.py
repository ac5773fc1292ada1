"""ComBat harmonisation of radiomic features across centers/scanners (batches).

`ComBat` is a scikit-learn style transformer that reimplements ComBat (Johnson, Li & Rabinovic 2007,
Biostatistics 8:118) exactly as Fortin's neuroCombat does (R package neuroCombat, Python neuroCombat;
the reference tests reproduce the R outputs to 1e-6). Samples are rows, features columns.

Model, per feature g and sample i of batch j:  x_ig = alpha_g + C_i beta_g + gamma_jg + sqrt(delta_jg) e_ig.
1. Standardise: regress every feature on [batch indicators, covariates]; the grand mean alpha is the
   sample-weighted mean of the batch intercepts (or the reference batch's intercept), the pooled variance
   is the residual variance (of the reference batch only, with `ref_batch`).
2. Estimate each batch's location gamma (mean of the standardised data) and scale delta (its variance).
3. Shrink them with empirical Bayes: parametric priors (normal for gamma, inverse gamma for delta,
   solved iteratively), or non-parametric (the Monte-Carlo-free integration over the other features'
   estimates, neuroCombat's `int_eprior`); `eb=False` keeps the plain location/scale estimates;
   `mean_only=True` fixes delta = 1.
4. Adjust: x* = (x_std - gamma*) / sqrt(delta*) * sqrt(var_pooled) + grand_mean + C beta.
   With `ref_batch` the reference batch is returned unchanged and the others are mapped onto it.

Covariates are *protected biological* variables (age, sex, histology, ...) whose effect on the
features ComBat must keep. NEVER pass the study outcome (label, survival, response) as a covariate:
the harmonised training features would then be built from the labels, which are unknown for new
patients -- label leakage that inflates every downstream performance estimate.

Leakage-safe use: `fit` on the training samples only, then `transform` applies the fitted estimates
unchanged to any samples of batches seen in fit (R's `neuroCombatFromTraining` semantics): the samples
passed to `transform` never change the fitted attributes. Without covariates at `transform` time on a
model fitted with covariates, the covariate term is imputed by its training mean (as neuroCombatFromTraining
does); with covariates, their fitted effect is used, so `transform` of training samples reproduces
`fit_transform` row for row.

External centers never seen in training: `transform` raises a ValueError naming the unseen batch.
`fit_unseen_batch(X_new, label)` estimates that center's location/scale from its own (unlabelled)
features, in the standardised space of the fitted model (training grand mean and pooled variance, and the
same EB settings), and stores it, so that `transform` maps that center onto the training reference.
Only the new center's features are used -- no outcomes, no training data refit -- and the training batches'
estimates are untouched. Its location estimate absorbs any case-mix difference of that center that is not
modelled by covariates; pass its covariates when the model has them.

Robustness beyond neuroCombat (which stops or returns NaN in these cases):
* a batch with fewer than `min_batch_size` samples (or a single sample, whose variance is undefined):
  `small_batch="error"` raises a ValueError naming it and its size; `small_batch="mean_only"` adjusts that
  batch's location only (delta = 1, neuroCombat's mean-only estimator);
* a feature with zero variance within a batch gets delta_hat = 1 (as neuroCombat does);
* features constant over all training samples take no part in the estimation and are passed through unchanged;
* the non-parametric EB is computed in log space (no underflow to 0/0), and the parametric EB iteration
  is capped (`max_iter`), ignoring the undefined relative changes of zero estimates.
Missing values are not supported: impute them before harmonising.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

_CONV = 1e-4  # neuroCombat's convergence threshold for the parametric EB iteration


class ComBat(BaseEstimator, TransformerMixin):
    """ComBat harmonisation as a fitted transformer (samples x features).

    Parameters
    ----------
    parametric : parametric (True) or non-parametric (False) empirical Bayes priors.
    eb : empirical Bayes shrinkage (True) or plain per-feature location/scale estimates (False).
    mean_only : adjust the batch location only (delta = 1).
    ref_batch : label of a reference batch: left unchanged, its mean and variance define the target.
    min_batch_size : batches with fewer samples are "small" (see `small_batch`). A single sample is always
        small unless `mean_only=True`.
    small_batch : "error" (raise) or "mean_only" (location-only adjustment for small batches).
    max_iter : cap on the parametric EB iterations (neuroCombat iterates until convergence).

    Attributes (after fit)
    ----------------------
    batches_ : batch labels (training batches sorted, then those added by `fit_unseen_batch`).
    n_samples_batch_ : training samples per batch (samples of `fit_unseen_batch` for added ones).
    location_only_ : bool per batch, True where only the location is adjusted.
    grand_mean_ : (n_features,) grand mean per feature.
    var_pooled_ : (n_features,) pooled variance per feature (0 for constant features).
    beta_ : (n_covariate_columns, n_features) covariate coefficients.
    covariate_names_ : names of the encoded covariate columns (one-hot `col[level]`).
    mod_mean_ : (n_features,) training mean of the covariate term (imputed when `transform` gets none).
    gamma_hat_, delta_hat_ : (n_batches, n_features) naive location/scale estimates.
    gamma_star_, delta_star_ : (n_batches, n_features) estimates applied by `transform`.
    constant_features_ : bool mask of features constant in training (passed through).
    external_batches_ : labels added by `fit_unseen_batch`.
    feature_names_in_ : column names when fitted on a DataFrame.
    """

    def __init__(
        self,
        parametric=True,
        eb=True,
        mean_only=False,
        ref_batch=None,
        min_batch_size=2,
        small_batch="error",
        max_iter=1000,
    ):
        self.parametric = parametric
        self.eb = eb
        self.mean_only = mean_only
        self.ref_batch = ref_batch
        self.min_batch_size = min_batch_size
        self.small_batch = small_batch
        self.max_iter = max_iter

    # ------------------------------------------------------------------ fit
    def fit(self, X, batch, covariates=None):
        """Estimate the ComBat model on training samples X (samples x features).

        batch: one label per sample. covariates: samples x k, rows in the order of X (DataFrame: categorical/
        object columns are one-hot encoded, first level dropped; numeric and bool columns used as is):
        protected biological variables -- never the outcome (see the module docstring).
        """
        if self.small_batch not in ("error", "mean_only"):
            raise ValueError(f"small_batch must be 'error' or 'mean_only', not {self.small_batch!r}")
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)  # refit from scratch
        X = self._check_X(X, fitting=True)
        n, p = X.shape
        batch = self._check_batch(batch, n)
        labels, codes = np.unique(batch, return_inverse=True)
        labels = labels.tolist()  # plain Python labels (readable in messages)
        counts = np.bincount(codes, minlength=len(labels))
        ref = None
        if self.ref_batch is not None:
            hits = [j for j, b in enumerate(labels) if b == self.ref_batch]
            if not hits:
                raise ValueError(f"ref_batch {self.ref_batch!r} is not among the batches {list(labels)}")
            ref = hits[0]
            if counts[ref] < 2:
                raise ValueError(
                    f"reference batch {self.ref_batch!r} has {counts[ref]} sample(s): the pooled variance "
                    "is estimated from it and needs at least 2"
                )
        location_only = np.array([self._is_small(b, c) for b, c in zip(labels, counts)])
        C = self._encode_covariates(covariates, n, fitting=True)

        self.batches_ = np.array(labels, dtype=object)
        self.n_samples_batch_ = counts
        self.location_only_ = location_only
        self.external_batches_ = []
        self._ref = ref
        self.constant_features_ = np.ptp(X, axis=0) == 0
        keep = ~self.constant_features_
        Xv = X[:, keep]
        nb = len(labels)

        # Design: batch indicators (the reference column all ones), then covariates.
        batch_design = np.eye(nb)[codes]
        if ref is not None:
            batch_design[:, ref] = 1.0
        design = np.hstack([batch_design, C])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise ValueError(
                "the covariates are confounded with batch (or with each other): every batch must contain "
                "several values of each covariate; remove the confounded covariate(s)"
            )
        B_hat = np.linalg.solve(design.T @ design, design.T @ Xv)
        if ref is not None:
            grand_mean = B_hat[ref]
            rows = codes == ref
        else:
            grand_mean = (counts / n) @ B_hat[:nb]
            rows = slice(None)
        var_pooled = np.var(Xv[rows] - design[rows] @ B_hat, axis=0)
        if not np.any(var_pooled > 0):
            raise ValueError("no residual variance left after batch and covariates: too few samples per batch")
        if np.any(var_pooled == 0):  # fully explained by batch/covariates: neuroCombat's median fallback
            var_pooled[var_pooled == 0] = np.median(var_pooled[var_pooled != 0])
        beta = B_hat[nb:]
        mod_mean = C @ beta
        s = (Xv - grand_mean - mod_mean) / np.sqrt(var_pooled)

        # Naive location/scale estimates, then (EB) shrinkage, batch by batch.
        gamma_hat = np.linalg.lstsq(batch_design, s, rcond=None)[0]
        delta_hat = np.ones_like(gamma_hat)
        gamma_star, delta_star = np.empty_like(gamma_hat), np.empty_like(gamma_hat)
        for j in range(nb):
            sj = s[codes == j]
            if not location_only[j]:
                delta_hat[j] = np.var(sj, axis=0, ddof=1)
            delta_hat[j][delta_hat[j] == 0] = 1.0
            gamma_star[j], delta_star[j] = self._estimate(sj, gamma_hat[j], delta_hat[j], location_only[j])
        if ref is not None:
            gamma_star[ref], delta_star[ref] = 0.0, 1.0

        def full(values, fill):  # expand estimates over all features (constant ones get `fill`)
            out = np.full(values.shape[:-1] + (p,), fill, dtype=float)
            out[..., keep] = values
            return out

        self.grand_mean_ = full(grand_mean, 0.0)
        self.grand_mean_[self.constant_features_] = X[0, self.constant_features_]
        self.var_pooled_ = full(var_pooled, 0.0)
        self.beta_ = full(beta, 0.0)
        self.mod_mean_ = full(mod_mean.mean(axis=0), 0.0)
        self.gamma_hat_, self.delta_hat_ = full(gamma_hat, 0.0), full(delta_hat, 1.0)
        self.gamma_star_, self.delta_star_ = full(gamma_star, 0.0), full(delta_star, 1.0)
        return self

    def fit_transform(self, X, batch, covariates=None):
        """fit, then transform the same samples (equals R neuroCombat's `dat.combat`)."""
        return self.fit(X, batch, covariates).transform(X, batch, covariates)

    # ------------------------------------------------------------ transform
    def transform(self, X, batch, covariates=None):
        """Harmonise samples of known batches with the fitted estimates (never refits anything).

        With covariates (model fitted with covariates) their fitted effect is protected exactly; without,
        the covariate term is imputed by its training mean (R neuroCombatFromTraining).
        Reference-batch samples and constant features are returned unchanged.
        """
        check_is_fitted(self, "gamma_star_")
        Xa = self._check_X(X)
        codes = self._codes(self._check_batch(batch, Xa.shape[0]))
        mm = self._covariate_term(covariates, Xa.shape[0])
        sd = np.sqrt(self.var_pooled_)
        keep = ~self.constant_features_
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (Xa - self.grand_mean_ - mm) / sd
            out = (
                (s - self.gamma_star_[codes]) / np.sqrt(self.delta_star_[codes]) * sd + self.grand_mean_ + mm
            )
        out = np.where(keep, out, Xa)
        if self._ref is not None:
            out[codes == self._ref] = Xa[codes == self._ref]
        if isinstance(X, pd.DataFrame):
            return pd.DataFrame(out, index=X.index, columns=getattr(self, "feature_names_in_", X.columns))
        return out

    def fit_unseen_batch(self, X_new, batch_label, covariates=None):
        """Add a batch never seen in fit (an external center), estimated from its own features only.

        X_new: samples x features of that one batch (no labels or outcomes are used). Its location/scale
        are estimated in the standardised space of the fitted model (training grand mean, pooled variance,
        covariate effects; the training-mean covariate term when `covariates` is None) with the same
        eb/parametric/mean_only/small-batch settings, and stored, so `transform(X, batch)` then maps that
        batch onto the training reference. The training batches' estimates are not changed. Returns self.
        """
        check_is_fitted(self, "gamma_star_")
        if any(b == batch_label for b in self.batches_):
            raise ValueError(f"batch {batch_label!r} is already part of the fitted model")
        Xa = self._check_X(X_new)
        n = Xa.shape[0]
        location_only = self._is_small(batch_label, n)
        keep = ~self.constant_features_
        mm = self._covariate_term(covariates, n)
        s = ((Xa - self.grand_mean_ - mm)[:, keep]) / np.sqrt(self.var_pooled_[keep])
        g_hat = s.mean(axis=0)
        d_hat = np.ones_like(g_hat) if location_only else np.var(s, axis=0, ddof=1)
        d_hat[d_hat == 0] = 1.0
        g_star, d_star = self._estimate(s, g_hat, d_hat, location_only)
        for name, values, fill in [
            ("gamma_hat_", g_hat, 0.0),
            ("delta_hat_", d_hat, 1.0),
            ("gamma_star_", g_star, 0.0),
            ("delta_star_", d_star, 1.0),
        ]:
            row = np.full(len(keep), fill)
            row[keep] = values
            setattr(self, name, np.vstack([getattr(self, name), row]))
        self.batches_ = np.append(self.batches_, np.array([batch_label], dtype=object))
        self.n_samples_batch_ = np.append(self.n_samples_batch_, n)
        self.location_only_ = np.append(self.location_only_, location_only)
        self.external_batches_.append(batch_label)
        return self

    # -------------------------------------------------------------- estimation
    def _estimate(self, s, g_hat, d_hat, location_only):
        """(gamma*, delta*) of one batch from its standardised data s (samples x features)."""
        if not self.eb:
            return g_hat, d_hat
        if g_hat.size < 2:
            raise ValueError("empirical Bayes needs at least 2 non-constant features; use eb=False")
        if not self.parametric:
            g_star, d_star = _int_eprior(s, g_hat, d_hat)
            return g_star, (np.ones_like(d_hat) if location_only else d_star)
        g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
        if location_only:
            return _postmean(g_hat, g_bar, 1, 1, t2), np.ones_like(d_hat)
        m, s2 = d_hat.mean(), d_hat.var(ddof=1)
        return self._it_sol(s, g_hat, d_hat, g_bar, t2, m, s2)

    def _it_sol(self, s, g_hat, d_hat, g_bar, t2, m, s2):
        """Parametric EB: alternate posterior mean of gamma and posterior variance of delta (neuroCombat)."""
        n = s.shape[0]
        g_old, d_old = g_hat, d_hat
        for _ in range(self.max_iter):
            g_new = _postmean(g_hat, g_bar, n, d_old, t2)
            if s2 > 0:
                a, b = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
                d_new = (0.5 * ((s - g_new) ** 2).sum(axis=0) + b) / (n / 2 + a - 1)
            else:  # all delta_hat equal: an infinitely sharp prior at their common value
                d_new = np.full_like(d_hat, m)
            # neuroCombat's stopping rule, including its relative change without abs() in the denominator;
            # 0/0 (a zero estimate that stays zero) is ignored instead of producing NaN
            with np.errstate(divide="ignore", invalid="ignore"):
                change = np.concatenate([np.abs(g_new - g_old) / g_old, np.abs(d_new - d_old) / d_old])
            g_old, d_old = g_new, d_new
            change = change[~np.isnan(change)]
            if change.size == 0 or change.max() <= _CONV:
                break
        return g_new, d_new

    # ------------------------------------------------------------- helpers
    def _is_small(self, label, size):
        if size >= self.min_batch_size and (size >= 2 or self.mean_only):
            return bool(self.mean_only)
        if self.small_batch == "error":
            raise ValueError(
                f"batch {label!r} has {size} sample(s), fewer than min_batch_size={self.min_batch_size}"
                + ("" if size >= 2 or self.mean_only else " (a single sample has no variance)")
                + ": merge or drop it, or use small_batch='mean_only' for a location-only adjustment"
            )
        return True

    def _check_X(self, X, fitting=False):
        if isinstance(X, pd.DataFrame):
            if fitting:
                self.feature_names_in_ = np.asarray(X.columns, dtype=object)
            elif hasattr(self, "feature_names_in_"):
                missing = [c for c in self.feature_names_in_ if c not in X.columns]
                if missing:
                    raise ValueError(f"X lacks {len(missing)} fitted feature(s), e.g. {missing[:5]}")
                X = X[list(self.feature_names_in_)]
        Xa = np.asarray(X, dtype=float)
        if Xa.ndim != 2:
            raise ValueError(f"X must be 2-D (samples x features), got shape {Xa.shape}")
        if fitting:
            self.n_features_in_ = Xa.shape[1]
        elif Xa.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xa.shape[1]} features, the model was fitted on {self.n_features_in_}")
        if not np.all(np.isfinite(Xa)):
            raise ValueError("X contains NaN or infinite values: impute them before ComBat")
        return Xa

    @staticmethod
    def _check_batch(batch, n):
        batch = np.asarray(batch)
        if batch.ndim != 1 or len(batch) != n:
            raise ValueError(f"batch must have one label per sample ({n}), got shape {batch.shape}")
        if pd.isna(batch).any():
            raise ValueError("batch contains missing labels")
        return batch

    def _codes(self, batch):
        index = {b: j for j, b in enumerate(self.batches_)}
        unseen = sorted({b for b in batch.tolist() if b not in index}, key=str)
        if unseen:
            raise ValueError(
                f"batch(es) {unseen} were not seen in fit (fitted: {list(self.batches_)}); "
                "estimate an external batch first with fit_unseen_batch(X_new, label)"
            )
        return np.array([index[b] for b in batch.tolist()], dtype=int)

    def _covariate_term(self, covariates, n):
        """Covariate part of the model per sample: C beta, or its training mean when covariates is None."""
        if covariates is None:
            return np.broadcast_to(self.mod_mean_, (n, self.n_features_in_))
        if not self._covariate_spec:
            raise ValueError("the model was fitted without covariates; do not pass covariates")
        return self._encode_covariates(covariates, n) @ self.beta_

    def _encode_covariates(self, covariates, n, fitting=False):
        """Design columns: numeric covariates as is, categorical ones one-hot (first level dropped)."""
        if covariates is None:
            if fitting:
                self._covariate_spec, self.covariate_names_ = [], []
            return np.zeros((n, 0))
        df = covariates if isinstance(covariates, pd.DataFrame) else pd.DataFrame(np.asarray(covariates))
        if len(df) != n:
            raise ValueError(f"covariates have {len(df)} rows, X has {n} samples")
        if fitting:
            spec = []
            for col in df.columns:
                values = df[col]
                numeric = pd.api.types.is_numeric_dtype(values) and not isinstance(
                    values.dtype, pd.CategoricalDtype
                )
                spec.append((col, None if numeric else sorted(values.dropna().unique().tolist(), key=str)))
            self._covariate_spec = spec
        columns, names = [], []
        for col, levels in self._covariate_spec:
            if col not in df.columns:
                raise ValueError(f"covariate {col!r} is missing")
            values = df[col]
            if values.isna().any():
                raise ValueError(f"covariate {col!r} has missing values")
            if levels is None:
                columns.append(values.to_numpy(dtype=float))
                names.append(str(col))
                continue
            unknown = set(values.tolist()) - set(levels)
            if unknown:
                raise ValueError(f"covariate {col!r} has levels not seen in fit: {sorted(unknown, key=str)}")
            for level in levels[1:]:
                columns.append((values == level).to_numpy(dtype=float))
                names.append(f"{col}[{level}]")
        C = np.column_stack(columns) if columns else np.zeros((n, 0))
        if fitting:  # a covariate constant in training carries no information (and duplicates the intercept)
            self._covariate_keep = np.ptp(C, axis=0) > 0 if n else np.ones(C.shape[1], bool)
            self.covariate_names_ = [nm for nm, k in zip(names, self._covariate_keep) if k]
        if not np.all(np.isfinite(C)):
            raise ValueError("covariates contain non-finite values")
        return C[:, self._covariate_keep]


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _int_eprior(s, g_hat, d_hat, chunk=256):
    """Non-parametric EB (neuroCombat's int_eprior): for each feature, the likelihood-weighted mean of the
    other features' (gamma_hat, delta_hat), the likelihood being that of this feature's standardised data
    under N(gamma_k, delta_k). Vectorised and in log space (exact same weights, no underflow)."""
    n, p = s.shape
    xbar = s.mean(axis=0)
    ss = ((s - xbar) ** 2).sum(axis=0)  # sum_j (x_j - g)^2 = ss + n (xbar - g)^2, without cancellation
    g_star, d_star = np.empty(p), np.empty(p)
    for start in range(0, p, chunk):
        i = np.arange(start, min(start + chunk, p))
        sum2 = ss[i, None] + n * (xbar[i, None] - g_hat[None, :]) ** 2
        log_lh = -0.5 * n * np.log(2 * np.pi * d_hat)[None, :] - sum2 / (2 * d_hat[None, :])
        log_lh[np.arange(len(i)), i] = -np.inf  # leave the feature itself out
        w = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        g_star[i], d_star[i] = w @ g_hat, w @ d_hat
    return g_star, d_star
