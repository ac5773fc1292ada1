"""The report's section on the end-to-end networks: learning curves and saliency maps from results/networks."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest

from radstudy.report.html import write_report


def _history() -> pd.DataFrame:
    """2 splits x 2 endpoints x 2 models, 6 epochs each; the chosen epoch differs per run (2 + run % 3)."""
    rows, run = [], 0
    for split in ("0", "1"):
        for endpoint in ("binary", "survival"):
            for model in ("cnn", "cnn_clinical"):
                best = 2 + run % 3
                for epoch in range(1, 7):
                    rows.append({"split": split, "endpoint": endpoint, "model": model, "epoch": epoch,
                                 "train_loss": 1.0 / epoch, "inner_loss": 0.6 + 0.02 * (epoch - best) ** 2,
                                 "inner_metric": 0.5 + 0.05 * epoch, "seconds": 1.5, "best_epoch": best})
                run += 1
    return pd.DataFrame(rows)


def _png(path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.arange(16).reshape(4, 4))
    fig.savefig(path, dpi=60)
    plt.close(fig)


@pytest.fixture
def networks_dir(tmp_path):
    folder = tmp_path / "networks"
    (folder / "saliency").mkdir(parents=True)
    _history().to_csv(folder / "history.tsv", sep="\t", index=False)
    for name in ("0_binary_cnn_P007.png", "0_binary_cnn_P012.png", "0_survival_cnn_P007.png"):
        _png(folder / "saliency" / name)
    pd.DataFrame([
        {"file": "0_binary_cnn_P007.png", "patient": "P007", "cohort": "training", "split": "0",
         "endpoint": "binary", "model": "cnn", "score": 1.234},
        {"file": "0_binary_cnn_P012.png", "patient": "P012", "cohort": "test", "split": "0",
         "endpoint": "binary", "model": "cnn", "score": -0.5},
        {"file": "0_binary_cnn_P099.png", "patient": "P099", "cohort": "test", "split": "0",
         "endpoint": "binary", "model": "cnn", "score": 0.1},
    ]).to_csv(folder / "saliency" / "index.tsv", sep="\t", index=False)
    return folder


def test_the_section_shows_learning_curves_and_saliency_maps(tmp_path, networks_dir):
    ev = tmp_path / "ev"
    page = write_report(ev, tmp_path / "report.html", networks_dir=networks_dir).read_text()
    assert '<h2 id="networks">End-to-end networks</h2>' in page and 'href="#networks"' in page
    assert "Early stopping used an inner split of each training partition only" in page
    for endpoint in ("binary", "survival"):
        png = ev / "figures" / f"learning_curves_{endpoint}.png"
        assert png.stat().st_size > 10_000 and png.with_suffix(".pdf").is_file()
        assert base64.b64encode(png.read_bytes()).decode() in page  # embedded: one self-contained file
    summary = pd.read_csv(ev / "networks_training.csv", dtype={"split": str})
    assert len(summary) == 8 and (summary["epochs"] == 6).all()
    assert summary["chosen epoch"].tolist() == [2 + run % 3 for run in range(8)]
    assert np.allclose(summary["inner-validation loss"], 0.6)
    assert summary.loc[summary["endpoint"] == "survival", "metric"].eq("Harrell's C").all()
    saliency = networks_dir / "saliency"
    for name in ("0_binary_cnn_P007.png", "0_binary_cnn_P012.png", "0_survival_cnn_P007.png"):
        assert base64.b64encode((saliency / name).read_bytes()).decode() in page
    assert "P007, training cohort, score 1.23 (split 0)" in page
    assert "P012, test cohort, score -0.50 (split 0)" in page
    assert f"P099, test cohort, score 0.10 (split 0): {saliency / '0_binary_cnn_P099.png'} not found." in page
    assert "<h4>Other maps</h4>" in page  # the PNG the index does not name is shown, by its name
    assert page.index("End-to-end networks</h2>") < page.index('<h2 id="software">')


def test_no_section_without_networks(tmp_path):
    for given in (None, tmp_path / "absent", tmp_path / "empty"):
        if given == tmp_path / "empty":
            given.mkdir()
            (given / "history.tsv").write_text("\n")
            (given / "saliency").mkdir()
        page = write_report(tmp_path / "ev", tmp_path / "report.html", networks_dir=given).read_text()
        assert "End-to-end networks" not in page and 'href="#networks"' not in page
    assert not (tmp_path / "ev" / "networks_training.csv").exists()


def test_a_history_without_a_column_fails_naming_the_file_and_column(tmp_path, networks_dir):
    _history().drop(columns="best_epoch").to_csv(networks_dir / "history.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"history.tsv lacks the column\(s\) best_epoch"):
        write_report(tmp_path / "ev", tmp_path / "report.html", networks_dir=networks_dir)
