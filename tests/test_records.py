"""Tests for the training records (speclora.records)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from speclora.records import RECORD_VERSION, Disagreement, TrainingExample


def disagreement_dict(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "position": 3,
        "draft_token": 17,
        "target_token": 42,
        "draft_confidence": 0.61,
        "target_confidence": 0.87,
        "top_k_tokens": [42, 17, 5],
        "top_k_logprobs": [-0.14, -1.9, -3.5],
    }
    d.update(overrides)
    return d


def example_dict(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": "ex-1",
        "prompt": "Write a function.",
        "target_output": "def f():\n    return 1",
        "acceptance_rate": 0.25,
        "prompt_tokens": [1, 200, 31],
        "disagreements": [disagreement_dict(), disagreement_dict(position=9)],
        "timestamp": "2024-01-01T00:00:00",
        "output_tokens": [7, 8, 9, 42, 10, 11, 12, 13, 14, 15],
    }
    d.update(overrides)
    return d


def test_record_version_is_one() -> None:
    assert RECORD_VERSION == 1


def test_disagreement_round_trip() -> None:
    d = Disagreement.from_dict(disagreement_dict())
    assert Disagreement.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert d.to_dict() == disagreement_dict()


def test_training_example_round_trip_through_json() -> None:
    ex = TrainingExample.from_dict(example_dict())
    again = TrainingExample.from_dict(json.loads(json.dumps(ex.to_dict())))
    assert again == ex
    assert again.to_dict() == example_dict()
    assert all(isinstance(d, Disagreement) for d in again.disagreements)


def test_disagreements_given_as_dicts_are_converted() -> None:
    ex = TrainingExample(
        id="a",
        prompt="p",
        target_output="t",
        acceptance_rate=0.1,
        prompt_tokens=[1],
        disagreements=[disagreement_dict()],  # type: ignore[list-item]
        timestamp="2024-01-01T00:00:00",
    )
    assert ex.disagreements == [Disagreement(**disagreement_dict())]


def test_output_tokens_default_to_empty() -> None:
    data = example_dict()
    del data["output_tokens"]
    assert TrainingExample.from_dict(data).output_tokens == []


def test_array_and_numpy_scalars_become_plain_json_types() -> None:
    d = Disagreement(
        position=np.int64(2),  # type: ignore[arg-type]
        draft_token=np.int32(5),  # type: ignore[arg-type]
        target_token=6,
        draft_confidence=np.float32(0.25),  # type: ignore[arg-type]
        target_confidence=1,
        top_k_tokens=np.array([6, 5]),  # type: ignore[arg-type]
        top_k_logprobs=np.array([-0.5, -1.0], dtype=np.float32),  # type: ignore[arg-type]
    )
    data = d.to_dict()
    json.dumps(data)  # raises on numpy types
    assert type(data["position"]) is int and type(data["draft_confidence"]) is float
    assert data["top_k_tokens"] == [6, 5] and data["target_confidence"] == 1.0


def test_lists_of_numpy_scalars_become_plain_lists() -> None:
    d = Disagreement.from_dict(
        disagreement_dict(
            top_k_tokens=[np.int64(42), np.int32(17), 5],
            top_k_logprobs=[np.float32(-0.5), -1.0, np.float32(-2.0)],
        )
    )
    assert d.top_k_tokens == [42, 17, 5] and d.top_k_logprobs == [-0.5, -1.0, -2.0]
    assert {type(v) for v in d.top_k_tokens + d.top_k_logprobs} == {int, float}


def test_datetime_timestamp_is_stored_as_iso_string() -> None:
    ex = TrainingExample.from_dict(
        example_dict(timestamp=datetime(2024, 5, 6, 7, 8, 9))
    )
    assert ex.timestamp == "2024-05-06T07:08:09"


def test_float32_rounding_above_one_is_accepted() -> None:
    d = Disagreement.from_dict(disagreement_dict(target_confidence=1.0000001))
    assert d.target_confidence == 1.0000001


@pytest.mark.parametrize(
    "overrides, field_name",
    [
        ({"id": ""}, "TrainingExample.id"),
        ({"id": 5}, "TrainingExample.id"),
        ({"prompt": None}, "TrainingExample.prompt"),
        ({"acceptance_rate": 1.5}, "TrainingExample.acceptance_rate"),
        ({"acceptance_rate": float("nan")}, "TrainingExample.acceptance_rate"),
        ({"acceptance_rate": "0.5"}, "TrainingExample.acceptance_rate"),
        ({"prompt_tokens": [1, -2]}, "TrainingExample.prompt_tokens[1]"),
        ({"prompt_tokens": [1, True]}, "TrainingExample.prompt_tokens[1]"),
        ({"prompt_tokens": [1, 2.0]}, "TrainingExample.prompt_tokens[1]"),
        ({"prompt_tokens": "1 2"}, "TrainingExample.prompt_tokens"),
        ({"output_tokens": None}, "TrainingExample.output_tokens"),
        ({"timestamp": "yesterday"}, "TrainingExample.timestamp"),
        ({"disagreements": {"position": 1}}, "TrainingExample.disagreements"),
        ({"disagreements": [3]}, "TrainingExample.disagreements[0]"),
        (
            {"disagreements": [disagreement_dict(), disagreement_dict(position=-1)]},
            "TrainingExample.disagreements[1].position",
        ),
        (
            {"disagreements": [disagreement_dict(draft_confidence=2.0)]},
            "TrainingExample.disagreements[0].draft_confidence",
        ),
        (
            {"disagreements": [disagreement_dict(top_k_logprobs=[-0.1, 0.5, -2.0])]},
            "TrainingExample.disagreements[0].top_k_logprobs[1]",
        ),
        (
            {
                "disagreements": [
                    disagreement_dict(top_k_logprobs=[-0.1, float("-inf"), -2])
                ]
            },
            "TrainingExample.disagreements[0].top_k_logprobs[1]",
        ),
        (
            {"disagreements": [disagreement_dict(top_k_logprobs=[-0.1])]},
            "TrainingExample.disagreements[0].top_k_tokens",
        ),
        (
            {"disagreements": [{**disagreement_dict(), "extra": 1}]},
            "TrainingExample.disagreements[0]",
        ),
    ],
)
def test_invalid_field_raises_value_error_naming_it(
    overrides: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(ValueError) as info:
        TrainingExample.from_dict(example_dict(**overrides))
    assert field_name in str(info.value)


def test_missing_and_unknown_fields_are_named() -> None:
    data = example_dict()
    del data["prompt_tokens"]
    with pytest.raises(ValueError, match="missing field.*prompt_tokens"):
        TrainingExample.from_dict(data)
    with pytest.raises(ValueError, match="unknown field.*color"):
        TrainingExample.from_dict(example_dict(color="red"))
    with pytest.raises(ValueError, match="mapping"):
        TrainingExample.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing field.*top_k_logprobs"):
        d = disagreement_dict()
        del d["top_k_logprobs"]
        Disagreement.from_dict(d)


def test_validate_catches_mutation_after_construction() -> None:
    ex = TrainingExample.from_dict(example_dict())
    ex.disagreements[0].target_token = -4
    with pytest.raises(ValueError, match=r"disagreements\[0\]\.target_token"):
        ex.validate()


_text = st.text(st.characters(), max_size=40)  # includes lone surrogates and NUL
_tokens = st.lists(st.integers(0, 2**31 - 1), max_size=8)
_prob = st.floats(0.0, 1.0)


@st.composite
def disagreements(draw: st.DrawFn) -> Disagreement:
    k = draw(st.integers(0, 4))
    return Disagreement(
        position=draw(st.integers(0, 10_000)),
        draft_token=draw(st.integers(0, 2**31 - 1)),
        target_token=draw(st.integers(0, 2**31 - 1)),
        draft_confidence=draw(_prob),
        target_confidence=draw(_prob),
        top_k_tokens=draw(st.lists(st.integers(0, 50_000), min_size=k, max_size=k)),
        top_k_logprobs=draw(st.lists(st.floats(-1e4, 0.0), min_size=k, max_size=k)),
    )


@st.composite
def examples(draw: st.DrawFn) -> TrainingExample:
    return TrainingExample(
        id=draw(st.text(st.characters(), min_size=1, max_size=20)),
        prompt=draw(_text),
        target_output=draw(_text),
        acceptance_rate=draw(_prob),
        prompt_tokens=draw(_tokens),
        disagreements=draw(st.lists(disagreements(), max_size=3)),
        timestamp=draw(st.datetimes()).isoformat(),
        output_tokens=draw(_tokens),
    )


@settings(max_examples=60, deadline=None)
@given(examples())
def test_any_valid_example_round_trips_exactly(ex: TrainingExample) -> None:
    text = json.dumps(ex.to_dict(), allow_nan=False)
    assert TrainingExample.from_dict(json.loads(text)) == ex


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.floats()
    | _text,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [
    "id",
    "prompt",
    "target_output",
    "acceptance_rate",
    "prompt_tokens",
    "disagreements",
    "timestamp",
    "output_tokens",
]
_DISAGREEMENT_FIELDS = list(disagreement_dict())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_FIELDS + _DISAGREEMENT_FIELDS), _json)
def test_any_json_value_in_any_field_is_valid_or_a_value_error(
    name: str, value: Any
) -> None:
    # What a stored payload can hold: anything JSON. Loading must sort it into a
    # record or a ValueError, never another exception.
    if name in _DISAGREEMENT_FIELDS:
        data = example_dict(disagreements=[disagreement_dict(**{name: value})])
    else:
        data = example_dict(**{name: value})
    try:
        TrainingExample.from_dict(data)
    except ValueError as exc:
        assert len(str(exc)) < 1000


@pytest.mark.parametrize(
    "overrides, field_name",
    [
        ({"prompt_tokens": ["x" * 10**6]}, "TrainingExample.prompt_tokens[0]"),
        ({"prompt": list(range(10**5))}, "TrainingExample.prompt"),
        ({"acceptance_rate": 10**400}, "TrainingExample.acceptance_rate"),
        ({"prompt_tokens": [[[[[[[[[[1]]]]]]]]]]}, "TrainingExample.prompt_tokens[0]"),
        ({f"k{i}": 1 for i in range(10**4)}, "unknown field"),
    ],
    ids=["long string", "long list", "int past float", "nested", "many keys"],
)
def test_huge_or_deep_values_give_short_messages(
    overrides: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(ValueError) as info:
        TrainingExample.from_dict(example_dict(**overrides))
    assert field_name in str(info.value) and len(str(info.value)) < 1000


def test_nesting_deeper_than_the_interpreter_allows_is_a_value_error() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"TrainingExample\.prompt_tokens\[0\]"):
        TrainingExample.from_dict(example_dict(prompt_tokens=deep))
