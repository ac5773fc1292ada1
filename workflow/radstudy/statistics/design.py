"""Study designs: which patient is in the training, validation or test cohort of each split.

`assign_cohorts(patients, design, seed)` returns a long table, one row per patient per split:
`split, patient, center, cohort` with cohort in {training, validation, internal_test, test}. External centers
(`role == "external"` in the patient table) are always `test`; development patients are split:

* `holdout` -- one split (`holdout`): training / validation at `holdout.validation_fraction`
  (the fixed training/validation/test design of Guo 2026, seed 001); with `holdout.internal_test_fraction`
  an `internal_test` cohort is drawn from the development patients first (seed 004's four-way design:
  training / validation / internal test from the development centers, the external center as test).
* `kfold` -- `kfold.folds` splits (`fold1`...): each fold is once the validation cohort, the other
  folds the training cohort; the validation cohorts partition the development patients (Sun 2025,
  seed 000: 5-fold cross-validation + an external center).
* `repeated` -- `repeated.repeats` independent random splits (`repeat01`...) at
  `repeated.validation_fraction` (Xia, seed 002: random 8:2 split repeated 10 times).

`kfold` and `repeated` add a split `final` (unless `final_refit: false`): all development patients
train the model that is delivered and applied to the external test cohort; the other splits estimate
its performance by cross-validation.

Stratification (`design.stratify`, default `[outcome, center]`): patients are grouped into strata
(outcome x center; a missing outcome is a stratum of its own), each stratum is shuffled, the strata are
laid end to end, and the patients are dealt out by systematic sampling (a fixed step from a random
start). Every stratum, and so every outcome class and every center, is represented in each cohort in
proportion to its size, up to one patient, even for strata smaller than the number of folds.
Everything is deterministic given `seed`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from radstudy.config import settings

COHORTS = ("training", "validation", "internal_test", "test")
FINAL_SPLIT = "final"


def assign_cohorts(
    patients: pd.DataFrame, design: dict | None, seed: int, outcome: str | None = None
) -> pd.DataFrame:
    """Cohort of every patient in every split of the design.

    patients: one row per patient with `patient`, `center`, `role` (development | external) and the
    stratification outcome (a binary label or an event indicator); rows with `status` other than
    `included` are ignored when that column exists; the row order does not matter.
    outcome: name of the outcome column; None takes the single column besides patient/center/role/status
    (none: stratify by center only).
    Returns columns split, patient, center, cohort (one row per patient per split).
    """
    cfg = settings("design", design)
    table = _check_patients(patients)
    outcome = _outcome_column(table, outcome)
    # sorted by patient: the assignment depends on the seed and the patients, not on the row order
    table = table.sort_values("patient", kind="stable").reset_index(drop=True)
    dev = table[table["role"] == "development"].reset_index(drop=True)
    ext = table[table["role"] == "external"].reset_index(drop=True)
    if dev.empty:
        raise ValueError("no development patients (role == 'development'): nothing to train on")
    strata = _strata(dev, outcome, cfg["stratify"])
    rng = np.random.default_rng(seed)

    splits: list[tuple[str, np.ndarray]] = []  # (name, validation mask over dev)
    internal_test = np.zeros(len(dev), dtype=bool)  # the holdout design's internal test cohort (seed 004)
    kind = cfg["type"]
    if kind == "holdout":
        frac = cfg["holdout"]["validation_fraction"]
        internal = cfg["holdout"]["internal_test_fraction"]
        if internal > 0:
            if frac + internal >= 1:
                raise ValueError(f"design.holdout: validation_fraction {frac} + internal_test_fraction {internal} "
                                 "must leave development patients to train on (sum < 1)")
            internal_test = _systematic_sample(strata, internal, rng)
            rest = np.flatnonzero(~internal_test)
            validation = np.zeros(len(dev), dtype=bool)
            validation[rest[_systematic_sample(strata[rest], frac / (1 - internal), rng)]] = True
            splits.append(("holdout", validation))
        else:  # (the draws of studies without an internal test cohort are unchanged)
            splits.append(("holdout", _systematic_sample(strata, frac, rng)))
    elif kind == "kfold":
        k = int(cfg["kfold"]["folds"])
        if not 2 <= k <= len(dev):
            raise ValueError(f"design.kfold.folds must be between 2 and the {len(dev)} development patients, got {k}")
        fold = _systematic_folds(strata, k, rng)
        splits += [(f"fold{i + 1}", fold == i) for i in range(k)]
    else:
        r = int(cfg["repeated"]["repeats"])
        frac = cfg["repeated"]["validation_fraction"]
        width = max(2, len(str(r)))
        splits += [(f"repeat{i + 1:0{width}d}", _systematic_sample(strata, frac, rng)) for i in range(r)]
    if kind != "holdout" and cfg[kind].get("final_refit", True):
        splits.append((FINAL_SPLIT, np.zeros(len(dev), dtype=bool)))

    rows = []
    for name, validation in splits:
        rows.append(pd.DataFrame({
            "split": name, "patient": dev["patient"], "center": dev["center"],
            "cohort": np.where(internal_test, "internal_test", np.where(validation, "validation", "training")),
        }))
        rows.append(pd.DataFrame({"split": name, "patient": ext["patient"], "center": ext["center"], "cohort": "test"}))
    out = pd.concat(rows, ignore_index=True)
    return out.astype({"split": str, "patient": str, "center": str, "cohort": str})


def split_names(cohorts: pd.DataFrame) -> list[str]:
    """Splits in the order of the design (`final` last)."""
    return list(dict.fromkeys(cohorts["split"]))


def primary_split(cohorts: pd.DataFrame) -> str:
    """The split whose models are delivered: `holdout`, or `final` (all development patients) when present,
    else the first split."""
    names = split_names(cohorts)
    for name in ("holdout", FINAL_SPLIT):
        if name in names:
            return name
    return names[0]


# --------------------------------------------------------------------------- helpers
def _check_patients(patients: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("patient", "center", "role") if c not in patients.columns]
    if missing:
        raise ValueError(f"patient table lacks column(s) {missing} (it has {list(patients.columns)})")
    table = patients
    if "status" in table.columns:
        table = table[table["status"] == "included"]
    table = table.reset_index(drop=True)
    if table["patient"].duplicated().any():
        dup = table.loc[table["patient"].duplicated(), "patient"].tolist()[:5]
        raise ValueError(f"patient table repeats patient(s) {dup}")
    bad = sorted(set(table["role"]) - {"development", "external"})
    if bad:
        raise ValueError(f"role must be 'development' or 'external', found {bad}")
    return table


def _outcome_column(table: pd.DataFrame, outcome: str | None) -> str | None:
    if outcome is not None:
        if outcome not in table.columns:
            raise ValueError(f"outcome column {outcome!r} is not in the patient table ({list(table.columns)})")
        return outcome
    extra = [c for c in table.columns if c not in ("patient", "center", "role", "status")]
    if len(extra) > 1:
        raise ValueError(f"several candidate outcome columns {extra}: name the one to stratify by")
    return extra[0] if extra else None


def _strata(dev: pd.DataFrame, outcome: str | None, stratify: list[str]) -> np.ndarray:
    """Integer stratum per development patient (outcome x center as configured)."""
    parts = []
    if "outcome" in stratify and outcome is not None:
        parts.append(dev[outcome].astype(object).where(dev[outcome].notna(), "<missing>").astype(str))
    if "center" in stratify:
        parts.append(dev["center"].astype(str))
    if not parts:
        return np.zeros(len(dev), dtype=int)
    key = parts[0]
    for p in parts[1:]:
        key = key + "\x1f" + p
    return pd.factorize(key, sort=True)[0]


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patients shuffled within each stratum, strata laid end to end (in a random order)."""
    order = []
    for s in rng.permutation(np.unique(strata)):
        members = np.flatnonzero(strata == s)
        order.append(rng.permutation(members))
    return np.concatenate(order)


def _systematic_sample(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask selecting `fraction` of the patients, proportionally (+-1) from every stratum."""
    order = _stratified_order(strata, rng)
    u = rng.random()
    position = np.arange(len(order))
    chosen = np.floor((position + 1) * fraction + u) > np.floor(position * fraction + u)
    mask = np.zeros(len(strata), dtype=bool)
    mask[order[chosen]] = True
    return mask


def _systematic_folds(strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index per patient: dealt round-robin over the stratified order from a random start."""
    order = _stratified_order(strata, rng)
    fold = np.empty(len(strata), dtype=int)
    fold[order] = (np.arange(len(order)) + rng.integers(k)) % k
    return rng.permutation(k)[fold]


