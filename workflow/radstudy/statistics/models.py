"""Prediction models per endpoint and design split: clinical, radiomic, deep and combined (the nomogram's).

For every split of the design (`radstudy.statistics.design`) and every configured endpoint (binary: logistic
regression; survival: Cox regression) everything is fitted once on the split's training cohort and
applied unchanged to its validation and test cohorts:

1. Harmonisation (`Harmonizer`, one per feature set: radiomic, deep): median imputation, then ComBat
   (`radstudy.statistics.harmonize.ComBat`) with batch = center, fitted on the training cohort. Protected
   covariates come from `harmonization.covariates` and may never be an endpoint column. Centers absent
   from training (external test centers) follow `harmonization.external`: `none` (imputed features,
   not harmonised) or `unseen` (`ComBat.fit_unseen_batch` on that center's own features, no outcomes).
2. Clinical model: `ClinicalEncoder` (training medians/modes for missing values, one-hot coding with the
   training levels, optional ordinal maps and log(1 + x) transforms), univariable screening (Wald P <
   `screening_alpha`, joint Wald test for multi-level variables), a multivariable model of the screened
   variables, and the retention rule (`retain`: all | ci_excludes_1 | backward) giving the final clinical
   predictors. Logistic fits are unpenalised scikit-learn fits with Wald CIs from the observed information
   (the Hessian); Cox fits are lifelines' CoxPHFitter.
3. Radiomic / deep model: the selection chain (`radstudy.statistics.selection.build_selector`) over the harmonised
   radiomic (`*_deep_*` excluded) / deep (`*_deep_*`) features; its LASSO linear predictor is the
   rad-score / deep score, and the LASSO itself is the model (score = that linear predictor, binary
   probability = expit(score), survival risk from the Breslow baseline hazard of the training cohort; no
   refit, which would diverge when an over-fitted score separates the training cohort). The deep model is
   skipped when there are no deep features.
4. Combined model: final clinical predictors + rad-score (+ deep score) in one logistic / Cox model.

Every model is a `FittedModel` (saved with joblib, with its input features and library versions):
`load_model(path).predict(df)` scores new patients from a table with `center`, the model's features and
clinical variables. `run_statistics` writes the tables the evaluation and report stages read.
"""

from __future__ import annotations

import copy
import logging
import platform
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from scipy import special, stats
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression

from radstudy import __version__
from radstudy.config import settings
from radstudy.statistics.design import assign_cohorts, primary_split, split_names
from radstudy.statistics.harmonize import ComBat
from radstudy.statistics.robustness import FLAG_COLUMNS, ID_COLUMNS, icc_table, robust_features
from radstudy.statistics.selection import build_selector, make_survival, read_robust_features, selection_summary
from radstudy.statistics.settings import (  # noqa: F401 (the settings, re-exported: light for the Snakefile)
    ENDPOINTS,
    check_covariates,
    endpoint_spec,
    fitted_models,
    outcome_columns,
    statistics_settings,
)
from radstudy.tables import read_table

log = logging.getLogger(__name__)

FEATURE_SETS = ("radiomic", "deep")  # the feature sets scored here; models.combined_scores may also name cnn
SCORE_OF = {"radiomic": "radscore", "deep": "deepscore"}
DEEP_TAG = "_deep_"


def derive_seed(seed: int, *keys) -> int:
    """A stable sub-seed for one random step (same study seed -> same result, whatever the run order)."""
    return zlib.crc32("|".join(map(str, (seed, *keys))).encode()) % (2**31 - 1)


def library_versions() -> dict[str, str]:
    import lifelines
    import scipy
    import sklearn
    import sksurv

    return {
        "radstudy": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "pandas": pd.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
        "scikit-survival": sksurv.__version__, "lifelines": lifelines.__version__, "joblib": joblib.__version__,
    }


def feature_sets(columns) -> dict[str, list[str]]:
    """Radiomic (no `_deep_` in the name) and deep (`_deep_`) feature columns."""
    cols = [c for c in columns if c not in ("patient", "center")]
    return {"radiomic": [c for c in cols if DEEP_TAG not in c], "deep": [c for c in cols if DEEP_TAG in c]}


# ================================================================================ harmonisation
class Harmonizer(BaseEstimator):
    """Median imputation + ComBat by center, fitted on training patients; external centers per `external`.

    fit(X, centers, clinical): X = feature columns (training rows), clinical = a table holding the
    `covariates` columns (imputed with training medians / modes). `adapt(X, centers, clinical)` adds
    centers not seen in fit (mode `unseen`: ComBat.fit_unseen_batch on their own features, in a copy --
    `combat_` stays the training fit; mode `none`: recorded, features left as imputed).
    `transform` never refits. `modes_`: center -> combat | unseen | none."""

    def __init__(self, method="combat", external="unseen", covariates=(), forbidden=(), combat=None):
        self.method = method
        self.external = external
        self.covariates = covariates
        self.forbidden = forbidden
        self.combat = combat

    def fit(self, X: pd.DataFrame, centers, clinical: pd.DataFrame | None = None):
        check_covariates(list(self.covariates), list(self.forbidden))
        centers = np.asarray(centers).astype(str)
        self.features_in_ = list(X.columns)
        self.imputer_ = SimpleImputer(strategy="median").set_output(transform="pandas").fit(X)
        self.features_ = [str(c) for c in self.imputer_.get_feature_names_out()]
        Xi = self.imputer_.transform(X)
        self.training_centers_ = sorted(set(centers.tolist()))
        self.adapted_ = None
        self.modes_ = {c: ("combat" if self.method == "combat" else "none") for c in self.training_centers_}
        self.n_patients_ = pd.Series(centers).value_counts().to_dict()
        if self.method == "combat":
            cov = self._covariates(clinical, fit=True)
            combat = settings("harmonization", self.combat)
            params = {k: combat[k] for k in ("parametric", "eb", "mean_only", "min_batch_size", "small_batch")}
            self.combat_ = ComBat(**params).fit(Xi, centers, cov)
        return self

    def _covariates(self, clinical, fit=False):
        if not self.covariates:
            return None
        if clinical is None:
            raise ValueError(f"ComBat covariates {list(self.covariates)} need the clinical table")
        missing = [c for c in self.covariates if c not in clinical.columns]
        if missing:
            raise ValueError(f"ComBat covariate(s) {missing} are not columns of the clinical table")
        cov = clinical[list(self.covariates)].copy()
        if fit:
            self.covariate_fill_ = {}
            for c in cov.columns:
                numeric = pd.api.types.is_numeric_dtype(cov[c])
                fill = cov[c].median() if numeric else cov[c].mode(dropna=True)
                self.covariate_fill_[c] = fill if numeric else (fill.iloc[0] if len(fill) else "missing")
        return cov.fillna(self.covariate_fill_).reset_index(drop=True)

    def _imputed(self, X):
        missing = [c for c in self.features_in_ if c not in X.columns]
        if missing:
            raise ValueError(f"feature table lacks {len(missing)} column(s) the model needs, e.g. {missing[:5]}")
        return self.imputer_.transform(X[self.features_in_])

    def adapt(self, X: pd.DataFrame, centers, clinical: pd.DataFrame | None = None):
        """Register centers not seen in fit, from their own (unlabelled) features; training estimates unchanged."""
        centers = np.asarray(centers).astype(str)
        new = [c for c in dict.fromkeys(centers.tolist()) if c not in self.modes_]
        if not new:
            return self
        if self.method != "combat" or self.external == "none":
            self.modes_.update({c: "none" for c in new})
            return self
        Xi = self._imputed(X)
        cov = self._covariates(clinical)
        if self.adapted_ is None:
            self.adapted_ = copy.deepcopy(self.combat_)
        for c in new:
            rows = centers == c
            self.adapted_.fit_unseen_batch(Xi.loc[rows], c, None if cov is None else cov.loc[rows])
            self.modes_[c] = "unseen"
            self.n_patients_[c] = int(rows.sum())
        return self

    def transform(self, X: pd.DataFrame, centers, clinical: pd.DataFrame | None = None) -> pd.DataFrame:
        centers = np.asarray(centers).astype(str)
        Xi = self._imputed(X).reset_index(drop=True)
        if self.method != "combat":
            return Xi
        unknown = sorted(set(centers.tolist()) - set(self.modes_))
        if unknown:
            raise ValueError(
                f"center(s) {unknown} were not in the training cohort: harmonization.external = "
                f"{self.external!r} needs `adapt` with those centers' patients first (several per center)"
            )
        cov = self._covariates(clinical)
        combat = self.adapted_ if self.adapted_ is not None else self.combat_
        harmonised = np.array([self.modes_[c] in ("combat", "unseen") for c in centers])
        out = Xi.copy()
        if harmonised.any():
            out.loc[harmonised] = combat.transform(
                Xi.loc[harmonised], centers[harmonised], None if cov is None else cov.loc[harmonised]
            ).to_numpy()
        return out


# ==================================================================================== clinical
class ClinicalEncoder(BaseEstimator, TransformerMixin):
    """Clinical variables -> numeric design columns, learnt on training patients.

    numeric: missing -> training median (mode for 0/1 variables), optional log(1 + x) (`log_transform`);
    ordinal (`ordinal`: {column: [levels in order]}, for text stages such as T1..T4) -> 0, 1, ...;
    categorical (text columns, or listed in `categorical`) -> missing/unseen -> training mode, one-hot with
    the first level (sorted) as reference, columns named `variable[level]`.
    `terms_`: variable -> its design columns."""

    def __init__(self, variables=(), categorical=(), ordinal=None, log_transform=()):
        self.variables = variables
        self.categorical = categorical
        self.ordinal = ordinal
        self.log_transform = log_transform

    def fit(self, df: pd.DataFrame, y=None):
        missing = [v for v in self.variables if v not in df.columns]
        if missing:
            raise ValueError(f"clinical table lacks variable(s) {missing}")
        self.kind_, self.fill_, self.levels_, self.terms_ = {}, {}, {}, {}
        for v in self.variables:
            col = self._prepared(df[v], v)
            numeric = pd.api.types.is_numeric_dtype(col) and v not in self.categorical
            if numeric:
                values = col.dropna()
                if values.empty:
                    raise ValueError(f"clinical variable {v!r} has no value in the training cohort")
                binary = set(values.unique().tolist()) <= {0, 1}
                self.kind_[v] = "numeric"
                self.fill_[v] = float(values.mode().iloc[0] if binary else values.median())
                self.terms_[v] = [v]
            else:
                values = col.dropna().astype(str)
                if values.empty:
                    raise ValueError(f"clinical variable {v!r} has no value in the training cohort")
                self.kind_[v] = "categorical"
                self.levels_[v] = sorted(values.unique().tolist())
                self.fill_[v] = str(values.mode().sort_values().iloc[0])
                self.terms_[v] = [f"{v}[{lvl}]" for lvl in self.levels_[v][1:]]
        self.feature_names_out_ = [t for v in self.variables for t in self.terms_[v]]
        return self

    def _prepared(self, col: pd.Series, v: str) -> pd.Series:
        ordinal = (self.ordinal or {}).get(v)
        if ordinal is not None and not pd.api.types.is_numeric_dtype(col):
            mapping = {str(level): i for i, level in enumerate(ordinal)}
            unknown = sorted(set(col.dropna().astype(str)) - set(mapping))
            if unknown:
                warnings.warn(f"clinical variable {v!r}: values {unknown} not in its ordinal levels (-> missing)")
            col = col.astype(str).map(mapping).where(col.notna())
            col = pd.to_numeric(col)
        return col

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        out = {}
        for v in self.variables:
            if v not in df.columns:
                raise ValueError(f"clinical table lacks variable {v!r} that the model needs")
            col = self._prepared(df[v], v)
            if self.kind_[v] == "numeric":
                x = pd.to_numeric(col, errors="coerce").astype(float).fillna(self.fill_[v]).to_numpy()
                if v in self.log_transform:
                    x = np.log1p(np.clip(x, 0, None))
                out[v] = x
            else:
                x = col.astype(object).where(col.notna(), None)
                x = np.array([self.fill_[v] if s is None else str(s) for s in x], dtype=object)
                unseen = sorted(set(x.tolist()) - set(self.levels_[v]))
                if unseen:
                    warnings.warn(f"clinical variable {v!r}: levels {unseen} not seen in training (-> {self.fill_[v]})")
                    x = np.where(np.isin(x, self.levels_[v]), x, self.fill_[v])
                for lvl in self.levels_[v][1:]:
                    out[f"{v}[{lvl}]"] = (x == lvl).astype(float)
        return pd.DataFrame(out, index=df.index, columns=self.feature_names_out_)

    def subset(self, variables) -> "ClinicalEncoder":
        """A fitted copy encoding only `variables` (the terms a final model uses)."""
        sub = copy.deepcopy(self)
        sub.variables = [v for v in self.variables if v in set(variables)]
        sub.feature_names_out_ = [t for v in sub.variables for t in self.terms_[v]]
        return sub

    def get_feature_names_out(self, input_features=None):
        return np.array(self.feature_names_out_, dtype=object)


# ============================================================================ regression fits
@dataclass
class Regression:
    """An unpenalised logistic or Cox model: coefficients with Wald statistics and a predictor."""

    kind: str  # logistic | cox
    terms: list[str]
    coef: pd.Series  # logistic: includes "(intercept)"
    se: pd.Series
    cov: np.ndarray
    n: int
    events: int
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline_times: np.ndarray | None = None  # Cox: Breslow cumulative hazard at the training mean LP
    baseline_cumhaz: np.ndarray | None = None
    lp_center: float = 0.0

    def linear_predictor(self, X: pd.DataFrame) -> np.ndarray:
        beta = self.coef.drop("(intercept)", errors="ignore")
        lp = X[list(beta.index)].to_numpy(dtype=float) @ beta.to_numpy() if len(beta) else np.zeros(len(X))
        return lp + float(self.coef.get("(intercept)", 0.0))

    def probability(self, X: pd.DataFrame, horizon: float | None = None) -> np.ndarray:
        """logistic: P(outcome = 1); cox: risk of the event by `horizon` = 1 - S(horizon | x)."""
        lp = self.linear_predictor(X)
        if self.kind == "logistic":
            return special.expit(lp)
        if horizon is None or self.baseline_times is None:
            return np.full(len(lp), np.nan)
        i = np.searchsorted(self.baseline_times, horizon, side="right") - 1
        h0 = self.baseline_cumhaz[i] if i >= 0 else 0.0
        with np.errstate(over="ignore"):
            return 1 - np.exp(-h0 * np.exp(lp - self.lp_center))

    def table(self, ci_level: float = 0.95) -> pd.DataFrame:
        z = stats.norm.ppf(0.5 + ci_level / 2)
        coef, se = self.coef, self.se.reindex(self.coef.index)
        with np.errstate(over="ignore", invalid="ignore"):
            out = pd.DataFrame({
                "term": coef.index, "coef": coef.to_numpy(), "se": se.to_numpy(),
                "ratio": np.exp(coef.to_numpy()), "ci_low": np.exp(coef - z * se).to_numpy(),
                "ci_high": np.exp(coef + z * se).to_numpy(),
                "p": 2 * stats.norm.sf(np.abs((coef / se).to_numpy())),
            })
        out["measure"] = "OR" if self.kind == "logistic" else "HR"
        out.loc[out["term"] == "(intercept)", ["ratio", "ci_low", "ci_high", "measure"]] = [np.nan, np.nan, np.nan, ""]
        return out

    def wald_p(self, terms: list[str]) -> float:
        """Joint Wald test of `terms` (chi-square, df = len(terms)); P of a single term's z test."""
        terms = [t for t in terms if t in self.coef.index]
        if not terms:
            return 1.0
        idx = [list(self.coef.index).index(t) for t in terms]
        b = self.coef.iloc[idx].to_numpy()
        V = self.cov[np.ix_(idx, idx)]
        try:
            chi2 = float(b @ np.linalg.solve(V, b))
        except np.linalg.LinAlgError:
            chi2 = float(b @ np.linalg.pinv(V) @ b)
        return float(stats.chi2.sf(chi2, len(idx)))


def _usable(X: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Columns that vary in the training rows (constant ones cannot be estimated)."""
    varying = [c for c in X.columns if np.ptp(X[c].to_numpy(dtype=float)) > 0]
    return varying, [c for c in X.columns if c not in varying]


def fit_logistic(X: pd.DataFrame, y) -> Regression:
    """Unpenalised logistic regression (scikit-learn, Newton-Cholesky) with Wald statistics from the
    observed information (X' W X, W = p(1 - p)); constant columns are dropped."""
    y = np.asarray(y, dtype=int)
    terms, dropped = _usable(X)
    notes = []
    n = len(y)
    A = X[terms].to_numpy(dtype=float)
    if terms:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=np.inf, solver="newton-cholesky", max_iter=1000, tol=1e-10).fit(A, y)
        notes += [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
        beta = np.concatenate([model.intercept_, model.coef_[0]])
    else:
        m = y.mean()
        beta = np.array([np.log(m / (1 - m)) if 0 < m < 1 else 0.0])
    D = np.column_stack([np.ones(n), A])
    p = special.expit(D @ beta)
    H = D.T @ (D * (p * (1 - p))[:, None])
    try:
        cov = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(H)
        notes.append("singular information matrix (separation or collinearity): pseudo-inverse used")
    names = ["(intercept)", *terms]
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    return Regression("logistic", terms, pd.Series(beta, index=names), pd.Series(se, index=names), cov,
                      n=n, events=int(y.sum()), dropped=dropped, notes=notes)


def fit_cox(X: pd.DataFrame, time, event) -> Regression:
    """Unpenalised Cox regression (lifelines CoxPHFitter, Efron ties) with its Wald statistics, and the
    Breslow baseline cumulative hazard for absolute risks. Falls back to a tiny ridge penalty (noted)
    when lifelines does not converge (e.g. a predictor separating events)."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=int)
    terms, dropped = _usable(X)
    notes = []
    if terms:
        df = pd.DataFrame(X[terms].to_numpy(dtype=float), columns=[f"x{i}" for i in range(len(terms))])
        df["_time"], df["_event"] = time, event
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cph = CoxPHFitter().fit(df, "_time", "_event")
        except ConvergenceError:
            cph = CoxPHFitter(penalizer=1e-3).fit(df, "_time", "_event")
            notes.append("lifelines did not converge: refitted with penalizer=1e-3")
        beta = cph.params_.to_numpy()
        se = cph.standard_errors_.to_numpy()
        cov = cph.variance_matrix_.to_numpy()
        lp = X[terms].to_numpy(dtype=float) @ beta
    else:
        beta, se, cov, lp = np.zeros(0), np.zeros(0), np.zeros((0, 0)), np.zeros(len(time))
    reg = Regression("cox", terms, pd.Series(beta, index=terms, dtype=float), pd.Series(se, index=terms, dtype=float),
                     cov, n=len(time), events=int(event.sum()), dropped=dropped, notes=notes)
    return _with_breslow(reg, lp, time, event)


def _with_breslow(reg: Regression, lp, time, event) -> Regression:
    """Attach the Breslow baseline cumulative hazard (at the training mean linear predictor)."""
    lp, time, event = np.asarray(lp, float), np.asarray(time, float), np.asarray(event, int)
    reg.lp_center = float(lp.mean())
    w = np.exp(lp - reg.lp_center)
    times = np.unique(time[event == 1])
    at_risk = np.array([w[time >= t].sum() for t in times])
    deaths = np.array([np.sum((time == t) & (event == 1)) for t in times])
    reg.baseline_times, reg.baseline_cumhaz = times, np.cumsum(deaths / at_risk)
    return reg


def fixed_score_model(endpoint: str, name: str, score, y) -> Regression:
    """The LASSO itself as the model: linear predictor = the score (coefficient 1, no refit).
    binary: probability = expit(score) (the LASSO intercept is in the score); survival: Breslow baseline
    hazard of the training cohort for risks at a horizon."""
    score = np.asarray(score, dtype=float)
    if endpoint == "binary":
        index = ["(intercept)", name]
        reg = Regression("logistic", [name], pd.Series([0.0, 1.0], index=index), pd.Series(np.nan, index=index),
                         np.full((2, 2), np.nan), n=len(score), events=int(np.sum(y)))
        reg.notes.append("LASSO linear predictor, not refitted")
        return reg
    reg = Regression("cox", [name], pd.Series([1.0], index=[name]), pd.Series([np.nan], index=[name]),
                     np.full((1, 1), np.nan), n=len(score), events=int(y["event"].sum()))
    reg.notes.append("LASSO-Cox linear predictor, not refitted")
    return _with_breslow(reg, score, y["time"], y["event"])


def _lasso_table(lasso, endpoint: str) -> pd.DataFrame:
    """Coefficients of a LASSO model (per SD of the standardised, harmonised feature)."""
    coef = lasso.coefficients_
    terms = (["(intercept)"] if endpoint == "binary" else []) + list(coef.index)
    values = ([lasso.intercept_] if endpoint == "binary" else []) + list(coef.to_numpy())
    out = pd.DataFrame({"term": terms, "coef": values, "se": np.nan, "ratio": np.exp(values),
                        "ci_low": np.nan, "ci_high": np.nan, "p": np.nan,
                        "measure": "OR per SD" if endpoint == "binary" else "HR per SD"})
    out.loc[out["term"] == "(intercept)", ["ratio", "measure"]] = [np.nan, ""]
    return out


def _fit(kind, X, y) -> Regression:
    return fit_logistic(X, y) if kind == "binary" else fit_cox(X, y["time"], y["event"])


def fit_clinical_model(X: pd.DataFrame, terms_by_variable: dict[str, list[str]], y, endpoint: str,
                       settings: dict) -> tuple[Regression, list[str], pd.DataFrame]:
    """Univariable screening -> multivariable model -> retention rule -> final clinical model.

    X: encoded training design (ClinicalEncoder output); y: 0/1 array or survival structured array.
    Returns (final model, retained variables, table of every stage with ORs/HRs, CIs and P values)."""
    alpha, ci_level = settings["screening_alpha"], settings["ci_level"]
    keep_p = 1 - ci_level  # a term's Wald CI excludes 1 <=> its Wald P < 1 - level
    min_vars = max(1, int(settings["min_variables"]))
    rows = []

    def record(stage, model, variables):
        tab = model.table(ci_level)
        tab = tab[tab["term"] != "(intercept)"].copy()
        var_of = {t: v for v in variables for t in terms_by_variable[v]}
        tab.insert(0, "variable", tab["term"].map(var_of))
        tab["p_variable"] = tab["variable"].map({v: model.wald_p(terms_by_variable[v]) for v in variables})
        tab.insert(0, "stage", stage)
        tab["n"], tab["events"] = model.n, model.events
        tab["note"] = "; ".join(model.notes)
        rows.append(tab)
        return tab

    variables = [v for v in terms_by_variable if terms_by_variable[v]]
    uni_p = {}
    for v in variables:
        model = _fit(endpoint, X[terms_by_variable[v]], y)
        uni_p[v] = model.wald_p(terms_by_variable[v])
        record("univariable", model, [v])
    screened = [v for v in variables if uni_p[v] < alpha]
    if len(screened) < min_vars:
        screened = sorted(variables, key=lambda v: uni_p[v])[:min_vars]
    terms = [t for v in screened for t in terms_by_variable[v]]
    multi = _fit(endpoint, X[terms], y)
    record("multivariable", multi, screened)

    rule = settings["retain"]
    retained = list(screened)
    if rule == "ci_excludes_1":
        term_p = multi.table(ci_level).set_index("term")["p"]
        retained = [v for v in screened if any(term_p.get(t, 1.0) < keep_p for t in terms_by_variable[v])]
        if len(retained) < min_vars:
            retained = sorted(screened, key=lambda v: multi.wald_p(terms_by_variable[v]))[:min_vars]
    elif rule == "backward":
        model = multi
        while len(retained) > min_vars:
            pv = {v: model.wald_p(terms_by_variable[v]) for v in retained}
            worst = max(retained, key=lambda v: pv[v])
            if pv[worst] < keep_p:
                break
            retained.remove(worst)
            model = _fit(endpoint, X[[t for v in retained for t in terms_by_variable[v]]], y)
    final = _fit(endpoint, X[[t for v in retained for t in terms_by_variable[v]]], y)
    record("final", final, retained)
    table = pd.concat(rows, ignore_index=True)
    table["retained"] = table["variable"].isin(retained)
    return final, retained, table


# ================================================================================ fitted model
@dataclass
class ScoreStep:
    """Features of one set -> harmonised -> selection pipeline -> LASSO linear predictor."""

    name: str  # radscore | deepscore
    features: list[str]
    harmonizer: Harmonizer
    pipeline: object

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        H = self.harmonizer.transform(df, df["center"].to_numpy(), df)
        return self.pipeline.decision_function(H)


@dataclass
class GivenScore:
    """A score made outside this stage that joins the combined model as one predictor: the end-to-end CNN's output
    (seed 003's deep signature, `models.combined_scores: [cnn]`), read from the column `features[0]` of the table
    to score (the networks stage's score of each patient, per split and endpoint)."""

    name: str
    features: list[str]

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        return pd.to_numeric(df[self.features[0]], errors="coerce").to_numpy(dtype=float)


def network_score_column(endpoint: str) -> str:
    """The column of the statistics stage's table that holds the CNN's score for `endpoint`."""
    return f"cnn_score_{endpoint}"


@dataclass
class FittedModel:
    """One fitted prediction model, self-contained: `predict(df)` -> DataFrame(score, probability).

    df: one row per patient with `center`, the features in `features` and the clinical variables in
    `clinical_variables` (extra columns ignored). score: the model's linear predictor (log-odds / log
    relative hazard); probability: binary -> predicted probability, survival -> risk of the event by
    `horizon` (NaN without). Patients of a center the harmonizer has not seen are harmonised per its
    `external` mode (`unseen`: estimated from those patients' own features, in a copy of the model)."""

    endpoint: str
    name: str
    split: str
    regression: Regression
    encoder: ClinicalEncoder | None
    scores: list[ScoreStep]
    horizon: float | None
    versions: dict
    clinical_variables: list[str] = field(default_factory=list)

    @property
    def features(self) -> list[str]:
        return [f for s in self.scores for f in s.features]

    @property
    def predictors(self) -> list[str]:
        return list(self.regression.terms)

    def design(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True)
        if "center" not in df.columns:
            raise ValueError("the table to score needs a 'center' column (harmonisation is per center)")
        parts = [self.encoder.transform(df)] if self.encoder is not None else []
        steps = []
        for step in self.scores:
            if isinstance(step, GivenScore):
                steps.append(pd.Series(step(df), name=step.name))
                continue
            harm = step.harmonizer
            unseen = sorted(set(df["center"].astype(str)) - set(harm.modes_))
            if unseen:
                harm = copy.deepcopy(harm)
                rows = df["center"].astype(str).isin(unseen).to_numpy()
                harm.adapt(df.loc[rows], df.loc[rows, "center"].to_numpy(), df.loc[rows])
            steps.append(pd.Series(ScoreStep(step.name, step.features, harm, step.pipeline)(df), name=step.name))
        if not parts and not steps:
            return pd.DataFrame(index=df.index)
        return pd.concat(parts + [s.to_frame() for s in steps], axis=1)

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        X = self.design(df)
        out = pd.DataFrame({
            "score": self.regression.linear_predictor(X),
            "probability": self.regression.probability(X, self.horizon),
        })
        out.index = df.index
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(self, path)
        return path


def load_model(path: str | Path) -> FittedModel:
    """A saved FittedModel; warns when the library versions differ from those it was fitted with."""
    model = joblib.load(path)
    if not isinstance(model, FittedModel):
        raise ValueError(f"{path} does not hold a radstudy FittedModel (got {type(model).__name__})")
    now = library_versions()
    differ = {k: (v, now.get(k)) for k, v in model.versions.items() if k != "python" and now.get(k) != v}
    if differ:
        warnings.warn(f"{path}: fitted with other library versions {differ} (fitted, now)")
    return model


# ================================================================================= one split
def outcome(data: pd.DataFrame, endpoint: str, spec: dict):
    """(mask of patients with the outcome, y for them, columns outcome/time/event for the table)."""
    if endpoint == "binary":
        col = pd.to_numeric(data[spec["column"]], errors="coerce")
        ok = col.notna().to_numpy()
        return ok, col[ok].astype(int).to_numpy(), pd.DataFrame(
            {"outcome": col.to_numpy(), "time": np.nan, "event": np.nan})
    t = pd.to_numeric(data[spec["time"]], errors="coerce")
    e = pd.to_numeric(data[spec["event"]], errors="coerce")
    ok = (t.notna() & e.notna()).to_numpy()
    return ok, make_survival(t[ok].to_numpy(), e[ok].to_numpy()), pd.DataFrame(
        {"outcome": np.nan, "time": t.to_numpy(), "event": e.to_numpy()})


def _check_feature_columns(data: pd.DataFrame, feature_columns, settings: dict) -> list[str]:
    """The feature columns: given, or recorded by `assemble` (data.attrs); never a clinical or outcome column."""
    if feature_columns is None:
        feature_columns = data.attrs.get("feature_columns")
    if feature_columns is None:
        raise ValueError("fit_split needs the feature columns (feature_columns=..., or a table from `assemble`)")
    forbidden = {"patient", "center", "role", "status", *settings["models"]["clinical"]["variables"],
                 *settings["harmonization"]["covariates"],
                 *outcome_columns({"clinical": {"endpoints": settings["endpoints"]}})}
    bad = sorted(set(feature_columns) & forbidden)
    if bad:
        raise ValueError(f"feature columns include identifier, clinical or outcome column(s) {bad}")
    missing = [c for c in feature_columns if c not in data.columns]
    if missing:
        raise ValueError(f"data lacks {len(missing)} feature column(s), e.g. {missing[:5]}")
    return list(feature_columns)


def out_of_fold_score(step: ScoreStep, train: pd.DataFrame, y, endpoint: str, settings: dict, split: str,
                      robust: tuple | None = None, folds: int = 5) -> np.ndarray:
    """Each training patient's score from a selection pipeline fitted without them (models.combined_fit:
    out_of_fold): 5 folds stratified on the outcome (binary) or the event (survival), the step's selection and
    LASSO fitted again on the other folds of `train` with the same settings. The harmonizer is the step's, fitted on
    the whole training partition: it never sees the outcome."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(y if endpoint == "binary" else y["event"], dtype=int)
    folds = max(2, min(folds, int(np.bincount(labels).min())))
    H = step.harmonizer.transform(train[step.features], train["center"].to_numpy(), train)
    fs = next(k for k, v in SCORE_OF.items() if v == step.name)
    if not robust:  # no step needs the feature names: arrays spare scikit-learn's per-column DataFrame checks
        H = H.to_numpy(dtype=float)
    rows = H.iloc if isinstance(H, pd.DataFrame) else H
    out = np.empty(len(train))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=derive_seed(settings["seed"], split, endpoint, fs, "oof"))
    for k, (fit_rows, held_out) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels)):
        pipe = build_selector(settings["selection"], endpoint,
                              random_state=derive_seed(settings["seed"], split, endpoint, fs, "oof", k),
                              robust_keep=robust[0] if robust else None,
                              robust_evaluated=robust[1] if robust else None)
        if not robust:
            pipe.set_output(transform="default")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No features were selected")
            pipe.fit(rows[fit_rows], y[fit_rows])
        out[held_out] = pipe.decision_function(rows[held_out])
    return out


def fit_split(data: pd.DataFrame, cohort: pd.Series, settings: dict, split: str = "split",
              robust: tuple | None = None, feature_columns: list[str] | None = None) -> dict:
    """Fit every model of every endpoint on the training cohort of one split; score all its patients.

    data: one row per patient (patient, center, features, clinical variables, outcome columns);
    cohort: training | validation | test per row of `data` (rows without a cohort are not used).
    settings: `statistics_settings(config)`; feature_columns: the feature columns of `data` (None: those
    recorded by `assemble` in data.attrs["feature_columns"]). Returns dict with predictions, models {(endpoint, model):
    FittedModel}, tables (selected, selection_summary, coefficients, clinical, harmonization)."""
    feature_columns = _check_feature_columns(data, feature_columns, settings)
    data = data.reset_index(drop=True)
    cohort = pd.Series(np.asarray(cohort, dtype=object)).reset_index(drop=True)
    use = cohort.notna().to_numpy()
    data, cohort = data[use].reset_index(drop=True), cohort[use].reset_index(drop=True)
    train = (cohort == "training").to_numpy()
    if not train.any():
        raise ValueError(f"split {split}: no training patients")
    h, m = settings["harmonization"], settings["models"]
    seed, versions = settings["seed"], library_versions()
    centers = data["center"].astype(str).to_numpy()
    sets = {k: v for k, v in feature_sets(feature_columns).items() if v}
    if "deep" not in m["fit"] and "deep" in sets:
        sets.pop("deep")
    forbidden = outcome_columns({"clinical": {"endpoints": settings["endpoints"]}})

    harmonizers, harm_rows = {}, []
    for fs, cols in sets.items():
        method = h["method"] if fs in h["feature_sets"] else "none"
        harm = Harmonizer(method=method, external=h["external"], covariates=list(h["covariates"]),
                          forbidden=forbidden, combat=h)
        harm.fit(data.loc[train, cols], centers[train], data.loc[train])
        others = ~train & ~np.isin(centers, harm.training_centers_)
        harm.adapt(data.loc[others, cols], centers[others], data.loc[others])
        harmonizers[fs] = harm
        for c, mode in harm.modes_.items():
            harm_rows.append({"split": split, "feature_set": fs, "center": c, "mode": mode,
                              "fitted_on": "training" if c in harm.training_centers_ else "own features",
                              "n_patients": int(harm.n_patients_.get(c, 0))})

    preds, models, selected, funnel, coefs, clinical_tables = [], {}, [], [], [], []
    cm = m["clinical"]
    for endpoint, spec in settings["endpoints"].items():
        has_y, y, outcome_cols = outcome(data, endpoint, spec)
        fit_rows = train & has_y
        y_train = y[train[has_y]]
        if fit_rows.sum() < 10:
            raise ValueError(f"split {split}, {endpoint}: only {fit_rows.sum()} training patients with the outcome")
        Dtrain = data.loc[fit_rows].reset_index(drop=True)
        horizon = float(m["survival"]["horizon"]) if endpoint == "survival" else None

        encoder = ClinicalEncoder(cm["variables"], cm["categorical"], cm["ordinal"], cm["log_transform"]).fit(Dtrain)
        Xc = encoder.transform(Dtrain)
        clinical_reg, retained, ctable = fit_clinical_model(Xc, encoder.terms_, y_train, endpoint, cm)
        clinical_tables.append(ctable.assign(split=split, endpoint=endpoint))
        clinical_encoder = encoder.subset(retained)

        steps = {}
        for fs, cols in sets.items():
            if fs not in m["fit"] and not ("combined" in m["fit"] and fs in m["combined_scores"]):
                continue
            pipe = build_selector(settings["selection"], endpoint, random_state=derive_seed(seed, split, endpoint, fs),
                                  robust_keep=robust[0] if robust else None,
                                  robust_evaluated=robust[1] if robust else None)
            H = harmonizers[fs].transform(Dtrain[cols], Dtrain["center"].to_numpy(), Dtrain)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No features were selected")
                pipe.fit(H, y_train)
            steps[fs] = ScoreStep(SCORE_OF[fs], cols, harmonizers[fs], pipe)
            lasso = pipe[-1]
            coef = lasso.coefficients_
            selected.append(pd.DataFrame({"split": split, "endpoint": endpoint, "model": fs,
                                          "feature": coef.index, "coefficient": coef.to_numpy(),
                                          "penalty": lasso.penalty_, "rule": lasso.rule}))
            funnel.append(selection_summary(pipe).assign(split=split, endpoint=endpoint, model=fs))

        def make(name, terms_encoder, score_steps):
            clin_vars = list(terms_encoder.variables) if terms_encoder is not None else []
            clin_vars += [c for c in h["covariates"] if c not in clin_vars and score_steps]
            model = FittedModel(endpoint, name, split, None, terms_encoder, list(score_steps), horizon, versions,
                                clinical_variables=clin_vars)
            # the training design is built by the very code that scores new patients
            if name == "clinical":
                model.regression = clinical_reg
            elif name in SCORE_OF:  # radiomic / deep: the LASSO itself
                score = SCORE_OF[name]
                model.regression = fixed_score_model(endpoint, score, model.design(Dtrain)[score], y_train)
            else:
                design = model.design(Dtrain)
                if m["combined_fit"] == "out_of_fold":
                    for step in score_steps:
                        if isinstance(step, ScoreStep):
                            design[step.name] = out_of_fold_score(step, Dtrain, y_train, endpoint, settings, split,
                                                                  robust)
                model.regression = _fit(endpoint, design, y_train)
            return model

        wanted = [name for name in m["fit"] if name == "clinical" or name == "combined" or name in steps]
        for name in wanted:
            if name == "clinical":
                model = make("clinical", clinical_encoder, [])
            elif name == "combined":
                model = make("combined", clinical_encoder,
                             [steps[fs] for fs in FEATURE_SETS if fs in steps and fs in m["combined_scores"]]
                             + _network_steps(data, train, endpoint, m, split))
            else:
                model = make(name, None, [steps[name]])
            models[(endpoint, name)] = model
            tab = model.regression.table(cm["ci_level"]) if name not in SCORE_OF else _lasso_table(
                steps[name].pipeline[-1], endpoint)
            reg = model.regression
            tab["note"] = "; ".join(reg.notes + [f"dropped constant {d}" for d in reg.dropped])
            coefs.append(tab.assign(split=split, endpoint=endpoint, model=name, n=model.regression.n,
                                    events=model.regression.events))
            scored = model.predict(data)
            preds.append(pd.concat([
                pd.DataFrame({"patient": data["patient"].to_numpy(), "center": centers, "split": split,
                              "cohort": cohort.to_numpy(), "endpoint": endpoint, "model": name}),
                scored.reset_index(drop=True), outcome_cols.reset_index(drop=True)], axis=1))

    def cat(frames, columns=None):
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    return {
        "predictions": cat(preds),
        "models": models,
        "selected": cat(selected, ["split", "endpoint", "model", "feature", "coefficient", "penalty", "rule"]),
        "selection_summary": cat(funnel),
        "coefficients": cat(coefs),
        "clinical": cat(clinical_tables),
        "harmonization": pd.DataFrame(harm_rows),
        "harmonizers": harmonizers,
    }


# ================================================================================ whole study
def assemble(features: pd.DataFrame, clinical: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """One row per included patient: patient, center, role, features, clinical columns."""
    pts = patients
    if "status" in pts.columns:
        pts = pts[pts["status"] == "included"]
    pts = pts[["patient", "center", "role"]].astype({"patient": str, "center": str})
    feats = features.astype({"patient": str}).drop(columns=["excluded", "exclusion_reason"], errors="ignore")
    non_numeric = [c for c in feats.columns if c not in ("patient", "center")
                   and not pd.api.types.is_numeric_dtype(feats[c])]
    if non_numeric:
        warnings.warn(f"{len(non_numeric)} non-numeric feature column(s) ignored, e.g. {non_numeric[:3]}")
        feats = feats.drop(columns=non_numeric)
    no_features = sorted(set(pts["patient"]) - set(feats["patient"]))
    if no_features:
        warnings.warn(f"{len(no_features)} included patient(s) have no feature row and are left out, "
                      f"e.g. {no_features[:5]}")
    data = pts.merge(feats.drop(columns=["center"], errors="ignore"), on="patient", how="inner")
    clin = clinical.astype({"patient": str}).drop(columns=["center"], errors="ignore")
    clash = sorted(set(clin.columns) & set(data.columns) - {"patient"})
    if clash:
        raise ValueError(f"column(s) {clash} are in both the feature and the clinical table")
    out = data.merge(clin, on="patient", how="left")
    out.attrs["feature_columns"] = [c for c in feats.columns if c not in ("patient", "center")]
    return out


def _stratification_column(settings: dict) -> str | None:
    endpoints = settings["endpoints"]
    want = settings["design"]["stratify_endpoint"]
    for kind in (want, *ENDPOINTS):
        if kind in endpoints:
            return endpoints[kind]["column"] if kind == "binary" else endpoints[kind]["event"]
    return None


def study_cohorts(data: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The cohort of every patient of `data` (`assemble`'s table) in every split of the design: the one assignment
    that the statistics stage and the end-to-end networks share (same patients, seed and stratification)."""
    strat = _stratification_column(settings)
    return assign_cohorts(data[["patient", "center", "role"] + ([strat] if strat else [])],
                          settings["design"], settings["seed"], outcome=strat)


def _network_steps(data: pd.DataFrame, train: np.ndarray, endpoint: str, m: dict, split: str) -> list[GivenScore]:
    """The CNN's score as a predictor of the combined model, where models.combined_scores names cnn and the
    networks stage scored this split (`with_network_scores`); every training patient must have one."""
    column = network_score_column(endpoint)
    if "cnn" not in m["combined_scores"] or column not in data.columns:
        return []
    lacking = data.loc[train & data[column].isna().to_numpy(), "patient"].tolist()
    if lacking:
        raise ValueError(f"split {split}, {endpoint}: models.combined_scores names cnn but training patient(s) "
                         f"{lacking[:5]} have no network score (no network input: results/networks/inputs/)")
    return [GivenScore("cnn", [column])]


def with_network_scores(data: pd.DataFrame, networks: pd.DataFrame, split: str) -> pd.DataFrame:
    """`data` with the image-only CNN's score of each patient in `split`, one column per endpoint."""
    data = data.copy()
    rows = networks[(networks["split"] == split) & (networks["model"] == "cnn")]
    for endpoint, group in rows.groupby("endpoint"):
        data[network_score_column(endpoint)] = data["patient"].map(group.set_index("patient")["score"])
    return data


def network_predictions(table: pd.DataFrame, cohorts: pd.DataFrame) -> pd.DataFrame:
    """The networks' predictions, refused unless every (split, patient) has the cohort this stage assigned: a
    network trained with another assignment could have seen validation or test patients."""
    merged = table.merge(cohorts[["split", "patient", "cohort"]], on=["split", "patient"], how="left",
                         suffixes=("", "_here"))
    differ = merged[merged["cohort"].astype(str) != merged["cohort_here"].astype(str)]
    if len(differ):
        first = differ.iloc[0]
        raise ValueError(f"the networks' predictions put {len(differ)} patient-split(s) in another cohort than the "
                         f"statistics stage, e.g. {first['patient']} in split {first['split']}: {first['cohort']} vs "
                         f"{first['cohort_here']}; rerun the networks stage on the same features and patients")
    return table


def _fit_split_job(data, cohort, settings, split, robust, feature_columns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return split, fit_split(data, cohort, settings, split, robust, feature_columns)


def split_robustness(features: pd.DataFrame, perturbed: pd.DataFrame, training: Iterable[str],
                     icc_min: float) -> tuple[tuple[list[str], list[str]], pd.DataFrame]:
    """ICC(3,1) per radiomic feature over the training patients' original and perturbed-mask values (the
    features stage's perturbed.parquet); ((robust, evaluated), table feature/icc/robust). Only training
    patients enter: the robust list is a fitted selection step like any other."""
    training = set(map(str, training))
    not_features = {*ID_COLUMNS, *FLAG_COLUMNS, "perturbation"}
    keep = ["patient"] + [c for c in perturbed.columns if c not in not_features and c in features.columns]
    tables = {"original": features.loc[features["patient"].astype(str).isin(training), keep]}
    pert = perturbed[perturbed["patient"].astype(str).isin(training)]
    tables.update({str(how): rows[keep] for how, rows in pert.groupby("perturbation", sort=True)})
    icc = icc_table(tables)
    robust = robust_features(icc, icc_min)
    table = pd.DataFrame({"feature": icc.index, "icc": icc.to_numpy()})
    table["robust"] = table["feature"].isin(set(robust))
    return (robust, list(icc.index)), table


STATISTICS_TABLES = ("cohorts", "predictions", "selected_features", "selection_summary", "coefficients",
                     "clinical_model", "harmonization", "robustness", "versions")
_TABLE_COLUMNS = {
    "robustness": ["split", "feature", "icc", "robust"],
    "predictions": ["patient", "center", "split", "cohort", "endpoint", "model", "score", "probability", "outcome",
                    "time", "event"],
    "selected_features": ["split", "endpoint", "model", "feature", "coefficient", "penalty", "rule"],
    "selection_summary": ["split", "endpoint", "model", "step", "n_features"],
    "coefficients": ["split", "endpoint", "model", "term", "coef", "se", "measure", "ratio", "ci_low", "ci_high", "p",
                     "n", "events", "note"],
    "clinical_model": ["split", "endpoint", "stage", "variable", "term", "coef", "se", "measure", "ratio", "ci_low",
                       "ci_high", "p", "p_variable", "retained", "n", "events", "note"],
    "harmonization": ["split", "feature_set", "center", "mode", "fitted_on", "n_patients"],
}


def statistics_outputs(out_dir: str | Path, config: dict) -> dict:
    """The default layout of `run_statistics`'s outputs under out_dir: {table: out_dir/table.tsv,
    "models": {(endpoint, model): out_dir/endpoint/model.joblib} (every model fitted),
    "split_models": out_dir/splits with models.save_split_models, else None}."""
    out_dir = Path(out_dir)
    outputs: dict = {name: out_dir / f"{name}.tsv" for name in STATISTICS_TABLES}
    outputs["models"] = None  # every fitted model, in out_dir/{endpoint}/{model}.joblib
    outputs["split_models"] = out_dir / "splits" if statistics_settings(config)["models"]["save_split_models"] else None
    return outputs


def run_statistics(features, clinical, patients, config: dict, out_dir: str | Path | None = None,
                   n_jobs: int | None = None, perturbed=None, outputs: dict | None = None,
                   networks=None, only_primary: bool = False) -> dict[str, Path]:
    """The statistics stage: cohorts of every split, every model of every endpoint, and their tables.

    features / clinical / patients: DataFrames or paths (features.parquet, clinical.tsv, patients.tsv).
    config: the study config (sections design, harmonization, selection, models, clinical, study).
    outputs: where each output goes: {table: path} for every name in STATISTICS_TABLES (cohorts, predictions,
    selected_features, selection_summary, coefficients, clinical_model, harmonization, robustness (the ICC
    table; header only without perturbed features), versions), "models": {(endpoint, model): path} of the primary
    split's models (holdout, or `final` = all development patients), exactly `fitted_models(config)`, and
    "split_models": a folder for every split's models ({split}/{endpoint}/{model}.joblib) or None; only with
    models.save_split_models. Default: `statistics_outputs(out_dir, config)`, where "models" None saves every
    fitted model as out_dir/{endpoint}/{model}.joblib.
    networks: the end-to-end networks' predictions (radstudy.networks.stage; same cohorts, checked), joined to
    the predictions table.
    only_primary: fit the primary split only (the cohorts table still lists every split): what a caller that reads
    only the delivered models' predictions needs (bench/validity_study.py; with a k-fold design 1 split of 6).
    Returns {name: path} (models as model_{endpoint}_{model})."""
    settings = statistics_settings(config)
    if outputs is None:
        if out_dir is None:
            raise ValueError("run_statistics needs out_dir or outputs")
        outputs = statistics_outputs(out_dir, config)
    missing = [name for name in STATISTICS_TABLES if not outputs.get(name)]
    if missing:
        raise ValueError(f"run_statistics: no path given for {missing}")
    features = read_table(features)
    data = assemble(features, read_table(clinical), read_table(patients))
    feature_columns = data.attrs["feature_columns"]
    cohorts = study_cohorts(data, settings)
    robust = None
    rob = settings["selection"]["robustness"]
    if rob.get("file"):
        robust = read_robust_features(rob["file"], rob["icc_min"])
    perturbed = read_table(perturbed) if perturbed is not None else None
    networks = network_predictions(read_table(networks), cohorts) if networks is not None else None
    splits = [primary_split(cohorts)] if only_primary else split_names(cohorts)
    jobs, icc_tables = [], []
    for split in splits:
        cmap = cohorts[cohorts["split"] == split].set_index("patient")["cohort"]
        split_robust = robust
        if perturbed is not None and robust is None:  # ICC on this split's training patients only
            training = cmap.index[cmap == "training"]
            split_robust, icc = split_robustness(features, perturbed, training, rob["icc_min"])
            icc_tables.append(icc.assign(split=split))
            log.info("split %s: %d of %d radiomic features robust (ICC >= %s on %d training patients)", split,
                     len(split_robust[0]), len(split_robust[1]), rob["icc_min"], len(training))
        split_data = data if networks is None else with_network_scores(data, networks, split)
        jobs.append((split_data, data["patient"].map(cmap), settings, split, split_robust, feature_columns))
    n_jobs = n_jobs if n_jobs is not None else settings["models"]["n_jobs"]
    if n_jobs == 1 or len(jobs) == 1:
        results = [_fit_split_job(*job) for job in jobs]
    else:
        results = joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(_fit_split_job)(*job) for job in jobs)
    results = dict(results)

    primary = primary_split(cohorts)
    fitted = results[primary]["models"]
    models = outputs.get("models")
    if models is None:
        models = {key: Path(outputs["predictions"]).parent / key[0] / f"{key[1]}.joblib" for key in fitted}
    models = {tuple(key): Path(path) for key, path in models.items()}
    not_fitted = sorted(set(models) - set(fitted))
    if not_fitted:
        raise ValueError(f"model(s) {not_fitted} were to be saved but were not fitted (fitted: {sorted(fitted)}): "
                         "are the models.fit and features.deep settings those the feature table was built with?")
    paths = {}

    def write(name, frame):
        columns = _TABLE_COLUMNS.get(name)
        frame = frame if columns is None else frame.reindex(columns=columns)
        path = Path(outputs[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, sep="\t", index=False)
        paths[name] = path

    def gather(key):
        frames = [results[s][key] for s in splits if len(results[s][key])]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    write("cohorts", cohorts)
    write("robustness", pd.concat(icc_tables, ignore_index=True) if icc_tables else pd.DataFrame())
    predictions = gather("predictions")
    if networks is not None:
        predictions = pd.concat([predictions, networks], ignore_index=True)
    write("predictions", predictions)
    write("selected_features", gather("selected"))
    write("selection_summary", gather("selection_summary"))
    write("coefficients", gather("coefficients"))
    write("clinical_model", gather("clinical"))
    write("harmonization", gather("harmonization"))
    write("versions", pd.DataFrame(sorted(library_versions().items()), columns=["package", "version"]))

    for (endpoint, name), path in sorted(models.items()):
        paths[f"model_{endpoint}_{name}"] = fitted[(endpoint, name)].save(path)
    left_out = sorted(set(fitted) - set(models))
    if left_out:
        log.warning("fitted but not saved (not among the declared models): %s", left_out)
    if settings["models"]["save_split_models"]:
        split_dir = outputs.get("split_models")
        if not split_dir:
            raise ValueError("models.save_split_models: run_statistics needs outputs['split_models'] (a folder)")
        for split in splits:
            for (endpoint, name), model in results[split]["models"].items():
                model.save(Path(split_dir) / split / endpoint / f"{name}.joblib")
        paths["split_models"] = Path(split_dir)
    return paths
