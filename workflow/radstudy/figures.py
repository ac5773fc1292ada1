"""Figures: the one way a figure is written (PNG for the report, PDF for print), used by evaluate and report."""

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
