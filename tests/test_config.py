"""Validation, defaults and path resolution of ``speclora.config``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
import yaml
from helpers import TinyModelDirs, synthetic_example, tiny_system_config
from speclora.config import (
    CollectionConfig,
    Config,
    GenerationConfig,
    LoggingConfig,
    ModelsConfig,
    ServeConfig,
    TrainingConfig,
    load_config,
)
from speclora.records import Disagreement

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "configs" / "config.yaml"
SECTIONS = {
    "models": ModelsConfig,
    "generation": GenerationConfig,
    "collection": CollectionConfig,
    "training": TrainingConfig,
    "logging": LoggingConfig,
    "serve": ServeConfig,
}

# (dotted key, bad value): each must be refused with the key and the value named.
BAD_VALUES = [
    ("models.target", ""),
    ("models.target", 3),
    ("models.draft", None),
    ("models.draft_adapter", ["best"]),
    ("generation.mode", "slow"),
    ("generation.max_tokens", 0),
    ("generation.max_tokens", 1.5),
    ("generation.max_tokens", True),
    ("generation.temperature", -0.1),
    ("generation.temperature", math.inf),
    ("generation.temperature", math.nan),
    ("generation.temperature", "hot"),
    ("generation.temperature", 0.005),
    ("generation.top_p", 0.0),
    ("generation.top_p", 1.01),
    ("generation.top_k", -1),
    ("generation.min_p", 1.0),
    ("generation.num_draft_tokens", 0),
    ("generation.num_draft_tokens", 33),
    ("generation.adaptive_draft", "yes"),
    ("generation.adaptive_draft", 1),
    ("generation.max_draft_tokens", 33),
    ("generation.use_chat_template", None),
    ("generation.stop_tokens", "###"),
    ("generation.stop_tokens", ["ok", ""]),
    ("generation.stop_tokens", [1]),
    ("generation.max_kv_size", 15),
    ("generation.seed", -1),
    ("generation.seed", False),
    ("generation.memory_limit_gb", 0),
    ("collection.data_dir", None),
    ("collection.acceptance_threshold", 1.5),
    ("collection.replay_buffer_max_size", -1),
    ("collection.top_k_logprobs", 0),
    ("collection.top_k_logprobs", 257),
    ("collection.tracker_window", 0),
    ("training.rank", -3),
    ("training.rank", 0),
    ("training.rank", True),
    ("training.rank", 8.0),
    ("training.alpha", 0),
    ("training.dropout", 1.0),
    ("training.target_modules", []),
    ("training.target_modules", "q_proj"),
    ("training.num_layers", 0),
    ("training.num_layers", -2),
    ("training.learning_rate", 0.0),
    ("training.learning_rate", "1e-4"),
    ("training.num_epochs", 0),
    ("training.batch_size", 0),
    ("training.min_examples", 0),
    ("training.max_seq_length", 7),
    ("training.distill_weight", -0.5),
    ("training.distill_temperature", 0.0),
    ("training.distill_temperature", 0.005),
    ("training.replay_ratio", 1.5),
    ("training.eval_fraction", 0.6),
    ("training.checkpoint_dir", ""),
    ("training.seed", -1),
    ("training.grad_clip", 0.0),
    ("logging.level", "LOUD"),
    ("logging.show_progress", "true"),
]


def _nested(dotted: str, value: object) -> dict:
    section, key = dotted.split(".")
    return {section: {key: value}}


@pytest.mark.parametrize(
    "dotted, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES]
)
def test_bad_value_is_refused_naming_key_and_value(dotted: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict(_nested(dotted, value))
    message = str(info.value)
    assert dotted in message
    assert repr(value) in message


def test_message_states_what_is_allowed() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("training.rank must be an integer in [1, 4096], got -3"),
    ):
        Config.from_dict({"training": {"rank": -3}})
    with pytest.raises(
        ValueError,
        match=re.escape("generation.top_p must be a finite number in (0, 1], got 0"),
    ):
        Config.from_dict({"generation": {"top_p": 0}})


def test_bool_is_not_an_integer() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "training.rank must be an integer in [1, 4096], got True (bool)"
        ),
    ):
        Config.from_dict({"training": {"rank": True}})


def test_unknown_key_lists_allowed_keys_and_suggests() -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict({"generation": {"temprature": 0.7}})
    message = str(info.value)
    assert "unknown key 'generation.temprature'" in message
    assert "allowed: mode, max_tokens, temperature" in message
    assert "did you mean 'temperature'" in message


def test_unknown_section_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown section 'genration'"):
        Config.from_dict({"genration": {}})


@pytest.mark.parametrize("bad", [["models"], "models: {}", 3])
def test_config_must_be_a_mapping(bad: object) -> None:
    with pytest.raises(ValueError, match="config must be a mapping"):
        Config.from_dict(bad)  # type: ignore[arg-type]


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="training must be a mapping"):
        Config.from_dict({"training": [1, 2]})


def test_max_draft_tokens_below_num_draft_tokens_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match="generation.max_draft_tokens must be >= generation.num_draft_tokens",
    ):
        Config.from_dict({"generation": {"num_draft_tokens": 6, "max_draft_tokens": 5}})


def test_max_draft_tokens_follows_a_larger_num_draft_tokens() -> None:
    generation = GenerationConfig.from_dict({"num_draft_tokens": 12})
    assert generation.max_draft_tokens == 12


def test_defaults_match_the_interface() -> None:
    d = Config.from_dict({}).to_dict()
    assert d["models"] == {
        "target": "zoo:target",
        "draft": "zoo:draft",
        "draft_adapter": None,
        "dtype": "auto",
        "quantize_bits": None,
        "quantize_group_size": 64,
    }
    assert (
        d["generation"]["num_draft_tokens"] == 4
        and d["generation"]["max_draft_tokens"] == 8
    )
    assert d["training"]["target_modules"] == ["q_proj", "v_proj"]
    assert d["training"]["alpha"] == 16 and d["training"]["rank"] == 8
    assert d["collection"]["data_dir"] == os.path.expanduser(
        "~/.cache/speclora/failures"
    )


def test_defaults_round_trip() -> None:
    first = Config.from_dict({}).to_dict()
    assert Config.from_dict(first).to_dict() == first
    assert Config.from_dict(None).to_dict() == first
    assert Config.from_dict({name: None for name in SECTIONS}).to_dict() == first


def test_values_round_trip_and_normalize() -> None:
    given = {
        "training": {"alpha": 32, "target_modules": ("q_proj",)},
        "logging": {"level": "debug"},
    }
    config = Config.from_dict(given)
    assert config.training.alpha == 32.0 and isinstance(config.training.alpha, float)
    assert config.training.target_modules == ["q_proj"]
    assert config.logging.level == "DEBUG"
    assert Config.from_dict(config.to_dict()) == config


def test_to_dict_copies_lists() -> None:
    config = Config.from_dict({})
    config.to_dict()["training"]["target_modules"].append("k_proj")
    assert config.training.target_modules == ["q_proj", "v_proj"]


def test_section_from_dict_names_the_section() -> None:
    assert TrainingConfig.from_dict({"rank": 4}).rank == 4
    with pytest.raises(
        ValueError,
        match=re.escape("training.rank must be an integer in [1, 4096], got 0"),
    ):
        TrainingConfig.from_dict({"rank": 0})


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="generation.top_k"):
        GenerationConfig(top_k=-5)


@pytest.mark.parametrize("section", list(SECTIONS.values()))
def test_every_field_has_help(section: type) -> None:
    for f in fields(section):
        assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("section", list(SECTIONS.values()))
def test_help_is_the_pydantic_description(section: Any) -> None:
    for f in fields(section):
        assert section.__pydantic_fields__[f.name].description == f.metadata["help"]


def test_relative_paths_resolve_against_config_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    config_file = tmp_path / "conf" / "c.yaml"
    config_file.parent.mkdir()
    config_file.write_text(
        "models:\n"
        "  target: ../models/mine\n"
        "  draft: org/some-draft\n"
        "  draft_adapter: ckpt/step_10\n"
        "collection:\n"
        "  data_dir: data/failures\n"
        "training:\n"
        "  checkpoint_dir: ~/ckpt\n"
    )
    d = load_config(config_file)
    assert d["models"]["target"] == str(tmp_path / "models" / "mine")
    assert d["models"]["draft"] == "org/some-draft"  # a hub id stays a hub id
    assert d["models"]["draft_adapter"] == str(tmp_path / "conf" / "ckpt" / "step_10")
    assert d["collection"]["data_dir"] == str(tmp_path / "conf" / "data" / "failures")
    assert d["training"]["checkpoint_dir"] == os.path.join(
        os.path.expanduser("~"), "ckpt"
    )


def test_existing_relative_model_dir_resolves_but_zoo_and_aliases_stay(
    tmp_path: Path,
) -> None:
    (tmp_path / "local").mkdir()
    models = ModelsConfig.from_dict(
        {"target": "local", "draft": "zoo:draft", "draft_adapter": "best"},
        base_dir=tmp_path,
    )
    assert models.target == str(tmp_path / "local")
    assert models.draft == "zoo:draft"
    assert models.draft_adapter == "best"


def test_paths_resolve_against_cwd_without_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.from_dict({"collection": {"data_dir": "failures"}})
    assert config.collection.data_dir == str(tmp_path / "failures")


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    assert load_config(SHIPPED_CONFIG) == Config.from_dict({}).to_dict()


def test_shipped_config_documents_every_key() -> None:
    lines = SHIPPED_CONFIG.read_text().splitlines()
    for name, section in SECTIONS.items():
        assert f"{name}:" in lines, f"section {name} missing"
        for f in fields(section):
            key_lines = [
                i for i, line in enumerate(lines) if line.startswith(f"  {f.name}:")
            ]
            assert key_lines, f"{name}.{f.name} missing from {SHIPPED_CONFIG}"
            # The comment block right above the key states its default.
            i = key_lines[0] - 1
            comment = []
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.append(lines[i])
                i -= 1
            assert any("Default:" in line for line in comment), (
                f"{name}.{f.name} has no documented default"
            )


def test_unsafe_yaml_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    config_file = tmp_path / "evil.yaml"
    config_file.write_text(
        f'models: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(ValueError, match=re.escape(str(config_file))):
        load_config(config_file)
    assert not marker.exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        ValueError, match=re.escape(f"config file {missing} does not exist")
    ):
        load_config(missing)


def test_malformed_yaml_is_named(tmp_path: Path) -> None:
    config_file = tmp_path / "broken.yaml"
    config_file.write_text("generation: {max_tokens: [1, 2\n")
    with pytest.raises(ValueError, match=re.escape(str(config_file))):
        load_config(config_file)


def test_validation_error_in_file_names_file_and_key(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("training:\n  rank: -3\n")
    with pytest.raises(ValueError) as info:
        load_config(config_file)
    assert str(config_file) in str(info.value)
    assert "training.rank must be an integer in [1, 4096], got -3" in str(info.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("# nothing set\n")
    assert load_config(config_file) == Config.from_dict({}).to_dict()


# ------------------------------------------------------------- numeric bounds

I32, I64, U64 = 2**31 - 1, 2**63 - 1, 2**64 - 1

# Every numeric key: (upper bound, whether the bound itself is allowed). The
# bounds are what the code each value reaches can hold: MLX's int32 sizes and
# positions, SQLite's int64, mx.random.seed's uint64, float32 arithmetic.
UPPER_BOUNDS: dict[str, tuple[float, bool]] = {
    "serve.port": (65535, True),
    "serve.queue_size": (2**20, True),
    "models.quantize_bits": (8, True),
    "models.quantize_group_size": (128, True),
    "generation.max_tokens": (I32, True),
    "generation.temperature": (100.0, True),
    "generation.top_p": (1.0, True),
    "generation.top_k": (I32, True),
    "generation.min_p": (1.0, False),
    "generation.num_draft_tokens": (32, True),
    "generation.max_draft_tokens": (32, True),
    "generation.max_kv_size": (2**30, True),
    "generation.seed": (U64, True),
    "generation.memory_limit_gb": (2.0**20, True),
    "collection.acceptance_threshold": (1.0, True),
    "collection.replay_buffer_max_size": (I64, True),
    "collection.top_k_logprobs": (256, True),
    "collection.tracker_window": (I32, True),
    "training.rank": (4096, True),
    "training.alpha": (1.0e4, True),
    "training.dropout": (1.0, False),
    "training.num_layers": (I32, True),
    "training.learning_rate": (1.0, True),
    "training.num_epochs": (I32, True),
    "training.batch_size": (I32, True),
    "training.min_examples": (I32, True),
    "training.max_seq_length": (I32, True),
    "training.distill_weight": (1000.0, True),
    "training.distill_temperature": (100.0, True),
    "training.replay_ratio": (1.0, True),
    "training.eval_fraction": (0.5, True),
    "training.seed": (U64, True),
    "training.grad_clip": (1.0e6, True),
}
# Logits are multiplied by 1 / temperature in float32: tiny temperatures give inf, NaN.
SMALLEST_TEMPERATURE = 0.01


def _largest(dotted: str) -> float:
    bound, included = UPPER_BOUNDS[dotted]
    return bound if included else math.nextafter(bound, -math.inf)


def _one_past(dotted: str) -> float:
    bound, included = UPPER_BOUNDS[dotted]
    if isinstance(bound, int):
        return bound + 1
    return math.nextafter(bound, math.inf) if included else bound


def _bound_text(dotted: str) -> str:
    bound, included = UPPER_BOUNDS[dotted]
    shown = str(int(bound)) if float(bound).is_integer() else repr(bound)
    return shown + ("]" if included else ")")


def _get(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def test_every_numeric_key_has_an_upper_bound() -> None:
    numeric = {
        f"{name}.{f.name}"
        for name, section in SECTIONS.items()
        for f in fields(section)
        if str(f.type).split(" |")[0] in ("int", "float")
    }
    assert numeric == set(UPPER_BOUNDS)


@pytest.mark.parametrize("dotted", list(UPPER_BOUNDS))
def test_one_past_the_upper_bound_is_refused_naming_key_and_range(
    dotted: str,
) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict(_nested(dotted, _one_past(dotted)))
    message = str(info.value)
    assert message.startswith(f"{dotted} must be ")
    assert _bound_text(dotted) in message


@pytest.mark.parametrize("dotted", list(UPPER_BOUNDS))
def test_largest_value_loads_from_yaml_unchanged(dotted: str, tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(_nested(dotted, _largest(dotted))))
    section, key = dotted.split(".")
    assert load_config(config_file)[section][key] == _largest(dotted)


def test_positive_temperatures_below_the_smallest_are_refused() -> None:
    below = math.nextafter(SMALLEST_TEMPERATURE, 0.0)
    for dotted in ("generation.temperature", "training.distill_temperature"):
        smallest = Config.from_dict(_nested(dotted, SMALLEST_TEMPERATURE))
        assert _get(smallest, dotted) == SMALLEST_TEMPERATURE
        with pytest.raises(ValueError, match=re.escape(f"{dotted} must be ")) as info:
            Config.from_dict(_nested(dotted, below))
        assert f"[{SMALLEST_TEMPERATURE}, 100]" in str(info.value)
    # Greedy decoding stays available.
    greedy = Config.from_dict(_nested("generation.temperature", 0))
    assert greedy.generation.temperature == 0


def test_integer_too_large_for_a_float_is_a_value_error() -> None:
    # float(10**400) raises OverflowError, which must not escape validation.
    with pytest.raises(ValueError, match=re.escape("generation.temperature must be")):
        Config.from_dict({"generation": {"temperature": 10**400}})


@pytest.fixture
def memory_limit() -> Iterator[None]:
    """Restore MLX's memory limit, which ``initialize`` sets process-wide."""
    before = mx.get_memory_limit()
    yield
    mx.set_memory_limit(before)


def _system(models: TinyModelDirs, root: Path, dotted: str, value: object) -> Any:
    from speclora.main import SpeculativeDecodingSystem

    config: dict[str, Any] = tiny_system_config(models, root)
    section, key = dotted.split(".")
    config[section] = {**config[section], key: value}
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    return system


GENERATION_CASES = [
    (k, _largest(k)) for k in UPPER_BOUNDS if k.startswith("generation.")
] + [("generation.temperature", SMALLEST_TEMPERATURE)]


@pytest.mark.parametrize(
    "dotted, value", GENERATION_CASES, ids=[f"{k}={v!r}" for k, v in GENERATION_CASES]
)
def test_extreme_generation_values_decode(
    tiny_model_dir: TinyModelDirs,
    tmp_path: Path,
    memory_limit: None,
    dotted: str,
    value: float,
) -> None:
    system = _system(tiny_model_dir, tmp_path, dotted, value)
    if dotted == "generation.memory_limit_gb":
        assert mx.get_memory_limit() == int(value * 2**30)
    for mode in ("fast", "detailed"):
        result = system.generate_result("hello", mode=mode, max_tokens=6)
        assert 1 <= len(result.tokens) <= 6
        assert all(math.isfinite(d.draft_confidence) for d in result.disagreements)
    if dotted == "generation.max_tokens":
        # The documented refusal of a request past the context, not an overflow.
        with pytest.raises(MemoryError, match="context window"):
            system.generate("hello")


@pytest.mark.parametrize(
    "dotted", [k for k in UPPER_BOUNDS if k.startswith("collection.")]
)
def test_largest_collection_values_collect_train_and_report(
    tiny_model_dir: TinyModelDirs, tmp_path: Path, dotted: str
) -> None:
    from speclora.cli import main as cli_main

    system = _system(tiny_model_dir, tmp_path, dotted, _largest(dotted))
    for prompt in ("hello", "world"):
        system.generate(prompt, mode="detailed")
    assert system.collector.failure_count == 2
    system.train()
    stats = system.get_stats()
    assert stats["failure_count"] == 0
    assert stats["replay_buffer_size"] == 2
    assert stats["tracker"]["total_samples"] == 2
    assert len(system.collector.load_replay_buffer()) == 2
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(system.config.to_dict()))
    assert cli_main(["stats", "--config", str(config_file)]) == 0


class _Stop(BaseException):
    """Ends a training run after its first step."""


def _examples(n: int) -> list[Any]:
    examples = []
    for i in range(n):
        example = synthetic_example(f"ex-{i}", seed=i)
        # Disagreements exercise the distillation term (weight and temperature).
        example.disagreements = [
            Disagreement(
                position=p,
                draft_token=5,
                target_token=6,
                draft_confidence=0.5,
                target_confidence=0.5,
                top_k_tokens=[6, 7, 8, 9],
                top_k_logprobs=[-0.1, -3.0, -5.0, -9.0],
            )
            for p in (1, 4, 7)
        ]
        examples.append(example)
    return examples


TRAINING_CASES = [
    (k, _largest(k)) for k in UPPER_BOUNDS if k.startswith("training.")
] + [("training.distill_temperature", SMALLEST_TEMPERATURE)]


@pytest.mark.parametrize(
    "dotted, value", TRAINING_CASES, ids=[f"{k}={v!r}" for k, v in TRAINING_CASES]
)
def test_extreme_training_values_train(
    tiny_model_dir: TinyModelDirs, tmp_path: Path, dotted: str, value: float
) -> None:
    from mlx_lm import load
    from speclora.training import LoRATrainer

    key = dotted.split(".")[1]
    overrides: dict[str, Any] = {key: value}
    if key == "alpha":
        overrides["rank"] = 1  # the largest LoRA scale, alpha / rank
    config = tiny_system_config(tiny_model_dir, tmp_path, **overrides)["training"]
    model, tokenizer = load(str(tiny_model_dir.draft))
    if key == "num_layers":
        # The documented refusal of more layers than the model has.
        with pytest.raises(ValueError, match=re.escape(f"training.num_layers={value}")):
            LoRATrainer(model, tokenizer, config)
        return
    trainer = LoRATrainer(model, tokenizer, config)
    examples, replay = _examples(4), _examples(6)[4:]
    if key == "min_examples":
        with pytest.raises(ValueError, match="training.min_examples"):
            trainer.train(examples, replay)
        return
    if key == "num_epochs":
        steps: list[float] = []

        def stop(step: int, loss: float) -> None:
            steps.append(loss)
            raise _Stop

        with pytest.raises(_Stop):
            trainer.train(examples, replay, on_step=stop)
        assert len(steps) == 1 and math.isfinite(steps[0])
        return
    results = trainer.train(examples, replay)
    assert results["global_step"] >= 1
    assert all(math.isfinite(loss) for loss in results["losses"])
    assert math.isfinite(results["final_loss"])


# ---------------------------------------------------------------- YAML hints


@pytest.mark.parametrize(
    "text", ["1e-4", "1e300", "1.0e300", "1E5", "-.5e3", "2.5e-3", "0.5", "-.5"]
)
def test_hint_for_a_number_read_as_a_string_parses_as_that_number(text: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict({"training": {"learning_rate": text}})
    found = re.search(r"(?:write|as in) (\S+?)(?: without quotes)?\)$", str(info.value))
    assert found, str(info.value)
    value = yaml.safe_load(f"learning_rate: {found.group(1)}")["learning_rate"]
    assert isinstance(value, float) and value == float(text)


@pytest.mark.parametrize("text", ["128", "1e3", " 7 "])
def test_hint_for_an_integer_read_as_a_string_parses_as_that_integer(
    text: str,
) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict({"generation": {"max_tokens": text}})
    found = re.search(r"write (\S+?)(?: without quotes)?\)$", str(info.value))
    assert found, str(info.value)
    value = yaml.safe_load(f"max_tokens: {found.group(1)}")["max_tokens"]
    assert type(value) is int and value == float(text)


@pytest.mark.parametrize("text", ["nan", "inf", "abc", "1.5e", "1" + "0" * 400])
def test_no_hint_for_what_is_no_finite_number(text: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_dict({"training": {"learning_rate": text}})
    assert "write" not in str(info.value)


def test_shipped_config_states_every_numeric_range() -> None:
    lines = SHIPPED_CONFIG.read_text().splitlines()
    for dotted in UPPER_BOUNDS:
        key = dotted.split(".")[1]
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  {key}:"))
        comment = []
        while lines[i - 1].strip().startswith("#"):
            i -= 1
            comment.append(lines[i])
        assert _bound_text(dotted) in " ".join(comment), dotted
