"""Durable store of low-acceptance generations and the replay buffer.

Failures are examples awaiting training. After a successful training run the caller
hands their ids to :meth:`DataCollector.consume_failures`, which moves them into the
replay buffer: a bounded FIFO (oldest evicted first) mixed into later training so the
draft does not forget what it learned. A loop "train when ``failure_count >= N``"
therefore trains once per ``N`` new failures.

Everything lives in one SQLite database, ``<data_dir>/collector.sqlite3`` (WAL journal,
``synchronous=FULL``): :meth:`DataCollector.add_failure` returns only after the record
is committed and fsync'd, a crash at any instant leaves the last committed state, and
several threads or processes may share a ``data_dir``. Every row carries the
fingerprint of the model pair that collected it (:func:`pair_fingerprint`), so pairs
with different vocabularies can share one ``data_dir`` without mixing their examples.
A store that cannot be written (full disk, read-only file system) still serves reads.
See ``docs/data-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import reprlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from speclora.records import RECORD_VERSION, Disagreement, TrainingExample

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = [
    "DB_FILENAME",
    "RECORD_VERSION",
    "DataCollector",
    "Disagreement",
    "TrainingExample",
    "pair_fingerprint",
]

logger = logging.getLogger(__name__)

DB_FILENAME = "collector.sqlite3"
"""Name of the database file inside ``data_dir``."""

SCHEMA_VERSION = 2
"""Layout of the tables, stored in the database header (``PRAGMA user_version``).

``2`` added the ``pair`` column to ``failures`` and ``replay``."""

# How long a writer waits for another thread or process to finish its transaction.
_BUSY_TIMEOUT_S = 60.0
# SQLite waits for a lock inside C, where Ctrl-C is not seen until it returns: it
# waits in slices this long, and the loop around them checks for interruption.
_BUSY_SLICE_S = 0.05
# Stay well below SQLite's limit on bound parameters per statement.
_IDS_PER_QUERY = 500

_SCHEMA = (
    # AUTOINCREMENT: seq never reuses a deleted value, so seq order is insertion order.
    # pair: pair_fingerprint() of the collecting pair; NULL in rows stored before
    # fingerprints existed, which every pair reads as its own.
    """CREATE TABLE IF NOT EXISTS failures (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        version INTEGER NOT NULL,
        payload TEXT NOT NULL,
        pair TEXT)""",
    """CREATE TABLE IF NOT EXISTS replay (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        payload TEXT NOT NULL,
        pair TEXT)""",
    "CREATE INDEX IF NOT EXISTS replay_id ON replay(id)",
    # Untyped columns: a corrupt row is kept exactly as it was found.
    """CREATE TABLE IF NOT EXISTS quarantine (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        source TEXT NOT NULL,
        source_seq INTEGER NOT NULL,
        id,
        version,
        payload,
        reason TEXT NOT NULL,
        quarantined_at TEXT NOT NULL)""",
)

# Statements that bring layout N to N + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE failures ADD COLUMN pair TEXT",
        "ALTER TABLE replay ADD COLUMN pair TEXT",
    ),
}

# Columns every layout has: a file whose tables lack them is not one of ours.
_TABLE_COLUMNS = {
    "failures": {"seq", "id", "version", "payload"},
    "replay": {"seq", "id", "version", "payload"},
    "quarantine": {
        "seq",
        "source",
        "source_seq",
        "id",
        "version",
        "payload",
        "reason",
        "quarantined_at",
    },
}
_INDEXES = {"replay_id"}

# Reports name values; these bounds keep a line readable whatever a row holds.
_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_MAX_REASON_CHARS = 400

# Connections inherited through fork() must be neither used nor closed by the child
# (closing one could checkpoint or delete the parent's WAL); keep them referenced.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []

_T = TypeVar("_T")


class _Undecodable(bytes):
    """A TEXT value that is not valid UTF-8, kept as its raw bytes."""


def _decode_text(raw: bytes) -> str | bytes:
    # The default text factory fails the whole query on one bad value.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _Undecodable(raw)


def _shorten(text: str, limit: int = _MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pair_fingerprint(vocab: Mapping[str, int]) -> str:
    """Identify a model pair by its tokenizer's vocabulary.

    Token ids mean something only under the tokenizer that produced them, so the
    collector keeps each pair's records apart by this fingerprint. Pairs that share a
    tokenizer share a fingerprint, and so their records.

    Args:
        vocab (Mapping[str, int]): The tokenizer's token-to-id mapping, e.g.
          ``tokenizer.get_vocab()``.

    Returns:
        str: 16 hexadecimal digits: the start of a SHA-256 over the vocabulary's size
        and its (id, token) pairs in id order.

    Raises:
        ValueError: If ``vocab`` is not a mapping of ``str`` to ``int``.
    """
    if not isinstance(vocab, Mapping):
        raise ValueError(
            "[pair_fingerprint] the vocabulary must be a mapping of str to int, got "
            f"{type(vocab).__name__}"
        )
    items: list[tuple[int, str]] = []
    for token, index in vocab.items():
        if (
            not isinstance(token, str)
            or isinstance(index, bool)
            or not isinstance(index, int)
        ):
            raise ValueError(
                "[pair_fingerprint] the vocabulary must map str to int, got "
                f"{_REPR.repr(token)}: {_REPR.repr(index)}"
            )
        items.append((index, token))
    items.sort()
    # JSON keeps the encoding unambiguous whatever characters the tokens hold.
    text = json.dumps([len(items), items], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


@dataclass
class _Layout:
    """What a database holds, read without writing anything."""

    version: int  # PRAGMA user_version
    journal_mode: str
    columns: dict[str, set[str]] = field(default_factory=dict)  # our tables only
    foreign: list[str] = field(default_factory=list)  # objects that are not ours

    def problem(self) -> str | None:
        """Why this is not a database of ours, or None."""
        if self.version == 0:
            if self.columns or self.foreign:
                names = sorted(self.columns) + self.foreign
                return f"it holds {', '.join(names)} but no speclora schema version"
            return None
        missing = [
            f"{table}({', '.join(sorted(needed - self.columns.get(table, set())))})"
            for table, needed in _TABLE_COLUMNS.items()
            if not needed <= self.columns.get(table, set())
        ]
        if missing:
            return f"it lacks {', '.join(missing)}"
        return None


def _inspect(conn: sqlite3.Connection) -> _Layout:
    """Read the layout; runs only queries, so it works on any readable file."""
    layout = _Layout(
        version=conn.execute("PRAGMA user_version").fetchone()[0],
        journal_mode=str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower(),
    )
    objects = conn.execute(
        "SELECT type, name FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    for kind, name in objects:
        if kind == "table" and name in _TABLE_COLUMNS:
            # name is one of ours, so it is safe to splice into the statement.
            info = conn.execute(f"PRAGMA table_info({name})").fetchall()
            layout.columns[name] = {row[1] for row in info}
        elif not (kind == "index" and name in _INDEXES):
            layout.foreign.append(f"{kind} {_REPR.repr(name)}")
    return layout


def _has_pair_column(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "pair" for row in conn.execute("PRAGMA table_info(failures)"))


def _configure(conn: sqlite3.Connection) -> None:
    """Apply the per-connection durability settings."""
    # FULL: in WAL mode every commit fsyncs the WAL before returning.
    conn.execute("PRAGMA synchronous=FULL")
    # macOS: plain fsync does not flush the drive's cache; F_FULLFSYNC does.
    conn.execute("PRAGMA fullfsync=ON")
    conn.execute("PRAGMA checkpoint_fullfsync=ON")


def _fsync_dir(path: Path) -> None:
    """Make directory entries created in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` is a lock conflict (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DataCollector:
    """Collects low-acceptance generations and keeps a bounded replay buffer.

    Args:
        data_dir (str or os.PathLike): Directory holding the store; created if missing.
          ``~`` is expanded.
        replay_buffer_max_size (int): Most examples the replay buffer keeps; when full,
          the oldest entries are evicted first (FIFO). ``0`` disables it. Default:
          ``100``.
        acceptance_threshold (float): Generations whose acceptance rate is below this
          are failures (:meth:`is_failure`). Default: ``0.5``.
        pair (str, optional): :func:`pair_fingerprint` of the model pair. Records are
          stored with it, and only records of this pair (or stored without a pair)
          are loaded, counted, moved or evicted; those of other pairs are reported and
          kept. ``None`` reads every record and stores records without a pair.
          Default: ``None``.

    A store that cannot be written (full disk, read-only file system or permissions)
    still opens and serves loads and counts; writes then raise ``RuntimeError``.

    Raises:
        ValueError: If ``data_dir`` exists and is not a directory, or an argument is out
          of range.
        RuntimeError: If the directory or database cannot be created or read, the
          database was written by a newer version of this package, or the file is
          another program's database (refused before anything is written into it).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        replay_buffer_max_size: int = 100,
        acceptance_threshold: float = 0.5,
        *,
        pair: str | None = None,
    ) -> None:
        if isinstance(replay_buffer_max_size, bool) or not isinstance(
            replay_buffer_max_size, int
        ):
            raise ValueError(
                "[DataCollector] replay_buffer_max_size must be an int, got "
                f"{replay_buffer_max_size!r}"
            )
        if replay_buffer_max_size < 0:
            raise ValueError(
                "[DataCollector] replay_buffer_max_size must be >= 0, got "
                f"{replay_buffer_max_size}"
            )
        if (
            isinstance(acceptance_threshold, bool)
            or not isinstance(acceptance_threshold, (int, float))
            or not 0.0 <= acceptance_threshold <= 1.0
        ):
            raise ValueError(
                "[DataCollector] acceptance_threshold must be a float in [0, 1], got "
                f"{acceptance_threshold!r}"
            )
        if pair is not None and (not isinstance(pair, str) or not pair):
            raise ValueError(
                "[DataCollector] pair must be a non-empty str (see pair_fingerprint) "
                f"or None, got {_REPR.repr(pair)}"
            )
        self.replay_buffer_max_size = replay_buffer_max_size
        self.acceptance_threshold = float(acceptance_threshold)
        self.pair = pair

        path = Path(os.fspath(data_dir)).expanduser().absolute()
        created = not path.is_dir()
        if created:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                # The path, or one of its parents, is a file.
                raise ValueError(
                    f"[DataCollector] data_dir {str(path)!r} is not a directory"
                ) from None
            except OSError as exc:
                raise RuntimeError(
                    f"[DataCollector] cannot create data_dir {str(path)!r}: {exc}"
                ) from exc
        self.data_dir = path
        self.db_path = path / DB_FILENAME
        self.corrupt_records: list[str] = []
        """Descriptions of the records skipped by the last load (file, table, row, why)."""

        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = -1
        # Whether the tables are at SCHEMA_VERSION in WAL mode: until then every write
        # first brings them there (and reads allow for the older layout).
        self._ready = False
        new_db = not self.db_path.exists()
        self._open_store()
        if new_db and self._ready:
            _fsync_dir(path)
        if created:
            _fsync_dir(path.parent)

    # ------------------------------------------------------------------ public API

    def is_failure(self, acceptance_rate: float) -> bool:
        """Whether a generation with this acceptance rate should be collected.

        Args:
            acceptance_rate (float): Fraction of drafted tokens accepted.

        Returns:
            bool: ``acceptance_rate < acceptance_threshold``.
        """
        if isinstance(acceptance_rate, bool) or not isinstance(
            acceptance_rate, (int, float)
        ):
            raise ValueError(
                f"[DataCollector] acceptance_rate must be a float, got {acceptance_rate!r}"
            )
        if math.isnan(acceptance_rate):
            raise ValueError("[DataCollector] acceptance_rate must not be NaN")
        return acceptance_rate < self.acceptance_threshold

    def add_failure(self, example: TrainingExample) -> None:
        """Store ``example`` as a failure awaiting training, tagged with ``pair``.

        When this returns, the example is committed and fsync'd: it survives a crash
        or power loss.

        Args:
            example (TrainingExample): The generation to keep. It is validated again
              (it may have been modified since construction).

        Raises:
            ValueError: If ``example`` is invalid, or a failure with the same id is
              already awaiting training.
            RuntimeError: If the store cannot be written (disk full, permission
              denied, read-only file system, ...); the store is left as it was, and
              later calls work again once the cause is gone.
        """
        if not isinstance(example, TrainingExample):
            raise ValueError(
                "[DataCollector] add_failure expects a TrainingExample, got "
                f"{type(example).__name__}"
            )
        example.validate()
        payload = json.dumps(example.to_dict(), allow_nan=False, separators=(",", ":"))

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO failures (id, version, payload, pair) "
                    "VALUES (?, ?, ?, ?)",
                    (example.id, RECORD_VERSION, payload, self.pair),
                )
            except sqlite3.IntegrityError:
                raise ValueError(
                    f"[DataCollector] a failure with id {example.id!r} is already "
                    f"awaiting training in {str(self.db_path)!r}"
                ) from None

        self._write("add a failure", insert)

    def load_failures(self) -> list[TrainingExample]:
        """Return this pair's failures awaiting training, oldest first.

        Corrupt records (invalid JSON or UTF-8, nesting too deep to read, a record
        failing validation) are reported (``corrupt_records`` and a logged warning
        naming the file, table, row and reason) and moved to the ``quarantine``
        table; records written by a newer format version, and records of another
        model pair, are reported and skipped but kept.

        Returns:
            list[TrainingExample]: The readable failures.

        Raises:
            RuntimeError: If the database cannot be read.
        """
        rows, others = self._read(
            "load failures", lambda conn: self._select(conn, "failures", "ASC")
        )
        examples, skipped = self._decode(rows, "failures", limit=None)
        self._finish_load(skipped, "failures", others)
        return examples

    def load_replay_buffer(self) -> list[TrainingExample]:
        """Return this pair's replay buffer, oldest first (at most
        ``replay_buffer_max_size``).

        Unreadable records are handled as in :meth:`load_failures`.

        Returns:
            list[TrainingExample]: The newest readable replay entries.

        Raises:
            RuntimeError: If the database cannot be read.
        """
        limit = self.replay_buffer_max_size
        if limit == 0:
            self.corrupt_records = []
            return []
        # Newest first, so that the bound keeps the most recent entries even when this
        # collector's bound is smaller than the one that filled the buffer.
        rows, others = self._read(
            "load the replay buffer",
            lambda conn: self._select(conn, "replay", "DESC"),
        )
        examples, skipped = self._decode(rows, "replay", limit=limit)
        self._finish_load(skipped, "replay", others)
        examples.reverse()
        return examples

    def consume_failures(self, ids: Iterable[str]) -> int:
        """Move trained-on failures into the replay buffer.

        Call after a successful training run with the ids of the failures it used. In
        one transaction the failures leave the pending set, enter the replay buffer in
        the order they were collected (replacing an older replay entry with the same
        id), and the buffer is trimmed to ``replay_buffer_max_size`` by evicting its
        oldest entries (FIFO). Only records of this collector's pair are moved or
        evicted.

        Args:
            ids (Iterable[str]): Example ids; unknown ids are ignored.

        Returns:
            int: How many failures were moved.

        Raises:
            ValueError: If ``ids`` is a single string or holds a non-string.
            RuntimeError: If the store cannot be written; nothing is moved then.
        """
        if isinstance(ids, (str, bytes)):
            raise ValueError(
                f"[DataCollector] consume_failures expects an iterable of ids, got {ids!r}"
            )
        wanted: list[str] = []
        for i in ids:
            if not isinstance(i, str):
                raise ValueError(
                    f"[DataCollector] example ids must be str, got {type(i).__name__} {i!r}"
                )
            wanted.append(i)
        wanted = list(dict.fromkeys(wanted))
        bound = self.replay_buffer_max_size
        scope, scope_args = self._scope(has_pair=True)

        def move(conn: sqlite3.Connection) -> int:
            rows: list[tuple[Any, ...]] = []
            for chunk in _chunks(wanted, _IDS_PER_QUERY):
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    "SELECT seq, id, version, payload, pair FROM failures "
                    f"WHERE id IN ({marks}) AND {scope}",
                    (*chunk, *scope_args),
                ).fetchall()
            rows.sort(key=lambda row: row[0])
            for seq, example_id, version, payload, pair in rows:
                conn.execute("DELETE FROM failures WHERE seq = ?", (seq,))
                conn.execute(
                    f"DELETE FROM replay WHERE id = ? AND {scope}",
                    (example_id, *scope_args),
                )
                conn.execute(
                    "INSERT INTO replay (id, version, payload, pair) "
                    "VALUES (?, ?, ?, ?)",
                    (example_id, version, payload, pair),
                )
            conn.execute(
                f"DELETE FROM replay WHERE {scope} AND seq NOT IN "
                f"(SELECT seq FROM replay WHERE {scope} ORDER BY seq DESC LIMIT ?)",
                (*scope_args, *scope_args, bound),
            )
            return len(rows)

        return self._write("consume failures", move)

    @property
    def failure_count(self) -> int:
        """Number of this pair's failures awaiting training (records of a newer format
        excluded)."""
        return self._count("failures")

    @property
    def replay_buffer_size(self) -> int:
        """Number of this pair's replay entries, at most ``replay_buffer_max_size``."""
        return min(self._count("replay"), self.replay_buffer_max_size)

    def close(self) -> None:
        """Close the database connection; the next call reopens it."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DataCollector(data_dir={str(self.data_dir)!r}, "
            f"replay_buffer_max_size={self.replay_buffer_max_size}, "
            f"acceptance_threshold={self.acceptance_threshold}, pair={self.pair!r})"
        )

    # ------------------------------------------------------------------ internals

    def _connection(self) -> sqlite3.Connection:
        """The open connection of this process (caller holds ``_lock``)."""
        if self._conn is not None and self._conn_pid != os.getpid():
            _INHERITED_CONNECTIONS.append(self._conn)
            self._conn = None
        if self._conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            conn = sqlite3.connect(
                self.db_path,
                timeout=_BUSY_SLICE_S,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.text_factory = _decode_text
                _configure(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._conn_pid = os.getpid()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._conn_pid != os.getpid():
            _INHERITED_CONNECTIONS.append(conn)
            return
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def _error(self, action: str, exc: BaseException, *, write: bool) -> RuntimeError:
        hint = self._write_hint() if write else self._read_hint()
        return RuntimeError(
            f"[DataCollector] could not {action} in data_dir {str(self.data_dir)!r} "
            f"(database {DB_FILENAME}): {type(exc).__name__}: {exc}{hint}"
        )

    def _read_hint(self) -> str:
        wal = DB_FILENAME + "-wal"
        try:
            pending = (self.data_dir / wal).stat().st_size > 0
        except OSError:
            pending = False
        if not pending:
            return ""
        return (
            f"; records committed to {wal} are readable only where SQLite can create "
            f"or update {DB_FILENAME}-shm beside it: make data_dir writable (or free "
            "space) and read again"
        )

    def _write_hint(self) -> str:
        """Why the store may not take writes, as far as the file system tells."""
        try:
            stat = os.statvfs(self.data_dir)
        except (AttributeError, OSError):
            return ""
        if stat.f_flag & getattr(os, "ST_RDONLY", 1):
            return "; data_dir is on a read-only file system"
        writable = os.access(self.data_dir, os.W_OK) and (
            not self.db_path.exists() or os.access(self.db_path, os.W_OK)
        )
        if not writable:
            return "; data_dir is read-only for this user"
        if stat.f_bavail == 0:
            return "; the file system is full"
        return ""

    def _write(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in one write transaction; all of it commits or none of it."""
        if not self._ready:
            self._upgrade(action)
        return self._transaction(action, body)

    def _transaction(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        def transaction(conn: sqlite3.Connection) -> _T:
            # IMMEDIATE takes the write lock up front, so a concurrent writer waits
            # (busy timeout) instead of failing when it upgrades a read lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return self._run(action, transaction, write=True)

    def _read(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        return self._run(action, body, write=False)

    def _run(
        self, action: str, body: Callable[[sqlite3.Connection], _T], *, write: bool
    ) -> _T:
        """Run ``body`` on this process's connection, mapping failures to RuntimeError.

        A read that fails on the normal connection (which needs to create or grow
        SQLite's side files) is retried on one that writes nothing.
        """
        with self._lock:
            deadline = time.monotonic() + _BUSY_TIMEOUT_S
            attempt = 0
            while True:
                try:
                    return body(self._connection())
                except sqlite3.OperationalError as exc:
                    # SQLite reports some lock conflicts (a journal-mode change, WAL
                    # recovery by another process) at once instead of calling the busy
                    # handler; body left nothing behind, so it is safe to run again.
                    # Sleeping here, not in SQLite, lets Ctrl-C end the wait.
                    if _is_busy(exc):
                        if time.monotonic() < deadline:
                            attempt += 1
                            time.sleep(min(0.005 * attempt, 0.1))
                            continue
                        # Another process is writing: a lock-free read could see
                        # its half-done checkpoint, so no fallback.
                        self._drop_connection()
                        raise self._error(action, exc, write=write) from exc
                    failure: BaseException = exc
                except (sqlite3.Error, OSError) as exc:
                    failure = exc
                # A fresh connection next time: nothing of a failed one is trusted.
                self._drop_connection()
                if not write:
                    found = self._read_without_writing(body)
                    if found:
                        return found[0]
                raise self._error(action, failure, write=write) from failure

    def _read_without_writing(
        self, body: Callable[[sqlite3.Connection], _T]
    ) -> list[_T]:
        """Run ``body`` on a connection that writes nothing: ``[result]``, or ``[]``
        when no such connection can read the store."""
        uri = self.db_path.as_uri()
        candidates = [f"{uri}?mode=ro"]
        wal = self.db_path.with_name(DB_FILENAME + "-wal")
        try:
            wal_empty = wal.stat().st_size == 0
        except FileNotFoundError:
            wal_empty = True
        except OSError:
            wal_empty = False
        if wal_empty:
            # Everything committed is in the main file, and the store cannot be
            # written, so reading it as an unchanging file (which needs no shared
            # memory file) sees exactly the committed state.
            candidates.append(f"{uri}?mode=ro&immutable=1")
        for candidate in candidates:
            try:
                conn = sqlite3.connect(
                    candidate,
                    uri=True,
                    timeout=_BUSY_SLICE_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            except (sqlite3.Error, OSError):
                continue
            try:
                conn.text_factory = _decode_text
                return [body(conn)]
            except (sqlite3.Error, OSError):
                continue
            finally:
                conn.close()
        return []

    def _open_store(self) -> None:
        """Check the file is ours and current, bringing it up to date if it is not.

        Nothing is written unless it must be: a current store opens with reads only,
        and a foreign or newer file is refused before any write.
        """
        layout = self._read("open the database", _inspect)
        self._check_layout(layout)
        if layout.version == SCHEMA_VERSION and layout.journal_mode == "wal":
            self._ready = True
            return
        try:
            self._upgrade("open the database")
        except RuntimeError as exc:
            if layout.version == 0:
                raise  # no tables to read either
            logger.warning(
                "the collected-data store cannot be written, so it is read only; "
                "storing failures and handing them to the replay buffer will fail "
                "until it can: %s",
                exc,
            )

    def _check_layout(self, layout: _Layout) -> None:
        if layout.version > SCHEMA_VERSION:
            raise RuntimeError(
                f"[DataCollector] {str(self.db_path)!r} has schema version "
                f"{layout.version}, newer than the supported {SCHEMA_VERSION}; "
                "upgrade speclora"
            )
        problem = layout.problem()
        if problem is not None:
            raise RuntimeError(
                f"[DataCollector] {str(self.db_path)!r} is not a speclora collector "
                f"database ({problem}); it was left untouched: move it away or choose "
                "another data_dir"
            )

    def _upgrade(self, action: str) -> None:
        """Create or migrate the tables and switch to WAL (needs a writable store)."""

        def migrate(conn: sqlite3.Connection) -> None:
            # Again inside the write lock: another process may have done it meanwhile.
            layout = _inspect(conn)
            self._check_layout(layout)
            if layout.version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
            else:
                for version in range(layout.version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[version]:
                        conn.execute(statement)
            if layout.version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        # Persistent in the file; a no-op once set. WAL lets readers run alongside
        # one writer and makes each commit a single fsync'd append.
        mode = self._run(
            action,
            lambda conn: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0],
            write=True,
        )
        if str(mode).lower() != "wal":
            raise RuntimeError(
                f"[DataCollector] {str(self.db_path)!r} cannot use WAL journaling "
                f"(got {mode!r}); is data_dir on a network file system?"
            )
        self._transaction(action, migrate)
        self._ready = True

    def _scope(self, *, has_pair: bool) -> tuple[str, tuple[str, ...]]:
        """SQL condition selecting this collector's rows, and its parameters."""
        if self.pair is None or not has_pair:
            return "1", ()
        return "(pair IS NULL OR pair = ?)", (self.pair,)

    def _count(self, table: str) -> int:
        def count(conn: sqlite3.Connection) -> int:
            scope, args = self._scope(has_pair=self._ready or _has_pair_column(conn))
            found: int = conn.execute(
                f"SELECT COUNT(*) FROM {table} "
                f"WHERE version >= 1 AND version <= ? AND {scope}",
                (RECORD_VERSION, *args),
            ).fetchone()[0]
            return found

        what = "failures" if table == "failures" else "replay entries"
        return self._read(f"count {what}", count)

    def _select(
        self, conn: sqlite3.Connection, table: str, order: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
        """This pair's rows of ``table``, and (pair, count) for every other pair."""
        has_pair = self._ready or _has_pair_column(conn)
        scope, args = self._scope(has_pair=has_pair)
        rows = conn.execute(
            f"SELECT seq, id, version, payload FROM {table} WHERE {scope} "
            f"ORDER BY seq {order}",
            args,
        ).fetchall()
        others: list[tuple[str, int]] = []
        if self.pair is not None and has_pair:
            others = conn.execute(
                f"SELECT pair, COUNT(*) FROM {table} "
                "WHERE pair IS NOT NULL AND pair != ? GROUP BY pair ORDER BY pair",
                (self.pair,),
            ).fetchall()
        return rows, others

    def _decode(
        self, rows: list[tuple[Any, ...]], table: str, *, limit: int | None
    ) -> tuple[list[TrainingExample], list[tuple[int, str, bool]]]:
        """Turn rows into examples; list the skipped ones as (seq, report, corrupt)."""
        examples: list[TrainingExample] = []
        skipped: list[tuple[int, str, bool]] = []
        for seq, example_id, version, payload in rows:
            if limit is not None and len(examples) >= limit:
                break
            where = (
                f"{self.db_path} table {table} row {seq} (id {_REPR.repr(example_id)})"
            )
            if isinstance(version, int) and version > RECORD_VERSION:
                line = (
                    f"{where}: record version {version} is newer than the supported "
                    f"{RECORD_VERSION}; skipped and kept (upgrade speclora to read it)"
                )
                skipped.append((seq, line, False))
                continue
            decoded = self._problem(example_id, version, payload)
            if isinstance(decoded, str):
                skipped.append((seq, f"{where}: {_shorten(decoded)}", True))
            else:
                examples.append(decoded)
        return examples, skipped

    @staticmethod
    def _problem(example_id: Any, version: Any, payload: Any) -> TrainingExample | str:
        """The decoded example, or why the row cannot be decoded."""
        if not isinstance(version, int) or version < 1:
            return f"invalid record version {_REPR.repr(version)}"
        if isinstance(example_id, _Undecodable):
            return "id is not valid UTF-8 text"
        if isinstance(payload, _Undecodable):
            return "payload is not valid UTF-8 text"
        if not isinstance(payload, str):
            return f"payload is {type(payload).__name__}, not JSON text"
        try:
            data = json.loads(payload)
        except RecursionError:
            return "invalid JSON: nested too deeply to read"
        except ValueError as exc:
            return f"invalid JSON: {exc}"
        try:
            example = TrainingExample.from_dict(data)
        except RecursionError:
            return "invalid record: nested too deeply to read"
        except ValueError as exc:
            return f"invalid record: {exc}"
        if example.id != example_id:
            return f"payload id {_REPR.repr(example.id)} does not match the row's id"
        return example

    def _finish_load(
        self,
        skipped: list[tuple[int, str, bool]],
        table: str,
        others: list[tuple[str, int]],
    ) -> None:
        """Quarantine corrupt rows (best effort), then publish and log the report."""
        corrupt = [(seq, line) for seq, line, is_corrupt in skipped if is_corrupt]
        suffix = ""
        if corrupt:
            now = datetime.now(timezone.utc).isoformat()

            def quarantine(conn: sqlite3.Connection) -> None:
                for seq, line in corrupt:
                    # Rows are never updated in place, so a seq still present is the
                    # same corrupt row that was read.
                    conn.execute(
                        "INSERT INTO quarantine (source, source_seq, id, version, "
                        "payload, reason, quarantined_at) SELECT ?, seq, id, version, "
                        f"payload, ?, ? FROM {table} WHERE seq = ?",
                        (table, line, now, seq),
                    )
                    conn.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))

            try:
                self._write("quarantine corrupt records", quarantine)
                suffix = "; moved to table quarantine"
            except RuntimeError as exc:
                suffix = f"; skipped and left in place ({exc})"
        self.corrupt_records = [
            line + suffix if is_corrupt else line for _, line, is_corrupt in skipped
        ]
        for line in self.corrupt_records:
            logger.warning("skipped a stored training record: %s", line)
        for other, count in others:
            line = (
                f"{self.db_path} table {table}: {count} "
                f"record{'' if count == 1 else 's'} of model pair {_REPR.repr(other)}, "
                f"not this collector's pair {self.pair!r}; skipped and kept for that "
                "pair"
            )
            self.corrupt_records.append(line)
            logger.warning("skipped stored training records: %s", line)
