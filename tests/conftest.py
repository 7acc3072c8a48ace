"""Shared fixtures: one tiny world, generated once per test session (a few seconds)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import make_world  # noqa: E402
from scene import WorldConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    cfg = WorldConfig(seed=3, n_train=12, n_val=2, n_test=4, max_seconds=8.0)
    return make_world(cfg, str(tmp_path_factory.mktemp("data")), workers=1), cfg
