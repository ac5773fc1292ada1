"""How much of the informative radiomic features' variance lies between centers, before and after ComBat (issue 18).

    python bench/center_effects.py STUDY_DIR [--top 10]

On a finished demo study (CT: `make demo`; MRI: `make demo-mri`): the informative features are the `--top` radiomic
features most correlated (|Spearman|, all patients) with each image phenotype of the generator's ground truth (CT:
tumour_heterogeneity, liver_texture; MRI: adc_heterogeneity, t2_texture; joined through the pseudonymisation key).
For each, the share of its variance between centers (eta squared of a one-way ANOVA on center) is computed on the raw
features, and after ComBat (radstudy.statistics.harmonize.ComBat) fitted on the primary split's training patients,
the external centers mapped onto the training reference from their own features (`fit_unseen_batch`), as the
statistics stage does with `harmonization.external: unseen`. The share is also given for the phenotype itself (the
truth has no center effect: centers draw patients from one population), for a baseline. And over ALL radiomic
features, the measure the harmonization papers report: the share of features whose distributions differ between
centers (Kruskal-Wallis P < 0.05), raw and after ComBat. Written to results/benchmarks/center_effects.tsv of the
study (the share as rows with feature "(all N radiomic features: share with Kruskal-Wallis P < 0.05)").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from finished_study import open_study, write_result
from radstudy.statistics.harmonize import ComBat
from scipy.stats import kruskal, spearmanr

PHENOTYPES = {"ct": ("tumour_heterogeneity", "liver_texture"), "mri": ("adc_heterogeneity", "t2_texture")}


def eta_squared(values: np.ndarray, groups: np.ndarray) -> float:
    """Share of the variance of `values` between the groups (one-way ANOVA's between sum of squares / total)."""
    ok = np.isfinite(values)
    values, groups = values[ok], groups[ok]
    total = ((values - values.mean()) ** 2).sum()
    between = sum(len(v) * (v.mean() - values.mean()) ** 2 for v in (values[groups == g] for g in np.unique(groups)))
    return float(between / total) if total > 0 else np.nan


def main(folder: str, top: int) -> None:
    work, study, primary = open_study(Path(folder))
    kind = study.config["demo"].get("kind", "ct")
    features = pd.read_parquet(work / "results" / "features" / "features.parquet")
    key = pd.read_csv(work / study.config["pseudonymisation"]["key_file"], sep="\t")
    truth = pd.read_csv(work / study.config["demo"]["out_dir"] / "ground_truth" / "patients.tsv", sep="\t")
    data = features.merge(key[["pseudonym", "original_id"]], left_on="patient", right_on="pseudonym")
    data = data.merge(truth.drop(columns=["center"]), left_on="original_id", right_on="patient_id",
                      suffixes=("", "_truth"))
    cohorts = pd.read_csv(work / "results" / "models" / "cohorts.tsv", sep="\t")
    cohorts = cohorts[cohorts["split"] == primary].set_index("patient")["cohort"]
    data["cohort"] = data["patient"].map(cohorts)
    radiomic = [c for c in features.columns if c not in ("patient", "center") and "_deep_" not in c
                and pd.api.types.is_numeric_dtype(features[c]) and features[c].notna().mean() > 0.9
                and features[c].std() > 0]
    external = [c.id for c in study.centers if c.role == "external"]
    training = data["cohort"] == "training"
    X = data[radiomic].fillna(data.loc[training, radiomic].median())
    combat = ComBat().fit(X[training].to_numpy(), data.loc[training, "center"].to_numpy())
    for center in external:
        rows = (data["center"] == center).to_numpy()
        combat.fit_unseen_batch(X[rows].to_numpy(), center)
    keep = data["center"].isin(list(combat.batches_)).to_numpy()
    harmonized = pd.DataFrame(combat.transform(X[keep].to_numpy(), data.loc[keep, "center"].to_numpy()),
                              columns=radiomic)
    centers = data.loc[keep, "center"].to_numpy()
    rows = []
    for phenotype in PHENOTYPES[kind]:
        rho = {c: spearmanr(data[c], data[phenotype], nan_policy="omit")[0] for c in radiomic}
        best = sorted(rho, key=lambda c: -abs(rho[c]))[:top]
        rows.append({"phenotype": phenotype, "feature": "(the phenotype itself)", "spearman": 1.0,
                     "eta2_raw": eta_squared(data.loc[keep, phenotype].to_numpy(float), centers), "eta2_combat": np.nan})
        for c in best:
            rows.append({"phenotype": phenotype, "feature": c, "spearman": rho[c],
                         "eta2_raw": eta_squared(X.loc[keep, c].to_numpy(float), centers),
                         "eta2_combat": eta_squared(harmonized[c].to_numpy(float), centers)})
    def differs(values: pd.DataFrame) -> float:
        """Share of the columns whose values differ between centers (Kruskal-Wallis P < 0.05)."""
        groups = [values.to_numpy(float)[centers == g] for g in np.unique(centers)]
        p = [kruskal(*(g[:, j] for g in groups)).pvalue if values.iloc[:, j].nunique() > 1 else 1.0
             for j in range(values.shape[1])]
        return float(np.mean(np.asarray(p) < 0.05))

    rows.append({"phenotype": "(all)", "feature": f"(all {len(radiomic)} radiomic features: share with "
                 "Kruskal-Wallis P < 0.05)", "spearman": np.nan,
                 "eta2_raw": differs(X.loc[keep, radiomic].reset_index(drop=True)), "eta2_combat": differs(harmonized)})
    table = pd.DataFrame(rows)
    table["centers"] = ",".join(sorted(set(centers)))
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(table.round(3).to_string(index=False))
    informative = table[~table["feature"].str.startswith("(")]
    share = table[table["phenotype"] == "(all)"].iloc[0]
    print(f"radiomic features differing between centers (Kruskal-Wallis P < 0.05): {share['eta2_raw']:.1%} raw, "
          f"{share['eta2_combat']:.1%} after ComBat")
    print(f"informative features: eta^2 median {informative['eta2_raw'].median():.3f} (range "
          f"{informative['eta2_raw'].min():.3f}-{informative['eta2_raw'].max():.3f}) raw, "
          f"{informative['eta2_combat'].median():.3f} after ComBat")
    write_result(work, table, "center_effects")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=".")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    main(args.study, args.top)
