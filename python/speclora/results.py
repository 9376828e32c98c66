"""What a generation returns, and the round statistics behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from speclora.decoding import Round
from speclora.records import Disagreement


@dataclass
class ProposerStats:
    """Rounds, proposed and accepted tokens of one proposer."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class RoundStats:
    """Running totals over the rounds of one or more generations.

    The per-position lists follow vLLM's metrics: ``position_accepted[i]`` counts the
    rounds whose draft token ``i`` was accepted, out of ``position_drafted[i]`` rounds
    that drafted at least ``i + 1`` tokens. Counts cover every proposer;
    ``proposers`` splits them by proposer (``"draft"``: the draft model, ``"ngram"``:
    prompt lookup, ``"none"``: plain target steps). ``timings`` adds up the phases
    of profiled rounds (see :data:`speclora.decoding.PHASES`).
    """

    num_rounds: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_tokens: int = 0
    position_drafted: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    round_seconds: float = 0.0
    proposers: dict[str, ProposerStats] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, r: Round) -> None:
        by = self.proposers.setdefault(r.proposer, ProposerStats())
        by.rounds += 1
        by.drafted += r.drafted
        by.accepted += r.accepted
        for phase, seconds in r.timings.items():
            self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        self.num_rounds += 1
        self.num_draft_tokens += r.drafted
        self.num_accepted_tokens += r.accepted
        self.num_tokens += len(r.tokens)
        missing = r.drafted - len(self.position_drafted)
        if missing > 0:
            self.position_drafted.extend([0] * missing)
            self.position_accepted.extend([0] * missing)
        for i in range(r.drafted):
            self.position_drafted[i] += 1
            self.position_accepted[i] += int(i < r.accepted)
        self.round_seconds += r.seconds

    @property
    def draft_seconds(self) -> float:
        return self.timings.get("draft", 0.0)

    @property
    def verify_seconds(self) -> float:
        return self.timings.get("verify", 0.0)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (``0.0`` when nothing was drafted)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per round."""
        return self.num_accepted_tokens / self.num_rounds if self.num_rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Emitted tokens per round (``1 + mean_accepted_length`` before stops)."""
        return self.num_tokens / self.num_rounds if self.num_rounds else 0.0


@dataclass
class GenerationResult:
    """The outcome of one ``generate`` call.

    ``text`` decodes ``tokens`` (the generated tokens, stop token excluded).
    ``finish_reason`` is ``"stop"`` (a stop token) or ``"length"`` (``max_tokens``).
    Timings: ``elapsed_s`` covers prefill and decoding; ``decode_s`` only the rounds;
    ``draft_s`` and ``verify_s`` are measured only when the decoder profiles
    (otherwise ``0.0``).
    ``disagreements`` is filled by detailed decoding, one per rejected draft token.
    """

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    stats: RoundStats
    elapsed_s: float
    disagreements: list[Disagreement] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.stats.acceptance_rate

    @property
    def num_draft_tokens(self) -> int:
        return self.stats.num_draft_tokens

    @property
    def num_accepted_tokens(self) -> int:
        return self.stats.num_accepted_tokens

    @property
    def num_rounds(self) -> int:
        return self.stats.num_rounds

    @property
    def mean_accepted_length(self) -> float:
        return self.stats.mean_accepted_length

    @property
    def position_acceptance(self) -> list[float]:
        """Acceptance rate of draft position ``i`` (over rounds that drafted it)."""
        return [a / d for a, d in zip(self.stats.position_accepted, self.stats.position_drafted)]

    @property
    def decode_s(self) -> float:
        return self.stats.round_seconds

    @property
    def draft_s(self) -> float:
        return self.stats.draft_seconds

    @property
    def verify_s(self) -> float:
        return self.stats.verify_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prefill excluded)."""
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class StreamChunk:
    """A piece of a streamed generation.

    Every chunk but the last carries the ``tokens`` one round decided (final:
    the concatenation of all chunks' tokens is the generation) and that round's
    ``drafted`` / ``accepted`` counts, so a caller that stops early still knows
    them; the last has no tokens and the whole ``result``.
    """

    tokens: list[int]
    result: GenerationResult | None = None
    drafted: int = 0
    accepted: int = 0
