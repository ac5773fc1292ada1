import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.config import load_study
from radstudy.logs import setup
from radstudy.networks import inputs as network_inputs

setup(snakemake.log[0])
network_inputs.inputs_center(
    load_study(snakemake.config), snakemake.wildcards.center, snakemake.input.segmentation, snakemake.input.ingest,
    snakemake.output.inputs, snakemake.output.issues,
)
