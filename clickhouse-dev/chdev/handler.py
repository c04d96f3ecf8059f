"""ClickHouse's HTTP interface on top of the engine pool."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import random
import re
import socket
import string
import time
import urllib.parse
import uuid

from . import compression
from .access import DEFAULT_USER, is_access_statement, required_privileges
from .body import ByteStream, RequestBody
from .engine import Summary
from .errors import ClickHouseError
from .sqltext import READ_KINDS, scan

log = logging.getLogger("chserver")

# URL parameters that belong to the HTTP layer, not to the engine's settings.
HTTP_ONLY_PARAMS = frozenset(
    {
        "query", "database", "default_format", "query_id", "user", "password", "quota_key",
        "compress", "decompress", "enable_http_compression", "session_id", "session_timeout",
        "session_check", "buffer_size", "wait_end_of_query", "role", "stacktrace",
        "client_protocol_version", "add_http_cors_header", "send_progress_in_http_headers",
        "http_headers_progress_interval_ms", "http_zlib_compression_level",
    }
)
# The query head of a body-only request is read up to this size to find where INSERT data begins.
MAX_QUERY_HEAD = 1 << 20
# Statement kinds that GET may run (ClickHouse runs GET requests with readonly=2).
_GET_ALLOWED = READ_KINDS | {"SET", "USE", ""}
_FORMAT_CONTENT_TYPES = (
    ("TabSeparated", "text/tab-separated-values; charset=UTF-8"),
    ("TSV", "text/tab-separated-values; charset=UTF-8"),
    ("CSV", "text/csv; charset=UTF-8; header=absent"),
    ("JSON", "application/json; charset=UTF-8"),
    ("Pretty", "text/plain; charset=UTF-8"),
    ("Values", "text/plain; charset=UTF-8"),
    ("Vertical", "text/plain; charset=UTF-8"),
    ("Markdown", "text/markdown; charset=UTF-8"),
    ("XML", "application/xml; charset=UTF-8"),
)
_NO_HANDLE = (
    "There is no handle {path}\n\nUse / or /ping for health checks.\n"
    "Or /replicas_status for more sophisticated health checks.\n\n"
    "Send queries from your program with POST method or GET /?query=...\n\n"
    "This is chserver (ClickHouse dev server); /dev/stats has its query counters.\n"
)


def content_type_for(fmt: str) -> str:
    for prefix, content_type in _FORMAT_CONTENT_TYPES:
        if fmt.startswith(prefix):
            if content_type.startswith("text/csv") and "WithNames" in fmt:
                return "text/csv; charset=UTF-8; header=present"
            return content_type
    return "application/octet-stream"


def _exception_tag() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=16))


def parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """Form fields of a multipart/form-data body (the clickhouse crate sends `query` + `param_*`)."""
    boundary = None
    for part in content_type.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ClickHouseError(36, "BAD_ARGUMENTS", "multipart/form-data request without boundary")
    delimiter = b"--" + boundary.encode()
    fields = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if value.endswith(b"\r\n"):
            value = value[:-2]
        name = None
        for line in head.split(b"\r\n"):
            key, _, rest = line.decode("utf-8", "replace").partition(":")
            if key.strip().lower() == "content-disposition":
                for item in rest.split(";"):
                    item_key, _, item_value = item.strip().partition("=")
                    if item_key == "name":
                        name = item_value.strip('"')
        if name is None:
            continue
        if "filename=" in head.decode("utf-8", "replace"):
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "External tables are not supported by chserver")
        fields[name] = value.decode("utf-8")
    return fields


class Request:
    """What a query request asks for, gathered from URL, headers and form fields."""

    def __init__(self, handler: "Handler", params: list[tuple[str, str]]):
        headers = handler.headers
        self.query_text = ""
        self.database = headers.get("X-ClickHouse-Database") or "default"
        self.default_format = headers.get("X-ClickHouse-Format") or "TabSeparated"
        self.query_id = headers.get("X-ClickHouse-Query-Id") or ""
        # Credentials as clickhouse-server takes them: X-ClickHouse-User/-Key headers, HTTP basic
        # authentication, or `user`/`password` parameters; none means `default` without a password.
        self.user = headers.get("X-ClickHouse-User")
        self.password = headers.get("X-ClickHouse-Key")
        authorization = headers.get("Authorization", "")
        if authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:].strip()).decode()
            except (ValueError, UnicodeDecodeError):
                raise ClickHouseError(516, "AUTHENTICATION_FAILED", "Malformed basic authentication header") from None
            basic_user, _, basic_password = decoded.partition(":")
            self.user, self.password = self.user or basic_user, self.password or basic_password
        self.compress = False
        self.decompress = False
        self.http_compression = True  # enable_http_compression defaults to 1 since 25.10
        self.compression_level = 3
        self.settings: dict[str, str] = {}
        self.params: dict[str, str] = {}
        for name, value in params:
            self.add(name, value)
        self.query_id = self.query_id or str(uuid.uuid4())

    def add(self, name: str, value: str) -> None:
        if name == "query":
            self.query_text = value
        elif name == "database":
            if value:
                self.database = value
        elif name == "default_format":
            self.default_format = value
        elif name == "query_id":
            self.query_id = value
        elif name == "user":
            self.user = value
        elif name == "password":
            self.password = value
        elif name == "compress":
            self.compress = value not in ("", "0")
        elif name == "decompress":
            self.decompress = value not in ("", "0")
        elif name == "enable_http_compression":
            self.http_compression = value not in ("", "0", "false")
        elif name == "http_zlib_compression_level":
            self.compression_level = int(value) if value.isdigit() else 3
        elif name.startswith("param_"):
            self.params[name[len("param_") :]] = value
        elif name in HTTP_ONLY_PARAMS or name.startswith("http_"):
            pass
        else:
            self.settings[name] = value


_EXPLAIN_PREFIX = re.compile(
    r"^\s*EXPLAIN(\s+(AST|SYNTAX|QUERY\s+TREE|PLAN|PIPELINE|ESTIMATE|INDEXES|CURRENT\s+TRANSACTION))?"
    r"(\s+\w+\s*=\s*\w+(\s*,\s*\w+\s*=\s*\w+)*)?\s+",
    re.IGNORECASE,
)

# Responses up to this size go out in the same write as their headers.
_COALESCE_BYTES = 1 << 16


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: a response written in two segments (headers, then a payload too large to copy
    # next to them) must not wait for the client's delayed ACK (~40 ms) under Nagle's algorithm.
    disable_nagle_algorithm = True
    server_version = "chserver"
    sys_version = ""

    def version_string(self):
        return self.server_version
    # Set by the server: engine, max_body_bytes, display_name, keep_alive_timeout, receive_timeout.
    server: "object"

    # --- connection lifecycle (keep-alive + graceful shutdown) ----------------------------

    def setup(self):
        super().setup()
        self.idle = True
        self.server.track(self, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def handle_one_request(self):
        self.idle = True
        self.connection.settimeout(self.server.keep_alive_timeout)
        try:
            super().handle_one_request()
        except (socket.timeout, ConnectionError, OSError):
            self.close_connection = True
        if self.server.stopping:
            self.close_connection = True

    def parse_request(self):
        self.idle = False
        self.connection.settimeout(self.server.receive_timeout)
        return super().parse_request()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s " + format, self.address_string(), *args)

    # --- routing ------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_HEAD(self):
        self._send(200, b"", {"Content-Type": "text/html; charset=UTF-8"}, head_only=True)

    def _dispatch(self):
        started = time.perf_counter()
        url = urllib.parse.urlsplit(self.path)
        self._log_head = ""
        self._status = 200
        self._raw_body = None
        try:
            if url.path == "/ping":
                self._send_text(200, "Ok.\n")
            elif url.path == "/replicas_status":
                self._send_text(200, "Ok.\n")
            elif url.path == "/dev/stats":
                self._dev_stats(url)
            elif url.path in ("/", ""):
                self._query(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            else:
                self._send_text(404, _NO_HANDLE.format(path=url.path))
        finally:
            log.info(
                "%s %s %d %.1fms %s",
                self.command,
                url.path if not self._log_head else repr(self._log_head),
                self._status,
                (time.perf_counter() - started) * 1000,
                self.client_address[0],
            )

    def _dev_stats(self, url):
        stats = self.server.engine.stats
        if self.command == "POST" and "reset" in urllib.parse.parse_qs(url.query, keep_blank_values=True):
            stats.reset()
        self._send(200, json.dumps(stats.snapshot()).encode(), {"Content-Type": "application/json"})

    # --- queries --------------------------------------------------------------------------

    def _query(self, url_params):
        body = None
        request = None
        try:
            body = self._open_body()
            self._raw_body = body
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                fields = parse_multipart(ByteStream(body).read_all(self.server.max_body_bytes), content_type)
                url_params = url_params + list(fields.items())
                body = None
                self._raw_body = None
            request = Request(self, url_params)
            stream = self._decoded_body(body, request) if body is not None and not body.eof else None
            self._run(request, stream)
        except ClickHouseError as err:
            self._send_error(err, request)
        except (ConnectionError, socket.timeout) as err:
            self._status = 499
            self.close_connection = True
            log.warning("client connection failed: %s", err)

    def _open_body(self) -> RequestBody:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        content_length = None
        if length is not None and not chunked:
            try:
                content_length = int(length)
            except ValueError:
                raise ClickHouseError(36, "BAD_ARGUMENTS", f"Invalid Content-Length: {length}") from None
        try:
            return RequestBody(self.rfile, content_length, chunked, self.server.max_body_bytes)
        except ClickHouseError:
            self.close_connection = True
            raise

    def _decoded_body(self, body: RequestBody, request: Request) -> ByteStream:
        stream = ByteStream(body)
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            stream = ByteStream(compression.HttpDecoder(stream, encoding))
        if request.decompress:
            stream = ByteStream(compression.BlockDecoder(stream))
        return stream

    def _run(self, request: Request, body: ByteStream | None):
        limit = self.server.max_body_bytes
        engine = self.server.engine
        access = self.server.access
        user = access.authenticate(request.user or DEFAULT_USER, request.password or "")
        # `default` holds ALL on *.*: nothing to check.
        admin = user.has("ALL", None, None)
        query_text = request.query_text
        if query_text:
            head = (query_text + "\n").encode()
            statement = scan(head, complete=True)
        elif body is not None:
            head = b""
            while True:
                chunk = body.read()
                head += chunk
                statement = scan(head, complete=not chunk)
                if not statement.needs_more or not chunk:
                    break
                if len(head) > MAX_QUERY_HEAD and not statement.is_insert_with_data:
                    # Not an INSERT with data that we can find: the whole body is the query.
                    break
        else:
            if self.command == "GET":
                self._send_text(200, "Ok.\n")
                return
            raise ClickHouseError(62, "SYNTAX_ERROR", "Empty query")

        if self.command == "GET" and statement.kind not in _GET_ALLOWED:
            raise ClickHouseError(
                164,
                "READONLY",
                "Cannot execute query in readonly mode. For queries over HTTP, method GET implies "
                "readonly. You should use method POST for modifying queries",
            )

        if statement.is_insert_with_data:
            self._log_head = _one_line(statement.insert_prefix + "FORMAT " + statement.insert_format)
            leftover = head[statement.data_offset :]
            data = ByteStream(body if body is not None else _Empty(), leftover)

            def check_insert(run):
                sql = f"{statement.insert_target} FORMAT {statement.insert_format}"
                access.check(user, required_privileges("INSERT", sql, run("EXPLAIN AST " + sql), request.database))

            with access.running(user):
                summary = engine.insert(
                    statement.insert_target,
                    statement.insert_settings,
                    statement.insert_format,
                    data.chunks(),
                    database=request.database,
                    settings=request.settings,
                    params=request.params,
                    base=user.engine_settings(),
                    check=None if admin else check_insert,
                )
            self._send_result(request, b"", summary, fmt=None)
            return

        # A complete statement: URL text + "\n" + body, or the body alone.
        if query_text:
            rest = body.read_all(limit) if body is not None else b""
            sql = query_text + ("\n" + rest.decode("utf-8") if rest else "")
            if rest:
                statement = scan(sql)
        else:
            rest = body.read_all(limit) if body is not None else b""
            sql = (head + rest).decode("utf-8")
            statement = scan(sql)
        self._log_head = _one_line(sql)
        if not sql.strip():
            raise ClickHouseError(62, "SYNTAX_ERROR", "Empty query")
        fmt = statement.output_format or request.default_format
        if is_access_statement(sql):
            data, summary = self._access_statement(user, sql, request)
            self._send_result(request, data, summary, fmt=fmt)
            return

        def check_query(run):
            kind = statement.kind
            if kind in ("SET", "USE", ""):
                return
            # `EXPLAIN [kind] q` needs what `q` needs.
            inner = _EXPLAIN_PREFIX.sub("", sql, count=1) if kind == "EXPLAIN" else sql
            inner_kind = scan(inner).kind if kind == "EXPLAIN" else kind
            access.check(user, required_privileges(inner_kind, inner, run("EXPLAIN AST " + inner), request.database))

        with access.running(user):
            data, summary = engine.query(
                sql,
                kind=statement.kind,
                database=request.database,
                settings=request.settings,
                params=request.params,
                fmt=request.default_format,
                base=user.engine_settings(),
                check=None if admin else check_query,
            )
        self._send_result(request, data, summary, fmt=fmt)

    def _access_statement(self, user, sql: str, request: Request):
        """CREATE/ALTER/DROP USER, GRANT, REVOKE, SHOW GRANTS/USERS: parsed and normalised by the
        engine, applied to the server's user store (chdev/access.py); results formatted by the engine."""
        engine = self.server.engine
        normalized, _ = engine.query(
            "SELECT formatQuerySingleLine({q:String})", kind="SELECT", database=request.database, settings={},
            params={"q": sql}, fmt="TabSeparatedRaw",
        )
        rows = self.server.access.execute(user, bytes(normalized).decode().strip(), request.database)
        if rows is None:
            return b"", Summary()
        column = "name" if sql.strip().upper().startswith("SHOW USERS") else f"GRANTS FOR {user.name}"
        literal = "[" + ",".join("'" + r.replace("\\", "\\\\").replace("'", "\\'") + "'" for r in rows) + "]"
        return engine.query(
            f"SELECT arrayJoin(CAST({literal}, 'Array(String)')) AS `{column}`", kind="SELECT",
            database=request.database, settings=request.settings, params={}, fmt=request.default_format,
        )

    # --- responses ------------------------------------------------------------------------

    def _common_headers(self, request: Request | None) -> dict[str, str]:
        headers = {
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Timezone": "UTC",
            "Keep-Alive": f"timeout={int(self.server.keep_alive_timeout)}",
        }
        if request is not None:
            headers["X-ClickHouse-Query-Id"] = request.query_id
        return headers

    def _send_result(self, request: Request, data, summary, fmt: str | None):
        headers = self._common_headers(request)
        headers["X-ClickHouse-Summary"] = summary.header()
        headers["X-ClickHouse-Exception-Tag"] = _exception_tag()
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = content_type_for(fmt)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        payload = bytes(data)
        if request.compress and payload:
            payload = compression.encode_blocks(payload)
        if request.http_compression:
            encoding = compression.choose_encoding(self.headers.get("Accept-Encoding"))
            if encoding and payload:
                payload = compression.encode_http(payload, encoding, request.compression_level)
                headers["Content-Encoding"] = encoding
        self._send(200, payload, headers)

    def _send_error(self, err: ClickHouseError, request: Request | None):
        headers = self._common_headers(request)
        headers["X-ClickHouse-Exception-Code"] = str(err.code)
        headers["Content-Type"] = "text/plain; charset=UTF-8"
        # Leave the connection usable when the rest of the body can be skipped cheaply.
        body = getattr(self, "_raw_body", None)
        if body is not None and not body.eof:
            if err.name == "QUERY_IS_TOO_LARGE" or not body.drain(self.server.max_body_bytes):
                self.close_connection = True
        if self.close_connection:
            headers["Connection"] = "close"
        log.debug("error %s: %s", err.code, err.message)
        self._send(err.http_status, err.body(), headers)

    def _send_text(self, status: int, text: str):
        self._send(status, text.encode(), {"Content-Type": "text/html; charset=UTF-8"})

    def _send(self, status: int, payload: bytes, headers: dict[str, str], head_only: bool = False):
        self._status = status
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection or self.server.stopping:
                self.send_header("Connection", "close")
                self.close_connection = True
            if self.request_version == "HTTP/0.9":
                self.end_headers()  # no headers at all
            else:
                # One write for headers and a small payload: one syscall, one segment.
                self._headers_buffer.append(b"\r\n")
                if not head_only and payload and len(payload) <= _COALESCE_BYTES:
                    self._headers_buffer.append(payload)
                    payload = b""
                self.flush_headers()
            if not head_only and payload:
                self.wfile.write(payload)
        except (ConnectionError, socket.timeout):
            self.close_connection = True


class _Empty:
    @staticmethod
    def read() -> bytes:
        return b""


def _one_line(sql: str, limit: int = 100) -> str:
    line = " ".join(sql.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
