"""The shipped pair unquantized and quantized at load (``models.quantize_bits``):
acceptance and speed, fast mode against the target alone, interleaved per prompt.

Run: ``.venv/bin/python benchmarks/quantized_pair.py [--prompts 12] [--max-tokens 48]``
Writes ``benchmarks/results/quantized_pair.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
from speclora import SpeculativeDecodingSystem
from speclora.bench import merge_rows, time_speclora, time_target_alone
from speclora.config import Config
from speclora.speculative import SpeculativeDecoder
from speclora.zoo import load_prompts

RESULTS = Path(__file__).parent / "results"


def system_for(bits: int | None) -> SpeculativeDecodingSystem:
    config = Config.from_dict({}).to_dict()
    config["models"].update(quantize_bits=bits, draft_adapter="base")
    config["logging"]["show_progress"] = False
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    return system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts per domain")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    variants: dict[str, SpeculativeDecodingSystem] = {
        name: system_for(bits) for name, bits in (("float32", None), ("8-bit", 8), ("4-bit", 4))
    }
    rows: list[dict[str, Any]] = []
    for domain in ("prose", "code"):
        prompts = load_prompts(domain, "eval")[: args.prompts]
        timed: dict[str, dict[str, list[Any]]] = {name: {"target": [], "fast": [], "k3": []} for name in variants}
        for i, prompt in enumerate(prompts):
            # Interleaved: every variant and method takes its turn on each prompt.
            for name, system in variants.items():
                fast = system.fast_decoder
                assert fast is not None
                tokens = fast.encode_prompt(prompt)
                k3 = SpeculativeDecoder(fast.target_model, fast.draft_model, fast.tokenizer, 3, 0.0)
                if i == 0:  # warm-up and the adaptive policy's cost calibration, untimed
                    time_target_alone(fast.target_model, tokens, args.max_tokens, 0.0)
                    time_speclora(fast, tokens, args.max_tokens, 0.0, "adaptive")
                timed[name]["target"].append(time_target_alone(fast.target_model, tokens, args.max_tokens, 0.0))
                timed[name]["fast"].append(time_speclora(fast, tokens, args.max_tokens, 0.0, "adaptive"))
                timed[name]["k3"].append(time_speclora(k3, tokens, args.max_tokens, 0.0, "3"))
        for name, methods in timed.items():
            target, fast, k3 = (merge_rows(methods[m]) for m in ("target", "fast", "k3"))
            rows.append(
                {
                    "domain": domain,
                    "weights": name,
                    "acceptance_k3": k3.accepted / k3.drafted,
                    "target_tokens_per_s": target.tokens_per_s,
                    "fast_tokens_per_s": fast.tokens_per_s,
                    "fast_vs_target": fast.tokens_per_s / target.tokens_per_s,
                    "target_vs_float32_target": None,
                }
            )
    for row in rows:
        base = next(r for r in rows if r["domain"] == row["domain"] and r["weights"] == "float32")
        row["target_vs_float32_target"] = row["target_tokens_per_s"] / base["target_tokens_per_s"]
    meta = {
        "prompts_per_domain": args.prompts,
        "max_tokens": args.max_tokens,
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "mlx": mx.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantized_pair.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Shipped pair, T=0, {args.prompts} held-out prompts per domain x {args.max_tokens} tokens, "
        f"interleaved; load average {meta['load_average'][0]:.1f} on {platform.machine()}.",
        "",
        "| domain | weights | acceptance (K=3) | target tok/s | fast tok/s | fast / target | target / float32 target |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['domain']} | {r['weights']} | {r['acceptance_k3']:.3f} | {r['target_tokens_per_s']:.1f} | "
        f"{r['fast_tokens_per_s']:.1f} | {r['fast_vs_target']:.2f}x | {r['target_vs_float32_target']:.2f}x |"
        for r in rows
    ]
    (RESULTS / "quantized_pair.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
