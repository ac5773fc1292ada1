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
