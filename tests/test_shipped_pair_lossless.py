"""On the shipped model pair, greedy speculative decoding reproduces the target alone."""

from __future__ import annotations

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from speclora.models import ModelManager
from speclora.speculative import SpeculativeDecoder
from speclora.zoo import load_prompts

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def pair():
    manager = ModelManager({})
    target, draft = manager.load_models()
    return target, draft, manager.tokenizer


def target_alone(target, prompt: list[int], eos: set[int]) -> list[int]:
    out = []
    for token, _ in generate_step(mx.array(prompt, mx.uint32), target, max_tokens=MAX_TOKENS):
        if int(token) in eos:
            break
        out.append(int(token))
    return out


@pytest.mark.parametrize("domain", ["prose", "code"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["K=3", "adaptive"])
def test_greedy_identical_to_target_alone(pair, domain, adaptive):
    target, draft, tokenizer = pair
    decoder = SpeculativeDecoder(target, draft, tokenizer, 3, 0.0, adaptive_draft=adaptive)
    eos = set(tokenizer.eos_token_ids)
    prompts = load_prompts(domain, "eval")[:25]
    drafted = accepted = 0
    for text in prompts:
        tokens = decoder.encode_prompt(text)
        result = decoder.generate(tokens, MAX_TOKENS)
        assert result.tokens == target_alone(target, tokens, eos), text
        drafted += result.num_draft_tokens
        accepted += result.num_accepted_tokens
    # Real models: some drafts accepted, some rejected, so both paths ran.
    assert 0 < accepted < drafted
