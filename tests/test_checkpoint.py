"""The checkpoint store: atomic aliases shared by many writers and readers,
crash debris that only dead writers leave, and entries that are not checkpoints.

The system-level kill -9 test is in ``test_hardening_faults.py``.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import speclora  # must precede mlx.core: it preloads OpenBLAS

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from speclora import checkpoint
from speclora.checkpoint import (
    LOCK_FILE,
    VERSIONS_DIR,
    load_adapter_checkpoint,
    read_training_state,
    recover_checkpoint_dir,
    save_adapter_checkpoint,
)

PYTHON_DIR = str(Path(speclora.__file__).resolve().parent.parent)
ADAPTER_CONFIG = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 2}}


class Adapter(nn.Module):
    """Stands in for a model whose only trainable parameters are LoRA ones."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.lora_a = mx.full((16, 2), value)
        self.lora_b = mx.full((2, 16), -value)


def values(path: Path) -> set[float]:
    weights, _, _ = load_adapter_checkpoint(path)
    return {float(x) for w in weights.values() for x in np.abs(np.array(w)).ravel()}


def layout(root: Path) -> tuple[list[str], list[str]]:
    """(entries of root, entries of root/.versions), sorted."""
    versions = root / VERSIONS_DIR
    return (
        sorted(p.name for p in root.iterdir()),
        sorted(p.name for p in versions.iterdir()) if versions.is_dir() else [],
    )


def published(root: Path, *aliases: str) -> list[str]:
    return sorted(Path(os.readlink(root / a)).name for a in aliases)


def test_save_publishes_a_link_that_mlx_lm_layouts_read(tmp_path: Path) -> None:
    save_adapter_checkpoint(Adapter(1.0), tmp_path / "best", ADAPTER_CONFIG, {"step": 1})
    save_adapter_checkpoint(Adapter(2.0), tmp_path / "best", ADAPTER_CONFIG, {"step": 2})
    best = tmp_path / "best"
    assert best.is_symlink() and (best / "adapters.safetensors").is_file()
    assert values(best) == {2.0} and read_training_state(best)["step"] == 2
    # The superseded version is gone; nothing else is left.
    assert layout(tmp_path) == ([LOCK_FILE, VERSIONS_DIR, "best"], published(tmp_path, "best"))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best"
    save_adapter_checkpoint(Adapter(1.0), path, ADAPTER_CONFIG, {"step": 1})
    before = layout(tmp_path)
    real_write_json = checkpoint._write_json
    calls = []

    def failing_write_json(p, data):
        calls.append(p)
        if len(calls) == 2:  # adapters + config written, state file fails
            raise OSError(28, "No space left on device")
        real_write_json(p, data)

    monkeypatch.setattr(checkpoint, "_write_json", failing_write_json)
    with pytest.raises(RuntimeError, match=f"{path}.*MiB free.*disk is full.*unchanged"):
        save_adapter_checkpoint(Adapter(2.0), path, ADAPTER_CONFIG, {"step": 2})
    assert values(path) == {1.0}
    assert layout(tmp_path) == before


def test_mlx_write_failure_names_the_directory(tmp_path, monkeypatch):
    """MLX raises RuntimeError ("[write] Unable to write ...") with no path."""

    def failing_save(path, weights):
        raise RuntimeError("[write] Unable to write 422 bytes to file.")

    save_adapter_checkpoint(Adapter(1.0), tmp_path / "best", ADAPTER_CONFIG, {"step": 1})
    monkeypatch.setattr(checkpoint.mx, "save_safetensors", failing_save)
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'best'} \\(in {tmp_path}, .*Unable to write"):
        save_adapter_checkpoint(Adapter(2.0), tmp_path / "best", ADAPTER_CONFIG, {"step": 2})
    assert values(tmp_path / "best") == {1.0}


def test_failed_publish_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    save_adapter_checkpoint(Adapter(1.0), path, ADAPTER_CONFIG, {"step": 1})
    before = layout(tmp_path)

    def failing_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(RuntimeError, match=str(path)):
        save_adapter_checkpoint(Adapter(2.0), path, ADAPTER_CONFIG, {"step": 2})
    monkeypatch.undo()
    assert read_training_state(path)["step"] == 1
    assert layout(tmp_path) == before


def test_entries_that_are_not_checkpoints_are_replaced_once(tmp_path, caplog):
    """A file, a link to a directory elsewhere, or a plain directory named like an
    alias: the next save replaces the entry (never what a link points at) and
    every later save and load works."""
    root = tmp_path / "ckpt"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    (root / "best").symlink_to(outside)
    (root / "final").write_text("a file")
    save_adapter_checkpoint(Adapter(1.0), tmp_path / "legacy", ADAPTER_CONFIG, {"step": 0})
    os.replace((tmp_path / "legacy").resolve(), root / "latest")  # a plain directory
    for round in range(2):
        for alias in ("best", "final", "latest"):
            save_adapter_checkpoint(Adapter(3.0 + round), root / alias, ADAPTER_CONFIG, {"step": round})
            assert values(root / alias) == {3.0 + round}
    assert (outside / "keep.txt").read_text() == "not ours"
    assert layout(root) == (
        [LOCK_FILE, VERSIONS_DIR, "best", "final", "latest"],
        published(root, "best", "final", "latest"),
    )
    assert sum("not a checkpoint of this directory" in r.message for r in caplog.records) == 2


def test_recovery_removes_only_dead_writers_debris(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_adapter_checkpoint(Adapter(1.0), root / "best", ADAPTER_CONFIG, {"step": 1})
    versions = root / VERSIONS_DIR
    # A writer killed mid-write: its version and its (now unheld) lock file.
    (versions / "latest-dead").mkdir()
    (versions / "latest-dead" / "adapters.safetensors").write_bytes(b"partial")
    (versions / "latest-dead.writing").touch()
    # Killed between making its link and publishing it.
    (versions / "final-dead2").mkdir()
    (root / ".link-final-dead2").symlink_to(os.path.join(VERSIONS_DIR, "final-dead2"))
    # A live writer (another open file description holding the lock).
    (versions / "latest-live.writing").touch()
    live_lock = os.open(versions / "latest-live.writing", os.O_RDWR)
    fcntl.flock(live_lock, fcntl.LOCK_EX)
    (versions / "latest-live").mkdir()
    (versions / "latest-live" / "adapters.safetensors").write_bytes(b"being written")
    # The previous layout's crash leftover: best's old copy parked, final missing.
    save_adapter_checkpoint(Adapter(7.0), tmp_path / "old", ADAPTER_CONFIG, {"step": 7})
    os.replace((tmp_path / "old").resolve(), root / ".old-final")
    try:
        actions = recover_checkpoint_dir(root)
        assert len(actions) == 4, actions
        assert values(root / "final") == {7.0} and values(root / "best") == {1.0}
        assert layout(root) == (
            [LOCK_FILE, VERSIONS_DIR, "best", "final"],
            sorted(published(root, "best") + ["latest-live", "latest-live.writing"]),
        )
        assert (versions / "latest-live" / "adapters.safetensors").read_bytes() == b"being written"
    finally:
        os.close(live_lock)
    recover_checkpoint_dir(root)
    assert layout(root)[1] == published(root, "best")
    assert recover_checkpoint_dir(root) == []


def test_crash_while_replacing_a_plain_directory_is_recovered(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_adapter_checkpoint(Adapter(5.0), tmp_path / "plain", ADAPTER_CONFIG, {"step": 5})
    root.mkdir()
    (root / VERSIONS_DIR).mkdir()
    # Parked by a save that died before its link replaced the directory.
    os.replace((tmp_path / "plain").resolve(), root / VERSIONS_DIR / "best-replaced-0123")
    assert values(root / "best") == {5.0}  # a load puts it back
    assert read_training_state(root / "best")["step"] == 5


def test_reading_pins_the_version_against_cleanup(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_adapter_checkpoint(Adapter(1.0), root / "best", ADAPTER_CONFIG, {"step": 1})
    with checkpoint.reading(root / "best") as source:
        save_adapter_checkpoint(Adapter(2.0), root / "best", ADAPTER_CONFIG, {"step": 2})
        assert recover_checkpoint_dir(root) == []  # a reader holds the store
        assert source.is_dir() and read_training_state(source)["step"] == 1
    assert values(root / "best") == {2.0}
    recover_checkpoint_dir(root)
    assert not source.exists()


@pytest.mark.parametrize("text", ["[1, 2]", '{"step": ', "\xff\xfe", "[" * 100_000])
def test_corrupt_training_state_is_named(tmp_path: Path, text: str) -> None:
    save_adapter_checkpoint(Adapter(1.0), tmp_path / "best", ADAPTER_CONFIG, {"step": 1})
    state_file = (tmp_path / "best").resolve() / "training_state.json"
    state_file.write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    named = re.escape(str(tmp_path / "best" / "training_state.json"))
    with pytest.raises(RuntimeError, match=f"(?i)training state {named}"):
        read_training_state(tmp_path / "best")


# -------------------------------------------------------- many processes at once

_WRITER = r"""
import sys
import speclora
import mlx.core as mx, mlx.nn as nn
from speclora.checkpoint import save_adapter_checkpoint

root, writer = sys.argv[1], int(sys.argv[2])

class Adapter(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.lora_a = mx.full((64, 8), value)
        self.lora_b = mx.full((8, 64), -value)

for i in range(1_000_000):
    alias = ("best", "latest")[i % 2]
    print("saving", alias, i, flush=True)
    save_adapter_checkpoint(Adapter(writer * 100_000 + i), f"{root}/{alias}",
                            {"num_layers": 1, "writer": writer, "i": i},
                            {"writer": writer, "i": i})
    print("saved", alias, i, flush=True)
"""

_READER = r"""
import sys
import numpy as np
import speclora
from speclora.checkpoint import load_adapter_checkpoint

root, loads = sys.argv[1], int(sys.argv[2])
for n in range(loads):
    alias = ("best", "latest")[n % 2]
    weights, config, state = load_adapter_checkpoint(f"{root}/{alias}")
    expected = state["writer"] * 100_000 + state["i"]
    assert (config["writer"], config["i"]) == (state["writer"], state["i"]), (config, state)
    assert sorted(weights) == ["lora_a", "lora_b"], sorted(weights)
    assert np.all(np.array(weights["lora_a"]) == expected), (alias, state)
    assert np.all(np.array(weights["lora_b"]) == -expected), (alias, state)
print("verified", loads, flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p)
    return env


def _start(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], prefix: str, count: int) -> None:
    """Read the writer's lines until ``count`` of them start with ``prefix``."""
    assert proc.stdout is not None
    seen = 0
    while seen < count:
        line = proc.stdout.readline()
        assert line, f"writer exited: {proc.stderr.read() if proc.stderr else ''}"
        seen += line.startswith(prefix)


def test_writers_readers_and_kills_share_one_directory(tmp_path: Path) -> None:
    """Two writer processes save both aliases in a loop and are killed -9 at
    random points (some inside a save) and restarted; two reader processes load
    the aliases meanwhile. Every load must see one complete save whose weights,
    config and state all come from the same writer's same step; afterwards
    cleanup leaves exactly the published versions."""
    root = tmp_path / "ckpt"
    for alias in ("best", "latest"):
        save_adapter_checkpoint(Adapter(0.0), root / alias, {"writer": 0, "i": 0}, {"writer": 0, "i": 0})
    writers = {w: _start(_WRITER, root, w) for w in (1, 2)}
    readers = [_start(_READER, root, 400) for _ in range(2)]
    rng = random.Random(7)
    kills = 0
    try:
        for _ in range(4):
            for w, proc in writers.items():
                # Kill after some progress: right after a save began, or after it ended.
                _wait_for(proc, "saved", rng.randint(1, 4))
                _wait_for(proc, rng.choice(["saving", "saved"]), 1)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                writers[w] = _start(_WRITER, root, w + 10 * kills)
        outcomes = [r.communicate(timeout=300) for r in readers]
    finally:
        for proc in [*writers.values(), *readers]:
            proc.kill()
            proc.wait()
    for r, (out, err) in zip(readers, outcomes):
        assert r.returncode == 0 and out == "verified 400\n", err
    assert kills == 8
    recover_checkpoint_dir(root)
    assert layout(root) == (
        [LOCK_FILE, VERSIONS_DIR, "best", "latest"],
        published(root, "best", "latest"),
    )
    for alias in ("best", "latest"):
        _, config, state = load_adapter_checkpoint(root / alias)
        assert config["writer"] == state["writer"] != 0
