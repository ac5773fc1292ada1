"""The population truth of bench/validity_study.py's coverage (issue 18): the exact expected AUC of a fitted score over
the pool (population_auc), the Monte Carlo Harrell's C (population_c) and one draw's coverage row, checked against
the AUC and C of large samples drawn from the same population with the CT generator's own outcome model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from radstudy.concordance import auc, harrell_c
from radstudy.demo import cohort
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import validity_cohort as vc
import validity_study as vs


def test_population_auc_is_the_auc_of_a_large_sample_drawn_with_replacement():
    # a pool of five with a score tie: the pairs of a patient with itself (sampled twice, different outcomes) weigh
    # ~0.04 here, so leaving them out of the exact sum would miss the sample's AUC by more than the tolerance
    score, p = np.array([0.0, 1.0, 1.0, 2.0, 3.0]), np.array([0.9, 0.3, 0.6, 0.5, 0.2])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(score), 200_000)
    y = rng.random(len(idx)) < p[idx]
    assert abs(vs.population_auc(score, p) - auc(y, score[idx])) < 0.01
    assert abs(vs.population_auc(score, p) - 0.284) < 1e-12  # the double sum by hand


def test_population_auc_of_a_constant_and_of_a_perfect_score():
    p = np.array([0.1, 0.4, 0.7, 0.95])
    assert vs.population_auc(np.zeros(4), p) == 0.5
    # events only among the higher scores: every (event, non-event) pair is ordered right, or wrong when reversed
    score, certain = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.0, 1.0, 1.0])
    assert vs.population_auc(score, certain) == 1.0
    assert vs.population_auc(-score, certain) == 0.0


def test_population_c_is_harrells_c_of_a_large_sample():
    rng = np.random.default_rng(1)
    risk = rng.normal(0, 1.5, 40)
    score = risk + rng.normal(0, 1, 40)  # an imperfect model of the risk
    truth = vs.population_c(score, risk, cohort._outcome, np.random.default_rng(2), n=10_000)
    idx = rng.integers(0, len(score), 4_000)
    draws = vs.outcome_draws(cohort._outcome, risk[idx], rng)
    # Monte Carlo sd ~0.006 at 10,000 patients, the sample's ~0.008 at 4,000: 0.03 is over 3 sd of the difference
    assert abs(truth - harrell_c(draws.iloc[:, 1], draws.iloc[:, 2], score[idx])) < 0.03
    assert truth > 0.65  # far from the 0.5 of a score unrelated to the outcomes
    assert vs.population_c(np.zeros(40), risk, cohort._outcome, np.random.default_rng(3), n=2_000, chunk=500) == 0.5


def test_coverage_row_takes_the_combined_models_scores_of_each_patient():
    # the external test cohort's predictions as the statistics stage writes them: two models, two endpoints
    rng = np.random.default_rng(4)
    patients = [f"P{i:02d}" for i in range(40)]
    risk = pd.Series(rng.normal(0, 1.5, 40), index=patients)
    scores = {("combined", "binary"): risk.to_numpy() + rng.normal(0, 1, 40),
              ("combined", "survival"): risk.to_numpy() + rng.normal(0, 1, 40),
              ("clinical", "binary"): rng.normal(size=40), ("clinical", "survival"): rng.normal(size=40)}
    test = pd.DataFrame([{"patient": p, "model": m, "endpoint": e, "score": s[i]}
                         for (m, e), s in scores.items() for i, p in enumerate(patients)])
    row = vs.coverage_row(test, risk.iloc[::-1], cohort._outcome, cohort._SYNCHRONOUS_INTERCEPT, seed=18, k=0,
                          population_patients=2_000)
    assert row["pool"] == 40
    p_event = expit(risk.to_numpy() + cohort._SYNCHRONOUS_INTERCEPT)  # the risk joined by patient, not by order
    assert row["auc_true"] == vs.population_auc(scores[("combined", "binary")], p_event) > 0.7
    assert row["c_true"] > 0.65  # the clinical scores, unrelated to the risk, would give ~0.5
    for ci, metric in vs.CIS:
        assert row[f"{ci}_covers"] == (row[f"{ci}_low"] <= row[f"{metric}_true"] <= row[f"{ci}_high"])
        assert row[f"{ci}_low"] <= row[f"{metric}_sample"] <= row[f"{ci}_high"]


def test_delong_null_rate_is_near_nominal_at_the_demos_external_size():
    # the yardstick of the null control: with 45 patients DeLong's CI excludes 0.5 in ~6-7% of null draws (not 5%);
    # a CI built on a wrong variance would be far outside 3-11% (the binomial SD of 2,000 draws is ~0.6 points)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import delong_null

    rate, used = delong_null.exclusion_rate(45, 0.269, 2000, np.random.default_rng(18))
    assert used > 1990
    assert 0.03 < rate < 0.11


def test_summary_gives_coverage_the_side_of_the_misses_and_the_gain():
    # 10 draws x 2 harmonizations: DeLong covers in 8 draws, its 2 misses have the sample above the truth; the CI
    # narrows as the sample rises; ComBat's radiomic AUC is 0.05 above none's in every draw
    rows = []
    for k in range(10):
        sample = 0.70 + 0.02 * k
        half = 0.20 - 0.015 * k
        for method, radiomic in (("combat", 0.70), ("none", 0.65)):
            rows.append({"draw": k, "harmonization": method, "auc_radiomic": radiomic, "auc_combined": 0.8,
                         "auc_clinical": 0.7, "auc_oracle": 0.85, "gap_auc": 0.05, "auc_sample": sample, "auc_true": 0.75,
                         "delong_low": sample - half, "delong_high": sample + half, "delong_covers": k < 8,
                         "seconds": 1.0, "seconds_coverage": 0.5})
    summary = vs.summarise(pd.DataFrame(rows), null=False).set_index(["harmonization", "statistic"])["value"]
    assert summary[("combat", "coverage delong 95% CI of auc_true")] == 0.8
    assert summary[("combat", "delong misses with the sample above the truth (share of misses)")] == 1.0
    assert summary[("none", "corr(sample - truth, delong half-width)")] == pytest.approx(-1.0)
    assert summary[("combat - none", "gain auc_radiomic")] == pytest.approx(0.05)
    assert summary[("combat - none", "share of draws gain auc_radiomic > 0")] == 1.0


def test_phenotype_visibility_measures_r2_and_the_within_center_correlation():
    """bench/phenotype_visibility.py on known answers: a feature that is the phenotype plus noise of known R^2 is
    recovered by the ridge regression beside noise features; a center offset does not lower the within-center rho."""
    import phenotype_visibility as pv

    rng = np.random.default_rng(0)
    n = 400
    y = pd.Series(rng.uniform(size=n))
    noise_sd = np.sqrt(y.var() * (1 - 0.7) / 0.7)  # R^2 0.7
    center = pd.Series(np.repeat(["A", "B"], n // 2))
    X = pd.DataFrame({"signal": y + rng.normal(0, noise_sd, n) + np.where(center == "B", 5.0, 0.0),
                      **{f"noise{i}": rng.normal(size=n) for i in range(20)}})
    X_one_center = X.assign(signal=y + rng.normal(0, noise_sd, n))
    assert 0.6 < pv.ridge_r2(X_one_center, y) < 0.75
    rho = pv.within_center_rho(X, y, center)
    assert rho["signal"] > 0.75 and rho.drop("signal").abs().max() < 0.2
    assert X["signal"].corr(y, method="spearman") < rho["signal"] - 0.3  # pooled, the offset hides much of it


def test_merged_lays_nested_keys_over_the_base_and_replaces_lists_and_values():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 2}
    out = vc.merged(base, {"a": {"c": [3], "d": {"g": 4}}, "h": {"i": 5}})
    assert out == {"a": {"b": 1, "c": [3], "d": {"e": 1, "g": 4}}, "f": 2, "h": {"i": 5}}
    assert base["a"]["c"] == [1, 2] and "g" not in base["a"]["d"]  # the base is not modified


def test_the_validity_cohort_is_the_shipped_demo_with_only_its_overrides(tmp_path):
    import yaml

    shipped = yaml.safe_load(vc.BASE.read_text())
    path = vc.write_study(tmp_path / "validity")
    config = yaml.safe_load(path.read_text())
    assert path == tmp_path / "validity" / "config" / "config.yaml"
    assert config["demo"]["patients"] == [95, 105] and config["demo"]["annotated_fraction"] == 1.0
    assert config["segmentation"]["method"] == "manual"
    assert config["features"]["deep"]["enabled"] is False and config["networks"]["enabled"] is False
    # everything the statistics and the generator read is the shipped demo's: same seed, same cohort design
    for section in ("design", "harmonization", "selection", "models", "clinical", "ingest", "centers"):
        assert config[section] == shipped[section], section
    assert config["study"] == {**shipped["study"], "name": "demo-crlm-validity"}
    assert config["demo"]["size"] == shipped["demo"]["size"]
    assert config["features"]["radiomics"] == shipped["features"]["radiomics"]
    # the relative files it names are there, as in the repository's layout
    for relative in (config["centers"], config["features"]["radiomics"]["params"]):
        assert (tmp_path / "validity" / relative).read_bytes() == (vc.REPO / relative).read_bytes()
    # an edited copy is kept on a second run
    edited = {**config, "demo": {**config["demo"], "patients": [10, 12]}}
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    vc.write_study(tmp_path / "validity")
    assert yaml.safe_load(path.read_text())["demo"]["patients"] == [10, 12]


def test_a_bad_override_is_refused_naming_the_key(tmp_path):
    from radstudy.errors import ConfigError

    bad = tmp_path / "overrides.yaml"
    bad.write_text("segmentation: {method: by_hand}\n")
    with pytest.raises(ConfigError, match="segmentation"):
        vc.validity_config(overrides=bad)


def test_the_studys_own_draw_compares_its_external_test_with_the_oracle(tmp_path):
    # the workflow's predictions: a development patient (validation) and six external test patients, two endpoints
    rng = np.random.default_rng(7)
    external = [f"E{i}" for i in range(6)]
    risk = pd.Series([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.5], index=external + ["D0"])
    y = [0, 0, 1, 0, 1, 1]  # the oracle (the risk) ranks them with one discordant pair: AUC 8/9
    rows = []
    for i, p in enumerate(external):
        for model, score in (("clinical", rng.normal()), ("radiomic", rng.normal()), ("combined", -risk[p])):
            rows.append({"patient": p, "center": "C4", "split": "holdout", "cohort": "test", "endpoint": "binary",
                         "model": model, "score": score, "outcome": y[i], "time": np.nan, "event": np.nan})
            rows.append({"patient": p, "center": "C4", "split": "holdout", "cohort": "test", "endpoint": "survival",
                         "model": model, "score": score, "outcome": np.nan, "time": 10.0 + i, "event": 1})
    rows.append({"patient": "D0", "center": "C1", "split": "holdout", "cohort": "validation", "endpoint": "binary",
                 "model": "combined", "score": 0.0, "outcome": 1, "time": np.nan, "event": np.nan})
    (tmp_path / "results" / "models").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "models" / "predictions.tsv", sep="\t", index=False)
    pd.DataFrame({"patient": external + ["D0"], "split": "holdout", "cohort": ["test"] * 6 + ["validation"]}).to_csv(
        tmp_path / "results" / "models" / "cohorts.tsv", sep="\t", index=False)
    own = vs.own_draw(tmp_path, ["C4"], risk, "combat").set_index("statistic")["value"]
    assert own["auc_oracle"] == pytest.approx(8 / 9) and own["auc_combined"] == pytest.approx(1 / 9)
    assert own["gap_auc <= 0.1"] == 0.0  # the combined score is the risk reversed
    # every patient has the event, earlier ones first: the risk, rising with time, is discordant in every pair
    assert own["c_oracle"] == 0.0 and own["c_combined"] == 1.0 and own["gap_c <= 0.1"] == 1.0
