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


rule all:
    default_target: True
    input:
        study_targets(),
