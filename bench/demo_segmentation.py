"""The demo's automatic segmentation against the generator's true masks, for every patient (issue 18).

    python bench/demo_segmentation.py STUDY_DIR

The report's segmentation table can only use the delivered manual masks (the annotated ~30%); the demo's ground
truth has every patient's true label map (`{demo.out_dir}/ground_truth/masks/{center}/{original id}.nii.gz`, on the
reference series' grid). For each `results/segmentation/{center}/{pseudonym}.nii.gz` (joined through the
pseudonymisation key): Dice of each label, summarised per center (n, quartiles, minimum). Written to
results/benchmarks/demo_segmentation.tsv of the study (one row per patient and label).
"""

from __future__ import annotations

import argparse

import pandas as pd
import SimpleITK as sitk
from finished_study import ground_truth, open_study, write_result
from radstudy.networks.train import dice


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    args = parser.parse_args(argv)
    work, study, _ = open_study(args.study)
    config = study.config
    labels = config["ingest"]["labels"]
    original = ground_truth(work, config)["original_id"]
    truth_dir = work / config["demo"]["out_dir"] / "ground_truth" / "masks"
    rows = []
    for center in study.centers:
        for path in sorted((work / "results" / "segmentation" / center.id).glob("*.nii.gz")):
            pseudonym = path.name[: -len(".nii.gz")]
            truth = truth_dir / center.id / f"{original.get(pseudonym, '?')}.nii.gz"
            if not truth.exists():
                continue
            auto, true = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (path, truth))
            if auto.shape != true.shape:
                raise SystemExit(f"{path}: grid {auto.shape} differs from the true mask's {true.shape} ({truth})")
            for name, value in labels.items():
                rows.append({"center": center.id, "patient": pseudonym, "label": name,
                             "dice": dice(auto == value, true == value)})
    table = pd.DataFrame(rows)
    if table.empty:
        raise SystemExit(f"{work}: no automatic segmentation with a true mask (results/segmentation/*/ is empty?)")
    summary = table.groupby(["label", "center"])["dice"].describe()[["count", "min", "25%", "50%", "75%"]]
    print(summary.round(3).to_string())
    write_result(work, table, "demo_segmentation")
    return table


if __name__ == "__main__":
    main()
