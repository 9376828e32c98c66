"""Side-by-side throughput: target alone, mlx-lm speculative, SpecLoRA fast mode.

Every method runs in one process on the same prompts and models, after a warm-up,
taking turns on each prompt (so a slow spell of a shared machine lands on all of
them), and the ratios compare like with like. Each generation is timed whole,
prefill included, as a user would wait for it.

Besides speed the report gives, per method:

* ``bound``: the speedup over the target alone that the method's own rounds would
  give if nothing but the models' forward passes took time -- tokens emitted over
  the cost of the passes that emitted them, from the measured model costs
  (:func:`speclora.drafting.measure_round_cost`): Leviathan et al.'s bound, with
  the acceptance each round actually had. ``achieved/bound`` is the share of it
  that the method realises.
* For SpecLoRA, a per-round breakdown of where the time goes (draft steps, the
  verify pass, the acceptance op, the host sync, cache rollback, Python
  bookkeeping) from a second, profiled run of the same prompts, which
  synchronises after every phase; ``machinery`` is everything but the models'
  passes. And the rounds of each proposer (draft model, prompt lookup, none).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.sample_utils import make_sampler

from speclora import _blas
from speclora.decoding import MODEL_PHASES, PHASES
from speclora.drafting import DRAFT, NONE, RoundCost, measure_round_cost
from speclora.speculative import SpeculativeDecoder

TARGET = "target alone (mlx-lm)"
MLX_LM = "mlx-lm speculative"
SPECLORA = "SpecLoRA fast"
ADAPTIVE = "adaptive"
ADAPTIVE_DRAFT_ONLY = "adaptive, draft model only"


@dataclass
class BenchRow:
    method: str
    temperature: float
    k: str  # "-" for the target alone, "adaptive..." or the fixed K
    tokens: int
    seconds: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    ratio_target: float = 0.0
    ratio_mlx_lm: float = 0.0
    bound: float = 0.0
    machinery: float = 0.0  # share of profiled round time outside the models' passes
    model_cost: float = 0.0  # the rounds' forward passes, in target decode steps
    prompt_set: str = ""
    proposers: dict[str, list[int]] = field(default_factory=dict)  # name -> [rounds, drafted, accepted]
    breakdown: dict[str, float] = field(default_factory=dict)  # phase -> seconds, then share of round time
    round_seconds: float = 0.0  # the rounds' own time, summed
    round_ms: float = 0.0  # mean profiled round time
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
    return BenchRow(TARGET, temperature, "-", len(tokens), seconds, outputs=[tokens])


def _mlx_lm_speculative(
    target: Any,
    draft: Any,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    k: int,
    cost: RoundCost | None = None,
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
    model_cost = 0.0
    in_round = False
    for _, _, from_draft in out:
        if not in_round:
            k_round = min(k, max_tokens - produced)
            drafted += k_round
            rounds += 1
            if cost is not None:
                model_cost += cost.of(k_round)
            in_round = True
        produced += 1
        if from_draft:
            accepted += 1
        else:
            in_round = False
    row = BenchRow(MLX_LM, temperature, str(k), len(tokens), seconds, drafted, accepted, rounds, outputs=[tokens])
    row.model_cost = model_cost
    row.proposers = {DRAFT: [rounds, drafted, accepted]}
    return row


def time_speclora(
    decoder: SpeculativeDecoder,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    k: str,
    cost: RoundCost | None = None,
) -> BenchRow:
    """Time one generation; with ``cost``, also the model cost of its rounds."""
    model_cost = 0.0
    rounds = decoder.stream(prompt, max_tokens, temperature=temperature)
    start = time.perf_counter()
    while True:
        try:
            r = next(rounds)
        except StopIteration as done:
            result = done.value
            break
        if cost is not None:
            model_cost += cost.of(r.drafted, r.proposer)
    seconds = time.perf_counter() - start
    row = BenchRow(
        SPECLORA, temperature, k, len(result.tokens), seconds,
        result.num_draft_tokens, result.num_accepted_tokens, result.num_rounds, outputs=[result.tokens],
    )
    row.model_cost = model_cost
    row.proposers = {n: [s.rounds, s.drafted, s.accepted] for n, s in result.stats.proposers.items()}
    row.breakdown = dict(result.stats.timings)
    row.round_seconds = result.stats.round_seconds
    return row


def merge_rows(rows: list[BenchRow]) -> BenchRow:
    total = rows[0]
    for r in rows[1:]:
        total.tokens += r.tokens
        total.seconds += r.seconds
        total.drafted += r.drafted
        total.accepted += r.accepted
        total.rounds += r.rounds
        total.model_cost += r.model_cost
        total.round_seconds += r.round_seconds
        total.outputs += r.outputs
        for name, counts in r.proposers.items():
            mine = total.proposers.setdefault(name, [0, 0, 0])
            for i, c in enumerate(counts):
                mine[i] += c
        for phase, seconds in r.breakdown.items():
            total.breakdown[phase] = total.breakdown.get(phase, 0.0) + seconds
    return total


def environment() -> dict[str, Any]:
    """Machine and versions, recorded next to the figures."""
    versions: dict[str, str | None] = {}
    for name in ("mlx", "mlx-lm", "speclora", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": _blas.state,
        "device": str(mx.default_device()),
        "load_average": [round(x, 2) for x in load],
        "versions": versions,
    }


def _profile(rows: dict[str, BenchRow], profiled: dict[str, BenchRow]) -> None:
    """Copy the profiled runs' breakdown into the timed rows, as shares."""
    for name, p in profiled.items():
        row = rows[name]
        total = sum(p.breakdown.values())
        if not total or not p.rounds:
            continue
        row.breakdown = {phase: p.breakdown.get(phase, 0.0) / total for phase in PHASES}
        row.machinery = 1.0 - sum(row.breakdown[phase] for phase in MODEL_PHASES)
        row.round_ms = 1e3 * p.round_seconds / p.rounds


def run_benchmark(
    target: Any,
    draft: Any,
    tokenizer: Any,
    prompts: list[list[int]] | dict[str, list[list[int]]],
    *,
    max_tokens: int = 64,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    ks: tuple[int, ...] = (2, 3, 4),
    max_draft_tokens: int = 8,
    ngram_proposer: bool = True,
    draft_only_adaptive: bool = False,
    profile: bool = True,
    repeats: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every method on every prompt and return rows plus the environment.

    Args:
        target, draft: The models. tokenizer: Their shared tokenizer.
        prompts (list[list[int]] or dict): Token ids of the prompts, or prompt
          sets by name (each set compared on its own, all in this one run).
        max_tokens (int): Tokens generated per prompt. Default: ``64``.
        temperatures (tuple[float, ...]): Default: ``(0.0, 1.0)``.
        ks (tuple[int, ...]): Fixed draft lengths. Default: ``(2, 3, 4)``.
        max_draft_tokens (int): Adaptive drafting's largest K. Default: ``8``.
        ngram_proposer (bool): Adaptive drafting may use prompt lookup (the
          default configuration). Default: ``True``.
        draft_only_adaptive (bool): Also run adaptive drafting with the draft
          model alone. Default: ``False``.
        profile (bool): Profile SpecLoRA's rounds in a second run (the breakdown).
          Default: ``True``.
        repeats (int): Runs of each method on each prompt (taking turns); each
          prompt counts with its fastest run, which filters out the slow spells of
          a shared machine. Default: ``1``.
        seed (int): Seeds ``mx.random`` before each method. Default: ``0``.
        progress (Callable): Receives one line per finished method.

    Returns:
        dict: ``rows`` (list of dicts), ``cost`` (measured RoundCost), ``environment``,
        ``identical_greedy`` (SpecLoRA's T=0 tokens equal the target's on every
        prompt), ``summary`` (fast mode's ratios per set and their geometric means).
    """
    sets = prompts if isinstance(prompts, dict) else {"": prompts}
    cost = measure_round_cost(target, draft, max_k=max(max_draft_tokens, *ks), repeats=16)
    eos = set(tokenizer.eos_token_ids)
    adaptive_kinds = {ADAPTIVE: ngram_proposer}
    if draft_only_adaptive:
        adaptive_kinds[ADAPTIVE_DRAFT_ONLY] = False

    def decoders(profiled: bool) -> dict[str, SpeculativeDecoder]:
        made = {
            str(k): SpeculativeDecoder(target, draft, tokenizer, k, 0.0, profile=profiled) for k in ks
        }
        for label, ngram in adaptive_kinds.items():
            made[label] = SpeculativeDecoder(
                target, draft, tokenizer, ks[0], 0.0, adaptive_draft=True, max_draft_tokens=max_draft_tokens,
                round_cost=cost, ngram_proposer=ngram, profile=profiled,
            )
        return made

    def methods(decoder: dict[str, SpeculativeDecoder]) -> list[tuple[str, Callable[[list[int], float], BenchRow]]]:
        return [
            ("target", lambda p, t: time_target_alone(target, p, max_tokens, t)),
            *[
                (f"mlx-lm K={k}", lambda p, t, k=k: _mlx_lm_speculative(target, draft, p, max_tokens, t, k, cost))
                for k in ks
            ],
            *[
                (f"speclora {label}", lambda p, t, label=label: time_speclora(decoder[label], p, max_tokens, t, label, cost))
                for label in decoder
            ],
        ]

    timed = methods(decoders(False))
    profiled = [(n, run) for n, run in methods(decoders(True)) if n.startswith("speclora")] if profile else []
    # Warm-up: compile kernels and fill allocator caches for every method.
    first = next(iter(sets.values()))[0]
    for _, run in timed + profiled:
        run(first, 0.0)

    rows: list[BenchRow] = []
    identical = True
    summary: dict[str, Any] = {}
    for set_name, set_prompts in sets.items():
        for temperature in temperatures:
            # Methods take turns on each prompt, so a slow spell on a shared machine
            # lands on all of them rather than on whichever ran then.
            per_method: dict[str, list[BenchRow]] = {name: [] for name, _ in timed}
            for i, p in enumerate(set_prompts):
                runs: dict[str, list[BenchRow]] = {name: [] for name, _ in timed}
                for _ in range(repeats):
                    for name, run in timed:
                        mx.random.seed(seed + i)
                        runs[name].append(run(p, temperature))
                for name, rs in runs.items():
                    # The fastest of the repeats: what the method does when the machine lets it.
                    per_method[name].append(min(rs, key=lambda r: r.seconds))
            by_method = {name: merge_rows(rs) for name, rs in per_method.items()}
            if profiled:
                per_profiled: dict[str, list[BenchRow]] = {name: [] for name, _ in profiled}
                for i, p in enumerate(set_prompts):
                    for name, run in profiled:
                        mx.random.seed(seed + i)
                        per_profiled[name].append(run(p, temperature))
                _profile(by_method, {name: merge_rows(rs) for name, rs in per_profiled.items()})
            for name, row in by_method.items():
                progress(f"{set_name or 'prompts'} T={temperature} {name}: {row.tokens_per_s:.1f} tok/s")
            base = by_method["target"]
            best_mlx = max((r for n, r in by_method.items() if n.startswith("mlx-lm")), key=lambda r: r.tokens_per_s)
            for name, row in by_method.items():
                row.prompt_set = set_name
                row.ratio_target = row.tokens_per_s / base.tokens_per_s
                row.ratio_mlx_lm = row.tokens_per_s / best_mlx.tokens_per_s
                row.bound = row.tokens / row.model_cost if row.model_cost else 0.0
                if temperature == 0.0 and name.startswith("speclora"):
                    identical &= all(_same_greedy(o, ref, eos) for o, ref in zip(row.outputs, base.outputs))
                rows.append(row)
            fast = by_method[f"speclora {ADAPTIVE}"]
            summary.setdefault(f"T={temperature:g}", {})[set_name] = {
                "x_target": fast.ratio_target,
                "x_mlx_lm_best": fast.ratio_mlx_lm,
                "mlx_lm_best_k": best_mlx.k,
            }
    for figures in summary.values():
        for key in ("x_target", "x_mlx_lm_best"):
            values = [f[key] for f in figures.values() if isinstance(f, dict)]
            figures[f"geomean_{key}"] = math.exp(sum(math.log(v) for v in values) / len(values))
    return {
        "rows": [_row_dict(r) for r in rows],
        "cost": asdict(cost),
        "environment": environment(),
        "identical_greedy": identical,
        "prompts": len(next(iter(sets.values()))),
        "prompt_sets": list(sets),
        "max_tokens": max_tokens,
        "repeats": repeats,
        "summary": summary,
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


_SHORT = {DRAFT: "d", "ngram": "n", NONE: "-"}


def _proposers(r: dict[str, Any]) -> str:
    """``d 18 (33/20) n 14 (47/11) - 1``: rounds (drafted/accepted) per proposer."""
    parts = []
    for name, (rounds, drafted, accepted) in sorted(r["proposers"].items()):
        parts.append(f"{_SHORT.get(name, name)} {rounds}" + (f" ({accepted}/{drafted})" if drafted else ""))
    return " ".join(parts) or "-"


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table, then the summary and the setting."""
    several = len(report.get("prompt_sets", [""])) > 1
    phases = " | ".join(PHASES)
    lines = [
        ("| set " if several else "")
        + "| T | method | K | tok/s | x target | x mlx-lm best | acceptance | accepted/round | bound | "
        f"achieved/bound | machinery | round ms | {phases} | rounds by proposer |",
        ("|---" if several else "") + "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * len(PHASES) + "---|",
    ]
    for r in report["rows"]:
        spec = r["rounds"] > 0
        profiled = bool(r["breakdown"])
        lines.append(
            (f"| {r['prompt_set']} " if several else "")
            + f"| {r['temperature']:g} | {r['method']} | {r['k']} | {r['tokens_per_s']:.1f} | {r['ratio_target']:.2f} | "
            f"{r['ratio_mlx_lm']:.2f} | {r['acceptance']:.3f} | {r['mean_accepted_length']:.2f} | "
            + (f"{r['bound']:.2f} | {r['achieved_over_bound']:.2f} | " if spec and r["bound"] else "- | - | ")
            + (f"{r['machinery']:.1%} | {r['round_ms']:.2f} | " if profiled else "- | - | ")
            + " | ".join(f"{r['breakdown'][p]:.1%}" if profiled else "-" for p in PHASES)
            + f" | {_proposers(r) if spec else '-'} |"
        )
    cost = report["cost"]
    env = report["environment"]
    verify = ", ".join(f"{v:.2f}" for v in cost.get("verify", ()))
    lines += [""]
    for t, figures in report.get("summary", {}).items():
        sets = [s for s in figures if isinstance(figures[s], dict)]
        per_set = "; ".join(
            f"{s or 'prompts'}: {figures[s]['x_target']:.2f}x target, {figures[s]['x_mlx_lm_best']:.2f}x mlx-lm "
            f"(best K={figures[s]['mlx_lm_best_k']})"
            for s in sets
        )
        lines.append(
            f"Fast mode (adaptive, default proposers) at {t}: {per_set}; geometric mean "
            f"{figures['geomean_x_target']:.2f}x target, {figures['geomean_x_mlx_lm_best']:.2f}x mlx-lm best K."
        )
    lines += [
        "",
        f"Cost ratio c (draft step / target step) = {cost['draft_step']:.3f}; "
        f"target pass over K+1 tokens for K = 0, 1, ... (target steps): {verify}; "
        f"target step = {cost['target_step_s'] * 1e3:.2f} ms.",
        "bound: tokens / cost of the method's own model passes (Leviathan's bound with the acceptance each "
        "round had); machinery, round ms and the phases (share of round time): from a profiled run "
        "that synchronises after each phase. Proposers: d = draft model, n = prompt lookup, - = plain "
        "target step; rounds (accepted/drafted).",
        f"Greedy output identical to the target alone: {report['identical_greedy']}. "
        f"{report['prompts']} prompts x {report['max_tokens']} tokens."
        + (f" Each prompt timed {report['repeats']} times per method, the fastest counted." if report.get("repeats", 1) > 1 else ""),
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, load average {env.get('load_average')}, "
        f"BLAS: {env['blas']}; versions: {json.dumps(env['versions'])}.",
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
    panels = sorted({(r["prompt_set"], r["temperature"]) for r in report["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (s, t) in zip(axes[0], panels):
        rows = [r for r in report["rows"] if r["temperature"] == t and r["prompt_set"] == s]
        labels = [f"{r['method']}\nK={r['k']}" for r in rows]
        ax.bar(range(len(rows)), [r["ratio_target"] for r in rows], color=[_color(r["method"]) for r in rows])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed vs target alone")
        ax.set_title(f"{s + ', ' if s else ''}T = {t:g}")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def _color(method: str) -> str:
    return {TARGET: "grey", MLX_LM: "tab:orange"}.get(method, "tab:blue")


def load_prompt_sets(encode: Callable[[str], list[int]], domains: Sequence[str], count: int) -> dict[str, list[list[int]]]:
    """The shipped held-out prompt sets, encoded."""
    from speclora.zoo import load_prompts

    return {d: [encode(p) for p in load_prompts(d, "eval")[:count]] for d in domains}


__all__ = [
    "BenchRow",
    "environment",
    "format_table",
    "load_prompt_sets",
    "merge_rows",
    "run_benchmark",
    "time_speclora",
    "time_target_alone",
    "write_report",
]
