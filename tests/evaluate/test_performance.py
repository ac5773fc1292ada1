"""The evaluation stage and the report on a simulated study: files, learnt-on-training cut-offs, seeds, splits,
the minimal input form, SHAP and nomogram of the combined model, Table 1 tests, and a report that never crashes
on missing optional inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import expit

from radstudy.cli import main as cli_main
from radstudy.evaluate import performance as E
from radstudy.evaluate import metrics as M
from radstudy.evaluate.inputs import PredictionsError
from radstudy.report.html import table1, write_report
from simulated_study import simulate_study


@pytest.fixture(scope="module")
def study():
    return simulate_study(240, seed=3)


@pytest.fixture(scope="module")
def evaluated(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    inputs = out / "inputs"
    inputs.mkdir()
    for name in ("clinical", "flow", "dsc", "coefficients", "design"):
        study[name].to_csv(inputs / f"{name}.tsv", sep="\t", index=False)
    models = E.load_linear_models(inputs / "coefficients.tsv", inputs / "design.tsv")
    result = E.evaluate(study["predictions"], out, horizons=(12, 24), n_bootstrap=200, seed=5,
                        linear_models=models)
    html = write_report(out, out / "report.html", study_name="simulated", design_text="Four centers; C4 external.",
                        flow_tsv=inputs / "flow.tsv", clinical_tsv=inputs / "clinical.tsv", dsc_tsv=inputs / "dsc.tsv",
                        coefficients_tsv=inputs / "coefficients.tsv")
    return out, result, html


def test_every_table_is_csv_and_every_figure_png_and_pdf(evaluated):
    out, result, _ = evaluated
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("metrics_binary", "metrics_survival", "summary_binary", "summary_survival", "comparisons_binary",
                 "comparisons_survival", "reclassification", "cutoffs", "calibration_binary", "decision_curve_binary",
                 "time_dependent_auc", "shap_importance_binary", "nomogram_binary"):
        assert (out / f"{name}.csv").is_file(), name
        assert name in manifest["tables"]
    kinds = {(f["section"], f.get("kind")) for f in manifest["figures"]}
    for kind in ("roc", "calibration", "decision", "clinical_impact"):
        assert ("binary", kind) in kinds
    for kind in ("km", "td_auc", "td_roc", "calibration", "decision"):
        assert ("survival", kind) in kinds
    assert {("explain", "shap_beeswarm"), ("explain", "shap_bar"), ("explain", "nomogram")} <= kinds
    for f in manifest["figures"]:
        assert (out / f["png"]).stat().st_size > 5000 and (out / f["pdf"]).is_file()
    cohorts = {f.get("cohort") for f in manifest["figures"] if f["section"] == "binary"}
    assert cohorts == {"training", "validation", "test"}


def test_metrics_cover_the_seed_studies(evaluated):
    out, result, _ = evaluated
    b = pd.read_csv(out / "metrics_binary.csv")
    for col in ("auc", "auc_ci_low", "auc_ci_high", "auc_boot_ci_low", "accuracy", "sensitivity", "specificity", "ppv",
                "npv", "brier", "calibration_intercept", "calibration_slope", "hl_chi2", "hl_p"):
        assert b[col].notna().all(), col
    s = pd.read_csv(out / "metrics_survival.csv")
    for col in ("c_harrell", "c_harrell_ci_low", "c_uno", "td_auc_12", "td_auc_24_ci_high", "hr_per_sd",
                "logrank_p", "hr_high_vs_low", "at_risk_low_0", "at_risk_high_12"):
        assert s[col].notna().all(), col
    assert len(b) == len(s) == 12  # 4 models x 3 cohorts
    comp = pd.read_csv(out / "comparisons_binary.csv")
    assert len(comp) == 6 * 3 and comp["p"].between(0, 1).all()  # 6 model pairs per cohort, P not log10(P)
    recl = pd.read_csv(out / "reclassification.csv")
    combined = recl[(recl["model_new"] == "combined") & (recl["endpoint"] == "binary")]
    assert set(combined["cohort"]) == {"training", "validation", "test"}
    assert combined[["nri_continuous", "nri_continuous_ci_low", "idi", "idi_ci_high"]].notna().all().all()
    # the simulated combined model is better than the clinical one on the training cohort
    train = b[b["cohort"] == "training"].set_index("model")
    assert train.loc["combined", "auc"] > train.loc["clinical", "auc"]


def test_cutoffs_are_learnt_on_training_and_applied_unchanged(evaluated, study):
    out, _, _ = evaluated
    cut = pd.read_csv(out / "cutoffs.csv")
    assert (cut["learnt_on"] == "training").all()
    b = pd.read_csv(out / "metrics_binary.csv")
    preds = study["predictions"]
    for m in ("clinical", "combined"):
        c = cut[(cut["endpoint"] == "binary") & (cut["model"] == m)]["cutoff"].iloc[0]
        train = preds[(preds["endpoint"] == "binary") & (preds["model"] == m) & (preds["cohort"] == "training")]
        assert c == pytest.approx(M.youden_cutoff(train["outcome"], train["probability"]), rel=1e-12)
        assert np.allclose(b.loc[b["model"] == m, "cutoff"], c, rtol=1e-12)  # the same value in every cohort
        test = preds[(preds["endpoint"] == "binary") & (preds["model"] == m) & (preds["cohort"] == "test")]
        expected = M.classification_metrics(test["outcome"], test["probability"], c)["sensitivity"]
        assert b[(b["model"] == m) & (b["cohort"] == "test")]["sensitivity"].iloc[0] == pytest.approx(expected)
    s = pd.read_csv(out / "metrics_survival.csv")
    c = cut[(cut["endpoint"] == "survival") & (cut["model"] == "combined")]["cutoff"].iloc[0]
    train = preds[(preds["endpoint"] == "survival") & (preds["model"] == "combined") & (preds["cohort"] == "training")]
    assert c == pytest.approx(np.median(train["score"]))
    assert np.allclose(s.loc[s["model"] == "combined", "cutoff"], c, rtol=1e-12)


def test_same_seed_same_numbers_and_minimal_input(tmp_path):
    study = simulate_study(150, seed=8)
    preds = study["predictions"]
    minimal = preds[preds["endpoint"] == "binary"][["patient", "cohort", "model", "score", "outcome"]]
    a = E.evaluate(minimal, tmp_path / "a", n_bootstrap=100, seed=1, figures=False)
    b = E.evaluate(minimal, tmp_path / "b", n_bootstrap=100, seed=1, figures=False)
    pd.testing.assert_frame_equal(a["metrics"]["binary"], b["metrics"]["binary"])
    c = E.evaluate(minimal, tmp_path / "c", n_bootstrap=100, seed=2, figures=False)
    assert not np.allclose(a["metrics"]["binary"]["auc_boot_ci_low"], c["metrics"]["binary"]["auc_boot_ci_low"])
    # probability defaults to expit(score); one center, split 0
    assert (a["metrics"]["binary"]["split"] == 0).all()
    surv = preds[preds["endpoint"] == "survival"][["patient", "cohort", "model", "score", "time", "event"]]
    r = E.evaluate(surv, tmp_path / "s", horizons=(12,), n_bootstrap=50, seed=1, figures=False)
    assert set(r["metrics"]) == {"survival"}


def test_repeated_splits_are_aggregated(tmp_path):
    study = simulate_study(150, seed=9, n_splits=3)
    binary = study["predictions"][study["predictions"]["endpoint"] == "binary"]
    r = E.evaluate(binary, tmp_path, horizons=(12,), n_bootstrap=50, seed=1, figures=False)
    summary = pd.read_csv(tmp_path / "summary_binary_splits.csv")
    auc = summary[(summary["metric"] == "auc") & (summary["model"] == "combined") & (summary["cohort"] == "validation")]
    per_split = r["metrics"]["binary"].query("model == 'combined' and cohort == 'validation'")["auc"]
    assert len(per_split) == 3 and auc["n_splits"].iloc[0] == 3
    assert auc["mean"].iloc[0] == pytest.approx(per_split.mean())
    assert auc["p2_5"].iloc[0] == pytest.approx(np.percentile(per_split, 2.5))
    headline = pd.read_csv(tmp_path / "summary_binary.csv")
    assert "AUC" in headline.columns  # mean (2.5-97.5 percentiles over splits)


def test_invalid_predictions_name_the_patient():
    bad = pd.DataFrame({"patient": ["P1", "P2"], "cohort": "training", "model": "clinical", "score": [0.1, 0.2],
                        "outcome": [0, 2]})
    with pytest.raises(PredictionsError, match="P2"):
        E.normalise_predictions(bad)
    with pytest.raises(PredictionsError, match="score"):
        E.normalise_predictions(bad.drop(columns="score"))


def test_shap_of_the_linear_combined_model_is_beta_times_centred_x(study):
    lm = E.LinearModel.from_tables(study["coefficients"], study["design"], "binary")
    x = lm.design
    background = x.iloc[:100]
    values, shown = E.linear_shap(lm, background, x)
    expected = (x - background.mean()) * lm.coefficients
    np.testing.assert_allclose(values.values, expected.loc[shown.index].values, atol=1e-8)
    # local accuracy: base value + sum of SHAP values = the linear predictor
    np.testing.assert_allclose(values.base_values + values.values.sum(axis=1), lm.linear_predictor().loc[shown.index],
                               atol=1e-8)


def test_nomogram_points_reproduce_the_model_probability(study):
    lm = E.LinearModel.from_tables(study["coefficients"], study["design"], "binary")
    fig, scales = E.plot_nomogram(lm, lm.design)
    s = scales.set_index("feature")
    assert s["max_points"].max() == pytest.approx(100)
    patient = lm.design.iloc[7]
    points = ((patient - s["zero_points_at"]) * s["points_per_unit"]).sum()
    lp0 = lm.intercept + (lm.coefficients * s["zero_points_at"]).sum()
    unit = s["coefficient"].iloc[0] / s["points_per_unit"].iloc[0]  # linear predictor per point
    assert expit(lp0 + points * unit) == pytest.approx(expit(lm.linear_predictor().iloc[7]))


def test_report_is_one_self_contained_html_with_every_section(evaluated):
    out, _, html_path = evaluated
    html = html_path.read_text()
    for anchor in ("design", "flow", "table1", "segmentation", "models", "performance", "figures_binary",
                   "figures_survival", "explain", "software"):
        assert f'id="{anchor}"' in html, anchor
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html
    assert 'class="missing"' not in html
    for f in ("table1.csv", "segmentation_quality.csv", "patient_flow.csv", "figures/patient_flow.pdf",
              "figures/segmentation_quality.png"):
        assert (out / f).is_file(), f


def test_report_without_optional_inputs_says_so(tmp_path):
    html = write_report(tmp_path / "nothing", tmp_path / "r.html").read_text()
    assert html.count('class="missing"') >= 6 and "No patient-flow table" in html and "No evaluation found" in html


def test_table1_tests_as_the_seed_studies(study):
    clin = study["clinical"]
    groups = pd.Series(np.where(np.arange(len(clin)) % 3 == 0, "validation", "training"), index=clin["patient"])
    t = table1(clin, groups, variables=["age", "cea", "sex", "tumour_nodules"])
    row = t.set_index("Variable")
    age_tr = clin["age"][groups.values == "training"]
    age_va = clin["age"][groups.values == "validation"]
    assert row.loc["age", "Test"] == "t-test" and row.loc["age", "Level"] == "mean ± SD"  # normal in both groups
    assert row.loc["age", "P"] == f"{stats.ttest_ind(age_tr, age_va).pvalue:.3f}"
    cea_tr, cea_va = clin["cea"][groups.values == "training"], clin["cea"][groups.values == "validation"]
    assert row.loc["cea", "Test"] == "Mann-Whitney U" and row.loc["cea", "Level"] == "median [IQR]"  # log-normal
    assert row.loc["cea", "P"] == f"{stats.mannwhitneyu(cea_tr.dropna(), cea_va.dropna()).pvalue:.3f}"
    assert row.loc["sex", "Test"] == "chi-square"
    small = pd.DataFrame({"patient": [f"p{i}" for i in range(12)], "x": ["a"] * 9 + ["b"] * 3})
    g = pd.Series(["training"] * 6 + ["test"] * 6, index=small["patient"])
    t = table1(small, g).set_index("Variable")
    assert t.loc["x", "Test"] == "Fisher"  # 2x2 with expected counts below 5


def test_cli_main_runs_evaluation_and_report(study, tmp_path):
    preds = study["predictions"]
    preds = preds[preds["endpoint"] == "binary"]
    preds.to_csv(tmp_path / "p.tsv", sep="\t", index=False)
    study["coefficients"].to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    study["design"].to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    rc = cli_main(["evaluate", "--predictions", str(tmp_path / "p.tsv"), "--out", str(tmp_path / "ev"),
                 "--n-bootstrap", "50", "--no-figures", "--coefficients", str(tmp_path / "c.tsv"),
                 "--design", f"binary={tmp_path / 'd.tsv'}"])
    assert rc == 0 and (tmp_path / "ev" / "report.html").is_file() and (tmp_path / "ev" / "summary_binary.csv").is_file()
    assert (tmp_path / "ev" / "shap_importance_binary.csv").is_file()


def _flow(rows):
    frame = pd.DataFrame(rows, columns=["center", "role", "delivered", "included", "excluded"])
    total = {"center": "total", "role": "", "delivered": frame["delivered"].sum(),
             "included": frame["included"].sum(), "excluded": frame["excluded"].sum()}
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


def test_report_says_what_changed_since_the_baseline_from_declared_files_only(tmp_path):
    """The baseline (the first report's centers, a declared file) against this report's patient flow; the report
    itself keeps no state and reads no clock: the same inputs give the same bytes."""
    from radstudy.report.html import study_changes, write_baseline

    two = _flow([["C1", "development", 8, 7, 1], ["C2", "development", 8, 8, 0]])
    two.to_csv(tmp_path / "flow.tsv", sep="\t", index=False)
    baseline = write_baseline(tmp_path / "flow.tsv", tmp_path / "baseline.tsv")
    assert pd.read_csv(tmp_path / "baseline.tsv", sep="\t").equals(baseline)
    assert study_changes(two, None) == []
    assert study_changes(two, baseline) == ["Same centers and patient counts as at the study's first report "
                                            "(baseline.tsv): 2 center(s), 15 patient(s) included."]
    three = _flow([["C1", "development", 8, 7, 1], ["C2", "external", 8, 8, 0], ["C3", "external", 6, 5, 1]])
    changes = study_changes(three, baseline)
    assert changes[0] == "Changes since the study's first report (baseline.tsv):"
    assert "Center C3 added as an external test center: 6 patient(s) delivered, 5 included." in changes
    assert "Center C2 changed role: development -> external." in changes
    changes = study_changes(_flow([["C1", "development", 9, 8, 1]]), baseline)
    assert "Center C1: delivered patients 8 -> 9." in changes
    assert any(c.startswith("Center C2 (development) is no longer in the study") for c in changes)

    three.to_csv(tmp_path / "flow3.tsv", sep="\t", index=False)
    runs = []
    for _ in range(2):  # the same inputs twice: the same files, byte for byte
        write_report(tmp_path / "ev", tmp_path / "report.html", flow_tsv=tmp_path / "flow3.tsv",
                     baseline_tsv=tmp_path / "baseline.tsv")
        runs.append({p: p.read_bytes() for p in [tmp_path / "report.html", *(tmp_path / "ev").rglob("*")]
                     if p.is_file()})
    assert runs[0] == runs[1] and len(runs[0]) > 2  # report, patient_flow.csv, study_history.csv, figures
    assert b"Center C3 added as an external test center" in runs[0][tmp_path / "report.html"]
    assert not list(tmp_path.glob("**/history.tsv"))


def test_nomogram_draws_one_axis_per_categorical_variable():
    rng = np.random.default_rng(3)
    level = rng.integers(0, 3, 60)
    design = pd.DataFrame({"age": rng.normal(60, 10, 60), "n_stage[N1]": (level == 1).astype(float),
                           "n_stage[N2]": (level == 2).astype(float)}, index=[f"P{i}" for i in range(60)])
    lm = E.LinearModel("binary", "combined", -1.0, pd.Series({"age": 0.03, "n_stage[N1]": -0.5, "n_stage[N2]": 1.2}),
                       design)
    fig, scales = E.plot_nomogram(lm, design)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "n_stage" in labels and "n_stage[N1]" not in labels and {"ref", "N1", "N2"} <= set(labels)
    s = scales.set_index("feature")
    assert s.loc["n_stage[N1]", "zero_points_at"] == 1  # the lowest level (N1, beta < 0) scores 0 points
    assert s["max_points"].max() == pytest.approx(100)
    points = ((design - s["zero_points_at"]) * s["points_per_unit"]).sum(axis=1)
    assert points.min() >= -1e-9
    unit = s["coefficient"].iloc[0] / s["points_per_unit"].iloc[0]
    lp0 = lm.intercept + (lm.coefficients * s["zero_points_at"]).sum()
    np.testing.assert_allclose(expit(lp0 + points * unit), expit(lm.linear_predictor()), rtol=1e-9)
    assert len(fig.axes[0].texts) and min(t.get_position()[1] for t in fig.axes[0].texts) > fig.axes[0].get_ylim()[0]


def test_nomogram_axis_of_a_log_transformed_variable_reads_in_its_own_units():
    rng = np.random.default_rng(4)
    cea = np.exp(rng.normal(2, 1.2, 80))  # ng/mL, skewed
    design = pd.DataFrame({"age": rng.normal(60, 10, 80), "cea": np.log1p(cea)}, index=[f"P{i}" for i in range(80)])
    lm = E.LinearModel("binary", "combined", -2.0, pd.Series({"age": 0.02, "cea": 0.8}), design, log1p=("cea",))
    fig, scales = E.plot_nomogram(lm, design)
    texts = fig.axes[0].texts
    labels = [t.get_text() for t in texts]
    assert "cea (log scale)" in labels and "cea" not in labels
    assert scales.set_index("feature").loc["cea", "scale"] == "log(1 + x)"
    # the cea row's tick labels are round values in ng/mL, placed where their log(1 + x) scores
    row_y = next(t.get_position()[1] for t in texts if t.get_text() == "cea (log scale)")
    ticks = {float(t.get_text()): t.get_position()[0] for t in texts
             if abs(t.get_position()[1] - (row_y + 0.18)) < 1e-9}
    assert {1.0, 10.0, 100.0} <= set(ticks)
    s = scales.set_index("feature")
    for value, x in ticks.items():
        assert x == pytest.approx(s.loc["cea", "points_per_unit"] * (np.log1p(value) - s.loc["cea", "zero_points_at"]))
    assert min(ticks) >= np.expm1(design["cea"].min()) - 1e-9 and max(ticks) <= cea.max() + 1e-9


def test_report_counts_mask_sources_and_shows_mask_notes(tmp_path):
    """The report says where the manual masks came from and which were combined or chosen (results/qc/patients.tsv)."""
    from radstudy.report.html import write_report

    patients = pd.DataFrame({
        "patient": ["A-0001", "A-0002", "A-0003", "B-0001"], "center": ["A", "A", "A", "B"],
        "mask_source": ["rtstruct", "seg", "none", "label_map"], "unused_files": [2, 0, 1, 0],
        "mask_notes": ["tumour: union of GTV-1, GTV-2", "", "", ""]})
    patients.to_csv(tmp_path / "patients.tsv", sep="\t", index=False)
    flow = pd.DataFrame({"center": ["A", "B", "total"], "role": ["development", "external", ""],
                         "delivered": [3, 1, 4], "included": [3, 1, 4], "excluded": [0, 0, 0]})
    flow.to_csv(tmp_path / "flow.tsv", sep="\t", index=False)
    html = write_report(tmp_path / "ev", tmp_path / "report.html", flow_tsv=tmp_path / "flow.tsv",
                        patients_tsv=tmp_path / "patients.tsv").read_text()
    delivery = pd.read_csv(tmp_path / "ev" / "delivery.csv")
    assert delivery.set_index("center").loc["A", ["mask: rtstruct", "mask: seg", "no manual mask",
                                                  "files delivered, not used"]].tolist() == [1, 1, 1, 3]
    assert "Delivered masks and files" in html and "tumour: union of GTV-1, GTV-2" in html
