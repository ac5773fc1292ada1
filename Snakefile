# radstudy: a multicenter radiomics study, from the hospitals' DICOM folders to a reported model.
# Stages live in workflow/rules/<stage>.smk; their logic lives in the radstudy package (workflow/radstudy).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/networks.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/report.smk"


# Run by the snakemake process itself, never submitted to a cluster (workflow/profiles/slurm): each only reads and
# writes tables, no images (a center's clinical table and QC records, the segmentation split, the study's feature
# tables, the patient flow, the report's baseline), in seconds, between cluster stages on the study's critical
# path, where a SLURM job would only add its queueing, start-up and status-poll latency.
localrules:
    clinical_table,
    center_qc,
    segmentation_split,
    perturbed_table,
    feature_table,
    patient_flow,
    report_baseline,


rule all:
    default_target: True
    input:
        study_targets(),
