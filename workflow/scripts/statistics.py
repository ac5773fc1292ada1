import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.config import load_study
from radstudy.logs import setup
from radstudy.statistics.models import STATISTICS_TABLES, run_statistics

if __name__ == "__main__":  # joblib's worker processes
    setup(snakemake.log[0])
    out = snakemake.output
    outputs = {name: out[name] for name in STATISTICS_TABLES}
    outputs["models"] = {tuple(key): path for key, path in zip(snakemake.params.models, out.models)}
    outputs["split_models"] = out.split_models[0] if out.split_models else None
    run_statistics(
        snakemake.input.features, snakemake.input.clinical, snakemake.input.patients,
        load_study(snakemake.config).config, n_jobs=snakemake.threads, perturbed=snakemake.input.perturbed or None,
        outputs=outputs, networks=snakemake.input.networks or None,
    )
