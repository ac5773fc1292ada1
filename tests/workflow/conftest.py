"""The shared tiny studies (CT and MRI): each generated and run once per pytest run, read by every end-to-end test.

Both are started in background processes as soon as the suite's tests are collected (tests/conftest.py,
`start_background_studies`), so that they run on the core the single-threaded unit tests leave idle; the fixtures
wait for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_study import EXPECTED, RUN_OUTPUT, Study
from background_studies import wait_for


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Study:
    """The tiny study after one full `snakemake` run. Read it; never change it (use `copy_study`)."""
    workdir, code = wait_for("ct", tmp_path_factory)
    output = (workdir / RUN_OUTPUT).read_text()
    assert code == 0, output[-5000:]
    return Study(workdir, json.loads((workdir / EXPECTED).read_text()), output)


@pytest.fixture(scope="session")
def tiny_mri_study(tmp_path_factory) -> tuple[Path, str]:
    """The tiny MRI study (config/mri/ made small) after one full run: (workdir, snakemake's output)."""
    workdir, code = wait_for("mri", tmp_path_factory)
    output = (workdir / RUN_OUTPUT).read_text()
    assert code == 0, output[-5000:]
    return workdir, output
