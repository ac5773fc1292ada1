"""The one Cox fitter (Efron ties), vectorised over columns."""

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from radstudy.survival import univariable_cox


def test_univariable_cox_matches_lifelines_with_ties():
    rng = np.random.default_rng(3)
    n = 150
    X = rng.normal(size=(n, 4)) * [1, 10, 0.1, 1]
    X[:, 3] = rng.integers(0, 2, n)  # a binary covariate
    t = np.round(rng.exponential(10, n) * np.exp(-0.6 * X[:, 0]))  # rounding makes tied times
    t = np.maximum(t, 1)
    e = rng.random(n) < 0.7
    beta, se, z, p = univariable_cox(X, t, e)
    for j in range(X.shape[1]):
        ref = CoxPHFitter().fit(pd.DataFrame({"x": X[:, j], "T": t, "E": e.astype(int)}), "T", "E",
                                fit_options={"precision": 1e-12}).summary.loc["x"]
        assert beta[j] == pytest.approx(ref["coef"], rel=1e-6, abs=1e-9)
        assert se[j] == pytest.approx(ref["se(coef)"], rel=1e-6)
        assert p[j] == pytest.approx(ref["p"], rel=1e-6, abs=1e-12)
    const = univariable_cox(np.ones((n, 1)), t, e)
    assert const[3][0] == 1.0
