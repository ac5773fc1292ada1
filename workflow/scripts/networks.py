import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.config import load_study
from radstudy.logs import setup
from radstudy.networks import stage as networks_stage

setup(snakemake.log[0])
out = snakemake.output
networks_stage.run(
    load_study(snakemake.config), inputs=snakemake.input.inputs, features=snakemake.input.features,
    clinical=snakemake.input.clinical, patients=snakemake.input.patients, out_predictions=out.predictions,
    out_history=out.history, out_models={tuple(key): path for key, path in zip(snakemake.params.models, out.models)},
    out_saliency=out.saliency, out_dsc=out.dsc, out_masks=out.masks, segmentation_split=snakemake.input.split or None,
    nnunet_model=snakemake.input.nnunet or None,
)
