#!/usr/bin/env python3
"""Per-request latency of chserver: small queries over persistent HTTP/1.1 keep-alive connections.

Starts its own chserver on a free port in a temp dir (or uses --url), creates a small minute
rollup (the shape of sql/migrations/0002: AggregatingMergeTree with uniq states), then times
two requests:

- `select1`: `POST /` with body `SELECT 1` (what curl or a health probe sends);
- `rollup`: what query-api sends through the clickhouse crate: `default_format=RowBinaryWithNamesAndTypes`,
  `database`, the three per-query settings (`max_execution_time`, `max_result_rows`,
  `result_overflow_mode`), a multipart body with the query and `param_*` fields,
  `Accept-Encoding: lz4`; the query groups a day of the rollup by hour.

Each is run sequentially on one connection and by C concurrent clients (separate processes,
one connection each). It prints p50/p99 of the client's wall time per request next to p50 of
the `elapsed_ns` the server reports in X-ClickHouse-Summary (engine time, see README), the
server's CPU milliseconds per request when it started the server (from /proc/<pid>/stat) and
the 1-minute load average. `--chserver` starts another copy, e.g. a checkout from before a change.

    .venv/bin/python clickhouse-dev/bench_latency.py [--requests 500] [--clients 4] [--json]
        [--chserver PATH] [--url http://127.0.0.1:8123]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_insert import Client, start_server  # noqa: E402

DATABASE = "bench_latency"
SETUP = [
    f"DROP DATABASE IF EXISTS {DATABASE}",
    f"CREATE DATABASE {DATABASE}",
    f"""CREATE TABLE {DATABASE}.events_1m (
        tenant LowCardinality(String),
        name LowCardinality(String),
        minute DateTime('UTC'),
        event_count SimpleAggregateFunction(sum, UInt64),
        users_state AggregateFunction(uniq, String)
    ) ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(minute) ORDER BY (tenant, name, minute)""",
    f"""INSERT INTO {DATABASE}.events_1m
        SELECT 'tenant-' || toString(number % 10), 'llm.request.' || toString(number % 20),
               toDateTime('2026-01-01 00:00:00', 'UTC') + intDiv(number, 200) * 60,
               1 + number % 7, uniqState('user-' || toString(number % 997))
        FROM numbers(200000) GROUP BY 1, 2, 3, 4""",
    f"OPTIMIZE TABLE {DATABASE}.events_1m FINAL",
]
ROLLUP_SQL = (
    "SELECT name, toStartOfHour(minute) AS hour, sum(event_count) AS events, uniqMerge(users_state) AS users "
    "FROM events_1m WHERE tenant = {tenant:String} AND minute >= {from:DateTime} AND minute < {to:DateTime} "
    "GROUP BY name, hour ORDER BY name, hour"
)
ROLLUP_PARAMS = {"tenant": "tenant-3", "from": "2026-01-01 00:00:00", "to": "2026-01-02 00:00:00"}
BOUNDARY = "bench0123456789"


def multipart(fields: dict[str, str]) -> bytes:
    body = b""
    for name, value in fields.items():
        body += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    return body + f"--{BOUNDARY}--\r\n".encode()


def request_for(kind: str) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one request of `kind`."""
    if kind == "select1":
        return "/", b"SELECT 1", {}
    url = "/?" + urllib.parse.urlencode(
        {
            "default_format": "RowBinaryWithNamesAndTypes",
            "database": DATABASE,
            "max_execution_time": "30",
            "max_result_rows": "100000",
            "result_overflow_mode": "throw",
        }
    )
    body = multipart({"query": ROLLUP_SQL, **{f"param_{k}": v for k, v in ROLLUP_PARAMS.items()}})
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Accept-Encoding": "lz4"}
    return url, body, headers


def run_client(args: tuple[str, int, str, int]) -> list[tuple[float, int]]:
    """`count` requests on one keep-alive connection: [(wall ms, summary elapsed_ns)]."""
    host, port, kind, count = args
    path, body, headers = request_for(kind)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            wall = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(data.decode(errors="replace"))
            if response.getheader("Connection", "").lower() == "close":
                raise RuntimeError("server closed the keep-alive connection")
            summary = json.loads(response.getheader("X-ClickHouse-Summary", "{}"))
            samples.append((wall, int(summary.get("elapsed_ns", 0))))
    finally:
        conn.close()
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def measure(client: Client, kind: str, clients: int, requests: int) -> dict:
    # Warm-up: connections, the engine's caches, the pool's connections.
    with multiprocessing.Pool(clients) as pool:
        pool.map(run_client, [(client.host, client.port, kind, 20)] * clients)
        cpu_before = client.cpu_seconds()
        started = time.perf_counter()
        per_client = pool.map(run_client, [(client.host, client.port, kind, requests)] * clients)
        elapsed = time.perf_counter() - started
    cpu = client.cpu_seconds()
    samples = [sample for samples in per_client for sample in samples]
    walls = [wall for wall, _ in samples]
    engine = [ns / 1e6 for _, ns in samples]
    return {
        "query": kind,
        "clients": clients,
        "requests": len(samples),
        "p50_ms": round(percentile(walls, 0.50), 2),
        "p99_ms": round(percentile(walls, 0.99), 2),
        "engine_p50_ms": round(percentile(engine, 0.50), 2),
        "requests_per_s": round(len(samples) / elapsed),
        "server_cpu_ms_per_request": None if cpu is None else round((cpu - cpu_before) * 1000 / len(samples), 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="requests per client and run (default 500)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the second run (default 4)")
    parser.add_argument("--url", help=f"use a running server (drops database `{DATABASE}`!)")
    parser.add_argument("--json", action="store_true", help="print results as one JSON document on stdout")
    parser.add_argument("--chserver", default=os.path.join(HERE, "chserver.py"), help="the chserver.py to start")
    args = parser.parse_args()

    process = None
    with tempfile.TemporaryDirectory(prefix="chbench-") as tmp:
        if args.url:
            url = urllib.parse.urlsplit(args.url)
            client = Client(url.hostname, url.port or 8123)
        else:
            process, port = start_server(tmp, args.chserver)
            client = Client("127.0.0.1", port, process.pid)
        try:
            for statement in SETUP:
                client.sql(statement)
            results = [
                measure(client, kind, clients, args.requests)
                for kind in ("select1", "rollup")
                for clients in (1, args.clients)
            ]
            if args.url is None:
                client.sql(f"DROP DATABASE {DATABASE}")
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'query':<9}{'clients':>8}{'requests':>9}{'p50 ms':>8}{'p99 ms':>8}{'engine p50':>11}"
              f"{'req/s':>7}{'server CPU ms/req':>18}{'load 1m':>8}")
        for r in results:
            cpu = r["server_cpu_ms_per_request"]
            print(f"{r['query']:<9}{r['clients']:>8}{r['requests']:>9}{r['p50_ms']:>8}{r['p99_ms']:>8}"
                  f"{r['engine_p50_ms']:>11}{r['requests_per_s']:>7}{cpu if cpu is not None else '-':>18}"
                  f"{r['load_avg_1m']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
