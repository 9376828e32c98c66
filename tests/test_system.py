"""The API reference's examples, run on tiny in-code models (src. -> speclora.)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import mlx.core as mx
import mlx_lm
import pytest
import yaml
from mlx_lm.generate import generate_step

from speclora import SpeculativeDecodingSystem
from speclora.data_collector import DataCollector, TrainingExample
from speclora.speculative_manual import ManualSpeculativeDecoder

# Each of these has at least one rejection on the tiny pair (acceptance < 1), so a
# detailed generation of any of them is collected as a failure.
PROMPTS = [
    "What is Python?",
    "What is JavaScript?",
    "What is Rust?",
    "Explain MLX.",
    "def f(x):",
    "Hello",
]
# The base draft accepts 8 of 11 drafts on the first, under 0.6 on the other two.
MIXED_PROMPTS = ["What is Python?", "def f(x):", "Hello"]


@pytest.fixture
def config(tiny_model_dir, tmp_path) -> dict:
    return {
        "models": {
            "target": str(tiny_model_dir.target),
            "draft": str(tiny_model_dir.draft),
        },
        "generation": {
            "max_tokens": 12,
            "temperature": 0.0,
            "num_draft_tokens": 3,
            "adaptive_draft": False,
        },
        # Random tiny models disagree a lot; collect every detailed generation.
        "collection": {
            "data_dir": str(tmp_path / "failures"),
            "acceptance_threshold": 1.0,
        },
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


def target_tokens(
    system: SpeculativeDecodingSystem, prompt: str, max_tokens: int
) -> list[int]:
    """mlx-lm's greedy tokens of the target alone, cut before the first EOS."""
    tokens = system.decoder.encode_prompt(prompt)
    target = system.decoder.target_model
    out = [
        int(t)
        for t, _ in generate_step(
            mx.array(tokens, mx.uint32), target, max_tokens=max_tokens
        )
    ]
    eos = system.decoder.tokenizer.eos_token_ids
    for i, t in enumerate(out):
        if t in eos:
            return out[:i]
    return out


def target_alone(
    system: SpeculativeDecodingSystem, prompt: str, max_tokens: int
) -> str:
    return system.decoder.tokenizer.decode(target_tokens(system, prompt, max_tokens))


@dataclass
class GreedyRound:
    position: int  # index in the output of the round's first token
    proposal: list[int]  # the draft's greedy continuation
    accepted: int  # how many of them equal the target's tokens


def greedy_rounds(
    draft, context: list[int], output: list[int], k: int
) -> list[GreedyRound]:
    """Greedy speculative rounds from first principles, with mlx-lm's generator.

    Each round the draft continues what has been said so far by ``min(k, left - 1)``
    greedy tokens; the longest prefix equal to the target's own tokens ``output`` is
    accepted and the target supplies the next token. Assumes no stop token in ``output``.
    """
    rounds, i = [], 0
    while i < len(output):
        n = min(k, len(output) - i - 1)
        prompt = mx.array(context + output[:i], mx.uint32)
        proposal = (
            [int(t) for t, _ in generate_step(prompt, draft, max_tokens=n)] if n else []
        )
        accepted = 0
        while accepted < n and proposal[accepted] == output[i + accepted]:
            accepted += 1
        rounds.append(GreedyRound(i, proposal, accepted))
        i += accepted + 1
    return rounds


def expected_disagreements(
    rounds: list[GreedyRound], output: list[int]
) -> list[tuple[int, int, int]]:
    """``(position, draft_token, target_token)`` of each rejected draft token."""
    return [
        (
            r.position + r.accepted,
            r.proposal[r.accepted],
            output[r.position + r.accepted],
        )
        for r in rounds
        if r.accepted < len(r.proposal)
    ]


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


def test_modes_agree_and_only_detailed_collects(system, tiny_model_dir):
    fast = system.generate("Tell me more", mode="fast")
    assert system.get_stats()["failure_count"] == 0
    detailed = system.generate("Tell me more", mode="detailed", max_tokens=12)
    assert fast == detailed == target_alone(system, "Tell me more", 12)
    stats = system.get_stats()
    assert stats["generation_count"] == 2
    assert stats["failure_count"] == 1
    failure = system.collector.load_failures()[0]
    result = system.last_result
    output = target_tokens(system, "Tell me more", 12)
    assert len(output) == 12, "the reference rounds assume no EOS"
    assert failure.target_output == detailed and failure.prompt == "Tell me more"
    assert (
        failure.prompt_tokens
        == result.prompt_tokens
        == system.decoder.encode_prompt("Tell me more")
    )
    assert failure.acceptance_rate == result.acceptance_rate < 1.0
    # One disagreement per rejected draft token, where greedy rounds reject one.
    draft, _ = mlx_lm.load(str(tiny_model_dir.draft))
    rounds = greedy_rounds(draft, result.prompt_tokens, output, 3)
    expected = expected_disagreements(rounds, output)
    assert expected, "this prompt is chosen for its rejections on the tiny pair"
    assert [
        (d.position, d.draft_token, d.target_token) for d in failure.disagreements
    ] == expected
    assert failure.acceptance_rate == sum(r.accepted for r in rounds) / sum(
        len(r.proposal) for r in rounds
    )


def test_stats_have_the_documented_keys(system):
    system.generate("What is Python?")
    stats = system.get_stats()
    assert {
        "generation_count",
        "tracker",
        "failure_count",
        "replay_buffer_size",
        "adapter_loaded",
        "adapter_path",
    } <= set(stats)
    assert set(stats["tracker"]) == {
        "recent_average",
        "overall_average",
        "total_samples",
    }
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
    assert stats["adapter_loaded"] and stats["adapter_path"] == str(
        Path(results["checkpoint_path"]).resolve()
    )
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
    # Missing, however it is named: False, and the loaded adapter stays.
    info = system.get_adapter_info()
    for missing in (
        "no-such-adapter",
        "previous",
        str(Path(info["path"]).parent / "nothing"),
    ):
        assert system.load_adapter(missing) is False
        assert system.get_adapter_info() == info


def test_ab_testing_base_vs_trained(system, tiny_model_dir):
    """The API reference's A/B recipe: both variants say exactly what the target says,
    and each reports the acceptance of its own draft (base, or mlx-lm loading the
    trained adapter), rebuilt from first principles."""
    for p in PROMPTS:
        system.generate(p, mode="detailed")
    trained = system.train(num_epochs=2, learning_rate=5e-3)
    drafts = {
        "base": mlx_lm.load(str(tiny_model_dir.draft))[0],
        "trained": mlx_lm.load(
            str(tiny_model_dir.draft), adapter_path=trained["checkpoint_path"]
        )[0],
    }
    # Serve the candidate whether or not train() promoted it, so that both
    # variants below start with a swap.
    assert system.load_adapter("best") is True
    rates: dict[str, list[float]] = {}
    for variant, draft in drafts.items():
        system.unload_adapter() if variant == "base" else system.load_adapter("best")
        rates[variant] = []
        for prompt in MIXED_PROMPTS:
            output = target_tokens(system, prompt, 12)
            assert len(output) == 12, "the reference rounds assume no EOS"
            assert system.generate(
                prompt, mode="fast"
            ) == system.decoder.tokenizer.decode(output)
            result = system.last_result
            assert result.tokens == output
            rounds = greedy_rounds(draft, result.prompt_tokens, output, 3)
            assert result.num_draft_tokens == sum(len(r.proposal) for r in rounds)
            assert result.num_accepted_tokens == sum(r.accepted for r in rounds)
            rates[variant].append(result.acceptance_rate)
            # The adapter swap resets the "recent" window, so each variant reports its own rates.
            recent = system.get_stats()["tracker"]["recent_average"]
            assert recent == pytest.approx(sum(rates[variant]) / len(rates[variant]))
    # Trained on these prompts' failures, the draft agrees with the target more often.
    assert sum(rates["trained"]) > sum(rates["base"]), rates
    assert system.get_stats()["tracker"]["total_samples"] == 6 + 6


def test_custom_data_collection(system, tmp_path, tiny_model_dir):
    """The API reference's custom collection recipe collects the generations its rule
    selects, each stored with the fields of the generation it came from."""
    decoder = system.decoder
    assert isinstance(decoder, ManualSpeculativeDecoder)
    collector = DataCollector(
        str(tmp_path / "custom_failures"), acceptance_threshold=0.6
    )
    results = {}
    for i, prompt in enumerate(MIXED_PROMPTS):
        result = decoder.generate(prompt, max_tokens=12)
        if result.acceptance_rate < 0.6 or len(result.disagreements) > 10:
            results[f"custom_{i}"] = (prompt, result)
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
    # The rule selects the two prompts with acceptance under 0.6, not the first.
    assert sorted(results) == ["custom_1", "custom_2"]
    loaded = {e.id: e for e in collector.load_failures()}
    assert sorted(loaded) == sorted(results) and collector.failure_count == len(results)
    draft, _ = mlx_lm.load(str(tiny_model_dir.draft))
    for example_id, (prompt, result) in results.items():
        example = loaded[example_id]
        output = target_tokens(system, prompt, 12)
        assert len(output) == 12, "the reference rounds assume no EOS"
        assert (
            example.prompt == prompt
            and example.target_output == decoder.tokenizer.decode(output)
        )
        assert example.prompt_tokens == decoder.tokenizer.encode(prompt)
        assert example.acceptance_rate == result.acceptance_rate < 0.6
        rounds = greedy_rounds(draft, decoder.encode_prompt(prompt), output, 3)
        assert [
            (d.position, d.draft_token, d.target_token) for d in example.disagreements
        ] == (expected_disagreements(rounds, output))
        for d in example.disagreements:
            # Greedy: the target's token is its most likely one, first in the top-k.
            assert d.top_k_tokens[0] == d.target_token and len(d.top_k_tokens) == 20
            assert d.top_k_logprobs == sorted(d.top_k_logprobs, reverse=True)


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
