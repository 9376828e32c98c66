"""Fast-mode speculative decoding: the target's output, sooner.

At temperature 0 the generated tokens are exactly the target's greedy tokens; at
temperature > 0 they follow the target's (filtered) sampling distribution. The draft
only changes how fast they come.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from speclora.cache import DEFAULT_HEADROOM, SINK_TOKENS, KVQuantization
from speclora.decoding import LoopOptions, Round, speculative_rounds, vocab_size
from speclora.drafting import (
    AdaptiveDraftLength,
    DraftLengthPolicy,
    FixedDraftLength,
    RoundCost,
    measure_round_cost,
)
from speclora.models import check_context, context_window
from speclora.recording import DisagreementRecorder
from speclora.results import GenerationResult, RoundStats
from speclora.sampling import SamplingParams, make_logits_filter
from speclora.tokenizing import Prompt, encode_prompt


class SpeculativeDecoder:
    """Speculative decoding of ``target_model`` with proposals from ``draft_model``.

    Args:
        target_model (nn.Module): The model whose output is reproduced.
        draft_model (nn.Module): A smaller model with the same vocabulary.
        tokenizer: The shared mlx-lm ``TokenizerWrapper``.
        num_draft_tokens (int): Tokens drafted per round (the starting point when
          ``adaptive_draft``). Default: ``4``.
        temperature (float): Sampling temperature; ``0`` is greedy. Default: ``0.7``.
        top_p (float): Nucleus filter, ``1`` disables. Default: ``1.0``.
        top_k (int): Top-k filter, ``0`` disables. Default: ``0``.
        min_p (float): Min-p filter, ``0`` disables. Default: ``0.0``.
        adaptive_draft (bool): Choose each round what to propose -- ``K`` tokens of
          the draft model, prompt lookup (with ``ngram_proposer``) or nothing (a
          plain target step) -- for the most expected tokens per second, from
          measured model costs and the acceptance seen so far
          (:class:`~speclora.drafting.AdaptiveDraftLength`). Default: ``False``
          (``num_draft_tokens`` from the draft model every round).
        max_draft_tokens (int): Largest ``K`` adaptive drafting may choose. Default: ``8``.
        round_cost (RoundCost, optional): Model costs for adaptive drafting; measured
          on first use when omitted.
        ngram_proposer (bool): Let adaptive drafting propose tokens by prompt lookup
          (:mod:`speclora.ngram`), which costs no model call. Default: ``True``.
        use_chat_template (bool): Wrap string prompts in the tokenizer's chat
          template when it has one. Default: ``True``.
        stop_tokens (Iterable[int], optional): Extra token ids that end generation
          (the tokenizer's EOS ids always do).
        max_kv_size (int, optional): Sliding-window size of the full-attention KV
          caches, greater than 4 (the first 4 tokens stay visible, as in mlx-lm).
          Outputs are those of mlx-lm's ``RotatingKVCache(max_kv_size, keep=4)``
          fed one token at a time.
        kv_bits (int, optional): Quantize the KV caches as mlx-lm's ``kv_bits``
          does. Default: ``None`` (no quantization).
        kv_group_size (int): Group size of KV quantization. Default: ``64``.
        quantized_kv_start (int): Cache length at which KV quantization starts.
          Default: ``5000``.
        profile (bool): Time each phase of every round apart (a synchronisation
          per phase; see :data:`speclora.decoding.PHASES`). Default: ``False``.
        record_disagreements (bool): Record every rejected draft token in
          ``result.disagreements`` (detailed mode) unless a call says otherwise.
          Recording rounds always draft with the draft model, whose rejections are
          what is recorded: adaptive drafting then chooses ``K >= 1``, never a
          plain target step or prompt lookup. Default: ``False``.
        top_k_logprobs (int): Target log-probabilities kept per disagreement.
          Default: ``20``.
    """

    def __init__(
        self,
        target_model: nn.Module,
        draft_model: nn.Module,
        tokenizer: Any,
        num_draft_tokens: int = 4,
        temperature: float = 0.7,
        *,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        adaptive_draft: bool = False,
        max_draft_tokens: int = 8,
        round_cost: RoundCost | None = None,
        ngram_proposer: bool = True,
        use_chat_template: bool = True,
        stop_tokens: Iterable[int] | None = None,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 5000,
        profile: bool = False,
        record_disagreements: bool = False,
        top_k_logprobs: int = 20,
    ) -> None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
            raise ValueError(f"num_draft_tokens must be an integer, got {num_draft_tokens!r}")
        # Windowed caches keep DEFAULT_HEADROOM spare slots, which bounds the rollback depth.
        if not 0 <= num_draft_tokens <= DEFAULT_HEADROOM:
            raise ValueError(f"num_draft_tokens must be in [0, {DEFAULT_HEADROOM}], got {num_draft_tokens}")
        if adaptive_draft and not 1 <= max_draft_tokens <= DEFAULT_HEADROOM:
            raise ValueError(
                f"max_draft_tokens must be in [1, {DEFAULT_HEADROOM}], got {max_draft_tokens}"
            )
        if (
            isinstance(top_k_logprobs, bool)
            or not isinstance(top_k_logprobs, int)
            or top_k_logprobs < 1
        ):
            raise ValueError(
                f"top_k_logprobs must be an integer >= 1, got {top_k_logprobs!r}"
            )
        if max_kv_size is not None and max_kv_size <= SINK_TOKENS:
            raise ValueError(f"max_kv_size must be > {SINK_TOKENS} or None, got {max_kv_size}")
        self.kv_quantization = (
            None if kv_bits is None else KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
        )
        self.target_model = target_model
        self.draft_model = draft_model
        self.tokenizer = tokenizer
        self.num_draft_tokens = num_draft_tokens
        self.sampling = SamplingParams(temperature, top_p, top_k, min_p)
        self.adaptive_draft = adaptive_draft
        self.max_draft_tokens = max_draft_tokens
        self.round_cost = round_cost
        self.ngram_proposer = ngram_proposer
        self.use_chat_template = use_chat_template
        self.stop_tokens = frozenset(tokenizer.eos_token_ids) | frozenset(stop_tokens or ())
        self.max_kv_size = max_kv_size
        self.profile = profile
        self.record_disagreements = record_disagreements
        self.top_k_logprobs = top_k_logprobs
        self._policies: dict[tuple[float, bool], DraftLengthPolicy] = {}

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.target_model)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for ``prompt`` (a string, or token ids passed through); see
        :func:`speclora.tokenizing.encode_prompt`."""
        return encode_prompt(
            self.tokenizer,
            prompt,
            self.vocab_size,
            use_chat_template=self.use_chat_template,
        )

    def draft_policy(
        self, temperature: float | None = None, record: bool | None = None
    ) -> DraftLengthPolicy:
        """The policy choosing each round's proposal at ``temperature`` (default:
        the decoder's), for recording or plain generations (default: the
        decoder's ``record_disagreements``). Adaptive state persists across calls,
        one per temperature and kind: how often proposals are accepted depends on
        the temperature, and recording rounds never skip the draft model."""
        t = self.sampling.temperature if temperature is None else temperature
        record = self.record_disagreements if record is None else record
        key = (t, record)
        if key not in self._policies:
            if self.adaptive_draft:
                if self.round_cost is None:
                    self.round_cost = measure_round_cost(
                        self.target_model, self.draft_model, max_k=self.max_draft_tokens
                    )
                self._policies[key] = AdaptiveDraftLength(
                    self.round_cost,
                    max_k=self.max_draft_tokens,
                    min_k=1 if record else 0,
                    ngram=self.ngram_proposer and not record,
                )
            else:
                self._policies[key] = FixedDraftLength(self.num_draft_tokens)
        return self._policies[key]

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 512,
        *,
        temperature: float | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        record: bool | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt``.

        Args:
            prompt (str or list[int]): Text (chat template applied when configured)
              or token ids.
            max_tokens (int): Most tokens to generate. Default: ``512``.
            temperature (float, optional): Overrides the decoder's temperature for
              this call.
            seed (int, optional): Seeds ``mx.random`` first, for reproducible sampling.
            top_p (float, optional): Overrides the decoder's nucleus filter for
              this call.
            record (bool, optional): Overrides ``record_disagreements`` for this call.

        Returns:
            GenerationResult: text, tokens and acceptance statistics.
        """
        rounds = self.stream(
            prompt,
            max_tokens,
            temperature=temperature,
            seed=seed,
            top_p=top_p,
            record=record,
        )
        while True:
            try:
                next(rounds)
            except StopIteration as done:
                return cast(GenerationResult, done.value)

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 512,
        *,
        temperature: float | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        record: bool | None = None,
    ) -> Generator[Round, None, GenerationResult]:
        """:meth:`generate`, one round at a time.

        Yields each :class:`~speclora.decoding.Round` as soon as it is decided
        (its ``tokens`` are final) and returns the :class:`GenerationResult`.
        Closing the generator early stops generating.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        sampling = self.sampling
        if temperature is not None or top_p is not None:
            sampling = SamplingParams(
                sampling.temperature if temperature is None else temperature,
                sampling.top_p if top_p is None else top_p,
                sampling.top_k,
                sampling.min_p,
            )
        record = self.record_disagreements if record is None else record
        prompt_tokens = self.encode_prompt(prompt)
        check_context(context_window(self.target_model), len(prompt_tokens), max_tokens)
        if seed is not None:
            mx.random.seed(seed)
        options = LoopOptions(
            sampling=sampling,
            logits_filter=make_logits_filter(sampling, self.vocab_size),
            stop_tokens=self.stop_tokens,
            max_kv_size=self.max_kv_size,
            kv_quantization=self.kv_quantization,
            profile=self.profile,
            keep_draft_logits=record,
        )
        recorder = (
            DisagreementRecorder(self.top_k_logprobs, sampling.temperature)
            if record
            else None
        )
        # May time the models once; not part of this generation.
        policy = self.draft_policy(sampling.temperature, record)
        stats = RoundStats()
        tokens: list[int] = []
        finish_reason = "length"
        start = time.perf_counter()
        for r in speculative_rounds(
            self.target_model,
            self.draft_model,
            prompt_tokens,
            max_tokens=max_tokens,
            policy=policy,
            options=options,
        ):
            stats.add(r)
            tokens.extend(r.tokens)
            if recorder is not None:
                recorder(r)
            if r.stopped:
                finish_reason = "stop"
            yield r
        return GenerationResult(
            text=self.tokenizer.decode(tokens),
            tokens=tokens,
            prompt_tokens=prompt_tokens,
            finish_reason=finish_reason,
            stats=stats,
            elapsed_s=time.perf_counter() - start,
            disagreements=recorder.disagreements if recorder is not None else [],
        )
