"""Shared test fixtures. Data fixtures: a tiny synthetic FER-like dataset."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic dataset in the FER2013 layout: 7 classes x (train 16, val 4, test 4), 48x48.

    Session-scoped and shared: treat it as read-only (copy it to modify; the loaders' cache
    under <root>/.cache is fine).
    """
    from make_synthetic import make_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic(out, seed=0, splits={"train": 16, "val": 4, "test": 4})
