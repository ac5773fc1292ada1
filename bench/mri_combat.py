"""ComBat on and off on the finished MRI demo study: each model's external-test AUC and C-index next to the oracle's.

    python bench/mri_combat.py demo-mri        # a study folder after `make demo-mri`

The statistics stage runs again (radstudy.statistics.models.run_statistics, the study's own features, clinical table,
patient table and network predictions) with harmonization.method combat and none, into a temporary folder; nothing of
the study is changed but results/benchmarks/mri_combat.tsv. The oracle is the latent risk that generated the outcomes
(ground_truth/oracle.json, the external center's entry): the best any model can do on those patients. Rows: the primary
split (`final`: trained on every development patient) and the mean over the folds (each fold's model on the external
center). The issue's target: the combined model's external C-index within 0.10 of the oracle's.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import open_study, write_result

from radstudy.concordance import auc, harrell_c
from radstudy.statistics.models import run_statistics


def external_metrics(predictions: pd.DataFrame, external: list[str]) -> pd.DataFrame:
    rows = []
    test = predictions[predictions["center"].isin(external) & (predictions["cohort"] == "test")]
    for (endpoint, model, split), g in test.groupby(["endpoint", "model", "split"]):
        g = g.dropna(subset=["score"])
        if endpoint == "binary":
            value = auc(g["outcome"].to_numpy(int), g["score"].to_numpy(float))
        else:
            value = harrell_c(g["time"].to_numpy(float), g["event"].to_numpy(int), g["score"].to_numpy(float))
        rows.append({"endpoint": endpoint, "model": model, "split": split, "n": len(g), "value": value})
    return pd.DataFrame(rows)


def main(folder: str) -> None:
    work, study, primary = open_study(Path(folder))
    external = [c.id for c in study.centers if c.role == "external"]
    demo = study.config["demo"]
    oracle = json.loads((work / demo["out_dir"] / "ground_truth" / "oracle.json").read_text())
    target = {"binary": np.mean([oracle["centers"][c]["auc"] for c in external]),
              "survival": np.mean([oracle["centers"][c]["c_index"] for c in external])}
    networks = work / "results" / "networks" / "predictions.tsv"
    tables = []
    for method in ("combat", "none"):
        config = copy.deepcopy(study.config)
        config["harmonization"]["method"] = method
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            paths = run_statistics(work / "results" / "features" / "features.parquet",
                                   work / "results" / "clinical" / "clinical.tsv",
                                   work / "results" / "qc" / "patients.tsv", config, out_dir=tmp, n_jobs=2,
                                   networks=networks if networks.exists() else None)
            seconds = time.perf_counter() - start
            predictions = pd.read_csv(paths["predictions"], sep="\t")
        m = external_metrics(predictions, external)
        folds = m[m["split"] != primary].groupby(["endpoint", "model"], as_index=False)[["n", "value"]].mean()
        folds["split"] = "mean of folds"
        m = pd.concat([m[m["split"] == primary], folds], ignore_index=True)
        m.insert(0, "harmonization", method)
        m["oracle"] = m["endpoint"].map(target)
        m["gap_to_oracle"] = m["oracle"] - m["value"]
        m["statistics_seconds"] = round(seconds, 1)
        tables.append(m)
        print(f"harmonization {method}: statistics {seconds:.1f} s")
    table = pd.concat(tables, ignore_index=True)
    table["metric"] = table["endpoint"].map({"binary": "AUC", "survival": "Harrell C"})
    table = table[["harmonization", "endpoint", "metric", "model", "split", "n", "value", "oracle", "gap_to_oracle",
                   "statistics_seconds"]]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.round(3).to_string(index=False))
    write_result(work, table, "mri_combat")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-mri")
