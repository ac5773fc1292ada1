"""The finished study a validity benchmark reads: its folder (made the working directory, as Snakemake ran in it),
its validated config and its primary split."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from radstudy.config import Study, load_study
from radstudy.statistics.design import primary_split


def open_study(workdir: Path) -> tuple[Path, Study, str]:
    """(the study folder, its Study, the primary split of results/models/cohorts.tsv); prints the load average."""
    work = Path(workdir).resolve()
    os.chdir(work)
    study = load_study(work / "config" / "config.yaml" if (work / "config").is_dir() else work / "config.yaml",
                       base_dir=work)
    print(f"load average before: {os.getloadavg()}")
    return work, study, primary_split(pd.read_csv(work / "results" / "models" / "cohorts.tsv", sep="\t"))
