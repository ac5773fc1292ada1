"""Pseudonymisation key: the one file that links pseudonyms ({center}-{nnnn}) to original patient folders.

The key lives where the config says (outside results/). It is append-only: a patient keeps its
pseudonym across reruns, and patients delivered later get the next free numbers, so outputs that
were already computed for a pseudonym always belong to the same person. On a fresh study, numbers
follow the sorted folder names, so the same delivery gives the same pseudonyms.
Several centers may be discovered in parallel: updates take an exclusive lock on the key.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from radstudy.config import Center

KEY_COLUMNS = ["pseudonym", "center", "original_id"]  # original_id = the patient folder's name


def pseudonym_for(center_id: str, number: int) -> str:
    return f"{center_id}-{number:04d}"


def patient_folders(center: Center) -> list[Path]:
    """One sub-folder of the center's dicom_root per delivered patient; hidden entries are ignored."""
    root = center.dicom_root
    if not root.is_dir():
        raise FileNotFoundError(f"center {center.id}: dicom_root {root} is not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@contextmanager
def _locked(key_file: Path):
    key_file.parent.mkdir(parents=True, exist_ok=True)
    with open(key_file.with_suffix(key_file.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_key(key_file: Path) -> pd.DataFrame:
    if not Path(key_file).exists():
        return pd.DataFrame(columns=KEY_COLUMNS)
    return pd.read_csv(key_file, sep="\t", dtype=str, keep_default_na=False)


def assign_pseudonyms(center: Center, key_file: Path) -> pd.DataFrame:
    """Give every patient folder of `center` a pseudonym (keeping existing ones); return this center's
    currently delivered patients (pseudonym, center, original_id), ordered by pseudonym."""
    key_file = Path(key_file)
    folders = patient_folders(center)
    with _locked(key_file):
        key = read_key(key_file)
        mine = key[key["center"] == center.id]
        known = dict(zip(mine["original_id"], mine["pseudonym"]))
        next_number = 1 + max((int(p.rsplit("-", 1)[1]) for p in mine["pseudonym"]), default=0)
        new_rows = []
        for folder in folders:
            if folder.name not in known:
                pseudonym = pseudonym_for(center.id, next_number)
                next_number += 1
                known[folder.name] = pseudonym
                new_rows.append({"pseudonym": pseudonym, "center": center.id, "original_id": folder.name})
        if new_rows:
            key = pd.concat([key, pd.DataFrame(new_rows, columns=KEY_COLUMNS)], ignore_index=True)
            tmp = key_file.with_suffix(key_file.suffix + ".tmp")
            key.to_csv(tmp, sep="\t", index=False)
            os.chmod(tmp, 0o600)  # the key re-identifies patients: owner-only
            os.replace(tmp, key_file)
    delivered = {f.name for f in folders}
    current = key[(key["center"] == center.id) & key["original_id"].isin(delivered)]
    return current.sort_values("pseudonym").reset_index(drop=True)


def patient_folder(center: Center, key_file: Path, pseudonym: str) -> Path:
    """The original folder of one pseudonymised patient; never log what this returns."""
    key = read_key(Path(key_file))
    row = key[(key["pseudonym"] == pseudonym) & (key["center"] == center.id)]
    if row.empty:
        raise KeyError(f"pseudonym {pseudonym} is not in the key {key_file}; run discovery for center {center.id} first")
    return center.dicom_root / row.iloc[0]["original_id"]
