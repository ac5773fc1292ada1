import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.demo import stage as demo
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
demo.generate(load_study(snakemake.config))
