"""``speclora serve``: real server processes on 127.0.0.1, spoken to with the official
``openai`` client and with raw HTTP.

Greedy answers are checked token for token (through their text and counts) against
mlx-lm's ``generate_step`` on the target alone, on the shipped pair, whose text is
real. The queue, disconnects and the shared store run on tiny in-code pairs.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import openai
import pytest
from helpers import TinyModelDirs, make_tiny_llama, save_model_dir, tiny_system_config
from mlx_lm.generate import generate_step
from prometheus_client.parser import text_string_to_metric_families
from speclora.checkpoint import ACTIVE_ALIAS
from speclora.data_collector import DataCollector, pair_fingerprint
from speclora.models import ModelManager
from speclora.serving.worker import StopMatcher
from speclora.zoo import load_prompts

KEY = "test-key"
STARTUP_S = 180.0
"""Generous: two busy cores load MLX, transformers and the models."""
MAX_TOKENS = 24


# ------------------------------------------------------------------ server processes


class Server:
    """``python -m speclora serve`` on a free port, its output drained to a log."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, name: str, *args: str
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "speclora",
                "serve",
                "--config",
                str(path),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                raise AssertionError(
                    f"{name} did not start in {STARTUP_S} s:\n{self.log.read_text()}"
                ) from None
            if "listening on http://" in line:
                self.port = int(
                    line.split("listening on http://", 1)[1]
                    .split()[0]
                    .rsplit(":", 1)[1]
                )
                break
            if self.proc.poll() is not None and self._lines.empty():
                raise AssertionError(
                    f"{name} exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)
        self._lines.put("")

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120
        )

    def health(self) -> dict[str, Any]:
        status, _, body = request(self.port, "GET", "/health")
        assert status == 200, body
        return body

    def metrics(self) -> dict[str, float]:
        """Every sample, keyed ``name{label="value",...}`` (labels sorted)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One raw HTTP request; the JSON body decoded when there is one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = raw
    return response.status, {k.lower(): v for k, v in response.getheaders()}, decoded


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------- the shipped pair, one server


@pytest.fixture(scope="module")
def zoo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve_zoo")
    config = {
        # A fixed draft length: an answer's draft statistics do not depend on the
        # requests before it.
        "generation": {
            "max_tokens": MAX_TOKENS,
            "adaptive_draft": False,
            "num_draft_tokens": 3,
        },
        "collection": {"data_dir": str(root / "data"), "acceptance_threshold": 1.0},
        "training": {"checkpoint_dir": str(root / "checkpoints")},
        "logging": {"level": "WARNING"},
        # Fast by default: a request asks for detailed recording.
        "serve": {"learn": False, "api_key": KEY, "model_name": "speclora-zoo"},
    }
    server = Server(config, root, "zoo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference() -> Any:
    """The target alone, greedy, with mlx-lm's ``generate_step``."""
    manager = ModelManager({})
    target, _ = manager.load_models()
    tokenizer = manager.tokenizer
    eos = set(tokenizer.eos_token_ids)

    class Reference:
        def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
            return list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            )

        def text_ids(self, prompt: str) -> list[int]:
            return list(tokenizer.encode(prompt))

        def greedy(
            self, prompt_ids: list[int], n: int = MAX_TOKENS
        ) -> tuple[str, int, str]:
            """(text, tokens generated, finish reason)."""
            out = []
            for token, _ in generate_step(
                mx.array(prompt_ids, mx.uint32), target, max_tokens=n
            ):
                if int(token) in eos:
                    return tokenizer.decode(out), len(out), "stop"
                out.append(int(token))
            return tokenizer.decode(out), len(out), "length"

    return Reference()


PROMPTS = [*load_prompts("prose", "eval")[:2], *load_prompts("code", "eval")[:2]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_answers_are_the_targets_greedy_answers(
    zoo_server: Server, reference: Any, prompt: str
) -> None:
    messages = [{"role": "user", "content": prompt}]
    expected, n, finish = reference.greedy(reference.chat_ids(messages))
    reply = zoo_server.client().chat.completions.create(
        model="speclora-zoo", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.object == "chat.completion" and reply.model == "speclora-zoo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == finish
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(reference.chat_ids(messages)),
        n,
    )
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + n
    extra = reply.model_extra or {}
    timings, stats = extra["timings"], extra["speclora"]
    assert (
        timings["predicted_n"] == n and timings["prompt_n"] == reply.usage.prompt_tokens
    )
    assert (
        0 <= timings["draft_n_accepted"] <= timings["draft_n"]
        and timings["draft_n"] > 0
    )
    assert stats["acceptance_rate"] == pytest.approx(
        timings["draft_n_accepted"] / timings["draft_n"]
    )
    assert (
        stats["adapter"] == "base"
        and stats["mode"] == "fast"
        and stats["collected"] is False
    )
    assert stats["tokens_per_second"] > 0


@pytest.mark.parametrize("prompt", PROMPTS[1:3])
def test_completions_continue_the_raw_text(
    zoo_server: Server, reference: Any, prompt: str
) -> None:
    expected, n, finish = reference.greedy(reference.text_ids(prompt))
    reply = zoo_server.client().completions.create(
        model="x", prompt=prompt, max_tokens=MAX_TOKENS
    )
    assert reply.object == "text_completion"
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, finish)
    assert reply.usage is not None and reply.usage.completion_tokens == n
    # Token ids are a prompt too, used as they are.
    by_ids = zoo_server.client().completions.create(
        model="x", prompt=reference.text_ids(prompt), max_tokens=MAX_TOKENS
    )
    assert by_ids.choices[0].text == expected


def test_streamed_chat_is_the_same_answer_in_pieces(
    zoo_server: Server, reference: Any
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PROMPTS[2]},
    ]
    expected, n, finish = reference.greedy(reference.chat_ids(messages))
    chunks = list(
        zoo_server.client().chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece"
    assert "".join(pieces) == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == finish
    assert (finals[0].model_extra or {})["timings"]["predicted_n"] == n
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == n


def test_streamed_completion_ends_with_done(zoo_server: Server, reference: Any) -> None:
    prompt = PROMPTS[0]
    expected, _, _ = reference.greedy(reference.text_ids(prompt))
    conn = http.client.HTTPConnection("127.0.0.1", zoo_server.port, timeout=120)
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    conn.request(
        "POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"}
    )
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith(
        "text/event-stream"
    )
    events = [e for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["timings"]["draft_n"] >= chunks[-1]["timings"]["draft_n_accepted"]


def test_stop_strings_cut_the_answer_streamed_or_not(
    zoo_server: Server, reference: Any
) -> None:
    prompt = PROMPTS[3]
    full, _, _ = reference.greedy(reference.text_ids(prompt))
    stop = full[6:9]  # a piece from the middle: it may span tokens
    expected = full[: full.find(stop)]
    client = zoo_server.client()
    reply = client.completions.create(
        model="m", prompt=prompt, max_tokens=MAX_TOKENS, stop=[stop, "\x00never"]
    )
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    # The rounds decoded before the cut still report their drafts.
    timings = (reply.model_extra or {})["timings"]
    assert timings["draft_n"] > 0 and 0 <= timings["draft_n_accepted"] <= timings["draft_n"]
    streamed = list(
        client.completions.create(
            model="m", prompt=prompt, max_tokens=MAX_TOKENS, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(zoo_server: Server) -> None:
    client = zoo_server.client()

    def sample(seed: int) -> str:
        reply = client.completions.create(
            model="m",
            prompt=PROMPTS[0],
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10)), "the seed changes nothing"


def test_detailed_recording_on_request(zoo_server: Server) -> None:
    client = zoo_server.client()
    before = zoo_server.health()["failures_pending"]
    reply = client.completions.create(
        model="m",
        prompt=PROMPTS[2],
        max_tokens=MAX_TOKENS,
        extra_body={"speclora": {"mode": "detailed"}},
    )
    stats = (reply.model_extra or {})["speclora"]
    assert stats["mode"] == "detailed"
    # The threshold is 1.0: kept whenever a draft token was rejected.
    rejected = (
        reply.model_extra["timings"]["draft_n_accepted"]
        < reply.model_extra["timings"]["draft_n"]
    )
    assert stats["collected"] is rejected is True
    assert zoo_server.health()["failures_pending"] == before + 1
    client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=MAX_TOKENS)
    assert zoo_server.health()["failures_pending"] == before + 1


def test_models_health_and_metrics(zoo_server: Server) -> None:
    models = zoo_server.client().models.list()
    assert [m.id for m in models.data] == ["speclora-zoo"]
    health = zoo_server.health()
    assert (
        health["status"] == "ok"
        and health["model"] == "speclora-zoo"
        and health["queue_depth"] == 0
    )
    before = zoo_server.metrics()
    reply = zoo_server.client().completions.create(
        model="m", prompt=PROMPTS[1], max_tokens=MAX_TOKENS
    )
    after = zoo_server.metrics()
    timings = (reply.model_extra or {})["timings"]

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert reply.usage is not None
    assert delta("speclora_completion_tokens_total") == reply.usage.completion_tokens
    assert delta("speclora_prompt_tokens_total") == reply.usage.prompt_tokens
    assert delta('speclora_draft_tokens_total{adapter="base"}') == timings["draft_n"]
    assert (
        delta('speclora_draft_tokens_accepted_total{adapter="base"}')
        == timings["draft_n_accepted"]
    )
    assert delta('speclora_requests_total{route="/v1/completions",status="200"}') == 1
    assert (
        delta('speclora_request_duration_seconds_count{route="/v1/completions"}') == 1
    )
    assert delta("speclora_generations_total") == 1
    proposers = (reply.model_extra or {})["speclora"]["proposers"]
    assert sum(c["drafted"] for c in proposers.values()) == timings["draft_n"]
    assert sum(c["accepted"] for c in proposers.values()) == timings["draft_n_accepted"]
    for name, counts in proposers.items():
        assert (
            delta(f'speclora_proposer_tokens_total{{proposer="{name}"}}')
            == counts["drafted"]
        )
        assert (
            delta(f'speclora_proposer_tokens_accepted_total{{proposer="{name}"}}')
            == counts["accepted"]
        )
        assert (
            delta(f'speclora_proposer_rounds_total{{proposer="{name}"}}')
            == counts["rounds"]
        )
    assert delta('speclora_draft_position_drafted_total{position="0"}') >= 1
    assert 0 < after['speclora_acceptance_rate{window="overall"}'] < 1
    assert after['speclora_adapter_info{active="none",serving="base"}'] == 1
    for name in (
        "speclora_queue_depth",
        "speclora_training_runs_total",
        "speclora_failures_pending",
    ):
        assert name in after


def test_api_key_is_required_on_v1_routes(zoo_server: Server) -> None:
    for key in (None, "wrong"):
        with pytest.raises(openai.AuthenticationError) as e:
            zoo_server.client(key).models.list()
        assert e.value.status_code == 401
    status, headers, body = request(
        zoo_server.port, "POST", "/v1/completions", {"prompt": "x"}, key=None
    )
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert headers["www-authenticate"] == "Bearer"
    assert request(zoo_server.port, "GET", "/health", key=None)[0] == 200


LONG = "word " * 3000  # beyond the shipped target's 256-token window
BAD_BODIES = [
    (b'{"prompt": "x", ', None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"prompt": "x", "temperature": NaN}', None, "NaN"),
    (b"\xff\xfe", None, "UTF-8"),
    (b'{"prompt": "\\ud800"}', "prompt", "cannot be tokenized"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 10**12}, "max_tokens", "less than or equal"),
    ({"prompt": "x", "max_tokens": 100000}, "prompt", "context window"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature", "number"),
    ({"prompt": "x", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "n": 2}, "n", "less than or equal to 1"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "only 0"),
    ({"prompt": "x", "best_of": 2}, "best_of", "unknown field"),
    (
        {"prompt": "x", "speclora": {"mode": "slow"}},
        "speclora.mode",
        "'fast' or 'detailed'",
    ),
    ({"prompt": ""}, "prompt", "empty"),
    (
        {"prompt": [1, "a"]},
        "prompt",
        "a non-empty string or a non-empty list of token ids",
    ),
    ({"prompt": [10**9]}, "prompt", "token ids must be integers in"),
    ({"prompt": LONG}, "prompt", "context window"),
    ({"max_tokens": 4}, "prompt", "missing field"),
]


@pytest.mark.parametrize(
    "body, param, words", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))]
)
def test_bad_completion_requests_are_400_naming_the_problem(
    zoo_server: Server, body: Any, param: Any, words: str
) -> None:
    status, _, answer = request(zoo_server.port, "POST", "/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    assert error["param"] == param


BAD_CHATS = [
    ({"messages": []}, "messages", "at least 1"),
    (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
        "'system'",
    ),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    (
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "a string or a list of text parts",
    ),
    (
        {"messages": [{"role": "user", "content": "hi", "x": 1}]},
        "messages[0].x",
        "unknown field",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}
            ]
        },
        None,
        "messages[0].content",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        "logprobs",
        "log-probabilities",
    ),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "max_completion_tokens": 5,
        },
        "max_completion_tokens",
        "disagree",
    ),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages", "context window"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", "cannot"),
]


@pytest.mark.parametrize(
    "body, param, words", BAD_CHATS, ids=[str(i) for i in range(len(BAD_CHATS))]
)
def test_bad_chat_requests_are_400_naming_the_problem(
    zoo_server: Server, body: Any, param: Any, words: str
) -> None:
    status, _, answer = request(zoo_server.port, "POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert words in answer["error"]["message"], answer
    if param is not None:
        assert answer["error"]["param"] == param


def test_errors_through_the_openai_client_and_odd_requests(zoo_server: Server) -> None:
    client = zoo_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=-5)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": LONG}], stream=True
        )
    assert "context window" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")
    status, _, answer = request(zoo_server.port, "GET", "/v1/completions")
    assert status == 405 and answer["error"]["message"].startswith(
        "GET /v1/completions"
    )
    huge = b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'
    status, _, answer = request(zoo_server.port, "POST", "/v1/completions", huge)
    assert status == 413 and "limit" in answer["error"]["message"]
    # After all that, the server still answers.
    assert (
        client.completions.create(model="m", prompt="x", max_tokens=2).usage is not None
    )


# ------------------------------------------------ queue, 429 and disconnects (tiny pair)


def long_window_pair(root: Path) -> TinyModelDirs:
    """The tiny pair with a context window long enough for minutes of generation."""
    dirs = []
    for name, (width, layers, seed) in {
        "target": (64, 2, 1),
        "draft": (32, 1, 2),
    }.items():
        model = make_tiny_llama(width, layers, seed=seed)
        model.args.max_position_embeddings = 1 << 17
        dirs.append(save_model_dir(model, root / name))
    return TinyModelDirs(target=dirs[0], draft=dirs[1])


def open_stream(
    port: int, body: dict[str, Any]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(
        "POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"}
    )
    return conn, conn.getresponse()


def send_only(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a request and read nothing (the caller closes the socket to leave)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_queue_bound_429_and_disconnects_free_everything(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    pair = long_window_pair(tmp_path / "models")
    config = tiny_system_config(pair, tmp_path)
    config["logging"] = {"level": "WARNING", "show_progress": False}
    server = Server(config, tmp_path, "queue", "--queue-size", "1", "--api-key", KEY)
    try:
        endless = {"prompt": "Hello", "max_tokens": 100_000, "stream": True}
        conn, running = open_stream(server.port, endless)
        assert running.status == 200  # the answer has begun
        assert server.health()["generating"]
        waiting = send_only(server.port, {"prompt": "Hi", "max_tokens": 4})
        wait_for("a waiting request", lambda: server.health()["queue_depth"] == 1)
        # The queue holds one: the next request is refused, with a hint when to retry.
        status, headers, answer = request(
            server.port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}
        )
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert answer["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model="m", prompt="x", max_tokens=2)
        # A waiting client that leaves gives its place back at once.
        waiting.close()
        wait_for("the place back", lambda: server.health()["queue_depth"] == 0)
        assert server.health()["generating"]
        answers: list[Any] = []
        after = threading.Thread(
            target=lambda: answers.append(
                request(
                    server.port,
                    "POST",
                    "/v1/completions",
                    {"prompt": "Hi", "max_tokens": 4},
                )
            )
        )
        after.start()
        wait_for(
            "the next request to wait", lambda: server.health()["queue_depth"] == 1
        )
        # The streaming client leaves mid-stream: its generation stops, the next one runs.
        conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        conn.close()
        after.join(timeout=120)
        assert answers and answers[0][0] == 200, answers
        assert answers[0][2]["usage"]["completion_tokens"] == 4
        health = wait_for(
            "an idle server",
            lambda: (h := server.health()) and not h["generating"] and h,
        )
        assert health["queue_depth"] == 0
        assert (
            health["generations"] == 1
        )  # only the short one: the endless one was stopped
        metrics = server.metrics()
        assert metrics["speclora_client_disconnects_total"] == 2
        assert (
            metrics['speclora_requests_total{route="/v1/completions",status="429"}']
            == 2
        )
        # Nothing is held: a full stream runs to its end.
        chunks = list(
            server.client().completions.create(
                model="m", prompt="Hello", max_tokens=5, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        server.stop()
    # A clean shutdown on SIGTERM (which uvicorn raises again once it has shut down).
    assert "speclora serve: stopped" in server.log.read_text()
    assert server.proc.returncode in (0, -signal.SIGTERM)


# -------------------------------------------- two servers, one store (tiny pair, learning)


def test_two_servers_share_the_store_and_the_promoted_adapter(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    # Every detailed generation is a failure (threshold 1.0); nothing is held out, so
    # a trained adapter is promoted; two failures start a run.
    config = tiny_system_config(
        tiny_model_dir, tmp_path, min_examples=2, learning_rate=1e-2
    )
    config["logging"] = {"level": "WARNING", "show_progress": False}
    config["collection"]["replay_buffer_max_size"] = 1000
    a, b = Server(config, tmp_path, "a"), None
    try:
        b = Server(config, tmp_path, "b")
        one = b.client(None).completions.create(model="m", prompt="Hello", max_tokens=8)
        assert (one.model_extra or {})["speclora"]["collected"] and one.model_extra[
            "speclora"
        ]["adapter"] == "base"
        wait_for("b's record", lambda: a.health()["failures_pending"] == 1)
        two = a.client(None).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=8
        )
        assert (two.model_extra or {})["speclora"]["collected"]
        # The second failure in the store starts a run in a, which trains on both.
        trained = wait_for(
            "a's training run",
            lambda: (t := a.health()["training"])["runs"] and t,
            timeout=300,
        )
        assert trained["last_error"] is None and trained["promotions"] == 1, trained
        assert trained["last"]["failures_consumed"] == 2
        active = Path(
            os.path.realpath(Path(config["training"]["checkpoint_dir"]) / ACTIVE_ALIAS)
        )
        # b drafts with a's adapter from its next request on.
        three = b.client(None).completions.create(
            model="m",
            prompt="Hello",
            max_tokens=8,
            extra_body={"speclora": {"mode": "fast"}},
        )
        assert (three.model_extra or {})["speclora"]["adapter"] == active.name
        assert b.health()["adapter"] == str(active)
        assert (
            b.metrics()[
                f'speclora_adapter_info{{active="{active.name}",serving="{active.name}"}}'
            ]
            == 1
        )
    finally:
        a.stop()
        if b is not None:
            b.stop()
    # Both servers' records are in the store: trained on, so in the replay buffer.
    manager = ModelManager(config)
    manager.load_models()
    store = DataCollector(
        config["collection"]["data_dir"],
        1000,
        1.0,
        pair=pair_fingerprint(manager.tokenizer.get_vocab()),
    )
    assert (store.failure_count, store.replay_buffer_size) == (0, 2)


# ------------------------------------------------------------------- in-process pieces


@pytest.mark.parametrize(
    "pieces, stops, released, hit",
    [
        (["Hel", "lo wor", "ld"], ["lo w"], "Hel", True),  # spans pieces
        (["abc", "def"], ["xyz"], "abcdef", False),
        (["ab", "c!", "d"], ["c!d", "!"], "abc", True),  # the earliest stop wins
        (["a\n", "\nb"], ["\n\n"], "a", True),
        (["ab"], [], "ab", False),
    ],
)
def test_stop_matcher_never_releases_a_stop_string(
    pieces: list[str], stops: list[str], released: str, hit: bool
) -> None:
    matcher = StopMatcher(stops)
    out, was_hit = [], False
    for i, piece in enumerate(pieces):
        text, was_hit = matcher.feed(piece, final=i == len(pieces) - 1)
        out.append(text)
        # Nothing released so far can be the start of a stop string still to come.
        assert not any(s in "".join(out) for s in stops)
        if was_hit:
            break
    assert ("".join(out), was_hit) == (released, hit)


def test_an_internal_failure_is_500_and_the_server_goes_on(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    """In process, to break one generation on purpose."""
    import uvicorn
    from speclora.main import SpeculativeDecodingSystem
    from speclora.server import ServerApp
    from speclora.serving.metrics import ServerMetrics
    from speclora.serving.worker import GenerationWorker

    config = tiny_system_config(tiny_model_dir, tmp_path)

    def make() -> SpeculativeDecodingSystem:
        system = SpeculativeDecodingSystem(config)
        system.initialize()
        return system

    worker = GenerationWorker(make, queue_size=2, default_mode="fast")
    metrics = ServerMetrics(
        lambda: worker.stats, lambda: (worker.queue_depth, worker.busy)
    )
    worker.listener = metrics
    worker.start(timeout=STARTUP_S)
    app = ServerApp(worker, metrics, model="tiny", api_key=None)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    port = sock.getsockname()[1]
    try:
        wait_for("uvicorn", lambda: server.started)
        decoder = worker.system.decoder
        real = decoder.stream

        def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
            raise RuntimeError("the accelerator fell over")
            yield  # a generator, like the real one

        decoder.stream = broken
        for stream in (False, True):
            status, _, answer = request(
                port,
                "POST",
                "/v1/completions",
                {"prompt": "Hi", "stream": stream},
                key=None,
            )
            assert status == 500, answer
            assert (
                answer["error"]["type"] == "server_error"
                and "fell over" in answer["error"]["message"]
            )
        decoder.stream = real
        status, _, answer = request(
            port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key=None
        )
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        worker.stop(timeout=60)
