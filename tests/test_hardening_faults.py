"""Faults at the system level: kill -9 during checkpoint saves, a full disk or a
refused write while collecting or saving, and concurrent callers.

The collector's own crash, disk-full and multi-process tests are in
``test_data_collector.py``; the trainer's failed-write tests in ``test_training.py``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import speclora  # must precede mlx.core: it preloads OpenBLAS

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from helpers import synthetic_example, tiny_system_config
from speclora import SpeculativeDecodingSystem, checkpoint, data_collector, decoding
from speclora.checkpoint import ADAPTER_WEIGHTS_FILE, TRAINING_STATE_FILE

PYTHON_DIR = str(Path(speclora.__file__).resolve().parent.parent)
ALIASES = ("latest", "best", "final")


def fingerprint(weights: dict[str, mx.array]) -> str:
    """sha256 over the names and float32 bytes of an adapter's tensors."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.array(weights[name].astype(mx.float32)).tobytes())
    return digest.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p
    )
    return env


@pytest.fixture
def config(tiny_model_dir: Any, tmp_path: Path) -> dict[str, Any]:
    return tiny_system_config(tiny_model_dir, tmp_path, num_epochs=2)


@pytest.fixture
def system(config: dict[str, Any]) -> Iterator[SpeculativeDecodingSystem]:
    s = SpeculativeDecodingSystem(config)
    s.initialize()
    yield s
    if s.collector is not None:
        s.collector.close()


def add_failures(system: SpeculativeDecodingSystem, prefix: str, n: int) -> list[str]:
    assert system.collector is not None
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, example_id in enumerate(ids):
        system.collector.add_failure(
            synthetic_example(example_id, zlib.crc32(example_id.encode()) + i)
        )
    return ids


# --------------------------------------------------------------- kill -9 during saves

# Trains the tiny draft over and over through SpeculativeDecodingSystem.train(),
# announcing every checkpoint save before and after it and stamping the saved
# weights' fingerprint into training_state.json.
_TRAINER = r"""
import hashlib, json, sys, zlib
import numpy as np
import speclora
import mlx.core as mx
from speclora import checkpoint, training
from speclora.main import SpeculativeDecodingSystem
from speclora.data_collector import TrainingExample

config, tag = json.loads(sys.argv[1]), sys.argv[2]

def fingerprint(weights):
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.array(weights[name].astype(mx.float32)).tobytes())
    return digest.hexdigest()

save = training.save_adapter_checkpoint

def announced_save(model, path, adapter_config, state):
    fp = fingerprint(training.adapter_weights(model))
    print("saving", path.name, fp, flush=True)
    out = save(model, path, adapter_config, {**state, "weights_sha256": fp})
    print("saved", path.name, fp, flush=True)
    return out

training.save_adapter_checkpoint = announced_save

# With block_at = N > 0, the N-th save stops between writing its weights and its
# config until the parent (which kills it there) says go on.
block_at, writes = int(sys.argv[3]), 0
write_json = checkpoint._write_json

def blocking_write_json(path, data):
    global writes
    writes += 1
    if writes == 2 * block_at - 1:
        print("inside", flush=True)
        sys.stdin.readline()
    write_json(path, data)

checkpoint._write_json = blocking_write_json
system = SpeculativeDecodingSystem(config)
system.initialize()
print("ready", flush=True)
rng = np.random.default_rng(zlib.crc32(tag.encode()))
for round in range(1_000_000):
    for j in range(2):
        system.collector.add_failure(TrainingExample(
            id=f"{tag}-{round}-{j}", prompt="p", target_output="t", acceptance_rate=0.1,
            prompt_tokens=rng.integers(4, 260, 6).tolist(),
            output_tokens=rng.integers(4, 260, 12).tolist(),
            disagreements=[], timestamp="2024-01-01T00:00:00"))
    system.train()
"""


def _read_lines_until(proc: subprocess.Popen[str], prefix: str | tuple[str, ...]) -> list[str]:
    """Lines the child printed up to and including the first one starting with ``prefix``."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"trainer exited before {prefix!r}: {proc.stderr.read() if proc.stderr else ''}"
            )
        lines.append(line)
        if line.startswith(prefix):
            return lines


def assert_only_published_versions(root: Path) -> None:
    """Every version left is one that an alias link (active/previous included) names."""
    versions = root / checkpoint.VERSIONS_DIR
    links = {
        Path(os.readlink(p)).name
        for p in root.iterdir()
        if p.is_symlink() and not p.name.startswith(".")
    }
    assert links >= {Path(os.readlink(root / a)).name for a in ALIASES if (root / a).exists()}
    assert sorted(p.name for p in versions.iterdir()) == sorted(links)


def run_kill_trials(models: Any, root: Path, kills: int, seed: int) -> dict[str, int]:
    """SIGKILL a training process, alternately inside a save (held between its
    weights and its config) and at a random moment after its first save; after
    each kill every alias must load and hold one complete save: the last
    acknowledged one or the one in flight, its weights matching the fingerprint
    stamped into its training state. Every kill waits for the child's progress,
    never for a fixed time, so the outcome does not depend on machine speed."""
    config = tiny_system_config(models, root, num_epochs=3)
    config["models"]["draft_adapter"] = "latest"  # each run continues the last one
    checker = SpeculativeDecodingSystem(config)
    checker.initialize()
    checkpoints = Path(config["training"]["checkpoint_dir"])
    rng = random.Random(seed)
    acknowledged: dict[str, str] = {}  # alias -> fingerprint of its last finished save
    stats = {"kills": 0, "inside_a_save": 0, "saves": 0, "loads": 0}
    for k in range(kills):
        block_at = rng.randint(1, 4) if k % 2 == 0 else 0
        proc = subprocess.Popen(
            [sys.executable, "-c", _TRAINER, json.dumps(config), f"run{k}", str(block_at)],
            env=subprocess_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if block_at:
            lines = _read_lines_until(proc, "inside")
        else:
            lines = _read_lines_until(proc, "saved")
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        stats["kills"] += 1
        in_flight: dict[str, str] = {}
        for line in lines + out.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # cut off mid-print: not an acknowledgement
            kind, *rest = line.split()
            if kind == "saving":
                in_flight[rest[0]] = rest[1]
            elif kind == "saved":
                acknowledged[rest[0]] = rest[1]
                in_flight.pop(rest[0], None)
                stats["saves"] += 1
        stats["inside_a_save"] += bool(in_flight)

        for alias in ALIASES:
            loaded = checker.load_adapter(alias)
            allowed = {acknowledged.get(alias), in_flight.get(alias)} - {None}
            if not loaded:
                assert alias not in acknowledged, (
                    f"kill {k}: {alias} lost a finished save"
                )
                continue
            stats["loads"] += 1
            directory = checkpoints / alias
            state = json.loads((directory / TRAINING_STATE_FILE).read_text())
            weights = mx.load(str(directory / ADAPTER_WEIGHTS_FILE))
            assert isinstance(weights, dict)
            assert fingerprint(weights) == state["weights_sha256"], (
                f"kill {k}: {alias} mixes two saves"
            )
            assert state["weights_sha256"] in allowed, (
                f"kill {k}: {alias} holds neither the old nor the new save"
            )
            # Whichever it is, it is the one the next kill may leave in place.
            acknowledged[alias] = state["weights_sha256"]
        # Cleanup removes whatever the kill interrupted, and only that.
        checkpoint.recover_checkpoint_dir(checkpoints)
        assert_only_published_versions(checkpoints)
    assert acknowledged
    # The last adapter still drives generation.
    assert isinstance(checker.generate("def f(x):", max_tokens=4), str)
    return stats


def test_checkpoints_survive_sigkill_during_training(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    stats = run_kill_trials(tiny_model_dir, tmp_path, kills=10, seed=2024)
    assert stats["kills"] == 10 and stats["inside_a_save"] >= 5 and stats["saves"] >= 5


@pytest.mark.slow
def test_checkpoints_survive_many_sigkills_during_training(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    stats = run_kill_trials(tiny_model_dir, tmp_path, kills=120, seed=4242)
    print("kill -9 during training:", stats)
    assert stats["kills"] == 120 and stats["inside_a_save"] >= 60


# --------------------------------------------------------------- full disk, refused writes


def _failing_write(code: int) -> Callable[..., None]:
    def write(path: Path, *args: Any) -> None:
        Path(path).write_bytes(b"\0" * 64)  # part of the file made it to disk
        raise OSError(code, os.strerror(code), str(path))

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("target", ["_write_weights", "_write_json"])
def test_failed_checkpoint_write_keeps_everything(
    system: SpeculativeDecodingSystem,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    code: int,
) -> None:
    assert system.collector is not None
    add_failures(system, "first", 2)
    system.train()
    checkpoints = Path(system.config.training.checkpoint_dir)
    before = tree_digest(checkpoints)
    adapter = system.get_adapter_info()
    output = system.generate("def f(x):")
    pending = add_failures(system, "second", 3)

    monkeypatch.setattr(checkpoint, target, _failing_write(code))
    with pytest.raises(RuntimeError, match=os.strerror(code)) as info:
        system.train()
    assert str(checkpoints) in str(info.value)
    # The previous checkpoints, the adapter in use and the pending failures are intact.
    assert tree_digest(checkpoints) == before
    assert system.get_adapter_info() == adapter
    assert system.generate("def f(x):") == output
    assert [f.id for f in system.collector.load_failures()] == pending

    monkeypatch.undo()  # space returns
    results = system.train()
    assert results["num_examples"] == 3 and system.get_stats()["failure_count"] == 0
    assert tree_digest(checkpoints) != before


class _FullDisk(sqlite3.Connection):
    """A connection on which every write fails as SQLite fails on a full disk."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.lstrip().upper().startswith(("INSERT", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


def _full_disk(
    monkeypatch: pytest.MonkeyPatch, system: SpeculativeDecodingSystem
) -> None:
    assert system.collector is not None
    connect = sqlite3.connect
    system.collector.close()  # the next call opens a connection on the full disk
    monkeypatch.setattr(
        data_collector.sqlite3,
        "connect",
        lambda *a, **k: connect(*a, factory=_FullDisk, **k),
    )


def test_full_disk_while_collecting(
    system: SpeculativeDecodingSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert system.collector is not None
    system.generate("What is Python?", mode="detailed")
    stored = [f.id for f in system.collector.load_failures()]
    assert len(stored) == 1

    _full_disk(monkeypatch, system)
    with pytest.raises(RuntimeError, match="disk is full") as info:
        system.generate("What is Rust?", mode="detailed")
    assert str(system.collector.data_dir) in str(info.value)
    # Fast mode does not write and keeps working; what was stored is intact.
    assert isinstance(system.generate("What is Rust?"), str)
    assert [f.id for f in system.collector.load_failures()] == stored

    monkeypatch.undo()
    system.collector.close()
    system.generate("What is Rust?", mode="detailed")
    assert system.get_stats()["failure_count"] == 2


def test_full_disk_after_training_keeps_failures_pending(
    system: SpeculativeDecodingSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert system.collector is not None
    pending = add_failures(system, "f", 2)
    _full_disk(monkeypatch, system)
    # Training and the swap succeed; handing the failures to the replay buffer
    # does not. They stay pending: trained on again next time, never dropped.
    with pytest.raises(RuntimeError, match="disk is full"):
        system.train()
    assert system.get_adapter_info()["loaded"]
    monkeypatch.undo()
    system.collector.close()
    assert [f.id for f in system.collector.load_failures()] == pending
    system.train()
    assert system.get_stats()["failure_count"] == 0
    assert sorted(f.id for f in system.collector.load_replay_buffer()) == pending


# --------------------------------------------------------------- concurrency

_REFUSED = "one request at a time"


def test_second_caller_is_refused_while_a_generation_runs(
    system: SpeculativeDecodingSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_failures(system, "f", 2)
    system.train()
    expected = system.generate("def fibonacci(n):", max_tokens=8)

    # The first call blocks inside its decode loop, in its second round.
    inside, release = threading.Event(), threading.Event()
    accept = decoding.speculative_accept
    rounds = 0

    def blocking_accept(*args: Any, **kwargs: Any) -> Any:
        nonlocal rounds
        rounds += 1
        if rounds == 2:
            inside.set()
            assert release.wait(60)
        return accept(*args, **kwargs)

    monkeypatch.setattr(decoding, "speculative_accept", blocking_accept)
    result: dict[str, Any] = {}

    def first() -> None:
        try:
            result["text"] = system.generate("def fibonacci(n):", max_tokens=8)
        except Exception as e:  # noqa: BLE001  (reported in the main thread)
            result["error"] = e

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(60), "the first generation never reached its second round"
        calls: dict[str, Callable[[], object]] = {
            "generate": lambda: system.generate("hi"),
            "generate detailed": lambda: system.generate("hi", mode="detailed"),
            "train": system.train,
            "load_adapter": lambda: system.load_adapter("best"),
            "unload_adapter": system.unload_adapter,
            "initialize": system.initialize,
        }
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=_REFUSED):
                call()
            assert rounds == 2, f"{name} reached the decode loop"
        # Reading the counters is allowed meanwhile.
        assert system.get_stats()["generation_count"] == 1
    finally:
        release.set()
        thread.join(60)
    assert "error" not in result, result.get("error")
    assert result["text"] == expected
    assert system.get_stats()["generation_count"] == 2
    assert system.get_adapter_info()["loaded"]


def test_second_caller_is_refused_while_training(
    system: SpeculativeDecodingSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speclora import training

    add_failures(system, "f", 2)
    inside, release = threading.Event(), threading.Event()
    save = training.save_adapter_checkpoint

    def blocking_save(*args: Any, **kwargs: Any) -> Any:
        if not inside.is_set():
            inside.set()
            assert release.wait(60)
        return save(*args, **kwargs)

    monkeypatch.setattr(training, "save_adapter_checkpoint", blocking_save)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(system.train()))
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match=_REFUSED):
            system.generate("hi")
        with pytest.raises(RuntimeError, match=_REFUSED):
            system.train()
    finally:
        release.set()
        thread.join(60)
    assert result["num_examples"] == 2
    assert (
        system.get_stats()["failure_count"] == 0 and system.get_adapter_info()["loaded"]
    )


_COLLECTOR_PROCESS = r"""
import json, sys
import speclora
from speclora.main import SpeculativeDecodingSystem
config, tag, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
system = SpeculativeDecodingSystem(config)
system.initialize()
for i in range(n):
    prompt = f"{tag} prompt {i}"
    result = system.generate_result(prompt, mode="detailed")
    # A generation is stored when its acceptance is below the threshold.
    if result.num_draft_tokens and system.collector.is_failure(result.acceptance_rate):
        print(prompt, flush=True)
"""


def test_two_processes_sharing_a_data_dir_lose_nothing(config: dict[str, Any]) -> None:
    n = 6
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _COLLECTOR_PROCESS, json.dumps(config), tag, str(n)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    collected: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        collected += out.splitlines()
    assert {c.split()[0] for c in collected} == {"A", "B"}
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None
    assert sorted(f.prompt for f in system.collector.load_failures()) == sorted(
        collected
    )
    assert system.collector.corrupt_records == []


# --------------------------------------------------------------- trainers and loaders at once

# Loads an alias in a loop, printing each success, until the file named by
# argv[3] exists; then once more.
_LOADER_PROCESS = r"""
import json, sys
from pathlib import Path
import speclora
from speclora.main import SpeculativeDecodingSystem

config, alias, stop = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
system = SpeculativeDecodingSystem(config)
system.initialize()
while not stop.exists():
    if system.load_adapter(alias):
        print("ok", flush=True)
assert system.load_adapter(alias), "the finished trainings left no " + alias
"""

# Collects two failures and trains, until the file named by argv[3] exists.
_TRAINING_PROCESS = r"""
import json, sys
from pathlib import Path
import speclora
from speclora.main import SpeculativeDecodingSystem
from helpers import synthetic_example

config, tag, stop = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
system = SpeculativeDecodingSystem(config)
system.initialize()
r = 0
while not stop.exists():
    for j in range(2):
        system.collector.add_failure(synthetic_example(f"{tag}-{r}-{j}", 100 * r + j))
    try:
        system.train()
        print("trained", r, flush=True)
    except ValueError as e:
        # The other trainer's run (which this one waited for) took these failures.
        assert "not enough training data" in str(e), e
        print("round without data", r, flush=True)
    r += 1
"""


def test_trainers_and_loaders_share_one_checkpoint_dir(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """Two processes train repeatedly into one checkpoint_dir while two others
    load ``best`` and ``latest`` in a loop: no load and no training fails, and
    loading never removes a save in progress. The processes stop once every
    loader has loaded 25 times while the trainers were running (progress, not
    time, so the overlap does not depend on machine speed)."""
    stop = tmp_path / "stop"
    env = subprocess_env()
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)

    def start(name: str, *args: str) -> subprocess.Popen[str]:
        # stderr to a file: a pipe nobody reads until the end would fill with the
        # loaders' "no adapter yet" warnings and block them.
        return subprocess.Popen(
            [sys.executable, "-c", *args, str(stop)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{name}.err", "w"),
            text=True,
        )

    trainers = [start(tag, _TRAINING_PROCESS, json.dumps(config), tag) for tag in ("A", "B")]
    loaders = [start(a, _LOADER_PROCESS, json.dumps(config), a) for a in ("best", "latest")]
    try:
        first = ["".join(_read_lines_until(p, ("trained", "round without data"))) for p in trainers]
        for proc in loaders:
            for _ in range(25):
                _read_lines_until(proc, "ok")
        stop.touch()
        outputs = [proc.communicate(timeout=300)[0] for proc in trainers + loaders]
    finally:
        for proc in trainers + loaders:
            proc.kill()
            proc.wait()
    for name, proc in zip(("A", "B", "best", "latest"), trainers + loaders):
        assert proc.returncode == 0, (tmp_path / f"{name}.err").read_text()
    assert "trained" in "".join(first + outputs[:2]), "no training run finished"
    root = Path(config["training"]["checkpoint_dir"])
    checkpoint.recover_checkpoint_dir(root)
    assert_only_published_versions(root)
