"""The speculative decode loop shared by every decoder in this package.

One round: a proposer offers ``K`` tokens -- the draft model one step at a time
(kept lazy, so MLX pipelines them), or prompt lookup (:mod:`speclora.ngram`) at no
model cost, or nothing (a plain target step) -- as the policy decides; the target
scores the last emitted token plus the ``K`` proposals in one pass, the fused
acceptance op decides how many survive and which token follows them, and both
models' caches are rolled back past what was rejected (trimmed, or for recurrent
layers restored and re-advanced: see :class:`speclora.cache.CacheRewinder`). The
only host synchronisation of the round is reading the op's result.

Runs of plain target steps overlap like mlx-lm's ``generate_step``: when the policy
expects the next round to be a plain step too, that step is built on the token not
yet read and started (``mx.async_eval``) before the loop waits for the current one,
so the host's work between two steps hides behind the models' compute. A step
started ahead that turns out unwanted (a stop token, a switch back to proposing,
the end of the generation) is rolled out of the target's cache unread.

Fast and detailed decoding, and the mlx-lm compatible generator, all consume the
:class:`Round` records this loop yields; nothing here knows who is listening.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from speclora.acceptance import speculative_accept
from speclora.cache import (
    CacheRewinder,
    KVQuantization,
    make_speculative_cache,
    prepare_speculative_cache,
    rollback_limit,
)
from speclora.drafting import DRAFT, NGRAM, NONE, DraftLengthPolicy, Plan
from speclora.ngram import NO_PROPOSAL, NgramProposer
from speclora.sampling import LogitsFilter, SamplingParams, sample

# Same default as mlx-lm: long prompts are fed in chunks so activations stay bounded.
PREFILL_STEP = 512
# Most tokens asked of prompt lookup per round (the policy takes a prefix).
MAX_PROPOSAL = 32
# Tokens the draft has not seen are fed with its first draft step, up to this
# many; beyond, they are prefilled in chunks first.
DRAFT_CATCH_UP = 64

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class Round:
    """What one round did.

    ``draft_logits`` / ``target_logits`` are the processed logits the acceptance op
    saw (``[K, V]`` / ``[K + 1, V]``); ``raw_target_logits`` are the target's logits
    before any sampling filter. They are lazy arrays already evaluated by the round's
    synchronisation; observers may read them without recomputing anything.
    """

    position: int  # index in the generated sequence of tokens[0]
    proposer: str  # who proposed the drafts: "draft", "ngram" or "none" (K = 0)
    drafted: int  # K
    accepted: int  # n, 0 <= n <= K
    draft_tokens: list[int]  # [K]
    tokens: list[int]  # emitted: accepted drafts + the target's token, cut at a stop
    # The target's token after the accepted drafts (correction or bonus).
    next_token: int
    # [K, V]; zeros unless kept (see LoopOptions.keep_draft_logits).
    draft_logits: mx.array
    target_logits: mx.array  # [K + 1, V]
    raw_target_logits: mx.array  # [K + 1, V]
    stopped: bool  # a stop token ended the generation in this round
    seconds: float = 0.0
    # Seconds per phase (see PHASES), only when the loop profiles.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def draft_seconds(self) -> float:
        return self.timings.get("draft", 0.0)

    @property
    def verify_seconds(self) -> float:
        return self.timings.get("verify", 0.0)


PHASES = ("draft", "verify", "accept", "sync", "rollback", "bookkeeping")
"""What a profiled round's time is split into: the proposer (draft model steps, or
prompt lookup), the target's pass, the acceptance op, reading its result on the
host, rolling the caches back, and everything else (the policy, history, stop
tokens, the round record)."""

MODEL_PHASES = ("draft", "verify")
"""The phases that are the models' forward passes; the rest is machinery."""


@dataclass
class LoopOptions:
    """Options of :func:`speculative_rounds` that rarely change between calls."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    logits_filter: LogitsFilter | None = None
    stop_tokens: frozenset[int] = frozenset()
    max_kv_size: int | None = None
    # mlx-lm's kv_bits: KV caches switch to quantized at the same token as in mlx-lm.
    kv_quantization: KVQuantization | None = None
    logits_processors: Sequence[LogitsProcessor] = ()
    # An opaque mlx-lm sampler (logprobs -> token). Its distribution is unknown, so
    # the target samples too and drafts are accepted while the samples agree, which
    # is lossless but accepts less than rejection sampling on known distributions.
    sampler: Callable[[mx.array], mx.array] | None = None
    # Synchronise after each phase of a round to time them apart (see PHASES).
    profile: bool = False
    # Keep the draft model's logits in each Round even where the acceptance rule
    # does not read them (temperature 0): a recorder of disagreements needs them.
    keep_draft_logits: bool = False
    # Prompt lookup: shortest and longest suffix matched (see NgramProposer).
    ngram_min: int = 1
    ngram_max: int = 4
    # Start a plain target step before reading the one before it, when the policy
    # expects one (see the module docstring). Off while profiling, whose
    # synchronisation after each phase leaves nothing to overlap.
    overlap_plain_steps: bool = True


def vocab_size(model: nn.Module) -> int:
    """The model's vocabulary size, from its mlx-lm ``args`` (or their ``text_config``,
    as multimodal and Llama 4 models keep it)."""
    args = getattr(model, "args", None)
    text = getattr(args, "text_config", None)
    for holder in (args, text):
        size = (
            holder.get("vocab_size")
            if isinstance(holder, dict)
            else getattr(holder, "vocab_size", None)
        )
        if size:
            return int(size)
    raise ValueError(
        f"cannot find the vocabulary size of {type(model).__name__} (no args.vocab_size)"
    )


def host_ints(a: mx.array) -> list[int]:
    """An evaluated 1-D integer array as a Python list (typed for callers)."""
    return cast(list[int], a.tolist())


def _prefill(
    model: nn.Module,
    cache: list[Any],
    tokens: mx.array,
    quantization: KVQuantization | None,
) -> None:
    """Feed ``tokens [S]`` into ``cache`` without keeping logits."""
    start = 0
    while start < tokens.size:
        step = PREFILL_STEP
        if quantization is not None:
            quantization.apply(cache)
            step = min(step, quantization.room(cache) or step)
        model(tokens[start : start + step][None], cache=cache)
        mx.eval([c.state for c in cache])
        start += step


def _draw(logits: mx.array, options: LoopOptions) -> mx.array:
    """Sample tokens ``[...]`` from processed ``logits [..., V]``."""
    if options.sampler is not None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if logprobs.ndim == 1:
            return options.sampler(logprobs).astype(mx.uint32)
        # One call per position, as the target alone makes one per token: a
        # sampler may draw one random number per call (mlx-lm's XTC does), and
        # positions sharing it would not follow the target's distribution.
        rows = logprobs.reshape(-1, logprobs.shape[-1])
        drawn = mx.concatenate(
            [options.sampler(rows[i : i + 1]).reshape(1) for i in range(rows.shape[0])]
        )
        return drawn.reshape(logprobs.shape[:-1]).astype(mx.uint32)
    return sample(logits, options.sampling.temperature)


def _one_hot(tokens: mx.array, vocab: int) -> mx.array:
    """``[N] -> [N, V]`` float32 rows whose argmax is the token."""
    return (mx.arange(vocab)[None] == tokens[:, None]).astype(mx.float32)


def _point_mass_logits(tokens: mx.array, vocab: int) -> mx.array:
    """``[N] -> [N, V]`` logits whose softmax, at any temperature, is one-hot on the
    token: the draft distribution of a deterministic proposal."""
    return mx.where(mx.arange(vocab)[None] == tokens[:, None], 0.0, -mx.inf)


class _Clock:
    """Splits a round's time into phases when profiling (a sync at each mark)."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.timings: dict[str, float] = {}
        self.start = self.last = time.perf_counter()

    def mark(self, phase: str, *arrays: Any) -> None:
        if not self.on:
            return
        if arrays:
            mx.eval(*arrays)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now

    def done(self) -> float:
        self.mark("bookkeeping")
        return time.perf_counter() - self.start


class _Processor:
    """Applies logits processors (which look at the token history) and the filter."""

    def __init__(self, options: LoopOptions, history: list[int]) -> None:
        self.options = options
        self.history = history  # prompt + emitted tokens, host side

    def __call__(self, logits: mx.array, pending: Sequence[mx.array] = ()) -> mx.array:
        """Process ``logits [V]`` as if ``pending`` (lazy draft tokens) followed history."""
        if self.options.logits_processors:
            context = mx.concatenate(
                [mx.array(self.history, mx.uint32), *[p.reshape(1) for p in pending]]
            )
            row = logits[None]
            for processor in self.options.logits_processors:
                row = processor(context, row)
            logits = row[0]
        if self.options.logits_filter is not None:
            logits = self.options.logits_filter(logits)
        return logits


def _room_for_one_more(quantization: KVQuantization | None, cache: list[Any]) -> bool:
    """Whether one more token, fed and maybe dropped again, stays clear of the token
    where KV quantization starts (the switch happens at the next round's start)."""
    room = quantization.room(cache) if quantization is not None else None
    return room is None or room >= 2


@dataclass
class _TargetPass:
    """The target's part of a round, built lazily: its pass and the acceptance op."""

    # [P + K] uint32: tokens the target had yet to see, then the proposals.
    fed: mx.array
    raw: mx.array  # [K + 1, V] the target's logits at the proposals and one past them
    logits: mx.array  # [K + 1, V] the same, processed
    num_accepted: mx.array  # [1] int32
    out: mx.array  # [1, K + 1] int32: accepted proposals, then the target's token


class _Verifier:
    """Builds the target's pass over a round's input and the acceptance op on it."""

    def __init__(
        self,
        target: nn.Module,
        cache: list[Any],
        rewind: CacheRewinder,
        process: _Processor,
        options: LoopOptions,
        temperature: float,
    ) -> None:
        self.target = target
        self.cache = cache
        self.rewind = rewind
        self.process = process
        self.options = options
        self.temperature = temperature

    def __call__(
        self,
        fed: mx.array,  # [P + K] uint32
        d_tokens: mx.array,  # [K] uint32
        d_logits: mx.array,  # [K, V] float
        drafted: Sequence[mx.array],  # K lazy proposals (d_tokens' entries)
        clock: _Clock,
        *,
        unread: Sequence[mx.array] = (),  # lazy tokens between the host history and fed
    ) -> _TargetPass:
        """The pass over ``fed`` (the last ``K`` of them proposed), lazily."""
        options = self.options
        k = d_tokens.size
        self.rewind.reset()
        self.rewind.checkpoint()
        raw = self.target(fed[None], cache=self.cache)[0, -(k + 1) :]
        if options.logits_processors or options.logits_filter is not None:
            logits = mx.stack(
                [self.process(raw[i], [*unread, *drafted[:i]]) for i in range(k + 1)]
            )
        else:
            logits = raw
        accept_logits = logits
        if options.sampler is not None:
            # Greedy acceptance on one-hot logits of the target's own samples.
            accept_logits = _one_hot(_draw(logits, options), logits.shape[-1])
        clock.mark("verify", accept_logits)
        num_accepted, out = speculative_accept(
            d_tokens.astype(mx.int32)[None],
            d_logits[None],
            accept_logits[None],
            temperature=self.temperature,
            validate=False,
        )
        clock.mark("accept", num_accepted, out)
        return _TargetPass(fed, raw, logits, num_accepted, out)


def speculative_rounds(
    target: nn.Module,
    draft: nn.Module,
    prompt_tokens: Sequence[int],
    *,
    max_tokens: int,
    policy: DraftLengthPolicy,
    options: LoopOptions,
    target_cache: list[Any] | None = None,
    draft_cache: list[Any] | None = None,
) -> Iterator[Round]:
    """Run speculative rounds until ``max_tokens`` tokens or a stop token.

    Args:
        target (nn.Module): The model whose output is reproduced exactly.
        draft (nn.Module): The proposal model (same vocabulary).
        prompt_tokens (Sequence[int]): The prompt, at least one token.
        max_tokens (int): Most tokens to emit, ``>= 1``.
        policy (DraftLengthPolicy): Chooses each round's proposer and ``K`` and is
          told the outcome.
        options (LoopOptions): Sampling, stop tokens, cache window, profiling.
        target_cache (list, optional): Caches for the target, updated in place; every
          layer must roll back (see :func:`speclora.cache.prepare_speculative_cache`).
          Default: fresh ones from :func:`speclora.cache.make_speculative_cache`.
        draft_cache (list, optional): Same, for the draft.

    Yields:
        Round: one per round, in order. ``sum(len(r.tokens))`` never exceeds
        ``max_tokens``; stop tokens are not emitted.

    Raises:
        ValueError: before any model call, if a cache layer cannot roll back or
          cannot be quantized as ``options.kv_quantization`` asks.
    """
    if len(prompt_tokens) == 0:
        raise ValueError("prompt_tokens is empty: at least one token is needed")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    # With an opaque sampler the op only compares tokens (see LoopOptions.sampler).
    temperature = 0.0 if options.sampler is not None else options.sampling.temperature
    if target_cache is None:
        target_cache = make_speculative_cache(target, max_kv_size=options.max_kv_size)
    if draft_cache is None:
        draft_cache = make_speculative_cache(draft, max_kv_size=options.max_kv_size)
    quantization = options.kv_quantization
    for model, cache in ((target, target_cache), (draft, draft_cache)):
        prepare_speculative_cache(cache)
        if quantization is not None:
            quantization.check(model, cache)
    # K never exceeds what every windowed layer can roll back.
    limits = [
        x
        for x in (rollback_limit(target_cache), rollback_limit(draft_cache))
        if x is not None
    ]
    target_rewind = CacheRewinder(target, target_cache)
    draft_rewind = CacheRewinder(draft, draft_cache)
    # Greedy acceptance reads no draft distribution: the draft model's logits are
    # then neither stacked nor kept, and the op reads a broadcast zero in their place.
    keep_draft_logits = temperature > 0 or options.keep_draft_logits

    history = list(prompt_tokens)
    process = _Processor(options, history)
    verify = _Verifier(
        target, target_cache, target_rewind, process, options, temperature
    )
    lookup = (
        NgramProposer(history, min_n=options.ngram_min, max_n=options.ngram_max)
        if policy.uses_ngram
        else None
    )
    # Overlapping plain steps needs a policy that forecasts them and caches that
    # can drop the one token of a step started in vain.
    expects_plain_step: Callable[[Sequence[int]], bool] = getattr(
        policy, "expects_plain_step", lambda matches: False
    )
    matches = (
        range(options.ngram_min, options.ngram_max + 1)
        if lookup is not None
        else range(0)
    )
    overlap = (
        options.overlap_plain_steps
        and not options.profile
        and min(limits, default=1) >= 1
    )
    prompt = mx.array(history, mx.uint32)
    _prefill(target, target_cache, prompt[:-1], quantization)
    _prefill(draft, draft_cache, prompt[:-1], quantization)
    # Tokens each model has yet to see: the target always lags by the last emitted
    # token; the draft by every token emitted since it last drafted, plus its own
    # last draft after a round where every draft survived.
    target_pending = history[-1:]
    draft_pending = history[-1:]
    produced = 0
    vocab = vocab_size(target)
    no_tokens = mx.zeros((0,), mx.uint32)
    # Shapes are known before evaluation, so this costs no work.
    no_logits = mx.broadcast_to(mx.zeros((1, 1), mx.float32), (0, vocab))
    # A plain step started on the last emitted token before it was read, unread
    # itself: the target's cache holds that token already.
    ahead: _TargetPass | None = None
    decided: float | None = None  # when the last round's outcome was known

    try:
        while produced < max_tokens:
            clock = _Clock(options.profile)
            cap = max(0, min([max_tokens - produced - 1, *limits]))
            if quantization is not None:
                quantization.apply(target_cache)
                quantization.apply(draft_cache)
                # One target call must not cross the token where quantization starts.
                room = quantization.room(target_cache)
                if room is not None:
                    cap = min(cap, room - len(target_pending))
            proposal = (
                lookup.propose(min(cap, MAX_PROPOSAL))
                if lookup is not None
                else NO_PROPOSAL
            )
            # A plain step already started makes every other plan throw it away.
            if ahead is not None:
                plan = policy.plan(proposal, started=True)
            else:
                plan = policy.plan(proposal)
            k = min(plan.k, cap)
            if plan.proposer == NGRAM:
                k = min(k, len(proposal.tokens))
            proposer = plan.proposer if k > 0 else NONE
            if ahead is not None and proposer != NONE:
                target_rewind.rewind(ahead.fed, 0)
                ahead = None
            clock.mark("bookkeeping")

            drafted: list[mx.array] = []
            draft_logits: list[mx.array] = []
            # A draft catching up on many tokens makes a round no policy could price.
            typical = proposer != DRAFT or len(draft_pending) <= 2
            if proposer == DRAFT:
                if len(draft_pending) > DRAFT_CATCH_UP:
                    _prefill(
                        draft,
                        draft_cache,
                        mx.array(draft_pending[:-1], mx.uint32),
                        quantization,
                    )
                    draft_pending = draft_pending[-1:]
                y = mx.array(draft_pending, mx.uint32)
                draft_rewind.reset()
                for _ in range(k):
                    draft_rewind.checkpoint()
                    logits = process(draft(y[None], cache=draft_cache)[0, -1], drafted)
                    token = _draw(logits, options)
                    mx.async_eval(token)
                    drafted.append(token)
                    if keep_draft_logits:
                        draft_logits.append(logits)
                    y = token.reshape(1)
                d_tokens = mx.stack(drafted)
            elif proposer == NGRAM:
                d_tokens = mx.array(proposal.tokens[:k], mx.uint32)
                drafted = [d_tokens[i] for i in range(k)]
            else:
                d_tokens = no_tokens
            if draft_logits:
                d_logits = mx.stack(draft_logits)
            elif proposer == NGRAM and temperature > 0:
                d_logits = _point_mass_logits(d_tokens, vocab)
            else:
                d_logits = mx.broadcast_to(mx.zeros((1, 1), mx.float32), (k, vocab))
            clock.mark("draft", d_tokens, d_logits)

            if ahead is not None:
                step, ahead = ahead, None
            else:
                fed = mx.concatenate([mx.array(target_pending, mx.uint32), d_tokens])
                step = verify(fed, d_tokens, d_logits, drafted, clock)
            if (
                overlap
                and proposer == NONE
                and produced + 1 < max_tokens
                and _room_for_one_more(quantization, target_cache)
                and expects_plain_step(matches)
            ):
                # The next plain step, on this step's token before it is read.
                token = step.out[0, :1].astype(mx.uint32)
                ahead = verify(
                    token, no_tokens, no_logits, (), _Clock(False), unread=[token]
                )
                mx.async_eval(ahead.num_accepted, ahead.out)
            mx.eval(step.num_accepted, step.out, d_tokens)
            # Read on the host as evaluated: an indexing op would queue behind the
            # step started ahead and wait for it.
            n = cast(int, step.num_accepted.item())
            emitted = cast(list[list[int]], step.out.tolist())[0][: n + 1]
            draft_list = host_ints(d_tokens)
            clock.mark("sync")

            target_rewind.rewind(step.fed, len(target_pending) + n)
            if proposer != DRAFT:
                draft_pending = draft_pending + emitted
            elif n == k:
                draft_pending = [draft_list[-1], emitted[-1]]
            else:
                # The draft saw d_1 .. d_{k-1}; back to the checkpoint after d_n.
                draft_rewind.rewind(d_tokens[n : k - 1], 0, since=n + 1)
                draft_pending = emitted[-1:]
            target_pending = emitted[-1:]
            clock.mark(
                "rollback",
                *([c.state for c in target_cache] if target_rewind.recurrent else []),
            )
            # The policy is told the whole cycle since the last round was decided,
            # the consumer's share included: what the host does between rounds
            # idles the models after a proposing round and hides behind a plain
            # step started ahead.
            now = time.perf_counter()
            seconds = (
                now - (clock.start if decided is None else decided) if typical else None
            )
            decided = now
            policy.update(Plan(proposer, k), n, seconds=seconds)

            next_token = emitted[-1]
            stopped = False
            for i, emitted_token in enumerate(emitted):
                if emitted_token in options.stop_tokens:
                    emitted, stopped = emitted[:i], True
                    break
            history.extend(emitted)
            if lookup is not None:
                lookup.extend(emitted)
            yield Round(
                position=produced,
                proposer=proposer,
                drafted=k,
                accepted=n,
                draft_tokens=draft_list,
                tokens=emitted,
                next_token=next_token,
                draft_logits=d_logits,
                target_logits=step.logits,
                raw_target_logits=step.raw,
                stopped=stopped,
                seconds=clock.done(),
                timings=clock.timings,
            )
            produced += len(emitted)
            if stopped:
                return
    finally:
        # A step started past the end (a stop token, a closed generator) leaves
        # the caches as if it had never been started.
        if ahead is not None:
            target_rewind.rewind(ahead.fed, 0)
