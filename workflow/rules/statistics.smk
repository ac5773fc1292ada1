# Statistics: cohorts, per-center ComBat, feature selection and the clinical / radiomic / deep / combined
# models, every fitted step learned on the training partition only.


rule statistics:
    input:
        features="results/features/features.parquet",
        clinical="results/clinical/clinical.tsv",
        patients="results/qc/patients.tsv",
        perturbed=perturbed_input,
        networks=network_predictions,
    output:
        predictions="results/models/predictions.tsv",
        cohorts="results/models/cohorts.tsv",
        coefficients="results/models/coefficients.tsv",
        selected_features="results/models/selected_features.tsv",
        selection_summary="results/models/selection_summary.tsv",
        clinical_model="results/models/clinical_model.tsv",
        harmonization="results/models/harmonization.tsv",
        robustness="results/models/robustness.tsv",
        versions="results/models/versions.tsv",
        models=MODEL_FILES,
        split_models=SPLIT_MODELS,
    log:
        "results/logs/statistics.log",
    benchmark:
        "results/benchmarks/statistics.tsv"
    conda:
        "../../envs/statistics.yaml"
    threads: 2
    params:
        models=FITTED_MODELS,
    script:
        "../scripts/statistics.py"
