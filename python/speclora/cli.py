"""The ``speclora`` command: generate, train, stats, adapters, demo, bench, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (preloads OpenBLAS before mlx.core)


def _config(path: str | None) -> dict[str, Any]:
    from speclora.config import Config, load_config

    return load_config(path) if path else Config.from_dict({}).to_dict()


def _system(args: argparse.Namespace) -> Any:
    from speclora.main import SpeculativeDecodingSystem

    system = SpeculativeDecodingSystem(_config(args.config))
    system.initialize()
    return system


def cmd_generate(args: argparse.Namespace) -> int:
    system = _system(args)
    result = system.generate_result(
        args.prompt, mode=args.mode, max_tokens=args.max_tokens, temperature=args.temperature
    )
    print(result.text)
    if args.verbose:
        adapter = system.get_stats()["adapter_path"] or "none (base draft)"
        print(
            f"[{len(result.tokens)} tokens, acceptance {result.acceptance_rate:.1%}, "
            f"{result.mean_accepted_length:.2f} accepted/round, {result.tokens_per_second:.1f} tok/s, "
            f"adapter {adapter}]",
            file=sys.stderr,
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    system = _system(args)
    results = system.train(num_epochs=args.epochs, learning_rate=args.learning_rate)
    summary = {k: v for k, v in results.items() if k not in ("losses", "eval_losses")}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _checkpoint_summaries(checkpoint_dir: str) -> dict[str, dict[str, Any]]:
    from speclora.checkpoint import list_checkpoints

    keys = ("step", "best_loss", "eval_match", "timestamp", "error")
    return {
        alias: {"version": entry["version"], **{k: entry["state"][k] for k in keys if k in entry["state"]}}
        for alias, entry in list_checkpoints(checkpoint_dir).items()
    }


def cmd_stats(args: argparse.Namespace) -> int:
    from speclora.config import Config
    from speclora.data_collector import DataCollector

    cfg = Config.from_dict(_config(args.config))
    c = cfg.collection
    collector = DataCollector(c.data_dir, c.replay_buffer_max_size, c.acceptance_threshold)
    print(
        json.dumps(
            {
                "data_dir": c.data_dir,
                "failure_count": collector.failure_count,
                "replay_buffer_size": collector.replay_buffer_size,
                "checkpoint_dir": cfg.training.checkpoint_dir,
                "checkpoints": _checkpoint_summaries(cfg.training.checkpoint_dir),
            },
            indent=2,
        )
    )
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from speclora.checkpoint import ACTIVE_ALIAS, PREVIOUS_ALIAS, set_active
    from speclora.config import Config

    root = Config.from_dict(_config(args.config)).training.checkpoint_dir
    if args.action == "use":
        print(f"active: {set_active(root, args.adapter)}")
    elif args.action == "rollback":
        if not (Path(root).expanduser() / PREVIOUS_ALIAS).exists():
            raise RuntimeError(f"nothing to roll back to: {root} has no {PREVIOUS_ALIAS} adapter")
        print(f"active: {set_active(root, PREVIOUS_ALIAS)}")
    else:
        summaries = _checkpoint_summaries(root)
        if not summaries:
            print(f"no adapters in {root}")
        for alias, summary in summaries.items():
            marker = "*" if alias == ACTIVE_ALIAS else " "
            figures = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "version")
            print(f"{marker} {alias:<9} {summary['version']}  {figures}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from speclora.demo import DemoOptions, run_demo

    options = DemoOptions(
        workdir=Path(args.workdir),
        rounds=args.rounds,
        train_prompts_per_round=args.train_prompts,
        eval_prompts=args.eval_prompts,
        max_tokens=args.max_tokens,
        acceptance_threshold=args.threshold,
        num_epochs=args.epochs,
        learning_rate=args.learning_rate,
        rank=args.rank,
        show_progress=not args.no_progress,
    )
    run_demo(_config(args.config) if args.config else None, options)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from speclora.bench import format_table, load_prompt_sets, run_benchmark, write_report
    from speclora.models import ModelManager
    from speclora.decoding import vocab_size
    from speclora.tokenizing import encode_prompt

    cfg = _config(args.config)
    manager = ModelManager(cfg)
    target, draft = manager.load_models()
    vocab = vocab_size(target)
    sets = load_prompt_sets(
        lambda p: encode_prompt(manager.tokenizer, p, vocab),
        list(dict.fromkeys(args.domain)),
        args.prompts,
    )
    g = cfg["generation"]
    report = run_benchmark(
        target,
        draft,
        manager.tokenizer,
        sets if len(sets) > 1 else next(iter(sets.values())),
        max_tokens=args.max_tokens,
        temperatures=tuple(args.temperatures),
        ks=tuple(args.ks),
        max_draft_tokens=args.max_draft_tokens or g["max_draft_tokens"],
        ngram_proposer=g["ngram_proposer"],
        draft_only_adaptive=args.draft_only_adaptive,
        profile=not args.no_profile,
        repeats=args.repeats,
    )
    print(format_table(report))
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from speclora.server import serve

    serve(
        _config(args.config),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        queue_size=args.queue_size,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speclora",
        description="Speculative decoding on MLX whose draft model learns from its rejections.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="YAML config file (default: built-in defaults, the shipped model pair)")
        return p

    p = command("generate", "Generate a reply to one prompt.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--mode", choices=["fast", "detailed"], help="detailed also collects failures (default: generation.mode)"
    )
    p.add_argument("--max-tokens", type=int, help="override generation.max_tokens")
    p.add_argument("--temperature", type=float, help="override generation.temperature")
    p.add_argument("-v", "--verbose", action="store_true", help="print acceptance statistics to stderr")
    p.set_defaults(run=cmd_generate)

    p = command(
        "train",
        "Train a LoRA adapter on the collected failures; make it the active one if it is not worse.",
    )
    p.add_argument("--epochs", type=int, help="override training.num_epochs")
    p.add_argument("--learning-rate", type=float, help="override training.learning_rate")
    p.set_defaults(run=cmd_train)

    p = command("stats", "Show collected failures, replay buffer and checkpoints.")
    p.set_defaults(run=cmd_stats)

    p = command("adapters", "List the adapters under training.checkpoint_dir, switch the active one, roll back.")
    # --config is accepted after the action too ("adapters list --config FILE").
    config_too = argparse.ArgumentParser(add_help=False)
    config_too.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file")
    action = p.add_subparsers(dest="action", required=True)
    action.add_parser(
        "list", parents=[config_too], help="every alias with its training figures (eval_match: acceptance)"
    )
    use = action.add_parser(
        "use", parents=[config_too], help="make an alias (best, final, ...) or an adapter directory active"
    )
    use.add_argument("adapter", help="alias or directory")
    action.add_parser("rollback", parents=[config_too], help="make the previous active adapter active again")
    p.set_defaults(run=cmd_adapters)

    p = command("demo", "Online-learning demo on the shipped model pair (acceptance on code rises).")
    p.add_argument("--workdir", default="speclora-demo", help="where data, checkpoints and the report go")
    p.add_argument("--rounds", type=int, default=3, help="collect/train rounds (default: 3)")
    p.add_argument("--train-prompts", type=int, default=96, help="code prompts generated per round (default: 96)")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per domain (default: 32)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per generation (default: 48)")
    p.add_argument("--threshold", type=float, default=0.9, help="collect generations below this acceptance")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per round (default: 3)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA learning rate (default: 1e-3)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_demo)

    p = command("bench", "Side-by-side speed: target alone, mlx-lm speculative, SpecLoRA.")
    p.add_argument(
        "--domain", choices=["prose", "code"], nargs="+", default=["prose"], help="prompt sets (default: prose)"
    )
    p.add_argument("--prompts", type=int, default=16, help="number of held-out prompts (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="default: 0 1")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4], help="fixed draft lengths (default: 2 3 4)")
    p.add_argument(
        "--max-draft-tokens", type=int, help="adaptive drafting's largest K (default: generation.max_draft_tokens)"
    )
    p.add_argument(
        "--draft-only-adaptive", action="store_true", help="also run adaptive drafting with the draft model alone"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the profiled run (no per-round breakdown)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per prompt and method, the fastest counted (default: 1)"
    )
    p.add_argument("--out", default="benchmarks/results", help="report directory (default: benchmarks/results)")
    p.set_defaults(run=cmd_bench)

    p = command("serve", "OpenAI-compatible HTTP server whose draft learns from the requests it serves.")
    p.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port, 0 for any free one (default: serve.port, 8080)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: serve.api_key)")
    p.add_argument("--queue-size", type=int, help="requests that may wait; more get 429 (default: serve.queue_size, 16)")
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, RuntimeError, MemoryError, OSError) as e:
        print(f"speclora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
