"""Tests for the durable failure store (speclora.data_collector)."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import speclora
from speclora import data_collector
from speclora.data_collector import (
    DB_FILENAME,
    DataCollector,
    Disagreement,
    TrainingExample,
)

PYTHON_DIR = str(Path(speclora.__file__).resolve().parent.parent)


def make_example(example_id: str, *, prompt_chars: int = 20) -> TrainingExample:
    return TrainingExample(
        id=example_id,
        prompt="x" * prompt_chars,
        target_output=f"output of {example_id}",
        acceptance_rate=0.2,
        prompt_tokens=[1, 2, 3],
        disagreements=[
            Disagreement(
                position=1,
                draft_token=5,
                target_token=6,
                draft_confidence=0.4,
                target_confidence=0.9,
                top_k_tokens=[6, 5],
                top_k_logprobs=[-0.1, -2.4],
            )
        ],
        timestamp="2024-01-01T00:00:00",
        output_tokens=[4, 6, 7],
    )


def ids(examples: list[TrainingExample]) -> list[str]:
    return [e.id for e in examples]


def raw_insert(
    collector: DataCollector, table: str, example_id: str, version: Any, payload: Any
) -> None:
    with sqlite3.connect(collector.db_path) as conn:
        conn.execute(
            f"INSERT INTO {table} (id, version, payload) VALUES (?, ?, ?)",
            (example_id, version, payload),
        )


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p
    )
    return env


# --------------------------------------------------------------------- basics


def test_add_load_count_in_insertion_order(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path / "store")
    examples = [make_example(f"e{i}") for i in range(5)]
    for ex in examples:
        collector.add_failure(ex)
    assert collector.failure_count == 5
    assert collector.load_failures() == examples
    assert collector.corrupt_records == []
    assert collector.replay_buffer_size == 0 and collector.load_replay_buffer() == []


def test_store_uses_wal_and_full_sync(tmp_path: Path) -> None:
    # Power loss cannot be simulated here; these settings are what makes an
    # acknowledged add survive it (every commit fsyncs the WAL).
    collector = DataCollector(tmp_path)
    with sqlite3.connect(collector.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        data_collector._configure(conn)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_opening_a_current_store_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store on a full or read-only disk must still open: only reads are allowed.
    DataCollector(tmp_path).add_failure(make_example("kept"))
    statements: list[str] = []
    configure = data_collector._configure

    def traced(conn: sqlite3.Connection) -> None:
        configure(conn)
        conn.set_trace_callback(statements.append)

    monkeypatch.setattr(data_collector, "_configure", traced)
    collector = DataCollector(tmp_path)
    assert collector.failure_count == 1 and ids(collector.load_failures()) == ["kept"]
    writes = [
        s
        for s in statements
        if re.match(
            r"\s*(BEGIN|CREATE|ALTER|INSERT|DELETE|UPDATE|REPLACE)", s, re.IGNORECASE
        )
        or re.match(r"\s*PRAGMA\s+(journal_mode|user_version)\s*=", s, re.IGNORECASE)
    ]
    assert statements and writes == []


def test_store_persists_across_instances(tmp_path: Path) -> None:
    DataCollector(tmp_path).add_failure(make_example("kept"))
    assert ids(DataCollector(tmp_path).load_failures()) == ["kept"]


def test_data_dir_is_created_and_must_be_a_directory(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    DataCollector(nested)
    assert (nested / DB_FILENAME).is_file()
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("hello")
    with pytest.raises(ValueError, match="not a directory"):
        DataCollector(not_dir)
    with pytest.raises(ValueError, match="not a directory"):
        DataCollector(not_dir / "below")


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replay_buffer_max_size"):
        DataCollector(tmp_path, replay_buffer_max_size=-1)
    with pytest.raises(ValueError, match="replay_buffer_max_size"):
        DataCollector(tmp_path, replay_buffer_max_size=True)
    with pytest.raises(ValueError, match="acceptance_threshold"):
        DataCollector(tmp_path, acceptance_threshold=1.5)


def test_add_rejects_invalid_examples_and_duplicate_ids(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("dup"))
    with pytest.raises(ValueError, match="'dup'.*already"):
        collector.add_failure(make_example("dup"))
    with pytest.raises(ValueError, match="TrainingExample"):
        collector.add_failure(make_example("x").to_dict())  # type: ignore[arg-type]
    mutated = make_example("mutated")
    mutated.acceptance_rate = 7.0
    with pytest.raises(ValueError, match="acceptance_rate"):
        collector.add_failure(mutated)
    assert ids(collector.load_failures()) == ["dup"]


def test_is_failure_uses_strict_threshold(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path, acceptance_threshold=0.6)
    assert collector.is_failure(0.59)
    assert not collector.is_failure(0.6)
    assert not collector.is_failure(0.9)
    with pytest.raises(ValueError, match="NaN"):
        collector.is_failure(float("nan"))


# --------------------------------------------------------------------- replay


def test_consume_moves_failures_to_replay(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path, replay_buffer_max_size=10)
    for i in range(4):
        collector.add_failure(make_example(f"e{i}"))
    # Order of the given ids does not matter: replay keeps collection order.
    assert collector.consume_failures(["e2", "e0", "unknown"]) == 2
    assert ids(collector.load_failures()) == ["e1", "e3"]
    assert ids(collector.load_replay_buffer()) == ["e0", "e2"]
    assert (collector.failure_count, collector.replay_buffer_size) == (2, 2)
    assert collector.consume_failures([]) == 0
    with pytest.raises(ValueError, match="iterable of ids"):
        collector.consume_failures("e1")


def test_replay_buffer_is_fifo_bounded(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path, replay_buffer_max_size=3)
    for batch in (["a", "b"], ["c", "d"], ["e"]):
        for i in batch:
            collector.add_failure(make_example(i))
        collector.consume_failures(batch)
    assert ids(collector.load_replay_buffer()) == ["c", "d", "e"]
    assert collector.replay_buffer_size == 3
    # The bound is on disk too, not only in what load returns.
    with sqlite3.connect(collector.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM replay").fetchone()[0] == 3


def test_re_consumed_id_replaces_its_old_replay_entry(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path, replay_buffer_max_size=5)
    for round_ in range(2):
        for i in ("a", "b"):
            collector.add_failure(make_example(i, prompt_chars=round_ + 1))
        collector.consume_failures(["a", "b"])
    replay = collector.load_replay_buffer()
    assert ids(replay) == ["a", "b"] and replay[0].prompt == "xx"


def test_smaller_bound_on_reopen_returns_newest(tmp_path: Path) -> None:
    big = DataCollector(tmp_path, replay_buffer_max_size=10)
    for i in range(6):
        big.add_failure(make_example(f"e{i}"))
    big.consume_failures([f"e{i}" for i in range(6)])
    small = DataCollector(tmp_path, replay_buffer_max_size=2)
    assert ids(small.load_replay_buffer()) == ["e4", "e5"]
    assert small.replay_buffer_size == 2
    assert (
        ids(DataCollector(tmp_path, replay_buffer_max_size=0).load_replay_buffer())
        == []
    )


def test_training_loop_trains_once_per_threshold(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path, replay_buffer_max_size=100)
    trained_on: list[int] = []
    for i in range(175):
        collector.add_failure(make_example(f"g{i}"))
        if collector.failure_count >= 50:
            batch = collector.load_failures()
            trained_on.append(len(batch))
            assert collector.consume_failures(ids(batch)) == len(batch)
    assert trained_on == [50, 50, 50]
    assert collector.failure_count == 25
    replay = collector.load_replay_buffer()
    assert ids(replay) == [f"g{i}" for i in range(50, 150)]


# --------------------------------------------------------------------- corruption


def test_corrupt_rows_are_reported_quarantined_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("good1"))
    raw_insert(collector, "failures", "broken-json", 1, '{"id": "broken-json", ')
    raw_insert(
        collector, "failures", "bad-field", 1, '{"id": "bad-field", "prompt": 3}'
    )
    raw_insert(collector, "failures", "no-version", "one", "{}")
    collector.add_failure(make_example("good2"))
    # A row whose version is not a number is never counted as pending.
    assert collector.failure_count == 4

    with caplog.at_level(logging.WARNING, logger="speclora.data_collector"):
        assert ids(collector.load_failures()) == ["good1", "good2"]
    report = collector.corrupt_records
    assert len(report) == 3
    for line, example_id, why in zip(
        report,
        ["broken-json", "bad-field", "no-version"],
        ["invalid JSON", "invalid record", "invalid record version 'one'"],
    ):
        assert str(collector.db_path) in line and "table failures row" in line
        assert repr(example_id) in line and why in line
        assert "quarantine" in line
        assert line in caplog.text
    # Kept for inspection, no longer counted as pending.
    assert collector.failure_count == 2
    with sqlite3.connect(collector.db_path) as conn:
        kept = conn.execute(
            "SELECT id, payload FROM quarantine ORDER BY seq"
        ).fetchall()
    assert [k[0] for k in kept] == ["broken-json", "bad-field", "no-version"]
    assert kept[0][1] == '{"id": "broken-json", '
    # Reported once; the next load is clean.
    collector.load_failures()
    assert collector.corrupt_records == []


def test_payload_id_must_match_row_id(tmp_path: Path) -> None:
    import json

    collector = DataCollector(tmp_path)
    raw_insert(
        collector,
        "failures",
        "row-id",
        1,
        json.dumps(make_example("payload-id").to_dict()),
    )
    assert collector.load_failures() == []
    assert "does not match" in collector.corrupt_records[0]


def test_newer_version_rows_are_reported_skipped_and_kept(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("old"))
    raw_insert(collector, "failures", "future", 2, '{"new": "format"}')
    raw_insert(collector, "replay", "future-replay", 9, "??")
    assert ids(collector.load_failures()) == ["old"]
    assert len(collector.corrupt_records) == 1
    line = collector.corrupt_records[0]
    assert "table failures row" in line and "'future'" in line and "version 2" in line
    assert collector.load_replay_buffer() == []
    assert "version 9" in collector.corrupt_records[0]
    assert collector.failure_count == 1  # not pending for this version
    with sqlite3.connect(collector.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    collector.close()
    with sqlite3.connect(collector.db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        DataCollector(tmp_path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"not a database" * 100)
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        DataCollector(tmp_path)


# --------------------------------------------------------------------- write errors


def test_disk_full_during_add_is_a_clear_error_and_recoverable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("before"))
    configure = data_collector._configure

    def full_disk(conn: sqlite3.Connection) -> None:
        configure(conn)
        # SQLite then fails exactly as on a full disk (SQLITE_FULL) once the file grows.
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(data_collector, "_configure", full_disk)
    collector.close()
    with pytest.raises(RuntimeError) as info:
        collector.add_failure(make_example("big", prompt_chars=200_000))
    assert str(tmp_path) in str(info.value) and "full" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    monkeypatch.setattr(data_collector, "_configure", configure)

    assert ids(collector.load_failures()) == ["before"]
    collector.add_failure(make_example("big", prompt_chars=200_000))
    assert ids(collector.load_failures()) == ["before", "big"]


def test_os_error_on_write_is_a_clear_error_and_recoverable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("before"))
    collector.close()

    def no_space(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_collector.sqlite3, "connect", no_space)
    with pytest.raises(RuntimeError) as info:
        collector.add_failure(make_example("lost"))
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()

    collector.add_failure(make_example("after"))
    assert ids(collector.load_failures()) == ["before", "after"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="file permissions do not bind root",
)
def test_permission_denied_is_a_clear_error_and_recoverable(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("before"))
    collector.close()
    tmp_path.chmod(0o500)
    collector.db_path.chmod(0o400)
    try:
        with pytest.raises(RuntimeError, match=str(tmp_path)):
            collector.add_failure(make_example("denied"))
    finally:
        tmp_path.chmod(0o700)
        collector.db_path.chmod(0o600)
    collector.add_failure(make_example("after"))
    assert ids(collector.load_failures()) == ["before", "after"]


def test_ids_never_become_paths(tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    collector = DataCollector(data_dir)
    hostile = [
        "../escape",
        "../../etc/passwd",
        str(tmp_path / "abs"),
        "a/../../b",
        "\x00",
    ]
    before = sorted(tmp_path.rglob("*"))
    for example_id in hostile:
        collector.add_failure(make_example(example_id))
    collector.consume_failures(hostile[:2])
    after = sorted(tmp_path.rglob("*"))
    created = [p for p in after if p not in before]
    assert all(data_dir in p.parents for p in created)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists()
    assert ids(collector.load_failures()) == hostile[2:]
    assert ids(collector.load_replay_buffer()) == hostile[:2]


# --------------------------------------------------------------------- concurrency


def test_threads_sharing_a_store_lose_nothing(tmp_path: Path) -> None:
    shared = DataCollector(tmp_path)

    def write(prefix: str, collector: DataCollector) -> None:
        for i in range(40):
            collector.add_failure(make_example(f"{prefix}{i}"))
            if i % 10 == 9:
                collector.consume_failures([f"{prefix}{i - 1}"])

    # Three threads share one instance; two more use their own (own connections).
    writers = [(f"s{t}-", shared) for t in range(3)]
    writers += [(f"o{t}-", DataCollector(tmp_path)) for t in range(2)]
    with ThreadPoolExecutor(max_workers=len(writers)) as pool:
        futures = [pool.submit(write, prefix, c) for prefix, c in writers]
    for future in futures:
        future.result()  # re-raises a writer's exception
    all_ids = set(ids(shared.load_failures())) | set(ids(shared.load_replay_buffer()))
    expected = {f"{prefix}{i}" for prefix, _ in writers for i in range(40)}
    assert all_ids == expected
    assert shared.replay_buffer_size == 20


_CONCURRENT_WRITER = r"""
import sys, time
from speclora.data_collector import DataCollector, TrainingExample
data_dir, tag, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
# Both processes also race to create the database.
collector = DataCollector(data_dir)
for i in range(150):
    collector.add_failure(TrainingExample(
        id=f"{tag}-{i}", prompt="p" * (i * 37 % 3000), target_output="t",
        acceptance_rate=0.1, prompt_tokens=[i], disagreements=[],
        timestamp="2024-01-01T00:00:00"))
"""


def test_two_writer_processes_lose_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    start_at = f"{time.time() + 1.0:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_WRITER, str(data_dir), tag, start_at],
            env=subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    collector = DataCollector(data_dir)
    loaded = ids(collector.load_failures())
    assert sorted(loaded) == sorted(f"{t}-{i}" for t in "AB" for i in range(150))
    assert collector.corrupt_records == []


def _fork_child(collector: DataCollector) -> None:
    collector.add_failure(make_example("from-child"))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()"
)
def test_collector_inherited_through_fork_keeps_working(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("parent-1"))
    child = multiprocessing.get_context("fork").Process(
        target=_fork_child, args=(collector,)
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0
    collector.add_failure(make_example("parent-2"))
    assert sorted(ids(collector.load_failures())) == [
        "from-child",
        "parent-1",
        "parent-2",
    ]


# --------------------------------------------------------------------- crashes

_CRASH_WRITER = r"""
import random, sys
from speclora.data_collector import DataCollector, TrainingExample
data_dir, tag, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
collector = DataCollector(data_dir, replay_buffer_max_size=1_000_000)
pending = []
for i in range(1_000_000):
    example_id = f"{tag}-{i}"
    # Sizes from one page to many, so commits span several WAL frames.
    collector.add_failure(TrainingExample(
        id=example_id, prompt="p" * rng.randrange(0, 40_000), target_output="t",
        acceptance_rate=0.3, prompt_tokens=list(range(rng.randrange(0, 200))),
        disagreements=[], timestamp="2024-01-01T00:00:00"))
    print("added", example_id, flush=True)
    pending.append(example_id)
    if len(pending) == 5:
        collector.consume_failures(pending)
        print("consumed", *pending, flush=True)
        pending = []
"""


def run_crash_trials(data_dir: Path, kills: int, seed: int) -> None:
    """SIGKILL a writer at random moments; every acknowledged write must survive."""
    rng = random.Random(seed)
    added: set[str] = set()
    consumed: set[str] = set()
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_WRITER, str(data_dir), f"run{k}", str(k)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Covers start-up, schema creation, adds, consumes and WAL checkpoints.
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        for line in out.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # cut off mid-print: not an acknowledgement
            kind, *line_ids = line.split()
            (added if kind == "added" else consumed).update(line_ids)

    collector = DataCollector(data_dir, replay_buffer_max_size=1_000_000)
    failures = set(ids(collector.load_failures()))
    assert collector.corrupt_records == []
    replay = set(ids(collector.load_replay_buffer()))
    assert collector.corrupt_records == []
    assert added, "no writer got to acknowledge a write; the kill delays are too short"
    assert added <= failures | replay
    assert consumed <= replay
    assert not failures & replay  # a move is all-or-nothing
    with sqlite3.connect(collector.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    collector.add_failure(make_example("after-crashes"))
    assert collector.failure_count == len(failures) + 1


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    run_crash_trials(tmp_path / "store", kills=10, seed=1234)


@pytest.mark.slow
def test_acknowledged_writes_survive_many_sigkills(tmp_path: Path) -> None:
    run_crash_trials(tmp_path / "store", kills=120, seed=4321)
