"""Which training defaults make one train() on the shipped pair pay off?

The situation the defaults are chosen for: a user on the shipped config runs
detailed generations of code prompts (the draft's weak domain) until about 30 of
them were collected as failures, then calls ``train()`` once. For every setting
in the sweep this script starts from the same collected failures and the base
draft, trains once, and measures acceptance (T=0, K=3, the actual decoder) on
unseen code and prose prompts, and the training time.

Run: ``.venv/bin/python benchmarks/learning_sweep.py [--failures 30] [--eval 24]``
Writes ``benchmarks/results/learning_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
from speclora.config import Config
from speclora.demo import MEASURE_K, _acceptance
from speclora.main import SpeculativeDecodingSystem
from speclora.speculative import SpeculativeDecoder
from speclora.zoo import load_prompts

RESULTS = Path(__file__).parent / "results"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (name, training overrides); the first is the default before this sweep.
SWEEP: list[tuple[str, dict[str, Any]]] = [
    ("old default: r8 qv lr1e-4 3ep", {}),
    ("r8 qv lr1e-3 3ep", {"learning_rate": 1e-3}),
    ("r8 all lr1e-3 3ep", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR}),
    ("r16 all lr1e-3 3ep", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32}),
    ("r16 all lr2e-3 3ep", {"learning_rate": 2e-3, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32}),
    ("r16 all lr1e-3 5ep", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32, "num_epochs": 5}),
    ("r16 all lr1e-3 5ep bs2", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32, "num_epochs": 5, "batch_size": 2}),
    ("r32 all lr1e-3 5ep", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR, "rank": 32, "alpha": 64, "num_epochs": 5}),
    ("r16 all lr1e-3 3ep bs2", {"learning_rate": 1e-3, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32, "batch_size": 2}),
    ("r16 all lr5e-4 5ep bs2", {"learning_rate": 5e-4, "target_modules": ALL_LINEAR, "rank": 16, "alpha": 32, "num_epochs": 5, "batch_size": 2}),
]


def base_config(workdir: Path) -> dict[str, Any]:
    cfg = Config.from_dict({}).to_dict()  # the shipped defaults
    cfg["collection"]["data_dir"] = str(workdir / "failures")
    cfg["training"]["checkpoint_dir"] = str(workdir / "checkpoints")
    cfg["models"]["draft_adapter"] = None
    cfg["logging"]["show_progress"] = False
    return cfg


def collect(workdir: Path, failures: int, max_tokens: int) -> int:
    """Detailed generations of training code prompts until ``failures`` were collected."""
    system = SpeculativeDecodingSystem(base_config(workdir))
    system.initialize()
    prompts = iter(load_prompts("code", "train"))
    generations = 0
    while system.get_stats()["failure_count"] < failures:
        system.generate(next(prompts), mode="detailed", max_tokens=max_tokens, temperature=0.0)
        generations += 1
    return generations


def measure(system: SpeculativeDecodingSystem, code: list[str], prose: list[str], max_tokens: int) -> dict[str, float]:
    fast = system.fast_decoder
    assert fast is not None
    decoder = SpeculativeDecoder(
        fast.target_model, fast.draft_model, fast.tokenizer, MEASURE_K, 0.0, use_chat_template=fast.use_chat_template
    )
    return {
        "acceptance_code": _acceptance(decoder, [fast.encode_prompt(p) for p in code], max_tokens),
        "acceptance_prose": _acceptance(decoder, [fast.encode_prompt(p) for p in prose], max_tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=int, default=30)
    parser.add_argument("--eval", type=int, default=24, help="unseen prompts per domain")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--only", nargs="*", help="names of sweep entries to run")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="speclora-sweep-"))
    collected = root / "collected"
    generations = collect(collected, args.failures, args.max_tokens)
    code = load_prompts("code", "eval")[: args.eval]
    prose = load_prompts("prose", "eval")[: args.eval]

    rows: list[dict[str, Any]] = []
    base: dict[str, float] | None = None
    for name, overrides in SWEEP:
        if args.only and name not in args.only:
            continue
        run = root / f"run{len(rows)}"
        shutil.copytree(collected / "failures", run / "failures")
        cfg = base_config(run)
        cfg["training"].update(overrides)
        system = SpeculativeDecodingSystem(cfg)
        system.initialize()
        if base is None:
            base = measure(system, code, prose, args.max_tokens)
            print("base draft:", base, flush=True)
        start = time.perf_counter()
        result = system.train()
        seconds = time.perf_counter() - start
        after = measure(system, code, prose, args.max_tokens)
        row = {
            "name": name,
            "overrides": overrides,
            "train_seconds": seconds,
            "steps": result["global_step"],
            "promoted": result["promoted"],
            "promotion": result["promotion"],
            "code_gain": after["acceptance_code"] - base["acceptance_code"],
            "prose_change": after["acceptance_prose"] - base["acceptance_prose"],
            **after,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    assert base is not None
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "failures": args.failures,
        "generations_to_collect_them": generations,
        "eval_prompts_per_domain": args.eval,
        "max_tokens": args.max_tokens,
        "measure_k": MEASURE_K,
        "base": base,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "mlx": mx.__version__,
    }
    (RESULTS / "learning_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"One train() on {args.failures} collected code failures ({generations} detailed generations, "
        f"{args.max_tokens} tokens); acceptance at T=0, K={MEASURE_K} on {args.eval} unseen prompts per domain. "
        f"Base draft: code {base['acceptance_code']:.3f}, prose {base['acceptance_prose']:.3f}.",
        "",
        "| setting | steps | train s | promoted | code | code gain | prose | prose change |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['name']} | {r['steps']} | {r['train_seconds']:.1f} | {'yes' if r['promoted'] else 'no'} | "
        f"{r['acceptance_code']:.3f} | "
        f"{r['code_gain']:+.3f} | {r['acceptance_prose']:.3f} | {r['prose_change']:+.3f} |"
        for r in rows
    ]
    (RESULTS / "learning_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
