# Statistics: cohorts, per-center ComBat, feature selection and the clinical / radiomic / deep / combined
# models, every fitted step learned on the training partition only.


rule statistics:
    input:
        features="results/features/features.parquet",
        clinical="results/clinical/clinical.tsv",
        patients="results/qc/patients.tsv",
        perturbed=perturbed_input,
    output:
        predictions="results/models/predictions.tsv",
        cohorts="results/models/cohorts.tsv",
        coefficients="results/models/coefficients.tsv",
        selected="results/models/selected_features.tsv",
        clinical_model="results/models/clinical_model.tsv",
    log:
        "results/logs/statistics.log",
    benchmark:
        "results/benchmarks/statistics.tsv"
    conda:
        "../../envs/statistics.yaml"
    threads: 2
    script:
        "../scripts/statistics.py"
