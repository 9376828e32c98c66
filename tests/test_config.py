"""Validation, defaults and path resolution of ``speclora.config``."""

from __future__ import annotations

import math
import os
import re
from dataclasses import fields
from pathlib import Path

import pytest
from speclora.config import (
    CollectionConfig,
    Config,
    GenerationConfig,
    LoggingConfig,
    ModelsConfig,
    TrainingConfig,
    load_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "configs" / "config.yaml"
SECTIONS = {
    "models": ModelsConfig,
    "generation": GenerationConfig,
    "collection": CollectionConfig,
    "training": TrainingConfig,
    "logging": LoggingConfig,
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
        ValueError, match=re.escape("training.rank must be an integer >= 1, got -3")
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
        match=re.escape("training.rank must be an integer >= 1, got True (bool)"),
    ):
        Config.from_dict({"training": {"rank": True}})


def test_exponent_without_dot_gets_a_hint() -> None:
    with pytest.raises(ValueError, match="write 1.0e-4"):
        Config.from_dict({"training": {"learning_rate": "1e-4"}})


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
        ValueError, match=re.escape("training.rank must be an integer >= 1, got 0")
    ):
        TrainingConfig.from_dict({"rank": 0})


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="generation.top_k"):
        GenerationConfig(top_k=-5)


@pytest.mark.parametrize("section", list(SECTIONS.values()))
def test_every_field_has_help(section: type) -> None:
    for f in fields(section):
        assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"


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
    assert "training.rank must be an integer >= 1, got -3" in str(info.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("# nothing set\n")
    assert load_config(config_file) == Config.from_dict({}).to_dict()
