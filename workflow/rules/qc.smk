# Study-level patient table and patient flow: every delivered patient, included or excluded by
# the first stage that could not use it (ingestion, clinical table, segmentation QC).


rule patient_flow:
    input:
        qc=expand("results/qc/{center}/patients.tsv", center=CENTERS),
        summaries=expand("results/clinical/{center}.json", center=CENTERS),
        clinical=expand("results/clinical/{center}.tsv", center=CENTERS),
        segmentation=expand("results/segmentation/{center}", center=CENTERS),
        features="results/features/qc.tsv",
    output:
        patients="results/qc/patients.tsv",
        exclusions="results/qc/exclusions.tsv",
        flow="results/qc/patient_flow.tsv",
        clinical="results/clinical/clinical.tsv",
    log:
        "results/logs/patient_flow.log",
    conda:
        "../../envs/ingest.yaml"
    script:
        "../scripts/patient_flow.py"
