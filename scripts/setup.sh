#!/usr/bin/env bash
# Set up SpecLoRA from a fresh clone: system OpenBLAS (where apt is available),
# a virtual environment in .venv, and the package with its native extension and
# test dependencies. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# MLX's Linux CPU wheel links a slow reference BLAS; speclora swaps in OpenBLAS at
# import when the system has it (about 30x faster matmuls).
if [[ "$(uname -s)" == "Linux" ]] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: install OpenBLAS (libopenblas.so.0) for fast CPU inference" >&2
  fi
fi

if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  echo "error: a C++20 compiler is needed to build the extension (Debian/Ubuntu: apt-get install g++)" >&2
  exit 1
fi

PYTHON="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[test]"
