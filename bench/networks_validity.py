"""Does the end-to-end CNN learn the demo's image signal? Issue 15's validity benchmark, on a finished demo study.

The demo generator (radstudy.demo.cohort) drives the outcomes by a latent risk whose image part is
4.0 * (tumour_heterogeneity - 0.5) + 3.5 * (liver_texture - 0.5); both parameters are in its ground truth. On the
external test cohort this prints, for the binary endpoint:

  cnn          the study's image-only CNN (results/models/predictions.tsv, model cnn): AUC with its DeLong 95% CI
  ceiling      the AUC of the generator's image component alone (tumour + liver texture): the best any image
               model can do on these patients; and of the tumour part alone (the CNN's crop is around the tumour)
  permuted     the same network retrained on the same training rows with the outcome permuted (seeded): the AUC
               a network reaches without signal (several permutations: mean and range)

Target (issue 15): the CNN's CI excludes 0.5 and its AUC lies within 0.15 of the ceiling.

    .venv/bin/python bench/networks_validity.py WORKDIR [--permutations 3]

WORKDIR: a study run with the demo and networks.enabled (e.g. the folder `make demo` ran in); the pseudonym key and
the ground truth are read from its config. Writes results/benchmarks/networks_validity.tsv there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import open_study, write_result

from radstudy.concordance import auc
from radstudy.evaluate.metrics import auc_delong
from radstudy.networks.stage import network_settings, read_center_inputs
from radstudy.networks.train import predict, train_network
from radstudy.statistics.models import derive_seed

IMAGE_WEIGHTS = {"tumour_heterogeneity": 4.0, "liver_texture": 3.5}  # radstudy.demo.cohort._RISK_WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--permutations", type=int, default=3)
    args = parser.parse_args()
    work, study, split = open_study(args.workdir)
    predictions = pd.read_csv(work / "results" / "models" / "predictions.tsv", sep="\t")
    rows = predictions[(predictions["split"] == split) & (predictions["endpoint"] == "binary")]
    cnn = rows[rows["model"] == "cnn"].dropna(subset=["score", "outcome"])
    test = cnn[cnn["cohort"] == "test"]

    key = pd.read_csv(study.key_file, sep="\t", dtype=str).set_index("pseudonym")["original_id"]
    truth = pd.read_csv(Path(study.config["demo"]["out_dir"]) / "ground_truth" / "patients.tsv", sep="\t",
                        dtype={"patient_id": str}).set_index("patient_id")
    parameters = truth.loc[test["patient"].map(key).to_numpy()]
    image_part = sum(w * parameters[p].to_numpy() for p, w in IMAGE_WEIGHTS.items())
    tumour_part = parameters["tumour_heterogeneity"].to_numpy()
    y = test["outcome"].to_numpy().astype(int)
    result = auc_delong(y, test["score"].to_numpy())
    lines = [("cnn (external test)", result["auc"], result["ci_low"], result["ci_high"], len(y))]
    lines += [("ceiling: image component", auc(y, image_part), np.nan, np.nan, len(y)),
              ("ceiling: tumour texture alone", auc(y, tumour_part), np.nan, np.nan, len(y))]

    # permuted-label control: the same network, data and training rows, the outcome shuffled among them
    cfg = network_settings(study)
    names, inputs, _ = read_center_inputs(sorted((work / "results" / "networks" / "inputs").glob("*.npz")))
    row_of = {p: i for i, p in enumerate(names)}
    part = cnn[cnn["patient"].isin(row_of)]
    images = inputs[[row_of[p] for p in part["patient"]]]
    train = (part["cohort"] == "training").to_numpy()
    outcome = part["outcome"].to_numpy().astype(float)
    is_test = (part["cohort"] == "test").to_numpy()
    permuted = []
    for k in range(args.permutations):
        rng = np.random.default_rng(derive_seed(study.seed, "permutation", k))
        shuffled = outcome.copy()
        shuffled[train] = rng.permutation(outcome[train])
        trained = train_network(images, None, {"y": shuffled}, "binary", train, cfg,
                                seed=derive_seed(study.seed, "permuted network", k))
        permuted.append(auc(outcome[is_test].astype(int), predict(trained, images)[is_test]))
    lines.append((f"permuted labels ({args.permutations} runs): mean", float(np.mean(permuted)), min(permuted),
                  max(permuted), int(is_test.sum())))

    table = pd.DataFrame(lines, columns=["what", "auc", "low", "high", "n"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    gap = lines[1][1] - result["auc"]
    print(f"CI excludes 0.5: {result['ci_low'] > 0.5}; ceiling - cnn = {gap:.3f} (target <= 0.15)")
    write_result(work, table, "networks_validity")


if __name__ == "__main__":
    main()
