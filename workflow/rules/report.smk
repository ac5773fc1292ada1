# Evaluation and the study report: every metric and figure for every model, cohort and endpoint.


rule evaluate_report:
    input:
        predictions="results/models/predictions.tsv",
        cohorts="results/models/cohorts.tsv",
        coefficients="results/models/coefficients.tsv",
        features="results/features/features.parquet",
        clinical="results/clinical/clinical.tsv",
        patients="results/qc/patients.tsv",
        flow="results/qc/patient_flow.tsv",
        dsc="results/segmentation/dsc.tsv",
    output:
        report="results/report/report.html",
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/evaluate_report.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/evaluate_report.py"
