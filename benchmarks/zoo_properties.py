"""Measure the properties the shipped target/draft pair is built to have.

1. The target's held-out loss is below the draft's by >= 0.3 nats on both domains.
2. A draft decode step costs <= 1/6 of a target decode step.
3. With mlx-lm's speculative decoding at temperature 0, acceptance on eval prose
   prompts is in [0.35, 0.8] and on eval code prompts >= 0.10 lower.
4. mlx-lm's speculative decoding is >= 1.1x faster than the target alone on prose.

Acceptance is accepted drafted tokens / drafted tokens, counted from the
``from_draft`` flags of ``mlx_lm.stream_generate``: each verification round yields
the accepted draft tokens (``from_draft=True``) and then one target token
(``from_draft=False``); a round starting with ``r`` tokens left drafts
``min(num_draft_tokens, r)``. A final round cut short by an end-of-sequence token
is left out of both counts. The share of generated tokens with ``from_draft`` set
is reported too.

Usage: ``python benchmarks/zoo_properties.py [--prompts N] [--max-tokens 64]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: loads OpenBLAS)
from speclora import _blas
from speclora.zoo import ZOO_DIR, load_prompts, model_path

# isort: split
import mlx.core as mx
import mlx_lm

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_properties.json"
LOSS_MARGIN = 0.3
COST_RATIO_MAX = 1 / 6
PROSE_ACCEPT = (0.35, 0.8)
CODE_GAP = 0.10
SPEEDUP_MIN = 1.1


def heldout_losses(model, tokenizer, *, windows: int) -> dict[str, float]:
    """Mean loss of the shipped (fp16) weights on windows of the held-out documents."""
    from speclora.zoo.build import _stream
    from speclora.zoo.corpus import DOMAINS, load_corpus
    from speclora.zoo.train import WindowSampler, mean_loss

    seq_len = json.loads((ZOO_DIR / "manifest.json").read_text())["seq_len"]
    out = {}
    for domain in DOMAINS:
        docs = [d for d in load_corpus(domain) if d.split != "train"]
        stream = _stream(
            docs,
            lambda s: tokenizer.encode(s, add_special_tokens=False),
            tokenizer.eos_token_id,
        )
        sampler = WindowSampler(
            {domain: stream}, bos_id=tokenizer.bos_token_id, seq_len=seq_len
        )
        out[domain] = mean_loss(model, sampler.fixed_windows(domain, windows))
    return out


def decode_step_seconds(model, prompt: mx.array, *, steps: int = 200) -> float:
    """Median seconds of one single-token forward with a KV cache, after warm-up."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    y = prompt[-1:]
    times = []
    for i in range(steps + 20):
        t0 = time.perf_counter()
        logits = model(y[None], cache=cache)
        mx.eval(logits)
        if i >= 20:
            times.append(time.perf_counter() - t0)
        if cache[0].offset > 240:
            for c in cache:
                c.trim(200)
    return statistics.median(times)


def acceptance_counts(flags: list[bool], *, k: int, max_tokens: int) -> tuple[int, int]:
    """(accepted, drafted) from one generation's ``from_draft`` flags."""
    accepted = drafted = 0
    done = 0
    round_accepted = 0
    for flag in flags:
        if flag:
            round_accepted += 1
            continue
        accepted += round_accepted
        drafted += min(k, max_tokens - done)
        done += round_accepted + 1
        round_accepted = 0
    if round_accepted and done + round_accepted == max_tokens:
        # The budget ran out inside a round whose drafts were all accepted.
        accepted += round_accepted
        drafted += min(k, max_tokens - done)
    return accepted, drafted


def run_domain(target, draft, tokenizer, prompts, *, k, max_tokens) -> dict:
    """Baseline and speculative generation side by side, prompt by prompt."""
    base_s = spec_s = 0.0
    base_toks = spec_toks = 0
    accepted = drafted = from_draft = 0
    same = 0
    for prompt in prompts:
        t0 = time.perf_counter()
        base = list(
            mlx_lm.stream_generate(target, tokenizer, prompt, max_tokens=max_tokens)
        )
        base_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = list(
            mlx_lm.stream_generate(
                target,
                tokenizer,
                prompt,
                max_tokens=max_tokens,
                draft_model=draft,
                num_draft_tokens=k,
            )
        )
        spec_s += time.perf_counter() - t0
        base_toks += len(base)
        spec_toks += len(spec)
        flags = [r.from_draft for r in spec]
        a, d = acceptance_counts(flags, k=k, max_tokens=max_tokens)
        accepted += a
        drafted += d
        from_draft += sum(flags)
        same += [r.token for r in base] == [r.token for r in spec]
    return {
        "prompts": len(prompts),
        "acceptance": accepted / max(drafted, 1),
        "accepted": accepted,
        "drafted": drafted,
        "from_draft_share": from_draft / max(spec_toks, 1),
        "baseline_tps": base_toks / base_s,
        "speculative_tps": spec_toks / spec_s,
        "speedup": (spec_toks / spec_s) / (base_toks / base_s),
        "identical_outputs": same / len(prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompts", type=int, default=None, help="Eval prompts per domain."
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--loss-windows", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Held-out documents are encoded whole (longer than the context) on purpose.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    target, tokenizer = mlx_lm.load(str(model_path("target")))[:2]
    draft = mlx_lm.load(str(model_path("draft")))[0]
    manifest = json.loads((ZOO_DIR / "manifest.json").read_text())

    losses = {
        "target": heldout_losses(target, tokenizer, windows=args.loss_windows),
        "draft": heldout_losses(draft, tokenizer, windows=args.loss_windows),
    }
    probe = mx.array(tokenizer.encode(load_prompts("prose", "eval")[0]))
    step = {
        "target": decode_step_seconds(target, probe),
        "draft": decode_step_seconds(draft, probe),
    }

    warm = load_prompts("prose", "train")[:3]
    run_domain(target, draft, tokenizer, warm, k=args.num_draft_tokens, max_tokens=16)
    gen = {
        domain: run_domain(
            target,
            draft,
            tokenizer,
            load_prompts(domain, "eval")[: args.prompts],
            k=args.num_draft_tokens,
            max_tokens=args.max_tokens,
        )
        for domain in ("prose", "code")
    }

    checks = {}
    for domain in ("prose", "code"):
        gap = losses["draft"][domain] - losses["target"][domain]
        checks[f"loss gap {domain} >= {LOSS_MARGIN}"] = (
            round(gap, 3),
            gap >= LOSS_MARGIN,
        )
    ratio = step["draft"] / step["target"]
    checks["draft/target step cost <= 1/6"] = (round(ratio, 3), ratio <= COST_RATIO_MAX)
    pa = gen["prose"]["acceptance"]
    checks["prose acceptance in [0.35, 0.8]"] = (
        round(pa, 3),
        PROSE_ACCEPT[0] <= pa <= PROSE_ACCEPT[1],
    )
    diff = pa - gen["code"]["acceptance"]
    checks[f"prose - code acceptance >= {CODE_GAP}"] = (
        round(diff, 3),
        diff >= CODE_GAP,
    )
    sp = gen["prose"]["speedup"]
    checks[f"prose speedup >= {SPEEDUP_MIN}x"] = (round(sp, 3), sp >= SPEEDUP_MIN)

    print(f"{'property':38s} {'value':>8s}  ok")
    for name, (value, ok) in checks.items():
        print(f"{name:38s} {value:8.3f}  {'yes' if ok else 'NO'}")
    print()
    print(f"{'':10s} {'target':>8s} {'draft':>8s}")
    for domain in ("prose", "code"):
        t, d = losses["target"][domain], losses["draft"][domain]
        print(f"loss {domain:5s} {t:8.3f} {d:8.3f}")
    print(f"step ms    {step['target'] * 1e3:8.3f} {step['draft'] * 1e3:8.3f}")
    print()
    print(
        f"{'domain':6s} {'accept':>7s} {'from_dr':>7s} {'base t/s':>9s} {'spec t/s':>9s} {'speedup':>7s}"
    )
    for domain, g in gen.items():
        print(
            f"{domain:6s} {g['acceptance']:7.3f} {g['from_draft_share']:7.3f} "
            f"{g['baseline_tps']:9.1f} {g['speculative_tps']:9.1f} {g['speedup']:7.3f}"
        )

    versions = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm"):
        versions[pkg] = metadata.version(pkg)
    report = {
        "checks": {k: {"value": v, "ok": ok} for k, (v, ok) in checks.items()},
        "heldout_loss_fp16": losses,
        "heldout_loss_manifest": {
            n: {
                d: manifest["models"][n]["losses"][f"heldout_{d}"]
                for d in ("prose", "code")
            }
            for n in ("target", "draft")
        },
        "decode_step_seconds": step,
        "generation": gen,
        "settings": {
            "max_tokens": args.max_tokens,
            "num_draft_tokens": args.num_draft_tokens,
            "temperature": 0.0,
            "loss_windows": args.loss_windows,
            "acceptance_definition": "accepted drafted tokens / drafted tokens",
        },
        "blas": _blas.state,
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "versions": versions,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
