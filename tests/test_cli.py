"""The ``speclora`` command line on tiny models."""

from __future__ import annotations

import json

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import pytest
import yaml

from speclora.cli import main


@pytest.fixture
def config_file(tiny_model_dir, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {"target": str(tiny_model_dir.target), "draft": str(tiny_model_dir.draft)},
                "generation": {"max_tokens": 8, "adaptive_draft": False},
                "collection": {"data_dir": str(tmp_path / "failures"), "acceptance_threshold": 1.0},
                "training": {"checkpoint_dir": str(tmp_path / "ckpt"), "min_examples": 2, "num_epochs": 1},
                "logging": {"show_progress": False},
            }
        )
    )
    return path


@pytest.mark.parametrize("command", ["generate", "train", "stats", "demo", "bench"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_generate_prints_the_reply(config_file, capsys):
    assert main(["generate", "Hello", "--config", str(config_file), "-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "acceptance" in captured.err


def test_bad_input_is_one_line_and_nonzero(config_file, capsys):
    assert main(["generate", "Hello", "--config", str(config_file), "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_tokens" in err
    assert main(["generate", "Hello", "--config", str(config_file.parent / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_train_without_data_names_the_shortfall(config_file, capsys):
    assert main(["train", "--config", str(config_file)]) == 2
    assert "0 failures" in capsys.readouterr().err


def test_collect_train_and_stats(config_file, capsys):
    for prompt in ("Hello", "What is Python?"):
        assert main(["generate", prompt, "--mode", "detailed", "--config", str(config_file)]) == 0
    capsys.readouterr()
    assert main(["stats", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["failure_count"] == 2
    assert main(["train", "--config", str(config_file)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["checkpoint_path"].endswith("best")
    assert main(["stats", "--config", str(config_file)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["failure_count"] == 0 and stats["replay_buffer_size"] == 2
    assert stats["checkpoints"]["best"]["step"] >= 1
