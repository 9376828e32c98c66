"""SpecLoRA: speculative decoding on MLX whose draft model teaches itself.

Public entry points (imported on first use, so ``import speclora`` stays light)::

    from speclora import SpeculativeDecodingSystem       # the whole system
    from speclora import speculative_accept              # fused acceptance op
    from speclora import speculative_generate_step       # mlx-lm drop-in
    from speclora import make_speculative_cache          # caches trimmable in every state
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from speclora._blas import preload_openblas

# Must run before anything imports mlx.core (see speclora._blas).
preload_openblas()

__version__ = "0.1.0"

_EXPORTS = {
    "SpeculativeDecodingSystem": "speclora.main",
    "SpeculativeDecoder": "speclora.speculative",
    "ManualSpeculativeDecoder": "speclora.speculative_manual",
    "GenerationResult": "speclora.results",
    "speculative_accept": "speclora.acceptance",
    "speculative_generate_step": "speclora.generate_step",
    "make_speculative_cache": "speclora.cache",
    "ModelManager": "speclora.models",
    "DataCollector": "speclora.data_collector",
    "TrainingExample": "speclora.records",
    "Disagreement": "speclora.records",
    "LoRATrainer": "speclora.training",
    "load_config": "speclora.config",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from speclora.acceptance import speculative_accept
    from speclora.cache import make_speculative_cache
    from speclora.config import load_config
    from speclora.data_collector import DataCollector
    from speclora.generate_step import speculative_generate_step
    from speclora.main import SpeculativeDecodingSystem
    from speclora.models import ModelManager
    from speclora.records import Disagreement, TrainingExample
    from speclora.results import GenerationResult
    from speclora.speculative import SpeculativeDecoder
    from speclora.speculative_manual import ManualSpeculativeDecoder
    from speclora.training import LoRATrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'speclora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
