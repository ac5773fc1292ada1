from radstudy import segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
segmentation_stage.evaluate_holdout(
    load_study(snakemake.config), snakemake.input.split, "results/segmentation", "results/ingest",
    snakemake.output.table, snakemake.output.figure,
)
