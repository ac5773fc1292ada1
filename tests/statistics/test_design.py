"""Study designs: stratified holdout, k-fold and repeated splits; external centers always test."""

import numpy as np
import pandas as pd
import pytest

from radstudy.errors import ConfigError
from radstudy.statistics.design import assign_cohorts, primary_split, split_names


def _patients(sizes=(60, 45, 30), external=(25,), prevalence=(0.3, 0.5, 0.2), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, (n, prev) in enumerate(zip(sizes, prevalence)):
        for i in range(n):
            rows.append({"patient": f"D{c}-{i:04d}", "center": f"D{c}", "role": "development",
                         "y": int(rng.random() < prev), "status": "included"})
    for c, n in enumerate(external):
        for i in range(n):
            rows.append({"patient": f"E{c}-{i:04d}", "center": f"E{c}", "role": "external",
                         "y": int(rng.random() < 0.4), "status": "included"})
    return pd.DataFrame(rows)


def _dev(patients):
    return patients[patients["role"] == "development"]


def test_holdout_keeps_outcome_and_center_mix_in_both_cohorts():
    pts = _patients()
    out = assign_cohorts(pts, {"type": "holdout", "holdout": {"validation_fraction": 0.3}}, seed=1, outcome="y")
    assert list(out.columns) == ["split", "patient", "center", "cohort"]
    assert split_names(out) == ["holdout"] and primary_split(out) == "holdout"
    merged = out.merge(pts, on=["patient", "center"])
    dev = merged[merged["role"] == "development"]
    val = dev[dev["cohort"] == "validation"]
    assert abs(len(val) - 0.3 * len(dev)) <= 1
    # every outcome x center stratum is split proportionally, up to one patient
    for (_, _), group in dev.groupby(["center", "y"]):
        assert abs((group["cohort"] == "validation").sum() - 0.3 * len(group)) <= 1
    for cohort in ("training", "validation"):
        part = dev[dev["cohort"] == cohort]
        assert abs(part["y"].mean() - dev["y"].mean()) < 0.05
        mix = part["center"].value_counts(normalize=True)
        assert (mix - dev["center"].value_counts(normalize=True)).abs().max() < 0.03


def test_externals_are_test_in_every_split_of_every_design():
    pts = _patients()
    for design in ({"type": "holdout"}, {"type": "kfold"}, {"type": "repeated", "repeated": {"repeats": 3}}):
        out = assign_cohorts(pts, design, seed=3, outcome="y").merge(pts, on=["patient", "center"])
        assert (out.loc[out["role"] == "external", "cohort"] == "test").all()
        assert (out.loc[out["role"] == "development", "cohort"] != "test").all()
        assert out.groupby("split")["patient"].nunique().eq(len(pts)).all()


def test_assignment_is_deterministic_per_seed():
    pts = _patients()
    for design in ({"type": "holdout"}, {"type": "kfold"}, {"type": "repeated", "repeated": {"repeats": 4}}):
        a = assign_cohorts(pts, design, seed=11, outcome="y")
        b = assign_cohorts(pts.sample(frac=1, random_state=0), design, seed=11, outcome="y")  # row order irrelevant
        key = ["split", "patient"]
        pd.testing.assert_frame_equal(a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True))
        c = assign_cohorts(pts, design, seed=12, outcome="y")
        assert not a["cohort"].equals(c["cohort"])


def test_kfold_validation_cohorts_partition_development_patients():
    pts = _patients()
    out = assign_cohorts(pts, {"type": "kfold", "kfold": {"folds": 5}}, seed=0, outcome="y")
    folds = [s for s in split_names(out) if s != "final"]
    assert folds == [f"fold{i}" for i in range(1, 6)]
    val = out[out["split"].isin(folds) & (out["cohort"] == "validation")]
    assert val["patient"].is_unique
    assert set(val["patient"]) == set(_dev(pts)["patient"])
    sizes = val.groupby("split").size()
    assert sizes.max() - sizes.min() <= 1
    merged = val.merge(pts, on=["patient", "center"])
    for (_, _), group in merged.groupby(["center", "y"]):  # each stratum spread evenly over the folds
        counts = group["split"].value_counts().reindex(folds, fill_value=0)
        assert counts.max() - counts.min() <= 1
    for fold in folds:  # training = the other folds
        part = out[out["split"] == fold]
        train = set(part.loc[part["cohort"] == "training", "patient"])
        assert train == set(_dev(pts)["patient"]) - set(part.loc[part["cohort"] == "validation", "patient"])
    final = out[out["split"] == "final"]
    assert primary_split(out) == "final"
    assert set(final.loc[final["cohort"] == "training", "patient"]) == set(_dev(pts)["patient"])
    assert not (final["cohort"] == "validation").any()


def test_kfold_without_final_refit():
    out = assign_cohorts(_patients(), {"type": "kfold", "kfold": {"folds": 3, "final_refit": False}}, 0, outcome="y")
    assert split_names(out) == ["fold1", "fold2", "fold3"]


def test_repeated_splits_are_stratified_and_differ():
    pts = _patients()
    out = assign_cohorts(pts, {"type": "repeated", "repeated": {"repeats": 10, "validation_fraction": 0.2}},
                         seed=5, outcome="y")
    names = split_names(out)
    assert names == [f"repeat{i:02d}" for i in range(1, 11)] + ["final"]
    merged = out.merge(pts, on=["patient", "center"])
    dev = merged[merged["role"] == "development"]
    sets = []
    for name in names[:-1]:
        part = dev[dev["split"] == name]
        val = part[part["cohort"] == "validation"]
        assert abs(len(val) - 0.2 * len(part)) <= 1
        assert abs(val["y"].mean() - part["y"].mean()) < 0.06
        sets.append(frozenset(val["patient"]))
    assert len(set(sets)) == 10


def test_small_strata_missing_outcomes_and_excluded_patients():
    pts = _patients(sizes=(12, 3), external=(), prevalence=(0.5, 0.5))
    pts.loc[0, "y"] = np.nan
    pts.loc[1, "status"] = "excluded"
    out = assign_cohorts(pts, {"type": "kfold", "kfold": {"folds": 5}}, seed=0, outcome="y")
    assert pts.loc[1, "patient"] not in set(out["patient"])
    assert pts.loc[0, "patient"] in set(out["patient"])
    val = out[(out["cohort"] == "validation")]
    assert set(val["patient"]) == set(pts.loc[pts["status"] == "included", "patient"])


def test_stratify_by_center_only_and_outcome_column_inference():
    pts = _patients().drop(columns=["status"])
    by_center = assign_cohorts(pts.drop(columns=["y"]), {"stratify": ["center"]}, seed=2)
    counts = by_center[by_center["cohort"] == "validation"].groupby("center").size()
    sizes = _dev(pts).groupby("center").size()
    assert ((counts - 0.3 * sizes.loc[counts.index]).abs() <= 1).all()
    inferred = assign_cohorts(pts, {}, seed=2)  # the single extra column, y, is the outcome
    pd.testing.assert_frame_equal(inferred, assign_cohorts(pts, {}, seed=2, outcome="y"))


def test_invalid_designs_are_refused():
    pts = _patients()
    with pytest.raises(ConfigError, match="design.type"):
        assign_cohorts(pts, {"type": "bootstrap"}, 0, outcome="y")
    with pytest.raises(ConfigError, match="validation_fraction"):
        assign_cohorts(pts, {"holdout": {"validation_fraction": 1.2}}, 0, outcome="y")
    with pytest.raises(ValueError, match="no development patients"):
        assign_cohorts(pts[pts["role"] == "external"], {}, 0, outcome="y")
    with pytest.raises(ValueError, match="role"):
        assign_cohorts(pts.assign(role="train"), {}, 0, outcome="y")


def test_the_four_way_design_draws_an_internal_test_cohort_from_the_development_centers():
    """Seed 004: training / validation / internal test from the development centers, the external center as test;
    the fractions are of all development patients, stratified; without it the draws are those of before."""
    rng = np.random.default_rng(0)
    pts = pd.DataFrame({"patient": [f"P{i:03d}" for i in range(200)], "center": ["A"] * 80 + ["B"] * 80 + ["C"] * 40,
                        "role": ["development"] * 160 + ["external"] * 40, "y": rng.integers(0, 2, 200)})
    design = {"type": "holdout", "holdout": {"validation_fraction": 0.2, "internal_test_fraction": 0.2}}
    out = assign_cohorts(pts, design, seed=3, outcome="y").merge(pts, on=["patient", "center"])
    counts = out.groupby("cohort").size().to_dict()
    assert counts == {"training": 96, "validation": 32, "internal_test": 32, "test": 40}
    assert set(out.loc[out["cohort"] == "internal_test", "center"]) == {"A", "B"}
    assert (out.loc[out["role"] == "external", "cohort"] == "test").all()
    for cohort in ("validation", "internal_test"):  # stratified by outcome and center
        sub = out[out["cohort"] == cohort]
        assert abs(sub["y"].mean() - out.loc[out["role"] == "development", "y"].mean()) < 0.06
        assert abs((sub["center"] == "A").mean() - 0.5) <= 1 / len(sub) + 1e-9
    plain = {"type": "holdout", "holdout": {"validation_fraction": 0.2}}
    assert assign_cohorts(pts, plain, seed=3, outcome="y").equals(
        assign_cohorts(pts, {**plain, "holdout": {"validation_fraction": 0.2, "internal_test_fraction": 0}},
                       seed=3, outcome="y"))
    with pytest.raises(ValueError, match="internal_test_fraction"):
        assign_cohorts(pts, {"type": "holdout", "holdout": {"validation_fraction": 0.5, "internal_test_fraction": 0.5}},
                       seed=3, outcome="y")
