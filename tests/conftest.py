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
