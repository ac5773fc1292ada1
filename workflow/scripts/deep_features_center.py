import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.features import stage as features_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
features_stage.deep_center(
    load_study(snakemake.config), snakemake.wildcards.center, snakemake.input.segmentation, snakemake.input.ingest,
    snakemake.input.model, snakemake.output.table, snakemake.output.issues, snakemake.output.meta,
)
