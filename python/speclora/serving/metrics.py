"""Prometheus metrics of one server process (``GET /metrics``).

Request-side figures are counted as requests finish; the system's own counters
(acceptance overall and recent, failures waiting, training runs and promotions,
adapters) are read from the worker's latest snapshot at each scrape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from speclora.results import GenerationResult
from speclora.serving.protocol import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class _SystemCollector(Collector):
    """Gauges and counters read from the system's statistics at scrape time."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        queue: Callable[[], tuple[int, bool]],
    ) -> None:
        self._snapshot = snapshot
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        depth, busy = self._queue()
        yield GaugeMetricFamily(
            "speclora_queue_depth", "Requests waiting for the model.", value=depth
        )
        yield GaugeMetricFamily(
            "speclora_generating", "1 while a generation runs.", value=int(busy)
        )
        if not stats:
            return
        tracker = stats["tracker"]
        acceptance = GaugeMetricFamily(
            "speclora_acceptance_rate",
            "Draft acceptance rate: overall (since start) and recent (the last "
            "collection.tracker_window generations since the adapter changed; NaN before any).",
            labels=["window"],
        )
        acceptance.add_metric(["overall"], float(tracker["overall_average"]))
        acceptance.add_metric(["recent"], float(tracker["recent_average"]))
        yield acceptance
        yield CounterMetricFamily(
            "speclora_generations",
            "Generations completed by this process.",
            value=stats["generation_count"],
        )
        yield GaugeMetricFamily(
            "speclora_failures_pending",
            "Low-acceptance generations in the store waiting to be trained on (all processes).",
            value=stats["failure_count"],
        )
        yield GaugeMetricFamily(
            "speclora_replay_buffer_size",
            "Examples kept for replay (all processes).",
            value=stats["replay_buffer_size"],
        )
        training = stats["training"]
        yield CounterMetricFamily(
            "speclora_training_runs",
            "Training runs started by this process.",
            value=training["runs"],
        )
        yield CounterMetricFamily(
            "speclora_training_promotions",
            "Runs of this process whose adapter was promoted.",
            value=training["promotions"],
        )
        yield GaugeMetricFamily(
            "speclora_training_running",
            "1 while this process trains.",
            value=int(training["running"]),
        )
        info = GaugeMetricFamily(
            "speclora_adapter_info",
            "The adapter drafting now (serving) and the one promoted under checkpoint_dir (active).",
            labels=["serving", "active"],
        )
        serving = Path(stats["adapter_path"]).name if stats["adapter_path"] else "base"
        active = (
            Path(stats["active_adapter"]).name if stats["active_adapter"] else "none"
        )
        info.add_metric([serving, active], 1.0)
        yield info


class ServerMetrics:
    """The metrics of one server, in their own registry.

    Args:
        snapshot (Callable): Returns the system's latest ``get_stats()``.
        queue (Callable): Returns (jobs waiting, whether one runs).
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        queue: Callable[[], tuple[int, bool]],
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "speclora_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "speclora_request_duration_seconds",
            "Time from request to the end of the response (streams included), by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "speclora_queue_wait_seconds",
            "Time a request waited for the model.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "speclora_time_to_first_token_seconds",
            "Time from request to its first generated text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "speclora_prompt_tokens", "Prompt tokens of completed requests.", registry=r
        )
        self.completion_tokens = Counter(
            "speclora_completion_tokens",
            "Tokens generated for completed requests.",
            registry=r,
        )
        self.draft_tokens = Counter(
            "speclora_draft_tokens",
            "Tokens proposed (every proposer), by the draft adapter serving.",
            ["adapter"],
            registry=r,
        )
        self.accepted_tokens = Counter(
            "speclora_draft_tokens_accepted",
            "Proposed tokens the target accepted, by adapter.",
            ["adapter"],
            registry=r,
        )
        self.position_drafted = Counter(
            "speclora_draft_position_drafted",
            "Rounds that proposed a token at this draft position.",
            ["position"],
            registry=r,
        )
        self.position_accepted = Counter(
            "speclora_draft_position_accepted",
            "Rounds whose draft token at this position was accepted.",
            ["position"],
            registry=r,
        )
        self.failures_collected = Counter(
            "speclora_failures_collected",
            "Generations of this process stored for training.",
            registry=r,
        )
        self.disconnects = Counter(
            "speclora_client_disconnects",
            "Requests whose client left before the answer ended.",
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "speclora_last_tokens_per_second",
            "Decoding speed of the last completed generation.",
            registry=r,
        )
        self.proposer_rounds = Counter(
            "speclora_proposer_rounds",
            "Rounds by proposer (draft: the draft model, ngram: prompt lookup, none: a plain target step).",
            ["proposer"],
            registry=r,
        )
        self.proposer_drafted = Counter(
            "speclora_proposer_tokens",
            "Tokens proposed, by proposer.",
            ["proposer"],
            registry=r,
        )
        self.proposer_accepted = Counter(
            "speclora_proposer_tokens_accepted",
            "Proposed tokens the target accepted, by proposer.",
            ["proposer"],
            registry=r,
        )
        r.register(_SystemCollector(snapshot, queue))

    def generation_done(
        self,
        outcome: Outcome,
        result: GenerationResult | None,
        waited_s: float,
        first_s: float | None,
    ) -> None:
        """Count a completed generation (called on the worker thread)."""
        self.queue_wait.observe(waited_s)
        if first_s is not None:
            self.first_token.observe(first_s)
        self.prompt_tokens.inc(outcome.prompt_tokens)
        self.completion_tokens.inc(outcome.completion_tokens)
        if outcome.speclora.get("collected"):
            self.failures_collected.inc()
        if result is None:
            return
        adapter = outcome.speclora["adapter"]
        self.draft_tokens.labels(adapter).inc(result.num_draft_tokens)
        self.accepted_tokens.labels(adapter).inc(result.num_accepted_tokens)
        for proposer, counts in result.stats.proposers.items():
            self.proposer_rounds.labels(proposer).inc(counts.rounds)
            self.proposer_drafted.labels(proposer).inc(counts.drafted)
            self.proposer_accepted.labels(proposer).inc(counts.accepted)
        for i, (drafted, accepted) in enumerate(
            zip(result.stats.position_drafted, result.stats.position_accepted)
        ):
            self.position_drafted.labels(str(i)).inc(drafted)
            self.position_accepted.labels(str(i)).inc(accepted)
        if math.isfinite(result.tokens_per_second):
            self.tokens_per_second.set(result.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "ServerMetrics"]
