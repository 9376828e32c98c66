"""Prompt lookup: draft tokens copied from earlier in the prompt and the output.

When the last ``n`` tokens occurred before, the tokens that followed that earlier
occurrence are a free guess at what follows now (transformers'
``prompt_lookup_num_tokens``, vLLM's n-gram proposer, llama.cpp's lookup decoding).
Small models decoding greedily repeat themselves a lot, and code and markup repeat
names and structure, so such guesses are often right; they cost no model call.

The guess is a deterministic function of the tokens so far: as a draft
distribution it is one-hot, which :func:`speclora.acceptance.speculative_accept`
handles at every temperature (the draft is accepted with probability ``p(x)``; on
rejection the next token is drawn from ``p`` without ``x``), so the output keeps the
target's distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NgramProposal:
    """What :meth:`NgramProposer.propose` found.

    Args:
        tokens (list[int]): The proposed continuation, at most the ``k`` asked for.
        match (int): Length of the suffix that matched, ``0`` when nothing did.
    """

    tokens: list[int]
    match: int


NO_PROPOSAL = NgramProposal([], 0)


class NgramProposer:
    """Proposes the continuation of the latest earlier occurrence of the longest
    recent suffix (between ``min_n`` and ``max_n`` tokens).

    The index is updated incrementally: :meth:`extend` costs ``O(max_n)`` per new
    token and :meth:`propose` ``O(max_n + k)``. When the match is so recent that
    its continuation runs into the present (a loop of period ``p``), the proposal
    keeps copying with that period, as the loop would go on.

    Args:
        tokens (Iterable[int]): The history so far (prompt, then output).
        min_n (int): Shortest suffix that may match. Default: ``1``.
        max_n (int): Longest suffix tried first. Default: ``4``.
    """

    def __init__(self, tokens: Iterable[int] = (), *, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.history: list[int] = []
        # n-gram -> index of the token that followed its latest occurrence.
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to the history."""
        h = self.history
        for t in tokens:
            end = len(h)  # the n-grams ending here now have a continuation: t
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._next[tuple(h[end - n : end])] = end
            h.append(t)

    def propose(self, k: int) -> NgramProposal:
        """Up to ``k`` tokens continuing the history, or none.

        Args:
            k (int): Most tokens to propose.

        Returns:
            NgramProposal: The tokens and the length of the matched suffix.
        """
        h = self.history
        size = len(h)
        if k <= 0:
            return NO_PROPOSAL
        for n in range(min(self.max_n, size), self.min_n - 1, -1):
            start = self._next.get(tuple(h[size - n :]))
            if start is None:
                continue
            period = size - start
            out = [h[start + i] if i < period else h[start + i % period] for i in range(k)]
            return NgramProposal(out, n)
        return NO_PROPOSAL
