"""A C++ program finds the installed package with find_package(speclora CONFIG),
links libspeclora_ops and runs the ops with no Python in the process."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import pytest

CONSUMER = Path(__file__).parent / "cpp_consumer"


def installed_cmake_dir() -> Path:
    """``<site-packages>/speclora/share/cmake/speclora``, next to the extension
    (in an editable install the Python sources live elsewhere)."""
    spec = importlib.util.find_spec("speclora._ext")
    assert spec is not None and spec.origin, "speclora._ext is not installed"
    return Path(spec.origin).parent / "share" / "cmake" / "speclora"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(
    shutil.which("c++") is None
    and shutil.which("g++") is None
    and "CXX" not in os.environ,
    reason="no C++ compiler (c++/g++/$CXX) is installed",
)
def test_cpp_program_links_installed_package(tmp_path: Path) -> None:
    config_dir = installed_cmake_dir()
    assert (config_dir / "specloraConfig.cmake").is_file()
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # No LD_LIBRARY_PATH: the libraries find libmlx through their rpaths.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}

    def run(*command: str) -> str:
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}{done.stderr}"
        return done.stdout

    run(
        "cmake",
        "-S",
        str(CONSUMER),
        "-B",
        str(build),
        *generator,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-Dspeclora_DIR={config_dir}",
    )
    run("cmake", "--build", str(build), "-j2")
    assert "speclora consumer: ok" in run(str(build / "consumer"))
