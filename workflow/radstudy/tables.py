"""The one table reader: parquet, CSV or TSV (by suffix), 'NA' and empty cells as missing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TAB_SUFFIXES = (".tsv", ".tab", ".txt")


def read_table(table, *, id_columns: tuple[str, ...] = ("patient", "center")) -> pd.DataFrame:
    """A copy of a DataFrame, or a .parquet / .csv / .tsv (.tab, .txt) file ('NA' and empty cells missing; another
    suffix: the separator is sniffed). `id_columns` present in a text file are read as strings; id_columns=()
    leaves every column to pandas' type inference (numeric identifiers stay numeric)."""
    if isinstance(table, pd.DataFrame):
        return table.copy()
    path = Path(table)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".csv" or suffix in TAB_SUFFIXES:
        sep, engine = ("," if suffix == ".csv" else "\t"), "c"
    else:
        sep, engine = None, "python"
    return pd.read_csv(path, sep=sep, engine=engine, dtype={c: str for c in id_columns}, keep_default_na=True)
