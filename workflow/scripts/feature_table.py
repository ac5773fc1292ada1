from radstudy import features_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
features_stage.study_table(load_study(snakemake.config), snakemake.input.rows, snakemake.output.table, snakemake.output.qc)
