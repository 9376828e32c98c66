"""Load test of ``speclora serve`` on loopback: latency, throughput, errors and
acceptance over time while the server learns.

Starts ``speclora serve`` on the shipped pair (default config; data and checkpoints
in a fresh directory), warms it up, then sends ``--requests`` requests from
``--clients`` concurrent clients: code and prose prompts from the pair's training
split, alternating, every 4th one streamed (for time to first token). The server
learns as it serves (``serve.learn``: detailed decoding, background training,
promotion, hot swap). It stops by itself once every request is answered.

The same requests then go, in the same order, to a control server that does not
learn (``serve.learn: false``, fast decoding, the base draft): what the learning
server gains over it is the learning, not the prompts.

Reported: p50/p99 latency, time to first token, aggregate tokens/s, errors (must be
0 apart from deliberate 429s, of which a queue as deep as the clients makes none),
acceptance per request in order with the adapter that drafted it, and the
``/metrics`` timeline. Results: ``benchmarks/results/serve.{json,md,png}``.

Usage::

    python benchmarks/serve_load.py                    # 200 requests, 8 clients
    python benchmarks/serve_load.py --requests 50 --no-control
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from speclora.config import Config, load_config
from speclora.zoo import load_prompts

RESULTS = Path(__file__).resolve().parent / "results"
STARTUP_S = 300.0


class Server:
    """``python -m speclora serve`` on a free port."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str) -> None:
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speclora", "serve", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def drain() -> None:
            assert self.proc.stdout is not None
            with self.log.open("w") as log:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.put(line)
            lines.put("")

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + STARTUP_S
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if "listening on http://" in line:
                self.port = int(
                    line.split("listening on http://", 1)[1]
                    .split()[0]
                    .rsplit(":", 1)[1]
                )
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log.read_text()}")

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        body = conn.getresponse().read().decode()
        conn.close()
        return body

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=600)  # a training run in progress finishes first
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request; for a stream, the final chunk plus ``ttft_s``."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    out: dict[str, Any] = {"status": response.status}
    if response.status != 200 or not body.get("stream"):
        out["body"] = json.loads(response.read() or b"{}")
    else:
        final = None
        while line := response.readline():
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            if (
                "ttft_s" not in out
                and chunk["choices"]
                and chunk["choices"][0].get("text")
            ):
                out["ttft_s"] = time.perf_counter() - start
            if "timings" in chunk:
                final = chunk
        out["body"] = final or {}
    conn.close()
    out["latency_s"] = time.perf_counter() - start
    return out


def metrics_snapshot(server: Server) -> dict[str, float]:
    wanted = {
        'speclora_acceptance_rate{window="overall"}': "overall",
        'speclora_acceptance_rate{window="recent"}': "recent",
        "speclora_training_runs_total": "training_runs",
        "speclora_training_promotions_total": "promotions",
        "speclora_failures_pending": "failures_pending",
        "speclora_training_running": "training_running",
        "speclora_queue_depth": "queue_depth",
    }
    out = {}
    for line in server.get("/metrics").splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def run_load(
    server: Server, requests: list[dict[str, Any]], clients: int, max_tokens: int
) -> dict[str, Any]:
    """Send every request from ``clients`` threads; scrape /metrics meanwhile."""
    for prompt in (
        "def main():\n",
        "The module",
    ):  # warm-up, not recorded, not collected
        post(
            server.port,
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 8, "speclora": {"mode": "fast"}},
        )
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    todo = iter(enumerate(requests))
    t0 = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, req = item
            body = {
                "prompt": req["prompt"],
                "max_tokens": max_tokens,
                "stream": req["stream"],
            }
            sent = time.perf_counter() - t0
            try:
                answer = post(server.port, "/v1/completions", body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                answer = {
                    "status": None,
                    "body": {"error": str(e)},
                    "latency_s": time.perf_counter() - t0 - sent,
                }
            record = {
                "index": i,
                "domain": req["domain"],
                "stream": req["stream"],
                "sent_s": sent,
            }
            record["done_s"] = time.perf_counter() - t0
            record.update(
                status=answer["status"],
                latency_s=answer["latency_s"],
                ttft_s=answer.get("ttft_s"),
            )
            b = answer["body"]
            if answer["status"] == 200:
                timings, stats = b["timings"], b["speclora"]
                record.update(
                    tokens=b["usage"]["completion_tokens"],
                    draft_n=timings.get("draft_n", 0),
                    draft_n_accepted=timings.get("draft_n_accepted", 0),
                    adapter=stats["adapter"],
                    mean_accepted_length=stats.get("mean_accepted_length"),
                    tokens_per_s=timings.get("predicted_per_second"),
                    queue_ms=stats["queue_ms"],
                    collected=stats.get("collected"),
                )
            else:
                record["error"] = b.get("error")
            with lock:
                records.append(record)

    timeline: list[dict[str, float]] = []
    finished = threading.Event()

    def scrape() -> None:
        while not finished.wait(2.0):
            timeline.append(
                {"t_s": time.perf_counter() - t0, **metrics_snapshot(server)}
            )

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    finished.set()
    scraper.join()
    timeline.append({"t_s": wall, **metrics_snapshot(server)})
    records.sort(key=lambda r: r["done_s"])
    return {
        "wall_s": wall,
        "records": records,
        "timeline": timeline,
        "health": json.loads(server.get("/health")),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
        if ordered
        else float("nan")
    )


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    records = run["records"]
    ok = [r for r in records if r["status"] == 200]
    rejected = [r for r in records if r["status"] == 429]
    errors = [r for r in records if r["status"] not in (200, 429)]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)

    def acceptance(rs: list[dict[str, Any]]) -> float:
        drafted = sum(r["draft_n"] for r in rs)
        return (
            sum(r["draft_n_accepted"] for r in rs) / drafted
            if drafted
            else float("nan")
        )

    quarter = max(len(ok) // 4, 1)
    by_domain = {}
    for domain in ("code", "prose"):
        rs = [r for r in ok if r["domain"] == domain]
        q = max(len(rs) // 4, 1)
        by_domain[domain] = {
            "first_quarter": acceptance(rs[:q]),
            "last_quarter": acceptance(rs[-q:]),
        }
    return {
        "requests": len(records),
        "ok": len(ok),
        "rejected_429": len(rejected),
        "errors": len(errors),
        "wall_s": run["wall_s"],
        "tokens": tokens,
        "tokens_per_s": tokens / run["wall_s"],
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "queue_wait_p50_s": percentile([r["queue_ms"] / 1000 for r in ok], 50),
        "acceptance": acceptance(ok),
        "acceptance_first_quarter": acceptance(ok[:quarter]),
        "acceptance_last_quarter": acceptance(ok[-quarter:]),
        "by_domain": by_domain,
        "adapters": list(dict.fromkeys(r["adapter"] for r in ok)),
        "training": run["health"]["training"],
    }


def rolling(
    records: list[dict[str, Any]], domain: str, width: int
) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    window: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        if r["status"] != 200 or r["domain"] != domain:
            continue
        window = [*window, r][-width:]
        drafted = sum(w["draft_n"] for w in window)
        if len(window) == width and drafted:
            xs.append(i + 1)
            ys.append(sum(w["draft_n_accepted"] for w in window) / drafted)
    return xs, ys


def plot(runs: dict[str, dict[str, Any]], path: Path, width: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    styles = {"learning": "-", "control": ":"}
    colors = {"code": "tab:blue", "prose": "tab:orange"}
    for name, run in runs.items():
        records = run["records"]
        for domain in ("code", "prose"):
            xs, ys = rolling(records, domain, width)
            top.plot(
                xs, ys, styles[name], color=colors[domain], label=f"{domain}, {name}"
            )
        if name == "learning":
            previous = None
            for i, r in enumerate(records):
                if (
                    r["status"] == 200
                    and previous is not None
                    and r["adapter"] != previous
                ):
                    top.axvline(i + 1, color="grey", lw=0.8, ls="--")
                    top.annotate(
                        "new adapter",
                        (i + 1, 0.02),
                        rotation=90,
                        fontsize=7,
                        color="grey",
                    )
                previous = r.get("adapter", previous)
        bottom.plot(
            range(1, len(records) + 1),
            [r["latency_s"] for r in records],
            styles[name],
            color="black" if name == "learning" else "grey",
            lw=0.8,
            label=name,
        )
    learning = runs.get("learning")
    if learning:
        # Shade the requests answered while a training run was going on.
        done = [r["done_s"] for r in learning["records"]]
        points = learning["timeline"]
        for before, after in itertools.pairwise(points):
            if before.get("training_running") or after.get("training_running"):
                first = next(
                    (i for i, t in enumerate(done) if t >= before["t_s"]), len(done)
                )
                last = next(
                    (i for i, t in enumerate(done) if t >= after["t_s"]), len(done)
                )
                bottom.axvspan(first + 1, last + 1, color="tab:red", alpha=0.12, lw=0)
        bottom.plot(
            [], [], color="tab:red", alpha=0.3, lw=6, label="training in the background"
        )
    top.set_ylabel(f"acceptance (last {width} requests of the domain)")
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    top.set_title("speclora serve under load: acceptance while the server learns")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("requests answered")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per run (default: 200)"
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients (default: 8)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="tokens per request (default: 48)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=20,
        help="requests per rolling acceptance (default: 20)",
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control server that does not learn",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config both servers start from (default: the defaults)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"report directory (default: {RESULTS})",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.max_tokens < 1:
        parser.error("--requests, --clients and --max-tokens must be >= 1")

    code, prose = load_prompts("code", "train"), load_prompts("prose", "train")
    requests = [
        {
            "domain": d,
            "prompt": (code if d == "code" else prose)[(i // 2) % len(code)],
            "stream": i % 4 == 3,
        }
        for i, d in (
            (i, "code" if i % 2 == 0 else "prose") for i in range(args.requests)
        )
    ]
    base = load_config(args.config) if args.config else Config.from_dict({}).to_dict()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="speclora-serve-load-") as tmp:
        for name in ("learning", *(() if args.no_control else ("control",))):
            work = Path(tmp) / name
            work.mkdir()
            learn = name == "learning"
            config = json.loads(json.dumps(base))
            config["collection"]["data_dir"] = str(work / "data")
            config["training"]["checkpoint_dir"] = str(work / "checkpoints")
            config["logging"]["level"] = "WARNING"
            config["serve"].update(
                port=0, queue_size=max(16, args.clients), learn=learn
            )
            if not learn:  # the same decoding (detailed), without training
                config["generation"]["mode"] = "detailed"
                config["training"]["auto"] = False
            print(f"[{name}] starting the server", flush=True)
            server = Server(config, work, name)
            try:
                runs[name] = run_load(server, requests, args.clients, args.max_tokens)
            finally:
                server.stop()
            runs[name]["summary"] = summarize(runs[name])
            s = runs[name]["summary"]
            print(
                f"[{name}] {s['ok']}/{s['requests']} ok, {s['errors']} errors, {s['rejected_429']} x 429, "
                f"p50 {s['latency_p50_s']:.2f} s, p99 {s['latency_p99_s']:.2f} s, {s['tokens_per_s']:.1f} tok/s, "
                f"acceptance {s['acceptance_first_quarter']:.3f} -> {s['acceptance_last_quarter']:.3f}",
                flush=True,
            )

    meta = {
        "machine": f"{platform.machine()} {platform.processor()} x{os.cpu_count()}",
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        **{
            p: metadata.version(p)
            for p in ("mlx", "mlx-lm", "speclora", "starlette", "uvicorn")
        },
        "requests": args.requests,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "config": str(args.config) if args.config else None,
        "command": " ".join(
            [
                "python",
                "benchmarks/serve_load.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=1, default=str) + "\n"
    )
    plot(runs, args.out / "serve.png", args.window)
    (args.out / "serve.md").write_text(report(meta, runs, args.window))
    print(report(meta, runs, args.window))
    bad = sum(r["summary"]["errors"] for r in runs.values())
    return 1 if bad else 0


def report(meta: dict[str, Any], runs: dict[str, dict[str, Any]], width: int) -> str:
    intro = (
        f"`{meta['command']}`: {meta['requests']} completions ({meta['max_tokens']} tokens max, code and "
        f"prose prompts alternating, every 4th streamed) from {meta['clients']} concurrent clients on "
        f"loopback, shipped pair, {meta.get('config') or 'default'} config. Machine: {meta['machine']}, shared and busy "
        f"(load average {meta['load_average_after'][0]:.1f} after the run); mlx {meta['mlx']}, "
        f"mlx-lm {meta['mlx-lm']}, uvicorn {meta['uvicorn']}."
    )
    header = (
        "| server | ok | errors | 429 | p50 latency | p99 latency | p50 first token | tok/s | acceptance "
        "first quarter | last quarter | code first → last | prose first → last | training runs / promotions |"
    )
    lines = [
        intro,
        "",
        header,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    note = (
        "learning: `serve.learn` (detailed decoding, collection, background training, promotion, hot swap). "
        "control: the same detailed decoding of the same requests in the same order, without training. "
        "The two runs are sequential on a shared machine: their latencies and tokens/s also follow the "
        "machine's other load, their acceptance does not. Acceptance is accepted / drafted tokens "
        "(adaptive draft length); quarters are in order of answer."
    )
    for name, run in runs.items():
        s = run["summary"]
        t = s["training"] or {}
        code, prose = s["by_domain"]["code"], s["by_domain"]["prose"]
        lines.append(
            f"| {name} | {s['ok']} | {s['errors']} | {s['rejected_429']} | {s['latency_p50_s']:.2f} s | "
            f"{s['latency_p99_s']:.2f} s | {s['ttft_p50_s']:.2f} s | {s['tokens_per_s']:.1f} | "
            f"{s['acceptance_first_quarter']:.3f} | {s['acceptance_last_quarter']:.3f} | "
            f"{code['first_quarter']:.3f} → {code['last_quarter']:.3f} | "
            f"{prose['first_quarter']:.3f} → {prose['last_quarter']:.3f} | "
            f"{t.get('runs', 0)} / {t.get('promotions', 0)} |"
        )
    lines += ["", note]
    learning = runs.get("learning")
    if learning:
        lines += [
            "",
            f"Acceptance over time (learning server, windows of {width} requests in order of answer):",
            "",
        ]
        lines += [
            "| requests | adapter(s) | acceptance | code | prose |",
            "|---|---|---:|---:|---:|",
        ]
        ok = [r for r in learning["records"] if r["status"] == 200]
        for start in range(0, len(ok), width):
            window = ok[start : start + width]

            def acc(rs: list[dict[str, Any]]) -> str:
                drafted = sum(r["draft_n"] for r in rs)
                return (
                    f"{sum(r['draft_n_accepted'] for r in rs) / drafted:.3f}"
                    if drafted
                    else "-"
                )

            adapters = ", ".join(dict.fromkeys(r["adapter"] for r in window))
            lines.append(
                f"| {start + 1}-{start + len(window)} | {adapters} | {acc(window)} | "
                f"{acc([r for r in window if r['domain'] == 'code'])} | "
                f"{acc([r for r in window if r['domain'] == 'prose'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
