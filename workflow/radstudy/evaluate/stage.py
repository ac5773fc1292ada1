"""The evaluation stage at file level: the study's predictions, models and QC tables -> metrics, figures and
the HTML report (results/report/). `radstudy evaluate` does the same on any predictions table."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from radstudy.evaluate import performance as evaluate

from radstudy.report import html as report
from radstudy.config import Study
from radstudy.statistics.design import primary_split
from radstudy.statistics.models import assemble, load_model, with_network_scores
from radstudy.tables import read_table

log = logging.getLogger(__name__)

EXPLAINED_MODEL = "combined"


def combined_model_tables(coefficients_tsv, cohorts_tsv, combined_models: dict, features, clinical,
                          patients, predictions=None) -> tuple[pd.DataFrame, dict, dict]:
    """Coefficients of the delivered combined models (evaluate's format: endpoint, model, feature, coefficient)
    and their design matrices (patient + predictors) for SHAP and the nomogram; per endpoint, the predictors that
    enter as log(1 + x) (the nomogram draws their axes in the variable's own units).
    combined_models: {endpoint: path of its saved combined model}."""
    coefficients = pd.read_csv(coefficients_tsv, sep="\t")
    split = primary_split(pd.read_csv(cohorts_tsv, sep="\t"))
    coefficients = coefficients[(coefficients["split"] == split) & (coefficients["model"] == EXPLAINED_MODEL)]
    coefficients = coefficients.rename(columns={"term": "feature", "coef": "coefficient"})
    data = assemble(read_table(features), read_table(clinical), read_table(patients))
    if predictions is not None:  # the CNN's score, where the combined model takes it (models.combined_scores: cnn)
        data = with_network_scores(data, read_table(predictions), split)
    designs, log1p = {}, {}
    for endpoint in coefficients["endpoint"].unique():
        if endpoint not in combined_models:
            continue
        model = load_model(combined_models[endpoint])
        design = model.design(data)
        design.insert(0, "patient", data["patient"].to_numpy())
        designs[endpoint] = design
        log1p[endpoint] = tuple(model.encoder.log_transform) if model.encoder is not None else ()
    return coefficients[["endpoint", "model", "feature", "coefficient"]], designs, log1p


def design_text(study: Study) -> str:
    cfg = study.config
    centers = ", ".join(f"{c.id} ({c.role})" for c in study.centers)
    harm = cfg["harmonization"]
    seg = cfg["segmentation"]
    internal = (" and an internal test cohort" if cfg["design"]["type"] == "holdout"
                and cfg["design"]["holdout"]["internal_test_fraction"] > 0 else "")
    return (
        f"Centers: {centers}. Design: {cfg['design']['type']} (development centers split into training and "
        f"validation{internal}, stratified by outcome and center; external centers form the test cohort). "
        f"{segmentation_text(seg)} "
        f"Harmonization: {harm['method']} per center fitted on the training partition"
        f"{'; external centers mapped onto the training reference from their own features (no labels)' if harm['external'] == 'unseen' else '; external centers not harmonized'}. "
        f"Selection: univariate filter, Spearman redundancy, LASSO ({cfg['selection']['lasso']['rule']} rule), "
        f"all fitted on training only. {networks_text(cfg['networks'])}Seed {study.seed}."
    )


def segmentation_text(seg: dict) -> str:
    """Where the study's masks come from, in one sentence."""
    if seg["method"] == "manual":
        return ("Segmentation: the delivered manual masks of every patient (segmentation.method manual; no automatic "
                "segmentation; patients without a mask excluded).")
    trained = ("a trained model given in the config" if seg["model_folder"]
               else "trained on the annotated development patients")
    return (f"Segmentation: nnU-Net v2 ({seg['configuration']}), {trained}; features from "
            f"{seg['masks_for_features'].replace('_', ' ')} masks.")


def networks_text(net: dict) -> str:
    """The end-to-end networks in one sentence ('' when disabled)."""
    if not net["enabled"]:
        return ""
    crop = "x".join(str(v) for v in (net["crop_size"] if net["dims"] == 3 else net["crop_size"][1:]))
    return (f"End-to-end networks ({', '.join(net['fit'])}): MONAI {net['architecture']} (width x{net['widen_factor']:g}"
            f", {net['dims']}D) on {crop} crops around the {net['region']}, trained in each split on its training "
            f"partition, early stopping on an inner {net['inner_validation_fraction']:.0%} of it (at most "
            f"{net['epochs']} epochs). " + _multitask_text(net))


def _multitask_text(net: dict) -> str:
    if "multitask" not in net["fit"]:
        return ""
    mt = net["multitask"]
    weights = mt["loss_weights"]
    unet = ("the study's nnU-Net architecture, from its weights" if mt["encoder"] == "nnunet"
            else "features " + "-".join(map(str, mt["features_per_stage"])))
    return (f"Multitask network: a U-Net ({unet}) "
            f"segmenting the {net['region']} in the crop with classification and Cox heads"
            f"{' and the clinical predictors' if mt['clinical'] else ''}, loss {weights['segmentation']:g} x (Dice + "
            f"cross-entropy, patients with a manual mask) + {weights['classification']:g} x BCE + "
            f"{weights['survival']:g} x Cox, {mt['warmup_epochs']} warm-up epoch(s) on segmentation alone. ")


def km_subgroups(clinical, variables) -> pd.DataFrame | None:
    """patient + the clinical variables of evaluation.km_subgroups from the study's clinical table; None when none."""
    if not variables:
        return None
    return evaluate.subgroup_table(read_table(clinical), variables, source=f"clinical table {clinical}").reset_index()


def run(study: Study, *, predictions, cohorts, coefficients, model_tables, combined_models: dict, features,
        clinical, patients, flow, dsc, baseline, out_html, out_dir, networks_dir=None) -> Path:
    """Metrics, figures and the HTML report from the study's declared files: predictions, cohorts and
    coefficients (statistics stage), model_tables (selected features, clinical model, harmonization: shown as
    they are), combined_models ({endpoint: saved combined model}, for SHAP and the nomogram), features,
    clinical, patients, flow (patient flow), dsc (segmentation quality), baseline (the patient flow of the study's
    first report, `radstudy.report.html.write_baseline`), networks_dir (the end-to-end networks' folder: training
    history and saliency maps; None without networks). Every table and figure goes into out_dir (CSV, manifest.json,
    figures/*.png|pdf), the report to out_html. A function of these inputs only: the same inputs give the same
    bytes."""
    out_dir = Path(out_dir)
    table_coefficients, designs, log1p = combined_model_tables(coefficients, cohorts, combined_models, features,
                                                               clinical, patients, predictions)
    linear_models = evaluate.load_linear_models(table_coefficients, designs, model=EXPLAINED_MODEL) if designs else []
    for lm in linear_models:
        lm.log1p = log1p.get(lm.endpoint, ())
    cfg = study.config["evaluation"]
    evaluate.evaluate(read_table(predictions), out_dir, time_unit=cfg["time_unit"], horizons=cfg["horizons"],
                      n_bootstrap=cfg["n_bootstrap"], seed=study.seed, linear_models=linear_models,
                      survival_cutoff=cfg["survival_cutoff"],
                      subgroups=km_subgroups(clinical, cfg["km_subgroups"]))
    html = report.write_report(
        out_dir, out_html, study_name=study.config["study"]["name"], design_text=design_text(study), flow_tsv=flow,
        clinical_tsv=clinical, cohorts_tsv=cohorts, dsc_tsv=dsc, extra_tables=list(model_tables),
        coefficients_tsv=coefficients, baseline_tsv=baseline, patients_tsv=patients, networks_dir=networks_dir,
    )
    log.info("report written to %s", html)
    return html
