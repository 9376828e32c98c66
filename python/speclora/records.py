"""Training records: what a low-acceptance generation leaves behind for the trainer.

A :class:`TrainingExample` is one generation (prompt, the target's output, its token ids)
plus a :class:`Disagreement` for every position where the draft's proposal was rejected.
Both validate and normalize their fields on construction, so an instance always
serializes to plain JSON types (``int``, ``float``, ``str``, lists) and
``from_dict(x.to_dict()) == x``.
"""

from __future__ import annotations

import math
import operator
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from typing import Any

RECORD_VERSION = 1
"""Format version of :meth:`TrainingExample.to_dict`; stored beside every record."""

# Confidences and log-probabilities come from float32 softmaxes, whose rounding can put a
# probability a few ulps above 1 or a log-probability a few ulps above 0.
_PROB_TOL = 1e-4

# Messages name the offending value; a stored record may hold a megabyte string or a
# list nested past the interpreter's recursion limit, so values are shown abridged.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_show = _REPR.repr


def _as_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    # bool is an int subclass; a True where a token id belongs is always a bug.
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool {_show(value)}")
    try:
        # operator.index accepts numpy and MLX integer scalars but not floats.
        result = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an int, got {type(value).__name__} {_show(value)}"
        ) from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_show(result)}")
    return result


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(
            f"{name} must be a float, got {type(value).__name__} {_show(value)}"
        )
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"{name} must be a float, got {_show(value)} ({exc})"
        ) from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _as_probability(value: Any, name: str, *, tol: float = 0.0) -> float:
    result = _as_float(value, name)
    if not -tol <= result <= 1.0 + tol:
        raise ValueError(f"{name} must be in [0, 1], got {result}")
    return result


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{name} must be a str, got {type(value).__name__} {_show(value)}"
        )
    return value


def _as_list(value: Any, name: str) -> list[Any]:
    # Arrays (numpy, MLX) are not Sequences but convert with tolist().
    if not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name} must be a list, got {type(value).__name__} {_show(value)}"
        )
    return list(value)


def _as_token_list(value: Any, name: str) -> list[int]:
    return [
        _as_int(v, f"{name}[{i}]", minimum=0)
        for i, v in enumerate(_as_list(value, name))
    ]


def _check_keys(cls: type, data: Any) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{cls.__name__} must be built from a mapping, got {type(data).__name__}"
        )
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(_show(k) for k in unknown[:5])
        raise ValueError(f"{cls.__name__}: unknown field(s) [{shown}]{more}")
    required = [
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{cls.__name__}: missing field(s) {missing}")


@dataclass
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

    position: int
    draft_token: int
    target_token: int
    draft_confidence: float
    target_confidence: float
    top_k_tokens: list[int]
    top_k_logprobs: list[float]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "Disagreement") -> None:
        """Check and normalize every field in place.

        Args:
            prefix (str): How error messages name this record. Default:
              ``"Disagreement"``.

        Raises:
            ValueError: Naming the first offending field and its value.
        """
        self.position = _as_int(self.position, f"{prefix}.position", minimum=0)
        self.draft_token = _as_int(self.draft_token, f"{prefix}.draft_token", minimum=0)
        self.target_token = _as_int(
            self.target_token, f"{prefix}.target_token", minimum=0
        )
        self.draft_confidence = _as_probability(
            self.draft_confidence, f"{prefix}.draft_confidence", tol=_PROB_TOL
        )
        self.target_confidence = _as_probability(
            self.target_confidence, f"{prefix}.target_confidence", tol=_PROB_TOL
        )
        self.top_k_tokens = _as_token_list(self.top_k_tokens, f"{prefix}.top_k_tokens")
        name = f"{prefix}.top_k_logprobs"
        logprobs = [
            _as_float(v, f"{name}[{i}]")
            for i, v in enumerate(_as_list(self.top_k_logprobs, name))
        ]
        for i, lp in enumerate(logprobs):
            if lp > _PROB_TOL:
                raise ValueError(
                    f"{name}[{i}] must be <= 0 (a log-probability), got {lp}"
                )
        self.top_k_logprobs = logprobs
        if len(self.top_k_tokens) != len(self.top_k_logprobs):
            raise ValueError(
                f"{prefix}.top_k_tokens and {prefix}.top_k_logprobs must have the same "
                f"length, got {len(self.top_k_tokens)} and {len(self.top_k_logprobs)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict of JSON types (lists are copies)."""
        return {
            "position": self.position,
            "draft_token": self.draft_token,
            "target_token": self.target_token,
            "draft_confidence": self.draft_confidence,
            "target_confidence": self.target_confidence,
            "top_k_tokens": list(self.top_k_tokens),
            "top_k_logprobs": list(self.top_k_logprobs),
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
        _check_keys(cls, data)
        return cls(**data)


def _as_disagreement(value: Any, name: str) -> Disagreement:
    try:
        if isinstance(value, Disagreement):
            value.validate(name)
            return value
        if isinstance(value, Mapping):
            _check_keys(Disagreement, value)
            record = Disagreement.__new__(Disagreement)
            for key, item in value.items():
                setattr(record, key, item)
            record.validate(name)
            return record
        if is_dataclass(value) and not isinstance(value, type):
            # Accepts an equivalent record type defined elsewhere.
            return _as_disagreement(asdict(value), name)
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(name):
            message = f"{name}: {message}"
        raise ValueError(message) from None
    raise ValueError(
        f"{name} must be a Disagreement or a dict, got {type(value).__name__}"
    )


@dataclass
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

    id: str
    prompt: str
    target_output: str
    acceptance_rate: float
    prompt_tokens: list[int]
    disagreements: list[Disagreement]
    timestamp: str
    output_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalize every field in place.

        Raises:
            ValueError: Naming the first offending field and its value.
        """
        p = "TrainingExample"
        self.id = _as_str(self.id, f"{p}.id")
        if not self.id:
            raise ValueError(f"{p}.id must be a non-empty str, got ''")
        self.prompt = _as_str(self.prompt, f"{p}.prompt")
        self.target_output = _as_str(self.target_output, f"{p}.target_output")
        self.acceptance_rate = _as_probability(
            self.acceptance_rate, f"{p}.acceptance_rate"
        )
        self.prompt_tokens = _as_token_list(self.prompt_tokens, f"{p}.prompt_tokens")
        self.output_tokens = _as_token_list(self.output_tokens, f"{p}.output_tokens")
        name = f"{p}.disagreements"
        self.disagreements = [
            _as_disagreement(d, f"{name}[{i}]")
            for i, d in enumerate(_as_list(self.disagreements, name))
        ]
        if isinstance(self.timestamp, datetime):
            self.timestamp = self.timestamp.isoformat()
        self.timestamp = _as_str(self.timestamp, f"{p}.timestamp")
        try:
            datetime.fromisoformat(self.timestamp)
        except ValueError:
            raise ValueError(
                f"{p}.timestamp must be an ISO 8601 time such as "
                f"'2024-01-01T00:00:00', got {_show(self.timestamp)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict of JSON types (nested records become dicts)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target_output": self.target_output,
            "acceptance_rate": self.acceptance_rate,
            "prompt_tokens": list(self.prompt_tokens),
            "disagreements": [d.to_dict() for d in self.disagreements],
            "timestamp": self.timestamp,
            "output_tokens": list(self.output_tokens),
        }

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
        _check_keys(cls, data)
        return cls(**data)
