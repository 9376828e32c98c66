"""One context check, one error, at every generation entry point; the shipped pair's
declared context holds the API reference's 1024-token example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from helpers import tiny_system_config
from mlx_lm.generate import generate_step
from speclora import SpeculativeDecodingSystem
from speclora.config import Config
from speclora.speculative import SpeculativeDecoder
from speclora.speculative_manual import ManualSpeculativeDecoder

WINDOW = 512  # the tiny target's max_position_embeddings


@pytest.fixture
def system(tiny_model_dir: Any, tmp_path: Path) -> SpeculativeDecodingSystem:
    s = SpeculativeDecodingSystem(tiny_system_config(tiny_model_dir, tmp_path))
    s.initialize()
    return s


def test_every_entry_point_refuses_past_the_window_with_one_message(system: SpeculativeDecodingSystem) -> None:
    fast = system.decoder
    assert fast is not None
    prompt = fast.encode_prompt("Hello")
    fits = WINDOW - len(prompt)
    expected = re.escape(
        f"prompt ({len(prompt)} tokens) + max_tokens ({fits + 1}) = {WINDOW + 1} exceeds "
        f"the target's context window of {WINDOW} tokens"
    )
    decoders = [
        fast,
        system.decoder,
        SpeculativeDecoder(fast.target_model, fast.draft_model, fast.tokenizer, 3, 0.0),
        ManualSpeculativeDecoder(fast.target_model, fast.draft_model, fast.tokenizer, 3, 0.0),
    ]
    for decoder in decoders:
        with pytest.raises(MemoryError, match=expected):
            decoder.generate(prompt, fits + 1)
    for mode in ("fast", "detailed"):
        with pytest.raises(MemoryError, match=expected):
            system.generate("Hello", mode=mode, max_tokens=fits + 1)
    assert system.get_stats()["generation_count"] == 0
    # At the window itself, generation runs (and stops at EOS or the limit).
    assert len(fast.generate(prompt, fits).tokens) <= fits


def test_shipped_pair_runs_the_references_long_example_past_its_training_length(tmp_path: Path) -> None:
    """The pair trained on 256-token windows declares 2048 (measured in
    benchmarks/long_context.py); the reference's max_tokens=1024 example fits, and
    decoding past position 256 is still the target's own output."""
    config = Config.from_dict({}).to_dict()
    config["collection"]["data_dir"] = str(tmp_path / "failures")
    config["training"]["checkpoint_dir"] = str(tmp_path / "checkpoints")
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.manager is not None
    prompt = system.decoder.encode_prompt("Explain Python in detail.")
    system.manager.check_fits(len(prompt), 1024)  # no MemoryError
    n = 320 - len(prompt)  # well past the 256 positions trained on
    result = system.generate_result("Explain Python in detail.", mode="detailed", max_tokens=n)
    target = system.decoder.target_model
    reference = [int(t) for t, _ in generate_step(mx.array(prompt, mx.uint32), target, max_tokens=n)]
    assert result.tokens == reference[: len(result.tokens)]
    assert len(prompt) + len(result.tokens) > 256 or result.finish_reason == "stop"
