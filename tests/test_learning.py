"""The learning lifecycle: promotion gate, the persistent active adapter that every
system follows, background and automatic training, and the defaults it honours."""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import mlx_lm
import pytest
from helpers import synthetic_example, tiny_system_config
from mlx_lm.generate import generate_step
from speclora import SpeculativeDecodingSystem
from speclora.checkpoint import ACTIVE_ALIAS, PREVIOUS_ALIAS
from speclora.cli import main as cli
from speclora.learning import TRAINING_LOCK, judge
from speclora.models import ModelManager
from speclora.training import LoRATrainer

PROMPTS = ["What is Python?", "What is JavaScript?", "What is Rust?", "Explain MLX."]


def make_system(config: dict[str, Any]) -> SpeculativeDecodingSystem:
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    return system


# The tiny target's own outputs: learnable, unlike random tokens.
TRAIN_PROMPTS = ["def f(x):", "Hello", "import os", "class A:", "Tell me a story", "for i in range(10):"]


def collect(system: SpeculativeDecodingSystem, n: int, tag: str = "") -> None:
    """``n`` detailed generations (all collected: the threshold is 1.0)."""
    for i in range(n):
        system.generate(f"{tag}{TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)]}", mode="detailed")


def target_alone(system: SpeculativeDecodingSystem, prompt: str, n: int) -> str:
    """mlx-lm's greedy output of the target alone."""
    tokens = mx.array(system.decoder.encode_prompt(prompt), mx.uint32)
    out = [int(t) for t, _ in generate_step(tokens, system.decoder.target_model, max_tokens=n)]
    eos = system.decoder.tokenizer.eos_token_ids
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return system.decoder.tokenizer.decode(out[:cut])


def active(config: dict[str, Any]) -> Path:
    return Path(os.path.realpath(Path(config["training"]["checkpoint_dir"]) / ACTIVE_ALIAS))


@pytest.fixture
def config(tiny_model_dir: Any, tmp_path: Path) -> dict[str, Any]:
    return tiny_system_config(tiny_model_dir, tmp_path, eval_fraction=0.5, num_epochs=2, learning_rate=1e-2)


# ----------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    "before, after, loss_before, loss_after, promoted",
    [
        # 400 held-out tokens at a match of 0.5: the noise is 2 * sqrt(0.25 / 400) = 0.05.
        (0.50, 0.56, 2.0, 2.5, True),  # clearly more tokens: promoted even at a higher loss
        (0.50, 0.54, 2.0, 2.5, False),  # more, within the noise, at a higher loss: not
        (0.50, 0.46, 2.0, 1.9, True),  # fewer within the noise at a lower loss
        (0.50, 0.44, 2.0, 1.5, False),  # clearly fewer: never, whatever the loss
        (0.50, 0.50, 2.0, 2.1, False),
        (None, None, None, 2.0, True),  # nothing held out: said so
    ],
)
def test_judge_promotes_only_a_candidate_that_is_not_worse(before, after, loss_before, loss_after, promoted):
    results = {
        "initial_eval_match": before,
        "best_eval_match": after,
        "initial_eval_loss": loss_before,
        "best_loss": loss_after,
        "eval_tokens": 400,
    }
    decision, why = judge(results)
    assert decision is promoted
    assert why.startswith("promoted" if promoted else "not promoted")
    if before is None:
        assert "without a held-out comparison" in why


def test_a_worse_candidate_is_kept_not_served(config: dict[str, Any]) -> None:
    system = make_system(config)
    collect(system, 6, "good")
    first = system.train()
    assert first["promoted"], first["promotion"]
    serving = active(config)
    assert system.get_stats()["adapter_path"] == str(serving)
    answer = system.generate("What is Rust?")
    # A run that wrecks the draft: the largest learning rate, no clipping.
    system.config.training.grad_clip = None
    collect(system, 6, "bad")
    second = system.train(learning_rate=1.0)
    assert not second["promoted"] and second["promotion"].startswith("not promoted"), second
    assert second["best_eval_match"] < second["initial_eval_match"]
    # Served as before; the candidate is there as "best"; the failures were used.
    assert active(config) == serving
    assert system.get_stats()["adapter_path"] == str(serving)
    assert Path(os.path.realpath(second["checkpoint_path"])) != serving
    assert system.generate("What is Rust?") == answer
    assert system.get_stats()["failure_count"] == 0
    stats = system.get_stats()["training"]
    assert (stats["runs"], stats["promotions"], stats["last"]["promoted"]) == (2, 1, False)


# ------------------------------------------------- the active adapter persists


def test_every_system_follows_the_active_adapter(config: dict[str, Any]) -> None:
    running = make_system(config)  # started before anything was trained
    base_pinned = make_system({**config, "models": {**config["models"], "draft_adapter": "base"}})
    trainer = make_system(config)
    collect(trainer, 6)
    assert trainer.train()["promoted"]
    promoted = str(active(config))
    # A new system serves it from the start; a running one from its next generation.
    assert make_system(config).get_stats()["adapter_path"] == promoted
    assert running.get_stats()["adapter_path"] is None
    for prompt in PROMPTS[:2]:
        assert running.generate(prompt) == target_alone(running, prompt, 8)
    assert running.get_stats()["adapter_path"] == promoted
    base_pinned.generate("Hello")
    assert base_pinned.get_stats()["adapter_path"] is None
    # Loading by hand pins: the system stops following until it trains itself.
    running.unload_adapter()
    running.generate("Hello")
    assert running.get_stats()["adapter_path"] is None


def test_rollback_and_switch_through_the_cli(config: dict[str, Any], tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert cli(["adapters", "rollback", "--config", str(path)]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    system = make_system(config)
    collect(system, 6, "a")
    assert system.train()["promoted"]
    first = active(config)
    collect(system, 6, "b")
    system.train()
    assert cli(["adapters", "use", "final", "--config", str(path)]) == 0
    final = Path(os.path.realpath(Path(config["training"]["checkpoint_dir"]) / "final"))
    assert active(config) == final
    capsys.readouterr()
    assert cli(["adapters", "list", "--config", str(path)]) == 0
    listing = capsys.readouterr().out
    assert f"* active    {final.name}" in listing and "eval_match" in listing
    assert cli(["adapters", "rollback", "--config", str(path)]) == 0
    assert active(config) != final
    assert cli(["adapters", "rollback", "--config", str(path)]) == 0
    assert active(config) == final
    # An adapter from elsewhere is copied in; the source is left as it was.
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (outside / name).write_bytes((first / name).read_bytes())
    assert cli(["adapters", "use", str(outside), "--config", str(path)]) == 0
    assert active(config).parent.name == ".versions" and sorted(p.name for p in outside.iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
    ]
    assert make_system(config).get_stats()["adapter_path"] == str(active(config))


def test_cli_round_trip_serves_the_trained_adapter(config: dict[str, Any], tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    for prompt in PROMPTS:
        assert cli(["generate", prompt, "--mode", "detailed", "--config", str(path)]) == 0
    capsys.readouterr()
    assert cli(["train", "--config", str(path)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["promoted"] is True and trained["promotion"].startswith("promoted")
    assert cli(["generate", "Hello", "-v", "--config", str(path)]) == 0
    assert f"adapter {active(config)}]" in capsys.readouterr().err
    assert cli(["stats", "--config", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["failure_count"] == 0 and stats["replay_buffer_size"] == len(PROMPTS)
    assert stats["checkpoints"][ACTIVE_ALIAS]["version"] == active(config).name
    assert PREVIOUS_ALIAS not in stats["checkpoints"]


# ------------------------------------------------------------- in the background


def test_background_training_while_generating(config: dict[str, Any]) -> None:
    system = make_system(config)
    collect(system, 6)
    pending = system.get_stats()["failure_count"]
    assert system.train(background=True) == {"started": True}
    with pytest.raises(RuntimeError, match="already in progress"):
        system.train(background=True)
    # Generation goes on meanwhile, with the draft it had.
    assert system.generate("What is Rust?") == target_alone(system, "What is Rust?", 8)
    stats = system.wait_for_training(timeout=300)
    assert stats is not None and not stats["running"] and stats["runs"] == 1, stats
    assert stats["last_error"] is None and stats["last"]["failures_consumed"] == pending > 0
    system.generate("Hello")
    expected = str(active(config)) if stats["last"]["promoted"] else None
    assert system.get_stats()["adapter_path"] == expected
    assert system.generate("What is Rust?") == target_alone(system, "What is Rust?", 8)


def test_a_failed_background_run_leaves_serving_untouched(config: dict[str, Any]) -> None:
    system = make_system(config)
    collect(system, 6)
    pending = system.get_stats()["failure_count"]
    root = Path(config["training"]["checkpoint_dir"])
    root.mkdir(parents=True)
    fd = os.open(root / TRAINING_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's run, as far as the child can tell
    try:
        system.train(background=True)
        stats = system.wait_for_training(timeout=300)
    finally:
        os.close(fd)
    assert stats is not None and "another training run is in progress" in stats["last_error"]
    assert system.get_stats()["failure_count"] == pending and system.get_stats()["adapter_path"] is None
    assert not (root / ACTIVE_ALIAS).exists()


def test_automatic_training(config: dict[str, Any]) -> None:
    config["training"].update(auto=True, min_examples=3)
    system = make_system(config)
    for prompt in PROMPTS[:2]:
        system.generate(prompt, mode="detailed")
    assert system.get_stats()["training"]["runs"] == 0 and not system.get_stats()["training"]["running"]
    system.generate(PROMPTS[2], mode="detailed")  # the third failure starts a run
    assert system.get_stats()["training"]["running"] or system.get_stats()["training"]["runs"] == 1
    stats = system.wait_for_training(timeout=300)
    assert stats is not None and stats["runs"] == 1 and stats["last_error"] is None
    assert stats["last"]["failures_consumed"] == 3


# -------------------------------------------------------------- honoured defaults


def test_generation_mode_is_the_default_mode(config: dict[str, Any]) -> None:
    config["generation"]["mode"] = "detailed"
    system = make_system(config)
    system.generate("What is Python?")
    system.batch_generate(["What is Rust?"])
    assert system.get_stats()["failure_count"] == 2
    system.generate("Hello", mode="fast")
    assert system.get_stats()["failure_count"] == 2


@pytest.mark.parametrize("show", [False, True])
def test_batch_generate_follows_logging_show_progress(config: dict[str, Any], capsys, show: bool) -> None:
    config["logging"]["show_progress"] = show
    system = make_system(config)
    capsys.readouterr()
    system.batch_generate(["Hello", "What is Rust?"])
    assert ("generate (fast)" in capsys.readouterr().err) is show


def test_recent_average_says_no_data_after_a_swap(config: dict[str, Any]) -> None:
    system = make_system(config)
    system.generate("Hello")
    assert system.get_stats()["tracker"]["recent_average"] >= 0.0
    collect(system, 6)
    assert system.train()["promoted"]
    tracker = system.get_stats()["tracker"]
    assert math.isnan(tracker["recent_average"]) and tracker["total_samples"] == 7
    assert f"{tracker['recent_average']:.1%}" == "nan%"  # the reference's loop still prints


def test_training_from_a_fused_adapter_saves_what_it_trained(tiny_model_dir: Any, tmp_path: Path) -> None:
    """The reference's recipe: load_lora_adapter(..., fuse=True) into LoRATrainer."""
    config = tiny_system_config(tiny_model_dir, tmp_path)
    first = make_system(config)
    collect(first, 4, "a")
    first.train()
    manager = ModelManager(config)
    _, draft = manager.load_models()
    manager.load_lora_adapter(draft, Path(config["training"]["checkpoint_dir"]) / "best", fuse=True)
    trainer = LoRATrainer(draft, manager.tokenizer, {**config["training"], "checkpoint_dir": str(tmp_path / "again")})
    result = trainer.train([synthetic_example(f"b{i}", 10 + i) for i in range(4)], learning_rate=5e-2)
    probe = mx.array([[1, 5, 9, 13, 17]])
    reloaded, _ = mlx_lm.load(str(tiny_model_dir.draft), adapter_path=result["final_path"])
    difference = mx.abs(reloaded(probe) - draft(probe)).max().item()
    assert difference < 1e-4, difference


@pytest.mark.parametrize("background", [False, True])
def test_bad_overrides_are_named_before_the_data_is_counted(config: dict[str, Any], background: bool) -> None:
    system = make_system(config)  # no failures collected
    with pytest.raises(ValueError, match="num_epochs must be an int >= 1, got 0"):
        system.train(num_epochs=0, background=background)
    with pytest.raises(ValueError, match="learning_rate must be a finite float > 0, got nan"):
        system.train(learning_rate=math.nan, background=background)
    with pytest.raises(ValueError, match="0 failures collected"):
        system.train(background=background)
