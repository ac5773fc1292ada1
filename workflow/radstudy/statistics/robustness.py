"""ICC(3,1) of features across segmentation perturbations: numpy / pandas only, so that the statistics stage
(which computes the ICC on each split's training patients) needs none of the imaging libraries."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

ID_COLUMNS = ("patient", "center")
FLAG_COLUMNS = ("excluded", "exclusion_reason")


def icc_3_1(matrix) -> float:
    """ICC(3,1) (Shrout & Fleiss 1979: two-way mixed, consistency, single rater) of a subjects x raters matrix.
    Subjects with a missing value are dropped; NaN when fewer than 2 subjects remain or the design is degenerate."""
    x = np.asarray(matrix, float)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError("icc_3_1 needs a subjects x raters matrix with at least 2 raters")
    x = x[~np.isnan(x).any(axis=1)]
    n, k = x.shape
    if n < 2:
        return float("nan")
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((x - grand) ** 2).sum()
    ss_err = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems
    scale = max(abs(bms), abs(ems), 1e-300)
    if not np.isfinite(denom) or abs(denom) <= 1e-12 * scale or (bms == 0 and ems <= 1e-12 * scale):
        return float("nan")
    return float((bms - ems) / denom)


def icc_table(tables: Mapping[str, pd.DataFrame]) -> pd.Series:
    """ICC(3,1) per feature from study tables of the same patients under different masks (raters), e.g.
    {"original": t0, "erode": t1, "dilate": t2}. Patients are matched on the patient column."""
    if len(tables) < 2:
        raise ValueError("icc_table needs at least two tables (original and a perturbation)")
    names = list(tables)
    indexed = {k: t.set_index("patient") for k, t in tables.items()}
    patients = sorted(set.intersection(*(set(t.index) for t in indexed.values())))
    features = [c for c in indexed[names[0]].columns if c not in ID_COLUMNS + FLAG_COLUMNS]
    out = {}
    for f in features:
        mat = np.column_stack(
            [
                indexed[k].loc[patients, f].to_numpy(float) if f in indexed[k] else np.full(len(patients), np.nan)
                for k in names
            ]
        )
        out[f] = icc_3_1(mat)
    return pd.Series(out, name="icc", dtype="float64")


def robust_features(icc: pd.Series | pd.DataFrame, threshold: float = 0.75) -> list[str]:
    """Features whose ICC is at least `threshold` (NaN ICCs are not robust), in the table's order."""
    if isinstance(icc, pd.DataFrame):
        if "icc" in icc:
            icc = icc.set_index("feature")["icc"] if "feature" in icc else icc["icc"]
        else:
            raise ValueError("ICC table needs an 'icc' column")
    icc = pd.to_numeric(icc, errors="coerce")
    return [str(f) for f, v in icc.items() if np.isfinite(v) and v >= threshold]
