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
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from conftest import DEPLOY

CONFIG = DEPLOY / "nats" / "chute-nats.conf"
SERVICES = ("ingestor", "aggregator", "query-api", "operator")
# The inbox prefix each user may subscribe to (the query API makes no requests).
INBOX = {
    "ingestor": "_INBOX_ingestor",
    "aggregator": "_INBOX_aggregator",
    "operator": "_INBOX_operator",
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
