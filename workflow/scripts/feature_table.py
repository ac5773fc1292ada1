import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.features import stage as features_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
features_stage.study_table(
    load_study(snakemake.config), snakemake.input.rows, snakemake.output.table, snakemake.output.qc,
    out_meta=snakemake.output.meta, deep_tables=snakemake.input.deep, deep_issues=snakemake.input.deep_issues,
    deep_meta=snakemake.input.deep_meta,
)
