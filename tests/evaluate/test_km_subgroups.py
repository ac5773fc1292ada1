"""Kaplan-Meier of high- vs low-risk groups within clinical subgroups (evaluation.km_subgroups): the training
cut-off applied within each level, the numeric median split, missing values left out and counted, degenerate
levels noted, the figure and the report, the CLI's and the config's refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from radstudy.cli import main
from radstudy.config import validate_config
from radstudy.errors import ConfigError
from radstudy.evaluate import performance as E
from radstudy.evaluate import stage
from radstudy.evaluate.inputs import PredictionsError
from radstudy.report.html import write_report

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, N_TEST = 200, 200


def survival_data(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Survival predictions of one model whose score sets the hazard in group A and nothing in group B, and the
    subgroups table: group (A/B; 5 missing, 3 patients absent), age (many values), site (a 1-patient level 'y'
    and a level 'z' without event in the test cohort)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    score = rng.normal(size=n)
    group = np.where(np.arange(n) % 2 == 0, "A", "B")
    time = np.round(rng.exponential(np.where(group == "A", 12 * np.exp(-1.5 * score), 12.0)) + 0.5, 2)
    event = (rng.uniform(size=n) < 0.8).astype(int)
    patients = np.array([f"P{i:03d}" for i in range(n)])
    site = np.full(n, "x", dtype=object)
    test_b = np.flatnonzero((np.arange(n) >= n_train) & (group == "B"))
    test_b = test_b[np.argsort(score[test_b])]
    no_event = np.r_[test_b[:3], test_b[-3:]]  # 3 lowest and 3 highest scores: both risk groups, no event
    site[no_event], event[no_event] = "z", 0
    site[test_b[len(test_b) // 2]] = "y"
    preds = pd.DataFrame({"patient": patients, "cohort": ["training"] * n_train + ["test"] * n_test,
                          "model": "radiomic", "endpoint": "survival", "score": score, "time": time, "event": event})
    sub = pd.DataFrame({"patient": patients, "group": group, "age": rng.integers(40, 85, n).astype(float),
                        "site": site})
    sub.loc[[n_train + 1, n_train + 3, n_train + 5, n_train + 7, n_train + 9], "group"] = np.nan
    sub = sub.drop(index=[n_train + 11, n_train + 13, n_train + 15])  # no clinical row: missing too
    return preds, sub


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    preds, sub = survival_data()
    out = tmp_path_factory.mktemp("km_subgroups")
    E.evaluate(preds, out, horizons=(12,), n_bootstrap=10, seed=1, figures=False, subgroups=sub)
    return preds, sub, pd.read_csv(out / "km_subgroups.csv")


def _rows(table, cohort, variable):
    return table[(table["cohort"] == cohort) & (table["variable"] == variable)].set_index("level")


def test_the_score_separates_survival_in_level_a_only(evaluated):
    _, _, table = evaluated
    assert list(table.columns) == E.KM_SUBGROUP_COLUMNS
    for cohort in ("training", "test"):
        rows = _rows(table, cohort, "group")
        assert rows.loc["A", "logrank_p"] < 1e-4 and rows.loc["A", "hr_high_vs_low"] > 2
        assert rows.loc["B", "logrank_p"] > 0.2
        assert rows.loc["B", "hr_high_vs_low_ci_low"] < 1 < rows.loc["B", "hr_high_vs_low_ci_high"]


def test_levels_sum_to_the_cohort_minus_the_missing(evaluated):
    preds, sub, table = evaluated
    rows = _rows(table, "test", "group")
    assert rows.loc["(missing)", "n"] == 8  # 5 missing values + 3 patients without a row
    assert pd.isna(rows.loc["(missing)", "logrank_p"])
    assert rows.loc[["A", "B"], "n"].sum() == N_TEST - 8
    assert (rows.loc[["A", "B"], "n_high"] + rows.loc[["A", "B"], "n_low"] == rows.loc[["A", "B"], "n"]).all()
    test = preds[preds["cohort"] == "test"].merge(sub, on="patient")
    assert rows.loc["A", "events"] == test.loc[test["group"] == "A", "event"].sum()
    # the training cut-off (median of the training scores) applied unchanged within the level
    cut = np.median(preds.loc[preds["cohort"] == "training", "score"])
    assert rows.loc["A", "n_high"] == (test.loc[test["group"] == "A", "score"] >= cut).sum()


def test_a_numeric_variable_is_split_at_the_training_median(evaluated):
    preds, sub, table = evaluated
    ages = sub.set_index("patient")["age"]
    med = np.median(ages.reindex(preds.loc[preds["cohort"] == "training", "patient"]).dropna())
    low, high = f"age <= {med:g}", f"age > {med:g}"
    test_ages = ages.reindex(preds.loc[preds["cohort"] == "test", "patient"]).dropna()
    assert set(_rows(table, "training", "age").index) == {low, high}
    rows = _rows(table, "test", "age")
    assert set(rows.index) == {low, high, "(missing)"} and rows.loc["(missing)", "n"] == 3  # no clinical row
    assert rows.loc[low, "n"] == (test_ages <= med).sum() and rows.loc[high, "n"] == (test_ages > med).sum()
    # few distinct values: one level per value, numbers as written
    labels, levels = E.subgroup_levels(pd.Series([1.0, 2.0, 3.0, np.nan, 1.0], name="t_stage"),
                                       pd.Series([1.0, 2.0]))
    assert levels == ["1", "2", "3"] and labels.isna().tolist() == [False, False, False, True, False]


def test_a_degenerate_level_gets_a_note_and_no_test(evaluated):
    _, _, table = evaluated
    rows = _rows(table, "test", "site")
    assert rows.loc["y", "n"] == 1 and rows.loc["y", "note"].startswith("fewer than 2 patients in a risk group")
    assert rows.loc["z", "n"] == 6 and rows.loc["z", "events"] == 0 and rows.loc["z", "note"] == "no event: no test"
    assert min(rows.loc["z", "n_high"], rows.loc["z", "n_low"]) >= 2
    assert rows.loc[["y", "z"], ["logrank_p", "hr_high_vs_low"]].isna().all().all()
    assert pd.notna(rows.loc["x", "logrank_p"]) and pd.isna(rows.loc["x", "note"])


def test_figure_per_variable_and_cohort_after_the_km_figure_in_the_report(tmp_path):
    preds, sub = survival_data(80, 80, seed=2)
    E.evaluate(preds, tmp_path, horizons=(12,), n_bootstrap=5, seed=1, subgroups=sub[["patient", "group"]])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    sub_figs = [f for f in manifest["figures"] if f.get("kind") == "km_subgroup"]
    assert {f["name"] for f in sub_figs} == {"km_subgroups_group_training", "km_subgroups_group_test"}
    assert all(f["section"] == "survival" and f["variable"] == "group" for f in sub_figs)
    for f in sub_figs:
        assert (tmp_path / f["png"]).stat().st_size > 5000 and (tmp_path / f["pdf"]).is_file()
    html = write_report(tmp_path, tmp_path / "report.html").read_text()
    km = html.index("Kaplan-Meier curves of high- vs low-risk patients (median")
    within = html.index("Kaplan-Meier curves of high- vs low-risk patients within each level of group")
    td_auc = html.index("Time-dependent AUC (IPCW) over follow-up, training cohort")
    assert km < within < td_auc
    assert "km_subgroups.csv" in html


def test_the_config_refuses_a_variable_that_is_not_clinical():
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert validate_config(copy.deepcopy(raw))["evaluation"]["km_subgroups"] == []
    variable = raw["clinical"]["variables"][0]
    raw["evaluation"] = {**(raw.get("evaluation") or {}), "km_subgroups": [variable]}
    assert validate_config(copy.deepcopy(raw))["evaluation"]["km_subgroups"] == [variable]
    raw["evaluation"]["km_subgroups"] = [variable, "shoe_size"]
    with pytest.raises(ConfigError, match=r"evaluation\.km_subgroups: 'shoe_size'"):
        validate_config(raw)


def test_the_stage_reads_the_configured_clinical_columns(tmp_path):
    _, sub = survival_data(20, 20)
    clinical = tmp_path / "clinical.tsv"
    sub.assign(center="C1", outcome=0).to_csv(clinical, sep="\t", index=False)
    assert stage.km_subgroups(clinical, []) is None
    table = stage.km_subgroups(clinical, ["site", "group"])
    assert list(table.columns) == ["patient", "site", "group"] and len(table) == len(sub)
    with pytest.raises(PredictionsError, match="stage_t"):
        stage.km_subgroups(clinical, ["stage_t"])


def test_the_cli_names_a_missing_subgroup_column(tmp_path, capsys):
    preds, sub = survival_data(60, 60)
    preds.to_csv(tmp_path / "p.tsv", sep="\t", index=False)
    sub.to_csv(tmp_path / "clinical.csv", index=False)
    args = ["evaluate", "--predictions", str(tmp_path / "p.tsv"), "--out", str(tmp_path / "ev"), "--n-bootstrap",
            "5", "--horizons", "12", "--no-figures", "--report", "none", "--subgroups", str(tmp_path / "clinical.csv")]
    assert main([*args, "--subgroup-columns", "group", "tumour_grade"]) == 2
    err = capsys.readouterr().err
    assert "tumour_grade" in err and "Traceback" not in err
    assert not (tmp_path / "ev" / "km_subgroups.csv").exists()
    assert main([*args, "--subgroup-columns", "group"]) == 0
    table = pd.read_csv(tmp_path / "ev" / "km_subgroups.csv")
    assert set(table["variable"]) == {"group"} and set(table["level"]) == {"A", "B", "(missing)"}
