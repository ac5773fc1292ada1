from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference (published data by others); tests that need it skip on a fresh clone without it."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is absent")
    return SHARED_REFERENCE
