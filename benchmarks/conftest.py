"""Shared setup for the pytest-benchmark suites: machine and versions recorded
next to every figure."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from speclora import _blas  # must precede mlx.core: it preloads OpenBLAS

# isort: split
import pytest


@pytest.fixture(autouse=True)
def record_environment(request: pytest.FixtureRequest) -> None:
    """Attach versions and the BLAS in use to each benchmark's ``extra_info``."""
    if "benchmark" not in request.fixturenames:
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(
        {
            "machine": f"{platform.machine()} {platform.processor()} x{os.cpu_count()}",
            "python": platform.python_version(),
            "mlx": metadata.version("mlx"),
            "mlx-lm": metadata.version("mlx-lm"),
            "blas": _blas.state,
        }
    )
