"""Speculative decoding on mlx-lm's model families and cache types, against mlx-lm alone.

Each family is a tiny random in-code instance (32 wide, 2 layers; Llama 4: 4); its
draft is the same model with a little weight noise, so rounds accept all, some or
none of the drafts. The references come from mlx-lm only:

* without a window, ``generate_step`` on the model's own caches (``make_cache()``);
* with ``max_kv_size=W``, ``generate_step`` fed one token at a time
  (``prefill_step_size=1``) on the model's own caches with every full-attention
  ``KVCache`` replaced by mlx-lm's ``RotatingKVCache(W, keep=4)``: what mlx-lm's
  ``make_prompt_cache(model, max_kv_size=W)`` builds for models without
  ``make_cache`` (for models with one it ignores ``W``). Token by token, because
  mlx-lm's rotating cache evicts differently for a multi-token chunk past the
  window (see the README's "Models and caches");
* with ``kv_bits``, ``generate_step(kv_bits=..., quantized_kv_start=...)`` fed one
  token at a time: the switch to quantized then falls exactly on the token
  ``quantized_kv_start`` (with a chunked prefill, mlx-lm switches after the chunk).

The matrix of the README and of ``FAMILIES`` below is reproduced by
``pytest tests/test_architectures.py``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, ClassVar

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.generate import (
    speculative_generate_step as mlx_lm_speculative_generate_step,
)
from mlx_lm.models import (
    falcon_h1,
    gemma2,
    gemma3_text,
    lfm2,
    llama,
    llama4,
    mamba,
    phi3,
    qwen2,
    qwen3,
    recurrent_gemma,
)
from mlx_lm.models.cache import (
    CacheList,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from speclora import SpeculativeDecodingSystem
from speclora.cache import (
    DEFAULT_HEADROOM,
    CacheRewinder,
    RollbackKVCache,
    make_speculative_cache,
)
from speclora.decoding import LoopOptions, speculative_rounds
from speclora.drafting import FixedDraftLength, RoundCost
from speclora.generate_step import speculative_generate_step
from speclora.sampling import SamplingParams
from speclora.speculative import SpeculativeDecoder
from stats_helpers import chi_square_pvalue

VOCAB = 64
WINDOW = 8  # max_kv_size; the sliding layers below use 6
PROMPT_LEN = 13  # longer than the window
MAX_TOKENS = 40

ATTENTION = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class Family:
    module: ModuleType
    config: dict[str, Any]
    # 2-D weights are multiplied by this: tiny random models otherwise repeat one token.
    scale: float
    caches: str  # the layer caches mlx-lm builds for it (the README's matrix)


def family(module: ModuleType, scale: float, caches: str, **config: Any) -> Family:
    config = {"vocab_size": VOCAB, "tie_word_embeddings": False, **config}
    return Family(module, config, scale, caches)


FAMILIES = {
    "llama": family(llama, 2, "KVCache", model_type="llama", **ATTENTION),
    "llama-sliding": family(
        llama,
        2,
        "RotatingKVCache(6) sliding + KVCache",
        model_type="llama",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=6,
        **ATTENTION,
    ),
    # mlx-lm loads "mistral" with its llama module (all layers full attention).
    "mistral": family(
        llama, 4, "KVCache", model_type="mistral", sliding_window=4096, **ATTENTION
    ),
    "qwen2": family(qwen2, 4, "KVCache", model_type="qwen2", **ATTENTION),
    "qwen3": family(
        qwen3,
        2,
        "KVCache",
        model_type="qwen3",
        head_dim=8,
        max_position_embeddings=512,
        rope_theta=10000.0,
        **ATTENTION,
    ),
    "gemma2": family(
        gemma2, 4, "KVCache", model_type="gemma2", head_dim=8, **ATTENTION
    ),
    "gemma3": family(
        gemma3_text,
        1,
        "RotatingKVCache(6) sliding + KVCache global",
        model_type="gemma3_text",
        head_dim=8,
        sliding_window=6,
        sliding_window_pattern=2,
        **ATTENTION,
    ),
    "phi3": family(phi3, 2, "KVCache", model_type="phi3", **ATTENTION),
    "mamba": family(
        mamba,
        2,
        "ArraysCache",
        model_type="mamba",
        hidden_size=32,
        intermediate_size=64,
        state_size=8,
        num_hidden_layers=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=4,
    ),
    "lfm2": family(
        lfm2,
        2,
        "ArraysCache conv + KVCache",
        model_type="lfm2",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=32,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        block_ff_dim=64,
        layer_types=["conv", "full_attention"],
    ),
    "recurrent_gemma": family(
        recurrent_gemma,
        2,
        "ArraysCache + RotatingKVCache(6)",
        model_type="recurrent_gemma",
        attention_bias=False,
        conv1d_width=4,
        hidden_size=32,
        intermediate_size=64,
        logits_soft_cap=30.0,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_window_size=6,
        block_types=["recurrent", "attention"],
    ),
    # Chunked attention (ChunkedKVCache) in three layers of four, global in the fourth.
    "llama4": family(
        llama4,
        2,
        "ChunkedKVCache(6) + KVCache",
        model_type="llama4",
        text_config={
            "model_type": "llama4_text",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "intermediate_size": 32,
            "intermediate_size_mlp": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "attention_chunk_size": 6,
            "attention_bias": False,
            "interleave_moe_layer_step": 2,
            "num_experts_per_tok": 1,
            "num_local_experts": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "use_qk_norm": True,
        },
    ),
    "falcon_h1": family(
        falcon_h1,
        2,
        "CacheList(ArraysCache, KVCache)",
        model_type="falcon_h1",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=8,
    ),
}


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    f = FAMILIES[name]
    args = f.module.ModelArgs.from_dict({**f.config, **overrides})
    mx.random.seed(seed)
    model = f.module.Model(args)
    weights = tree_flatten(model.parameters())
    model.update(
        tree_unflatten(
            [
                (k, v * f.scale if v.ndim >= 2 and "embed" not in k else v)
                for k, v in weights
            ]
        )
    )
    mx.eval(model.parameters())
    model.eval()
    return model


def with_noise(
    name: str, model: nn.Module, noise: float, seed: int, **overrides: Any
) -> nn.Module:
    """A copy of ``model`` whose matrices get Gaussian noise of ``noise`` times their RMS."""
    copy = build(name, **overrides)
    weights = []
    for i, (k, v) in enumerate(tree_flatten(model.parameters())):
        if v.ndim >= 2:
            rms = mx.sqrt(mx.mean(v * v))
            v = v + noise * rms * mx.random.normal(
                v.shape, key=mx.random.key(seed * 1000 + i)
            )
        weights.append((k, v))
    copy.update(tree_unflatten(weights))
    mx.eval(copy.parameters())
    return copy


@cache
def pair(name: str, quantizable: bool = False) -> tuple[nn.Module, nn.Module]:
    """Target and draft; ``quantizable``: one 32-wide attention head, so that KV
    quantization groups of 32 fit."""
    overrides: dict[str, Any] = {}
    if quantizable:
        overrides = {"num_attention_heads": 1, "num_key_value_heads": 1}
        if "head_dim" in FAMILIES[name].config:
            overrides["head_dim"] = 32
    target = build(name, **overrides)
    return target, with_noise(name, target, 0.05, 7, **overrides)


def prompt_tokens(seed: int = 1) -> list[int]:
    return mx.random.randint(0, VOCAB, (PROMPT_LEN,), key=mx.random.key(seed)).tolist()


class Tokenizer:
    """Just enough of mlx-lm's TokenizerWrapper for the decoders (token-id prompts)."""

    eos_token_ids: ClassVar[set[int]] = set()
    bos_token = None
    has_chat_template = False

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


# ------------------------------------------------------------ mlx-lm references


def mlx_lm_windowed_cache(model: nn.Module, window: int) -> list[Any]:
    """The model's own mlx-lm caches, full-attention ``KVCache`` -> ``RotatingKVCache(window, keep=4)``."""

    def convert(c: Any) -> Any:
        if isinstance(c, CacheList):
            return CacheList(*(convert(x) for x in c.caches))
        return RotatingKVCache(max_size=window, keep=4) if type(c) is KVCache else c

    return [convert(c) for c in make_prompt_cache(model)]


@cache
def reference(name: str, window: int | None, max_tokens: int = MAX_TOKENS) -> list[int]:
    target, _ = pair(name)
    prompt = mx.array(prompt_tokens(), mx.uint32)
    if window is None:
        steps = generate_step(prompt, target, max_tokens=max_tokens)
    else:
        cache_ = mlx_lm_windowed_cache(target, window)
        steps = generate_step(
            prompt,
            target,
            max_tokens=max_tokens,
            prompt_cache=cache_,
            prefill_step_size=1,
        )
    return [int(t) for t, _ in steps]


# ---------------------------------------------------------------- the matrix


def decoder(
    name: str, *, adaptive: bool, quantizable: bool = False, **options: Any
) -> SpeculativeDecoder:
    target, draft = pair(name, quantizable)
    return SpeculativeDecoder(
        target,
        draft,
        Tokenizer(),
        num_draft_tokens=3,
        temperature=0.0,
        adaptive_draft=adaptive,
        max_draft_tokens=5,
        round_cost=RoundCost(draft_step=0.1),
        **options,
    )


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-K", "adaptive-K"])
@pytest.mark.parametrize(
    "window", [None, WINDOW], ids=["no-window", f"max_kv_size={WINDOW}"]
)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_is_mlx_lm_greedy(name: str, window: int | None, adaptive: bool) -> None:
    result = decoder(name, adaptive=adaptive, max_kv_size=window).generate(
        prompt_tokens(), MAX_TOKENS
    )
    assert result.tokens == reference(name, window)
    # Both caches rolled back: some drafts were accepted, some rejected.
    assert 0 < result.num_accepted_tokens < result.num_draft_tokens


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_draft_proposals_are_the_drafts_own_greedy_tokens(name: str) -> None:
    """The draft's caches roll back correctly too (outputs alone would not show it:
    a wrong draft only lowers acceptance). Each round's proposals must be the draft's
    greedy continuation of the text so far, by mlx-lm from scratch."""
    target, draft = pair(name)
    history = prompt_tokens()
    rounds = speculative_rounds(
        target,
        draft,
        history,
        max_tokens=MAX_TOKENS // 2,
        policy=FixedDraftLength(3),
        options=LoopOptions(),
    )
    for r in rounds:
        if r.drafted:
            steps = generate_step(
                mx.array(history, mx.uint32), draft, max_tokens=r.drafted
            )
            assert r.draft_tokens == [int(t) for t, _ in steps], r.position
        history = history + r.tokens


KV_BITS = {"kv_bits": 2, "kv_group_size": 32}
# mlx-lm fails on these once quantization starts: sliding-window layers have no
# quantized form, and gemma2's attention cannot read a quantized cache.
KV_BITS_REFUSED = {"gemma2", "gemma3", "llama-sliding", "recurrent_gemma"}


@pytest.mark.parametrize("start", [5, 20], ids=["switch-in-prompt", "switch-in-output"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kv_bits_is_mlx_lm_kv_bits(name: str, start: int) -> None:
    """``kv_bits``: the KV layers turn quantized at the same token as in mlx-lm fed
    one token at a time, with the switch inside the prompt or inside the output.
    Where mlx-lm fails once the switch comes, the loop refuses before any model call.
    """
    target, draft = pair(name, quantizable=True)
    prompt = mx.array(prompt_tokens(), mx.uint32)
    spec = decoder(
        name, adaptive=False, quantizable=True, quantized_kv_start=start, **KV_BITS
    )

    def mlx_lm(**quantization: int) -> list[int]:
        steps = generate_step(
            prompt, target, max_tokens=MAX_TOKENS, prefill_step_size=1, **quantization
        )
        return [int(t) for t, _ in steps]

    if name in KV_BITS_REFUSED:
        with pytest.raises((NotImplementedError, AttributeError)):
            mlx_lm(quantized_kv_start=start, **KV_BITS)
        rounds = speculative_rounds(
            target,
            draft,
            prompt_tokens(),
            max_tokens=MAX_TOKENS,
            policy=FixedDraftLength(3),
            options=LoopOptions(kv_quantization=spec.kv_quantization),
        )
        with pytest.raises(ValueError, match=r"\[KVQuantization\] "):
            next(rounds)
        return
    expected = mlx_lm(quantized_kv_start=start, **KV_BITS)
    assert spec.generate(prompt_tokens(), MAX_TOKENS).tokens == expected
    if any(isinstance(c, KVCache) for c in make_prompt_cache(target)):
        assert expected != mlx_lm(), "quantization must change the output"


@pytest.mark.parametrize("name", ["llama", "lfm2"])
def test_drop_in_kv_bits_is_mlx_lm_kv_bits(name: str) -> None:
    """The drop-in takes mlx-lm's kv_bits arguments and gives mlx-lm's tokens."""
    target, draft = pair(name, quantizable=True)
    prompt = mx.array(prompt_tokens(), mx.uint32)
    options = {"quantized_kv_start": 20, **KV_BITS}
    expected = [
        int(t)
        for t, _ in generate_step(prompt, target, max_tokens=MAX_TOKENS, prefill_step_size=1, **options)
    ]
    tokens = [
        t
        for t, _, _ in speculative_generate_step(
            prompt, target, draft, num_draft_tokens=3, max_tokens=MAX_TOKENS, **options
        )
    ]
    assert tokens == expected


# ------------------------------------------- windows through the public entry points

CAPACITY = WINDOW + DEFAULT_HEADROOM  # slots of a windowed buffer
LONG_PROMPT = 40  # longer than the window and than one in-place block


def long_prompt(seed: int = 3) -> list[int]:
    return mx.random.randint(0, VOCAB, (LONG_PROMPT,), key=mx.random.key(seed)).tolist()


def mlx_lm_windowed(
    model: nn.Module, prompt: list[int], window: int, max_tokens: int
) -> list[int]:
    steps = generate_step(
        mx.array(prompt, mx.uint32),
        model,
        max_tokens=max_tokens,
        prompt_cache=mlx_lm_windowed_cache(model, window),
        prefill_step_size=1,
    )
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize("name", ["llama", "gemma3", "recurrent_gemma"])
def test_decoder_window_far_past_the_buffer(name: str) -> None:
    """``SpeculativeDecoder(max_kv_size=...)``: the ring buffer wraps three times."""
    target, _ = pair(name)
    max_tokens = 3 * CAPACITY
    spec = decoder(name, adaptive=False, max_kv_size=WINDOW)
    result = spec.generate(long_prompt(), max_tokens)
    assert result.tokens == mlx_lm_windowed(target, long_prompt(), WINDOW, max_tokens)
    assert result.num_accepted_tokens > 0


def test_config_window_far_past_the_buffer(tiny_model_dir, tmp_path) -> None:
    """``generation.max_kv_size`` in the config, through the system."""
    window = 16
    config = {
        "models": {
            "target": str(tiny_model_dir.target),
            "draft": str(tiny_model_dir.draft),
        },
        "generation": {
            "max_tokens": 8,
            "temperature": 0.0,
            "num_draft_tokens": 3,
            "adaptive_draft": False,
            "max_kv_size": window,
        },
        "collection": {"data_dir": str(tmp_path / "data")},
        "training": {"checkpoint_dir": str(tmp_path / "checkpoints")},
        "logging": {"show_progress": False},
    }
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    max_tokens = 3 * (window + DEFAULT_HEADROOM)
    prompt = "The window is much shorter than this prompt, which goes on and on."
    result = system.generate_result(prompt, max_tokens=max_tokens)
    assert len(result.prompt_tokens) > window
    expected = mlx_lm_windowed(
        system.decoder.target_model, result.prompt_tokens, window, max_tokens
    )
    eos = system.decoder.tokenizer.eos_token_ids
    stop = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert result.tokens == expected[:stop]
    assert len(result.tokens) > 2 * (window + DEFAULT_HEADROOM)


def test_drop_in_with_a_windowed_prompt_cache() -> None:
    target, draft = pair("gemma3")
    max_tokens = 3 * CAPACITY
    cache_ = make_speculative_cache(target, WINDOW) + make_speculative_cache(
        draft, WINDOW
    )
    tokens = [
        t
        for t, _, _ in speculative_generate_step(
            mx.array(long_prompt(), mx.uint32),
            target,
            draft,
            num_draft_tokens=3,
            max_tokens=max_tokens,
            prompt_cache=cache_,
        )
    ]
    assert tokens == mlx_lm_windowed(target, long_prompt(), WINDOW, max_tokens)


@pytest.mark.parametrize("name", ["gemma3", "lfm2", "falcon_h1"])
def test_drop_in_with_mlx_lm_prompt_caches(name: str) -> None:
    """mlx-lm's own ``make_prompt_cache`` caches, as an mlx-lm user passes them.

    Gemma 3's sliding layers are ``RotatingKVCache``, which cannot roll back once
    wrapped: the loop turns them, in the caller's list, into caches that can. The
    recurrent state of the hybrids is rolled back; mlx-lm's own speculative
    decoding refuses them.
    """
    target, draft = pair(name)
    prompt = mx.array(long_prompt(), mx.uint32)
    max_tokens = 3 * (6 + DEFAULT_HEADROOM)
    cache_ = make_prompt_cache(target) + make_prompt_cache(draft)
    steps = speculative_generate_step(
        prompt,
        target,
        draft,
        num_draft_tokens=3,
        max_tokens=max_tokens,
        prompt_cache=cache_,
    )
    tokens = [t for t, _, _ in steps]
    plain = generate_step(prompt, target, max_tokens=max_tokens)
    assert tokens == [int(t) for t, _ in plain]
    if name == "gemma3":
        assert isinstance(cache_[0], RollbackKVCache) and cache_[0].offsets[0] > 3 * 6
    else:
        with pytest.raises(ValueError, match="trimmable"):
            next(mlx_lm_speculative_generate_step(prompt, target, draft))


# ------------------------------------------------------- recurrent state rollback


@pytest.mark.parametrize("name", ["mamba", "lfm2", "recurrent_gemma", "falcon_h1"])
def test_rewind_then_regenerate_gives_identical_tokens(name: str) -> None:
    """generate -> roll back (restore + replay the kept tokens) -> regenerate."""
    target, _ = pair(name)
    cache_ = make_speculative_cache(target)
    rewinder = CacheRewinder(target, cache_)
    prompt = mx.array(long_prompt(), mx.uint32)
    target(prompt[None, :-1], cache=cache_)

    def generate(first: mx.array, n: int) -> tuple[list[int], list[mx.array]]:
        y, tokens, logits = first, [], []
        for _ in range(n):
            out = target(y[None], cache=cache_)[0, -1]
            y = mx.argmax(out, keepdims=True).astype(mx.uint32)
            tokens.append(y.item())
            logits.append(out)
        return tokens, logits

    rewinder.reset()
    rewinder.checkpoint()
    first_tokens, first_logits = generate(prompt[-1:], 6)
    fed = mx.array([prompt[-1].item(), *first_tokens[:-1]], mx.uint32)
    # Keep two of the six tokens fed since the checkpoint, then go on from there.
    rewinder.rewind(fed, 2)
    second_tokens, second_logits = generate(mx.array(first_tokens[1:2], mx.uint32), 4)
    assert second_tokens == first_tokens[2:]
    for a, b in zip(first_logits[2:], second_logits):
        assert mx.allclose(a, b, atol=1e-4)


def test_missing_rewind_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix has power for recurrent models: without restoring the state, the
    output is no longer the target's."""
    monkeypatch.setattr(CacheRewinder, "checkpoint", lambda self: None)
    monkeypatch.setattr(CacheRewinder, "rewind", lambda self, fed, keep, since=0: None)
    result = decoder("mamba", adaptive=False).generate(prompt_tokens(), MAX_TOKENS)
    assert result.tokens != reference("mamba", None)


# ------------------------------------------------ temperature > 0 on a hybrid model

SMALL_VOCAB = 5
SAMPLES = 600
TEMPERATURE = 0.5


@cache
def disagreeing_hybrid_pair() -> tuple[nn.Module, nn.Module]:
    """Two lfm2 models (a convolution layer with recurrent state, and attention) whose
    next-token distributions differ, so rejections and residual sampling matter."""
    return (
        build("lfm2", seed=3, vocab_size=SMALL_VOCAB),
        build("lfm2", seed=4, vocab_size=SMALL_VOCAB),
    )


def exact_distribution(
    model: nn.Module, prompt: list[int], temperature: float, length: int
) -> dict[tuple[int, ...], float]:
    """Probability of every continuation of ``length`` tokens, by full recompute."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, p in probs.items():
            logits = model(mx.array([prompt + list(seq)], mx.uint32))[0, -1]
            for token, q in enumerate(mx.softmax(logits / temperature).tolist()):
                grown[seq + (token,)] = p * q
        probs = grown
    return probs


def sample_counts(
    target: nn.Module, draft: nn.Module, prompt: list[int], seed: int
) -> tuple[Counter, int]:
    mx.random.seed(seed)
    counts: Counter[tuple[int, ...]] = Counter()
    rejected = 0
    options = LoopOptions(sampling=SamplingParams(temperature=TEMPERATURE))
    for _ in range(SAMPLES):
        rounds = list(
            speculative_rounds(
                target,
                draft,
                prompt,
                max_tokens=3,
                policy=FixedDraftLength(2),
                options=options,
            )
        )
        counts[tuple(t for r in rounds for t in r.tokens)] += 1
        rejected += rounds[0].accepted < rounds[0].drafted
    return counts, rejected


def test_sampling_on_a_hybrid_model_follows_the_target() -> None:
    """Chi-square test over three tokens at T = 0.5, 600 seeded samples, K = 2.

    A rejection in the first round rolls the convolution state back (restore and
    replay), and the next tokens depend on it. The significance level 1e-3 is the
    test's false-failure rate were it unseeded; seeded, its outcome is fixed (a
    p-value of about 0.4 here, while a missing rollback gives about 1e-50).
    """
    target, draft = disagreeing_hybrid_pair()
    prompt = [1, 2, 3]
    expected = exact_distribution(target, prompt, TEMPERATURE, 3)
    counts, rejected = sample_counts(target, draft, prompt, seed=11)
    assert 0.1 < rejected / SAMPLES < 0.9, "the test must exercise both branches"
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_sampling_test_detects_a_missing_rewind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same test, with rollback of recurrent state disabled, fails: it has power."""
    target, draft = disagreeing_hybrid_pair()
    prompt = [1, 2, 3]
    expected = exact_distribution(target, prompt, TEMPERATURE, 3)
    original = CacheRewinder.rewind

    def trim_only(
        self: CacheRewinder, fed: mx.array, keep: int, since: int = 0
    ) -> None:
        self.recurrent = False  # trims the KV layers, leaves recurrent state as is
        original(self, fed, keep, since=since)

    monkeypatch.setattr(CacheRewinder, "rewind", trim_only)
    counts, _ = sample_counts(target, draft, prompt, seed=11)
    assert chi_square_pvalue(counts, expected) < 1e-6
