import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.ingest import stage as stages
from radstudy.logs import setup

setup(snakemake.log[0])
out = snakemake.output
stages.flow(
    snakemake.input.qc,
    snakemake.input.summaries,
    snakemake.input.clinical,
    out.patients,
    out.exclusions,
    out.flow,
    out.clinical,
    stage_tsvs=[f"{folder}/qc.tsv" for folder in snakemake.input.segmentation] + [snakemake.input.features],
)
