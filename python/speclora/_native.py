"""Access to the compiled ops (``speclora._ext``) and the stream they run on.

The extension holds the CPU kernels; each op's Python wrapper sends CPU streams
there and any other stream (Metal, CUDA) to its composition of MLX ops.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import mlx.core as mx

_module: ModuleType | None = None


def extension() -> Any:
    """The compiled extension, loaded on first use.

    Raises:
        ImportError: if the package was not built, saying how to build it.
    """
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("speclora._ext")
        except ImportError as e:
            raise ImportError(
                "speclora's native extension (speclora._ext) is not built; install "
                "the package with `pip install .` or `pip install -e .`"
            ) from e
    return _module


def resolve_stream(stream: mx.Stream | mx.Device | mx.DeviceType | None) -> mx.Stream:
    """The stream an op given ``stream=`` runs on, as MLX ops resolve it."""
    if stream is None:
        return mx.default_stream(mx.default_device())
    if isinstance(stream, mx.DeviceType):
        return mx.default_stream(mx.Device(stream))
    if isinstance(stream, mx.Device):
        return mx.default_stream(stream)
    return stream


def on_cpu(stream: mx.Stream) -> bool:
    """Whether the C++ kernels can run on ``stream``."""
    return bool(stream.device.type == mx.cpu)
