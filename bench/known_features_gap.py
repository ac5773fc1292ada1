"""How close to the oracle a model gets when it is *told* which features measure the image phenotypes (issue 18).

    python bench/known_features_gap.py STUDY_DIR [--r2 0.60 0.86] [--draws 400] [--seed 18]

The yardstick for the validity study's "within 0.10 of the oracle": on the demo's own patients (the generator's
ground truth of a finished CT demo: latent risk, tumour heterogeneity, liver texture) the clinical part of the risk
is known exactly (latent risk minus the phenotypes' terms), and each phenotype is "measured" with Gaussian noise such
that its R^2 is the given one (what a ridge regression of the real radiomic features on that phenotype
cross-validates at, bench/phenotype_visibility.py: 0.60 (0.61 without the deep features) and 0.86 on the shipped demo). Per draw: outcomes from the generator's own outcome model,
training = the primary split's training patients, test = the external center(s); a logistic regression on the
clinical part and the two measured phenotypes (no selection: the model knows its 3 predictors), its external AUC
against the oracle's (the latent risk) on the same patients. Printed: the share of draws with gap <= 0.10 and the
median gap, and the mean external AUC of the two measured phenotypes alone (what a radiomic signature could reach);
with --r2 1 1, the cost of estimation alone.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from finished_study import ground_truth, open_study
from radstudy.concordance import auc
from radstudy.demo import cohort
from sklearn.linear_model import LogisticRegression


def measured(x: np.ndarray, r2: float, rng: np.random.Generator) -> np.ndarray:
    """x plus independent noise, so that the squared correlation with x is r2 in expectation."""
    return x if r2 >= 1 else x + rng.normal(0.0, np.sqrt(x.var() * (1 - r2) / r2), len(x))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    parser.add_argument("--r2", type=float, nargs=2, default=[0.60, 0.86], help="tumour, liver phenotype")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    work, study, split = open_study(args.study)
    config = study.config
    cohorts = pd.read_csv(work / "results" / "models" / "cohorts.tsv", sep="\t", dtype={"patient": str})
    truth = ground_truth(work, config).drop(columns="center")
    table = cohorts[cohorts["split"] == split].join(truth, on="patient", how="inner")
    phenotypes = ("tumour_heterogeneity", "liver_texture")
    image = sum(cohort._RISK_WEIGHTS[k][0] * (table[k] - cohort._RISK_WEIGHTS[k][1]) for k in phenotypes)
    clinical = (table["latent_risk"] - image).to_numpy()
    risk = table["latent_risk"].to_numpy()
    train, test = (table["cohort"] == "training").to_numpy(), (table["cohort"] == "test").to_numpy()
    rng = np.random.default_rng(args.seed)
    rows = []
    for k in range(args.draws):
        y = np.array([cohort._outcome(rng, float(r)).synchronous_lm for r in risk])
        if y[test].min() == y[test].max():
            continue
        X = np.column_stack([clinical] + [measured(table[p].to_numpy(), r2, rng) for p, r2 in zip(phenotypes, args.r2)])
        model = LogisticRegression(C=1e6, max_iter=1000).fit(X[train], y[train])
        image_model = LogisticRegression(C=1e6, max_iter=1000).fit(X[train, 1:], y[train])
        rows.append({"draw": k, "auc_oracle": auc(y[test], risk[test]),
                     "auc_model": auc(y[test], model.decision_function(X[test])),
                     "auc_image": auc(y[test], image_model.decision_function(X[test, 1:]))})
    out = pd.DataFrame(rows)
    gap = out["auc_oracle"] - out["auc_model"]
    print(f"{work.name}: split {split}, {train.sum()} training / {test.sum()} external patients, R^2 {args.r2}, "
          f"{len(out)} draws: within 0.10 of the oracle in {(gap <= 0.10).mean():.1%}, median gap {gap.median():.3f} "
          f"(IQR {gap.quantile(0.25):.3f}-{gap.quantile(0.75):.3f}); mean external AUC {out['auc_model'].mean():.3f}, "
          f"oracle {out['auc_oracle'].mean():.3f}; the two measured phenotypes alone {out['auc_image'].mean():.3f}")
    return out


if __name__ == "__main__":
    main()
