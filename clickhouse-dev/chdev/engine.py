"""The ClickHouse engine (chdb) behind the HTTP interface.

Measured on chdb-core 26.9: one chdb connection runs one query at a time (its calls are
serialized by an internal lock but release the GIL), while several connections opened on
the same data directory share one engine and run queries in parallel. So the server keeps
a bounded pool of connections and gives each request its own.

Per-request state (database, settings) is applied with `USE` / `SET` on the pooled
connection and undone with `SET name = DEFAULT` afterwards, so requests never see each
other's settings. A request that runs its own SET/USE gets its connection discarded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import re
import threading
import time

import chdb._chdb as _chdb

from .bodypipe import BodyPipe
from .errors import ClickHouseError
from .sqltext import READ_KINDS

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Statements that change connection state beyond the request.
_STATEFUL_KINDS = frozenset({"SET", "USE"})


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclasses.dataclass
class Summary:
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    elapsed_ns: int = 0

    def header(self) -> str:
        fields = dataclasses.asdict(self)
        fields["total_rows_to_read"] = self.read_rows
        fields["memory_usage"] = 0
        return "{" + ",".join(f'"{k}":"{v}"' for k, v in fields.items()) + "}"


class Stats:
    """Counters behind `GET /dev/stats`: statements executed on behalf of clients."""

    def __init__(self):
        self._lock = threading.Lock()
        self._total = collections.Counter()
        self._by_database: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def record(self, database: str, kind: str, failed: bool) -> None:
        keys = ["queries"]
        if kind == "INSERT":
            keys.append("inserts")
        elif kind in READ_KINDS:
            keys.append("selects")
        if failed:
            keys.append("errors")
        with self._lock:
            for key in keys:
                self._total[key] += 1
                self._by_database[database][key] += 1

    def snapshot(self) -> dict:
        with self._lock:
            result = {key: self._total.get(key, 0) for key in ("queries", "inserts", "selects", "errors")}
            result["databases"] = {
                name: {key: counter.get(key, 0) for key in ("queries", "inserts", "selects", "errors")}
                for name, counter in self._by_database.items()
            }
        return result

    def reset(self) -> None:
        with self._lock:
            self._total.clear()
            self._by_database.clear()


class _Connection:
    def __init__(self, path: str):
        self.raw = _chdb.connect(path)
        self.database = "default"
        self.reusable = True

    def run(self, sql: str, fmt: str = "TabSeparated", params: dict | None = None):
        try:
            return self.raw.query(sql, fmt, params=params or {})
        except RuntimeError as err:
            raise ClickHouseError.from_engine(str(err)) from None

    def close(self):
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not fail shutdown
            pass


class Engine:
    def __init__(self, data_dir: str, max_connections: int):
        self.data_dir = data_dir
        self._idle: list[_Connection] = []
        self._idle_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        self.stats = Stats()
        # Opening the first connection boots the engine (loads metadata from data_dir).
        first = _Connection(data_dir)
        self.version = bytes(first.run("SELECT version()").bytes()).decode().strip()
        self._idle.append(first)

    def close(self) -> None:
        self._closed = True
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextlib.contextmanager
    def connection(self, database: str, settings: dict[str, str]):
        """A pooled connection with `database` selected and `settings` applied."""
        if self._closed:
            raise ClickHouseError(210, "NETWORK_ERROR", "Server is shutting down")
        self._slots.acquire()
        conn = None
        applied: list[str] = []
        try:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = _Connection(self.data_dir)
            if conn.database != database:
                conn.run(f"USE {quote_identifier(database)}")
                conn.database = database
            for name, value in settings.items():
                if not _IDENTIFIER.match(name):
                    raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
                applied.append(name)
                conn.run(f"SET {name} = {quote_string(value)}")
            yield conn
        finally:
            if conn is not None:
                self._release(conn, applied)
            self._slots.release()

    def _release(self, conn: _Connection, applied: list[str]) -> None:
        try:
            for name in applied:
                conn.run(f"SET {name} = DEFAULT")
        except ClickHouseError:
            conn.reusable = False
        if conn.reusable and not self._closed:
            with self._idle_lock:
                self._idle.append(conn)
        else:
            conn.close()

    # --- statements -----------------------------------------------------------------------

    def query(self, sql: str, *, kind: str, database: str, settings: dict, params: dict, fmt: str):
        """Runs a complete statement; returns (result bytes, Summary)."""
        started = time.perf_counter_ns()
        failed = True
        try:
            with self.connection(database, settings) as conn:
                if kind in _STATEFUL_KINDS:
                    conn.reusable = False
                result = conn.run(sql, fmt, params)
                data = result.bytes()
                summary = Summary(
                    read_rows=result.rows_read(),
                    read_bytes=result.bytes_read(),
                    written_rows=result.rows_written(),
                    written_bytes=result.bytes_written(),
                    result_bytes=len(data),
                    elapsed_ns=time.perf_counter_ns() - started,
                )
            failed = False
            return data, summary
        finally:
            self.stats.record(database, kind, failed)

    def insert(self, target: str, settings_clause: str, fmt: str, chunks, *, database: str, settings: dict,
               params: dict):
        """Inserts the body `chunks` (an iterator of bytes) as `<target> ... <settings_clause> FORMAT fmt`.

        The data reaches the engine through `query()` reading a pipe (see bodypipe.py for why not
        chdb's streaming insert), so every error the engine raises while parsing, writing parts or
        running materialized views reaches the client, and `{name:Type}` parameters in the
        statement are bound by the engine as for any other query.
        """
        started = time.perf_counter_ns()
        failed = True
        try:
            chunks = iter(chunks)
            first = next(chunks, b"")
            if not first:
                raise ClickHouseError(108, "NO_DATA_TO_INSERT", "No data to insert")
            with self.connection(database, settings) as conn:
                engine_error = None
                with BodyPipe(itertools.chain([first], chunks)) as pipe:
                    sql = (
                        f"{target}FROM INFILE {quote_string(pipe.path)} COMPRESSION 'lz4' "
                        f"{settings_clause}FORMAT {quote_identifier(fmt)}"
                    )
                    try:
                        result = conn.run(sql, "TabSeparated", params)
                    except ClickHouseError as err:
                        engine_error = err
                if pipe.body_error is not None:
                    raise pipe.body_error
                if engine_error is not None:
                    raise engine_error.without_infile_context()
                summary = Summary(
                    read_rows=result.rows_read(),
                    read_bytes=result.bytes_read(),
                    written_rows=result.rows_written(),
                    written_bytes=result.bytes_written(),
                    elapsed_ns=time.perf_counter_ns() - started,
                )
            failed = False
            return summary
        finally:
            self.stats.record(database, "INSERT", failed)
