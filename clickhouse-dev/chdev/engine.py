"""The ClickHouse engine (chdb) behind the HTTP interface.

Measured on chdb-core 26.9: one chdb connection runs one query at a time (its calls are
serialized by an internal lock but release the GIL), while several connections opened on
the same data directory share one engine and run queries in parallel. So the server keeps
a bounded pool of connections and gives each request its own.

Per-request state (database, settings) is applied with `USE` / `SET` on the pooled
connection, which remembers what it was left with. The next request on it changes only what
differs: one `SET a = 'x', b = DEFAULT` statement for the settings whose values differ or that
it does not set, nothing when they are the same (a client like query-api sends the same few
settings on every request), no `USE` when its database is already selected. So every request
runs with exactly its own settings on top of the defaults, never with another request's. An idle
connection whose state already matches is preferred. A request that runs its own SET/USE gets
its connection discarded, and so does a connection whose state a failed SET left unknown.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import re
import threading

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


def _elapsed_ns(result) -> int:
    """The engine's own time for the statement (parse, plan, execute, format; for an insert also
    the wait for body data from the pipe), as chdb measures it: what a real server reports as
    `elapsed_ns`. Pool wait, USE/SET, HTTP parsing and compression are not in it."""
    return int(result.elapsed() * 1e9)


@dataclasses.dataclass
class Summary:
    """`X-ClickHouse-Summary`; `elapsed_ns` is engine time (see `_elapsed_ns`)."""

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
        # The user's settings (e.g. readonly=2), applied first with their own SET and never reset:
        # a connection only serves requests of users with the same ones.
        self.base: dict[str, str] = {}
        # Settings applied with SET by the server (name -> value); everything else is at its default.
        self.settings: dict[str, str] = {}
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
    def connection(self, database: str, settings: dict[str, str], base: dict[str, str] | None = None):
        """A pooled connection with `database` selected, the user's `base` settings applied first
        (so the engine holds request `settings` to them, e.g. to `readonly`) and then exactly `settings`."""
        if self._closed:
            raise ClickHouseError(210, "NETWORK_ERROR", "Server is shutting down")
        base = base or {}
        self._slots.acquire()
        conn = None
        try:
            conn = self._take_idle(database, settings, base)
            if conn is not None:
                leftovers = bool(conn.settings)
                try:
                    self._prepare(conn, database, settings)
                except ClickHouseError:
                    if conn.reusable or not leftovers:
                        raise
                    # The SET failed, perhaps because of the previous request's settings
                    # (`readonly=1` refuses to be reset): retry on a fresh connection.
                    conn.close()
                    conn = None
            if conn is None:
                conn = _Connection(self.data_dir)
                self._apply_base(conn, base)
                self._prepare(conn, database, settings)
            yield conn
        finally:
            if conn is not None:
                self._release(conn)
            self._slots.release()

    def _take_idle(self, database: str, settings: dict[str, str], base: dict[str, str]) -> _Connection | None:
        """The idle connection with the user's `base` settings that needs the fewest statements:
        same settings and database, else same settings, else same database, else the most recently
        used. When none has them, the most recent idle one is closed (its slot is ours) and the
        caller opens a fresh one: `readonly` cannot be reset on a connection."""
        with self._idle_lock:
            if not self._idle:
                return None
            best, best_score = None, -1
            for index in range(len(self._idle) - 1, -1, -1):
                candidate = self._idle[index]
                if candidate.base != base:
                    continue
                score = 2 * (candidate.settings == settings) + (candidate.database == database)
                if score > best_score:
                    best, best_score = index, score
                    if score == 3:
                        break
            if best is not None:
                return self._idle.pop(best)
            stale = self._idle.pop()
        stale.close()
        return None

    @staticmethod
    def _apply_base(conn: _Connection, base: dict[str, str]) -> None:
        for name in base:
            if not _IDENTIFIER.match(name):
                raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
        if base:
            conn.reusable = False  # until it is known to have applied
            conn.run("SET " + ", ".join(f"{name} = {quote_string(value)}" for name, value in base.items()))
            conn.reusable = True
        conn.base = dict(base)

    @staticmethod
    def _prepare(conn: _Connection, database: str, settings: dict[str, str]) -> None:
        """`USE` if the database differs; one `SET` for the settings that differ (assignments and
        `name = DEFAULT` for the connection's settings that the request does not set)."""
        if conn.database != database:
            conn.run(f"USE {quote_identifier(database)}")
            conn.database = database
        for name in settings:
            if not _IDENTIFIER.match(name):
                raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
        if conn.settings == settings:
            return
        clauses = [f"{name} = {quote_string(value)}" for name, value in settings.items()
                   if conn.settings.get(name) != value]
        clauses += [f"{name} = DEFAULT" for name in conn.settings if name not in settings]
        try:
            conn.run("SET " + ", ".join(clauses))
        except ClickHouseError:
            conn.reusable = False  # assignments before the failing one may have been applied
            raise
        conn.settings = dict(settings)

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            with self._idle_lock:
                self._idle.append(conn)
        else:
            conn.close()

    # --- statements -----------------------------------------------------------------------

    def query(self, sql: str, *, kind: str, database: str, settings: dict, params: dict, fmt: str,
              base: dict | None = None, check=None):
        """Runs a complete statement; returns (result bytes, Summary). `base`: the user's settings;
        `check(run)`: called first on the same connection with `run(sql) -> str` (the privilege check)."""
        failed = True
        try:
            with self.connection(database, settings, base) as conn:
                if check is not None:
                    check(lambda text: bytes(conn.run(text, "TabSeparatedRaw", params).bytes()).decode())
                if kind in _STATEFUL_KINDS:
                    conn.reusable = False
                result = conn.run(sql, fmt, params)
                data = result.bytes()
                # chdb's rows_read() counts the result's rows; storage_rows_read() is what the
                # server read (ClickHouse's read_rows).
                summary = Summary(
                    read_rows=result.storage_rows_read(),
                    read_bytes=result.storage_bytes_read(),
                    written_rows=result.rows_written(),
                    written_bytes=result.bytes_written(),
                    result_rows=result.rows_read() if kind in READ_KINDS else 0,
                    result_bytes=len(data),
                    elapsed_ns=_elapsed_ns(result),
                )
            failed = False
            return data, summary
        finally:
            self.stats.record(database, kind, failed)

    def insert(self, target: str, settings_clause: str, fmt: str, chunks, *, database: str, settings: dict,
               params: dict, base: dict | None = None, check=None):
        """Inserts the body `chunks` (an iterator of bytes) as `<target> ... <settings_clause> FORMAT fmt`.

        The data reaches the engine through `query()` reading a pipe (see bodypipe.py for why not
        chdb's streaming insert), so every error the engine raises while parsing, writing parts or
        running materialized views reaches the client, and `{name:Type}` parameters in the
        statement are bound by the engine as for any other query.
        """
        failed = True
        try:
            chunks = iter(chunks)
            first = next(chunks, b"")
            if not first:
                raise ClickHouseError(108, "NO_DATA_TO_INSERT", "No data to insert")
            with self.connection(database, settings, base) as conn:
                if check is not None:
                    check(lambda text: bytes(conn.run(text, "TabSeparatedRaw", params).bytes()).decode())
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
                # For FROM INFILE, rows_read() counts the rows read from the body.
                summary = Summary(
                    read_rows=result.rows_read(),
                    read_bytes=result.bytes_read(),
                    written_rows=result.rows_written(),
                    written_bytes=result.bytes_written(),
                    elapsed_ns=_elapsed_ns(result),
                )
            failed = False
            return summary
        finally:
            self.stats.record(database, "INSERT", failed)
