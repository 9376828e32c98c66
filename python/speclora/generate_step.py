"""A drop-in for ``mlx_lm.generate.speculative_generate_step`` on the fused path.

Same signature and yield contract: ``(token, logprobs, from_draft)`` per token, where
``logprobs [V]`` are the target's processed log-probabilities at that position. An
mlx-lm user swaps one import::

    from speclora import speculative_generate_step
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import greedy_sampler

from speclora.cache import KVQuantization
from speclora.decoding import LogitsProcessor, LoopOptions, host_ints, speculative_rounds
from speclora.drafting import FixedDraftLength

__all__ = ["speculative_generate_step"]

# mlx-lm's "infinite" max_tokens.
_UNBOUNDED = 2**62


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    draft_model: nn.Module,
    stream: Any = generation_stream,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler: Any = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield tokens of ``model`` sped up by ``draft_model``, as mlx-lm's generator does.

    Args:
        prompt (mx.array): ``[S]`` prompt token ids.
        model (nn.Module): The target model.
        draft_model (nn.Module): The draft model.
        stream (mx.Stream): Stream to run on. Default: mlx-lm's generation stream.
        num_draft_tokens (int): Tokens drafted per round. Default: ``2``.
        max_tokens (int): Most tokens to yield; ``-1`` for no limit. Default: ``256``.
        sampler (Callable, optional): mlx-lm sampler over log-probabilities; ``None``
          or mlx-lm's greedy sampler decodes greedily.
        logits_processors (list, optional): mlx-lm logits processors.
        prompt_cache (list, optional): Target caches followed by draft caches, updated
          in place; any layer type mlx-lm builds (empty rotating caches are made
          rollback-able in place).
        prefill_step_size (int): Accepted for compatibility; prompts are prefilled
          in chunks of 512 tokens.
        kv_bits (int, optional): Quantize the KV caches to this many bits from token
          ``quantized_kv_start`` on, as mlx-lm does. Default: ``None`` (no quantization).
        kv_group_size (int): Quantization group size. Default: ``64``.
        quantized_kv_start (int): Token from which the caches are quantized.
          Default: ``5000``.

    Yields:
        tuple[int, mx.array, bool]: a token, the target's log-probabilities ``[V]``
        at its position, and whether the draft proposed it.
    """
    target_cache = draft_cache = None
    if prompt_cache is not None:
        target_cache = prompt_cache[: len(model.layers)]
        draft_cache = prompt_cache[len(model.layers) :]
    options = LoopOptions(
        logits_processors=tuple(logits_processors or ()),
        sampler=None if sampler is None or sampler is greedy_sampler else sampler,
        kv_quantization=(
            None if kv_bits is None else KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
        ),
    )
    limit = _UNBOUNDED if max_tokens == -1 else max_tokens
    with mx.stream(stream):
        for r in speculative_rounds(
            model,
            draft_model,
            host_ints(prompt),
            max_tokens=limit,
            policy=FixedDraftLength(num_draft_tokens),
            options=options,
            target_cache=target_cache,
            draft_cache=draft_cache,
        ):
            logprobs = r.target_logits - mx.logsumexp(r.target_logits, axis=-1, keepdims=True)
            for i, token in enumerate(r.tokens):
                yield token, logprobs[i], i < r.accepted
