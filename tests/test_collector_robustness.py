"""The store and the trainer against rows they cannot use and stores they cannot write.

Rows that are corrupt (invalid UTF-8, JSON nested past any parser's limit) are
quarantined; rows collected with another model pair are skipped and kept; rows whose
token ids fall outside the draft's vocabulary are skipped by the trainer. Each is
reported by name and training goes on with the rest. A store on a full or read-only
file system still serves reads; a foreign SQLite file is refused before anything is
written into it; Ctrl-C while waiting for another writer's lock ends the wait at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import speclora  # must precede mlx.core: it preloads OpenBLAS

# isort: split
import mlx.core as mx
import pytest
from helpers import TINY_VOCAB_SIZE, synthetic_example, tiny_system_config
from mlx_lm.models import llama
from speclora import SpeculativeDecodingSystem, data_collector
from speclora.data_collector import (
    DB_FILENAME,
    DataCollector,
    Disagreement,
    TrainingExample,
    pair_fingerprint,
)
from speclora.training import LoRATrainer

PYTHON_DIR = str(Path(speclora.__file__).resolve().parent.parent)
PAIR_A = pair_fingerprint({"a": 0, "b": 1})
PAIR_B = pair_fingerprint({"a": 0, "b": 1, "c": 2})


def make_example(example_id: str, **overrides: Any) -> TrainingExample:
    fields: dict[str, Any] = {
        "id": example_id,
        "prompt": "p",
        "target_output": "t",
        "acceptance_rate": 0.2,
        "prompt_tokens": [1, 2, 3],
        "disagreements": [],
        "timestamp": "2024-01-01T00:00:00",
        "output_tokens": [4, 5, 6],
    }
    fields.update(overrides)
    return TrainingExample(**fields)


def ids(examples: list[TrainingExample]) -> list[str]:
    return [e.id for e in examples]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p
    )
    return env


def insert_raw(db_path: Path, example_id: Any, payload: Any) -> None:
    """A failure row exactly as given, bypassing every check of the collector."""
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO failures (id, version, payload) VALUES (?, 1, ?)",
            (example_id, payload),
        )
    conn.close()


# ------------------------------------------------------------------ corrupt rows


def test_invalid_utf8_payload_is_quarantined_and_the_rest_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector = DataCollector(tmp_path)
    collector.add_failure(make_example("good"))
    raw = b'{"id": "bad-utf8", "prompt": "\xff\xfe"}'
    with sqlite3.connect(collector.db_path) as conn:
        # CAST AS TEXT stores the bytes unchanged in a TEXT value, as a foreign
        # writer or a damaged sector can.
        conn.execute(
            "INSERT INTO failures (id, version, payload) VALUES (?, 1, CAST(? AS TEXT))",
            ("bad-utf8", raw),
        )
    conn.close()

    with caplog.at_level(logging.WARNING, logger="speclora.data_collector"):
        assert ids(collector.load_failures()) == ["good"]
    [line] = collector.corrupt_records
    assert str(collector.db_path) in line and "table failures row" in line
    assert "'bad-utf8'" in line and "UTF-8" in line and "quarantine" in line
    assert line in caplog.text
    with sqlite3.connect(collector.db_path) as conn:
        kept = conn.execute("SELECT CAST(payload AS BLOB) FROM quarantine").fetchall()
    conn.close()
    assert kept == [(raw,)]  # kept byte for byte
    assert collector.failure_count == 1


def test_deeply_nested_json_row_is_quarantined_naming_the_row(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    deep = '{"id": "deep", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    insert_raw(collector.db_path, "deep", deep)
    collector.add_failure(make_example("good"))

    assert ids(collector.load_failures()) == ["good"]
    [line] = collector.corrupt_records
    assert str(collector.db_path) in line and "table failures row 1" in line
    assert "'deep'" in line and "nested" in line
    # The report stays readable however large the row is.
    assert len(line) < 1000
    with sqlite3.connect(collector.db_path) as conn:
        assert conn.execute("SELECT id FROM quarantine").fetchall() == [("deep",)]
    conn.close()


def test_huge_values_give_a_bounded_report(tmp_path: Path) -> None:
    collector = DataCollector(tmp_path)
    huge = json.dumps(
        {**make_example("huge").to_dict(), "prompt_tokens": ["x" * 10**6]}
    )
    insert_raw(collector.db_path, "huge", huge)
    assert collector.load_failures() == []
    [line] = collector.corrupt_records
    assert "prompt_tokens[0]" in line and len(line) < 1000


# ------------------------------------------------------------------ model pairs


def test_pair_fingerprint_identifies_the_vocabulary() -> None:
    vocab = {"<s>": 0, "a": 1, "b": 2}
    assert pair_fingerprint(vocab) == pair_fingerprint(dict(reversed(vocab.items())))
    assert pair_fingerprint(vocab) != pair_fingerprint({"<s>": 0, "a": 2, "b": 1})
    assert pair_fingerprint(vocab) != pair_fingerprint({**vocab, "c": 3})
    assert len(pair_fingerprint(vocab)) == 16
    with pytest.raises(ValueError, match="vocabulary"):
        pair_fingerprint({"a": "0"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="vocabulary"):
        pair_fingerprint([("a", 0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pair"):
        DataCollector("unused", pair="")


def test_records_of_another_pair_are_skipped_with_a_warning_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = DataCollector(tmp_path, pair=PAIR_A)
    b = DataCollector(tmp_path, pair=PAIR_B)
    a.add_failure(make_example("a1"))
    a.add_failure(make_example("a2"))
    b.add_failure(make_example("b1"))

    with caplog.at_level(logging.WARNING, logger="speclora.data_collector"):
        assert ids(b.load_failures()) == ["b1"]
    [line] = b.corrupt_records
    assert "table failures" in line and "2 records" in line
    assert PAIR_A in line and PAIR_B in line and "kept" in line
    assert line in caplog.text
    assert b.failure_count == 1
    # The other pair's records are intact and still its own.
    assert ids(a.load_failures()) == ["a1", "a2"] and a.failure_count == 2
    # A collector that names no pair sees everything, as before fingerprints.
    assert ids(DataCollector(tmp_path).load_failures()) == ["a1", "a2", "b1"]


def test_consuming_and_evicting_touch_only_this_pairs_records(tmp_path: Path) -> None:
    a = DataCollector(tmp_path, pair=PAIR_A, replay_buffer_max_size=2)
    b = DataCollector(tmp_path, pair=PAIR_B, replay_buffer_max_size=2)
    a.add_failure(make_example("a1"))
    a.consume_failures(["a1"])
    for i in range(3):
        b.add_failure(make_example(f"b{i}"))
    # An id of the other pair is not this collector's to move.
    assert b.consume_failures(["b0", "b1", "b2"]) == 3
    assert ids(b.load_replay_buffer()) == ["b1", "b2"]
    assert b.replay_buffer_size == 2
    assert ids(a.load_replay_buffer()) == ["a1"]  # not evicted by b's bound
    a.add_failure(make_example("a2"))
    assert b.consume_failures(["a2"]) == 0
    assert ids(a.load_failures()) == ["a2"]


_VERSION_1_SCHEMA = (
    """CREATE TABLE failures (seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE, version INTEGER NOT NULL, payload TEXT NOT NULL)""",
    """CREATE TABLE replay (seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL, version INTEGER NOT NULL, payload TEXT NOT NULL)""",
    "CREATE INDEX replay_id ON replay(id)",
    """CREATE TABLE quarantine (seq INTEGER PRIMARY KEY AUTOINCREMENT,
        source TEXT NOT NULL, source_seq INTEGER NOT NULL, id, version, payload,
        reason TEXT NOT NULL, quarantined_at TEXT NOT NULL)""",
)


def make_version_1_store(data_dir: Path, example_ids: list[str]) -> Path:
    """A store as the first release wrote it: no pair column, user_version 1."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = data_dir / DB_FILENAME
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in _VERSION_1_SCHEMA:
        conn.execute(statement)
    for example_id in example_ids:
        conn.execute(
            "INSERT INTO failures (id, version, payload) VALUES (?, 1, ?)",
            (example_id, json.dumps(make_example(example_id).to_dict())),
        )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    return db_path


def test_records_from_before_fingerprints_belong_to_the_pair_that_opens_them(
    tmp_path: Path,
) -> None:
    make_version_1_store(tmp_path, ["old1", "old2"])
    collector = DataCollector(tmp_path, pair=PAIR_A)
    assert ids(collector.load_failures()) == ["old1", "old2"]
    assert collector.corrupt_records == []
    collector.add_failure(make_example("new"))
    assert collector.consume_failures(["old1", "new"]) == 2
    assert ids(collector.load_replay_buffer()) == ["old1", "new"]
    assert ids(DataCollector(tmp_path, pair=PAIR_B).load_replay_buffer()) == ["old1"]


# ------------------------------------------------------------------ the trainer

MODEL_ARGS: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
}


def tiny_trainer(tmp_path: Path) -> LoRATrainer:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**MODEL_ARGS))
    mx.eval(model.parameters())
    config = {
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "min_examples": 1,
        "num_epochs": 1,
        "batch_size": 2,
        "rank": 2,
        "alpha": 4,
        "eval_fraction": 0.0,
    }
    return LoRATrainer(model, None, config)


def top_k_disagreement(token: int) -> Disagreement:
    return Disagreement(
        position=1,
        draft_token=5,
        target_token=6,
        draft_confidence=0.4,
        target_confidence=0.9,
        top_k_tokens=[6, token],
        top_k_logprobs=[-0.1, -2.4],
    )


def test_trainer_skips_out_of_vocabulary_examples_naming_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = tiny_trainer(tmp_path)
    examples = [
        make_example("good1"),
        make_example("oov", output_tokens=[4, 1_000_000]),
        make_example("past-int64", prompt_tokens=[2**70, 1]),
        make_example("oov-top-k", disagreements=[top_k_disagreement(2**70)]),
        make_example("good2", output_tokens=[7, 8, 9]),
    ]
    with caplog.at_level(logging.WARNING, logger="speclora"):
        results = trainer.train(examples)
    assert results["num_examples"] == 2
    for name, token in (
        ("'oov'", "1000000"),
        ("'past-int64'", str(2**70)),
        ("'oov-top-k'", str(2**70)),
    ):
        assert name in caplog.text and token in caplog.text
    assert "vocabulary of 64" in caplog.text


def test_trainer_refuses_when_no_example_is_usable(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="None of the 1 training examples"):
        trainer.train([make_example("oov", output_tokens=[1_000_000])])


# ------------------------------------------------------------------ the system


def test_training_goes_on_past_rows_it_cannot_use(
    tiny_model_dir: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    data_dir = Path(config["collection"]["data_dir"])  # type: ignore[index]
    unstamped = DataCollector(data_dir)
    unstamped.add_failure(synthetic_example("good1", 1))
    unstamped.add_failure(synthetic_example("good2", 2))
    unstamped.add_failure(
        make_example("oov", output_tokens=[5, 1_000_000, TINY_VOCAB_SIZE])
    )
    DataCollector(data_dir, pair=PAIR_B).add_failure(synthetic_example("other", 3))
    insert_raw(unstamped.db_path, "deep", "[" * 100_000 + "]" * 100_000)
    with sqlite3.connect(unstamped.db_path) as conn:
        conn.execute(
            "INSERT INTO failures (id, version, payload) VALUES (?, 1, CAST(? AS TEXT))",
            ("bad-utf8", b"\xff{"),
        )
    conn.close()
    unstamped.close()

    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None and system.manager is not None
    assert system.collector.pair == pair_fingerprint(
        system.manager.tokenizer.get_vocab()
    )
    with caplog.at_level(logging.WARNING, logger="speclora"):
        results = system.train()
    assert results["num_examples"] == 2
    for named in ("'oov'", "1000000", "'deep'", "'bad-utf8'", "1 record of", PAIR_B):
        assert named in caplog.text
    with sqlite3.connect(unstamped.db_path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM quarantine")) == [
            "bad-utf8",
            "deep",
        ]
        # Valid for its own pair: neither trained on, nor moved, nor deleted.
        assert conn.execute("SELECT id FROM failures").fetchall() == [("other",)]
    conn.close()
    system.collector.close()


# ------------------------------------------------------------------ unwritable stores

_READER = textwrap.dedent(
    r"""
    import json, resource, signal, sys
    from speclora.data_collector import DataCollector, TrainingExample

    data_dir, limit = sys.argv[1], int(sys.argv[2])
    if limit >= 0:
        # Files may not grow past `limit` bytes: every write that needs space fails,
        # as on a full disk (SIGXFSZ would kill the process instead of failing).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    collector = DataCollector(data_dir, **({"pair": sys.argv[3]} if sys.argv[3:] else {}))
    out = {
        "failure_count": collector.failure_count,
        "failures": [e.id for e in collector.load_failures()],
        "replay": [e.id for e in collector.load_replay_buffer()],
        "replay_buffer_size": collector.replay_buffer_size,
    }
    try:
        collector.add_failure(TrainingExample(
            id="refused", prompt="p", target_output="t", acceptance_rate=0.1,
            prompt_tokens=[1], disagreements=[], timestamp="2024-01-01T00:00:00"))
        out["write"] = "accepted"
    except RuntimeError as exc:
        out["write"] = str(exc)
    print(json.dumps(out))
    """
)


def reader(
    data_dir: Path, *, file_size_limit: int = -1, pair: str = ""
) -> subprocess.CompletedProcess[str]:
    """A new process that opens the store, reads everything and tries one write."""
    return subprocess.run(
        [sys.executable, "-c", _READER, str(data_dir), str(file_size_limit)]
        + ([pair] if pair else []),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_reader(data_dir: Path, **kwargs: Any) -> dict[str, Any]:
    proc = reader(data_dir, **kwargs)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return out


def make_store(data_dir: Path) -> DataCollector:
    collector = DataCollector(data_dir)
    for i in range(3):
        collector.add_failure(make_example(f"e{i}"))
    collector.consume_failures(["e0"])
    collector.close()
    return collector


def digest(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file()}


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_full_disk_store_serves_reads_and_refuses_writes(tmp_path: Path) -> None:
    collector = make_store(tmp_path)
    before = digest(tmp_path)
    out = run_reader(tmp_path, file_size_limit=1)
    assert out["failure_count"] == 2 and out["failures"] == ["e1", "e2"]
    assert out["replay"] == ["e0"] and out["replay_buffer_size"] == 1
    assert str(tmp_path) in out["write"] and "add a failure" in out["write"]
    assert digest(tmp_path)[DB_FILENAME] == before[DB_FILENAME]
    # Nothing is stuck: with space back, the same store takes writes again.
    collector.add_failure(make_example("after"))
    assert ids(collector.load_failures()) == ["e1", "e2", "after"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_full_disk_store_of_the_old_layout_is_read_without_upgrading(
    tmp_path: Path,
) -> None:
    db_path = make_version_1_store(tmp_path, ["old1", "old2"])
    before = db_path.read_bytes()
    out = run_reader(tmp_path, file_size_limit=1, pair=PAIR_A)
    assert out["failures"] == ["old1", "old2"] and out["failure_count"] == 2
    assert str(tmp_path) in out["write"]
    assert db_path.read_bytes() == before


_CRASH_AFTER_ADD = textwrap.dedent(
    r"""
    import os, sys
    from speclora.data_collector import DataCollector, TrainingExample

    collector = DataCollector(sys.argv[1])
    # No checkpoint: the record stays in the WAL, as when a process dies mid-run.
    collector._connection().execute("PRAGMA wal_autocheckpoint=0")
    collector.add_failure(TrainingExample(
        id="in-wal", prompt="p", target_output="t", acceptance_rate=0.1,
        prompt_tokens=[1], disagreements=[], timestamp="2024-01-01T00:00:00"))
    os._exit(0)
    """
)


def crash_after_add(data_dir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-c", _CRASH_AFTER_ADD, str(data_dir)],
        env=subprocess_env(),
        check=True,
        timeout=120,
    )
    wal = data_dir / (DB_FILENAME + "-wal")
    assert wal.stat().st_size > 0
    return wal


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A store and a read-only view of it: (writable path, read-only path)."""
    source, view = tmp_path / "store", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    if os.geteuid() != 0:
        # File permissions bind everyone but root.
        yield source, source
        return
    # Root ignores permissions: a read-only bind mount binds it too.
    bound = subprocess.run(
        ["mount", "--bind", str(source), str(view)], capture_output=True, check=False
    )
    if bound.returncode != 0:
        pytest.skip("running as root without permission to mount")
    try:
        made_read_only = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(view)],
            capture_output=True,
            check=False,
        )
        if made_read_only.returncode != 0:
            pytest.skip("running as root without permission to remount read-only")
        yield source, view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def read_only_reader(source: Path, view: Path) -> subprocess.CompletedProcess[str]:
    """reader() on ``view``; when that is ``source`` itself, with write permission
    taken away meanwhile."""
    if view != source:
        return reader(view)
    for p in source.iterdir():
        p.chmod(0o444)
    source.chmod(0o555)
    try:
        return reader(view)
    finally:
        source.chmod(0o755)
        for p in source.iterdir():
            p.chmod(0o644)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_read_only_store_serves_reads_and_refuses_writes(
    read_only_view: tuple[Path, Path],
) -> None:
    source, view = read_only_view
    make_store(source)
    before = digest(source)
    proc = read_only_reader(source, view)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failure_count"] == 2 and out["failures"] == ["e1", "e2"]
    assert out["replay"] == ["e0"] and out["replay_buffer_size"] == 1
    assert str(view) in out["write"] and "read-only" in out["write"]
    assert digest(source) == before


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_read_only_store_left_by_a_crash_serves_what_was_committed(
    read_only_view: tuple[Path, Path],
) -> None:
    source, view = read_only_view
    make_store(source)
    crash_after_add(source)
    before = digest(source)
    proc = read_only_reader(source, view)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failures"] == ["e1", "e2", "in-wal"] and out["failure_count"] == 3
    assert digest(source) == before


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_commits_that_cannot_be_read_are_refused_not_silently_missed(
    read_only_view: tuple[Path, Path],
) -> None:
    source, view = read_only_view
    make_store(source)
    crash_after_add(source)
    # A copy without SQLite's shared-memory file: reading the WAL needs a new one.
    (source / (DB_FILENAME + "-shm")).unlink()
    proc = read_only_reader(source, view)
    assert proc.returncode != 0
    [error] = [line for line in proc.stderr.splitlines() if "RuntimeError" in line]
    assert str(view) in error and "-wal" in error
    # Once the store can be written, the record is there.
    assert "in-wal" in ids(DataCollector(source).load_failures())


# ------------------------------------------------------------------ foreign files


@pytest.mark.parametrize(
    "statements",
    [
        ["CREATE TABLE notes (body TEXT)", "INSERT INTO notes VALUES ('mine')"],
        [
            "CREATE TABLE failures (name TEXT, amount REAL)",
            "INSERT INTO failures VALUES ('x', 1.5)",
            "PRAGMA user_version = 1",
        ],
    ],
    ids=["unrelated tables", "same table name, other columns"],
)
def test_foreign_database_is_refused_before_anything_is_written(
    tmp_path: Path, statements: list[str]
) -> None:
    db_path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(db_path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    before = digest(tmp_path)
    with pytest.raises(RuntimeError, match="not a speclora") as info:
        DataCollector(tmp_path)
    assert str(db_path) in str(info.value)
    assert digest(tmp_path) == before  # same bytes, no WAL, no journal


# ------------------------------------------------------------------ Ctrl-C

_WAIT_FOR_LOCK = textwrap.dedent(
    r"""
    import sys
    from speclora import data_collector
    from speclora.data_collector import DataCollector, TrainingExample

    configure = data_collector._configure

    def traced(conn):
        configure(conn)

        # Called as each statement starts, from inside SQLite's step: once this has
        # printed BEGIN IMMEDIATE, the process is waiting on the lock. It removes
        # itself first: SQLite swallows an exception raised inside a callback, so
        # a Ctrl-C landing there would be lost to the test, not to a user.
        def once(sql):
            if sql == "BEGIN IMMEDIATE":
                conn.set_trace_callback(None)
                print(sql, flush=True)

        conn.set_trace_callback(once)

    data_collector._configure = traced
    collector = DataCollector(sys.argv[1])
    collector.add_failure(TrainingExample(
        id="late", prompt="p", target_output="t", acceptance_rate=0.1,
        prompt_tokens=[1], disagreements=[], timestamp="2024-01-01T00:00:00"))
    print("added", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT delivery")
def test_ctrl_c_while_waiting_for_a_lock_ends_the_wait(tmp_path: Path) -> None:
    DataCollector(tmp_path).close()
    holder = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, holding the lock
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAIT_FOR_LOCK, str(tmp_path)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.strip() == "BEGIN IMMEDIATE":
                break
        else:
            pytest.fail(f"the writer never tried to write: {proc.stderr.read()}")
        # Until it exits, within half the lock wait (an ignored Ctrl-C waits all of
        # it); repeated in case one lands in the callback's last bytecodes.
        deadline = time.monotonic() + data_collector._BUSY_TIMEOUT_S / 2
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        _, err = proc.communicate(timeout=1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        holder.execute("ROLLBACK")
        holder.close()
    assert "KeyboardInterrupt" in err
    assert ids(DataCollector(tmp_path).load_failures()) == []
