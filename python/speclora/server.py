"""``speclora serve``: an OpenAI-compatible HTTP server whose draft learns while it serves.

Routes: ``GET /v1/models``, ``POST /v1/completions`` (raw text or token ids, no
chat template), ``POST /v1/chat/completions`` (messages through the tokenizer's
chat template), each streaming as server-sent events with ``"stream": true``;
``GET /health`` and ``GET /metrics`` (Prometheus). Responses carry OpenAI's
``usage`` plus llama.cpp's ``timings`` (``draft_n``, ``draft_n_accepted`` ...)
and a ``speclora`` object (acceptance rate, mean accepted length, tokens/s, the
adapter that drafted, whether the request was kept for training).

One generation runs at a time (:class:`~speclora.serving.worker.GenerationWorker`);
up to ``serve.queue_size`` requests wait, more get 429 with ``Retry-After``. With
``serve.learn`` (the default) requests are decoded in detailed mode, low-acceptance
ones are stored, and training runs in a child process whenever
``training.min_examples`` failures wait; a promoted adapter drafts from the next
request on, in this process and in every other one on the same ``checkpoint_dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from speclora.config import Config, ServeConfig
from speclora.serving.metrics import CONTENT_TYPE, ServerMetrics
from speclora.serving.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Outcome,
    chunk_body,
    completion_body,
    new_id,
    parse_body,
    sse,
)
from speclora.serving.worker import GenerationSpec, GenerationWorker, Job, QueueFull

logger = logging.getLogger("speclora.server")

ROUTES = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/health",
    "/metrics",
)


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(_finite(body), status_code=status, headers=headers)


def model_id(config: Config) -> str:
    """The id the server answers to: ``serve.model_name``, else the target's name."""
    if config.serve.model_name:
        return config.serve.model_name
    target = config.models.target
    return (
        target if target.startswith("zoo:") else target.rstrip("/").rsplit("/", 1)[-1]
    )


class _ClientWatch:
    """Waits for a job's next event unless the client disconnects first."""

    def __init__(self, receive: Receive) -> None:
        self._gone = asyncio.ensure_future(self._wait(receive))

    @staticmethod
    async def _wait(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def next(self, job: Job) -> tuple[str, Any] | None:
        """The next event, or ``None`` when the client left."""
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait(
            {get, self._gone}, return_when=asyncio.FIRST_COMPLETED
        )
        if get in done:
            return get.result()
        get.cancel()
        return None

    def close(self) -> None:
        self._gone.cancel()


class _JobStream(StreamingResponse):
    """Server-sent events of one job; however the response ends, the job ends with it."""

    def __init__(self, events: AsyncIterator[bytes], job: Job, app: ServerApp) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
        self._job, self._app = job, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._job.delivered:
                self._app.client_left(self._job)


class ServerApp:
    """The ASGI application around one :class:`GenerationWorker`.

    Args:
        worker (GenerationWorker): Runs the generations (started by the caller).
        metrics (ServerMetrics): Where requests are counted.
        model (str): The model id of ``/v1/models`` and responses.
        api_key (str, optional): Required as ``Authorization: Bearer`` on ``/v1`` routes.
    """

    def __init__(
        self,
        worker: GenerationWorker,
        metrics: ServerMetrics,
        *,
        model: str,
        api_key: str | None,
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self.model = model
        self.api_key = api_key
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            exception_handlers={
                APIError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._internal,
            },
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path.startswith("/v1") and not self._authorized(scope):
                error = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await self._api_error(Request(scope), error)(scope, receive, observe)
                return
            await self.app(scope, receive, observe)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.api_key.encode())

    # -- errors ----------------------------------------------------------------------

    @staticmethod
    def _api_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, APIError)
        return _json(e.body(), e.status, e.headers)

    @staticmethod
    def _http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _json(
            APIError(e.status_code, message, type=kind).body(), e.status_code, e.headers
        )

    @staticmethod
    def _internal(request: Request, e: Exception) -> Response:
        logger.error("internal error on %s", request.url.path, exc_info=e)
        return _json(
            APIError(500, f"internal error: {e}", type="server_error").body(), 500
        )

    # -- routes ----------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        entry = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "speclora",
        }
        return _json({"object": "list", "data": [entry]})

    async def health(self, request: Request) -> Response:
        stats = self.worker.stats
        tracker = stats.get("tracker", {})
        return _json(
            {
                "status": "ok",
                "model": self.model,
                "generating": self.worker.busy,
                "queue_depth": self.worker.queue_depth,
                "queue_size": self.worker.queue_size,
                "mode": self.worker.default_mode,
                "generations": stats.get("generation_count", 0),
                "adapter": stats.get("adapter_path"),
                "active_adapter": stats.get("active_adapter"),
                "acceptance": {
                    "overall": tracker.get("overall_average"),
                    "recent": tracker.get("recent_average"),
                },
                "failures_pending": stats.get("failure_count"),
                "replay_buffer_size": stats.get("replay_buffer_size"),
                "training": stats.get("training"),
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        body = parse_body(await self._body(request), CompletionRequest)
        spec = GenerationSpec(kind="text", prompt=body.prompt, **body.options())
        return await self._generate(request, body, spec)

    async def chat_completions(self, request: Request) -> Response:
        body = parse_body(await self._body(request), ChatCompletionRequest)
        spec = GenerationSpec(kind="chat", messages=body.messages, **body.options())
        return await self._generate(request, body, spec)

    # -- generation --------------------------------------------------------------------

    @staticmethod
    async def _body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > MAX_BODY_BYTES
        ):
            raise APIError(
                413,
                f"the request body ({declared} bytes) is over the limit of {MAX_BODY_BYTES} bytes",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(
                    413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def client_left(self, job: Job) -> None:
        """The client disconnected before its answer ended: stop or drop its job."""
        self.metrics.disconnects.inc()
        self.worker.cancel(job)

    async def _generate(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        spec: GenerationSpec,
    ) -> Response:
        chat = spec.kind == "chat"
        job = Job(spec, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy: {self.worker.queue_size} requests are already waiting; "
                f"retry in {e.retry_after} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        watch = _ClientWatch(request.receive)
        streaming = False
        try:
            event = await watch.next(job)
            if event is not None and event[0] == "error":
                job.delivered = True
                raise event[1]
            if event is not None and body.stream:
                streaming = True
                rid = new_id(spec.kind)
                return _JobStream(
                    self._events(job, event, rid, chat, body.include_usage()), job, self
                )
            while event is not None and event[0] in ("started", "text"):
                event = await watch.next(job)
            if event is None:
                return Response(status_code=499)  # nobody reads it
            job.delivered = True
            if event[0] == "error":
                raise event[1]
            outcome: Outcome = event[1]
            return _json(
                completion_body(new_id(spec.kind), self.model, outcome, chat=chat)
            )
        finally:
            watch.close()
            if not streaming and not job.delivered:
                self.client_left(job)

    async def _events(
        self,
        job: Job,
        event: tuple[str, Any],
        rid: str,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        if chat:
            yield sse(chunk_body(rid, self.model, chat=True, text="", role=True))
        while True:
            kind, payload = event
            if kind == "started":
                pass
            elif kind == "text":
                yield sse(chunk_body(rid, self.model, chat=chat, text=payload))
            elif kind == "done":
                job.delivered = True
                outcome: Outcome = payload
                yield sse(
                    _finite(chunk_body(rid, self.model, chat=chat, outcome=outcome))
                )
                if include_usage:
                    yield sse(
                        chunk_body(rid, self.model, chat=chat, usage_only=outcome)
                    )
                yield sse("[DONE]")
                return
            else:  # an error after the response started: reported in the stream
                job.delivered = True
                yield sse(payload.body())
                yield sse("[DONE]")
                return
            event = await job.events.get()


def _listening_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(128)
    return sock


def serve(
    config: Mapping[str, Any],
    *,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    queue_size: int | None = None,
) -> None:
    """Load the model pair and serve it until interrupted (Ctrl-C or SIGTERM).

    Args:
        config (Mapping): The parsed config (``serve`` section included).
        host (str, optional): Overrides ``serve.host``.
        port (int, optional): Overrides ``serve.port`` (0: any free port).
        api_key (str, optional): Overrides ``serve.api_key``.
        queue_size (int, optional): Overrides ``serve.queue_size``.

    Prints ``listening on http://HOST:PORT`` (the actual port) once requests are served.

    Raises:
        ValueError: a bad config value or override.
        OSError: the address cannot be bound.
        RuntimeError: the models cannot be loaded.
    """
    import uvicorn

    from speclora.main import SpeculativeDecodingSystem

    cfg = Config.from_dict(config)
    overrides = {
        "host": host,
        "port": port,
        "api_key": api_key,
        "queue_size": queue_size,
    }
    cfg.serve = ServeConfig.from_dict(
        {**cfg.serve.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    )
    options = cfg.serve
    system_config = cfg.to_dict()
    if options.learn:
        system_config["training"]["auto"] = True
    system_config["logging"]["show_progress"] = (
        False  # no progress bars in a server's log
    )

    def make_system() -> SpeculativeDecodingSystem:
        system = SpeculativeDecodingSystem(system_config)
        system.initialize()
        return system

    worker = GenerationWorker(
        make_system,
        queue_size=options.queue_size,
        default_mode="detailed" if options.learn else cfg.generation.mode,
    )
    metrics = ServerMetrics(
        lambda: worker.stats, lambda: (worker.queue_depth, worker.busy)
    )
    worker.listener = metrics
    app = ServerApp(worker, metrics, model=model_id(cfg), api_key=options.api_key)

    sock = _listening_socket(options.host, options.port)
    try:
        worker.start()

        @contextlib.asynccontextmanager
        async def lifespan(_: Any) -> AsyncIterator[None]:
            bound = sock.getsockname()
            where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            print(
                f"speclora serve: listening on http://{where}:{bound[1]} (model {app.model})",
                flush=True,
            )
            yield
            worker.stop(timeout=30)
            print("speclora serve: stopped", flush=True)

        app.app.router.lifespan_context = lifespan
        level = cfg.logging.level.lower()
        server = uvicorn.Server(
            uvicorn.Config(
                app, log_level=level, timeout_graceful_shutdown=5, lifespan="on"
            )
        )
        server.run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["ServerApp", "model_id", "serve"]
