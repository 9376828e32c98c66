"""Shared fixtures: tiny seeded models written to disk once per test session."""

from __future__ import annotations

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import pytest
from helpers import TinyModelDirs, make_tiny_pair


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDirs:
    """A tiny target (64-wide, 2 blocks) and draft (32-wide, 1 block) sharing a tokenizer.

    Read-only for tests: copy a directory before modifying it.
    """
    return make_tiny_pair(tmp_path_factory.mktemp("tiny_models"))
