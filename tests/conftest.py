"""Shared pytest fixtures: the repository root on sys.path and one tiny toy dataset per session."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy dataset (24 train / 8 val images) in VOC layout, generated once per test session."""
    from common.data import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "toy", num_train=24, num_val=8, seed=0)
