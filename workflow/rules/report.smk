# Evaluation and the study report: every metric and figure for every model, cohort and endpoint.


# The study's baseline: each center's role and patient counts at the first report, written once (its input is
# ancient: a later patient flow does not rewrite it), so that every later report says what changed since from a
# declared file. Delete results/report/baseline.tsv (or --forcerun report_baseline) to start a new baseline.
rule report_baseline:
    input:
        ancient("results/qc/patient_flow.tsv"),
    output:
        "results/report/baseline.tsv",
    log:
        "results/logs/report_baseline.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_baseline.py"


rule evaluate_report:
    input:
        predictions="results/models/predictions.tsv",
        cohorts="results/models/cohorts.tsv",
        coefficients="results/models/coefficients.tsv",
        selected_features="results/models/selected_features.tsv",
        clinical_model="results/models/clinical_model.tsv",
        harmonization="results/models/harmonization.tsv",
        models=list(EXPLAINED_MODELS.values()),
        features="results/features/features.parquet",
        clinical="results/clinical/clinical.tsv",
        patients="results/qc/patients.tsv",
        flow="results/qc/patient_flow.tsv",
        dsc="results/segmentation/dsc.tsv",
        baseline="results/report/baseline.tsv",
        networks=network_report_inputs,
    output:
        report="results/report/report.html",
        # every table (CSV, listed with the figures in manifest.json) and figure (figures/*.png|pdf) of the report
        evaluation=directory("results/report/evaluation"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/evaluate_report.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        explained=list(EXPLAINED_MODELS),
    script:
        "../scripts/evaluate_report.py"
