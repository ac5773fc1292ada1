import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.ingest import stage as stages
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
stages.clinical(
    load_study(snakemake.config),
    snakemake.wildcards.center,
    snakemake.input.patients,
    snakemake.output.table,
    snakemake.output.summary,
)
