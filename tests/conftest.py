from __future__ import annotations

from pathlib import Path

import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
# test helpers (dicom_factory, the tiny study) import by name from any test folder (pytest --import-mode=importlib)
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "workflow")]


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference (published data by others); tests that need it skip on a fresh clone without it."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is absent")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def tiny_nnunet(tmp_path_factory) -> dict:
    """The suite's one tiny trained nnU-Net (tests/tiny_nnunet.py): {root, cases, split, plans_file, model}."""
    from tiny_nnunet import train_tiny_nnunet

    return train_tiny_nnunet(tmp_path_factory.mktemp("tiny_nnunet"))


def pytest_collection_modifyitems(items):
    """The tests of the shared tiny study's SLURM runs last: the runs go on in the background once that study has
    finished (tests/background_studies.py), while every other test that reads it runs."""
    import background_studies

    items.sort(key=lambda item: background_studies.FIXTURES["slurm"] in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    """Start the end-to-end studies that the selected tests need, in background processes (tests/background_studies.py):
    they run while the unit tests run."""
    if session.config.option.collectonly:
        return
    import background_studies

    for kind, fixture in background_studies.FIXTURES.items():
        if any(fixture in getattr(item, "fixturenames", ()) for item in session.items):
            background_studies.start(kind, session.config._tmp_path_factory)


def pytest_sessionfinish(session):
    import background_studies

    background_studies.stop_all()
