import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workflow/: radstudy, in any env (README)

from radstudy.segment import stage as segmentation_stage
from radstudy.config import load_study
from radstudy.logs import setup

if __name__ == "__main__":  # nnU-Net's process pools re-import the main module
    setup(snakemake.log[0])
    segmentation_stage.build_dataset(
        load_study(snakemake.config), snakemake.input.qc, "results/ingest", snakemake.output.raw.rsplit("/", 1)[0],
        snakemake.output.split,
        centers=[Path(qc).parent.name for qc in snakemake.input.qc],  # results/qc/{center}/patients.tsv
    )
