from pathlib import Path

from radstudy.config import load_study
from radstudy.logs import setup
from radstudy.models import run_statistics

if __name__ == "__main__":  # joblib's worker processes
    setup(snakemake.log[0])
    run_statistics(
        snakemake.input.features, snakemake.input.clinical, snakemake.input.patients,
        load_study(snakemake.config).config, Path(snakemake.output.predictions).parent, n_jobs=snakemake.threads,
    )
