# Features: radiomics of every region (labels + derived) and image channel, one job per patient;
# deep features of one region, one job per center (the network is loaded once); then the study table.
# Every rule exists whatever the config: features.robustness and features.deep decide whether the statistics
# stage and the study table ask for the perturbed-mask radiomics and the deep features.


rule radiomics_patient:
    input:
        ingest="results/ingest/{center}/{patient}",
        segmentation="results/segmentation/{center}",
        params=RADIOMICS_PARAMS,
    output:
        "results/features/{center}/{patient}.parquet",
    log:
        "results/logs/features/{center}/{patient}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/radiomics_patient.py"


rule radiomics_perturbed:
    input:
        ingest="results/ingest/{center}/{patient}",
        segmentation="results/segmentation/{center}",
        params=RADIOMICS_PARAMS,
    output:
        "results/features/perturbed/{center}/{patient}.parquet",
    log:
        "results/logs/features/perturbed/{center}/{patient}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/radiomics_perturbed.py"


rule perturbed_table:
    input:
        rows=segmented_rows("results/features/perturbed/{center}/{patient}.parquet"),
    output:
        "results/features/perturbed.parquet",
    log:
        "results/logs/features/perturbed.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/perturbed_table.py"


rule deep_features_center:
    input:
        segmentation="results/segmentation/{center}",
        ingest=deep_ingest_dirs,
        model=DEEP_MODEL,
    output:
        table="results/features/deep/{center}.parquet",
        issues="results/features/deep/{center}.issues.tsv",
        meta="results/features/deep/{center}.meta.json",
    log:
        "results/logs/features/deep/{center}.log",
    benchmark:
        "results/benchmarks/deep_features_center/{center}.tsv"
    conda:
        "../../envs/features.yaml"
    threads: DEEP["threads"]
    resources:
        gpu=1 if features_stage.deep_wants_gpu(STUDY) else 0,
    script:
        "../scripts/deep_features_center.py"


rule feature_table:
    input:
        rows=feature_rows,
        deep=deep_tables("parquet"),
        deep_issues=deep_tables("issues.tsv"),
        deep_meta=deep_tables("meta.json"),
    output:
        table="results/features/features.parquet",
        meta="results/features/features.meta.json",
        qc="results/features/qc.tsv",
    log:
        "results/logs/features/table.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/feature_table.py"
