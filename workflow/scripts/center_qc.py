import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.ingest import stage as stages
from radstudy.logs import setup

setup(snakemake.log[0])
stages.center_qc(snakemake.input.ingest, snakemake.input.clinical, snakemake.output[0])
