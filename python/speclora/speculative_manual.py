"""Detailed-mode speculative decoding: fast mode plus a record of every rejection.

Each rejected draft token becomes a :class:`~speclora.records.Disagreement` carrying
the target's top-k log-probabilities at that position, read from the verification
pass the round already computed: recording costs no extra forward pass. The output
is the same as fast mode's for the same seed, since recording draws no randomness.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from speclora.decoding import Round, host_ints
from speclora.drafting import DRAFT, AdaptiveDraftLength, DraftLengthPolicy, RoundCost
from speclora.records import Disagreement
from speclora.speculative import SpeculativeDecoder

__all__ = ["Disagreement", "DisagreementRecorder", "ManualSpeculativeDecoder"]


class DisagreementRecorder:
    """Turns the rejection of each round into a :class:`Disagreement`.

    Confidences are probabilities under the processed distributions at the sampling
    temperature (at temperature 0, at temperature 1). The top-k log-probabilities are
    ``log_softmax`` of the target's raw logits, the distillation target for training.

    Args:
        top_k (int): How many target log-probabilities to keep per disagreement.
        temperature (float): The generation's sampling temperature.
    """

    def __init__(self, top_k: int, temperature: float) -> None:
        self.top_k = top_k
        self.scale = 1.0 / temperature if temperature > 0 else 1.0
        self.disagreements: list[Disagreement] = []

    def __call__(self, r: Round) -> None:
        i = r.accepted
        # Only the draft model's rejections teach it something.
        if r.proposer != DRAFT:
            return
        # No rejection, or a stop token among the accepted drafts ended the text first.
        if i == r.drafted or i > len(r.tokens):
            return
        draft_token = r.draft_tokens[i]
        q = mx.softmax(r.draft_logits[i].astype(mx.float32) * self.scale)[draft_token]
        p = mx.softmax(r.target_logits[i].astype(mx.float32) * self.scale)[r.next_token]
        logprobs = r.raw_target_logits[i].astype(mx.float32)
        logprobs = logprobs - mx.logsumexp(logprobs)
        k = min(self.top_k, logprobs.shape[-1])
        top = mx.argpartition(-logprobs, kth=k - 1)[:k]
        top_lp = logprobs[top]
        order = mx.argsort(-top_lp)
        top, top_lp = top[order], top_lp[order]
        mx.eval(q, p, top, top_lp)
        self.disagreements.append(
            Disagreement(
                position=r.position + i,
                draft_token=draft_token,
                target_token=r.next_token,
                draft_confidence=cast(float, q.item()),
                target_confidence=cast(float, p.item()),
                top_k_tokens=host_ints(top),
                top_k_logprobs=cast(list[float], top_lp.tolist()),
            )
        )


class ManualSpeculativeDecoder(SpeculativeDecoder):
    """:class:`~speclora.speculative.SpeculativeDecoder` that also records
    ``result.disagreements``, one per rejected draft token.

    Every round drafts with the draft model, whose rejections are what is recorded:
    adaptive drafting chooses ``K >= 1`` by the same cost model as fast mode, but
    never a plain target step or prompt lookup.

    Takes the same arguments, plus:

    Args:
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
        top_k_logprobs: int = 20,
        **options: Any,
    ) -> None:
        super().__init__(target_model, draft_model, tokenizer, num_draft_tokens, temperature, **options)
        if isinstance(top_k_logprobs, bool) or not isinstance(top_k_logprobs, int) or top_k_logprobs < 1:
            raise ValueError(f"top_k_logprobs must be an integer >= 1, got {top_k_logprobs!r}")
        self.top_k_logprobs = top_k_logprobs

    def _adaptive_policy(self, cost: RoundCost) -> DraftLengthPolicy:
        return AdaptiveDraftLength(cost, max_k=self.max_draft_tokens, min_k=1)

    def _recorder(self, temperature: float) -> DisagreementRecorder:
        return DisagreementRecorder(self.top_k_logprobs, temperature)
