"""Every metric an alert or a dashboard names is exported by a running service (issue 7).

Starts the real pipeline from the debug binaries (nats-server with JetStream, the ClickHouse dev
server, `aggregator migrate`, ingestor, aggregator, query-api, router) on free 127.0.0.1 ports,
drives it so that every metric gets a sample (valid, invalid and retried publishes, a poison
message for the DLQ, cache miss + hit, a live-stream subscriber; for the router a routed event, a
fired alert whose webhook a local receiver rejects, a series over --max-series), then scrapes the
four `/metrics` endpoints and
checks the names used by deploy/prometheus/alerts.yml and deploy/grafana/dashboards/*.json, and
the fixed contract in conftest.py, against what the services really export.

The binaries come from `cargo build` (`make test` runs `cargo test --workspace` first, which
builds them); a missing binary or tool fails the run, never skips it.
"""

from __future__ import annotations

import http.client
import http.server
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (
    COUNTERS_GAUGES,
    DEPLOY,
    HISTOGRAMS,
    ROOT,
    ROUTER_COUNTERS_GAUGES,
    ROUTER_HISTOGRAMS,
    require_binary,
)

TARGET = ROOT / "target" / "debug"
SERVICES = ("ingestor", "aggregator", "query-api", "router")
TENANT = "metrics-test"
POISON = b"\xff\x00garbage"
POISON_SUBJECT = "events.3"

METRIC_REF = re.compile(r"\bchute_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Series that only appear after a failure this test cannot provoke cheaply (a JetStream publish
# error, a failed ClickHouse insert, a cache over its capacity). For these a HELP/TYPE line is
# enough; every other contract metric must have a real sample after the exercise.
ERROR_ONLY = {
    "chute_ingest_publish_errors_total",
    "chute_aggregator_insert_retries_total",
    "chute_aggregator_insert_errors_total",
    "chute_query_cache_evictions_total",
    # The router: a destination still in flight / a backlog only show under load.
    "chute_router_webhook_in_flight",
    "chute_router_pending_messages",
}

# The router's rules here: a route whose events a webhook receiver accepts (delivered), a
# threshold alert that fires on the first event and tells a receiver that rejects it (400:
# dead-lettered at once), and a second threshold rule whose series is over --max-series 1
# (dropped). {port} is the receiver's.
ROUTER_RULES = """
webhooks:
  hook:
    url: http://127.0.0.1:{port}/reject
    secret_env: PYTEST_WEBHOOK_SECRET
    max_attempts: 1
  ok:
    url: http://127.0.0.1:{port}/accept
    secret_env: PYTEST_WEBHOOK_SECRET
rules:
  - name: slow
    match: {{ event: llm.request, metrics: ["latency_ms > 42"] }}
    route: {{}}
    webhook: ok
  - name: busy
    match: {{ event: llm.request }}
    threshold: {{ value: count, window: 1m, above: 0 }}
    webhook: hook
  - name: busy_too
    match: {{ event: llm.request }}
    threshold: {{ value: count, window: 1m, above: 1000000 }}
"""


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204 if self.path == "/accept" else 400)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


# ---------------------------------------------------------------- process handling


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary(name: str) -> str:
    path = TARGET / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path} is missing: build the services first with "
            "`cargo build -p chute-ingestor -p chute-aggregator -p chute-query-api -p chute-router` "
            "(`make test` builds them in its `cargo test --workspace` step)",
            pytrace=False,
        )
    return str(path)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Pipeline:
    work: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    nats_port: int = 0
    clickhouse_url: str = ""
    grpc_target: str = ""
    admin: dict[str, str] = field(default_factory=dict)  # service -> http://host:port

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT, **kwargs
        )
        self.procs[name] = proc
        return proc

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            pytest.fail(
                f"{name} exited with {proc.returncode}; log tail:\n{tail(self.logs[name])}", pytrace=False
            )

    def wait_until(self, what: str, owner: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(owner)
            if check():
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{what}: not reached within {timeout:.0f} s; {owner} log tail:\n{tail(self.logs[owner])}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def stop(self) -> None:
        # Reverse start order: services first, then ClickHouse and NATS.
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                if proc.stdin:
                    proc.stdin.close()
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, http.client.HTTPException):
        return 0


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def clickhouse_query(url: str, sql: str) -> str:
    req = urllib.request.Request(url, data=sql.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- exercising the pipeline


def grpc_stubs():
    try:
        import grpc
        from grpc_tools import protoc
    except ImportError as err:  # pragma: no cover - environment problem
        pytest.fail(f"grpcio/grpcio-tools missing ({err}): .venv/bin/pip install -r requirements-dev.txt", pytrace=False)
    out = tempfile.mkdtemp(prefix="chute-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "chute/v1/ingest.proto"])
    assert code == 0, f"protoc failed with {code}"
    sys.path.insert(0, out)
    try:
        from chute.v1 import ingest_pb2, ingest_pb2_grpc
    finally:
        sys.path.remove(out)
    return grpc, ingest_pb2, ingest_pb2_grpc


def nats_core_publish(port: int, subject: str, payload: bytes) -> None:
    """Core NATS publish over the text protocol (JetStream stores it: the subject is a stream
    subject). PING/PONG makes sure the server has processed the PUB before we return."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        info = reader.readline()
        assert info.startswith(b"INFO "), f"unexpected NATS greeting {info!r}"
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        sock.sendall(f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\nPING\r\n")
        line = reader.readline()
        assert line == b"PONG\r\n", f"NATS answered {line!r} to PUB {subject}"


def event(pb, i: int, *, name: str = "llm.request"):
    ev = pb.Event(tenant=TENANT, name=name, session_id=f"s{i % 2}", user_id=f"u{i % 3}")
    ev.time.GetCurrentTime()
    ev.attributes["model"] = "chute-small"
    ev.metrics["tokens_in"] = 100 + i
    ev.metrics["latency_ms"] = 40.0 + i
    return ev


def metric_value(text: str, name: str) -> float:
    """Sum of the unlabelled/labelled samples of `name` in a scrape."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def exercise(p: Pipeline) -> None:
    grpc, pb, rpc = grpc_stubs()
    channel = grpc.insecure_channel(p.grpc_target)
    stub = rpc.IngestServiceStub(channel)
    query = p.admin["query-api"]

    # Live stream subscriber open while the events arrive (stream metrics).
    sse = http.client.HTTPConnection("127.0.0.1", int(query.rsplit(":", 1)[1]), timeout=10)
    sse.request("GET", f"/v1/stream?tenant={TENANT}", headers={"Accept": "text/event-stream"})
    resp = sse.getresponse()
    assert resp.status == 200, f"/v1/stream answered {resp.status}: {resp.read(500)!r}"

    # 5 valid events and 1 invalid one (no name: rejected counter), then the same request again
    # with the same idempotency key (JetStream duplicate: duplicate counter).
    valid = [event(pb, i) for i in range(5)]
    request = pb.PublishRequest(events=[*valid, event(pb, 5, name="")], idempotency_key=f"metrics-{uuid.uuid4()}")
    first = stub.Publish(request, timeout=10)
    assert (first.accepted, first.rejected) == (5, 1), f"first publish: {first}"
    assert [e.field for e in first.errors] == ["name"], f"first publish errors: {first.errors}"

    got_data = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            line = resp.fp.readline()
        except TimeoutError:
            break
        if not line:
            break
        if line.startswith(b"data:"):
            got_data = True
            break
    sse.close()
    assert got_data, "/v1/stream delivered no event within 10 s"

    retry = stub.Publish(request, timeout=10)
    assert retry.accepted == 5, f"retried publish: {retry}"
    channel.close()

    # The aggregator inserts the 5 events exactly once.
    p.wait_until(
        "5 events in chute.events",
        "aggregator",
        lambda: clickhouse_query(p.clickhouse_url, "SELECT count() FROM chute.events").strip() == "5",
        timeout=20,
    )

    # A poison message straight to a partition subject: the aggregator dead-letters it.
    nats_core_publish(p.nats_port, POISON_SUBJECT, POISON)
    aggregator = p.admin["aggregator"] + "/metrics"
    p.wait_until(
        "poison message in the DLQ (chute_aggregator_dlq_messages_total > 0, chute_aggregator_dlq_size > 0)",
        "aggregator",
        lambda: (lambda t: metric_value(t, "chute_aggregator_dlq_messages_total") > 0
                 and metric_value(t, "chute_aggregator_dlq_size") > 0)(http_get(aggregator)[1]),
        timeout=20,
    )

    # The same closed historical range twice: a cache miss (ClickHouse query) then a hit.
    step = 60_000
    to = (int(time.time() * 1000) // step) * step - 10 * step
    url = f"{query}/v1/timeseries?" + urllib.parse.urlencode(
        {"tenant": TENANT, "agg": "count", "step": "1m", "from": to - 60 * step, "to": to}
    )
    for attempt in ("miss", "hit"):
        status, body = http_get(url)
        assert status == 200, f"/v1/timeseries ({attempt}) answered {status}: {body[:500]}"

    # The router routed the slow events (their webhooks delivered), fired `busy` and dead-lettered
    # its rejected webhook.
    router = p.admin["router"] + "/metrics"
    p.wait_until(
        "router: routed, alert fired, webhook dead-lettered",
        "router",
        lambda: (lambda t: metric_value(t, "chute_router_routed_total") > 0
                 and metric_value(t, "chute_router_alert_transitions_total") > 0
                 and metric_value(t, "chute_router_webhook_dead_lettered_total") > 0
                 and metric_value(t, "chute_router_webhook_delivery_seconds_count") > 0)(http_get(router)[1]),
        timeout=30,
    )


# ---------------------------------------------------------------- scraping


@dataclass
class Scrape:
    types: dict[str, str]  # family -> TYPE
    helps: set[str]
    samples: set[str]  # sample names as written (X, X_bucket, X_sum, X_count, ...)
    values: dict[str, float]  # sample name -> sum over its label sets

    def total(self, family: str) -> float:
        """Sum of a counter/gauge over its series, or a histogram's observation count."""
        if self.types.get(family) in ("histogram", "summary"):
            return self.values.get(family + "_count", 0.0)
        return self.values.get(family, 0.0)

    def families(self) -> set[str]:
        return set(self.types) | self.helps | {self.family_of(s) for s in self.samples}

    def family_of(self, sample: str) -> str:
        for suffix in HISTOGRAM_SUFFIXES:
            base = sample[: -len(suffix)]
            if sample.endswith(suffix) and self.types.get(base) in ("histogram", "summary"):
                return base
        return sample

    def sampled(self) -> set[str]:
        return {self.family_of(s) for s in self.samples}


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+\S+")


def parse(text: str) -> Scrape:
    types, helps, samples, values = {}, set(), set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
        elif line.startswith("# HELP "):
            helps.add(line.split(None, 3)[2])
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"unparsable exposition line: {line!r}"
            samples.add(match.group(1))
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(line.rsplit(None, 1)[1])
    return Scrape(types, helps, samples, values)


def referenced_names() -> dict[str, set[str]]:
    """chute_* names per file: deploy/prometheus/alerts.yml and every Grafana dashboard."""
    files = [DEPLOY / "prometheus" / "alerts.yml", *sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))]
    refs = {}
    for path in files:
        names = set(METRIC_REF.findall(path.read_text()))
        assert names or path.suffix == ".json", f"no chute_* metric found in {path}"
        refs[str(path.relative_to(ROOT))] = names
    assert any(refs.values()), "no chute_* metric referenced at all: is the regex still right?"
    return refs


# ---------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory, request) -> dict[str, Scrape]:
    bins = {name: binary(name) for name in SERVICES}
    nats_server = require_binary("nats-server", "make deps (apt-get install -y nats-server)")
    chserver = ROOT / "clickhouse-dev" / "chserver.py"
    assert chserver.exists(), f"{chserver} missing"
    try:
        import chdb  # noqa: F401
    except ImportError:
        pytest.fail("chdb-core is not installed: .venv/bin/pip install -r clickhouse-dev/requirements.txt", pytrace=False)

    started = time.monotonic()
    p = Pipeline(tmp_path_factory.mktemp("pipeline"))
    request.addfinalizer(p.stop)

    # NATS with JetStream.
    p.nats_port = free_port()
    p.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(p.nats_port), "-js",
                            "-sd", str(p.work / "jetstream")])
    nats_url = f"nats://127.0.0.1:{p.nats_port}"

    # ClickHouse dev server (exits by itself if this process dies: --watch-stdin).
    ready = p.work / "clickhouse.port"
    p.start("clickhouse", [sys.executable, str(chserver), "--port", "0", "--ready-file", str(ready),
                           "--data-dir", str(p.work / "clickhouse"), "--watch-stdin", "--log-level", "warning"],
            stdin=subprocess.PIPE)
    p.wait_until("nats-server accepting connections", "nats-server", lambda: tcp_open(p.nats_port), timeout=15)
    p.wait_until("ClickHouse dev server ready", "clickhouse",
                 lambda: ready.exists() and ready.read_text().strip() != "", timeout=60)
    p.clickhouse_url = f"http://127.0.0.1:{ready.read_text().strip()}/"

    migrate = subprocess.run(
        [bins["aggregator"], "migrate", "--clickhouse-url", p.clickhouse_url, "--nats-url", nats_url],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert migrate.returncode == 0, f"aggregator migrate failed:\n{migrate.stdout}\n{migrate.stderr}"

    grpc_port, ingest_admin, agg_admin, query_port, router_admin = (free_port() for _ in range(5))
    p.grpc_target = f"127.0.0.1:{grpc_port}"
    p.admin = {
        "ingestor": f"http://127.0.0.1:{ingest_admin}",
        "aggregator": f"http://127.0.0.1:{agg_admin}",
        "query-api": f"http://127.0.0.1:{query_port}",
        "router": f"http://127.0.0.1:{router_admin}",
    }
    p.start("ingestor", [bins["ingestor"], "--nats-url", nats_url, "--grpc-listen", p.grpc_target,
                         "--admin-listen", f"127.0.0.1:{ingest_admin}", "--stream-max-bytes", "1GiB",
                         # The OTLP listeners' fixed default ports (4317, 4318) may be taken here.
                         "--otlp-grpc-listen", "off", "--otlp-http-listen", "off"])
    p.start("aggregator", [bins["aggregator"], "--nats-url", nats_url, "--clickhouse-url", p.clickhouse_url,
                           "--admin-listen", f"127.0.0.1:{agg_admin}"])
    p.start("query-api", [bins["query-api"], "--listen", f"127.0.0.1:{query_port}", "--nats-url", nats_url,
                          "--clickhouse-url", p.clickhouse_url])
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    request.addfinalizer(receiver.shutdown)
    rules = p.work / "rules.yaml"
    rules.write_text(ROUTER_RULES.format(port=receiver.server_address[1]))
    p.start("router", [bins["router"], "--nats-url", nats_url, "--clickhouse-url", p.clickhouse_url,
                       "--admin-listen", f"127.0.0.1:{router_admin}", "--rules-file", str(rules),
                       "--routes-max-bytes", "64MiB", "--eval-interval", "500ms", "--max-series", "1"],
            env=dict(os.environ, PYTEST_WEBHOOK_SECRET="metrics-test-secret"))
    for name in SERVICES:
        p.wait_until(f"{name} /readyz == 200", name, lambda n=name: http_status(p.admin[n] + "/readyz") == 200,
                     timeout=30)

    exercise(p)

    scrapes = {}
    for name in SERVICES:
        status, text = http_get(p.admin[name] + "/metrics")
        assert status == 200, f"{name} /metrics answered {status}"
        scrapes[name] = parse(text)
    print(f"\npipeline started, exercised and scraped in {time.monotonic() - started:.1f} s")
    return scrapes


# ---------------------------------------------------------------- tests


def exporters(scrapes: dict[str, Scrape], name: str) -> dict[str, str]:
    """service -> "sample" | "described" for every service exporting family `name`."""
    found = {}
    for service, scrape in scrapes.items():
        if name in scrape.sampled():
            found[service] = "sample"
        elif name in scrape.families():
            found[service] = "described"
    return found


def resolve(scrapes: dict[str, Scrape], ref: str) -> str | None:
    """The exported family a referenced name reads: itself, or for `X_bucket/_sum/_count` the
    histogram X (`_bucket` only exists for a histogram, not a summary)."""
    if exporters(scrapes, ref):
        return ref
    for suffix in HISTOGRAM_SUFFIXES:
        if ref.endswith(suffix):
            base = ref[: -len(suffix)]
            kinds = {s.types.get(base) for s in scrapes.values()}
            allowed = {"histogram"} if suffix == "_bucket" else {"histogram", "summary"}
            if kinds & allowed:
                return base
    return None


def test_services_export_metrics(scrapes):
    print("\nexported chute_* metric families:")
    for service, scrape in scrapes.items():
        names = sorted(n for n in scrape.families() if n.startswith("chute_"))
        print(f"  {service} ({len(names)}):")
        for name in names:
            state = "sample" if name in scrape.sampled() else "HELP/TYPE only"
            print(f"    {name} [{scrape.types.get(name, '?')}, {state}]")
        assert names, f"{service} exports no chute_* metric"


def test_every_referenced_metric_is_exported(scrapes):
    missing = {}
    for source, names in referenced_names().items():
        print(f"\n{source}:")
        for ref in sorted(names):
            family = resolve(scrapes, ref)
            where = exporters(scrapes, family) if family else {}
            print(f"  {ref} -> {', '.join(f'{s} ({k})' for s, k in where.items()) or 'NOT EXPORTED'}")
            if not family:
                missing.setdefault(ref, []).append(source)
    assert not missing, "metrics referenced but not exported by any running service:\n" + "\n".join(
        f"  {ref} (used in {', '.join(sources)})" for ref, sources in sorted(missing.items())
    )


def test_metric_contract_is_exported_with_the_right_type(scrapes):
    problems = []
    histograms = HISTOGRAMS | ROUTER_HISTOGRAMS
    for name in sorted(COUNTERS_GAUGES | ROUTER_COUNTERS_GAUGES | histograms):
        where = exporters(scrapes, name)
        if not where:
            problems.append(f"{name}: not exported (no HELP/TYPE line and no sample)")
            continue
        kinds = {scrapes[s].types.get(name) for s in where}
        expected = {"histogram"} if name in histograms else {"counter", "gauge"}
        if not kinds <= expected:
            problems.append(f"{name}: exported as {sorted(map(str, kinds))}, expected {sorted(expected)}")
    assert not problems, "fixed metric contract (conftest.py) vs the running services:\n  " + "\n  ".join(problems)


def test_exercised_metrics_have_samples(scrapes):
    missing = []
    for name in sorted((COUNTERS_GAUGES | HISTOGRAMS | ROUTER_COUNTERS_GAUGES | ROUTER_HISTOGRAMS) - ERROR_ONLY):
        where = exporters(scrapes, name)
        if "sample" not in where.values():
            missing.append(f"{name} ({', '.join(f'{s}: {k}' for s, k in where.items()) or 'not exported'})")
    assert not missing, "no sample after the exercise for:\n  " + "\n  ".join(missing)


# What the exercise did, as the counters must show it (lower bounds: the services may count more,
# e.g. health checks or idle flushes).
EXERCISED = {
    "ingestor": {
        "chute_ingest_requests_total": 2,  # first publish + retry
        "chute_ingest_events_accepted_total": 10,  # 5 + 5 (the retry is acknowledged again)
        "chute_ingest_events_rejected_total": 2,  # the nameless event, in both calls
        "chute_ingest_published_messages_total": 2,
        "chute_ingest_duplicate_messages_total": 1,  # the retry with the same idempotency key
        "chute_ingest_request_duration_seconds": 2,
        "chute_ingest_publish_duration_seconds": 2,
    },
    "aggregator": {
        "chute_aggregator_events_inserted_total": 5,
        "chute_aggregator_dlq_messages_total": 1,
        "chute_aggregator_dlq_size": 1,
        "chute_aggregator_owned_partitions": 1,
        "chute_aggregator_batch_rows": 1,
        "chute_aggregator_batch_bytes": 1,
        "chute_aggregator_insert_duration_seconds": 1,
        "chute_aggregator_ingest_to_insert_seconds": 1,
        "chute_aggregator_stream_max_bytes": 1,  # 16 GiB, set by the first trim round
    },
    "query-api": {
        "chute_query_requests_total": 2,
        "chute_query_cache_misses_total": 1,
        "chute_query_cache_hits_total": 1,
        "chute_query_cache_bytes": 1,
        "chute_query_clickhouse_queries_total": 1,
        "chute_query_stream_events_total": 1,
        "chute_query_request_duration_seconds": 2,
        "chute_query_clickhouse_duration_seconds": 1,
    },
    "router": {
        "chute_router_events_total": 5,  # the first publish's 5 (the retry is a JetStream duplicate)
        "chute_router_routed_total": 1,  # the events with latency_ms > 42 (43, 44)
        "chute_router_rules": 3,
        "chute_router_alert_transitions_total": 1,  # busy fired
        "chute_router_webhook_attempts_total": 3,  # 2 routed events delivered, 1 alert rejected
        "chute_router_webhook_failures_total": 1,  # the 400
        "chute_router_webhook_dead_lettered_total": 1,
        "chute_router_webhook_delivery_seconds": 1,
        "chute_router_series_dropped_total": 1,  # busy_too's series, over --max-series 1
    },
}


def test_exercise_moved_the_metrics(scrapes):
    wrong = []
    for service, minimums in EXERCISED.items():
        for name, minimum in minimums.items():
            got = scrapes[service].total(name)
            if got < minimum:
                wrong.append(f"{service} {name} = {got:g}, expected >= {minimum}")
    assert not wrong, "the exercise did not show up in the metrics:\n  " + "\n  ".join(wrong)
