import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.segment import stage as segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

if __name__ == "__main__":  # nnU-Net's process pools re-import the main module
    setup(snakemake.log[0])
    study = load_study(snakemake.config)
    results = Path(snakemake.output[0]).parents[1]  # nnU-Net's results folder: {results}/Dataset.../Trainer__Plans__cfg
    segmentation_stage.train(study, Path(snakemake.input[0]).parent, results)
