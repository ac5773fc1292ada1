# End-to-end networks (networks.enabled): each center's network inputs (crops around the region in every channel),
# then one network per split x endpoint x model, trained on the split's training partition only; the multitask network
# (seed 004) once per split for both endpoints, its masks predicted in the crop (masks/) and its DSC (dsc.tsv).


rule network_inputs:
    input:
        segmentation="results/segmentation/{center}",
        ingest=deep_ingest_dirs,
    output:
        inputs="results/networks/inputs/{center}.npz",
        issues="results/networks/inputs/{center}.issues.tsv",
    log:
        "results/logs/networks/inputs/{center}.log",
    benchmark:
        "results/benchmarks/network_inputs/{center}.tsv"
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/network_inputs.py"


rule networks:
    input:
        inputs=expand("results/networks/inputs/{center}.npz", center=CENTERS),
        features="results/features/features.parquet",
        clinical="results/clinical/clinical.tsv",
        patients="results/qc/patients.tsv",
        checkpoint=NETWORK_CHECKPOINT,
        split="results/segmentation/split.tsv" if MULTITASK else [],
        nnunet=MULTITASK_NNUNET,
    output:
        predictions="results/networks/predictions.tsv",
        history="results/networks/history.tsv",
        models=NETWORK_FILES,
        saliency=directory("results/networks/saliency"),
        dsc="results/networks/dsc.tsv",
        masks=directory("results/networks/masks"),
    log:
        "results/logs/networks.log",
    benchmark:
        "results/benchmarks/networks.tsv"
    conda:
        "../../envs/networks.yaml"
    threads: NETWORKS["threads"]
    resources:
        gpu=1 if networks_settings.wants_gpu(STUDY) else 0,
    params:
        models=FITTED_NETWORKS,
    script:
        "../scripts/networks.py"
