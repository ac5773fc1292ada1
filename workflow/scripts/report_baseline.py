import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.logs import setup
from radstudy.report.html import write_baseline

setup(snakemake.log[0])
write_baseline(snakemake.input[0], snakemake.output[0])
