import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.segment import stage as segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
segmentation_stage.evaluate_holdout(
    load_study(snakemake.config), snakemake.input.split, snakemake.input.segmentations, snakemake.input.ingest,
    snakemake.output.table, snakemake.output.png, snakemake.output.pdf, networks_tsv=snakemake.input.networks or None,
)
