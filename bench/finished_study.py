"""The finished study a validity benchmark reads: its folder (made the working directory, as Snakemake ran in it),
its validated config and its primary split; and where the benchmark writes its table."""

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


def write_result(work: Path, table: pd.DataFrame, name: str) -> Path:
    """The benchmark's table as results/benchmarks/{name}.tsv of the study; prints the load average after."""
    out = work / "results" / "benchmarks" / f"{name}.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, sep="\t", index=False)
    print(f"load average after: {os.getloadavg()}; written {out}")
    return out
