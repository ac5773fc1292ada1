"""The report's delivery section: masks by source per center, and only the patients whose mask has a note."""

from __future__ import annotations

import pandas as pd

from radstudy.report.html import delivery_html


def test_only_patients_with_a_mask_note_are_listed(tmp_path):
    patients = pd.DataFrame({
        "patient": ["A-0001", "A-0002", "A-0003", "B-0001"],
        "center": ["A", "A", "A", "B"],
        "mask_source": ["label_map", "rtstruct", "none", "label_map"],
        "mask_notes": ["NA", "tumour: union of GTV-1, GTV-2", "NA", ""],
        "unused_files": ["1", "0", "2", "NA"],
    })
    tsv = tmp_path / "patients.tsv"
    patients.to_csv(tsv, sep="\t", index=False)  # NA written as the study's tables write it
    html = delivery_html(tsv, tmp_path)
    notes = pd.read_csv(tmp_path / "mask_notes.csv")
    assert notes["patient"].tolist() == ["A-0002"] and "A-0001" not in html.split("mask_notes.csv")[-1]
    delivery = pd.read_csv(tmp_path / "delivery.csv").set_index("center")
    assert delivery.loc["A", "mask: label_map"] == 1 and delivery.loc["A", "no manual mask"] == 1
    assert delivery.loc["A", "files delivered, not used"] == 3 and delivery.loc["B", "files delivered, not used"] == 0
