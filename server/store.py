"""The durable speaker store: enrolled speakers' voiceprints in SQLite or PostgreSQL.

What is stored per speaker (table `speakers`): the caller's `speaker_id`; the encoder `model`
and `model_version` fingerprint that made the voiceprint; the running sums of the enrollment
embeddings and of their MFCC statistics (float64, little-endian), their `enrollment_count` and
total `speech_seconds`, so an append adds exactly and the voiceprint is always the normalised
mean of every enrollment; create/update times (Unix seconds); and `revision`.

Change sequence. Every write transaction first increments the one-row `speaker_store_state`
counter and stamps what it writes with the new value (`speakers.revision`, or a row in
`speaker_tombstones` for a delete). That row update also serialises all writers: SQLite's
BEGIN IMMEDIATE takes the database write lock, PostgreSQL's row lock is held to commit. So
revisions commit in order, and a reader that has applied every change up to version V fetches
exactly what changed with `changes_since(V)`: the in-memory identification index of every
replica stays consistent by polling it before it scores. A poll first reads the counter with
one statement outside any transaction (the last committed version, with every change up to it
committed); only when that differs from V does it read the changes in one snapshot.
Tombstones keep only the id and the revision, and are pruned after `TOMBSTONE_RETENTION_S`; a
replica further behind than the pruned horizon reloads everything.

Durability: SQLite runs in WAL mode with synchronous=FULL, so a commit is on disk before the
call returns; PostgreSQL commits with its own (default synchronous) durability.

Every method is blocking; the async service calls them on its own thread pool. Voiceprints are
biometric data: nothing here logs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from server.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    NotFound,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Tombstones (deleted ids) are kept this long for replicas to see the delete, then pruned.
TOMBSTONE_RETENTION_S = 24 * 3600.0
_LIST_COLUMNS = (
    "speaker_id, model, model_version, enrollment_count, speech_seconds, "
    "create_time, update_time, revision"
)
_ALL_COLUMNS = _LIST_COLUMNS + ", embedding_sum, mfcc_sum"
T = TypeVar("T")


class EnrollMode(Enum):
    """What `enroll` does when the speaker exists (or does not)."""

    CREATE_OR_APPEND = "create_or_append"
    CREATE = "create"
    APPEND = "append"
    REPLACE = "replace"


@dataclass(frozen=True)
class Enrollment:
    """What one Enroll call adds: sums over its recordings' embeddings and MFCC statistics."""

    model: str
    model_version: str
    embedding_sum: np.ndarray
    mfcc_sum: np.ndarray
    count: int
    speech_seconds: float

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("an enrollment needs at least one recording")
        if self.embedding_sum.ndim != 1 or self.mfcc_sum.ndim != 1:
            raise ValueError("embedding_sum and mfcc_sum must be vectors")


@dataclass(frozen=True)
class SpeakerRecord:
    """A stored speaker. The sums are None where only the metadata was read (get, list)."""

    speaker_id: str
    model: str
    model_version: str
    enrollment_count: int
    speech_seconds: float
    create_time: float
    update_time: float
    revision: int
    embedding_sum: np.ndarray | None = None
    mfcc_sum: np.ndarray | None = None

    @property
    def voiceprint(self) -> np.ndarray:
        """The L2-normalised mean of the enrollment embeddings (float32)."""
        if self.embedding_sum is None:
            raise ValueError("record was read without its voiceprint")
        norm = float(np.linalg.norm(self.embedding_sum))
        unit = self.embedding_sum / (norm if norm > 0 else 1.0)
        return unit.astype(np.float32)

    @property
    def mfcc_mean(self) -> np.ndarray:
        """The mean of the enrollment recordings' MFCC statistics (float64)."""
        if self.mfcc_sum is None:
            raise ValueError("record was read without its MFCC statistics")
        return self.mfcc_sum / self.enrollment_count

    def model_key(self) -> tuple[str, str]:
        return self.model, self.model_version


@dataclass(frozen=True)
class Changes:
    """What changed after a version: upserted records (with sums) and deleted ids.

    `full` means `upserted` is every stored speaker and anything else held must be dropped.
    """

    version: int
    upserted: list[SpeakerRecord]
    deleted: list[str]
    full: bool


def stale_message(record: SpeakerRecord, model_version: str) -> str:
    """The FAILED_PRECONDITION text for a voiceprint of another encoder (version)."""
    return (
        f"speaker {record.speaker_id!r} was enrolled with encoder {record.model_version!r} but "
        f"the server now uses {model_version!r}; the voiceprint must be re-enrolled (Enroll with "
        "ENROLL_MODE_REPLACE, or DeleteSpeaker and Enroll)"
    )


class SpeakerStore(ABC):
    """The store's interface; `open_store` picks SQLite or PostgreSQL from a URL."""

    url_for_log: str
    # The OpenTelemetry `db.system` of the database behind it.
    db_system: str

    @abstractmethod
    def enroll(
        self,
        speaker_id: str,
        enrollment: Enrollment,
        mode: EnrollMode = EnrollMode.CREATE_OR_APPEND,
    ) -> SpeakerRecord:
        """Create or add to a speaker in one transaction; returns the record (with sums)."""

    @abstractmethod
    def get(self, speaker_id: str, with_voiceprint: bool = False) -> SpeakerRecord | None:
        """One speaker, or None."""

    @abstractmethod
    def list(self, page_size: int, after: str | None = None) -> list[SpeakerRecord]:
        """Up to `page_size` speakers with ids greater than `after`, in id order (metadata)."""

    @abstractmethod
    def delete(self, speaker_id: str) -> bool:
        """Delete a speaker and its data; False when there was none."""

    @abstractmethod
    def version(self) -> int:
        """The last change's sequence number (0 for an empty store)."""

    @abstractmethod
    def changes_since(self, version: int | None) -> Changes:
        """Every change after `version`, from one consistent snapshot (None: everything)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (idempotent)."""


def open_store(url: str, pool_size: int = 4) -> SpeakerStore:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `postgresql://...`."""
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url[len("sqlite:///") :]))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, pool_size=pool_size)
    raise ConfigError(
        "setting store_url (env VOICEGATE_STORE_URL) must start with sqlite:/// or postgresql://"
    )


# ------------------------------------------------------------------ SQL shared by both


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f8").tobytes()


def _vector(blob: Any, name: str) -> np.ndarray:
    data = bytes(blob)
    if len(data) % 8:
        raise RuntimeError(f"speaker store holds a corrupt {name} ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def _record(row: Sequence[Any]) -> SpeakerRecord:
    record = SpeakerRecord(
        speaker_id=str(row[0]),
        model=str(row[1]),
        model_version=str(row[2]),
        enrollment_count=int(row[3]),
        speech_seconds=float(row[4]),
        create_time=float(row[5]),
        update_time=float(row[6]),
        revision=int(row[7]),
    )
    if len(row) > 8:
        record = replace(
            record,
            embedding_sum=_vector(row[8], "embedding sum"),
            mfcc_sum=_vector(row[9], "MFCC sum"),
        )
    return record


class _Cursor:
    """The few calls the shared SQL needs, over a DB-API cursor or connection."""

    def __init__(self, execute: Callable[[str, Sequence[Any]], Any], placeholder: str) -> None:
        self._execute = execute
        self._placeholder = placeholder

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(self._run(sql, params).fetchall())

    def one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self._run(sql, params).fetchone()
        return row

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._run(sql, params)

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        return self._execute(sql, tuple(params))


class _SqlStore(SpeakerStore):
    """The store's logic in SQL common to SQLite and PostgreSQL; subclasses bring connections."""

    @abstractmethod
    def _transaction(self, write: bool) -> contextlib.AbstractContextManager[_Cursor]:
        """A transaction: BEGIN IMMEDIATE (SQLite) for writes, a snapshot for reads."""

    @abstractmethod
    def _autocommit(self) -> contextlib.AbstractContextManager[_Cursor]:
        """A cursor outside any explicit transaction: each statement is its own."""

    @abstractmethod
    def _guard(self, work: Callable[[], T]) -> T:
        """Run `work`, turning connection-level failures into StoreUnavailable."""

    def _create_schema(self, cursor: _Cursor, blob_type: str, text_type: str) -> None:
        cursor.run(
            "CREATE TABLE IF NOT EXISTS speaker_store_state ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " schema_version INTEGER NOT NULL,"
            " version BIGINT NOT NULL,"
            " pruned_version BIGINT NOT NULL)"
        )
        cursor.run(
            "CREATE TABLE IF NOT EXISTS speakers ("
            f" speaker_id {text_type} PRIMARY KEY,"
            " model TEXT NOT NULL,"
            " model_version TEXT NOT NULL,"
            " enrollment_count INTEGER NOT NULL CHECK (enrollment_count > 0),"
            " speech_seconds DOUBLE PRECISION NOT NULL,"
            " create_time DOUBLE PRECISION NOT NULL,"
            " update_time DOUBLE PRECISION NOT NULL,"
            " revision BIGINT NOT NULL,"
            f" embedding_sum {blob_type} NOT NULL,"
            f" mfcc_sum {blob_type} NOT NULL)"
        )
        cursor.run("CREATE INDEX IF NOT EXISTS speakers_revision ON speakers (revision)")
        cursor.run(
            "CREATE TABLE IF NOT EXISTS speaker_tombstones ("
            f" speaker_id {text_type} PRIMARY KEY,"
            " revision BIGINT NOT NULL,"
            " delete_time DOUBLE PRECISION NOT NULL)"
        )
        cursor.run(
            "CREATE INDEX IF NOT EXISTS speaker_tombstones_revision "
            "ON speaker_tombstones (revision)"
        )
        cursor.run(
            "INSERT INTO speaker_store_state (id, schema_version, version, pruned_version) "
            "VALUES (1, ?, 0, 0) ON CONFLICT (id) DO NOTHING",
            (SCHEMA_VERSION,),
        )
        row = cursor.one("SELECT schema_version FROM speaker_store_state WHERE id = 1")
        assert row is not None
        if int(row[0]) > SCHEMA_VERSION:
            raise ConfigError(
                f"speaker store {self.url_for_log} has schema version {row[0]}; this server "
                f"supports up to {SCHEMA_VERSION}: upgrade the server"
            )

    @staticmethod
    def _next_version(cursor: _Cursor) -> int:
        """Take the next change number; holds the write lock until commit (see module doc)."""
        row = cursor.one(
            "UPDATE speaker_store_state SET version = version + 1 WHERE id = 1 RETURNING version"
        )
        assert row is not None
        return int(row[0])

    def enroll(
        self,
        speaker_id: str,
        enrollment: Enrollment,
        mode: EnrollMode = EnrollMode.CREATE_OR_APPEND,
    ) -> SpeakerRecord:
        def work() -> SpeakerRecord:
            with self._transaction(write=True) as cursor:
                revision = self._next_version(cursor)
                row = cursor.one(
                    f"SELECT {_ALL_COLUMNS} FROM speakers WHERE speaker_id = ?",
                    (speaker_id,),
                )
                existing = _record(row) if row is not None else None
                record = _merge(speaker_id, existing, enrollment, mode, revision, time.time())
                assert record.embedding_sum is not None and record.mfcc_sum is not None
                cursor.run(
                    f"INSERT INTO speakers ({_ALL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (speaker_id) DO UPDATE SET model = excluded.model, "
                    "model_version = excluded.model_version, "
                    "enrollment_count = excluded.enrollment_count, "
                    "speech_seconds = excluded.speech_seconds, "
                    "update_time = excluded.update_time, revision = excluded.revision, "
                    "embedding_sum = excluded.embedding_sum, mfcc_sum = excluded.mfcc_sum",
                    (
                        record.speaker_id,
                        record.model,
                        record.model_version,
                        record.enrollment_count,
                        record.speech_seconds,
                        record.create_time,
                        record.update_time,
                        record.revision,
                        _blob(record.embedding_sum),
                        _blob(record.mfcc_sum),
                    ),
                )
                cursor.run("DELETE FROM speaker_tombstones WHERE speaker_id = ?", (speaker_id,))
                return record

        return self._guard(work)

    def get(self, speaker_id: str, with_voiceprint: bool = False) -> SpeakerRecord | None:
        columns = _ALL_COLUMNS if with_voiceprint else _LIST_COLUMNS

        def work() -> SpeakerRecord | None:
            with self._transaction(write=False) as cursor:
                row = cursor.one(
                    f"SELECT {columns} FROM speakers WHERE speaker_id = ?", (speaker_id,)
                )
            return _record(row) if row is not None else None

        return self._guard(work)

    def list(self, page_size: int, after: str | None = None) -> list[SpeakerRecord]:
        def work() -> list[SpeakerRecord]:
            with self._transaction(write=False) as cursor:
                rows = cursor.all(
                    f"SELECT {_LIST_COLUMNS} FROM speakers WHERE speaker_id > ? "
                    "ORDER BY speaker_id LIMIT ?",
                    (after or "", page_size),
                )
            return [_record(row) for row in rows]

        return self._guard(work)

    def delete(self, speaker_id: str) -> bool:
        def work() -> bool:
            with self._transaction(write=True) as cursor:
                # The change number first: every writer locks in the same order.
                revision = self._next_version(cursor)
                found = cursor.one(
                    "SELECT speaker_id FROM speakers WHERE speaker_id = ?",
                    (speaker_id,),
                )
                if found is None:
                    raise _NothingToDelete
                now = time.time()
                cursor.run("DELETE FROM speakers WHERE speaker_id = ?", (speaker_id,))
                cursor.run(
                    "INSERT INTO speaker_tombstones (speaker_id, revision, delete_time) "
                    "VALUES (?, ?, ?) ON CONFLICT (speaker_id) DO UPDATE SET "
                    "revision = excluded.revision, delete_time = excluded.delete_time",
                    (speaker_id, revision, now),
                )
                pruned = cursor.all(
                    "DELETE FROM speaker_tombstones WHERE delete_time < ? RETURNING revision",
                    (now - TOMBSTONE_RETENTION_S,),
                )
                if pruned:
                    cursor.run(
                        "UPDATE speaker_store_state SET pruned_version = "
                        "CASE WHEN pruned_version > ? THEN pruned_version ELSE ? END WHERE id = 1",
                        (max(int(r[0]) for r in pruned),) * 2,
                    )
                return True

        try:
            return self._guard(work)
        except _NothingToDelete:  # rolled back, so the change number is not used up
            return False

    def version(self) -> int:
        def work() -> int:
            # One statement, so one round trip: the last committed change's number.
            with self._autocommit() as cursor:
                row = cursor.one("SELECT version FROM speaker_store_state WHERE id = 1")
            assert row is not None
            return int(row[0])

        return self._guard(work)

    def changes_since(self, version: int | None) -> Changes:
        if version is not None:
            # Nothing changed (the common case): one statement, no snapshot transaction.
            # Writers commit their changes with the counter, in sequence order, so a counter
            # equal to `version` means every committed change is already applied.
            current = self.version()
            if current == version:
                return Changes(version=current, upserted=[], deleted=[], full=False)

        def work() -> Changes:
            with self._transaction(write=False) as cursor:
                state = cursor.one(
                    "SELECT version, pruned_version FROM speaker_store_state WHERE id = 1"
                )
                assert state is not None
                current, pruned = int(state[0]), int(state[1])
                if version is not None and version == current:
                    return Changes(version=current, upserted=[], deleted=[], full=False)
                if version is None or version < pruned or version > current:
                    # Too far behind (tombstones pruned), or a store that was reset: reload.
                    rows = cursor.all(f"SELECT {_ALL_COLUMNS} FROM speakers")
                    return Changes(current, [_record(r) for r in rows], [], full=True)
                rows = cursor.all(
                    f"SELECT {_ALL_COLUMNS} FROM speakers WHERE revision > ?", (version,)
                )
                gone = cursor.all(
                    "SELECT speaker_id FROM speaker_tombstones WHERE revision > ?", (version,)
                )
                return Changes(
                    version=current,
                    upserted=[_record(r) for r in rows],
                    deleted=[str(r[0]) for r in gone],
                    full=False,
                )

        return self._guard(work)


class _NothingToDelete(Exception):
    """Rolls back a delete that found no speaker."""


def _merge(
    speaker_id: str,
    existing: SpeakerRecord | None,
    enrollment: Enrollment,
    mode: EnrollMode,
    revision: int,
    now: float,
) -> SpeakerRecord:
    """The record after `enrollment` under `mode`, or the error the mode calls for."""
    fresh = SpeakerRecord(
        speaker_id=speaker_id,
        model=enrollment.model,
        model_version=enrollment.model_version,
        enrollment_count=enrollment.count,
        speech_seconds=float(enrollment.speech_seconds),
        create_time=now,
        update_time=now,
        revision=revision,
        embedding_sum=np.asarray(enrollment.embedding_sum, dtype=np.float64),
        mfcc_sum=np.asarray(enrollment.mfcc_sum, dtype=np.float64),
    )
    if existing is None:
        if mode is EnrollMode.APPEND:
            raise NotFound(f"speaker {speaker_id!r} is not enrolled")
        return fresh
    if mode is EnrollMode.CREATE:
        raise AlreadyExists(f"speaker {speaker_id!r} is already enrolled")
    if mode is EnrollMode.REPLACE:
        return replace(fresh, create_time=existing.create_time)
    if existing.model_key() != (enrollment.model, enrollment.model_version):
        raise FailedPrecondition(stale_message(existing, enrollment.model_version))
    assert existing.embedding_sum is not None and existing.mfcc_sum is not None
    if existing.embedding_sum.shape != fresh.embedding_sum.shape:  # type: ignore[union-attr]
        raise RuntimeError("stored voiceprint has another dimension than the encoder's")
    return replace(
        fresh,
        enrollment_count=existing.enrollment_count + enrollment.count,
        speech_seconds=existing.speech_seconds + float(enrollment.speech_seconds),
        create_time=existing.create_time,
        embedding_sum=existing.embedding_sum + fresh.embedding_sum,
        mfcc_sum=existing.mfcc_sum + fresh.mfcc_sum,
    )


# ------------------------------------------------------------------ SQLite


class SqliteStore(_SqlStore):
    """One SQLite file (WAL, synchronous=FULL); one connection per thread.

    Several processes may share the file: writers serialise on SQLite's lock (BEGIN
    IMMEDIATE, waiting up to `busy_timeout_s`), readers see committed snapshots.
    """

    db_system = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.url_for_log = f"sqlite:///{self.path}"
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Biometric data: the file (and SQLite's -wal/-shm beside it) readable by us only.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        except OSError as exc:
            raise ConfigError(f"speaker store {self.path} cannot be created: {exc}") from None
        with self._transaction(write=True) as cursor:
            self._create_schema(cursor, blob_type="BLOB", text_type="TEXT")

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            if self._closed:
                raise StoreUnavailable("speaker store is closed")
            try:
                connection = sqlite3.connect(
                    self.path,
                    timeout=self._busy_timeout_s,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,
                )
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                # Deleted or replaced voiceprints are overwritten, not left on free pages.
                connection.execute("PRAGMA secure_delete=ON")
            except sqlite3.Error as exc:
                raise ConfigError(f"speaker store {self.path} cannot be opened: {exc}") from None
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[_Cursor]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _Cursor(connection.execute, "?")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _autocommit(self) -> Iterator[_Cursor]:
        yield _Cursor(self._connection().execute, "?")

    def _guard(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except sqlite3.OperationalError as exc:
            log.error("speaker store %s failed: %s", self.url_for_log, exc)
            raise StoreUnavailable(
                "speaker store unavailable: the database is busy or unreadable"
            ) from exc

    def delete(self, speaker_id: str) -> bool:
        deleted = super().delete(speaker_id)
        if deleted:
            # Old copies of the row live on in the write-ahead log until a checkpoint: copy
            # the log into the database (secure_delete zeroes the freed space) and truncate it.
            with contextlib.suppress(sqlite3.Error):
                self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(sqlite3.Error):
                connection.close()


# ------------------------------------------------------------------ PostgreSQL


class PostgresStore(_SqlStore):
    """PostgreSQL through a psycopg connection pool, for several front-server replicas.

    Writers serialise on the `speaker_store_state` row lock, taken by their first statement and
    held to commit; at READ COMMITTED each later statement reads a fresh snapshot, so a writer
    sees every write committed before it got the lock (no row lock on the speaker is needed).
    Reads of changes use a REPEATABLE READ snapshot.
    """

    db_system = "postgresql"

    def __init__(self, url: str, pool_size: int = 4, connect_timeout_s: float = 10.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.url_for_log = _redact(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True},
            timeout=connect_timeout_s,
            name="voicegate-store",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
            with self._pool.connection() as connection, connection.transaction():
                # Replicas starting together: one creates the schema, the others wait.
                connection.execute("SELECT pg_advisory_xact_lock(7013531661)")
                cursor = _Cursor(connection.execute, "%s")
                self._create_schema(cursor, blob_type="BYTEA", text_type='TEXT COLLATE "C"')
        except ConfigError:
            self._pool.close()
            raise
        except Exception as exc:
            self._pool.close()
            raise ConfigError(f"speaker store {self.url_for_log} cannot be opened: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[_Cursor]:
        with self._pool.connection() as connection, connection.transaction():
            if not write:
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield _Cursor(connection.execute, "%s")

    @contextlib.contextmanager
    def _autocommit(self) -> Iterator[_Cursor]:
        with self._pool.connection() as connection:  # the pool's connections autocommit
            yield _Cursor(connection.execute, "%s")

    def _guard(self, work: Callable[[], T]) -> T:
        from psycopg_pool import PoolTimeout

        try:
            return work()
        except (self._psycopg.OperationalError, PoolTimeout) as exc:
            log.error("speaker store %s failed: %s", self.url_for_log, exc)
            raise StoreUnavailable("speaker store unavailable: cannot reach PostgreSQL") from exc

    def close(self) -> None:
        self._pool.close()


def _redact(url: str) -> str:
    """The URL without a password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in credentials else url
