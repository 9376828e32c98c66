"""Soak test: many generations with periodic training and adapter swaps.

Runs ``--generations`` requests through one :class:`SpeculativeDecodingSystem`
(every ``--detailed-every``-th in detailed mode, so failures are collected),
trains whenever ``--train-every`` generations have passed and enough failures
are pending, and swaps the draft's adapter after every training round (``best``,
``latest``, none, ``final`` in turn). Every ``--window`` generations it records
the process's resident memory (``VmRSS`` from ``/proc/self/status``), MLX's
active and cache memory, and the window's tokens per second and acceptance.

After every (``--control-every``-th) fast-mode request the target decodes the
same prompt alone (mlx-lm's ``generate_step``; greedy, so the same tokens), as a
control: the machine may be shared, and a slowdown of the whole machine hits the
control as much as the system, while a slowdown of the system's own (a growing
cache, a leak) shows in the speedup of fast mode over it.

The goals: after warm-up (the first training round and the window after it),
resident memory grows by at most 10 % and the speedup does not decay (the median
of the last quarter of windows is within 10 % of the first quarter's, or above it:
training may raise acceptance and with it the speed).

Usage::

    python benchmarks/soak.py                          # the shipped zoo pair
    python benchmarks/soak.py --models DIR             # DIR/target and DIR/draft
    python benchmarks/soak.py --generations 1000 --max-tokens 16 --train-every 100

Not part of the test suite. Results go to ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)
from speclora import _blas

# isort: split
import mlx.core as mx
from mlx_lm.generate import generate_step
from speclora import SpeculativeDecodingSystem
from speclora.config import Config

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SWAPS = ("best", "latest", None, "final")  # None: unload
RSS_GROWTH_MAX = 0.10
THROUGHPUT_DECAY_MAX = 0.10


def rss_mb() -> float:
    """Resident set size of this process in MiB (``VmRSS``; Linux only)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def target_alone(
    system: SpeculativeDecodingSystem, prompt: str, tokens: int
) -> tuple[int, float]:
    """Tokens the target generates for ``prompt`` decoding alone, and the seconds."""
    assert system.fast_decoder is not None
    ids = mx.array(system.fast_decoder.encode_prompt(prompt), mx.uint32)
    start = time.perf_counter()
    count = 0
    for token, _ in generate_step(
        ids, system.fast_decoder.target_model, max_tokens=tokens
    ):
        mx.eval(token)
        count += 1
    return count, time.perf_counter() - start


def load_prompts(limit_chars: int) -> list[str]:
    """The zoo's training prompts of both domains, interleaved, each shortened."""
    from speclora.zoo import load_prompts as zoo_prompts

    prose, code = zoo_prompts("prose", "train"), zoo_prompts("code", "train")
    mixed = [p for pair in zip(prose, code) for p in pair]
    mixed += prose[len(code) :] + code[len(prose) :]
    return [p[:limit_chars] for p in mixed if p.strip()]


def build_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = Config.from_dict({}).to_dict()
    if args.models:
        models = Path(args.models).expanduser().resolve()
        config["models"].update(
            target=str(models / "target"), draft=str(models / "draft")
        )
    config["generation"].update(max_tokens=args.max_tokens, seed=args.seed)
    config["collection"].update(
        data_dir=str(work / "data"),
        acceptance_threshold=args.threshold,
        replay_buffer_max_size=100,
    )
    config["training"].update(
        checkpoint_dir=str(work / "checkpoints"),
        num_epochs=args.epochs,
        min_examples=args.min_examples,
        seed=args.seed,
    )
    config["logging"].update(level="WARNING", show_progress=False)
    return config


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(windows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Memory growth and throughput drift after warm-up."""
    after = [w for w in windows if w["generation"] >= warmup]
    if len(after) < 2:
        return {"note": "too few windows after warm-up to judge"}
    rss_start, rss_end = after[0]["rss_mb"], after[-1]["rss_mb"]
    quarter = max(1, len(after) // 4)

    def drift(key: str) -> tuple[float | None, float | None, float | None]:
        values = [w[key] for w in after]
        first = median([v for v in values[:quarter] if v is not None])
        last = median([v for v in values[-quarter:] if v is not None])
        return (
            first,
            last,
            (None if not first or last is None else (first - last) / first),
        )

    first, last, decay = drift("fast_tokens_per_s")
    first_speedup, last_speedup, speedup_decay = drift("speedup")
    growth = (rss_end - rss_start) / rss_start
    return {
        "warmup_generations": warmup,
        "rss_after_warmup_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_peak_after_warmup_mb": round(max(w["rss_mb"] for w in after), 1),
        "rss_growth_pct": round(100 * growth, 2),
        "fast_tokens_per_s_first_quarter": None if first is None else round(first, 1),
        "fast_tokens_per_s_last_quarter": None if last is None else round(last, 1),
        "throughput_decay_pct": None if decay is None else round(100 * decay, 2),
        "speedup_first_quarter": first_speedup,
        "speedup_last_quarter": last_speedup,
        "speedup_decay_pct": None
        if speedup_decay is None
        else round(100 * speedup_decay, 2),
        "rss_goal_met": growth <= RSS_GROWTH_MAX,
        "throughput_goal_met": speedup_decay is not None
        and speedup_decay <= THROUGHPUT_DECAY_MAX,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="speclora-soak-"))
    config = build_config(args, work)
    prompts = load_prompts(args.prompt_chars)
    started = time.perf_counter()
    rss_before_init = rss_mb()
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None
    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor()} x{os.cpu_count()}",
        "python": platform.python_version(),
        "mlx": metadata.version("mlx"),
        "mlx-lm": metadata.version("mlx-lm"),
        "blas": _blas.state,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "models": [config["models"]["target"], config["models"]["draft"]],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rss_before_initialize_mb": round(rss_before_init, 1),
        "rss_after_initialize_mb": round(rss_mb(), 1),
        "windows": [],
        "trainings": [],
        "swaps": 0,
    }
    window: dict[str, Any] = {
        "tokens": 0,
        "decode_s": 0.0,
        "fast_tokens": 0,
        "fast_s": 0.0,
        "rates": [],
        "control_tokens": 0,
        "control_s": 0.0,
    }
    try:
        for i in range(1, args.generations + 1):
            mode = "detailed" if i % args.detailed_every == 0 else "fast"
            prompt = prompts[i % len(prompts)]
            result = system.generate_result(prompt, mode=mode)
            window["tokens"] += len(result.tokens)
            window["decode_s"] += result.decode_s
            if mode == "fast":
                window["fast_tokens"] += len(result.tokens)
                window["fast_s"] += result.decode_s
            if result.num_draft_tokens:
                window["rates"].append(result.acceptance_rate)
            if mode == "fast" and i % args.control_every == 0:
                count, seconds = target_alone(system, prompt, args.max_tokens)
                window["control_tokens"] += count
                window["control_s"] += seconds

            if (
                i % args.train_every == 0
                and system.collector.failure_count >= args.min_examples
            ):
                t0 = time.perf_counter()
                trained = system.train()
                out["trainings"].append(
                    {
                        "generation": i,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "num_examples": trained["num_examples"],
                        "final_loss": trained["final_loss"],
                    }
                )
                swap = SWAPS[(len(out["trainings"]) - 1) % len(SWAPS)]
                if swap is None:
                    system.unload_adapter()
                else:
                    system.load_adapter(swap)
                out["swaps"] += 1

            if i % args.window == 0:
                stats = system.get_stats()
                control = (
                    window["control_tokens"] / window["control_s"]
                    if window["control_s"]
                    else 0.0
                )
                fast_rate = (
                    window["fast_tokens"] / window["fast_s"]
                    if window["fast_s"]
                    else None
                )
                out["windows"].append(
                    {
                        "generation": i,
                        "elapsed_s": round(time.perf_counter() - started, 1),
                        "rss_mb": round(rss_mb(), 1),
                        "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
                        "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1),
                        "tokens_per_s": round(window["tokens"] / window["decode_s"], 1)
                        if window["decode_s"]
                        else None,
                        "fast_tokens_per_s": None
                        if fast_rate is None
                        else round(fast_rate, 1),
                        "target_alone_tokens_per_s": round(control, 1),
                        "speedup": None
                        if fast_rate is None or not control
                        else round(fast_rate / control, 3),
                        "acceptance": round(statistics.fmean(window["rates"]), 4)
                        if window["rates"]
                        else None,
                        "failure_count": stats["failure_count"],
                        "replay_buffer_size": stats["replay_buffer_size"],
                        "adapter_loaded": stats["adapter_loaded"],
                    }
                )
                w = out["windows"][-1]
                print(
                    f"{i:6d}  {w['elapsed_s']:7.1f} s  rss {w['rss_mb']:7.1f} MiB  "
                    f"fast {w['fast_tokens_per_s']} tok/s  speedup {w['speedup']}  "
                    f"acceptance {w['acceptance']}  "
                    f"trainings {len(out['trainings'])}",
                    flush=True,
                )
                window = {
                    "tokens": 0,
                    "decode_s": 0.0,
                    "fast_tokens": 0,
                    "fast_s": 0.0,
                    "rates": [],
                    "control_tokens": 0,
                    "control_s": 0.0,
                }
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        out["generations_done"] = system.generation_count
        out["elapsed_s"] = round(time.perf_counter() - started, 1)
        out["summary"] = summarize(
            out["windows"], args.warmup or args.train_every + args.window
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        system.collector.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", help="directory holding target/ and draft/ (default: the zoo pair)"
    )
    parser.add_argument(
        "--generations", type=int, default=1000, help="requests to run (default: 1000)"
    )
    parser.add_argument(
        "--train-every",
        type=int,
        default=100,
        help="generations between trainings (default: 100)",
    )
    parser.add_argument(
        "--detailed-every",
        type=int,
        default=3,
        help="every n-th request is detailed (default: 3)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=50,
        help="generations per measurement window (default: 50)",
    )
    parser.add_argument(
        "--control-every",
        type=int,
        default=1,
        help="time the target alone after every n-th fast request (default: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="generations before the baseline (default: train-every + window)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens per request (default: 16)"
    )
    parser.add_argument(
        "--prompt-chars",
        type=int,
        default=300,
        help="prompts are cut to this length (default: 300)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="collection.acceptance_threshold (default: 0.6)",
    )
    parser.add_argument(
        "--min-examples", type=int, default=8, help="training.min_examples (default: 8)"
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="training.num_epochs (default: 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling and training seed (default: 0)"
    )
    parser.add_argument(
        "--work-dir",
        help="where the collector and checkpoints live (default: a new temp dir)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"JSON results (default: {RESULTS})"
    )
    args = parser.parse_args(argv)
    if (
        args.generations < 1
        or args.train_every < 1
        or args.window < 1
        or args.detailed_every < 1
    ):
        parser.error(
            "--generations, --train-every, --window and --detailed-every must be >= 1"
        )
    logging.basicConfig(level=logging.WARNING)
    out = run(args)
    print(json.dumps(out["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
