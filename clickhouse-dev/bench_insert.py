#!/usr/bin/env python3
"""Raw insert ceiling through chserver: bulk RowBinary inserts of generated event rows.

Starts its own chserver on a free port in a temp dir (or uses --url), creates the events
table of the BRIEF, generates the rows inside the engine, then times HTTP inserts of the
same bytes with and without `decompress=1` LZ4 framing and with optimize_on_insert 0 / 1.
Client-side compression happens before the clock starts (the Rust client compresses on
its own core while streaming). With its own server it also reports the server's CPU seconds
per insert (from /proc/<pid>/stat), which a loaded machine disturbs far less than wall time.
`--chserver` starts another copy of chserver.py, e.g. a checkout from before a change.

    .venv/bin/python clickhouse-dev/bench_insert.py [--rows 1000000] [--batch-rows 0] [--json]
        [--chserver PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from chdev import compression  # noqa: E402

EVENTS_DDL = """
CREATE TABLE events (
    tenant LowCardinality(String),
    name LowCardinality(String),
    time DateTime64(3, 'UTC'),
    event_id UUID,
    session_id String,
    user_id String,
    attributes Map(LowCardinality(String), String),
    metrics Map(LowCardinality(String), Float64),
    body String CODEC(ZSTD)
) ENGINE = ReplacingMergeTree
PARTITION BY toDate(time)
ORDER BY (tenant, name, time, event_id)
"""

GENERATE = """
SELECT
    'tenant-' || toString(number % 10),
    'llm.request.' || toString(number % 20),
    toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + number / 100,
    generateUUIDv4(number),
    'session-' || toString(number % 50000),
    'user-' || toString(number % 20000),
    map('model', 'model-' || toString(number % 5), 'route', '/v1/chat', 'region', 'eu-' || toString(number % 3)),
    map('tokens', toFloat64(number % 4000), 'latency_ms', (number % 900) / 3.0, 'cost', (number % 100) / 1000.0),
    repeat('x', number % 200)
FROM numbers({rows})
FORMAT RowBinary
"""


class Client:
    def __init__(self, host: str, port: int, pid: int | None = None):
        self.host, self.port = host, port
        self.pid = pid

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (None for a server we did not start)."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
        # Fields 14 and 15 of proc(5) (utime, stime); index 0 here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def post(self, body: bytes, **params) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request("POST", "/?" + urllib.parse.urlencode(params), body=body)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def sql(self, query: str, **params) -> bytes:
        status, _headers, data = self.post(query.encode(), **params)
        if status != 200:
            raise RuntimeError(data.decode(errors="replace"))
        return data


def start_server(data_dir: str, chserver: str) -> tuple[subprocess.Popen, int]:
    ready = os.path.join(data_dir, "port")
    process = subprocess.Popen(
        [sys.executable, chserver, "--port", "0", "--data-dir",
         os.path.join(data_dir, "db"), "--ready-file", ready, "--log-level", "warning"],
    )
    deadline = time.time() + 60
    while not os.path.exists(ready):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError("chserver did not start")
        time.sleep(0.05)
    return process, int(open(ready).read())


def split_rowbinary_batches(client: Client, rows: int, batch_rows: int) -> list[bytes]:
    """Generates each batch separately so batch boundaries fall on rows."""
    return [
        client.sql(GENERATE.replace("FROM numbers({rows})", f"FROM numbers({start}, {min(batch_rows, rows - start)})"))
        for start in range(0, rows, batch_rows)
    ]


def run(client: Client, rows: int, batch_rows: int) -> list[dict]:
    client.sql("DROP TABLE IF EXISTS events SYNC")
    client.sql(EVENTS_DDL)
    t = time.perf_counter()
    if batch_rows and batch_rows < rows:
        batches = split_rowbinary_batches(client, rows, batch_rows)
    else:
        batches = [client.sql(GENERATE.replace("{rows}", str(rows)))]
    raw_bytes = sum(map(len, batches))
    print(f"generated {rows} rows, {raw_bytes / 1e6:.1f} MB RowBinary in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    compressed = [compression.encode_blocks(b) for b in batches]
    results = []
    for optimize in (0, 1):
        for compressed_body in (False, True):
            client.sql("TRUNCATE TABLE events")
            bodies = compressed if compressed_body else batches
            params = {"query": "INSERT INTO events FORMAT RowBinary", "optimize_on_insert": optimize}
            if compressed_body:
                params["decompress"] = 1
            cpu_before = client.cpu_seconds()
            started = time.perf_counter()
            for body in bodies:
                status, _headers, data = client.post(body, **params)
                if status != 200:
                    raise RuntimeError(data.decode(errors="replace"))
            elapsed = time.perf_counter() - started
            cpu = client.cpu_seconds()
            count = int(client.sql("SELECT count() FROM events").strip())
            assert count == rows, (count, rows)
            result = {
                "rows": rows,
                "batch_rows": batch_rows or rows,
                "compression": "lz4" if compressed_body else "none",
                "optimize_on_insert": optimize,
                "wire_mb": round(sum(map(len, bodies)) / 1e6, 1),
                "seconds": round(elapsed, 3),
                "rows_per_s": round(rows / elapsed),
                "server_cpu_s": None if cpu is None else round(cpu - cpu_before, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=0, help="split into inserts of this many rows (0: one)")
    parser.add_argument("--url", help="use a running server, e.g. http://127.0.0.1:8123 (drops table `events`!)")
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
            results = run(client, args.rows, args.batch_rows)
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'compression':<12}{'optimize_on_insert':>20}{'wire MB':>10}{'seconds':>10}{'rows/s':>12}"
              f"{'server CPU s':>14}{'load 1m':>9}")
        for r in results:
            print(f"{r['compression']:<12}{r['optimize_on_insert']:>20}{r['wire_mb']:>10}{r['seconds']:>10}"
                  f"{r['rows_per_s']:>12}{r['server_cpu_s'] if r['server_cpu_s'] is not None else '-':>14}"
                  f"{r['load_avg_1m']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
