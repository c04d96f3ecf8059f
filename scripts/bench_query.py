#!/usr/bin/env python3
"""The query API's performance targets (BRIEF): a cached hit p99 < 1 ms server-side, and an
uncached rollup query over 24 h of one tenant on 10M raw events < 50 ms of ClickHouse time,
with the transport reported apart.

Starts the ClickHouse dev server and two release query APIs on free loopback ports in a temp dir
(no nats-server: the query API needs NATS only for /v1/stream), migrates the schema with
`aggregator migrate`, and loads CHUTE_BENCH_QUERY_ROWS raw events (default 10M) for
CHUTE_BENCH_QUERY_TENANTS tenants (default 10) spread over the 24 h before the last whole hour.
The rows are made by the engine (`INSERT INTO events SELECT ... FROM numbers()`), in time order,
in inserts of --batch-rows (the aggregator's 200k) with the aggregator's insert settings, so the
raw table and every materialized view (1m/1h rollups, metric rollups, sessions) fill exactly as
they do in production; the load is timed (rows/s, with no RowBinary body to parse: an upper
bound for the HTTP insert path) and checked (raw count, rollup and session sums).

Then, for each dashboard query (/v1/timeseries at 1m and 1h steps, count and p99 latency, and
unique users at 1m;
/v1/top by name; /v1/sessions; all over 24 h of one tenant):
- uncached: --requests distinct requests (tenant, a one-step shift, or the limit varies; the
  cache miss counter proves every one missed), each sent to query API A (direct to ClickHouse:
  client latency and its `Server-Timing` time) and to query API B, which reaches ClickHouse
  through a recording proxy in this process: the proxy keeps the exact request the query API
  sent (SQL and bound parameters) and the dev server's `X-ClickHouse-Summary` `elapsed_ns`
  (engine time: parse, plan, execute, format) and its own round trip to the dev server;
- cached: --cached-requests repeats of one request on A (the hit counter proves they hit):
  `Server-Timing` (the query API's own time) and client latency.
`EXPLAIN indexes = 1` of each captured statement goes into the JSON.

Writes bench/results/query-<UTC date>.json and prints a table with the targets met/missed.
Run it under the bench lock: `flock /tmp/chute-bench.lock .venv/bin/python scripts/bench_query.py`.
Every phase is bounded in time; a missing binary or failed check stops it with a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.parser
import email.policy
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "tests"))

from live_page_support import Pipeline, free_port, git_head, http_status  # noqa: E402

DATABASE = "chute"
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
EVENTS_PER_SESSION = 20
CONCURRENT_SESSIONS = 50  # sessions of one tenant open at once
USERS_PER_TENANT = 10_000
EVENT_NAMES = 8
CACHED_TARGET_MS = 1.0
ENGINE_TARGET_MS = 50.0


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def percentiles(values: list[float]) -> dict:
    """Nearest-rank percentiles, ms rounded to the microsecond."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 100)) - 1))], 3)

    return {"count": len(ordered), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(ordered[-1], 3), "mean": round(sum(ordered) / len(ordered), 3)}


# ---------------------------------------------------------------- processes


def binary(bin_dir: Path, name: str) -> str:
    path = bin_dir / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SystemExit(f"{path} is missing: `cargo build --release -p chute-aggregator -p chute-query-api`")
    return str(path)


# ---------------------------------------------------------------- ClickHouse over HTTP


class ClickHouse:
    def __init__(self, port: int):
        self.port = port

    def query(self, sql: str, params: dict | None = None, timeout: float = 120) -> tuple[str, dict]:
        """(body, X-ClickHouse-Summary) of one statement; raises with the server's message."""
        url = "/?" + urllib.parse.urlencode({"database": DATABASE, **(params or {})})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", url, body=sql.encode())
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            summary = json.loads(resp.getheader("X-ClickHouse-Summary") or "{}")
        finally:
            conn.close()
        if resp.status != 200:
            raise SystemExit(f"ClickHouse {resp.status} for {sql[:200]!r}: {body[:1000]}")
        return body, summary

    def scalar(self, sql: str) -> str:
        return self.query(sql)[0].strip()


def load_sql(tenants: int, rows: int, start_ms: int) -> str:
    """Events `number` in [first, first + count) of `rows` over 24 h from `start_ms`, in time
    order: tenant = number mod tenants; each tenant's sessions (EVENTS_PER_SESSION events each,
    CONCURRENT_SESSIONS open at once) follow each other; 8 names, 10k users per tenant, the load
    generator's 4 metrics and 3 random 16-byte attributes plus run_id, a 64-byte body."""
    sessions = max(1, rows // tenants // EVENTS_PER_SESSION)
    slot_ms = max(1, DAY_MS * CONCURRENT_SESSIONS // sessions)
    return f"""
INSERT INTO events (tenant, name, time, event_id, session_id, user_id, attributes, metrics, body, ingested_at)
SELECT
    concat('tenant-', toString(number % {tenants})) AS tenant,
    concat('llm.request.', toString(intHash64(number * 7 + 1) % {EVENT_NAMES})) AS name,
    fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {DAY_MS}, {rows})), 'UTC') AS time,
    generateUUIDv4(number) AS event_id,
    concat('session-', toString(intDiv(intDiv(number * {DAY_MS}, {rows}), {slot_ms}) * {CONCURRENT_SESSIONS}
        + intHash64(number * 7 + 2) % {CONCURRENT_SESSIONS})) AS session_id,
    concat('user-', toString(intHash64(number * 7 + 3) % {USERS_PER_TENANT})) AS user_id,
    map('run_id', 'bench-query', 'attr_0', randomPrintableASCII(16, number), 'attr_1',
        randomPrintableASCII(16, number + 1), 'attr_2', randomPrintableASCII(16, number + 2)) AS attributes,
    map('tokens_in', toFloat64(1 + intHash64(number * 7 + 4) % 3999),
        'tokens_out', toFloat64(1 + intHash64(number * 7 + 5) % 3999),
        'latency_ms', 5 + (intHash64(number * 7 + 6) % 2995000) / 1000,
        'cost_usd', (intHash64(number * 7 + 7) % 10000) / 100000) AS metrics,
    randomPrintableASCII(64, number + 3) AS body,
    time + toIntervalMillisecond(200) AS ingested_at
FROM numbers({{first:UInt64}}, {{count:UInt64}})"""


def load(clickhouse: ClickHouse, rows: int, tenants: int, batch_rows: int, start_ms: int, timeout: float) -> dict:
    sql = load_sql(tenants, rows, start_ms)
    deadline = time.monotonic() + timeout
    inserts, seconds, first = 0, 0.0, 0
    load_before = loadavg()
    while first < rows:
        if time.monotonic() > deadline:
            raise SystemExit(f"load: {first} of {rows} rows after {timeout:.0f} s (raise --load-timeout)")
        count = min(batch_rows, rows - first)
        # The aggregator's insert settings (aggregator/src/writer.rs), one token per batch.
        settings = {"param_first": first, "param_count": count, "insert_deduplicate": 1,
                    "insert_deduplication_token": f"bench-query:{first}",
                    "deduplicate_blocks_in_dependent_materialized_views": 1, "async_insert": 0,
                    "optimize_on_insert": 0, "max_insert_block_size": 2_000_000}
        started = time.monotonic()
        clickhouse.query(sql, settings, timeout=max(1.0, deadline - time.monotonic()))
        seconds += time.monotonic() - started
        inserts += 1
        first += count
        if inserts % 10 == 0:
            print(f"    {first} rows, {first / seconds:,.0f} rows/s", flush=True)
    return {"rows": rows, "inserts": inserts, "batch_rows": batch_rows, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "loadavg_before": load_before, "loadavg_after": loadavg(),
            "how": "INSERT INTO events SELECT ... FROM numbers() with the aggregator's insert settings: "
                   "rows made by the engine, no RowBinary body parsed; every materialized view fills"}


def check_load(clickhouse: ClickHouse, rows: int, tenants: int) -> dict:
    """The raw table and every rollup hold exactly the loaded events."""
    checks = {
        "events": "SELECT count() FROM events",
        "events_1m": "SELECT sum(event_count) FROM events_1m",
        "events_1h": "SELECT sum(event_count) FROM events_1h",
        "metrics_1m latency_ms": "SELECT sum(value_count) FROM metrics_1m WHERE metric = 'latency_ms'",
        "metrics_1h latency_ms": "SELECT sum(value_count) FROM metrics_1h WHERE metric = 'latency_ms'",
        "sessions": "SELECT sum(event_count) FROM sessions",
    }
    found = {name: int(clickhouse.scalar(sql)) for name, sql in checks.items()}
    wrong = {name: value for name, value in found.items() if value != rows}
    if wrong:
        raise SystemExit(f"load check: expected {rows} events everywhere, found {found}")
    per_tenant = int(clickhouse.scalar("SELECT count() FROM events WHERE tenant = 'tenant-0'"))
    return {"counts": found, "tenant_0_events": per_tenant,
            "sessions_per_tenant": int(clickhouse.scalar(
                "SELECT uniqExact(session_id) FROM sessions WHERE tenant = 'tenant-0'"))}


def settle_merges(clickhouse: ClickHouse, timeout: float) -> dict:
    """Waits (bounded) for background merges to finish, as they would have long before a
    dashboard asks about data hours old; returns active parts per table."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        merging = int(clickhouse.scalar(f"SELECT count() FROM system.merges WHERE database = '{DATABASE}'"))
        quiet = quiet + 1 if merging == 0 else 0
        time.sleep(1)
    parts = clickhouse.query(
        f"SELECT table, count(), sum(rows) FROM system.parts WHERE database = '{DATABASE}' AND active "
        "GROUP BY table ORDER BY table FORMAT JSONCompact")[0]
    return {"merges_settled": quiet >= 3,
            "active_parts": {row[0]: {"parts": int(row[1]), "rows": int(row[2])}
                             for row in json.loads(parts)["data"]}}


# ---------------------------------------------------------------- recording proxy


class Recorder:
    """What query API B sent to ClickHouse and what the dev server said about it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)

    def take(self) -> list[dict]:
        with self.lock:
            records, self.records = self.records, []
        return records


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a multipart/form-data body (the `clickhouse` crate sends query + param_*)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = part.get_payload(decode=True).decode()
    return fields


def start_proxy(upstream_port: int, recorder: Recorder) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream = None

        def log_message(self, *args):
            pass

        def read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return body
                    body += chunk
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def forward(self):
            body = self.read_body()
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
                self.upstream.connect()
                self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            self.upstream.request(self.command, self.path, body=body or None, headers=headers)
            resp = self.upstream.getresponse()
            payload = resp.read()
            roundtrip_ms = (time.perf_counter() - started) * 1000
            summary = resp.getheader("X-ClickHouse-Summary")
            content_type = self.headers.get("Content-Type") or ""
            if summary and content_type.startswith("multipart/form-data"):
                recorder.add({"path": self.path, "fields": form_fields(content_type, body), "status": resp.status,
                              "elapsed_ms": int(json.loads(summary)["elapsed_ns"]) / 1e6,
                              "roundtrip_ms": roundtrip_ms, "summary": json.loads(summary)})
            self.send_response_only(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = forward
        do_POST = forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# ---------------------------------------------------------------- the query API's client side


class QueryApi:
    def __init__(self, name: str, port: int):
        self.name, self.port = name, port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> tuple[int, float, float, bytes]:
        """(status, client ms, Server-Timing app ms, body) over one keep-alive connection."""
        started = time.perf_counter()
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        client_ms = (time.perf_counter() - started) * 1000
        timing = re.fullmatch(r"app;dur=([0-9.]+)", resp.getheader("Server-Timing") or "")
        if not timing:
            raise SystemExit(f"{self.name}: no Server-Timing app;dur=... on {path} "
                             f"(a query API older than the header?): {resp.getheaders()}")
        if resp.status != 200:
            raise SystemExit(f"{self.name}: {resp.status} for {path}: {body[:500]!r}")
        return resp.status, client_ms, float(timing.group(1)), body

    def counter(self, name: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def cache_counts(self) -> tuple[float, float]:
        return self.counter("chute_query_cache_hits_total"), self.counter("chute_query_cache_misses_total")


def kinds(end_ms: int) -> dict:
    """Per dashboard query: request j's path. Requests differ so that each one misses the cache
    while reading 24 h of one tenant: tenants first, then a one-step shift (timeseries, whose
    range is aligned to the step; a 1 h shift keeps 23+ h of data in range) or the limit."""
    start_ms = end_ms - DAY_MS

    def timeseries(step: str, step_ms: int, measure: str):
        return lambda tenant, k: (f"/v1/timeseries?tenant={tenant}&{measure}&step={step}"
                                  f"&from={start_ms - k * step_ms}&to={end_ms - k * step_ms}")

    return {
        "timeseries_1m_count": timeseries("1m", MINUTE_MS, "agg=count"),
        "timeseries_1m_p99": timeseries("1m", MINUTE_MS, "agg=p99&metric=latency_ms"),
        "timeseries_1m_users": timeseries("1m", MINUTE_MS, "agg=uniq_users"),
        "timeseries_1h_count": timeseries("1h", HOUR_MS, "agg=count"),
        "timeseries_1h_p99": timeseries("1h", HOUR_MS, "agg=p99&metric=latency_ms"),
        "top_24h": lambda tenant, k: f"/v1/top?tenant={tenant}&by=name&agg=count&from={start_ms}&to={end_ms}"
                                     f"&limit={10 + k}",
        "sessions_24h": lambda tenant, k: f"/v1/sessions?tenant={tenant}&from={start_ms}&to={end_ms}"
                                          f"&limit={100 + k}",
    }


def check_answer(kind: str, body: bytes, tenant_events: int) -> None:
    """The shift-0 answers are right: the count series sum to the tenant's events, top names
    too, sessions are listed."""
    answer = json.loads(body)
    if kind.endswith("_count"):
        total = sum(point["value"] or 0 for point in answer["points"])
        if round(total) != tenant_events:
            raise SystemExit(f"{kind}: the series sums to {total}, the tenant has {tenant_events} events")
    elif kind.endswith("_p99") or kind.endswith("_users"):
        if not any(point["value"] for point in answer["points"]):
            raise SystemExit(f"{kind}: no values in {body[:300]!r}")
    elif kind == "top_24h":
        total = sum(row["value"] for row in answer["items"])
        if round(total) != tenant_events or len(answer["items"]) != EVENT_NAMES:
            raise SystemExit(f"{kind}: top names sum to {total} over {len(answer['items'])} names")
    elif kind == "sessions_24h" and len(answer["sessions"]) != 100:
        raise SystemExit(f"{kind}: {len(answer['sessions'])} sessions listed, 100 expected")


def same_answer(kind: str, first: bytes, second: bytes) -> bool:
    """Equal answers; for t-digest percentiles, the same points with values within 5 % (merging
    digest states depends on the order parts and threads combine them)."""
    if not kind.endswith("_p99"):
        return first == second
    a, b = json.loads(first)["points"], json.loads(second)["points"]
    return len(a) == len(b) and all(
        x["t"] == y["t"] and (x["value"] is None) == (y["value"] is None)
        and (x["value"] is None or abs(x["value"] - y["value"]) <= 0.05 * max(abs(x["value"]), 1.0))
        for x, y in zip(a, b))


def explain(clickhouse: ClickHouse, record: dict) -> str:
    fields = dict(record["fields"])
    sql = re.sub(r"\s+FORMAT\s+\w+\s*$", "", fields.pop("query").strip())
    params = {name: value for name, value in fields.items() if name.startswith("param_")}
    return clickhouse.query("EXPLAIN indexes = 1 " + sql, params)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    parser.add_argument("--rows", type=int, default=env_int("CHUTE_BENCH_QUERY_ROWS", 10_000_000))
    parser.add_argument("--tenants", type=int, default=env_int("CHUTE_BENCH_QUERY_TENANTS", 10))
    parser.add_argument("--batch-rows", type=int, default=env_int("CHUTE_BENCH_QUERY_BATCH_ROWS", 200_000),
                        help="rows per insert (the aggregator's --batch-max-rows default)")
    parser.add_argument("--requests", type=int, default=env_int("CHUTE_BENCH_QUERY_REQUESTS", 100),
                        help="distinct (uncached) requests per query")
    parser.add_argument("--cached-requests", type=int, default=env_int("CHUTE_BENCH_QUERY_CACHED_REQUESTS", 1000),
                        help="repeats (cache hits) per query")
    parser.add_argument("--load-timeout", type=float, default=240)
    parser.add_argument("--out", default="")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (ClickHouse data, logs)")
    args = parser.parse_args()
    bin_dir = Path(args.bin_dir)
    aggregator, query_api = binary(bin_dir, "aggregator"), binary(bin_dir, "query-api")

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"query-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="chute-bench-query-"))
    # Only its process handling (start, readiness, stop): this bench starts its own services.
    procs = Pipeline(work=work, bin_dir=bin_dir)
    proxy = None
    started = time.monotonic()
    try:
        print(f"==> ClickHouse dev server in {work}", flush=True)
        ready = work / "clickhouse.port"
        procs.start_process("clickhouse", [sys.executable, str(ROOT / "clickhouse-dev" / "chserver.py"), "--port", "0",
                                   "--ready-file", str(ready), "--data-dir", str(work / "clickhouse"),
                                   "--watch-stdin", "--log-level", "warning"], stdin=subprocess.PIPE)
        procs.wait_until("ClickHouse dev server ready", "clickhouse",
                         lambda: ready.exists() and ready.read_text().strip() != "", 90)
        ch_port = int(ready.read_text().strip())
        clickhouse = ClickHouse(ch_port)
        clickhouse_url = f"http://127.0.0.1:{ch_port}/"
        migrate = subprocess.run([aggregator, "migrate", "--clickhouse-url", clickhouse_url],
                                 capture_output=True, text=True, timeout=120, cwd=ROOT)
        if migrate.returncode != 0:
            raise SystemExit(f"aggregator migrate failed:\n{migrate.stdout}\n{migrate.stderr}")

        # Data over the 24 h before the last whole hour at least 3 min old: every query below
        # ends there, so its answer is historical (cached 10 min, not the 1 s of ranges
        # touching the last two minutes).
        end_ms = (int(time.time() * 1000) - 3 * MINUTE_MS) // HOUR_MS * HOUR_MS
        print(f"==> loading {args.rows:,} events for {args.tenants} tenants over 24 h "
              f"(inserts of {args.batch_rows:,})", flush=True)
        loaded = load(clickhouse, args.rows, args.tenants, args.batch_rows, end_ms - DAY_MS, args.load_timeout)
        print(f"    {loaded['rows_per_s']:,} rows/s ({loaded['seconds']} s)", flush=True)
        loaded.update(check_load(clickhouse, args.rows, args.tenants))
        loaded.update(settle_merges(clickhouse, 90))
        print(f"    parts after merges: {loaded['active_parts']}", flush=True)

        recorder = Recorder()
        proxy, proxy_port = start_proxy(ch_port, recorder)
        apis = {}
        for name, url in (("direct", clickhouse_url), ("recorded", f"http://127.0.0.1:{proxy_port}/")):
            port = free_port()
            procs.start_process(f"query-api-{name}", [query_api, "--listen", f"127.0.0.1:{port}", "--clickhouse-url", url,
                                              "--nats-url", ""])
            procs.wait_until(f"query API {name} ready", f"query-api-{name}",
                             lambda p=port: http_status(f"http://127.0.0.1:{p}/readyz") == 200, 60)
            apis[name] = QueryApi(name, port)
        direct, recorded = apis["direct"], apis["recorded"]
        recorder.take()

        uncached_client, uncached_server, engine, roundtrip, sql, explains = {}, {}, {}, {}, {}, {}
        cached_client, cached_server = {}, {}
        tenant_events = loaded["tenant_0_events"]
        load_queries = loadavg()
        for kind, path_of in kinds(end_ms).items():
            print(f"==> {kind}: {args.requests} uncached, {args.cached_requests} cached", flush=True)
            paths = [path_of(f"tenant-{j % args.tenants}", j // args.tenants) for j in range(args.requests)]
            if len(set(paths)) != len(paths):
                raise SystemExit(f"{kind}: requests repeat")
            hits_before, misses_before = direct.cache_counts()
            clients, servers, records = [], [], []
            for j, path in enumerate(paths):
                _, client_ms, server_ms, body = direct.get(path)
                if j == 0:
                    check_answer(kind, body, tenant_events)
                clients.append(client_ms)
                servers.append(server_ms)
                _, _, _, recorded_body = recorded.get(path)
                if not same_answer(kind, body, recorded_body):
                    raise SystemExit(f"{kind}: the two query APIs answered {path} differently:\n"
                                     f"{body[:300]!r}\n{recorded_body[:300]!r}")
                taken = recorder.take()
                if len(taken) != 1:
                    raise SystemExit(f"{kind}: {len(taken)} ClickHouse requests recorded for {path}, 1 expected")
                records.extend(taken)
            hits, misses = direct.cache_counts()
            if misses - misses_before != len(paths) or hits != hits_before:
                raise SystemExit(f"{kind}: uncached phase had {hits - hits_before} hits and "
                                 f"{misses - misses_before} misses; {len(paths)} misses expected")
            uncached_client[kind], uncached_server[kind] = percentiles(clients), percentiles(servers)
            engine[kind] = percentiles([r["elapsed_ms"] for r in records])
            roundtrip[kind] = percentiles([r["roundtrip_ms"] for r in records])
            first = records[0]
            sql[kind] = {"query": first["fields"]["query"],
                         "params": {k: v for k, v in first["fields"].items() if k.startswith("param_")},
                         "read_rows": first["summary"].get("read_rows"),
                         "read_bytes": first["summary"].get("read_bytes")}
            explains[kind] = explain(clickhouse, first)

            # Cache hits: the shift-0 request, already answered once by `direct`.
            hits_before, misses_before = direct.cache_counts()
            clients, servers = [], []
            for _ in range(args.cached_requests):
                _, client_ms, server_ms, _ = direct.get(paths[0])
                clients.append(client_ms)
                servers.append(server_ms)
            hits, misses = direct.cache_counts()
            if hits - hits_before != args.cached_requests or misses != misses_before:
                raise SystemExit(f"{kind}: cached phase had {hits - hits_before} hits and "
                                 f"{misses - misses_before} misses; {args.cached_requests} hits expected")
            cached_client[kind], cached_server[kind] = percentiles(clients), percentiles(servers)
            print(f"    uncached client p50/p99 {uncached_client[kind]['p50']}/{uncached_client[kind]['p99']} ms, "
                  f"engine {engine[kind]['p50']}/{engine[kind]['p99']} ms; cached server "
                  f"{cached_server[kind]['p50']}/{cached_server[kind]['p99']} ms", flush=True)
        load_after = loadavg()
    finally:
        if proxy:
            proxy.shutdown()
        procs.stop()
        # 10M events leave ~3.4 GB of ClickHouse data behind.
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)

    # Judged at p99 (the BRIEF's bar), with the median beside it: a p99 of --requests samples on
    # two shared cores carries the machine's other work.
    targets = {
        "cached_hit_server_ms": {
            "target": f"p99 < {CACHED_TARGET_MS} ms",
            "by_endpoint": {k: {"p50": v["p50"], "p99": v["p99"], "met": v["p99"] < CACHED_TARGET_MS}
                            for k, v in cached_server.items()}},
        "uncached_rollup_24h_engine_ms": {
            "target": f"p99 < {ENGINE_TARGET_MS:.0f} ms",
            "by_endpoint": {k: {"p50": v["p50"], "p99": v["p99"], "met": v["p99"] < ENGINE_TARGET_MS,
                                "met_at_p50": v["p50"] < ENGINE_TARGET_MS} for k, v in engine.items()}},
    }
    for target in targets.values():
        target["met"] = all(v["met"] for v in target["by_endpoint"].values())
    result = {
        "date": stamp,
        "git_head": git_head(),
        "rows": args.rows,
        "tenants": args.tenants,
        "range": {"from_ms": end_ms - DAY_MS, "to_ms": end_ms},
        "requests": {"uncached_per_endpoint": args.requests, "cached_per_endpoint": args.cached_requests},
        "load": loaded,
        "load_rows_per_s": loaded["rows_per_s"],
        "loadavg": {"load_start": loaded["loadavg_before"], "load_end": loaded["loadavg_after"],
                    "queries_start": load_queries, "queries_end": load_after},
        # Client-measured (Python http.client, keep-alive) against the query API reading
        # ClickHouse directly; each request distinct, every one a cache miss.
        "query_uncached_ms": uncached_client,
        # The same requests' Server-Timing (the query API's own time, ClickHouse round trip included).
        "query_uncached_server_ms": uncached_server,
        # Engine time of the exact statement the query API sent (X-ClickHouse-Summary elapsed_ns).
        "query_engine_ms": engine,
        # The recording proxy's round trip to the dev server for that statement (dev server HTTP + engine).
        "query_dev_server_roundtrip_ms": roundtrip,
        "query_cached_server_ms": cached_server,
        "query_cached_client_ms": cached_client,
        "targets": targets,
        "sql": sql,
        "explain": explains,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nquery API, {args.rows:,} events, {args.tenants} tenants, 24 h of one tenant per query; "
          f"load {loaded['rows_per_s']:,} rows/s; 1-min load average {load_queries}-{load_after}")
    header = (f"{'endpoint':<22}{'uncached client p50/p99':>26}{'server p50/p99':>18}{'engine p50/p99':>18}"
              f"{'dev rt p50/p99':>18}{'cached server p50/p99':>24}{'cached client p50/p99':>24}")
    print(header)
    for kind in uncached_client:
        def pair(table):
            return f"{table[kind]['p50']:.2f}/{table[kind]['p99']:.2f}"
        print(f"{kind:<22}{pair(uncached_client):>26}{pair(uncached_server):>18}{pair(engine):>18}"
              f"{pair(roundtrip):>18}{pair(cached_server):>24}{pair(cached_client):>24}")
    for name, target in targets.items():
        print(f"target {name} {target['target']}: {'MET' if target['met'] else 'MISSED'}")
        for kind, value in target["by_endpoint"].items():
            print(f"    {kind:<22} p50 {value['p50']:8.3f}  p99 {value['p99']:8.3f} ms  "
                  f"{'met' if value['met'] else 'MISSED'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
