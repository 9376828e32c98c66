"""The one thread that drives the model: a bounded queue of jobs, one at a time.

The system is created, initialized and used on this thread only, so MLX never
sees two threads and the model never runs two generations. Requests become
:class:`Job` objects: admitted while fewer than ``queue_size`` wait (else
:class:`QueueFull`), run in arrival order, and streamed back to the event loop
as events (``("started", None)`` once the request proved valid and the first
round ran, ``("text", str)`` pieces, then ``("done", Outcome)``; or ``("error",
APIError)`` at any point). Cancelling a job (its client went away) frees its place at once
when it is still waiting, and stops its generation after the current round when
it runs: the system's stream is closed, which releases the system and collects
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from speclora.results import GenerationResult
from speclora.tokenizing import encode_text
from speclora.serving.protocol import APIError, ChatMessage, Outcome

logger = logging.getLogger("speclora.server")

STATS_REFRESH_S = 2.0
"""How often an idle worker reads the system's counters (training outcomes, adapters)."""


class QueueFull(Exception):
    """Raised by :meth:`GenerationWorker.submit` when ``queue_size`` requests wait."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Listener(Protocol):
    """What the worker reports each completed generation to (the server's metrics)."""

    def generation_done(
        self,
        outcome: Outcome,
        result: GenerationResult | None,
        waited_s: float,
        first_s: float | None,
    ) -> None: ...


@dataclass
class GenerationSpec:
    """One request, as the worker runs it.

    ``messages`` (chat: templated here) or ``prompt`` (raw text, no template, or
    token ids). ``max_tokens`` ``None``: the configured default, shortened to
    what the context window leaves.
    """

    kind: Literal["chat", "text"]
    prompt: str | list[int] | None = None
    messages: Sequence[ChatMessage] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    mode: str | None = None


class Job:
    """A request in the worker's queue, and the channel its events come back on.

    Args:
        spec (GenerationSpec): What to generate.
        loop (asyncio.AbstractEventLoop): The loop the events are delivered to.
    """

    def __init__(self, spec: GenerationSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.first_text: float | None = None
        self.delivered = False  # the client has its answer (or its error)
        self.state: Literal["queued", "running", "dropped", "finished"] = "queued"
        self.cancelled = threading.Event()
        self._loop = loop

    def emit(self, kind: str, payload: Any) -> None:
        """Deliver an event to the loop (from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is gone: the server is shutting down
            self.cancelled.set()


class StopMatcher:
    """Text released as it is decoded, cut at the first stop string.

    Holds back only the longest tail that could begin a stop string, so nothing
    of a stop string is ever released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, *, final: bool = False) -> tuple[str, bool]:
        """Add decoded text; returns (text to release, whether a stop string was hit)."""
        self.pending += text
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        held = 0 if final else self._held()
        out = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(out) :]
        return out, False

    def _held(self) -> int:
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), held, -1):
                if self.pending.endswith(s[:k]):
                    held = k
                    break
        return held


def _adapter_name(path: str | None) -> str:
    return Path(path).name if path else "base"


def plain_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """A conversation as text, for tokenizers without a chat template."""
    lines = [f"{m.role.capitalize()}: {m.text()}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


class GenerationWorker:
    """Owns a :class:`~speclora.main.SpeculativeDecodingSystem` and runs jobs one at a time.

    Args:
        make_system (Callable): Builds and initializes the system (called on the
            worker thread).
        queue_size (int): Jobs that may wait while one runs.
        default_mode (str): ``"fast"`` or ``"detailed"`` for jobs that name none.
        listener (Listener, optional): Told about each generation and each stats refresh.
    """

    def __init__(
        self,
        make_system: Callable[[], Any],
        *,
        queue_size: int,
        default_mode: str,
        listener: Listener | None = None,
    ) -> None:
        self._make_system = make_system
        self.queue_size = queue_size
        self.default_mode = default_mode
        self.listener = listener
        self.system: Any = None
        self.stats: dict[str, Any] = {}
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_system = 0  # admitted and not finished: waiting + running
        self._running: Job | None = None
        self._service_s = (
            1.0  # running mean of a generation's duration, for Retry-After
        )
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name="speclora-generation", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until the system is initialized.

        Raises:
            RuntimeError: the system could not be built (the cause is chained).
        """
        self._thread.start()
        self._ready.wait(timeout)
        if self._failure is not None:
            raise RuntimeError(
                f"the model could not be loaded: {self._failure}"
            ) from self._failure
        if not self._ready.is_set():
            raise RuntimeError("the model did not load in time")

    def stop(self, timeout: float | None = None) -> None:
        """Cancel every job and end the thread (after the current round)."""
        with self._lock:
            if self._running is not None:
                self._running.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.cancel(job)
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- admission -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs admitted and not started."""
        with self._lock:
            return self._in_system - (self._running is not None)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def retry_after(self) -> int:
        """Seconds until a place is likely free (the running mean service time per job ahead)."""
        with self._lock:
            ahead = self._in_system
        return max(1, math.ceil(self._service_s * ahead))

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            QueueFull: ``queue_size`` jobs already wait.
        """
        with self._lock:
            if self._in_system >= self.queue_size + 1:
                ahead = self._in_system
                raise QueueFull(max(1, math.ceil(self._service_s * ahead)))
            self._in_system += 1
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        """The client is gone: drop a waiting job now, stop a running one after its round."""
        job.cancelled.set()
        with self._lock:
            if job.state == "queued":
                job.state = "dropped"
                self._in_system -= 1

    # -- the thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.system = self._make_system()
            self._refresh_stats()
        except Exception as e:  # noqa: BLE001 (reported by start())
            self._failure = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                job = self._jobs.get(timeout=STATS_REFRESH_S)
            except queue.Empty:
                self._refresh_stats()
                continue
            if job is None:
                return
            with self._lock:
                if job.state != "queued":
                    continue
                job.state = "running"
                self._running = job
            job.started = time.monotonic()
            try:
                self._run(job)
            except Exception as e:  # never let one request end the worker
                logger.exception("request failed")
                job.emit(
                    "error", APIError(500, f"internal error: {e}", type="server_error")
                )
            finally:
                with self._lock:
                    job.state = "finished"
                    self._running = None
                    self._in_system -= 1
                elapsed = time.monotonic() - job.started
                self._service_s = 0.8 * self._service_s + 0.2 * elapsed

    def _refresh_stats(self) -> None:
        try:
            self.stats = self.system.get_stats()
        except Exception:
            # A store that cannot be read right now: keep the last figures.
            logger.warning("reading the system's statistics failed", exc_info=True)
            return

    def _prompt_tokens(self, spec: GenerationSpec) -> list[int]:
        tokenizer = self.system.decoder.tokenizer
        manager = self.system.manager
        if spec.kind == "chat":
            assert spec.messages is not None
            manager.check_prompt_length("".join(m.text() for m in spec.messages))
            if getattr(tokenizer, "has_chat_template", False):
                messages = [
                    {"role": m.role, "content": m.text()} for m in spec.messages
                ]
                try:
                    return list(
                        tokenizer.apply_chat_template(
                            messages, add_generation_prompt=True
                        )
                    )
                except Exception as e:  # the template refused the conversation
                    raise ValueError(
                        f"the chat template cannot format these messages: {e}"
                    ) from e
            text = plain_chat_prompt(spec.messages)
        else:
            assert spec.prompt is not None
            if not isinstance(spec.prompt, str):
                return list(spec.prompt)
            manager.check_prompt_length(spec.prompt)
            text = spec.prompt
        return encode_text(tokenizer, text)

    def _max_tokens(self, spec: GenerationSpec, prompt_len: int) -> int:
        if spec.max_tokens is not None:
            return spec.max_tokens
        default: int = self.system.config.generation.max_tokens
        window = self.system.manager.target_config.get("max_position_embeddings")
        if isinstance(window, int) and prompt_len < window:
            return min(default, window - prompt_len)
        return default

    def _run(self, job: Job) -> None:
        spec = job.spec
        mode = spec.mode or self.default_mode
        detok = self.system.decoder.tokenizer.detokenizer
        stop = StopMatcher(spec.stop)
        param = "messages" if spec.kind == "chat" else "prompt"
        text: list[str] = []
        count = drafted = accepted = 0
        hit = False
        started = False
        result: GenerationResult | None = None
        stream = None
        try:
            prompt = self._prompt_tokens(spec)
            # Temperatures this low overflow float32 logits; they decode greedily.
            temperature = spec.temperature
            if temperature is not None and temperature < 0.01:
                temperature = 0.0
            stream = self.system.generate_stream(
                prompt,
                mode=mode,
                max_tokens=self._max_tokens(spec, len(prompt)),
                temperature=temperature,
                top_p=spec.top_p,
                seed=spec.seed,
            )
            for chunk in stream:
                if not started:  # the request was valid: the answer begins
                    started = True
                    job.emit("started", None)
                if job.cancelled.is_set():
                    break
                if chunk.result is not None:
                    result = chunk.result
                    break
                drafted += chunk.drafted
                accepted += chunk.accepted
                for token in chunk.tokens:
                    detok.add_token(token)
                count += len(chunk.tokens)
                released, hit = stop.feed(detok.last_segment)
                self._release(job, text, released)
                if hit:
                    break
        except ValueError as e:
            job.emit("error", APIError(400, str(e), param=param))
            return
        except MemoryError as e:
            code = (
                "context_length_exceeded"
                if "context window" in str(e)
                else "request_too_large"
            )
            job.emit("error", APIError(400, str(e), param=param, code=code))
            return
        except RuntimeError as e:
            logger.exception("generation failed")
            job.emit("error", APIError(500, str(e), type="server_error"))
            return
        finally:
            if stream is not None:
                stream.close()  # stops a generation cut short; releases the system
        if job.cancelled.is_set() and result is None and not hit:
            return
        if result is not None:
            detok.finalize()
            released, hit = stop.feed(detok.last_segment, final=True)
            self._release(job, text, released)
        self._refresh_stats()  # the adapter that drafted, the new counters
        outcome = self._outcome(
            job, "".join(text), len(prompt), count, result, hit, mode, self.stats, (drafted, accepted)
        )
        outcome.speclora["collected"] = bool(
            mode == "detailed"
            and result is not None
            and result.num_draft_tokens
            and self.system.collector.is_failure(result.acceptance_rate)
        )
        if self.listener is not None:
            assert job.started is not None
            first = None if job.first_text is None else job.first_text - job.submitted
            self.listener.generation_done(
                outcome, result, job.started - job.submitted, first
            )
        job.emit("done", outcome)

    @staticmethod
    def _release(job: Job, text: list[str], piece: str) -> None:
        if piece:
            text.append(piece)
            job.first_text = job.first_text or time.monotonic()
            job.emit("text", piece)

    @staticmethod
    def _outcome(
        job: Job,
        text: str,
        prompt_len: int,
        count: int,
        result: GenerationResult | None,
        hit: bool,
        mode: str,
        stats: dict[str, Any],
        drafts: tuple[int, int],
    ) -> Outcome:
        assert job.started is not None
        adapter = _adapter_name(stats.get("adapter_path"))
        queue_ms = (job.started - job.submitted) * 1000
        if result is None:
            # Cut at a stop string: the rounds streamed so far give the figures.
            elapsed_ms = (time.monotonic() - job.started) * 1000
            drafted, accepted = drafts
            return Outcome(
                text=text,
                finish_reason="stop",
                prompt_tokens=prompt_len,
                completion_tokens=count,
                timings={
                    "prompt_n": prompt_len,
                    "predicted_n": count,
                    "predicted_ms": elapsed_ms,
                    "draft_n": drafted,
                    "draft_n_accepted": accepted,
                },
                speclora={
                    "acceptance_rate": accepted / drafted if drafted else 0.0,
                    "adapter": adapter,
                    "mode": mode,
                    "queue_ms": queue_ms,
                },
            )
        decode_ms = result.decode_s * 1000
        prompt_ms = max(result.elapsed_s - result.decode_s, 0.0) * 1000
        n = len(result.tokens)
        return Outcome(
            text=text,
            finish_reason="stop" if hit else result.finish_reason,
            prompt_tokens=len(result.prompt_tokens),
            completion_tokens=n,
            timings={
                "prompt_n": len(result.prompt_tokens),
                "prompt_ms": prompt_ms,
                "prompt_per_second": len(result.prompt_tokens) / (prompt_ms / 1000)
                if prompt_ms > 0
                else 0.0,
                "predicted_n": n,
                "predicted_ms": decode_ms,
                "predicted_per_token_ms": decode_ms / n if n else 0.0,
                "predicted_per_second": result.tokens_per_second,
                "draft_n": result.num_draft_tokens,
                "draft_n_accepted": result.num_accepted_tokens,
            },
            speclora={
                "acceptance_rate": result.acceptance_rate,
                "mean_accepted_length": result.mean_accepted_length,
                "tokens_per_second": result.tokens_per_second,
                "adapter": adapter,
                "mode": mode,
                "queue_ms": queue_ms,
                "proposers": {
                    name: {
                        "rounds": c.rounds,
                        "drafted": c.drafted,
                        "accepted": c.accepted,
                    }
                    for name, c in result.stats.proposers.items()
                },
            },
        )


__all__ = [
    "GenerationSpec",
    "GenerationWorker",
    "Job",
    "QueueFull",
    "StopMatcher",
    "plain_chat_prompt",
]
