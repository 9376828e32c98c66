"""Quantized models: lossless decoding with a quantized target and/or draft (mlx-lm's
convert, or models.quantize_bits at load), and LoRA training on a quantized draft
(QLoRA) whose adapter mlx-lm applies to the same quantized draft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import tiny_system_config
from mlx_lm import convert
from mlx_lm.generate import generate_step
from mlx_lm.utils import quantize_model
from speclora import SpeculativeDecodingSystem

PROMPTS = ["def f(x):", "Hello", "import os", "class A:", "What is Rust?", "Tell me a story"]
PROBE = mx.array([[1, 5, 9, 13, 17, 21]])


@pytest.fixture(scope="module")
def quantized_dirs(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pair converted by mlx-lm at 4 and 8 bits."""
    root = tmp_path_factory.mktemp("quantized")
    dirs = {}
    for bits in (4, 8):
        for name in ("target", "draft"):
            out = root / f"{name}{bits}"
            convert(str(getattr(tiny_model_dir, name)), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=bits)
            dirs[f"{name}{bits}"] = out
    return dirs


def mlx_lm_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt, mx.uint32), model, max_tokens=n)]


def check_lossless(system: SpeculativeDecodingSystem, target: nn.Module) -> None:
    """Every prompt's tokens are the reference target's greedy tokens (cut at EOS)."""
    rejected = 0
    for prompt in PROMPTS:
        result = system.generate_result(prompt, mode="detailed")
        reference = mlx_lm_greedy(target, result.prompt_tokens, len(result.tokens) + 1)
        assert result.tokens == reference[: len(result.tokens)], prompt
        rejected += result.num_draft_tokens - result.num_accepted_tokens
    assert rejected > 0, "no rejection: the comparison would not exercise rollback"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("which", ["target", "draft", "both"])
def test_models_converted_by_mlx_lm_decode_losslessly(
    tiny_model_dir: Any, quantized_dirs: dict[str, Path], tmp_path: Path, bits: int, which: str
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    if which in ("target", "both"):
        config["models"]["target"] = str(quantized_dirs[f"target{bits}"])
    if which in ("draft", "both"):
        config["models"]["draft"] = str(quantized_dirs[f"draft{bits}"])
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    reference, _ = mlx_lm.load(config["models"]["target"])
    check_lossless(system, reference)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_bits_quantizes_both_models_at_load(tiny_model_dir: Any, tmp_path: Path, bits: int) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    config["models"].update(quantize_bits=bits, quantize_group_size=32)
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    for model in (system.decoder.target_model, system.decoder.draft_model):
        assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # Reference: mlx-lm's own quantization of the target, in float32 as computed here.
    reference, _ = mlx_lm.load(str(tiny_model_dir.target))
    reference.set_dtype(mx.float32)
    quantize_model(reference, {}, 32, bits)
    check_lossless(system, reference)


def test_quantize_bits_outside_the_supported_widths_is_refused(tiny_model_dir: Any, tmp_path: Path) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    config["models"]["quantize_bits"] = 7
    with pytest.raises(ValueError, match=r"models\.quantize_bits.*one of \[2, 3, 4, 5, 6, 8\]"):
        SpeculativeDecodingSystem(config)


def test_qlora_adapter_is_what_mlx_lm_applies_to_the_quantized_draft(
    tiny_model_dir: Any, quantized_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path, num_epochs=2, learning_rate=1e-2)
    config["models"]["draft"] = str(quantized_dirs["draft4"])
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    draft = system.decoder.draft_model
    base = mlx_lm.load(str(quantized_dirs["draft4"]))[0]
    assert mx.array_equal(draft(PROBE), base(PROBE)).item()
    for prompt in PROMPTS:
        system.generate(prompt, mode="detailed")
    result = system.train()
    for alias in ("best", "final"):
        assert system.load_adapter(alias) is True
        with_adapter, _ = mlx_lm.load(str(quantized_dirs["draft4"]), adapter_path=result[f"{'checkpoint' if alias == 'best' else alias}_path"])
        assert mx.allclose(draft(PROBE), with_adapter(PROBE), atol=1e-5).item(), alias
        assert not mx.allclose(draft(PROBE), base(PROBE)).item(), "training changed nothing"
        # The quantized weights themselves are untouched: the update stays unfused.
        assert isinstance(draft.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert system.unload_adapter() is True
    assert mx.array_equal(draft(PROBE), base(PROBE)).item()
    check_lossless(system, mlx_lm.load(str(tiny_model_dir.target))[0])
