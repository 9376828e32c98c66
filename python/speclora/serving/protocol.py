"""The OpenAI wire format: request bodies, responses, stream chunks and errors.

Every request body is checked here and only here (:func:`parse_body`): malformed
JSON, wrong types (no coercion: ``"0.5"`` is not a number, ``true`` not an integer),
out-of-range values and unknown fields become an :class:`APIError` with status 400
whose message names the field. Requests that reach the worker are well formed;
what only the model can judge (a prompt beyond its context window) is refused
there, with the same error shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from speclora.validation import HTTP, explain

INT32_MAX = 2**31 - 1
"""Largest ``max_tokens``: positions in MLX are int32."""
UINT64_MAX = 2**64 - 1
"""Largest seed ``mx.random.seed`` accepts."""
MAX_STOP_STRINGS = 4
"""OpenAI's limit on ``stop``."""
MAX_BODY_BYTES = 8 * 2**20
"""Largest request body read; prompts that long are beyond any context window anyway."""


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status (int): The HTTP status.
        message (str): What is wrong, naming the value or field.
        type (str): OpenAI's error type. Default: ``"invalid_request_error"``.
        param (str, optional): The request field at fault.
        code (str, optional): A machine-readable code (e.g. ``"context_length_exceeded"``).
        headers (Mapping, optional): Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ------------------------------------------------------------------ request bodies

_STRICT = ConfigDict(extra="forbid", strict=True)


def _neutral(value: float | None) -> float | None:
    if value not in (None, 0):
        raise ValueError("only 0 is supported")
    return value


def _no_logprobs(value: bool | None) -> bool | None:
    if value:
        raise ValueError("log-probabilities are not returned by this server")
    return value


def _stop_strings(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return value


def _token_ids(value: str | list[int]) -> str | list[int]:
    if not value:
        raise ValueError("the prompt is empty")
    if isinstance(value, list) and any(t < 0 for t in value):
        raise ValueError("token ids must be >= 0")
    return value


class SpecloraOptions(BaseModel):
    """The ``speclora`` body field: per-request options beyond OpenAI's."""

    model_config = _STRICT

    mode: Literal["fast", "detailed"] | None = Field(
        None,
        description="detailed records where draft and target disagree, so that the "
        "request can teach the draft; fast does not. Default: the server's.",
    )


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What both generation endpoints accept."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Annotated[str | list[str] | None, AfterValidator(_stop_strings)] = Field(
        None,
        json_schema_extra={
            "expected": f"a string or a list of at most {MAX_STOP_STRINGS} strings"
        },
    )
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = None
    presence_penalty: Annotated[float | None, AfterValidator(_neutral)] = None
    frequency_penalty: Annotated[float | None, AfterValidator(_neutral)] = None
    speclora: SpecloraOptions | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def options(self) -> dict[str, Any]:
        """The generation options, as :class:`~speclora.serving.worker.GenerationSpec` names them."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop_strings(),
            "mode": self.speclora.mode if self.speclora else None,
        }

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: raw text (no chat template) or token ids."""

    prompt: Annotated[str | list[int], AfterValidator(_token_ids)] = Field(
        json_schema_extra={
            "expected": "a non-empty string or a non-empty list of token ids"
        }
    )


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(
        json_schema_extra={"expected": "a string or a list of text parts"}
    )
    name: str | None = None

    def text(self) -> str:
        return (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text for p in self.content)
        )


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: messages through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: Annotated[bool | None, AfterValidator(_no_logprobs)] = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "max_tokens": self.token_limit()}

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``."""
        if self.max_completion_tokens is not None and self.max_tokens not in (
            None,
            self.max_completion_tokens,
        ):
            raise APIError(
                400,
                f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                f"({self.max_completion_tokens}) disagree; give one",
                param="max_completion_tokens",
            )
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


Request = TypeVar("Request", bound=BaseModel)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes, model: type[Request]) -> Request:
    """Validate a request body.

    Args:
        raw (bytes): The body as received.
        model (type): :class:`CompletionRequest` or :class:`ChatCompletionRequest`.

    Returns:
        The validated request.

    Raises:
        APIError: 400, naming the problem (and the field, in ``param``).
    """
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = explain(e, model, style=HTTP)
        raise APIError(400, message, param=param or None) from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None


# ---------------------------------------------------------------------- responses


@dataclass
class Outcome:
    """What one generation produced, in the server's terms.

    ``timings`` uses llama.cpp's names (``prompt_n``, ``predicted_n``,
    ``draft_n``, ``draft_n_accepted`` ...); ``speclora`` adds the acceptance
    rate, mean accepted length, tokens/s, mode and the adapter that drafted.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, Any] = field(default_factory=dict)
    speclora: dict[str, Any] = field(default_factory=dict)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_id(kind: Literal["chat", "text"]) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def completion_body(
    rid: str, model: str, outcome: Outcome, *, chat: bool
) -> dict[str, Any]:
    """The non-streaming response: ``chat.completion`` or ``text_completion``."""
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": outcome.finish_reason,
        "logprobs": None,
    }
    if chat:
        choice["message"] = {"role": "assistant", "content": outcome.text}
    else:
        choice["text"] = outcome.text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": outcome.usage(),
        "timings": outcome.timings,
        "speclora": outcome.speclora,
    }


def chunk_body(
    rid: str,
    model: str,
    *,
    chat: bool,
    text: str | None = None,
    role: bool = False,
    outcome: Outcome | None = None,
    usage_only: Outcome | None = None,
) -> dict[str, Any]:
    """One streamed event: a text delta, the final chunk (``outcome``: finish reason,
    usage and statistics), or the usage-only chunk of ``stream_options.include_usage``."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if usage_only is not None:
        body["choices"] = []
        body["usage"] = usage_only.usage()
        return body
    choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if outcome is not None:
        choice["finish_reason"] = outcome.finish_reason
        body["usage"] = outcome.usage()
        body["timings"] = outcome.timings
        body["speclora"] = outcome.speclora
    body["choices"] = [choice]
    return body


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, allow_nan=False)
    return f"data: {payload}\n\n".encode()


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "Outcome",
    "SpecloraOptions",
    "chunk_body",
    "completion_body",
    "new_id",
    "parse_body",
    "sse",
]
