"""The ``speclora`` command line on tiny models."""

from __future__ import annotations

import json
import math

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
                "models": {
                    "target": str(tiny_model_dir.target),
                    "draft": str(tiny_model_dir.draft),
                },
                "generation": {"max_tokens": 8, "adaptive_draft": False},
                "collection": {
                    "data_dir": str(tmp_path / "failures"),
                    "acceptance_threshold": 1.0,
                },
                "training": {
                    "checkpoint_dir": str(tmp_path / "ckpt"),
                    "min_examples": 2,
                    "num_epochs": 1,
                },
                "logging": {"show_progress": False},
            }
        )
    )
    return path


@pytest.mark.parametrize("command", ["generate", "train", "stats", "adapters", "demo", "bench", "serve"])
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
    assert (
        main(["generate", "Hello", "--config", str(config_file), "--max-tokens", "0"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_tokens" in err
    assert (
        main(
            ["generate", "Hello", "--config", str(config_file.parent / "missing.yaml")]
        )
        == 2
    )
    assert "missing.yaml" in capsys.readouterr().err


def test_train_without_data_names_the_shortfall(config_file, capsys):
    assert main(["train", "--config", str(config_file)]) == 2
    assert "0 failures" in capsys.readouterr().err


def test_collect_train_and_stats(config_file, capsys):
    for prompt in ("Hello", "What is Python?"):
        assert (
            main(
                ["generate", prompt, "--mode", "detailed", "--config", str(config_file)]
            )
            == 0
        )
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


PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_writes_a_lossless_side_by_side_report(config_file, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "--prompts",
        "2",
        "--max-tokens",
        "6",
        "--temperatures",
        "0",
        "1",
        "--ks",
        "2",
        "--max-draft-tokens",
        "2",
    ]
    assert main(["bench", "--config", str(config_file), *args, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    assert report["prompts"] == 2 and report["max_tokens"] == 6
    # Compared in the same run with mlx-lm's generate_step on the same prompts.
    assert report["identical_greedy"] is True
    methods = [
        ("target alone (mlx-lm)", "-"),
        ("mlx-lm speculative", "2"),
        ("SpecLoRA fast", "2"),
        ("SpecLoRA fast", "adaptive"),
    ]
    rows = report["rows"]
    assert [(r["temperature"], r["method"], r["k"]) for r in rows] == [
        (t, m, k) for t in (0.0, 1.0) for m, k in methods
    ]
    for r in rows:
        assert r["seconds"] > 0
        # mlx-lm's generators run past EOS; SpecLoRA stops there, which greedy
        # decoding of these prompts never reaches.
        if r["method"] != "SpecLoRA fast" or r["temperature"] == 0:
            assert r["tokens"] == 2 * 6
        if r["method"] == "SpecLoRA fast":
            assert 0 < r["rounds"] and 0 <= r["accepted"] <= r["drafted"]
            assert r["acceptance"] == r["accepted"] / r["drafted"]
            # One token from the target per round after the accepted drafts (fewer
            # only when a sampled EOS ended the text).
            assert r["tokens"] <= r["rounds"] + r["accepted"]
            if r["temperature"] == 0:
                assert r["tokens"] == r["rounds"] + r["accepted"]
    table = (out / "bench.md").read_text()
    assert table.strip() in stdout
    lines = table.splitlines()
    assert len([line for line in lines[2:] if line.startswith("| ")]) == len(rows)
    assert (
        "Greedy output identical to the target alone: True. 2 prompts x 6 tokens."
        in table
    )
    assert (out / "bench.png").read_bytes()[:8] == PNG
    for name in ("bench.json", "bench.md", "bench.png"):
        assert f"wrote {out / name}" in stdout


def test_demo_runs_a_round_and_writes_its_report(config_file, tmp_path, capsys):
    work = tmp_path / "demo"
    sizes = [
        "--rounds",
        "1",
        "--train-prompts",
        "3",
        "--eval-prompts",
        "1",
        "--max-tokens",
        "8",
        "--epochs",
        "1",
    ]
    assert (
        main(
            [
                "demo",
                "--config",
                str(config_file),
                "--workdir",
                str(work),
                *sizes,
                "--rank",
                "2",
                "--threshold",
                "1.0",
                "--no-progress",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    rows = json.loads((work / "demo.json").read_text())
    assert [r["round"] for r in rows] == [0, 1]
    base, trained = rows
    assert (
        base["failures_trained"] == 0
        and base["train_loss"] is None
        and base["train_seconds"] == 0
    )
    # Threshold 1: every code prompt with a rejection is collected; training needs
    # min_examples (2) of the 3.
    assert 2 <= trained["failures_trained"] <= 3
    assert (
        math.isfinite(trained["train_loss"])
        and trained["train_loss"] > 0
        and trained["train_seconds"] > 0
    )
    for r in rows:
        assert 0 <= r["acceptance_code"] <= 1 and 0 <= r["acceptance_prose"] <= 1
        assert r["speedup"] == pytest.approx(
            r["fast_tokens_per_s"] / r["target_tokens_per_s"]
        )
    table = (work / "demo.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    for line, r in zip(table[2:], rows):
        assert line.startswith(f"| {r['round']} | {r['failures_trained']} |")
        assert f"| {r['acceptance_code']:.3f} | {r['acceptance_prose']:.3f} |" in line
        assert line in stdout  # printed as each round finished
    assert (work / "demo.png").read_bytes()[:8] == PNG
    # The round's failures went to training and then to the replay buffer.
    stats_config = tmp_path / "demo-stats.yaml"
    stats_config.write_text(
        yaml.safe_dump(
            {
                "collection": {"data_dir": str(work / "failures")},
                "training": {"checkpoint_dir": str(work / "checkpoints")},
            }
        )
    )
    assert main(["stats", "--config", str(stats_config)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (
        stats["failure_count"] == 0
        and stats["replay_buffer_size"] == trained["failures_trained"]
    )
    assert stats["checkpoints"]["best"]["step"] >= 1
