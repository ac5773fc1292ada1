import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.evaluate import stage as evaluation_stage
from radstudy.config import load_study
from radstudy.logs import setup

setup(snakemake.log[0])
i = snakemake.input
evaluation_stage.run(
    load_study(snakemake.config), predictions=i.predictions, cohorts=i.cohorts, coefficients=i.coefficients,
    model_tables=[i.selected_features, i.clinical_model, i.harmonization],
    combined_models=dict(zip(snakemake.params.explained, i.models)), features=i.features, clinical=i.clinical,
    patients=i.patients, flow=i.flow, dsc=i.dsc, baseline=i.baseline, out_html=snakemake.output.report,
    out_dir=snakemake.output.evaluation,
    networks_dir=Path(i.networks[0]).parent if i.networks else None,  # history.tsv's folder: results/networks
)
