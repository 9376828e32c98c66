"""Fast mode with a draft that never agrees with the target: never slower than the target alone.

The shipped target is paired with a draft of the shipped draft's shape and random
weights, whose proposals are (almost) never accepted. Fast mode's adaptive drafting
must then fall back to plain target steps (and prompt lookup where it pays), so
that it runs at least as fast as the target alone. The target alone (mlx-lm's
``generate_step``), fast mode with the default proposers and fast mode with the
draft model alone take turns on each held-out prompt; greedy outputs are checked
against the target's.

Usage: ``python benchmarks/worst_case_pair.py [--prompts 16] [--max-tokens 64]``
(writes ``benchmarks/results/worst_case_pair.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: loads OpenBLAS)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler

from speclora.bench import environment, load_prompt_sets
from speclora.models import ModelManager
from speclora.speculative import SpeculativeDecoder

RESULTS = Path(__file__).resolve().parent / "results"


def random_draft(like: llama.Model, seed: int = 0) -> llama.Model:
    """A model of ``like``'s architecture with freshly initialized weights."""
    mx.random.seed(seed)
    model = llama.Model(like.args)
    mx.eval(model.parameters())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    manager = ModelManager({})
    target, shipped_draft = manager.load_models()
    draft = random_draft(shipped_draft)
    tokenizer = manager.tokenizer
    n_params = sum(v.size for _, v in tree_flatten(draft.parameters()))
    decoders = {
        "fast (default)": SpeculativeDecoder(target, draft, tokenizer, 4, 0.0, adaptive_draft=True),
        "fast, draft model only": SpeculativeDecoder(
            target, draft, tokenizer, 4, 0.0, adaptive_draft=True, ngram_proposer=False
        ),
    }
    sets = load_prompt_sets(decoders["fast (default)"].encode_prompt, ["prose", "code"], args.prompts)
    eos = set(tokenizer.eos_token_ids)
    rows = []
    for temperature in (0.0, 1.0):
        sampler = make_sampler(temp=temperature)
        for name, prompts in sets.items():
            seconds = dict.fromkeys(["target alone", *decoders], 0.0)
            tokens = dict.fromkeys(seconds, 0)
            rounds: dict[str, dict[str, int]] = {n: {} for n in decoders}
            identical = True
            for i, p in enumerate([prompts[0], *prompts]):  # the first one warms up
                mx.random.seed(i)
                start = time.perf_counter()
                ref = [int(t) for t, _ in generate_step(mx.array(p, mx.uint32), target, max_tokens=args.max_tokens, sampler=sampler)]
                elapsed = time.perf_counter() - start
                if i:
                    seconds["target alone"] += elapsed
                    tokens["target alone"] += len(ref)
                for label, decoder in decoders.items():
                    mx.random.seed(i)
                    result = decoder.generate(p, args.max_tokens, temperature=temperature)
                    if not i:
                        continue
                    seconds[label] += result.elapsed_s
                    tokens[label] += len(result.tokens)
                    for proposer, s in result.stats.proposers.items():
                        rounds[label][proposer] = rounds[label].get(proposer, 0) + s.rounds
                    if temperature == 0.0:
                        out = result.tokens
                        identical &= out == ref[: len(out)] and (len(out) == len(ref) or ref[len(out)] in eos)
            base = tokens["target alone"] / seconds["target alone"]
            for label in seconds:
                speed = tokens[label] / seconds[label]
                rows.append(
                    {
                        "set": name,
                        "temperature": temperature,
                        "method": label,
                        "tokens_per_s": speed,
                        "x_target": speed / base,
                        "rounds_by_proposer": rounds.get(label, {}),
                        "identical_greedy": identical if temperature == 0.0 else None,
                    }
                )
    report = {"rows": rows, "draft_parameters": n_params, "prompts": args.prompts, "max_tokens": args.max_tokens, "environment": environment()}
    lines = [
        "| set | T | method | tok/s | x target alone | rounds by proposer |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        by = " ".join(f"{k} {v}" for k, v in sorted(r["rounds_by_proposer"].items())) or "-"
        lines.append(f"| {r['set']} | {r['temperature']:g} | {r['method']} | {r['tokens_per_s']:.1f} | {r['x_target']:.2f} | {by} |")
    env = report["environment"]
    lines += [
        "",
        f"Draft: the shipped draft's shape ({n_params} parameters) with random weights. "
        f"{args.prompts} prompts x {args.max_tokens} tokens per set. Greedy output identical to the target alone: "
        f"{all(r['identical_greedy'] for r in rows if r['identical_greedy'] is not None)}.",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, load average {env['load_average']}, BLAS: {env['blas']}.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worst_case_pair.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "worst_case_pair.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
