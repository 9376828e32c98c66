"""SpecLoRA: speculative decoding on MLX whose draft model teaches itself."""

from __future__ import annotations

from speclora._blas import preload_openblas

# Must run before anything imports mlx.core (see speclora._blas).
preload_openblas()
