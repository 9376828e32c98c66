"""The API reference's examples, run on tiny in-code models (src. -> speclora.)."""

from __future__ import annotations

import math
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import mlx.core as mx
import pytest
import yaml
from mlx_lm.generate import generate_step

from speclora import SpeculativeDecodingSystem
from speclora.data_collector import DataCollector, TrainingExample
from speclora.speculative_manual import ManualSpeculativeDecoder

# Each of these has at least one rejection on the tiny pair (acceptance < 1), so a
# detailed generation of any of them is collected as a failure.
PROMPTS = ["What is Python?", "What is JavaScript?", "What is Rust?", "Explain MLX.", "def f(x):", "Hello"]


@pytest.fixture
def config(tiny_model_dir, tmp_path) -> dict:
    return {
        "models": {"target": str(tiny_model_dir.target), "draft": str(tiny_model_dir.draft)},
        "generation": {"max_tokens": 12, "temperature": 0.0, "num_draft_tokens": 3, "adaptive_draft": False},
        # Random tiny models disagree a lot; collect every detailed generation.
        "collection": {"data_dir": str(tmp_path / "failures"), "acceptance_threshold": 1.0},
        "training": {
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "min_examples": 3,
            "num_epochs": 1,
            "batch_size": 2,
            "rank": 4,
            "alpha": 8,
            "learning_rate": 1e-2,
        },
        "logging": {"show_progress": False},
    }


@pytest.fixture
def system(config) -> SpeculativeDecodingSystem:
    s = SpeculativeDecodingSystem(config)
    s.initialize()
    return s


def target_alone(system: SpeculativeDecodingSystem, prompt: str, max_tokens: int) -> str:
    tokens = system.decoder.encode_prompt(prompt)
    target = system.decoder.target_model
    out = [int(t) for t, _ in generate_step(mx.array(tokens, mx.uint32), target, max_tokens=max_tokens)]
    eos = system.decoder.tokenizer.eos_token_ids
    for i, t in enumerate(out):
        if t in eos:
            out = out[:i]
            break
    return system.decoder.tokenizer.decode(out)


def test_quick_start_from_yaml(config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(path) as f:
        loaded = yaml.safe_load(f)
    system = SpeculativeDecodingSystem(loaded)
    system.initialize()
    response = system.generate("What is machine learning?")
    assert isinstance(response, str)
    assert response == target_alone(system, "What is machine learning?", 12)


def test_calls_before_initialize_are_refused(config):
    system = SpeculativeDecodingSystem(config)
    with pytest.raises(RuntimeError, match="initialize"):
        system.generate("hi")
    with pytest.raises(RuntimeError, match="initialize"):
        system.train()


def test_invalid_config_is_a_value_error(config):
    config["training"]["rank"] = -1
    with pytest.raises(ValueError, match="training.rank"):
        SpeculativeDecodingSystem(config)


def test_missing_model_is_a_runtime_error(config, tmp_path):
    config["models"]["draft"] = str(tmp_path / "nowhere")
    system = SpeculativeDecodingSystem(config)
    with pytest.raises(RuntimeError, match="nowhere"):
        system.initialize()


def test_modes_agree_and_only_detailed_collects(system):
    fast = system.generate("Tell me more", mode="fast")
    assert system.get_stats()["failure_count"] == 0
    detailed = system.generate("Tell me more", mode="detailed", max_tokens=12)
    assert fast == detailed
    stats = system.get_stats()
    assert stats["generation_count"] == 2
    assert stats["failure_count"] == 1
    failure = system.collector.load_failures()[0]
    assert failure.target_output == detailed
    result = system.last_result
    # At most one rejection per round, and one whenever a draft token was rejected.
    assert len(failure.disagreements) <= result.num_rounds
    assert (len(failure.disagreements) > 0) == (result.num_accepted_tokens < result.num_draft_tokens)


def test_stats_have_the_documented_keys(system):
    system.generate("What is Python?")
    stats = system.get_stats()
    assert {"generation_count", "tracker", "failure_count", "replay_buffer_size", "adapter_loaded", "adapter_path"} <= set(stats)
    assert set(stats["tracker"]) == {"recent_average", "overall_average", "total_samples"}
    assert stats["tracker"]["total_samples"] == 1
    assert stats["tracker"]["recent_average"] == system.last_result.acceptance_rate
    assert stats["adapter_loaded"] is False and stats["adapter_path"] is None


def test_generation_errors(system):
    with pytest.raises(ValueError, match="mode"):
        system.generate("hi", mode="turbo")
    with pytest.raises(ValueError, match="max_tokens"):
        system.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        system.generate("hi", temperature=math.nan)
    with pytest.raises(ValueError, match="temperature"):
        system.generate("hi", temperature=-0.5)
    with pytest.raises(ValueError, match="string"):
        system.generate(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        system.generate("  ")
    # The tiny target's context window is 512 tokens.
    with pytest.raises(MemoryError, match="context window"):
        system.generate("hi", max_tokens=600)
    assert system.get_stats()["generation_count"] == 0


def test_train_needs_enough_failures(system):
    system.generate("What is Python?", mode="detailed")
    with pytest.raises(ValueError, match=r"1 failures.*min_examples is 3"):
        system.train()


def test_train_hot_swaps_and_consumes_failures(system):
    draft = system.decoder.draft_model
    target = system.decoder.target_model
    probe = mx.array([[0, 70, 71, 72]], mx.uint32)
    draft_before, target_before = draft(probe), target(probe)
    for p in PROMPTS[:4]:
        system.generate(p, mode="detailed")
    results = system.train()
    assert {"final_loss", "best_loss", "global_step", "checkpoint_path"} <= set(results)
    assert results["best_loss"] <= results["final_loss"]
    assert Path(results["checkpoint_path"]).name == "best"
    stats = system.get_stats()
    assert stats["failure_count"] == 0 and stats["replay_buffer_size"] == 4
    assert stats["adapter_loaded"] and stats["adapter_path"] == str(Path(results["checkpoint_path"]).resolve())
    # The draft changed in place; the target did not.
    assert system.decoder.draft_model is draft
    assert not mx.allclose(draft(probe), draft_before).item()
    assert mx.array_equal(target(probe), target_before).item()
    # Still lossless with the adapter.
    assert system.generate("What is Rust?") == target_alone(system, "What is Rust?", 12)


def test_adapter_management(system):
    assert system.load_adapter("best") is False  # nothing trained yet
    for p in PROMPTS[:3]:
        system.generate(p, mode="detailed")
    system.train()
    assert system.unload_adapter() is True
    assert system.unload_adapter() is False
    assert system.get_adapter_info()["loaded"] is False
    assert system.load_adapter("best") is True
    info = system.get_adapter_info()
    assert info["loaded"] and info["rank"] == 4 and info["alpha"] == 8
    assert info["target_modules"] == ["q_proj", "v_proj"]
    assert info["path"].endswith("best")
    for alias in ("final", "latest"):
        assert system.load_adapter(alias) is True
    with pytest.raises(RuntimeError, match="not found"):
        system.load_adapter("no-such-adapter")


def test_ab_testing_base_vs_trained(system):
    for p in PROMPTS:
        system.generate(p, mode="detailed")
    system.train(num_epochs=2, learning_rate=5e-3)
    results = {}
    for variant in ("base", "trained"):
        system.unload_adapter() if variant == "base" else system.load_adapter("best")
        rates = []
        for prompt in PROMPTS[:3]:
            system.generate(prompt, mode="fast")
            rates.append(system.get_stats()["tracker"]["recent_average"])
        results[variant] = sum(rates) / len(rates)
    assert all(0.0 <= v <= 1.0 for v in results.values())
    # The adapter swap resets the "recent" window, so each variant reports its own rates.
    assert system.get_stats()["tracker"]["total_samples"] == 6 + 6


def test_custom_data_collection(system, tmp_path):
    decoder = system.decoder
    assert isinstance(decoder, ManualSpeculativeDecoder)
    collector = DataCollector(str(tmp_path / "custom_failures"), acceptance_threshold=0.6)
    for i, prompt in enumerate(PROMPTS[:3]):
        result = decoder.generate(prompt, max_tokens=12)
        if result.acceptance_rate < 0.6 or len(result.disagreements) > 10:
            collector.add_failure(
                TrainingExample(
                    id=f"custom_{i}",
                    prompt=prompt,
                    target_output=result.text,
                    acceptance_rate=result.acceptance_rate,
                    prompt_tokens=decoder.tokenizer.encode(prompt),
                    disagreements=result.disagreements,
                    timestamp="2024-01-01T00:00:00",
                )
            )
    loaded = collector.load_failures()
    assert len(loaded) == collector.failure_count
    assert all(e.disagreements == [] or e.disagreements[0].top_k_tokens for e in loaded)


def test_continuous_learning_loop_trains_once_per_batch_of_failures(system):
    trainings = 0
    for i in range(7):
        system.generate(PROMPTS[i % len(PROMPTS)], mode="detailed")
        if system.get_stats()["failure_count"] >= 3:
            system.train()
            trainings += 1
    assert trainings == 2
    assert system.get_stats()["failure_count"] == 1


def test_batch_generate(system):
    responses = system.batch_generate(PROMPTS[:3], mode="detailed", show_progress=False)
    assert responses == [target_alone(system, p, 12) for p in PROMPTS[:3]]
    assert system.get_stats()["generation_count"] == 3
    with pytest.raises(ValueError, match="list"):
        system.batch_generate("not a list")  # type: ignore[arg-type]


def test_a_busy_system_refuses_a_second_caller(system):
    # One system serves one request at a time; a second thread gets a clear error.
    with system._exclusive("generate"):
        with pytest.raises(RuntimeError, match="one request at a time"):
            system.generate("hi")
