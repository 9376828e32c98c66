"""Make MLX's CPU matmuls use the system OpenBLAS when it is installed.

The Linux ``mlx[cpu]`` wheel links the reference netlib BLAS (about 8 GFLOP/s on a
1024x1024 fp32 matmul on two cores). Loading OpenBLAS with ``RTLD_GLOBAL`` *before*
``mlx.core`` is first imported makes the dynamic linker resolve MLX's ``sgemm`` and
friends to OpenBLAS instead (about 250 GFLOP/s, same results within fp32 tolerance).
Speculative decoding only pays when verifying K+1 tokens costs about as much as one,
which needs a real BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

OPT_OUT_ENV = "SPECLORA_NO_OPENBLAS"
"""Set this environment variable to ``1`` to keep MLX's bundled BLAS."""

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
)
_FIX = (
    "install OpenBLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`) and "
    "`import speclora` before `mlx.core`; set "
    f"{OPT_OUT_ENV}=1 to silence this warning"
)

state: str = "not tried"
"""One of ``"loaded: <path>"``, ``"opted out"``, ``"not needed"``, ``"unavailable"``,
``"too late"`` or ``"not tried"``; reported by benchmarks next to their figures."""


def preload_openblas() -> str:
    """Load OpenBLAS globally if that can still change what MLX links to.

    Returns:
        str: the resulting :data:`state`.
    """
    global state
    if state != "not tried":
        return state
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        state = "opted out"
    elif sys.platform != "linux":
        # macOS builds use Accelerate; nothing to fix there.
        state = "not needed"
    elif "mlx.core" in sys.modules:
        state = "too late"
        warnings.warn(
            "mlx.core was imported before speclora, so MLX keeps its slow reference "
            f"BLAS on this CPU; {_FIX}.",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        state = "unavailable"
        for candidate in _CANDIDATES:
            try:
                ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            state = f"loaded: {candidate}"
            break
        if state == "unavailable":
            warnings.warn(
                f"OpenBLAS was not found, so MLX uses its slow reference BLAS; {_FIX}.",
                RuntimeWarning,
                stacklevel=3,
            )
    return state
