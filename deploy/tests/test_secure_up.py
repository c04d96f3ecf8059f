"""`CHUTE_SECURE=1 make up` (scripts/up-secure.sh) end to end, with clients nobody on the team
wrote: the script's own startup and demo must pass, then grpcio, nats-py and HTTPS requests check
that events land through TLS with an API key, and that a plaintext gRPC client, a missing key, an
anonymous NATS client and the query user's INSERT into ClickHouse are all refused.

The pipeline runs from the debug binaries (CHUTE_BIN_DIR; built here when missing) in a temporary
state dir (CHUTE_LOCAL_DIR) on free ports (CHUTE_EPHEMERAL_PORTS=1), never in .local/, and
`scripts/down.sh` stops it whatever happens.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import nats
import pytest

from conftest import ROOT

BIN_DIR = ROOT / "target" / "debug"
BINARIES = ("ingestor", "aggregator", "query-api", "router")
STARTUP_TIMEOUT_S = 150
QUERY_WAIT_S = 30


def load_send_sample():
    """scripts/send_sample.py as a module: its generated chute.v1 stubs."""
    spec = importlib.util.spec_from_file_location("send_sample", ROOT / "scripts" / "send_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def secure_up(tmp_path_factory: pytest.TempPathFactory):
    missing = [name for name in BINARIES if not (BIN_DIR / name).exists()]
    if missing:
        subprocess.run(
            ["cargo", "build", "-q"] + [arg for name in missing for arg in ("-p", f"chute-{name}")],
            cwd=ROOT, check=True, timeout=1800,
        )
    local = tmp_path_factory.mktemp("secure-up")
    env = dict(os.environ)
    env.update(
        CHUTE_SECURE="1",
        CHUTE_LOCAL_DIR=str(local),
        CHUTE_BIN_DIR=str(BIN_DIR),
        CHUTE_EPHEMERAL_PORTS="1",
        CHUTE_STREAM_MAX_BYTES="256MiB",
        CHUTE_ROUTES_MAX_BYTES="64MiB",
    )
    for inherited in ("CHUTE_API_KEYS_FILE", "CHUTE_TLS_CERT", "CHUTE_TLS_KEY", "CHUTE_API_KEY",
                      "CHUTE_ROUTER_RULES_FILE"):
        env.pop(inherited, None)
    try:
        started = time.monotonic()
        up = subprocess.run([str(ROOT / "scripts" / "up.sh")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=STARTUP_TIMEOUT_S)
        print(f"secure startup took {time.monotonic() - started:.1f} s")
        logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted((local / "logs").glob("*.log")))
        assert up.returncode == 0, f"secure up failed:\n{up.stdout}\n{up.stderr}\n{logs}"
        endpoints = dict(
            line.split("=", 1) for line in (local / "secure" / "endpoints.env").read_text().splitlines() if "=" in line
        )
        yield local, env, endpoints, up.stdout
    finally:
        pids = [int(pidfile.read_text()) for pidfile in local.glob("*.pid")]
        down = subprocess.run([str(ROOT / "scripts" / "down.sh")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), \
                f"pid {pid} survived make down"


def secret(local: Path, name: str) -> str:
    return (local / "secure" / "secrets" / name).read_text().strip()


def https(url: str, ca: Path, headers: dict[str, str] | None = None, data: bytes | None = None):
    """(status, body) of an HTTPS request verified against the local CA."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_secure_up(secure_up):
    local, env, endpoints, stdout = secure_up
    secure = local / "secure"
    ca = Path(endpoints["CHUTE_CA"])
    key = secret(local, "demo.key")

    # The script printed how a client uses the CA and the key, and said where they are.
    assert f"--cacert {ca}" in stdout and "authorization: Bearer" in stdout, stdout
    assert (local / "mode").read_text().strip() == "secure"
    for path in (secure / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is not mode 0600"

    # Events land through TLS with the key: grpcio over TLS, read back over HTTPS with the key.
    pb, rpc = load_send_sample().stubs()
    name = f"secure.{uuid.uuid4().hex[:8]}"
    events = []
    for index in range(3):
        event = pb.Event(tenant="demo", name=name, session_id="secure-test", user_id=f"user-{index}")
        event.time.GetCurrentTime()
        event.metrics["latency_ms"] = 10.0 + index
        events.append(event)
    request = pb.PublishRequest(events=events, idempotency_key=f"secure-test-{uuid.uuid4()}")
    target = endpoints["CHUTE_INGEST_GRPC"]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(target, credentials) as channel:
        stub = rpc.IngestServiceStub(channel)
        response = stub.Publish(request, metadata=[("authorization", f"Bearer {key}")], timeout=15)
        assert response.accepted == 3 and response.rejected == 0, response

        # A low-quality conversation for the router's example rule `low_quality` (quality < 0.7).
        routed = pb.Event(tenant="demo", name="llm.request", session_id="secure-test", user_id="user-r")
        routed.time.GetCurrentTime()
        routed.metrics["quality"] = 0.4
        response = stub.Publish(pb.PublishRequest(events=[routed], idempotency_key=f"secure-route-{uuid.uuid4()}"),
                                metadata=[("authorization", f"Bearer {key}")], timeout=15)
        assert response.accepted == 1, response

        # A TLS client without a key is refused before anything is stored.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Publish(request, timeout=15)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value

    # A plaintext gRPC client never gets an answer from the TLS listener.
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as plaintext:
            rpc.IngestServiceStub(channel).Publish(request, metadata=[("authorization", f"Bearer {key}")], timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE, plaintext.value

    query = endpoints["CHUTE_QUERY_HTTP"]
    assert query.startswith("https://"), query
    from_ms = int((time.time() - 600) * 1000)
    url = f"{query}/v1/events?name={name}&from={from_ms}"
    deadline = time.monotonic() + QUERY_WAIT_S
    while True:
        status, body = https(url, ca, {"authorization": f"Bearer {key}"})
        assert status == 200, body
        found = json.loads(body)["events"]
        if len(found) == 3:
            break
        assert len(found) < 3, f"more events than sent: {found}"
        assert time.monotonic() < deadline, f"only {len(found)} of 3 events queryable after {QUERY_WAIT_S} s"
        time.sleep(0.3)
    # ... and the query API refuses a caller without a key, or with a wrong one.
    assert https(url, ca)[0] == 401
    assert https(url, ca, {"authorization": "Bearer not-a-key"})[0] == 401

    # NATS refuses an anonymous client over TLS; the aggregator's user gets in (so the refusal is
    # the missing credentials, not TLS).
    nats_url = endpoints["CHUTE_NATS_URL"]
    tls = ssl.create_default_context(cafile=str(ca))

    async def nats_connect(**credentials):
        errors: list[Exception] = []

        async def on_error(error: Exception) -> None:
            errors.append(error)

        client = await asyncio.wait_for(
            nats.connect(nats_url, tls=tls, allow_reconnect=False, max_reconnect_attempts=0,
                         connect_timeout=5, error_cb=on_error, **credentials),
            timeout=10,
        )
        await client.close()

    with pytest.raises(Exception) as anonymous:
        asyncio.run(nats_connect())
    assert "authorization" in str(anonymous.value).lower(), repr(anonymous.value)
    asyncio.run(nats_connect(user="chute-aggregator", password=secret(local, "nats-aggregator.password")))

    # The router runs as chute-router over TLS with deploy/rules.example.yaml and routed the
    # low-quality event (counted only after ROUTES stored it).
    router_admin = endpoints["CHUTE_ROUTER_ADMIN"]
    deadline = time.monotonic() + QUERY_WAIT_S
    while True:
        with urllib.request.urlopen(f"{router_admin}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        routed_total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                           if line.startswith('chute_router_routed_total{rule="low_quality"}'))
        if routed_total >= 1:
            break
        assert time.monotonic() < deadline, f"the router routed nothing in {QUERY_WAIT_S} s:\n{metrics}"
        time.sleep(0.3)
    assert "chute_router_rules 3" in metrics, metrics
    router_log = (local / "logs" / "router.log").read_text()
    assert "ermission" not in router_log, router_log

    # ClickHouse: the query user reads over HTTPS, but its INSERT is refused; anonymous is refused.
    clickhouse = endpoints["CHUTE_CLICKHOUSE_HTTP"]
    assert clickhouse.startswith("https://"), clickhouse
    basic = base64.b64encode(f"chute_query:{secret(local, 'clickhouse-query.password')}".encode()).decode()
    as_query = {"authorization": f"Basic {basic}"}
    status, body = https(f"{clickhouse}/?database=chute", ca, as_query,
                         f"SELECT count() FROM events WHERE name = '{name}'".encode())
    assert (status, body.strip()) == (200, "3"), body
    status, body = https(f"{clickhouse}/?database=chute", ca, as_query,
                         f"INSERT INTO events (tenant, name) VALUES ('demo', '{name}')".encode())
    assert status != 200 and ("ACCESS_DENIED" in body or "READONLY" in body), (status, body)
    status, body = https(f"{clickhouse}/?database=chute", ca, None, b"SELECT 1")
    assert status != 200 and "AUTHENTICATION_FAILED" in body, (status, body)

    # An open `make up` over the running secure pipeline is refused with advice, not half-joined.
    open_env = dict(env)
    open_env.pop("CHUTE_SECURE")
    switch = subprocess.run([str(ROOT / "scripts" / "up.sh")], cwd=ROOT, env=open_env, capture_output=True,
                            text=True, timeout=60)
    assert switch.returncode != 0 and "make down" in switch.stderr, (switch.stdout, switch.stderr)
    assert (local / "mode").read_text().strip() == "secure"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
