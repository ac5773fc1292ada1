# Segmentation: nnU-Net v2 trained on the annotated patients (or a trained model given in the config),
# applied to every included patient, one job per center (the model is loaded once per job); or
# (segmentation.method manual) every patient's delivered mask, no nnU-Net job.
# Every rule exists whatever the config; segmentation.model_folder decides which ones a study needs (the model
# given or the one trained here) and which rule writes split.tsv:


if SEG["model_folder"] or SEG["method"] == "manual":

    ruleorder: segmentation_split > nnunet_dataset

else:

    ruleorder: nnunet_dataset > segmentation_split


# with a given model: every annotated patient is a holdout patient (none trained it); manual masks: no holdout
rule segmentation_split:
    input:
        qc=expand("results/qc/{center}/patients.tsv", center=CENTERS),
    output:
        "results/segmentation/split.tsv",
    log:
        "results/logs/segmentation/split.log",
    conda:
        "../../envs/segmentation.yaml"
    script:
        "../scripts/segmentation_split.py"


rule nnunet_dataset:
    input:
        qc=expand("results/qc/{center}/patients.tsv", center=SEGMENTATION_TRAIN_CENTERS),
        ingest=train_ingest_dirs,
    output:
        raw=directory(f"{NNUNET}/raw/{NNUNET_DATASET}"),
        split="results/segmentation/split.tsv",
    log:
        "results/logs/segmentation/nnunet_dataset.log",
    conda:
        "../../envs/segmentation.yaml"
    params:
        centers=SEGMENTATION_TRAIN_CENTERS,
    script:
        "../scripts/nnunet_dataset.py"


rule nnunet_plan:
    input:
        f"{NNUNET}/raw/{NNUNET_DATASET}",
    output:
        directory(f"{NNUNET}/preprocessed/{NNUNET_DATASET}"),
    log:
        "results/logs/segmentation/nnunet_plan.log",
    benchmark:
        "results/benchmarks/nnunet_plan.tsv"
    conda:
        "../../envs/segmentation.yaml"
    script:
        "../scripts/nnunet_plan.py"


rule nnunet_train:
    input:
        f"{NNUNET}/preprocessed/{NNUNET_DATASET}",
    output:
        # the whole model folder: plans, dataset.json and fold_all/ (checkpoints, logs), all read by the predictor
        directory(TRAINED_MODEL),
    log:
        "results/logs/segmentation/nnunet_train.log",
    benchmark:
        "results/benchmarks/nnunet_train.tsv"
    conda:
        "../../envs/segmentation.yaml"
    threads: SEG["threads"]
    resources:
        gpu=1 if SEG["gpu"] else 0,
    script:
        "../scripts/nnunet_train.py"


checkpoint segment_center:
    input:
        # segmentation.method manual: the delivered masks, no model (no nnU-Net job in the DAG)
        model=NNUNET_MODEL if SEG["method"] == "nnunet" else [],
        qc="results/qc/{center}/patients.tsv",
        ingest=center_ingest_dirs,
    output:
        directory("results/segmentation/{center}"),
    log:
        "results/logs/segmentation/{center}.log",
    benchmark:
        "results/benchmarks/segment_center/{center}.tsv"
    conda:
        "../../envs/segmentation.yaml"
    threads: SEG["threads"]
    resources:
        gpu=1 if SEG["gpu"] else 0,
    script:
        "../scripts/segment_center.py"


rule segmentation_quality:
    input:
        split="results/segmentation/split.tsv",
        segmentations=expand("results/segmentation/{center}", center=CENTERS),
        ingest=all_ingest_dirs,
        # the multitask network's DSC in the crop (networks.fit: multitask), beside nnU-Net's
        networks="results/networks/dsc.tsv" if MULTITASK else [],
    output:
        table="results/segmentation/dsc.tsv",
        png="results/segmentation/dsc.png",
        pdf="results/segmentation/dsc.pdf",
    log:
        "results/logs/segmentation/quality.log",
    conda:
        "../../envs/segmentation.yaml"
    script:
        "../scripts/segmentation_quality.py"
