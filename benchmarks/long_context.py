"""How the shipped pair predicts far past the 256 tokens it was trained on.

Both models use rotary position embeddings, which have no built-in length. This
measures the next-token loss of each model by position, in float32 (what the
product computes in on CPU), on held-out documents (the build's ``eval`` split,
never trained on) that are at least ``--length`` tokens long, and greedy
speculative acceptance with a long prompt. The declared context of the shipped
models (``max_position_embeddings``) rests on these figures.

Run: ``.venv/bin/python benchmarks/long_context.py [--length 2048] [--docs 8]``
Writes ``benchmarks/results/long_context_<length>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import speclora  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from speclora.config import Config
from speclora.models import ModelManager
from speclora.speculative import SpeculativeDecoder
from speclora.zoo.corpus import load_corpus

RESULTS = Path(__file__).parent / "results"


def buckets(length: int) -> list[tuple[int, int]]:
    edges = [0, 256]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return list(zip(edges, edges[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens per document window")
    parser.add_argument("--docs", type=int, default=8, help="held-out documents per domain")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens generated after a long prompt")
    args = parser.parse_args()
    manager = ModelManager(Config.from_dict({}))
    target, draft = manager.load_models()
    tokenizer = manager.tokenizer
    report: dict[str, dict[str, object]] = {}
    for domain in ("prose", "code"):
        windows = []
        for doc in load_corpus(domain):
            if doc.split != "eval":
                continue
            ids = tokenizer.encode(doc.text)
            if len(ids) > args.length:
                windows.append(ids[: args.length + 1])
            if len(windows) == args.docs:
                break
        x = mx.array(windows)
        entry: dict[str, object] = {"documents": len(windows)}
        for name, model in (("target", target), ("draft", draft)):
            ce = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:])
            per_position = np.array(ce.mean(axis=0))
            entry[f"{name}_loss"] = {f"{lo}-{hi}": float(per_position[lo:hi].mean()) for lo, hi in buckets(args.length)}
        # Greedy speculation continuing each window's first length - gen_tokens tokens.
        decoder = SpeculativeDecoder(target, draft, tokenizer, 3, 0.0)
        drafted = accepted = 0
        for ids in windows:
            result = decoder.generate(ids[: args.length - args.gen_tokens], args.gen_tokens)
            drafted += result.num_draft_tokens
            accepted += result.num_accepted_tokens
        entry["acceptance_k3_long_prompt"] = accepted / drafted
        report[domain] = entry
        print(domain, json.dumps(entry), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"long_context_{args.length}.json").write_text(json.dumps({"length": args.length, **report}, indent=2) + "\n")
    spans = [f"{lo}-{hi}" for lo, hi in buckets(args.length)]
    lines = [
        f"Next-token loss (nats, float32) by position on held-out documents of more than {args.length} "
        "tokens; the pair was trained on windows of 256.",
        "",
        "| domain | model | " + " | ".join(spans) + " |",
        "|---|---|" + "---:|" * len(spans),
    ]
    for domain, entry in report.items():
        for name in ("target", "draft"):
            losses = entry[f"{name}_loss"]
            assert isinstance(losses, dict)
            lines.append(f"| {domain} | {name} | " + " | ".join(f"{losses[s]:.3f}" for s in spans) + " |")
    lines += [
        "",
        "Greedy acceptance (K=3) generating "
        f"{args.gen_tokens} tokens after a {args.length - args.gen_tokens}-token prompt: "
        + ", ".join(f"{d} {e['acceptance_k3_long_prompt']:.3f}" for d, e in report.items()),
    ]
    (RESULTS / f"long_context_{args.length}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
