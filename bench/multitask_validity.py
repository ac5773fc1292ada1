"""The multitask network (issue 16, seed 004) next to the other models of a finished study, and its ablation.

On the primary split's external test cohort (and its validation and internal test cohorts) of a finished study with networks.fit
including multitask, prints per model (clinical, radiomic, deep, combined, cnn, cnn_clinical, multitask: those the
study fitted) the binary endpoint's AUC with its DeLong 95% CI and the survival endpoint's Harrell's C with its
bootstrap 95% CI, as the study's report computed them (results/report/evaluation/metrics_*.csv); the multitask
network's tumour DSC in the crop of the held-out annotated patients next to nnU-Net's on the same crops and on
the whole image (results/segmentation/dsc.tsv); and the ablation: the same multitask network retrained in the
primary split on the same training rows, seed and settings with the segmentation loss off
(multitask.loss_weights.segmentation 0), scored on the same test patients (AUC, DeLong CI; C, bootstrap CI).
Does the segmentation task help the prediction here, as seed 004 claims? Compare the two multitask rows.

    .venv/bin/python bench/multitask_validity.py WORKDIR [--bootstrap 2000]

WORKDIR: the folder a study ran in (e.g. the one `make demo` ran in). Writes
results/benchmarks/multitask_validity.tsv there.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import open_study, write_result

from radstudy.concordance import harrell_c
from radstudy.evaluate.metrics import auc_delong, bootstrap_counts, percentile_ci
from radstudy.segment.stage import study_model_folder
from radstudy.networks.stage import _multitask, network_settings, read_center_inputs, split_rows
from radstudy.statistics.models import assemble, derive_seed, statistics_settings, study_cohorts
from radstudy.tables import read_table
from radstudy.torch_tools import resolve_device


def _study_rows(work: Path, split: str, cohort: str) -> pd.DataFrame:
    rows = []
    for endpoint, metric in (("binary", "auc"), ("survival", "c_harrell")):
        path = work / "results" / "report" / "evaluation" / f"metrics_{endpoint}.csv"
        table = pd.read_csv(path)
        table = table[(table["split"] == split) & (table["cohort"] == cohort)]
        for r in table.itertuples():
            rows.append({"what": f"{r.model}", "cohort": cohort, "endpoint": endpoint, "metric": metric,
                         "value": getattr(r, metric), "low": getattr(r, f"{metric}_ci_low"),
                         "high": getattr(r, f"{metric}_ci_high"), "n": r.n, "events": r.events})
    return pd.DataFrame(rows)


def _ablation(study, work: Path, split: str, n_bootstrap: int) -> list[dict]:
    """The multitask network of the primary split retrained as the stage trains it (`networks.stage._multitask`:
    same rows, seed and settings) with the segmentation loss off; scored on every cohort but training."""
    cfg = copy.deepcopy(network_settings(study))
    cfg["multitask"]["loss_weights"]["segmentation"] = 0.0
    stats = statistics_settings(study.config)
    data = assemble(read_table(work / "results/features/features.parquet"),
                    read_table(work / "results/clinical/clinical.tsv"), read_table(work / "results/qc/patients.tsv"))
    cohorts = study_cohorts(data, stats)
    names, arrays, channels, extra = read_center_inputs(
        sorted((work / "results" / "networks" / "inputs").glob("*.npz")), with_targets=True)
    row_of = {p: i for i, p in enumerate(names)}
    part, part_cohort, index = split_rows(data, cohorts, split, row_of)
    rows = {k: v[index] for k, v in extra.items()}
    nnunet = str(study_model_folder(study))  # the study's nnU-Net (multitask.encoder nnunet)
    predictions: list[pd.DataFrame] = []
    started = time.perf_counter()
    trained, _ = _multitask(study, cfg, stats, part, part_cohort, arrays[index], channels, rows, split, predictions,
                            [], str(resolve_device(cfg["device"])), nnunet)
    print(f"ablation trained in {time.perf_counter() - started:.1f} s, kept epoch {trained.best_epoch}")
    out = []
    for table in predictions:
        endpoint = table["endpoint"].iloc[0]
        for name, group in table[table["cohort"] != "training"].groupby("cohort"):
            row = {"what": "multitask, segmentation loss off", "cohort": name, "endpoint": endpoint}
            if endpoint == "binary":
                group = group.dropna(subset=["outcome"])
                y = group["outcome"].to_numpy().astype(int)
                r = auc_delong(y, group["score"].to_numpy())
                out.append({**row, "metric": "auc", "value": r["auc"], "low": r["ci_low"], "high": r["ci_high"],
                            "n": len(y), "events": int(y.sum())})
            else:
                group = group.dropna(subset=["time", "event"])
                t, e, score = (group[c].to_numpy() for c in ("time", "event", "score"))
                counts = bootstrap_counts(len(t), n_bootstrap, derive_seed(study.seed, "bootstrap", name))
                low, high = percentile_ci(np.asarray(harrell_c(t, e, score, counts)))
                out.append({**row, "metric": "c_harrell", "value": float(harrell_c(t, e, score)), "low": low,
                            "high": high, "n": len(t), "events": int(e.sum())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    work, study, split = open_study(args.workdir)
    cohorts = [c for c in ("validation", "internal_test", "test")
               if c in set(pd.read_csv(work / "results" / "models" / "cohorts.tsv", sep="\t")["cohort"])]
    table = pd.concat([_study_rows(work, split, c) for c in cohorts]
                      + [pd.DataFrame(_ablation(study, work, split, args.bootstrap))], ignore_index=True)
    pd.set_option("display.width", 160)
    for (cohort, endpoint), rows in table.groupby(["cohort", "endpoint"], sort=False):
        print(f"\n{cohort} cohort, {endpoint} endpoint (n {rows['n'].iloc[0]}, events {rows['events'].iloc[0]}):")
        print(rows[["what", "metric", "value", "low", "high"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))

    dsc = pd.read_csv(work / "results" / "segmentation" / "dsc.tsv", sep="\t")
    tumour = dsc[dsc["region"] == "tumour"]
    print("\ntumour DSC (median [IQR], n):")
    for (method, scope), rows in tumour.groupby(["method", "scope"]):
        for label, sub in (("all", rows), ("nnU-Net not trained on them", rows[~rows["nnunet_trained"].astype(bool)])):
            if len(sub):
                q = sub["dsc"].quantile([0.25, 0.5, 0.75]).to_numpy()
                print(f"  {method:10s} {scope:6s} {label:28s} {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}] n={len(sub)}")
                table.loc[len(table)] = {"what": f"{method} ({scope}, {label})", "cohort": "held out",
                                         "endpoint": "segmentation", "metric": "dsc median", "value": q[1],
                                         "low": q[0], "high": q[2], "n": len(sub), "events": np.nan}
    write_result(work, table, "multitask_validity")


if __name__ == "__main__":
    main()
