"""Detailed-mode speculative decoding: fast mode plus a record of every rejection.

The same decoder as fast mode (:class:`~speclora.speculative.SpeculativeDecoder`),
recording by default: each rejected draft token becomes a
:class:`~speclora.records.Disagreement` (see :mod:`speclora.recording`).
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from speclora.records import Disagreement
from speclora.recording import DisagreementRecorder
from speclora.speculative import SpeculativeDecoder

__all__ = ["Disagreement", "DisagreementRecorder", "ManualSpeculativeDecoder"]


class ManualSpeculativeDecoder(SpeculativeDecoder):
    """:class:`~speclora.speculative.SpeculativeDecoder` that records
    ``result.disagreements``, one per rejected draft token, unless a call passes
    ``record=False``.

    Takes the same arguments (``record_disagreements`` defaults to ``True``).
    """

    def __init__(
        self,
        target_model: nn.Module,
        draft_model: nn.Module,
        tokenizer: Any,
        num_draft_tokens: int = 4,
        temperature: float = 0.7,
        *,
        record_disagreements: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            target_model,
            draft_model,
            tokenizer,
            num_draft_tokens,
            temperature,
            record_disagreements=record_disagreements,
            **options,
        )
