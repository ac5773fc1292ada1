from radstudy import stages
from radstudy.logs import setup

setup(snakemake.log[0])
stages.center_qc(snakemake.input.ingest, snakemake.input.clinical, snakemake.output[0])
