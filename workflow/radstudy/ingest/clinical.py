"""Clinical tables: each center's table, keyed by pseudonym, with only the configured variables and endpoints.

Columns that are not configured (names, birth dates, hospital IDs...) never reach results/.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from radstudy.config import Study
from radstudy.errors import ConfigError
from radstudy.ingest.pseudonym import read_key
from radstudy.tables import read_table


def read_clinical_table(path: Path) -> pd.DataFrame:
    """A center's delivered clinical table (CSV or TSV; identifiers as written); ConfigError when unreadable."""
    try:
        return read_table(path, id_columns=())
    except (OSError, pd.errors.ParserError) as exc:
        raise ConfigError(f"clinical table {path} cannot be read: {exc}") from exc


def endpoint_columns(config: dict) -> list[str]:
    endpoints = config["clinical"]["endpoints"]
    columns = []
    if "binary" in endpoints:
        columns.append(endpoints["binary"]["column"])
    if "survival" in endpoints:
        columns += [endpoints["survival"]["time"], endpoints["survival"]["event"]]
    return columns


def pseudonymised_clinical(study: Study, center_id: str, patients: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Clinical rows of the center's delivered `patients` (column `patient` = pseudonym), keyed by pseudonym.
    Returns the table (one row per delivered patient; `has_clinical_record` False where the table has none)
    and a summary with the number of clinical rows whose patient delivered no images."""
    center = study.center(center_id)
    cfg = study.config["clinical"]
    table = read_clinical_table(center.clinical)
    id_column = cfg["id_column"]
    wanted = list(cfg["variables"]) + endpoint_columns(study.config)
    missing = [c for c in [id_column, *wanted] if c not in table.columns]
    if missing:
        raise ConfigError(
            f"center {center_id}: clinical table {center.clinical} lacks column(s) {missing} "
            f"named in the config (it has: {list(table.columns)})"
        )
    table[id_column] = table[id_column].astype(str).str.strip()
    repeated = int(table[id_column].duplicated().sum())
    if repeated:
        raise ConfigError(f"center {center_id}: clinical table {center.clinical} repeats {repeated} patient id(s)")
    key = read_key(study.key_file)
    key = key[key["center"] == center_id].set_index("pseudonym")["original_id"]
    original = patients["patient"].map(key)
    rows = table.set_index(id_column).reindex(original.to_numpy())[wanted].reset_index(drop=True)
    out = pd.concat(
        [
            pd.DataFrame({"patient": patients["patient"].to_numpy(), "center": center_id,
                          "has_clinical_record": original.isin(table[id_column]).to_numpy()}),
            rows,
        ],
        axis=1,
    )
    summary = {"center": center_id, "clinical_rows": len(table),
               "clinical_rows_without_images": int((~table[id_column].isin(set(original))).sum())}
    return out, summary
