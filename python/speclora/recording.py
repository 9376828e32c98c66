"""What detailed mode records: each rejected draft token as a :class:`Disagreement`.

Each one carries the target's top-k log-probabilities at that position, read from
the verification pass the round already computed: recording costs no extra forward
pass, and draws no randomness, so a recorded generation's output is the same as an
unrecorded one's for the same seed.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx

from speclora.decoding import Round, host_ints
from speclora.drafting import DRAFT
from speclora.records import Disagreement

__all__ = ["DisagreementRecorder"]


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
