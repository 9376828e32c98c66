"""Training records: what a low-acceptance generation leaves behind for the trainer.

A :class:`TrainingExample` is one generation (prompt, the target's output, its token ids)
plus a :class:`Disagreement` for every position where the draft's proposal was rejected.
Both validate and normalize their fields on construction, so an instance always
serializes to plain JSON types (``int``, ``float``, ``str``, lists) and
``from_dict(x.to_dict()) == x``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from speclora.validation import HERE, build, revalidate, validated

RECORD_VERSION = 1
"""Format version of :meth:`TrainingExample.to_dict`; stored beside every record."""

# Confidences and log-probabilities come from float32 softmaxes, whose rounding can put a
# probability a few ulps above 1 or a log-probability a few ulps above 0.
_PROB_TOL = 1e-4


def _plain(value: Any) -> Any:
    """NumPy and MLX scalars and arrays as the Python values they hold."""
    if type(value) in (int, float, str, list) or not hasattr(value, "tolist"):
        return value
    return value.tolist()


def _plain_items(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Lists of plain numbers take the fast path; arrays and lists of NumPy scalars
    # are converted only when that fails.
    try:
        return handler(value)
    except ValidationError:
        items = _plain(value)
        if not isinstance(items, list):
            raise
        return handler([_plain(v) for v in items])


def _iso_time(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("an ISO 8601 time such as '2024-01-01T00:00:00'") from None
    return value


def _as_mapping(value: Any) -> Any:
    """An equivalent record type defined elsewhere, or any mapping, as a dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, (type, Disagreement)):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, Mapping) else value


_Id = Annotated[int, Strict(), Field(ge=0)]
_TokenId = Annotated[_Id, BeforeValidator(_plain)]
_TokenIds = Annotated[list[_Id], WrapValidator(_plain_items)]
_LogProbs = Annotated[
    list[Annotated[float, Strict(), Field(le=_PROB_TOL)]], WrapValidator(_plain_items)
]
_Probability = Annotated[
    float, Strict(), Field(ge=-_PROB_TOL, le=1 + _PROB_TOL), BeforeValidator(_plain)
]
_Str = Annotated[str, Strict()]
_Time = Annotated[
    str,
    Strict(),
    AfterValidator(_iso_time),
    BeforeValidator(lambda v: v.isoformat() if isinstance(v, datetime) else v),
]


@validated(revalidate_instances="always")
class Disagreement:
    """A position where the target rejected the draft's proposal.

    Args:
        position (int): Index in the generated tokens (0-based, prompt excluded).
        draft_token (int): Token the draft proposed.
        target_token (int): Token the target emitted at that position.
        draft_confidence (float): ``q(draft_token)`` under the draft's processed
          distribution, in ``[0, 1]``.
        target_confidence (float): ``p(target_token)`` under the target's processed
          distribution, in ``[0, 1]``.
        top_k_tokens (list[int]): The target's top-k token ids at that position
          (raw logits, temperature 1).
        top_k_logprobs (list[float]): Their log-probabilities (``log_softmax`` of the
          raw target logits): finite, ``<= 0``, same length as ``top_k_tokens``.

    Raises:
        ValueError: If a field has the wrong type or is out of range; the message names
          the field and the value.
    """

    position: _TokenId
    draft_token: _TokenId
    target_token: _TokenId
    draft_confidence: _Probability
    target_confidence: _Probability
    top_k_tokens: _TokenIds
    top_k_logprobs: _LogProbs

    def __post_init__(self) -> None:
        if len(self.top_k_tokens) != len(self.top_k_logprobs):
            raise ValueError(
                f"{HERE}.top_k_tokens and {HERE}.top_k_logprobs must have the same "
                f"length, got {len(self.top_k_tokens)} and {len(self.top_k_logprobs)}"
            )

    def validate(self, prefix: str = "Disagreement") -> None:
        """Check and normalize every field in place.

        Args:
            prefix (str): How error messages name this record. Default:
              ``"Disagreement"``.

        Raises:
            ValueError: Naming the first offending field and its value.
        """
        revalidate(self, prefix)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict of JSON types (lists are copies)."""
        return {
            f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Disagreement:
        """Build a record from :meth:`to_dict` output.

        Args:
            data (Mapping): Exactly the fields of :class:`Disagreement`.

        Returns:
            Disagreement: The validated record.

        Raises:
            ValueError: On a missing or unknown field, or an invalid value.
        """
        return build(cls, data)


@validated()
class TrainingExample:
    """One low-acceptance generation, kept for training the draft.

    Args:
        id (str): Non-empty identifier, unique among the examples awaiting training.
        prompt (str): The user's prompt.
        target_output (str): The text the target generated.
        acceptance_rate (float): Fraction of drafted tokens accepted, in ``[0, 1]``.
        prompt_tokens (list[int]): Tokens fed to the model (after the chat template).
        disagreements (list[Disagreement]): Rejected positions; dicts are converted.
        timestamp (str): ISO 8601 time of the generation (a ``datetime`` is converted).
        output_tokens (list[int]): Generated token ids; if empty, the trainer encodes
          ``target_output``. Default: ``[]``.

    Raises:
        ValueError: If a field has the wrong type or is out of range; the message names
          the field (``TrainingExample.disagreements[2].position``) and the value.
    """

    id: Annotated[str, Strict(), Field(min_length=1)]
    prompt: _Str
    target_output: _Str
    acceptance_rate: Annotated[
        float, Strict(), Field(ge=0, le=1), BeforeValidator(_plain)
    ]
    prompt_tokens: _TokenIds
    disagreements: list[Annotated[Disagreement, BeforeValidator(_as_mapping)]]
    timestamp: _Time
    output_tokens: _TokenIds = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        """Check and normalize every field in place.

        Raises:
            ValueError: Naming the first offending field and its value.
        """
        revalidate(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict of JSON types (nested records become dicts)."""
        out = {
            f.name: copy.copy(getattr(self, f.name)) for f in dataclasses.fields(self)
        }
        out["disagreements"] = [d.to_dict() for d in self.disagreements]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingExample:
        """Build a record from :meth:`to_dict` output.

        Args:
            data (Mapping): The fields of :class:`TrainingExample`; ``output_tokens``
              may be absent.

        Returns:
            TrainingExample: The validated record.

        Raises:
            ValueError: On a missing or unknown field, or an invalid value.
        """
        return build(cls, data)
