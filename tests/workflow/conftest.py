"""The shared tiny study: generated and run once per pytest run, read by every end-to-end test."""

from __future__ import annotations

import pytest

from tiny_study import Study, run, slip_in_bad_patients, write_tiny_study


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Study:
    """The tiny study after one full `snakemake` run. Read it; never change it (use `copy_study`)."""
    workdir = tmp_path_factory.mktemp("tiny_study")
    write_tiny_study(workdir)
    demo = run(workdir, "demo_cohort")
    assert demo.returncode == 0, demo.stderr[-3000:]
    expected = slip_in_bad_patients(workdir / "demo" / "dicom" / "A", workdir / "demo" / "clinical" / "A.csv")
    full = run(workdir)
    assert full.returncode == 0, full.stderr[-5000:]
    return Study(workdir, expected, full.stdout + full.stderr)
