"""The input contract of `radstudy evaluate` (radstudy.evaluate.inputs), through the real command: every bad input
gets one message naming the column, the patient and the value (exit code 2, no traceback) or an explicit, counted
exclusion; time units set horizons, ticks and labels; constant models are reported as such."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from radstudy.cli import main
from radstudy.evaluate import metrics as M
from radstudy.evaluate import performance as E
from radstudy.evaluate import time_units as U
from radstudy.evaluate.inputs import PredictionsError, normalise_predictions

N_TRAIN, N_TEST = 40, 30


def predictions(seed: int = 0, models=("clinical", "radiomic"), time_scale: float = 30.0) -> pd.DataFrame:
    """Binary and survival predictions of two informative models on a training and a test cohort."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    risk = rng.normal(size=n)
    outcome = rng.binomial(1, 1 / (1 + np.exp(-1.5 * risk)))
    time = np.round(rng.exponential(time_scale * np.exp(-0.8 * risk)) + 0.5, 2)
    event = (rng.uniform(size=n) < 0.7).astype(int)
    base = pd.DataFrame({"patient": [f"P{i:03d}" for i in range(n)],
                         "cohort": ["training"] * N_TRAIN + ["test"] * N_TEST})
    parts = []
    for k, model in enumerate(models):
        score = np.round(risk + rng.normal(scale=0.5 + 0.5 * k, size=n), 4)
        parts.append(base.assign(model=model, endpoint="binary", score=score, outcome=outcome))
        parts.append(base.assign(model=model, endpoint="survival", score=score, time=time, event=event))
    return pd.concat(parts, ignore_index=True)


def run(tmp_path, table: pd.DataFrame | str, *args: str, name: str = "p.tsv") -> int:
    path = tmp_path / name
    if isinstance(table, str):
        path.write_text(table)
    else:
        table.to_csv(path, sep="\t", index=False)
    return main(["evaluate", "--predictions", str(path), "--out", str(tmp_path / "ev"), "--n-bootstrap", "20",
                 "--no-figures", *args])


def refused(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


# ---------------------------------------------------------------------------------------------- errors

def test_a_score_that_is_not_a_number_names_column_patient_and_value(tmp_path, capsys):
    table = predictions()
    table["score"] = table["score"].astype(object)
    table.loc[7, "score"] = "high"
    assert run(tmp_path, table) == 2
    refused(capsys, "column 'score'", "patient P007", "'high'")
    assert not (tmp_path / "ev").exists()  # nothing written


@pytest.mark.parametrize("cohort_row", [3, N_TRAIN + 5], ids=["training", "test"])
@pytest.mark.parametrize("bad_time", [-2.0, 0.0])
def test_a_time_at_or_below_zero_is_an_error_in_any_cohort(tmp_path, capsys, cohort_row, bad_time):
    table = predictions()
    table.loc[(table["endpoint"] == "survival") & (table["patient"] == f"P{cohort_row:03d}"), "time"] = bad_time
    assert run(tmp_path, table) == 2
    refused(capsys, "column 'time' must be > 0", f"patient P{cohort_row:03d}")


def test_event_and_outcome_must_be_0_or_1(tmp_path, capsys):
    table = predictions()
    table.loc[(table["endpoint"] == "survival") & (table["patient"] == "P004"), "event"] = 2
    assert run(tmp_path, table) == 2
    refused(capsys, "column 'event' must be 0 or 1", "row 75 (patient P004): 2")
    table = predictions()
    table["outcome"] = table["outcome"].astype(object)
    table.loc[(table["endpoint"] == "binary") & (table["patient"] == "P009"), "outcome"] = "yes"
    assert run(tmp_path, table) == 2
    refused(capsys, "column 'outcome'", "patient P009", "'yes'")


def test_a_probability_outside_0_1_is_an_error():
    table = predictions().query("endpoint == 'binary'").assign(probability=0.5)
    table.loc[table.index[2], "probability"] = 37.0  # a raw marker in the probability column
    with pytest.raises(PredictionsError, match=r"'probability' must lie in \[0, 1\].*patient P002"):
        normalise_predictions(table)


def test_an_outcome_that_differs_between_models_of_one_patient_is_an_error():
    table = predictions().query("endpoint == 'binary'").copy()
    table.loc[(table["model"] == "radiomic") & (table["patient"] == "P011"), "outcome"] = 1 - table.loc[
        (table["model"] == "radiomic") & (table["patient"] == "P011"), "outcome"]
    with pytest.raises(PredictionsError, match="'outcome' differs.*P011"):
        normalise_predictions(table)


def test_an_unknown_reference_cohort_is_one_message(tmp_path, capsys):
    assert run(tmp_path, predictions(), "--reference-cohort", "derivation") == 2
    refused(capsys, "reference cohort 'derivation'", "training")


# ---------------------------------------------------------------------------------------------- decimal commas

def _comma_table(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in ("score", "time"):
        out[col] = out[col].map(lambda v: "" if pd.isna(v) else f"{v}".replace(".", ","))
    return out


def test_comma_decimals_are_refused_with_the_fix_then_parsed_with_the_option(tmp_path, capsys):
    table = predictions()
    (tmp_path / "dot").mkdir()
    (tmp_path / "comma").mkdir()
    assert run(tmp_path / "dot", table) == 0
    capsys.readouterr()
    assert run(tmp_path / "comma", _comma_table(table)) == 2
    err = refused(capsys, "column 'score' uses a comma as decimal mark", "patient P000", "--decimal ,")
    assert f"'{str(table['score'].iloc[0]).replace('.', ',')}'" in err
    assert not (tmp_path / "comma" / "ev" / "summary_binary.csv").exists()
    assert run(tmp_path / "comma", _comma_table(table), "--decimal", ",") == 0
    for endpoint in ("binary", "survival"):
        dot = pd.read_csv(tmp_path / "dot" / "ev" / f"metrics_{endpoint}.csv")
        comma = pd.read_csv(tmp_path / "comma" / "ev" / f"metrics_{endpoint}.csv")
        pd.testing.assert_frame_equal(dot, comma)
        assert dot["n"].sum() == 2 * (N_TRAIN + N_TEST)


def test_a_dot_with_the_comma_option_is_an_error(tmp_path, capsys):
    table = _comma_table(predictions())
    table.loc[5, "score"] = "1.234,5"
    assert run(tmp_path, table, "--decimal", ",") == 2
    refused(capsys, "column 'score' holds a '.'", "patient P005", "'1.234,5'")


def test_comma_decimals_in_a_comma_separated_file_are_refused(tmp_path, capsys):
    text = "patient,cohort,model,score,outcome\nP1,training,a,0,73,1\nP2,training,a,0,12,0\n"
    assert run(tmp_path, text, name="p.csv") == 2
    refused(capsys, "more fields than the header", "comma decimal mark")


# ---------------------------------------------------------------------------------------------- exclusions

def test_missing_scores_and_outcomes_are_excluded_counted_and_reported(tmp_path, capsys):
    table = predictions()
    binary = table["endpoint"] == "binary"
    table.loc[binary & (table["model"] == "radiomic") & table["patient"].isin(["P050", "P051"]), "score"] = np.nan
    table.loc[binary & (table["patient"] == "P003"), "outcome"] = np.nan  # every model of this patient
    table.loc[(table["endpoint"] == "survival") & (table["patient"] == "P060"), "time"] = np.nan
    path = tmp_path / "p.tsv"
    table.to_csv(path, sep="\t", index=False)
    assert main(["evaluate", "--predictions", str(path), "--out", str(tmp_path / "ev"), "--n-bootstrap", "20",
                 "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "excluded (missing score; patients P050, P051)" in err and "missing outcome" in err
    got = pd.read_csv(tmp_path / "ev" / "exclusions.csv")
    got = {(r.endpoint, r.cohort, r.model, r.reason): r.n_excluded for r in got.itertuples()}
    assert got == {("binary", "test", "radiomic", "missing score"): 2,
                   ("binary", "training", "clinical", "missing outcome"): 1,
                   ("binary", "training", "radiomic", "missing outcome"): 1,
                   ("survival", "test", "clinical", "missing time or event"): 1,
                   ("survival", "test", "radiomic", "missing time or event"): 1}
    metrics = pd.read_csv(tmp_path / "ev" / "metrics_binary.csv").set_index(["cohort", "model"])
    assert metrics.loc[("test", "radiomic"), "n"] == N_TEST - 2
    assert metrics.loc[("test", "radiomic"), "excluded"] == 2
    assert metrics.loc[("training", "clinical"), "n"] == N_TRAIN - 1
    assert metrics.loc[("test", "clinical"), ["n", "excluded"]].tolist() == [N_TEST, 0]
    manifest = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert manifest["settings"]["predictions_excluded"] == 6 and len(manifest["exclusions"]) == 5
    summary = pd.read_csv(tmp_path / "ev" / "summary_binary.csv").set_index(["cohort", "model"])
    assert summary.loc[("test", "radiomic"), "excluded"] == 2
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "6 prediction(s) were left out for a missing value" in report and "missing time or event" in report


def test_no_exclusion_writes_an_empty_table_and_says_so(tmp_path):
    assert run(tmp_path, predictions()) == 0
    assert pd.read_csv(tmp_path / "ev" / "exclusions.csv").empty
    assert "No prediction was left out" in (tmp_path / "ev" / "report.html").read_text()


def test_a_one_class_cohort_is_reported_as_such(tmp_path):
    table = predictions()
    table.loc[(table["endpoint"] == "binary") & (table["cohort"] == "test"), "outcome"] = 0
    r = E.evaluate(table, tmp_path, n_bootstrap=20, figures=False)
    test = r["metrics"]["binary"].query("cohort == 'test'")
    assert (test["note"] == "single outcome class: no AUC").all() and test["auc"].isna().all()


# ---------------------------------------------------------------------------------------------- time units

def test_time_unit_sets_horizons_ticks_and_labels(tmp_path, monkeypatch):
    labels = []
    real_save = E.save_figure

    def recording_save(fig, out_dir, name):  # the real save, after reading the axis labels drawn
        labels.extend(text for ax in fig.axes for text in (ax.get_xlabel(), ax.get_title()))
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(E, "save_figure", recording_save)
    table = predictions(time_scale=900.0).query("endpoint == 'survival'")  # follow-up in days, up to years
    r = E.evaluate(table, tmp_path, time_unit="days", n_bootstrap=20, seed=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["time_unit"] == "days" and manifest["settings"]["horizons"] == [365, 730, 1095]
    s = r["metrics"]["survival"]
    assert "td_auc_365" in s.columns and (s["c_uno_tau"] == 1095).all()
    ticks = sorted(float(c.rsplit("_", 1)[1]) for c in s.columns if c.startswith("at_risk_low_"))
    assert ticks == U.time_ticks(table["time"].max(), "days") and len(ticks) <= U.MAX_TICKS + 1
    assert np.diff(ticks).min() >= 30  # not a column every 12 days
    assert "Time (days)" in labels and not any("month" in t for t in labels)
    assert any("365 days" in t for t in labels)


def test_default_horizons_and_ticks_follow_the_unit():
    assert U.default_horizons("months") == (12, 24, 36) and U.default_horizons("years") == (1, 2, 3)
    assert U.default_horizons("weeks") == (52, 104, 156) and U.default_horizons("days") == (365, 730, 1095)
    assert U.time_ticks(60, "months") == [0, 12, 24, 36, 48, 60]
    assert U.time_ticks(18, "months") == [0, 3, 6, 9, 12, 15, 18]
    assert U.time_ticks(4.2, "years") == [0, 1, 2, 3, 4]
    assert U.time_ticks(2000, "days") == [0, 365, 730, 1095, 1460, 1825]
    with pytest.raises(ValueError, match="fortnights"):
        U.default_horizons("fortnights")


def test_time_unit_from_the_command_line(tmp_path):
    table = predictions(time_scale=3.0).query("endpoint == 'survival'")  # years
    assert run(tmp_path, table, "--time-unit", "years") == 0
    settings = json.loads((tmp_path / "ev" / "manifest.json").read_text())["settings"]
    assert settings["time_unit"] == "years" and settings["horizons"] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- models and scores

def test_a_constant_model_is_reported_as_such_and_left_out_of_figures_and_comparisons(tmp_path, monkeypatch):
    legends = []
    real_save = E.save_figure

    def recording_save(fig, out_dir, name):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(E, "save_figure", recording_save)
    table = predictions(models=("clinical", "radiomic", "deep"))
    table.loc[table["model"] == "deep", "score"] = 0.25  # selection kept no feature
    r = E.evaluate(table, tmp_path, n_bootstrap=20, seed=1)
    for endpoint in ("binary", "survival"):
        met = r["metrics"][endpoint].set_index(["cohort", "model"])
        assert (met.loc[(slice(None), "deep"), "note"] == E.CONSTANT_NOTE).all()
        summary = pd.read_csv(tmp_path / f"summary_{endpoint}.csv").set_index(["cohort", "model"])
        deep = summary.loc[("test", "deep")]
        assert deep["note"] == E.CONSTANT_NOTE and deep.drop(["n", "events", "note"]).isna().all()
        comparisons = pd.read_csv(tmp_path / f"comparisons_{endpoint}.csv")
        assert "deep" not in set(comparisons["model_a"]) | set(comparisons["model_b"]) and len(comparisons)
    assert "deep" not in set(pd.read_csv(tmp_path / "reclassification.csv")["model_new"])
    assert "deep" not in set(pd.read_csv(tmp_path / "cutoffs.csv")["model"])
    assert legends and not any(t.startswith("deep") for t in legends)
    assert any(t.startswith("radiomic") for t in legends)
    assert "AUC 0.500 (0.500-0.500)" not in " ".join(legends)


def test_hazard_ratio_is_per_sd_of_the_training_score(tmp_path):
    table = predictions().query("endpoint == 'survival'")
    scaled = table.assign(score=table["score"] * 1000 + 250)  # the same model on another scale
    a = E.evaluate(table, tmp_path / "a", n_bootstrap=20, figures=False)["metrics"]["survival"]
    b = E.evaluate(scaled, tmp_path / "b", n_bootstrap=20, figures=False)["metrics"]["survival"]
    np.testing.assert_allclose(a["hr_per_sd"], b["hr_per_sd"], rtol=1e-6)
    clinical = table[table["model"] == "clinical"]
    sd = clinical.loc[clinical["cohort"] == "training", "score"].std(ddof=1)
    test = clinical[clinical["cohort"] == "test"]
    expected = M.cox_hazard_ratio(test["time"], test["event"], test["score"] / sd)["hr"]
    row = a[(a["model"] == "clinical") & (a["cohort"] == "test")].iloc[0]
    assert row["hr_per_sd"] == pytest.approx(expected, rel=1e-10) and row["score_sd_reference"] == pytest.approx(sd)
    assert "HR per SD" in pd.read_csv(tmp_path / "a" / "summary_survival.csv").columns


def test_a_raw_score_is_calibrated_on_its_own_scale(tmp_path):
    """A binary model given as a score in the hundreds, without probability: calibration of glm on the score."""
    table = predictions().query("endpoint == 'binary' and model == 'clinical'")
    table = table.assign(score=table["score"] * 10 + 300)
    met = E.evaluate(table, tmp_path, n_bootstrap=20, figures=False)["metrics"]["binary"]
    for cohort, rows in table.groupby("cohort"):
        expected = M.calibration_intercept_slope(rows["outcome"], lp=rows["score"])
        got = met[met["cohort"] == cohort].iloc[0]
        assert got["calibration_intercept"] == pytest.approx(expected["calibration_intercept"], rel=1e-9)
        assert -320 < got["calibration_intercept"] < -280 and 0 < got["calibration_slope"] < 1


def test_a_combined_model_without_predictor_gets_no_explanation(tmp_path):
    from simulated_study import simulate_study

    study = simulate_study(120, seed=2)
    coefficients = study["coefficients"].copy()
    coefficients.loc[~coefficients["feature"].str.lower().isin(E.INTERCEPT_NAMES), "coefficient"] = 0.0
    model = E.LinearModel.from_tables(coefficients, study["design"], "binary")
    r = E.evaluate(study["predictions"], tmp_path, n_bootstrap=10, linear_models=[model], figures=False)
    assert "summary_binary" in r["tables"] and not any(name.startswith(("shap", "nomogram")) for name in r["tables"])
