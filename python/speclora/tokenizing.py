"""Prompts to token ids, as mlx-lm does it: the chat template when the tokenizer has
one, otherwise BOS unless the text already starts with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Prompt = str | Sequence[int]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids for ``text`` as written (no chat template), BOS first unless the
    text starts with it.

    Raises:
        ValueError: text the tokenizer cannot encode (e.g. a lone surrogate).
    """
    bos = getattr(tokenizer, "bos_token", None)
    try:
        return list(
            tokenizer.encode(
                text, add_special_tokens=bos is None or not text.startswith(bos)
            )
        )
    except (TypeError, ValueError, UnicodeError) as e:
        raise ValueError(f"prompt cannot be tokenized ({type(e).__name__}: {e})") from e


def encode_prompt(
    tokenizer: Any, prompt: Prompt, vocab_size: int, *, use_chat_template: bool = True
) -> list[int]:
    """Token ids for ``prompt``: a string, or token ids (checked against
    ``vocab_size``) passed through.

    Raises:
        ValueError: an empty prompt, text the tokenizer cannot encode, or ids
          outside the vocabulary.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty or whitespace only")
        if not (use_chat_template and getattr(tokenizer, "has_chat_template", False)):
            return encode_text(tokenizer, prompt)
        try:
            messages = [{"role": "user", "content": prompt}]
            return list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            )
        except (TypeError, ValueError, UnicodeError) as e:
            raise ValueError(
                f"prompt cannot be tokenized ({type(e).__name__}: {e})"
            ) from e
    if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        tokens = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        if not tokens:
            raise ValueError("prompt has no tokens")
        bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}"
            )
        return tokens
    raise ValueError(
        f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
    )
