import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.config import load_study
from radstudy.logs import setup
from radstudy.statistics.models import run_statistics

if __name__ == "__main__":  # joblib's worker processes
    setup(snakemake.log[0])
    run_statistics(
        snakemake.input.features, snakemake.input.clinical, snakemake.input.patients,
        load_study(snakemake.config).config, Path(snakemake.output.predictions).parent, n_jobs=snakemake.threads,
        perturbed=snakemake.input.perturbed or None,
    )
