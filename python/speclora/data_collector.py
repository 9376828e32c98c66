"""Durable store of low-acceptance generations and the replay buffer.

Failures are examples awaiting training. After a successful training run the caller
hands their ids to :meth:`DataCollector.consume_failures`, which moves them into the
replay buffer: a bounded FIFO (oldest evicted first) mixed into later training so the
draft does not forget what it learned. A loop "train when ``failure_count >= N``"
therefore trains once per ``N`` new failures.

Everything lives in one SQLite database, ``<data_dir>/collector.sqlite3`` (WAL journal,
``synchronous=FULL``): :meth:`DataCollector.add_failure` returns only after the record
is committed and fsync'd, a crash at any instant leaves the last committed state, and
several threads or processes may share a ``data_dir``. See ``docs/data-format.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
]

logger = logging.getLogger(__name__)

DB_FILENAME = "collector.sqlite3"
"""Name of the database file inside ``data_dir``."""

SCHEMA_VERSION = 1
"""Layout of the tables, stored in the database header (``PRAGMA user_version``)."""

# How long a writer waits for another thread or process to finish its transaction.
_BUSY_TIMEOUT_S = 60.0
# Stay well below SQLite's limit on bound parameters per statement.
_IDS_PER_QUERY = 500

_SCHEMA = (
    # AUTOINCREMENT: seq never reuses a deleted value, so seq order is insertion order.
    """CREATE TABLE IF NOT EXISTS failures (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        version INTEGER NOT NULL,
        payload TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS replay (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        payload TEXT NOT NULL)""",
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

# Connections inherited through fork() must be neither used nor closed by the child
# (closing one could checkpoint or delete the parent's WAL); keep them referenced.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []

_T = TypeVar("_T")


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

    Raises:
        ValueError: If ``data_dir`` exists and is not a directory, or an argument is out
          of range.
        RuntimeError: If the directory or database cannot be created or opened, or the
          database was written by a newer version of this package.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        replay_buffer_max_size: int = 100,
        acceptance_threshold: float = 0.5,
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
        self.replay_buffer_max_size = replay_buffer_max_size
        self.acceptance_threshold = float(acceptance_threshold)

        path = Path(os.fspath(data_dir)).expanduser().absolute()
        try:
            created = not path.is_dir()
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
        new_db = not self.db_path.exists()
        self._create_schema()
        if new_db:
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
        """Store ``example`` as a failure awaiting training.

        When this returns, the example is committed and fsync'd: it survives a crash
        or power loss.

        Args:
            example (TrainingExample): The generation to keep. It is validated again
              (it may have been modified since construction).

        Raises:
            ValueError: If ``example`` is invalid, or a failure with the same id is
              already awaiting training.
            RuntimeError: If the store cannot be written (disk full, permission
              denied, ...); the store is left as it was, and later calls work again
              once the cause is gone.
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
                    "INSERT INTO failures (id, version, payload) VALUES (?, ?, ?)",
                    (example.id, RECORD_VERSION, payload),
                )
            except sqlite3.IntegrityError:
                raise ValueError(
                    f"[DataCollector] a failure with id {example.id!r} is already "
                    f"awaiting training in {str(self.db_path)!r}"
                ) from None

        self._write("add a failure", insert)

    def load_failures(self) -> list[TrainingExample]:
        """Return the failures awaiting training, oldest first.

        Corrupt records are reported (``corrupt_records`` and a logged warning naming
        the file, table, row and reason) and moved to the ``quarantine`` table; records
        written by a newer format version are reported and skipped but kept.

        Returns:
            list[TrainingExample]: The readable failures.

        Raises:
            RuntimeError: If the database cannot be read.
        """
        rows = self._read(
            "load failures",
            lambda conn: conn.execute(
                "SELECT seq, id, version, payload FROM failures ORDER BY seq"
            ).fetchall(),
        )
        examples, skipped = self._decode(rows, "failures", limit=None)
        self._finish_load(skipped, "failures")
        return examples

    def load_replay_buffer(self) -> list[TrainingExample]:
        """Return the replay buffer, oldest first (at most ``replay_buffer_max_size``).

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
        rows = self._read(
            "load the replay buffer",
            lambda conn: conn.execute(
                "SELECT seq, id, version, payload FROM replay ORDER BY seq DESC"
            ).fetchall(),
        )
        examples, skipped = self._decode(rows, "replay", limit=limit)
        self._finish_load(skipped, "replay")
        examples.reverse()
        return examples

    def consume_failures(self, ids: Iterable[str]) -> int:
        """Move trained-on failures into the replay buffer.

        Call after a successful training run with the ids of the failures it used. In
        one transaction the failures leave the pending set, enter the replay buffer in
        the order they were collected (replacing an older replay entry with the same
        id), and the buffer is trimmed to ``replay_buffer_max_size`` by evicting its
        oldest entries (FIFO).

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

        def move(conn: sqlite3.Connection) -> int:
            rows: list[tuple[Any, ...]] = []
            for chunk in _chunks(wanted, _IDS_PER_QUERY):
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    f"SELECT seq, id, version, payload FROM failures WHERE id IN ({marks})",
                    chunk,
                ).fetchall()
            rows.sort(key=lambda row: row[0])
            for seq, example_id, version, payload in rows:
                conn.execute("DELETE FROM failures WHERE seq = ?", (seq,))
                conn.execute("DELETE FROM replay WHERE id = ?", (example_id,))
                conn.execute(
                    "INSERT INTO replay (id, version, payload) VALUES (?, ?, ?)",
                    (example_id, version, payload),
                )
            conn.execute(
                "DELETE FROM replay WHERE seq NOT IN "
                "(SELECT seq FROM replay ORDER BY seq DESC LIMIT ?)",
                (bound,),
            )
            return len(rows)

        return self._write("consume failures", move)

    @property
    def failure_count(self) -> int:
        """Number of failures awaiting training (records of a newer format excluded)."""
        count: int = self._read(
            "count failures",
            lambda conn: conn.execute(
                "SELECT COUNT(*) FROM failures WHERE version >= 1 AND version <= ?",
                (RECORD_VERSION,),
            ).fetchone()[0],
        )
        return count

    @property
    def replay_buffer_size(self) -> int:
        """Number of replay entries, at most ``replay_buffer_max_size``."""
        count: int = self._read(
            "count replay entries",
            lambda conn: conn.execute(
                "SELECT COUNT(*) FROM replay WHERE version >= 1 AND version <= ?",
                (RECORD_VERSION,),
            ).fetchone()[0],
        )
        return min(count, self.replay_buffer_max_size)

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
            f"acceptance_threshold={self.acceptance_threshold})"
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
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
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

    def _error(self, action: str, exc: BaseException) -> RuntimeError:
        return RuntimeError(
            f"[DataCollector] could not {action} in data_dir {str(self.data_dir)!r} "
            f"(database {DB_FILENAME}): {type(exc).__name__}: {exc}"
        )

    def _write(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in one write transaction; all of it commits or none of it."""

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

        return self._run(action, transaction)

    def _read(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        return self._run(action, body)

    def _run(self, action: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` on this process's connection, mapping failures to RuntimeError."""
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
                    if _is_busy(exc) and time.monotonic() < deadline:
                        attempt += 1
                        time.sleep(min(0.005 * attempt, 0.1))
                        continue
                    self._drop_connection()
                    raise self._error(action, exc) from exc
                except (sqlite3.Error, OSError) as exc:
                    # A fresh connection next time: nothing of a failed one is trusted.
                    self._drop_connection()
                    raise self._error(action, exc) from exc

    def _create_schema(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"[DataCollector] {str(self.db_path)!r} has schema version {found}, "
                    f"newer than the supported {SCHEMA_VERSION}; upgrade speclora"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if found < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        # Persistent in the file; a no-op once set. WAL lets readers run alongside
        # one writer and makes each commit a single fsync'd append.
        mode = self._run(
            "open the database",
            lambda conn: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0],
        )
        if str(mode).lower() != "wal":
            raise RuntimeError(
                f"[DataCollector] {str(self.db_path)!r} cannot use WAL journaling "
                f"(got {mode!r}); is data_dir on a network file system?"
            )
        found = self._read(
            "open the database",
            lambda conn: conn.execute("PRAGMA user_version").fetchone()[0],
        )
        if found != SCHEMA_VERSION:  # checked again inside the transaction
            self._write("create the database", create)

    def _decode(
        self, rows: list[tuple[Any, ...]], table: str, *, limit: int | None
    ) -> tuple[list[TrainingExample], list[tuple[int, str, bool]]]:
        """Turn rows into examples; list the skipped ones as (seq, report, corrupt)."""
        examples: list[TrainingExample] = []
        skipped: list[tuple[int, str, bool]] = []
        for seq, example_id, version, payload in rows:
            if limit is not None and len(examples) >= limit:
                break
            where = f"{self.db_path} table {table} row {seq} (id {example_id!r})"
            if isinstance(version, int) and version > RECORD_VERSION:
                line = (
                    f"{where}: record version {version} is newer than the supported "
                    f"{RECORD_VERSION}; skipped and kept (upgrade speclora to read it)"
                )
                skipped.append((seq, line, False))
                continue
            decoded = self._problem(example_id, version, payload)
            if isinstance(decoded, str):
                skipped.append((seq, f"{where}: {decoded}", True))
            else:
                examples.append(decoded)
        return examples, skipped

    @staticmethod
    def _problem(example_id: Any, version: Any, payload: Any) -> TrainingExample | str:
        """The decoded example, or why the row cannot be decoded."""
        if not isinstance(version, int) or version < 1:
            return f"invalid record version {version!r}"
        if not isinstance(payload, str):
            return f"payload is {type(payload).__name__}, not JSON text"
        try:
            data = json.loads(payload)
        except ValueError as exc:
            return f"invalid JSON: {exc}"
        try:
            example = TrainingExample.from_dict(data)
        except ValueError as exc:
            return f"invalid record: {exc}"
        if example.id != example_id:
            return f"payload id {example.id!r} does not match the row's id"
        return example

    def _finish_load(self, skipped: list[tuple[int, str, bool]], table: str) -> None:
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
