import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Outputs of the official code; beside the clone in CI (where their absence is a failure)."""
    if not GOLDEN_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{GOLDEN_DIR} is missing: CI must run with shared/ beside the clone")
        pytest.skip(f"golden outputs of the official code not found at {GOLDEN_DIR}")
    return GOLDEN_DIR
