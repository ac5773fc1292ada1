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


def ground_truth(work: Path, config: dict) -> pd.DataFrame:
    """The demo generator's ground truth (`{demo.out_dir}/ground_truth/patients.tsv`: latent risk, image phenotypes,
    outcomes) indexed by the pipeline's pseudonym (through the pseudonymisation key), with the original id."""
    truth = pd.read_csv(work / config["demo"]["out_dir"] / "ground_truth" / "patients.tsv", sep="\t",
                        dtype={"patient_id": str})
    key = pd.read_csv(work / config["pseudonymisation"]["key_file"], sep="\t", dtype=str)
    table = key[["pseudonym", "original_id"]].merge(truth, left_on="original_id", right_on="patient_id")
    return table.drop(columns="patient_id").set_index("pseudonym")
