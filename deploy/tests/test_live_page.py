"""The live page (`GET /` on the query API) in a real headless Chromium against a real pipeline
(issue 14).

Starts nats-server, the ClickHouse dev server, ingestor, aggregator and three query APIs (keys
off; keys on; a 4-event live buffer to provoke `lagged`) from the debug binaries, opens the page
over the DevTools protocol, sends events at a modest rate with Python grpcio and checks what a
person would see: charts with real data, per-minute counts equal to the rollups in ClickHouse
(also for a minute that had closed before its late events came), every event sent for the watched
tenant painted (`window.chuteLatency`), no console errors; then the bad cases: an unknown and an
invalid tenant, API keys (prompt, wrong key, right key), a query API restart (the page says so and
reconnects) and a live stream that lagged (the page says how many it missed and reconciles).
Screenshots go to bench/results/. The latency figures belong to the benchmark
(scripts/bench_page.py), not to this test.

Needs `chromium` (scripts/install-deps.sh installs it) and the debug binaries (`cargo build`);
a missing one fails the run, never skips it.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import ROOT
from live_page_support import Browser, Pipeline, Sender, find_chromium

TENANT = "page-test"
OTHER_TENANT = "page-other"
LAG_TENANT = "page-lag"
KEY = "page-test-key-0123456789abcdef"
RESULTS = ROOT / "bench" / "results"
STATE = "window.chute && window.chute.snapshot()"
# Events acknowledged per tenant over the whole module (the tests share one pipeline).
SENT: dict[str, int] = {}


def publish(sender: Sender, tenant: str, count: int, time_offset_s: float = 0.0) -> int:
    accepted = sender.publish(tenant, count, time_offset_s=time_offset_s)
    SENT[tenant] = SENT.get(tenant, 0) + accepted
    return accepted


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    find_chromium()
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.fail("websocket-client missing: .venv/bin/pip install -r requirements-dev.txt", pytrace=False)
    work = tmp_path_factory.mktemp("live-page")
    p = Pipeline(work, ROOT / "target" / "debug")
    try:
        p.start()
        p.start_query_api("query-api")
        keys = work / "api-keys"
        keys.write_text(f"{TENANT} {KEY}\n")
        p.start_query_api("query-api-keys", ["--api-keys-file", str(keys)])
        p.start_query_api("query-api-lag", ["--stream-buffer", "4"])
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def sender(pipeline):
    s = Sender(pipeline.grpc_target)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(pipeline):
    b = Browser(1280, 800, log_dir=pipeline.work)
    yield b
    b.close()


def open_page(browser: Browser, url: str, status: str = "live", timeout: float = 30) -> None:
    browser.clear_console()
    browser.navigate(url)
    browser.wait_for(f"{STATE} && window.chute.snapshot().status === {json.dumps(status)}", f"page {status} at {url}",
                     timeout)


def wait_lists_filled(browser: Browser) -> None:
    """Until the top-model and sessions tables have rows (their first answers came back)."""
    browser.wait_for("document.querySelectorAll('#top-body tr').length > 0 && "
                     "document.querySelectorAll('#sessions-body tr').length > 0", "top and sessions tables filled", 15)


def rollup_counts(pipeline: Pipeline, tenant: str) -> dict[int, int]:
    text = pipeline.clickhouse(
        "SELECT toUnixTimestamp(minute) * 1000, sum(event_count) FROM chute.events_1m "
        f"WHERE tenant = '{tenant}' GROUP BY minute ORDER BY minute FORMAT TSV"
    )
    return {int(start): int(count) for start, count in (line.split("\t") for line in text.splitlines() if line)}


def stored_count(pipeline: Pipeline, tenant: str) -> int:
    return int(pipeline.clickhouse(f"SELECT count() FROM chute.events FINAL WHERE tenant = '{tenant}'").strip())


def page_counts(browser: Browser) -> dict[int, int]:
    return {b["start"]: b["value"] for b in browser.evaluate("window.chute.snapshot().total") if b["value"]}


def wait_counts_match(browser: Browser, pipeline: Pipeline, tenant: str, timeout: float) -> dict[int, int]:
    """Until the page's per-minute totals equal the rollups (both non-empty)."""
    deadline = time.monotonic() + timeout
    page, rollups = {}, {}
    while time.monotonic() < deadline:
        page, rollups = page_counts(browser), rollup_counts(pipeline, tenant)
        if page and page == rollups:
            return page
        time.sleep(0.5)
    raise AssertionError(f"page counts {page} never equalled the rollups {rollups} within {timeout:.0f} s; "
                         f"page: {str(browser.try_evaluate('JSON.stringify(window.chute.snapshot())'))[:2000]}")


def assert_no_console_errors(browser: Browser, allow_network: bool = False) -> None:
    errors = browser.errors(allow_network=allow_network)
    assert not errors, "console errors:\n  " + "\n  ".join(map(str, errors))


def wait_stored(pipeline: Pipeline, tenant: str, expected: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        got = stored_count(pipeline, tenant)
        if got == expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"ClickHouse holds {got} events of {tenant}, expected {expected}")


def test_page_paints_every_event_and_matches_the_rollups(pipeline, browser, sender):
    base = pipeline.query["query-api"]
    open_page(browser, f"{base}/?tenant={TENANT}&theme=light")
    empty = browser.evaluate("document.querySelector('[data-empty-for=events]').hidden")
    assert empty is False, "with no data the events card must show its empty state"
    assert "send_sample.py" in browser.evaluate("document.querySelector('[data-empty-for=events]').textContent")

    # ~10 s at ~120 events/s for the watched tenant: current events, and late ones whose minute
    # closed 90 s ago (the page must fold them into a closed bucket and reconcile it again);
    # another tenant's events must not show.
    sent = 0
    for _ in range(40):
        sent += publish(sender, TENANT, 25)
        sent += publish(sender, TENANT, 5, time_offset_s=-90)
        publish(sender, OTHER_TENANT, 10)
        time.sleep(0.25)

    browser.wait_for(f"window.chuteLatency.painted >= {sent}", f"all {sent} events painted", 30)
    latency = browser.evaluate("window.chuteLatency")
    assert (latency["received"], latency["painted"], latency["missed"], latency["count"]) == (sent, sent, 0, sent), latency
    assert latency["p99_ms"] is not None and latency["buckets"], latency

    wait_stored(pipeline, TENANT, SENT[TENANT])
    counts = wait_counts_match(browser, pipeline, TENANT, timeout=30)
    assert sum(counts.values()) == sent, counts
    # The minute of the late events had closed: the page reconciles it with the rollup again.
    late_minute = min(counts)
    browser.wait_for(f"window.chute.snapshot().total.some(b => b.start === {late_minute} && b.source === 'rollup')",
                     "the closed minute reconciled with its rollup", 15)
    assert wait_counts_match(browser, pipeline, TENANT, timeout=5) == counts

    snapshot = browser.evaluate("window.chute.snapshot()")
    for chart in ("chart-events", "chart-quantiles", "chart-tokens"):
        series = snapshot["charts"][chart][1:]
        assert any(any(v for v in values if v is not None) for values in series), f"{chart} has no data: {series}"
    assert len(snapshot["charts"]["chart-events"]) - 1 == len(Sender.NAMES), "one line per event name"
    assert {key for key, _ in snapshot["top"]} == set(Sender.MODELS), snapshot["top"]
    assert snapshot["sessions"] and snapshot["newest"] > 0, snapshot
    assert browser.evaluate("document.querySelectorAll('#events-body tr').length") > 0
    assert browser.evaluate("document.getElementById('tile-latency').textContent") != "–"

    # Click-through: the newest event's stored copy from /v1/events.
    event_id = browser.evaluate("document.querySelector('#events-body tr').click(); "
                                "document.getElementById('event-id').textContent")
    browser.wait_for(f"document.getElementById('event-stored').textContent.includes({json.dumps(event_id)})",
                     "stored copy of the clicked event", 15)
    browser.evaluate("document.getElementById('event-dialog').close()")

    RESULTS.mkdir(parents=True, exist_ok=True)
    wait_lists_filled(browser)
    browser.screenshot(RESULTS / "live-page-1280x800-light.png", full_page=True)
    assert_no_console_errors(browser)

    # A reload rebuilds the same numbers from the rollups alone; dark theme and phone width.
    open_page(browser, f"{base}/?tenant={TENANT}&theme=dark")
    wait_counts_match(browser, pipeline, TENANT, timeout=15)
    wait_lists_filled(browser)
    browser.screenshot(RESULTS / "live-page-1280x800-dark.png", full_page=True)
    browser.set_viewport(390, 844, mobile=True)
    try:
        open_page(browser, f"{base}/?tenant={TENANT}&theme=light")
        wait_counts_match(browser, pipeline, TENANT, timeout=15)
        wait_lists_filled(browser)
        overflow = browser.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"phone width scrolls sideways by {overflow} px"
        browser.screenshot(RESULTS / "live-page-390-phone.png", full_page=True)
    finally:
        browser.set_viewport(1280, 800)
    assert_no_console_errors(browser)


def test_unknown_tenant_shows_empty_states_and_an_invalid_one_is_asked_again(pipeline, browser):
    base = pipeline.query["query-api"]
    open_page(browser, f"{base}/?tenant=nobody-here")
    browser.wait_for("!document.querySelector('[data-empty-for=events]').hidden", "empty state", 10)
    snapshot = browser.evaluate("window.chute.snapshot()")
    assert not page_counts(browser) and snapshot["received"] == 0, snapshot
    assert_no_console_errors(browser)

    browser.clear_console()
    browser.navigate(f"{base}/?tenant=Not%20A%20Tenant!")
    browser.wait_for("document.getElementById('auth-dialog').open && "
                     "!document.getElementById('tenant-label').hidden", "tenant prompt", 10)
    message = browser.evaluate("document.getElementById('auth-error').textContent")
    assert "tenant must match" in message, message
    browser.evaluate(f"document.getElementById('tenant-input').value = {json.dumps(TENANT)}; "
                     "document.getElementById('auth-submit').click()")
    browser.wait_for(f"{STATE}.status === 'live' && location.search.includes('tenant={TENANT}')", "page after prompt", 20)
    wait_counts_match(browser, pipeline, TENANT, timeout=15)
    # The refused request (400) is the only console error: a network entry.
    assert_no_console_errors(browser, allow_network=True)


def test_api_keys_prompt_refuse_a_wrong_key_and_keep_the_right_one(pipeline, browser):
    base = pipeline.query["query-api-keys"]
    browser.clear_console()
    browser.navigate(f"{base}/")
    browser.wait_for("document.getElementById('auth-dialog').open && "
                     "!document.getElementById('key-label').hidden", "API key prompt", 15)
    assert browser.evaluate("document.getElementById('auth-title').textContent") == "API key required"

    browser.evaluate("document.getElementById('key').value = 'wrong-key-0123456789'; "
                     "document.getElementById('auth-submit').click()")
    browser.wait_for("document.getElementById('auth-dialog').open && "
                     "document.getElementById('auth-title').textContent === 'API key refused'", "wrong key refused", 15)
    assert "unknown api key" in browser.evaluate("document.getElementById('auth-error').textContent")
    assert browser.evaluate("sessionStorage.getItem('chute.apiKey')") is None

    browser.evaluate(f"document.getElementById('key').value = {json.dumps(KEY)}; "
                     "document.getElementById('auth-submit').click()")
    browser.wait_for(f"{STATE}.status === 'live'", "page live with the right key", 20)
    assert browser.evaluate("sessionStorage.getItem('chute.apiKey')") == KEY
    assert browser.evaluate("document.getElementById('tenant').textContent") == "tenant: from API key"
    # The key's tenant: the same rollups as without keys.
    wait_counts_match(browser, pipeline, TENANT, timeout=15)
    # The live stream is read with the key too (fetch with an authorization header).
    painted = browser.evaluate("window.chuteLatency.painted")
    sender = Sender(pipeline.grpc_target)
    try:
        sent = publish(sender, TENANT, 20)
    finally:
        sender.close()
    browser.wait_for(f"window.chuteLatency.painted >= {painted + sent}", "live events with the key", 15)
    # The two 401s are network console entries; nothing else.
    assert_no_console_errors(browser, allow_network=True)
    # A reload in the same tab keeps the key (sessionStorage): no prompt, no error.
    open_page(browser, f"{base}/")
    assert browser.evaluate("document.getElementById('auth-dialog').open") is False
    assert_no_console_errors(browser)
    browser.evaluate("sessionStorage.clear()")


def test_query_api_restart_is_shown_and_the_page_reconnects(pipeline, browser, sender):
    base = pipeline.query["query-api"]
    open_page(browser, f"{base}/?tenant={TENANT}")
    pipeline.stop_process("query-api")
    browser.wait_for(f"{STATE}.status === 'reconnecting' && window.chute.snapshot().notice.includes('Lost the live stream')",
                     "page says the stream is lost", 15)
    pipeline.restart_query_api("query-api")
    browser.wait_for(f"{STATE}.status === 'live' && window.chute.snapshot().notice.includes('Reconnected')",
                     "page says it reconnected", 30)
    assert browser.evaluate("window.chute.snapshot().reconnects") >= 1
    painted = browser.evaluate("window.chuteLatency.painted")
    sent = publish(sender, TENANT, 30)
    browser.wait_for(f"window.chuteLatency.painted >= {painted + sent}", "events after the restart painted", 15)
    wait_stored(pipeline, TENANT, SENT[TENANT])
    wait_counts_match(browser, pipeline, TENANT, timeout=20)
    # Failed requests while the API was down are network console entries; nothing else.
    assert_no_console_errors(browser, allow_network=True)


def test_lagged_stream_is_shown_and_reconciled_from_the_rollups(pipeline, browser, sender):
    base = pipeline.query["query-api-lag"]
    open_page(browser, f"{base}/?tenant={LAG_TENANT}")
    # One request of 500 events through a 4-event live buffer: the stream must skip most.
    sent = publish(sender, LAG_TENANT, 500)
    browser.wait_for("window.chuteLatency.missed > 0", "lagged reported", 15)
    snapshot = browser.evaluate("window.chute.snapshot()")
    assert "missed" in snapshot["notice"], snapshot["notice"]
    assert snapshot["received"] + snapshot["missed"] == sent, (snapshot["received"], snapshot["missed"], sent)
    browser.wait_for("document.getElementById('tile-missed').textContent !== '0'", "missed events on the page", 5)
    wait_stored(pipeline, LAG_TENANT, sent)
    counts = wait_counts_match(browser, pipeline, LAG_TENANT, timeout=20)
    assert sum(counts.values()) == sent
    browser.screenshot(RESULTS / "live-page-lagged.png")
    assert_no_console_errors(browser)
