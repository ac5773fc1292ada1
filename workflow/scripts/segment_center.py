import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.segment import stage as segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

if __name__ == "__main__":  # nnU-Net's process pools re-import the main module
    setup(snakemake.log[0])
    segmentation_stage.segment_center(
        load_study(snakemake.config), snakemake.wildcards.center, snakemake.input.qc, snakemake.input.ingest,
        snakemake.input.model or None, snakemake.output[0],
    )
