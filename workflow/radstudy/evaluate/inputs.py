"""The input contract of the evaluation: a predictions table, checked and completed, with every patient it leaves
out counted.

One row per patient x model (x split x endpoint); columns (`PREDICTION_COLUMNS`):

    patient, cohort, model          text, required, never empty
    score                           number, required: a linear predictor or any marker, higher = more risk
    probability                     number in [0, 1], optional (binary): the predicted probability
    outcome                         0/1 (binary endpoint)
    time, event                     time > 0 in the declared time unit, event 0/1 (survival endpoint)
    center, split, endpoint         optional: defaults 'all', 0, and the endpoint(s) whose columns are present

Errors (`PredictionsError`, naming the column, the first offending rows with their patient, and the values): a
value that is not a number (a comma decimal mark gets a hint: fix the file or pass decimal=','), a non-finite
number, an outcome or event other than 0/1, a time <= 0, a probability outside [0, 1], an empty patient, cohort or
model, two rows for one patient x model x split x endpoint, a patient whose cohort or outcome differs between rows.

Exclusions: a row with an empty score, outcome (binary), time or event (survival), or, for a model that gives
probabilities, an empty probability, is kept out of that model's metrics and counted in the `excluded` column
(the reason; "" for rows that are evaluated): `exclusion_counts` tables them per endpoint x split x cohort x model.
A binary model without any probability is taken to give its score on the log-odds scale: probability =
expit(score), and its calibration is fitted on the score itself (`probability_from_score`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.special import expit

from radstudy.tables import read_table

log = logging.getLogger("radstudy.evaluate.inputs")

PREDICTION_COLUMNS = ["patient", "center", "cohort", "split", "endpoint", "model", "score", "probability",
                      "outcome", "time", "event"]
REQUIRED_COLUMNS = ["patient", "cohort", "model", "score"]
NUMERIC_COLUMNS = ["score", "probability", "outcome", "time", "event"]
DECIMAL_MARKS = (".", ",")
KEYS = ["patient", "model", "split", "endpoint"]
SHOWN = 5  # offending rows named in a message
ROW = "_row"  # the 1-based data row of the table, kept while checking to name rows in messages

MISSING_OUTCOME = "missing outcome"
MISSING_TIME_EVENT = "missing time or event"
MISSING_SCORE = "missing score"
MISSING_PROBABILITY = "missing probability"

_COMMA_NUMBER = r"[+-]?\d*,\d+([eE][+-]?\d+)?"


class PredictionsError(ValueError):
    """The predictions table breaks the input contract; the message names the column, the rows' patients and the
    values, and how to fix them."""


def read_predictions(path) -> pd.DataFrame:
    """The predictions table of a file (radstudy.tables.read_table; patient and center read as text). A row with
    more fields than the header (a comma decimal mark in a comma-separated file) is an error, not a shifted table."""
    try:
        df = read_table(path)
    except pd.errors.ParserError as exc:
        raise PredictionsError(f"{path}: cannot be read as a table ({exc}); a comma decimal mark in a comma-separated "
                               "file splits numbers: save it as TSV or with '.' decimals") from exc
    if not isinstance(df.index, pd.RangeIndex):
        raise PredictionsError(f"{path}: the data rows have more fields than the header: a comma decimal mark in a "
                               "comma-separated file ('0,73') splits each number in two. Save the file as TSV (then "
                               "pass --decimal ,) or with '.' as decimal mark")
    return df


def _rows(df: pd.DataFrame, mask: pd.Series, column: str) -> str:
    """"row 3 (patient P2): '0,7'; ..." for the first offending rows (row: the 1-based data row of the table)."""
    hits = np.flatnonzero(mask.to_numpy(dtype=bool))
    parts = []
    for i in hits[:SHOWN]:
        value = df[column].iloc[i]
        shown = repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"row {df[ROW].iloc[i]} (patient {df['patient'].iloc[i]}): {shown}")
    more = f" and {len(hits) - SHOWN} more" if len(hits) > SHOWN else ""
    return "; ".join(parts) + more


def _numeric(df: pd.DataFrame, column: str, decimal: str) -> pd.Series:
    """A column as floats; empty cells NaN. Text that is not a number is an error naming the rows and values."""
    raw = df[column]
    if pd.api.types.is_bool_dtype(raw) or pd.api.types.is_numeric_dtype(raw):
        values = raw.astype(float)
    else:
        text = raw.astype("string").str.strip()
        empty = text.isna() | (text == "")
        if decimal == ",":
            dotted = text.str.contains(".", regex=False).fillna(False)
            if dotted.any():
                raise PredictionsError(f"column '{column}' holds a '.' although the decimal mark is ',': "
                                       f"{_rows(df, dotted, column)}. Use one decimal mark and no thousands "
                                       "separator")
            text = text.str.replace(",", ".", regex=False)
        values = pd.to_numeric(text.where(~empty), errors="coerce").astype(float)
        bad = values.isna() & ~empty
        if bad.any():
            comma = bad & text.fillna("").str.fullmatch(_COMMA_NUMBER)
            if decimal == "." and comma.any():
                raise PredictionsError(f"column '{column}' uses a comma as decimal mark: {_rows(df, comma, column)}. "
                                       "Save the file with '.' as decimal mark, or run `radstudy evaluate` with "
                                       "--decimal , (evaluate(..., decimal=',')); a comma that separates thousands "
                                       "must be removed")
            raise PredictionsError(f"column '{column}' must hold numbers; {int(bad.sum())} value(s) are not: "
                                   f"{_rows(df, bad, column)}. Leave a missing value empty (or NA)")
    infinite = values.isin([np.inf, -np.inf])
    if infinite.any():
        raise PredictionsError(f"column '{column}' holds non-finite values: {_rows(df, infinite, column)}")
    return values


def _check(df: pd.DataFrame, bad: pd.Series, message: str, column: str) -> None:
    if bad.any():
        raise PredictionsError(f"{message}: {_rows(df, bad, column)}")


def _infer_endpoint(df: pd.DataFrame) -> pd.DataFrame:
    """Without an endpoint column: binary where an outcome column has values, survival where time has values."""
    parts = []
    if df["outcome"].notna().any():
        parts.append(df.assign(endpoint="binary"))
    if df["time"].notna().any() or df["event"].notna().any():
        parts.append(df.assign(endpoint="survival"))
    if not parts:
        raise PredictionsError("predictions need an 'outcome' column (binary endpoint) or 'time' and 'event' columns "
                               "(survival endpoint) with values")
    return pd.concat(parts, ignore_index=True)


def _check_patient_level(df: pd.DataFrame) -> pd.DataFrame:
    """Cohort, outcome, time and event belong to the patient (per split and endpoint): the same in every model's
    row. A value given in one row fills the rows where it is empty."""
    group = df.groupby(["patient", "split", "endpoint"], sort=False)
    for column in ("cohort", "outcome", "time", "event"):
        differs = group[column].transform("nunique") > 1
        _check(df, differs, f"column '{column}' differs between the rows of one patient (split, endpoint)", column)
        df[column] = group[column].transform("first") if column != "cohort" else df[column]
    return df


def _exclusion_reason(df: pd.DataFrame) -> pd.Series:
    binary = df["endpoint"] == "binary"
    given = df.groupby(["model", "split", "endpoint"], sort=False)["probability"].transform(lambda p: p.notna().any())
    reasons = [(binary & df["outcome"].isna(), MISSING_OUTCOME),
               (~binary & (df["time"].isna() | df["event"].isna()), MISSING_TIME_EVENT),
               (df["score"].isna(), MISSING_SCORE),
               (binary & given & df["probability"].isna(), MISSING_PROBABILITY)]
    return pd.Series(np.select([m.to_numpy() for m, _ in reasons], [r for _, r in reasons], default=""),
                     index=df.index)


def normalise_predictions(predictions: pd.DataFrame, decimal: str = ".") -> pd.DataFrame:
    """The checked predictions (see the module docstring): the documented columns in order, then the others, plus
    `excluded` (reason or "") and `probability_from_score`. Raises PredictionsError on a break of the contract."""
    if decimal not in DECIMAL_MARKS:
        raise PredictionsError(f"decimal mark must be '.' or ','; got {decimal!r}")
    df = predictions.copy().reset_index(drop=True)
    df[ROW] = np.arange(1, len(df) + 1)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PredictionsError(f"predictions lack required column(s) {missing}; the table has {list(df.columns)}")
    for col, default in (("center", "all"), ("split", 0), ("probability", np.nan), ("outcome", np.nan),
                         ("time", np.nan), ("event", np.nan)):
        if col not in df.columns:
            df[col] = default
    for col in ("patient", "cohort", "model"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        _check(df.assign(patient=df["patient"].fillna("?")), empty, f"column '{col}' has empty cells", col)
        df[col] = df[col].astype(str)
    for col in NUMERIC_COLUMNS:
        df[col] = _numeric(df, col, decimal)
    if "endpoint" not in df.columns:
        df = _infer_endpoint(df)
    df["endpoint"] = df["endpoint"].astype(str)
    _check(df, ~df["endpoint"].isin(["binary", "survival"]), "column 'endpoint' must be binary or survival",
           "endpoint")
    binary, survival = df["endpoint"] == "binary", df["endpoint"] == "survival"
    _check(df, binary & df["outcome"].notna() & ~df["outcome"].isin([0, 1]), "column 'outcome' must be 0 or 1",
           "outcome")
    _check(df, survival & df["event"].notna() & ~df["event"].isin([0, 1]), "column 'event' must be 0 or 1", "event")
    _check(df, survival & (df["time"] <= 0), "column 'time' must be > 0 (follow-up from the time origin)", "time")
    _check(df, binary & ~df["probability"].between(0, 1) & df["probability"].notna(),
           "column 'probability' must lie in [0, 1] (a score on another scale belongs in 'score')", "probability")
    dup = df.duplicated(KEYS)
    _check(df, dup, "several rows for one patient x model x split x endpoint", "model")
    df = _check_patient_level(df)
    df["excluded"] = _exclusion_reason(df)
    no_prob = binary & df.groupby(["model", "split", "endpoint"], sort=False)["probability"].transform(
        lambda p: p.isna().all())
    df["probability_from_score"] = no_prob
    if no_prob.any():
        log.info("binary model(s) %s give no probability: the score is taken as log-odds (probability = "
                 "expit(score))", sorted(df.loc[no_prob, "model"].unique()))
        df.loc[no_prob, "probability"] = expit(df.loc[no_prob, "score"])
    for reason, rows in df[df["excluded"] != ""].groupby("excluded", sort=False):
        log.warning("%d prediction(s) excluded (%s; patients %s): counted in exclusions.csv", len(rows), reason,
                    ", ".join(rows["patient"].unique()[:SHOWN]))
    extra = [c for c in df.columns if c not in PREDICTION_COLUMNS and c != ROW]
    return df[PREDICTION_COLUMNS + extra]


def exclusion_counts(preds: pd.DataFrame) -> pd.DataFrame:
    """Rows left out per endpoint x split x cohort x model and reason, with the rows of that cohort and model."""
    keys = ["endpoint", "split", "cohort", "model"]
    total = preds.groupby(keys, sort=False).size().rename("rows")
    out = preds[preds["excluded"] != ""].groupby(keys + ["excluded"], sort=False).size().rename("n_excluded")
    if out.empty:
        return pd.DataFrame(columns=keys + ["reason", "n_excluded", "rows"])
    out = out.reset_index().rename(columns={"excluded": "reason"})
    return out.merge(total.reset_index(), on=keys, how="left")
