from radstudy import segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
segmentation_stage.holdout_only_split(load_study(snakemake.config), snakemake.input.qc, snakemake.output[0])
