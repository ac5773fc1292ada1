"""How well a finished CT demo's radiomic features measure the generator's two image phenotypes (issue 18).

    python bench/phenotype_visibility.py STUDY_DIR

For each phenotype (tumour heterogeneity from the tumour's features, liver texture from the liver's), over every
patient with features: the cross-validated R^2 of a ridge regression of the phenotype on the region's radiomic
features (its deep features left out; median-imputed, standardised, RidgeCV over 30 penalties 1e-2..1e4, 5 shuffled folds, random_state 0), and
the region's features best correlated with the phenotype within each center (mean over centers of Spearman's rho, so
that center effects do not count). Writes results/benchmarks/phenotype_visibility.tsv (phenotype, feature, mean
within-center rho, R^2) and prints a line per phenotype. The yardstick for known_features_gap.py's --r2.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from finished_study import ground_truth, open_study, write_result
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PHENOTYPES = {"tumour_heterogeneity": "tumour_", "liver_texture": "liver_"}


def ridge_r2(X: pd.DataFrame, y: pd.Series, seed: int = 0) -> float:
    """Cross-validated R^2 of y on X: median imputation, standardisation and RidgeCV refitted in each fold."""
    X = X.fillna(X.median())
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 30)))
    predicted = cross_val_predict(model, X.to_numpy(float), y.to_numpy(float),
                                  cv=KFold(5, shuffle=True, random_state=seed))
    return float(1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def within_center_rho(X: pd.DataFrame, y: pd.Series, center: pd.Series) -> pd.Series:
    """Each feature's Spearman correlation with y within each center, averaged over the centers."""
    per_center = [X[center == c].corrwith(y[center == c], method="spearman") for c in sorted(center.unique())]
    return pd.concat(per_center, axis=1).mean(axis=1)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    parser.add_argument("--top", type=int, default=5, help="features listed per phenotype")
    args = parser.parse_args(argv)
    work, study, _ = open_study(args.study)
    features = pd.read_parquet(work / "results" / "features" / "features.parquet")
    if "excluded" in features.columns:
        features = features[~features["excluded"].astype(bool)]
    features = features.set_index("patient")
    truth = ground_truth(work, study.config)
    patients = features.index.intersection(truth.index)
    rows = []
    for phenotype, prefix in PHENOTYPES.items():
        X = features.loc[patients, [c for c in features.columns if c.startswith(prefix) and "_deep_" not in c]]
        X = X.astype(float)
        X = X.loc[:, X.notna().any() & (X.nunique() > 1)]
        y = truth.loc[patients, phenotype].astype(float)
        r2 = ridge_r2(X, y)
        rho = within_center_rho(X, y, features.loc[patients, "center"])
        best = rho.abs().sort_values(ascending=False).head(args.top)
        rows += [{"phenotype": phenotype, "feature": f, "within_center_rho": round(float(rho[f]), 3),
                  "ridge_r2": round(r2, 3), "patients": len(patients), "features": X.shape[1]} for f in best.index]
        print(f"{phenotype}: ridge R^2 {r2:.3f} over {X.shape[1]} {prefix[:-1]} features of {len(patients)} patients; "
              f"best within-center |rho| {best.iloc[0]:.3f} ({best.index[0]}), {int((rho.abs() > 0.5).sum())} "
              f"features above 0.5")
    table = pd.DataFrame(rows)
    write_result(work, table, "phenotype_visibility")
    return table


if __name__ == "__main__":
    main()
