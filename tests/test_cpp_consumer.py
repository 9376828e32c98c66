"""A C++ program finds the installed package with find_package(speclora CONFIG),
links libspeclora_ops and runs the ops with no Python in the process."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import pytest

CONSUMER = Path(__file__).parent / "cpp_consumer"


def installed_cmake_dir() -> Path:
    """What a user is told to pass as ``speclora_DIR``: ``python -m speclora --cmake-dir``."""
    done = subprocess.run(
        [sys.executable, "-m", "speclora", "--cmake-dir"], check=True, capture_output=True, text=True
    )
    return Path(done.stdout.strip())


def test_cmake_dir_is_beside_the_extension() -> None:
    """In an editable install the Python sources live elsewhere: the CMake package
    is where the extension was installed."""
    spec = importlib.util.find_spec("speclora._ext")
    assert spec is not None and spec.origin, "speclora._ext is not installed"
    assert installed_cmake_dir() == Path(spec.origin).parent / "share" / "cmake" / "speclora"


def find_cmake() -> str | None:
    """The ``cmake`` of this environment (the ``test`` extra installs one next to the
    interpreter, which need not be on PATH when the venv is not activated), else PATH's."""
    return shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which(
        "cmake"
    )


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def require(tool: str | None, what: str) -> str:
    """``tool``, or skip the test; in CI (``CI=true``) a missing tool fails it instead,
    so the test cannot pass there by not running."""
    if tool is None:
        message = f"{what} is not installed"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(
                f"{message}, and CI must run this test (pip install '.[test]' provides cmake)"
            )
        pytest.skip(message)
    return tool


def test_cpp_program_links_installed_package(tmp_path: Path) -> None:
    cmake = require(find_cmake(), "cmake")
    require(find_cxx(), "a C++ compiler (c++/g++/$CXX)")
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
        cmake,
        "-S",
        str(CONSUMER),
        "-B",
        str(build),
        *generator,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-Dspeclora_DIR={config_dir}",
    )
    run(cmake, "--build", str(build), "-j2")
    assert "speclora consumer: ok" in run(str(build / "consumer"))
