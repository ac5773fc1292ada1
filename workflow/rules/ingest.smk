# Ingestion: pseudonymise each center's patients, convert each patient's DICOM to NIfTI (HU) with its
# manual mask, then the per-center and study-level patient tables and the patient flow.


checkpoint discover:
    input:
        center_dicom_root,
    output:
        "results/ingest/{center}/patients.tsv",
    log:
        "results/logs/discover/{center}.log",
    conda:
        "../../envs/ingest.yaml"
    script:
        "../scripts/discover.py"


rule ingest_patient:
    input:
        # ancient: a patient added to the center must not make the others' ingestion rerun
        ancient("results/ingest/{center}/patients.tsv"),
    output:
        directory("results/ingest/{center}/{patient}"),
    log:
        "results/logs/ingest/{center}/{patient}.log",
    conda:
        "../../envs/ingest.yaml"
    script:
        "../scripts/ingest_patient.py"


rule clinical_table:
    input:
        patients="results/ingest/{center}/patients.tsv",
        table=center_clinical_table,
    output:
        table="results/clinical/{center}.tsv",
        summary="results/clinical/{center}.json",
    log:
        "results/logs/clinical/{center}.log",
    conda:
        "../../envs/ingest.yaml"
    script:
        "../scripts/clinical_table.py"


rule center_qc:
    input:
        ingest=center_ingest_dirs,
        clinical="results/clinical/{center}.tsv",
    output:
        "results/qc/{center}/patients.tsv",
    log:
        "results/logs/qc/{center}.log",
    conda:
        "../../envs/ingest.yaml"
    script:
        "../scripts/center_qc.py"
