"""Feature selection as scikit-learn estimators: fitted on the training cohort only, `transform` keeps columns.

The chain (`build_selector`) follows the published radiomics studies (Xia; Guo 2026):
median imputation -> robustness (ICC) filter -> near-zero-variance filter -> standardisation ->
univariate filter (Mann-Whitney U / univariable Cox, P < alpha) -> Spearman redundancy (|rho| > 0.9) ->
LASSO (L1 logistic / LASSO-Cox, penalty by cross-validation on the training cohort). The LASSO linear
predictor is the rad-score: `pipeline.decision_function(X)`.

Outcome convention (`y`), the same for every estimator here:
* binary endpoint: a 1-D array of 0/1 (bool or int);
* survival endpoint: a structured array with fields ``event`` (bool) and ``time`` (float), as
  ``sksurv.util.Surv.from_arrays(event, time)`` and `make_survival(time, event)` build it. A DataFrame
  with columns ``time`` and ``event`` is accepted too.
Estimators infer the endpoint from `y` (`endpoint="auto"`) or check it when `endpoint` is given.

Features are expected as a DataFrame (names are carried through every step; `set_output("pandas")`
is set by `build_selector`). No estimator looks at samples other than those passed to `fit`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection._base import SelectorMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from radstudy.concordance import auc as roc_auc
from radstudy.concordance import harrell_c
from radstudy.config import section_schema, settings
from radstudy.survival import univariable_cox
from radstudy.statistics.settings import ENDPOINTS  # binary, survival
from radstudy.tables import read_table


# ------------------------------------------------------------------------------------ outcome
def make_survival(time, event) -> np.ndarray:
    """Survival outcome as a structured array (fields event: bool, time: float), sksurv's convention."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event)
    if time.shape != event.shape or time.ndim != 1:
        raise ValueError(f"time and event must be 1-D of equal length, got {time.shape} and {event.shape}")
    if np.isnan(time).any() or pd.isna(event).any():
        raise ValueError("survival outcome has missing time or event values")
    if (time < 0).any():
        raise ValueError("survival times must be >= 0")
    bad = set(np.unique(event).tolist()) - {0, 1, True, False}
    if bad:
        raise ValueError(f"event must be 0/1, found {sorted(bad)}")
    y = np.empty(len(time), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = event.astype(bool), time
    return y


def as_outcome(y, endpoint: str = "auto") -> tuple[str, np.ndarray]:
    """('binary', int array) or ('survival', structured array) from any accepted form of y."""
    if isinstance(y, pd.DataFrame):
        if not {"time", "event"} <= set(y.columns):
            raise ValueError(f"a DataFrame outcome needs columns 'time' and 'event', got {list(y.columns)}")
        y = make_survival(y["time"].to_numpy(), y["event"].to_numpy())
    elif isinstance(y, pd.Series):
        y = y.to_numpy()
    y = np.asarray(y)
    if y.dtype.names is not None:
        names = y.dtype.names
        if len(names) != 2:
            raise ValueError(f"survival outcome needs 2 fields (event, time), got {names}")
        ev = next((n for n in names if y[n].dtype == bool), names[0])
        tm = next(n for n in names if n != ev)
        kind, out = "survival", make_survival(y[tm], y[ev])
    else:
        if y.ndim != 1:
            raise ValueError(f"binary outcome must be 1-D, got shape {y.shape}")
        if pd.isna(y).any():
            raise ValueError("binary outcome has missing values")
        values = set(np.unique(y).tolist())
        if not values <= {0, 1, True, False}:
            raise ValueError(f"binary outcome must be 0/1, found values {sorted(values, key=str)[:10]}")
        kind, out = "binary", y.astype(int)
    if endpoint not in ("auto", kind):
        raise ValueError(f"estimator configured for a {endpoint} endpoint got a {kind} outcome")
    return kind, out


# ------------------------------------------------------------------------- univariate tests
def mann_whitney(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Mann-Whitney U test per column: (P values, AUC = U / (n1 n0))."""
    pos, neg = X[y == 1], X[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the binary outcome has a single class in the training cohort")
    p = np.ones(X.shape[1])
    auc = np.full(X.shape[1], 0.5)
    varying = np.ptp(X, axis=0) > 0
    if varying.any():
        p[varying] = stats.mannwhitneyu(pos[:, varying], neg[:, varying], alternative="two-sided", axis=0).pvalue
        auc[varying] = roc_auc(y, X[:, varying])
    return p, auc


def association(X: np.ndarray, y, endpoint: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(P value, strength) of each column's univariable association with the outcome.
    binary: Mann-Whitney U, strength |AUC - 0.5|; survival: univariable Cox Wald test, strength |z|."""
    kind, yy = as_outcome(y, endpoint)
    if kind == "binary":
        p, auc = mann_whitney(X, yy)
        return p, np.abs(auc - 0.5)
    _, _, z, p = univariable_cox(X, yy["time"], yy["event"])
    return p, np.abs(z)


# ------------------------------------------------------------------------------- estimators
class _ColumnSelector(SelectorMixin, BaseEstimator):
    """Common plumbing: feature names, zero-column inputs, DataFrame in -> DataFrame out."""

    def _validate_fit(self, X):
        if X.shape[1] == 0:  # an earlier step kept nothing: fit to nothing (scikit-learn refuses 0 columns)
            self.n_features_in_ = 0
            if isinstance(X, pd.DataFrame):
                self.feature_names_in_ = np.array([], dtype=object)
            return np.empty((X.shape[0], 0))
        return validate_data(self, X, reset=True, dtype=float, ensure_all_finite=True)

    def _get_support_mask(self):
        check_is_fitted(self, "support_")
        return self.support_

    def transform(self, X):
        check_is_fitted(self, "support_")
        if isinstance(X, pd.DataFrame):
            names = getattr(self, "feature_names_in_", None)
            if names is not None:
                missing = [c for c in names if c not in X.columns]
                if missing:
                    raise ValueError(f"X lacks {len(missing)} fitted feature(s), e.g. {missing[:5]}")
                X = X[list(names)]
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, fitted on {self.n_features_in_}")
            return X.loc[:, self.support_]
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}, fitted on {self.n_features_in_} features")
        return X[:, self.support_]

    @property
    def selected_features_(self) -> list[str]:
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = np.array([f"x{i}" for i in range(self.n_features_in_)], dtype=object)
        return [str(n) for n in np.asarray(names)[self.support_]]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class Standardise(StandardScaler):
    """StandardScaler that passes a table of no columns through (scikit-learn refuses one): when no feature was
    robust, the chain goes on to a LASSO with nothing to select, and the model's score is constant."""

    def fit(self, X, y=None, sample_weight=None):
        if X.shape[1] == 0:
            self.n_features_in_, self.n_samples_seen_ = 0, X.shape[0]
            self.mean_, self.var_, self.scale_ = np.zeros(0), np.zeros(0), np.ones(0)
            if isinstance(X, pd.DataFrame):
                self.feature_names_in_ = np.array([], dtype=object)
            return self
        return super().fit(X, y, sample_weight)

    def transform(self, X, copy=None):
        if X.shape[1] == 0:
            return X
        return super().transform(X, copy)


class RobustnessFilter(_ColumnSelector):
    """Keep the features listed as robust (e.g. ICC >= threshold in the features stage's test-retest /
    inter-reader analysis). keep: names kept; evaluated: names that were assessed at all -- features not
    evaluated (e.g. deep features when only radiomics were assessed) pass unchanged. evaluated=None means
    `keep` is exhaustive. keep=None keeps everything (no robustness analysis available); an empty `keep` (no feature
    reached the ICC threshold) keeps none of the assessed features: the model gets no radiomic feature, as when the
    LASSO keeps none."""

    def __init__(self, keep=None, evaluated=None):
        self.keep = keep
        self.evaluated = evaluated

    def fit(self, X, y=None):
        self._validate_fit(X)
        p = self.n_features_in_
        if self.keep is None:
            self.support_ = np.ones(p, dtype=bool)
            return self
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            raise ValueError("RobustnessFilter needs a DataFrame (feature names) to match the robust list")
        keep = set(map(str, self.keep))
        names = [str(n) for n in names]
        if self.evaluated is None:
            self.support_ = np.array([n in keep for n in names])
        else:
            evaluated = set(map(str, self.evaluated))
            self.support_ = np.array([n in keep or n not in evaluated for n in names])
        if p and keep and not self.support_.any():  # names that match nothing: a naming mismatch, not a finding
            raise ValueError(
                f"none of the {p} features is in the robust-feature list ({len(keep)} names, e.g. "
                f"{sorted(keep)[:3]}): do the names follow {{region}}_{{channel}}_{{imagetype}}_{{class}}_{{feature}}?"
            )
        return self


class NearZeroVariance(_ColumnSelector):
    """Drop constant and near-constant features (caret's nearZeroVar): a feature is dropped when the
    ratio of its most frequent to its second most frequent value exceeds `freq_ratio` AND its distinct
    values are fewer than `unique_percent` % of the samples -- or when it is constant."""

    def __init__(self, freq_ratio=19.0, unique_percent=10.0):
        self.freq_ratio = freq_ratio
        self.unique_percent = unique_percent

    def fit(self, X, y=None):
        X = self._validate_fit(X)
        n, p = X.shape
        keep = np.ones(p, dtype=bool)
        self.freq_ratios_ = np.full(p, np.inf)
        self.unique_percents_ = np.zeros(p)
        for j in range(p):
            _, counts = np.unique(X[:, j], return_counts=True)
            self.unique_percents_[j] = 100.0 * len(counts) / max(n, 1)
            if len(counts) < 2:
                keep[j] = False
                continue
            top2 = np.sort(counts)[-2:]
            self.freq_ratios_[j] = top2[1] / top2[0]
            if self.freq_ratios_[j] > self.freq_ratio and self.unique_percents_[j] < self.unique_percent:
                keep[j] = False
        self.support_ = keep
        return self


class UnivariateFilter(_ColumnSelector):
    """Keep features univariably associated with the outcome: P < alpha (binary: two-sided Mann-Whitney U;
    survival: univariable Cox Wald test, as lifelines computes it).

    correction: "none" or "fdr_bh" (Benjamini-Hochberg adjusted P). If no feature passes,
    the `fallback_top_k` smallest P values are kept (0: keep none). max_features caps the number kept
    (smallest P first). Attributes: pvalues_, strength_ (|AUC-0.5| or |z|)."""

    def __init__(self, alpha=0.05, correction="none", fallback_top_k=10, max_features=None, endpoint="auto"):
        self.alpha = alpha
        self.correction = correction
        self.fallback_top_k = fallback_top_k
        self.max_features = max_features
        self.endpoint = endpoint

    def fit(self, X, y):
        X = self._validate_fit(X)
        if self.correction not in ("none", "fdr_bh"):
            raise ValueError(f"correction must be 'none' or 'fdr_bh', not {self.correction!r}")
        p = X.shape[1]
        if p == 0:
            self.pvalues_ = self.strength_ = np.zeros(0)
            self.support_ = np.zeros(0, dtype=bool)
            self.used_fallback_ = False
            return self
        pvals, strength = association(X, y, self.endpoint)
        self.pvalues_, self.strength_ = pvals, strength
        adjusted = stats.false_discovery_control(pvals) if self.correction == "fdr_bh" else pvals
        self.adjusted_pvalues_ = adjusted
        support = adjusted < self.alpha
        order = np.lexsort((-strength, pvals))  # smallest P first, stronger association breaks ties
        self.used_fallback_ = not support.any()
        if self.used_fallback_ and self.fallback_top_k:
            support = np.zeros(p, dtype=bool)
            support[order[: int(self.fallback_top_k)]] = True
        if self.max_features is not None and support.sum() > self.max_features:
            ranked = [j for j in order if support[j]][: int(self.max_features)]
            support = np.zeros(p, dtype=bool)
            support[ranked] = True
        self.support_ = support
        return self


class SpearmanRedundancy(_ColumnSelector):
    """Remove redundant features: of every pair with |Spearman rho| > threshold the one more associated
    with the outcome is kept (greedy over features in decreasing association: a feature is kept unless it
    correlates above the threshold with one already kept). Association as in `UnivariateFilter`
    (|AUC-0.5| binary, |Cox z| survival); ties keep the earlier column."""

    def __init__(self, threshold=0.9, endpoint="auto"):
        self.threshold = threshold
        self.endpoint = endpoint

    def fit(self, X, y):
        X = self._validate_fit(X)
        n, p = X.shape
        support = np.zeros(p, dtype=bool)
        if p == 0:
            self.support_ = support
            return self
        pvals, strength = association(X, y, self.endpoint)
        self.strength_ = strength
        ranks = stats.rankdata(X, axis=0)
        ranks = ranks - ranks.mean(axis=0)
        norm = np.sqrt((ranks**2).sum(axis=0))
        R = np.divide(ranks, norm, out=np.zeros_like(ranks), where=norm > 0)
        order = np.lexsort((np.arange(p), -strength))
        kept: list[int] = []
        self.dropped_for_ = {}
        for j in order:
            if kept:
                rho = R[:, kept].T @ R[:, j]
                k = int(np.argmax(np.abs(rho)))
                if abs(rho[k]) > self.threshold:
                    self.dropped_for_[j] = kept[k]
                    continue
            kept.append(j)
        support[kept] = True
        self.support_ = support
        return self


class LassoSelector(_ColumnSelector):
    """LASSO with the penalty chosen by cross-validation on the training cohort; its linear predictor is the
    rad-score (`decision_function`), its non-zero coefficients the selected features (`transform`).

    binary: L1 logistic regression (liblinear, unpenalised intercept in effect) over a glmnet-style grid of
    `n_penalties` lambdas from lambda_max (no feature enters) down to `penalty_min_ratio` * lambda_max;
    CV score `binary_scoring` = "deviance" (mean log-likelihood) or "auc".
    survival: LASSO-Cox (scikit-survival CoxnetSurvivalAnalysis, l1_ratio=1) over its alpha path;
    CV score = Harrell's C-index of the held-out fold.
    CV: `cv_folds` stratified folds (by class / by event), shuffled with `random_state`. Fitted alone, the
    folds split this estimator's input; inside `SelectionPipeline` (cv_scope "chain") every fold refits the
    preceding filters too, so the CV scores are not inflated by filters that saw the held-out fold.
    rule: "min" (best mean CV score) or "1se" (the largest penalty whose mean score is within one
    standard error of the best). max_features: optional cap, moving to larger penalties until it holds.

    Attributes: penalties_, cv_results_ (DataFrame penalty, mean_score, se_score, n_nonzero), penalty_,
    coef_ (over input features, zeros for unselected), intercept_ (0 for survival), coefficients_
    (Series over selected features), selected_features_, endpoint_, cv_scope_.
    Inputs should be standardised (build_selector puts a StandardScaler before it).
    """

    def __init__(self, rule="min", cv=5, n_penalties=50, penalty_min_ratio=0.01, binary_scoring="deviance",
                 max_features=None, random_state=None, endpoint="auto"):
        self.rule = rule
        self.cv = cv
        self.n_penalties = n_penalties
        self.penalty_min_ratio = penalty_min_ratio
        self.binary_scoring = binary_scoring
        self.max_features = max_features
        self.random_state = random_state
        self.endpoint = endpoint

    def fit(self, X, y):
        """Penalty by CV over this estimator's input X, then the LASSO on all of X."""
        Xa = self._validate_fit(X)
        kind, yy = self._start(y)
        if Xa.shape[1] == 0:
            return self._fit_empty(yy)
        self._full_path(Xa, yy)
        splitter, strata = self.splitter(yy)
        scores = [self.fold_scores(Xa[tr], yy[tr], Xa[te], yy[te]) for tr, te in splitter.split(Xa, strata)]
        self.cv_scope_ = "lasso"
        return self._choose(np.array(scores))

    def fit_chain(self, X, y, prefilter):
        """Penalty by CV over the whole chain: `prefilter` (the unfitted steps before this one, a Pipeline) is
        refitted in every fold on the fold's training part; X are the chain's raw inputs. `prefilter`
        itself is fitted on all of X and feeds the final LASSO. Returns self."""
        kind, yy = self._start(y)
        Z = prefilter.fit_transform(X, yy)
        Za = self._validate_fit(Z)
        if Za.shape[1] == 0:
            return self._fit_empty(yy)
        self._full_path(Za, yy)
        splitter, strata = self.splitter(yy)
        scores = []
        # the folds' filters only need the feature names to match a robust-feature list; without one, arrays spare
        # scikit-learn's per-column DataFrame checks (2-3x faster, the same numbers)
        named = isinstance(X, pd.DataFrame) and any(
            isinstance(step, RobustnessFilter) and step.keep is not None for _, step in prefilter.steps)
        if isinstance(X, pd.DataFrame) and not named:
            X = X.to_numpy(dtype=float)
        for tr, te in splitter.split(np.zeros((len(yy), 1)), strata):
            fold = clone(prefilter).set_output(transform="pandas" if named else "default")
            Xtr = X.iloc[tr] if named else X[tr]
            Xte = X.iloc[te] if named else X[te]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No features were selected")
                Ztr = np.asarray(fold.fit_transform(Xtr, yy[tr]), dtype=float)
                Zte = np.asarray(fold.transform(Xte), dtype=float)
            scores.append(self.fold_scores(Ztr, yy[tr], Zte, yy[te]))
        self.cv_scope_ = "chain"
        return self._choose(np.array(scores))

    # ---------------------------------------------------------------- pieces
    def _start(self, y):
        if self.rule not in ("min", "1se"):
            raise ValueError(f"rule must be 'min' or '1se', not {self.rule!r}")
        if self.binary_scoring not in ("deviance", "auc"):
            raise ValueError(f"binary_scoring must be 'deviance' or 'auc', not {self.binary_scoring!r}")
        kind, yy = as_outcome(y, self.endpoint)
        self.endpoint_ = kind
        if kind == "binary":
            counts = np.bincount(yy, minlength=2)
            if counts.min() < 2:
                raise ValueError(f"LASSO needs >= 2 patients of each class in training, got {counts.tolist()}")
        elif yy["event"].sum() < 2:
            raise ValueError(f"LASSO-Cox needs >= 2 events in training, got {int(yy['event'].sum())}")
        return kind, yy

    def _fit_empty(self, yy):
        self.coef_ = np.zeros(0)
        self.intercept_ = 0.0
        if self.endpoint_ == "binary":
            m = yy.mean()
            self.intercept_ = float(np.log(m / (1 - m)))
        self.support_ = np.zeros(0, dtype=bool)
        self.penalties_ = np.zeros(0)
        self.penalty_ = np.nan
        self.cv_results_ = pd.DataFrame(columns=["penalty", "mean_score", "se_score", "n_nonzero"])
        self.cv_scope_ = None
        return self

    def splitter(self, yy):
        """(StratifiedKFold, stratification labels) for the outcome: by class, or by event indicator."""
        if self.endpoint_ == "binary":
            strata = yy
            folds = min(int(self.cv), int(np.bincount(yy, minlength=2).min()))
        else:
            strata = yy["event"].astype(int)
            folds = min(int(self.cv), int(strata.sum()), int((1 - strata).sum()) or int(self.cv))
        folds = max(folds, 2)
        return StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.random_state), strata

    # binary: glmnet's lambda on the mean log-loss; sklearn's C multiplies the summed loss: C = 1 / (n lambda)
    @staticmethod
    def _logistic(lam, n):
        # liblinear shuffles coordinates: a fixed random_state makes the fit reproducible
        return LogisticRegression(C=1.0 / (n * lam), l1_ratio=1.0, solver="liblinear", intercept_scaling=100.0,
                                  tol=1e-6, max_iter=10000, random_state=0)

    def _coxnet(self, alphas=None, ratio=None):
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        return CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=alphas, n_alphas=int(self.n_penalties),
                                      alpha_min_ratio=self.penalty_min_ratio if ratio is None else ratio,
                                      fit_baseline_model=False)

    def _full_path(self, X, yy):
        """Penalty grid and coefficient path on all training samples (penalties_, _path_coef, _path_intercept)."""
        n = len(yy)
        if self.endpoint_ == "binary":
            lam_max = np.max(np.abs((X - X.mean(axis=0)).T @ (yy - yy.mean()))) / n
            lam_max = lam_max if lam_max > 0 else 1.0
            self.penalties_ = lam_max * np.geomspace(1.0, self.penalty_min_ratio, int(self.n_penalties))
            coefs, intercepts = [], []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                for lam in self.penalties_:
                    model = self._logistic(lam, n).fit(X, yy)
                    coefs.append(model.coef_[0])
                    intercepts.append(model.intercept_[0])
            self._path_coef, self._path_intercept = np.array(coefs), np.array(intercepts)
            return
        ratio = float(self.penalty_min_ratio)
        while True:  # Coxnet fails numerically when the smallest penalty is too small for n < p: shorten the path
            try:
                full = self._coxnet(ratio=ratio).fit(X, yy)
                break
            except ArithmeticError:
                if ratio >= 0.5:
                    raise
                ratio = min(0.5, ratio * 5)
                warnings.warn(f"LASSO-Cox: numerical failure, penalty_min_ratio raised to {ratio}", UserWarning)
        self.penalties_ = np.asarray(full.alphas_, dtype=float)
        self._path_coef = np.asarray(full.coef_, dtype=float).T  # (n_penalties, p)
        self._path_intercept = np.zeros(len(self.penalties_))

    def fold_scores(self, Xtr, ytr, Xte, yte) -> np.ndarray:
        """CV score of every penalty in penalties_ for one fold (NaN where undefined)."""
        out = np.full(len(self.penalties_), np.nan)
        if self.endpoint_ == "binary":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                for i, lam in enumerate(self.penalties_):
                    if Xtr.shape[1]:
                        model = self._logistic(lam, len(ytr)).fit(Xtr, ytr)
                        prob = special.expit(Xte @ model.coef_[0] + model.intercept_[0])
                    else:
                        prob = np.full(len(yte), ytr.mean())
                    if self.binary_scoring == "deviance":
                        prob = np.clip(prob, 1e-15, 1 - 1e-15)
                        out[i] = np.mean(yte * np.log(prob) + (1 - yte) * np.log(1 - prob))
                    else:
                        out[i] = roc_auc(yte, prob)
            return out
        if Xtr.shape[1] == 0:
            return np.full(len(self.penalties_), 0.5)
        try:
            model = self._coxnet(self.penalties_).fit(Xtr, ytr)
        except ArithmeticError:
            return out  # numerical failure on this fold: its scores stay missing
        fold_coef = np.asarray(model.coef_, dtype=float)
        for i in range(min(fold_coef.shape[1], len(self.penalties_))):
            out[i] = harrell_c(yte["time"], yte["event"], Xte @ fold_coef[:, i])  # NaN: no comparable pairs
        return out

    def _choose(self, scores):
        """Pick the penalty from the fold scores (rule, max_features) and keep its coefficients."""
        coefs, intercepts = self._path_coef, self._path_intercept
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            mean = np.nanmean(scores, axis=0)
            k_eff = np.sum(~np.isnan(scores), axis=0)
            se = np.nanstd(scores, axis=0, ddof=1) / np.sqrt(np.maximum(k_eff, 1))
        n_nonzero = (coefs != 0).sum(axis=1)
        self.cv_results_ = pd.DataFrame(
            {"penalty": self.penalties_, "mean_score": mean, "se_score": se, "n_nonzero": n_nonzero}
        )
        if np.all(np.isnan(mean)):
            warnings.warn("LASSO cross-validation produced no score (too few events/classes per fold): "
                          "keeping the largest penalty (no feature)", UserWarning)
            mean = np.where(np.arange(len(mean)) == 0, 0.0, -np.inf)
            se = np.zeros_like(mean)
        best = int(np.nanargmax(mean))  # penalties_ decrease: the first maximum is the largest penalty
        chosen = best
        if self.rule == "1se":
            ok = np.flatnonzero(mean >= mean[best] - np.nan_to_num(se[best]))
            chosen = int(ok.min())  # largest penalty within 1 SE of the best
        if self.max_features is not None:
            while chosen > 0 and n_nonzero[chosen] > self.max_features:
                chosen -= 1
        self.best_index_, self.chosen_index_ = best, chosen
        self.penalty_ = float(self.penalties_[chosen])
        self.coef_ = coefs[chosen].copy()
        self.intercept_ = float(intercepts[chosen])
        self.support_ = self.coef_ != 0
        del self._path_coef, self._path_intercept
        return self

    def decision_function(self, X):
        """Rad-score: the LASSO linear predictor (log-odds for binary, log relative hazard for survival)."""
        check_is_fitted(self, "coef_")
        if isinstance(X, pd.DataFrame) and getattr(self, "feature_names_in_", None) is not None:
            X = X[list(self.feature_names_in_)]
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}, fitted on {self.n_features_in_} features")
        return X @ self.coef_ + self.intercept_

    @property
    def coefficients_(self) -> pd.Series:
        check_is_fitted(self, "coef_")
        return pd.Series(self.coef_[self.support_], index=self.selected_features_, name="coefficient")


# ---------------------------------------------------------------------------------- builder
def selection_settings(config: dict | None) -> dict:
    """The `selection` section (given the whole study config or the section itself), validated, with the
    schema's defaults filled in."""
    config = config or {}
    if "selection" in config:  # the whole study config
        section = config["selection"]
    elif set(config) <= set(section_schema("selection")["properties"]):  # the section itself
        section = config
    else:  # a study config without a selection section
        section = None
    return settings("selection", section)


def read_robust_features(path: str | Path, icc_min: float) -> tuple[list[str], list[str]]:
    """(keep, evaluated) from a robustness table (TSV): column `feature`, and optionally `icc`
    (then keep = icc >= icc_min, evaluated = every listed feature; without it every listed feature is kept
    and the list is exhaustive: evaluated = None is returned as [])."""
    table = read_table(path, id_columns=())
    if "feature" not in table.columns:
        raise ValueError(f"robustness table {path} needs a 'feature' column, has {list(table.columns)}")
    if "icc" in table.columns:
        keep = table.loc[table["icc"] >= icc_min, "feature"].astype(str).tolist()
        return keep, table["feature"].astype(str).tolist()
    return table["feature"].astype(str).tolist(), []


class SelectionPipeline(Pipeline):
    """A Pipeline whose final LassoSelector chooses its penalty by cross-validating the whole chain
    (cv_scope "chain": every fold refits the filters on its training part) -- or, with cv_scope "lasso",
    a plain Pipeline (filters fitted once on all training samples, CV over the LASSO only, which is
    optimistic when the filters kept noise features: they saw the held-out folds)."""

    def __init__(self, steps, *, cv_scope="chain", memory=None, transform_input=None, verbose=False):
        super().__init__(steps, memory=memory, transform_input=transform_input, verbose=verbose)
        self.cv_scope = cv_scope

    def fit(self, X, y=None, **params):
        if self.cv_scope not in ("chain", "lasso"):
            raise ValueError(f"cv_scope must be 'chain' or 'lasso', not {self.cv_scope!r}")
        lasso = self._final_estimator
        if self.cv_scope == "lasso" or not isinstance(lasso, LassoSelector) or len(self.steps) < 2:
            return super().fit(X, y, **params)
        lasso.fit_chain(X, y, self[:-1])
        return self


def build_selector(config: dict | None, endpoint: str, random_state: int | None = 0,
                   robust_keep=None, robust_evaluated=None) -> Pipeline:
    """The selection chain for one endpoint as an unfitted Pipeline (DataFrame output):
    impute (training median) -> robustness -> near-zero variance -> standardise -> univariate ->
    Spearman redundancy -> LASSO. `pipeline.decision_function(X)` is the rad-score. The LASSO penalty is
    cross-validated over the whole chain (selection.lasso.cv_scope "chain", see SelectionPipeline).

    config: the study config or its `selection` section (defaults filled in); endpoint: binary | survival;
    random_state: seed of the LASSO cross-validation folds; robust_keep / robust_evaluated: see
    RobustnessFilter (None: no robustness filtering)."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
    cfg = selection_settings(config)
    uni, lasso, nzv = cfg["univariate"], cfg["lasso"], cfg["near_zero_variance"]
    steps = [
        ("impute", SimpleImputer(strategy="median")),
        ("robustness", RobustnessFilter(keep=robust_keep, evaluated=robust_evaluated or None)),
        ("near_zero_variance", NearZeroVariance(nzv["freq_ratio"], nzv["unique_percent"])),
        ("scale", Standardise()),
        ("univariate", UnivariateFilter(uni["alpha"], uni["correction"], uni["fallback_top_k"],
                                        uni["max_features"], endpoint=endpoint)),
        ("redundancy", SpearmanRedundancy(cfg["redundancy"]["threshold"], endpoint=endpoint)),
        ("lasso", LassoSelector(rule=lasso["rule"], cv=lasso["cv_folds"], n_penalties=lasso["n_penalties"],
                                penalty_min_ratio=lasso["penalty_min_ratio"],
                                binary_scoring=lasso["binary_scoring"], max_features=lasso["max_features"],
                                random_state=random_state, endpoint=endpoint)),
    ]
    return SelectionPipeline(steps, cv_scope=lasso["cv_scope"]).set_output(transform="pandas")


def selection_summary(pipeline: Pipeline) -> pd.DataFrame:
    """Number of features left after each fitted step (the selection funnel)."""
    rows = []
    for name, step in pipeline.steps:
        if hasattr(step, "support_"):
            rows.append({"step": name, "n_features": int(np.sum(step.support_))})
        elif name == "impute":
            rows.append({"step": "input", "n_features": int(step.n_features_in_)})
            rows.append({"step": name, "n_features": int(len(step.get_feature_names_out()))})
    return pd.DataFrame(rows)
