"""Training data for the draft: examples tokenized into sequences, held-out and
replay sets, shuffled epochs and padded batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from speclora.losses import Batch
from speclora.records import TrainingExample

logger = logging.getLogger(__name__)

# Sequence lengths are padded up to a multiple of this so the compiled step is
# traced for a handful of shapes rather than one per batch.
_LENGTH_BUCKET = 16


@dataclass
class TokenSequence:
    """One tokenized example: what the loss needs, as numpy arrays."""

    tokens: np.ndarray  # [L] int32, prompt followed by output, truncated
    prompt_len: int
    distill_index: np.ndarray  # [D] int32, logit positions of the disagreements
    distill_ids: list[np.ndarray]  # D x [k] int32, target's top-k token ids
    distill_logp: list[np.ndarray]  # D x [k] float32, renormalised log-probabilities


# Stands in for a rank's share when a batch has fewer rows than ranks: its
# masks are all zero, so it adds nothing to the loss.
_EMPTY_ROW = TokenSequence(np.zeros(2, np.int32), 2, np.zeros(0, np.int32), [], [])


def prepare_example(
    example: TrainingExample, tokenizer: Any, vocab_size: int, max_seq_length: int
) -> TokenSequence | None:
    """Tokenize one example (``target_output`` with ``tokenizer`` when it has no
    ``output_tokens``); ``None`` when it has no output token to learn.

    Raises:
        ValueError: If a token id falls outside the draft's vocabulary (the
            example was collected with another tokenizer, or is damaged).
    """
    prompt = list(example.prompt_tokens)
    output = list(example.output_tokens)
    if not output:
        try:
            ids = tokenizer.encode(example.target_output, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(example.target_output)
        output = [int(t) for t in ids]
    tokens = (prompt + output)[:max_seq_length]
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"Training example {example.id!r} has token id {bad[0]} outside the "
            f"draft's vocabulary of {vocab_size}"
        )
    prompt_len = len(prompt)
    num_inputs = len(tokens) - 1
    # The first output token is only predictable if something precedes it.
    if num_inputs < 1 or len(tokens) <= max(prompt_len, 1):
        return None
    by_index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for d in example.disagreements:
        index = prompt_len + d.position - 1
        if not 0 <= index < num_inputs or not d.top_k_tokens:
            continue  # truncated away, or nothing to distil
        # Checked before the int32 conversion, which would overflow.
        bad = [t for t in d.top_k_tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"Training example {example.id!r}: disagreement at position "
                f"{d.position} has top-k token {bad[0]} outside the draft's "
                f"vocabulary of {vocab_size}"
            )
        ids = np.asarray(d.top_k_tokens, dtype=np.int32)
        logp = np.asarray(d.top_k_logprobs, dtype=np.float64)
        logp = logp - (logp.max() + np.log(np.exp(logp - logp.max()).sum()))
        by_index[index] = (ids, logp.astype(np.float32))
    order = sorted(by_index)
    return TokenSequence(
        tokens=np.asarray(tokens, dtype=np.int32),
        prompt_len=prompt_len,
        distill_index=np.asarray(order, dtype=np.int32),
        distill_ids=[by_index[i][0] for i in order],
        distill_logp=[by_index[i][1] for i in order],
    )


def prepare_examples(
    examples: Sequence[TrainingExample | Mapping[str, Any]],
    what: str,
    tokenizer: Any,
    vocab_size: int,
    max_seq_length: int,
) -> tuple[list[TokenSequence], list[str]]:
    """:func:`prepare_example` over ``examples`` (dicts are converted), skipping
    with a warning those with nothing to learn or that the draft cannot use.

    Returns:
        tuple: The sequences and the ids of their examples.
    """
    seqs: list[TokenSequence] = []
    ids: list[str] = []
    skipped = 0
    unusable: list[str] = []
    for ex in examples:
        if not isinstance(ex, TrainingExample):
            ex = TrainingExample.from_dict(ex)
        try:
            seq = prepare_example(ex, tokenizer, vocab_size, max_seq_length)
        except ValueError as e:
            # One example this draft cannot learn from must not stop the rest.
            unusable.append(str(e))
            continue
        if seq is None:
            skipped += 1
            continue
        seqs.append(seq)
        ids.append(ex.id)
    if skipped:
        logger.warning(
            "Skipped %d %s with no output token within max_seq_length=%d",
            skipped,
            what,
            max_seq_length,
        )
    if unusable:
        more = f" (and {len(unusable) - 10} more)" if len(unusable) > 10 else ""
        logger.warning(
            "Skipped %d %s that cannot be used with this draft: %s%s",
            len(unusable),
            what,
            "; ".join(unusable[:10]),
            more,
        )
    return seqs, ids


def top_k_width(seqs: Sequence[TokenSequence]) -> int:
    """The widest stored top-k among ``seqs`` (``1`` when there is none)."""
    return max((len(ids) for s in seqs for ids in s.distill_ids), default=1)


def make_batch(seqs: Sequence[TokenSequence], top_k: int) -> Batch:
    """Pad sequences into the loss's input arrays."""
    b = len(seqs)
    t = -(-max(len(s.tokens) - 1 for s in seqs) // _LENGTH_BUCKET) * _LENGTH_BUCKET
    inputs, targets = np.zeros((2, b, t), dtype=np.int32)
    ce_mask, distill_mask = np.zeros((2, b, t), dtype=np.float32)
    topk_ids = np.zeros((b, t, top_k), dtype=np.int32)
    target_p, target_logp = np.zeros((2, b, t, top_k), dtype=np.float32)
    topk_valid = np.zeros((b, t, top_k), dtype=bool)
    for row, s in enumerate(seqs):
        n = len(s.tokens) - 1
        inputs[row, :n] = s.tokens[:-1]
        targets[row, :n] = s.tokens[1:]
        # targets[j] is sequence token j + 1: output tokens start at j = P - 1.
        ce_mask[row, max(s.prompt_len - 1, 0) : n] = 1.0
        for index, ids, logp in zip(s.distill_index, s.distill_ids, s.distill_logp):
            k = len(ids)
            topk_ids[row, index, :k] = ids
            target_logp[row, index, :k] = logp
            target_p[row, index, :k] = np.exp(logp)
            topk_valid[row, index, :k] = True
            distill_mask[row, index] = 1.0
    arrays = (inputs, targets, ce_mask, topk_ids, target_p, target_logp, topk_valid)
    return Batch(*map(mx.array, (*arrays, distill_mask)))


def iterate_batches(
    seqs: Sequence[TokenSequence],
    batch_size: int,
    top_k: int,
    rank: int = 0,
    size: int = 1,
) -> Iterator[Batch]:
    """Consecutive batches of ``batch_size`` of ``seqs``, with ``top_k`` slots.

    Under data parallelism over ``size`` ranks, rank ``rank`` gets rows
    ``rank::size`` of every batch (a row adding nothing to the loss when none).
    """
    for i in range(0, len(seqs), batch_size):
        yield make_batch(seqs[i : i + batch_size][rank::size] or [_EMPTY_ROW], top_k)


def holdout_split(
    seqs: list[TokenSequence], fraction: float, rng: np.random.Generator
) -> tuple[list[TokenSequence], list[TokenSequence]]:
    """The rest of ``seqs`` in order, and a random ``fraction`` held out (at least
    one, and never all, when there are two or more)."""
    n = len(seqs)
    n_eval = min(max(1, round(fraction * n)), n - 1) if fraction > 0 and n >= 2 else 0
    order = rng.permutation(n)
    return [seqs[i] for i in sorted(order[n_eval:])], [seqs[i] for i in order[:n_eval]]


def replay_count(num_train: int, available: int, ratio: float) -> int:
    """How many replayed sequences make up ``ratio`` of an epoch."""
    if ratio <= 0 or available == 0:
        return 0
    if ratio >= 1:
        return available
    return min(available, round(ratio * num_train / (1 - ratio)))


def epoch_sequences(
    train_set: list[TokenSequence],
    replay: list[TokenSequence],
    num_replay: int,
    rng: np.random.Generator,
) -> list[TokenSequence]:
    """One epoch: ``train_set`` and ``num_replay`` draws from ``replay``, shuffled."""
    picks = rng.choice(len(replay), size=num_replay, replace=False)
    epoch_set = train_set + [replay[int(i)] for i in picks]
    return [epoch_set[j] for j in rng.permutation(len(epoch_set))]
