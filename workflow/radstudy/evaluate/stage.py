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
from radstudy.statistics.models import assemble, load_model
from radstudy.tables import read_table

log = logging.getLogger(__name__)

EXPLAINED_MODEL = "combined"


def combined_model_tables(models_dir: Path, features, clinical, patients) -> tuple[pd.DataFrame, dict]:
    """Coefficients of the delivered combined models (evaluate's format: endpoint, model, feature, coefficient)
    and their design matrices (patient + predictors) for SHAP and the nomogram; per endpoint, the predictors that
    enter as log(1 + x) (the nomogram draws their axes in the variable's own units)."""
    coefficients = pd.read_csv(models_dir / "coefficients.tsv", sep="\t")
    split = primary_split(pd.read_csv(models_dir / "cohorts.tsv", sep="\t"))
    coefficients = coefficients[(coefficients["split"] == split) & (coefficients["model"] == EXPLAINED_MODEL)]
    coefficients = coefficients.rename(columns={"term": "feature", "coef": "coefficient"})
    data = assemble(read_table(features), read_table(clinical), read_table(patients))
    designs, log1p = {}, {}
    for endpoint in coefficients["endpoint"].unique():
        path = models_dir / endpoint / f"{EXPLAINED_MODEL}.joblib"
        if path.exists():
            model = load_model(path)
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
    return (
        f"Centers: {centers}. Design: {cfg['design']['type']} (development centers split into training and "
        f"validation, stratified by outcome and center; external centers form the test cohort). "
        f"Segmentation: nnU-Net v2 ({seg['configuration']}), "
        f"{'a trained model given in the config' if seg['model_folder'] else 'trained on the annotated development patients'}; "
        f"features from {seg['masks_for_features'].replace('_', ' ')} masks. "
        f"Harmonization: {harm['method']} per center fitted on the training partition"
        f"{'; external centers mapped onto the training reference from their own features (no labels)' if harm['external'] == 'unseen' else '; external centers not harmonized'}. "
        f"Selection: univariate filter, Spearman redundancy, LASSO ({cfg['selection']['lasso']['rule']} rule), "
        f"all fitted on training only. Seed {study.seed}."
    )


def run(study: Study, *, predictions, models_dir, features, clinical, patients, flow, dsc, out_dir) -> Path:
    out_dir = Path(out_dir)
    models_dir = Path(models_dir)
    coefficients, designs, log1p = combined_model_tables(models_dir, features, clinical, patients)
    linear_models = evaluate.load_linear_models(coefficients, designs, model=EXPLAINED_MODEL) if designs else []
    for lm in linear_models:
        lm.log1p = log1p.get(lm.endpoint, ())
    cfg = study.config["evaluation"]
    evaluate.evaluate(read_table(predictions), out_dir, horizons_months=tuple(cfg["horizons_months"]),
                      n_bootstrap=cfg["n_bootstrap"], seed=study.seed, linear_models=linear_models)
    html = out_dir / "report.html"
    report.write_report(
        out_dir, html, study_name=study.config["study"]["name"], design_text=design_text(study), flow_tsv=flow,
        clinical_tsv=clinical, cohorts_tsv=models_dir / "cohorts.tsv", dsc_tsv=dsc,
        extra_tables=[models_dir / "selected_features.tsv", models_dir / "clinical_model.tsv",
                      models_dir / "harmonization.tsv"],
        coefficients_tsv=models_dir / "coefficients.tsv",
    )
    log.info("report written to %s", html)
    return html
