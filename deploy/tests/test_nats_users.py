"""The NATS users and permissions Chute ships (deploy/nats/chute-nats.conf), exercised with a
client nobody on the team wrote (nats-py) against a real nats-server started here with that
config: each service can do its job, and what its permissions deny fails.

Denials in NATS are asynchronous: the server answers a refused publish or subscription with
`-ERR 'Permissions Violation ...'`, which nats-py hands to the connection's error callback. Each
check waits (bounded) for that error naming the subject, and where a forged publish could have
landed, also checks that the stream did not store it.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from conftest import DEPLOY, ROOT

CONFIG = DEPLOY / "nats" / "chute-nats.conf"
SERVICES = ("ingestor", "aggregator", "query-api", "router", "operator")
# The inbox prefix each user may subscribe to (the query API makes no requests).
INBOX = {
    "ingestor": "_INBOX_ingestor",
    "aggregator": "_INBOX_aggregator",
    "operator": "_INBOX_operator",
    "router": "_INBOX_router",
    "query-api": "_INBOX",
}
DENIAL_WAIT_S = 5.0


def password(service: str) -> str:
    return f"pytest-{service}-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    binary = os.environ.get("CHUTE_NATS_SERVER") or shutil.which("nats-server")
    assert binary, "nats-server not found (apt-get install nats-server)"
    directory = tmp_path_factory.mktemp("nats-users")
    config = directory / "nats.conf"
    store = directory / "jetstream"
    config.write_text(
        f'jetstream {{\n  store_dir: "{store}"\n  max_file_store: 1GB\n}}\n' + CONFIG.read_text()
    )
    env = dict(os.environ)
    for service in SERVICES:
        env[f"CHUTE_NATS_{service.upper().replace('-', '_')}_PASSWORD"] = password(service)
    port = free_port()
    log = directory / "nats.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, f"nats-server exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"nats-server not listening:\n{log.read_text()}"
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(timeout=10)


class Session:
    """A nats-py connection as one service, collecting the errors the server sends it."""

    def __init__(self, client: nats.NATS, errors: list[str]):
        self.nc = client
        self.js = client.jetstream(timeout=2)
        self.errors = errors

    async def denied(self, kind: str, subject: str) -> None:
        """Waits for the server's permissions violation for `kind` ("publish" or "subscription")
        to `subject`; fails after DENIAL_WAIT_S."""
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()
        deadline = time.monotonic() + DENIAL_WAIT_S
        while time.monotonic() < deadline:
            if any(wanted in error.lower() for error in self.errors):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no violation {wanted!r}; errors seen: {self.errors}")


async def connect(url: str, service: str, secret: str | None = None) -> Session:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    client = await nats.connect(
        url,
        user=f"chute-{service}",
        password=secret if secret is not None else password(service),
        inbox_prefix=INBOX[service],
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=2,
    )
    return Session(client, errors)


async def events_stream(url: str) -> None:
    """EVENTS as the ingestor creates it (its own user may)."""
    ingestor = await connect(url, "ingestor")
    await ingestor.js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"]))
    await ingestor.nc.close()


async def stored_events(url: str) -> int:
    aggregator = await connect(url, "aggregator")
    info = await aggregator.js.stream_info("EVENTS")
    await aggregator.nc.close()
    return info.state.messages


def test_ingestor_publishes_events_and_live_copies_but_reads_neither_nor_the_ledger(nats_url):
    async def scenario():
        await events_stream(nats_url)
        # The aggregator's ledger bucket, with something secret in it.
        aggregator = await connect(nats_url, "aggregator")
        ledger = await aggregator.js.create_key_value(bucket="chute_aggregator")
        await ledger.put("ledger", b"positions")
        assert (await ledger.get("ledger")).value == b"positions"

        ingestor = await connect(nats_url, "ingestor")
        before = await stored_events(nats_url)
        ack = await ingestor.js.publish("events.3", b"batch")
        assert ack.stream == "EVENTS" and not ack.duplicate
        assert await stored_events(nats_url) == before + 1
        await ingestor.nc.publish("live.acme", b"copy")

        # The ledger: neither through the KV API nor by its subjects nor by snooping replies.
        with pytest.raises(Exception):
            await ingestor.js.key_value("chute_aggregator")
        await ingestor.denied("publish", "$JS.API.STREAM.INFO.KV_chute_aggregator")
        direct_get = "$JS.API.DIRECT.GET.KV_chute_aggregator.$KV.chute_aggregator.ledger"
        with pytest.raises(Exception):
            await ingestor.nc.request(direct_get, b"", timeout=1)
        await ingestor.denied("publish", direct_get)
        await ingestor.nc.subscribe("$KV.chute_aggregator.>")
        await ingestor.denied("subscription", "$KV.chute_aggregator.>")
        await ingestor.nc.subscribe("_INBOX_aggregator.>")
        await ingestor.denied("subscription", "_INBOX_aggregator.>")
        # Nor the events themselves, nor the live copies, nor the ledger's writes.
        await ingestor.nc.subscribe("events.>")
        await ingestor.denied("subscription", "events.>")
        await ingestor.nc.subscribe("live.>")
        await ingestor.denied("subscription", "live.>")
        await ingestor.nc.publish("$KV.chute_aggregator.ledger", b"forged")
        await ingestor.denied("publish", "$KV.chute_aggregator.ledger")
        assert (await ledger.get("ledger")).value == b"positions"
        await ingestor.nc.close()
        await aggregator.nc.close()

    asyncio.run(scenario())


def test_query_api_reads_live_copies_and_cannot_forge_events(nats_url):
    async def scenario():
        await events_stream(nats_url)
        query = await connect(nats_url, "query-api")
        live = await query.nc.subscribe("live.acme")
        await query.nc.flush()
        ingestor = await connect(nats_url, "ingestor")
        await ingestor.nc.publish("live.acme", b"copy")
        message = await live.next_msg(timeout=DENIAL_WAIT_S)
        assert message.data == b"copy"

        before = await stored_events(nats_url)
        await query.nc.publish("events.1", b"forged")
        await query.denied("publish", "events.1")
        # A forged live copy is refused as well.
        await query.nc.publish("live.globex", b"forged")
        await query.denied("publish", "live.globex")
        await query.nc.subscribe("events.>")
        await query.denied("subscription", "events.>")
        # JetStream's API is closed to it: no stream info, no consumer on EVENTS.
        with pytest.raises(Exception):
            await query.js.stream_info("EVENTS")
        await query.denied("publish", "$JS.API.STREAM.INFO.EVENTS")
        assert await stored_events(nats_url) == before, "the forged publish was stored"
        await query.nc.close()
        await ingestor.nc.close()

    asyncio.run(scenario())


def test_aggregator_consumes_but_cannot_publish_events_nor_read_live_copies(nats_url):
    async def scenario():
        await events_stream(nats_url)
        aggregator = await connect(nats_url, "aggregator")
        before = await stored_events(nats_url)
        await aggregator.nc.publish("events.2", b"forged")
        await aggregator.denied("publish", "events.2")
        await aggregator.nc.subscribe("live.>")
        await aggregator.denied("subscription", "live.>")
        # The stream's configuration is the ingestor's to set.
        with pytest.raises(Exception):
            await aggregator.js.update_stream(StreamConfig(name="EVENTS", subjects=["events.>"], max_age=1))
        await aggregator.denied("publish", "$JS.API.STREAM.UPDATE.EVENTS")
        assert await stored_events(nats_url) == before
        await aggregator.nc.close()

    asyncio.run(scenario())


def test_a_wrong_password_is_refused(nats_url):
    async def scenario():
        with pytest.raises(Exception) as refused:
            await connect(nats_url, "ingestor", secret="not-the-password")
        assert "authorization" in str(refused.value).lower(), refused.value

    asyncio.run(scenario())


# ---------------------------------------------------------------- the router (issue 17)

ROUTER_WAIT_S = 30.0


def router_binary() -> str:
    """The router binary `cargo build -p chute-router` made (debug first, then release)."""
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "router"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.fail("no target/{debug,release}/router: cargo build -p chute-router", pytrace=False)


def batch_proto():
    """`chute.v1.EventBatch`, compiled here from proto/ with grpcio-tools' protoc."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="chute-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                        "chute/v1/ingest.proto", "chute/v1/batch.proto"])
    assert code == 0, f"protoc failed with {code}"
    sys.path.insert(0, out)
    try:
        from chute.v1 import batch_pb2, ingest_pb2
    finally:
        sys.path.remove(out)
    return batch_pb2, ingest_pb2


class Refusing(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that rejects every delivery (400: dead-lettered at once)."""

    posts = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).posts += 1
        self.send_response(400)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_router_routes_alerts_and_dead_letters_with_its_own_user_only(nats_url, tmp_path):
    """The router binary runs as `chute-router` with exactly its permissions: creates ROUTES,
    WEBHOOKS, ROUTES_DLQ and its KV bucket, consumes EVENTS through its durable consumer, routes
    a matching event, fires a threshold alert (a chute.alert event published to EVENTS, its state
    in KV, a webhook the receiver rejects, so dead-lettered), and `router dlq list|replay` work.
    Any subject its permissions lack would fail one of these steps (the router logs the JetStream
    error and never becomes ready, or the step's result never appears)."""
    batch_pb2, ingest_pb2 = batch_proto()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
webhooks:
  hook:
    url: http://127.0.0.1:{receiver.server_address[1]}/hook
    secret_env: PYTEST_HOOK_SECRET
    max_attempts: 2
rules:
  - name: low_quality
    match: {{ event: "llm.*", metrics: ["quality < 0.7"] }}
    route: {{}}
  - name: busy
    match: {{ event: llm.request }}
    threshold: {{ value: count, window: 1m, above: 0 }}
    webhook: hook
""")
    admin = free_port()
    port = nats_url.rsplit(":", 1)[1]
    env = dict(os.environ, PYTEST_HOOK_SECRET="s3cret", CHUTE_NATS_USER="chute-router",
               CHUTE_NATS_PASSWORD=password("router"), CHUTE_NATS_INBOX_PREFIX="_INBOX_router",
               CHUTE_NATS_URL=nats_url, CHUTE_CLICKHOUSE_URL="", CHUTE_ROUTER_RULES_FILE=str(rules),
               CHUTE_ROUTER_EVAL_INTERVAL="500ms", CHUTE_ROUTER_ADMIN_LISTEN=f"127.0.0.1:{admin}",
               CHUTE_ROUTES_MAX_BYTES="64MiB")  # the fixture's JetStream holds 1 GB
    log = tmp_path / "router.log"

    def run(*args: str) -> str:
        done = subprocess.run([router_binary(), *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"router {' '.join(args)} failed:\n{done.stderr}"
        return done.stdout

    async def scenario():
        await events_stream(nats_url)
        with log.open("w") as log_file:
            router = subprocess.Popen([router_binary()], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        ingestor = await connect(nats_url, "ingestor")
        observer = await connect(nats_url, "router")
        try:
            deadline = time.monotonic() + ROUTER_WAIT_S
            while True:
                assert router.poll() is None, f"router exited:\n{log.read_text()}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"router not ready in {ROUTER_WAIT_S} s:\n{log.read_text()}"
                await asyncio.sleep(0.1)

            before = await stored_events(nats_url)
            batch = batch_pb2.EventBatch(version=1, received_unix_nanos=time.time_ns(), chunk_count=1)
            for i, quality in enumerate((0.5, 0.9)):
                event = batch.events.add(event_id=f"00000000-0000-4000-8000-00000000000{i}",
                                         tenant="acme", name="llm.request")
                event.time.GetCurrentTime()
                event.metrics["quality"] = quality
            await ingestor.js.publish("events.3", batch.SerializeToString())

            async def wait_for(what: str, check):
                deadline = time.monotonic() + ROUTER_WAIT_S
                while not await check():
                    assert router.poll() is None, f"router exited:\n{log.read_text()}"
                    assert time.monotonic() < deadline, f"{what} not seen in {ROUTER_WAIT_S} s:\n{log.read_text()}"
                    await asyncio.sleep(0.1)

            async def messages(stream: str) -> int:
                return (await observer.js.stream_info(stream)).state.messages

            await wait_for("the routed copy in ROUTES", lambda: _eq(messages("ROUTES"), 1))
            # The alert's chute.alert event goes into EVENTS like an ingested event.
            await wait_for("the chute.alert event in EVENTS", lambda: _ge(stored_events(nats_url), before + 2))
            # Its state is in the router's bucket, and the rejected webhook is in ROUTES_DLQ.
            await wait_for("the alert's webhook in ROUTES_DLQ", lambda: _eq(messages("ROUTES_DLQ"), 1))
            assert await messages("KV_chute_router") >= 1, "no alert state in KV bucket chute_router"
            assert Refusing.posts == 1, Refusing.posts

            # The routed copy is on its documented subject.
            info = await observer.js.stream_info("ROUTES", subjects_filter="routes.acme.low_quality")
            assert info.state.subjects == {"routes.acme.low_quality": 1}, info.state.subjects

            # What the router's user must not do: change EVENTS, publish live copies, read the
            # aggregator's ledger or another service's replies.
            with pytest.raises(Exception):
                await observer.js.update_stream(StreamConfig(name="EVENTS", subjects=["events.>"], max_age=1))
            await observer.denied("publish", "$JS.API.STREAM.UPDATE.EVENTS")
            await observer.nc.publish("live.acme", b"forged")
            await observer.denied("publish", "live.acme")
            await observer.nc.subscribe("_INBOX_aggregator.>")
            await observer.denied("subscription", "_INBOX_aggregator.>")
            await observer.nc.publish("$KV.chute_aggregator.ledger", b"forged")
            await observer.denied("publish", "$KV.chute_aggregator.ledger")
        finally:
            router.terminate()
            try:
                router.wait(timeout=20)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(timeout=10)
            await ingestor.nc.close()
            await observer.nc.close()
        assert router.returncode == 0, f"router exited {router.returncode} on SIGTERM:\n{log.read_text()}"
        log_text = log.read_text()
        assert "ermission" not in log_text, f"the router hit a permission error:\n{log_text}"

        # The operator's commands, as the router's user: list, then replay (back to WEBHOOKS).
        listed = [json.loads(line) for line in run("dlq", "list").splitlines() if line.strip()]
        assert len(listed) == 1, listed
        run("dlq", "replay")
        observer = await connect(nats_url, "router")
        assert await messages_of(observer, "ROUTES_DLQ") == 0
        assert await messages_of(observer, "WEBHOOKS") == 1

        # A restart as the same user: it resumes its durable consumers, restores the firing alert
        # from KV, and sends the replayed delivery (rejected again: back in ROUTES_DLQ).
        restart_log = tmp_path / "router-restart.log"
        with restart_log.open("w") as log_file:
            again = subprocess.Popen([router_binary()], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ROUTER_WAIT_S
            while Refusing.posts < 2 or await messages_of(observer, "ROUTES_DLQ") != 1:
                assert again.poll() is None, f"router exited after restart:\n{restart_log.read_text()}"
                assert time.monotonic() < deadline, f"replayed delivery not sent:\n{restart_log.read_text()}"
                await asyncio.sleep(0.1)
        finally:
            again.terminate()
            try:
                again.wait(timeout=20)
            except subprocess.TimeoutExpired:
                again.kill()
                again.wait(timeout=10)
        await observer.nc.close()
        assert again.returncode == 0, restart_log.read_text()
        assert "ermission" not in restart_log.read_text(), restart_log.read_text()
        assert Refusing.posts == 2, "the restart re-sent the alert (its state was not restored from KV)"

    asyncio.run(scenario())
    receiver.shutdown()


async def messages_of(session: Session, stream: str) -> int:
    return (await session.js.stream_info(stream)).state.messages


async def _eq(value, expected) -> bool:
    return await value == expected


async def _ge(value, expected) -> bool:
    return await value >= expected
