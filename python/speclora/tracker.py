"""Acceptance-rate tracking across generations."""

from __future__ import annotations

import math
from collections import deque


class AcceptanceTracker:
    """Recent and overall acceptance rates, one sample per generation.

    Args:
        window (int): How many recent generations ``recent_average`` covers.
          Default: ``20``.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._total = 0.0
        self.total_samples = 0

    def add(self, acceptance_rate: float) -> None:
        self._recent.append(acceptance_rate)
        self._total += acceptance_rate
        self.total_samples += 1

    # NaN, not 0.0, before any sample: "no data yet" must not read as 0 %
    # acceptance (right after an adapter swap, say), and NaN still formats and
    # compares like the float it replaces.
    @property
    def recent_average(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else math.nan

    @property
    def overall_average(self) -> float:
        return self._total / self.total_samples if self.total_samples else math.nan

    def reset_recent(self) -> None:
        """Forget the window (after an adapter swap, old rates describe another draft)."""
        self._recent.clear()

    def as_dict(self) -> dict[str, float | int]:
        return {
            "recent_average": self.recent_average,
            "overall_average": self.overall_average,
            "total_samples": self.total_samples,
        }
