import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.features import stage as features_stage
from radstudy.logs import setup

setup(snakemake.log[0])
features_stage.perturbed_table(snakemake.input.rows, snakemake.output[0])
