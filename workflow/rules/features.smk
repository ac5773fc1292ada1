# Features: radiomics of every region (labels + derived) and image channel, one job per patient,
# then the study table.


rule radiomics_patient:
    input:
        ingest="results/ingest/{center}/{patient}",
        segmentation="results/segmentation/{center}",
        params=STUDY.config["features"]["radiomics"]["params"],
    output:
        "results/features/{center}/{patient}.parquet",
    log:
        "results/logs/features/{center}/{patient}.log",
    conda:
        "../../envs/radstudy.yaml"
    script:
        "../scripts/radiomics_patient.py"


rule feature_table:
    input:
        rows=feature_rows,
    output:
        table="results/features/features.parquet",
        qc="results/features/qc.tsv",
    log:
        "results/logs/features/table.log",
    conda:
        "../../envs/radstudy.yaml"
    script:
        "../scripts/feature_table.py"
