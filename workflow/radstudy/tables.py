"""The one table reader: parquet, CSV or TSV (by suffix), 'NA' and empty cells as missing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_table(table, *, id_columns: tuple[str, ...] = ("patient", "center")) -> pd.DataFrame:
    """A copy of a DataFrame, or a .parquet / .csv / .tsv (.txt) file; `id_columns` are read as strings."""
    if isinstance(table, pd.DataFrame):
        return table.copy()
    path = Path(table)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    return pd.read_csv(path, sep=sep, dtype={c: str for c in id_columns}, keep_default_na=True)
