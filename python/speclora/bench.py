"""Side-by-side throughput: target alone, mlx-lm speculative, SpecLoRA fast mode.

Every method runs in one process on the same prompts and models, after a warm-up,
so the ratios compare like with like. Each generation is timed whole, prefill
included, as a user would wait for it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.sample_utils import make_sampler

from speclora import _blas
from speclora.drafting import RoundCost, expected_tokens, measure_round_cost
from speclora.speculative import SpeculativeDecoder


@dataclass
class BenchRow:
    method: str
    temperature: float
    k: str  # "-" for the target alone, "adaptive" or the fixed K
    tokens: int
    seconds: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    ratio_target: float = 0.0
    ratio_mlx_lm: float = 0.0
    bound: float = 0.0
    machinery: float = 0.0  # share of round time outside the two models' forward passes
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0


def _timed(make_steps: Callable[[], Iterator[Any]]) -> tuple[list[Any], float]:
    """Run a token generator to the end, timing it from creation."""
    start = time.perf_counter()
    out = list(make_steps())
    return out, time.perf_counter() - start


def time_target_alone(target: Any, prompt: list[int], max_tokens: int, temperature: float) -> BenchRow:
    sampler = make_sampler(temp=temperature)
    out, seconds = _timed(
        lambda: generate_step(mx.array(prompt, mx.uint32), target, max_tokens=max_tokens, sampler=sampler)
    )
    tokens = [int(t) for t, _ in out]
    return BenchRow("target alone (mlx-lm)", temperature, "-", len(tokens), seconds, outputs=[tokens])


def _mlx_lm_speculative(
    target: Any, draft: Any, prompt: list[int], max_tokens: int, temperature: float, k: int
) -> BenchRow:
    sampler = make_sampler(temp=temperature)
    out, seconds = _timed(
        lambda: mlx_lm_speculative(
            mx.array(prompt, mx.uint32), target, draft, num_draft_tokens=k, max_tokens=max_tokens, sampler=sampler
        )
    )
    tokens = [int(t) for t, _, _ in out]
    # Rebuild mlx-lm's rounds: drafts then one target token; it drafts min(K, left).
    drafted = accepted = rounds = produced = 0
    in_round = False
    for _, _, from_draft in out:
        if not in_round:
            drafted += min(k, max_tokens - produced)
            rounds += 1
            in_round = True
        produced += 1
        if from_draft:
            accepted += 1
        else:
            in_round = False
    return BenchRow(
        "mlx-lm speculative", temperature, str(k), len(tokens), seconds, drafted, accepted, rounds, outputs=[tokens]
    )


def time_speclora(decoder: SpeculativeDecoder, prompt: list[int], max_tokens: int, temperature: float, k: str) -> BenchRow:
    r = decoder.generate(prompt, max_tokens, temperature=temperature)
    return BenchRow(
        "SpecLoRA fast", temperature, k, len(r.tokens), r.elapsed_s,
        r.num_draft_tokens, r.num_accepted_tokens, r.num_rounds, outputs=[r.tokens],
    )


def merge_rows(rows: list[BenchRow]) -> BenchRow:
    total = rows[0]
    for r in rows[1:]:
        total.tokens += r.tokens
        total.seconds += r.seconds
        total.drafted += r.drafted
        total.accepted += r.accepted
        total.rounds += r.rounds
        total.outputs += r.outputs
    return total


def _acceptance_from_round_length(tokens_per_round: float, k: float) -> float:
    """Solve ``expected_tokens(a, k) = tokens_per_round`` for ``a`` (bisection)."""
    lo, hi = 0.0, 1.0
    kk = max(1, round(k))
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, kk) < tokens_per_round:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def environment() -> dict[str, Any]:
    """Machine and versions, recorded next to the figures."""
    versions: dict[str, str | None] = {}
    for name in ("mlx", "mlx-lm", "speclora", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": _blas.state,
        "device": str(mx.default_device()),
        "versions": versions,
    }


def run_benchmark(
    target: Any,
    draft: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_tokens: int = 64,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    ks: tuple[int, ...] = (2, 3, 4),
    max_draft_tokens: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every method on every prompt and return rows plus the environment.

    Args:
        target, draft: The models. tokenizer: Their shared tokenizer.
        prompts (list[list[int]]): Token ids of the prompts.
        max_tokens (int): Tokens generated per prompt. Default: ``64``.
        temperatures (tuple[float, ...]): Default: ``(0.0, 1.0)``.
        ks (tuple[int, ...]): Fixed draft lengths. Default: ``(2, 3, 4)``.
        max_draft_tokens (int): Adaptive drafting's largest K. Default: ``8``.
        seed (int): Seeds ``mx.random`` before each method. Default: ``0``.
        progress (Callable): Receives one line per finished method.

    Returns:
        dict: ``rows`` (list of dicts), ``cost`` (measured RoundCost), ``environment``,
        ``identical_greedy`` (SpecLoRA's T=0 tokens equal the target's on every prompt).
    """
    cost = measure_round_cost(target, draft, max_k=max_draft_tokens)
    eos = set(tokenizer.eos_token_ids)
    fixed = {k: SpeculativeDecoder(target, draft, tokenizer, k, 0.0) for k in ks}
    adaptive = SpeculativeDecoder(
        target, draft, tokenizer, ks[0], 0.0, adaptive_draft=True, max_draft_tokens=max_draft_tokens, round_cost=cost
    )
    methods: list[tuple[str, Callable[[list[int], float], BenchRow]]] = [
        ("target", lambda p, t: time_target_alone(target, p, max_tokens, t)),
        *[(f"mlx-lm K={k}", lambda p, t, k=k: _mlx_lm_speculative(target, draft, p, max_tokens, t, k)) for k in ks],
        *[(f"speclora K={k}", lambda p, t, k=k: time_speclora(fixed[k], p, max_tokens, t, str(k))) for k in ks],
        ("speclora adaptive", lambda p, t: time_speclora(adaptive, p, max_tokens, t, "adaptive")),
    ]
    # Warm-up: compile kernels and fill allocator caches for every method.
    for _, run in methods:
        run(prompts[0], 0.0)

    rows: list[BenchRow] = []
    identical = True
    for temperature in temperatures:
        # Methods take turns on each prompt, so a slow spell on a shared machine
        # lands on all of them rather than on whichever ran then.
        per_method: dict[str, list[BenchRow]] = {name: [] for name, _ in methods}
        for i, p in enumerate(prompts):
            for name, run in methods:
                mx.random.seed(seed + i)
                per_method[name].append(run(p, temperature))
        by_method = {name: merge_rows(rows) for name, rows in per_method.items()}
        for name, row in by_method.items():
            progress(f"T={temperature} {name}: {row.tokens_per_s:.1f} tok/s")
        base = by_method["target"]
        best_mlx = max((r for n, r in by_method.items() if n.startswith("mlx-lm")), key=lambda r: r.tokens_per_s)
        for name, row in by_method.items():
            row.ratio_target = row.tokens_per_s / base.tokens_per_s
            row.ratio_mlx_lm = row.tokens_per_s / best_mlx.tokens_per_s
            if row.rounds:
                k = row.drafted / row.rounds
                alpha = _acceptance_from_round_length(row.tokens / row.rounds, k)
                row.bound = RoundCost(cost.draft_step, cost.verify_extra).speedup_bound(alpha, max(1, round(k)))
                model_seconds = cost.target_step_s * row.rounds * cost.of(max(1, round(k)))
                row.machinery = max(0.0, 1.0 - model_seconds / row.seconds) if row.seconds else 0.0
            if temperature == 0.0 and name.startswith("speclora"):
                identical &= all(_same_greedy(o, ref, eos) for o, ref in zip(row.outputs, base.outputs))
            rows.append(row)
    return {
        "rows": [_row_dict(r) for r in rows],
        "cost": asdict(cost),
        "environment": environment(),
        "identical_greedy": identical,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
    }


def _same_greedy(ours: list[int], target: list[int], eos: set[int]) -> bool:
    """SpecLoRA stops at EOS where mlx-lm's generator runs on: compare up to there."""
    if ours != target[: len(ours)]:
        return False
    return len(ours) == len(target) or target[len(ours)] in eos


def _row_dict(r: BenchRow) -> dict[str, Any]:
    out = asdict(r)
    del out["outputs"]
    return out | {
        "tokens_per_s": r.tokens_per_s,
        "acceptance": r.acceptance,
        "mean_accepted_length": r.mean_accepted_length,
        "achieved_over_bound": r.ratio_target / r.bound if r.bound else None,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table."""
    lines = [
        "| T | method | K | tok/s | x target | x mlx-lm best | acceptance | accepted/round | bound | achieved/bound | machinery |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        spec = r["rounds"] > 0
        lines.append(
            f"| {r['temperature']:g} | {r['method']} | {r['k']} | {r['tokens_per_s']:.1f} | {r['ratio_target']:.2f} | "
            f"{r['ratio_mlx_lm']:.2f} | {r['acceptance']:.3f} | {r['mean_accepted_length']:.2f} | "
            + (f"{r['bound']:.2f} | {r['achieved_over_bound']:.2f} | {r['machinery']:.1%} |" if spec else "- | - | - |")
        )
    cost = report["cost"]
    env = report["environment"]
    lines += [
        "",
        f"Cost ratio c (draft step / target step) = {cost['draft_step']:.3f}; "
        f"each extra verified token adds {cost['verify_extra']:.3f} target steps; "
        f"target step = {cost['target_step_s'] * 1e3:.2f} ms.",
        f"Greedy output identical to the target alone: {report['identical_greedy']}. "
        f"{report['prompts']} prompts x {report['max_tokens']} tokens.",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, BLAS: {env['blas']}; "
        f"versions: {json.dumps(env['versions'])}.",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(format_table(report) + "\n")
    temps = sorted({r["temperature"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        rows = [r for r in report["rows"] if r["temperature"] == t]
        labels = [f"{r['method']}\nK={r['k']}" for r in rows]
        ax.bar(range(len(rows)), [r["ratio_target"] for r in rows], color=[_color(r["method"]) for r in rows])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed vs target alone")
        ax.set_title(f"T = {t:g}")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def _color(method: str) -> str:
    return {"target alone (mlx-lm)": "grey", "mlx-lm speculative": "tab:orange"}.get(method, "tab:blue")


__all__ = [
    "BenchRow",
    "environment",
    "format_table",
    "merge_rows",
    "run_benchmark",
    "time_speclora",
    "time_target_alone",
    "write_report",
]
