"""Figures: the one way a figure is written (PNG for the report, PDF for print), and the figures that two stages draw."""

from __future__ import annotations

import warnings
from pathlib import Path


def save_figure(fig, out_dir: Path, name: str) -> Path:
    """`out_dir/figures/{name}.png` (150 dpi) and `.pdf`; layout fitted once (no second 'tight' render).
    The PDF carries no creation date: the same figure gives the same bytes. Closes `fig`."""
    import matplotlib.pyplot as plt

    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout's notice on colorbar axes (SHAP)
        fig.tight_layout()
    fig.savefig(fig_dir / f"{name}.png", dpi=150)
    fig.savefig(fig_dir / f"{name}.pdf", metadata={"CreationDate": None})  # no clock: same figure, same bytes
    plt.close(fig)
    return fig_dir / f"{name}.png"


def dsc_figure(table):
    """The segmentation-quality figure (the segmentation stage's dsc.png/pdf and the report's): DSC and HD95 of
    each holdout patient per region and center (bar: median), and automatic vs manual volumes. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if "method" in table and not table.empty:  # one category per region, method and scope (multitask rows)
        nnunet_image = (table["method"] == "nnunet") & (table["scope"] == "image")
        table = table.assign(region=np.where(nnunet_image, table["region"],
                                             table["region"] + "\n" + table["method"] + "\n(" + table["scope"] + ")"))
    regions = list(dict.fromkeys(table["region"])) if not table.empty else []
    colours = {center: f"C{k}" for k, center in enumerate(sorted(table["center"].unique()))}  # one colour per center
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(axes, ["dsc", "hd95"], ["Dice similarity coefficient", "95% Hausdorff distance (mm)"]):
        for i, region in enumerate(regions):
            sub = table[table["region"] == region]
            for j, (center, group) in enumerate(sub.groupby("center")):
                x = i + (j - (sub["center"].nunique() - 1) / 2) * 0.15
                ax.scatter([x] * len(group), group[metric], s=18, label=center if i == 0 else None, alpha=0.8,
                           color=colours[center])
            ax.hlines(sub[metric].median(), i - 0.3, i + 0.3, color="black", linewidth=1.5)
        ax.set_xticks(range(len(regions)), regions)
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
        if metric == "dsc":
            ax.set_ylim(0, 1.02)
    if regions:  # every center, also those without a point in the first category
        from matplotlib.lines import Line2D

        axes[0].legend(handles=[Line2D([], [], ls="", marker="o", color=c, label=center)
                                for center, c in colours.items()], title="center", fontsize=8, frameon=False)
    ax = axes[2]
    for k, region in enumerate(regions):
        sub = table[table["region"] == region]
        ax.scatter(sub["volume_manual_ml"], sub["volume_auto_ml"], s=12, alpha=0.7, label=region.replace("\n", " "),
                   color=plt.cm.Set1(k))
    if regions:
        top = float(np.nanmax(table[["volume_auto_ml", "volume_manual_ml"]].to_numpy())) * 1.05
        ax.plot([0, top], [0, top], ls="--", color="grey", lw=0.8)
        ax.set_xscale("symlog")
        ax.set_yscale("symlog")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("Manual volume (mL)")
    ax.set_ylabel("Automatic volume (mL)")
    ax.grid(alpha=0.25)
    n = table["patient"].nunique() if regions else 0
    fig.suptitle(f"Automatic vs manual segmentation, holdout patients (n={n}); bar: median")
    fig.tight_layout()
    return fig
