#!/usr/bin/env python3
"""Ingest -> pixel latency of the live page in a real browser, beside ingest -> SSE (issue 14).

Starts the pipeline from release binaries on free loopback ports in a temp dir (nats-server, the
ClickHouse dev server, ingestor, aggregator, query API), opens the live page in headless Chromium
(Debian `chromium`, DevTools protocol) for the load generator's tenant, and for each rate runs the
load generator in open loop (`loadtest run --tenants 1 --live sse`), so every event goes to the
watched tenant. It then reads the page's own histogram (`window.chuteLatency`: for each painted
event, the end of the animation frame that drew it minus the event's `ingested_at_ms`; the page
also records when each event arrived from the stream) and the load generator's accepted -> SSE
latency (its own SSE client), and writes bench/results/page-<date>.json plus a printed table.
Ingest and paint are stamped by the same machine's clock.

Usage: .venv/bin/python scripts/bench_page.py [--bin-dir target/release] [--rates 10000,50000]
       [--duration 30] [--out FILE]
Every phase is bounded in time; a missing tool or binary fails with a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "tests"))

from live_page_support import Browser, Pipeline, git_head  # noqa: E402

TENANT = "tenant-0"  # the load generator's first tenant (`--tenants 1`: all of them)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def summary(histogram: dict) -> dict:
    keys = ("count", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")
    return {key: histogram.get(key) for key in keys}


def renderer_metrics(browser: Browser) -> dict:
    """Cumulative main-thread seconds of the page's renderer (CDP Performance domain)."""
    metrics = browser.call("Performance.getMetrics")["metrics"]
    wanted = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")
    return {m["name"]: m["value"] for m in metrics if m["name"] in wanted}


def run_rate(pipeline: Pipeline, browser: Browser, base: str, rate: int, duration: int, work: Path) -> dict:
    browser.evaluate("window.chute.resetLatency()")
    renderer_before, renderer_started = renderer_metrics(browser), time.monotonic()
    out = work / f"loadtest-{rate}.json"
    argv = [str(pipeline.bin_dir / "loadtest"), "run", "--grpc", pipeline.grpc_target, "--query-url", base,
            "--clickhouse-url", pipeline.clickhouse_url, "--rate", str(rate), "--duration", f"{duration}s",
            "--tenants", "1", "--live", "sse", "--drain-timeout", "120s", "--out", str(out)]
    env = {**os.environ, "CHUTE_ENDPOINTS_FILE": str(work / "no-endpoints.env"), "RUST_LIB_BACKTRACE": "0"}
    load_before = loadavg()
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 300, cwd=ROOT)
    load_after = loadavg()
    if result.returncode != 0 or not out.exists():
        raise SystemExit(f"loadtest at {rate}/s failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    report = json.loads(out.read_text())
    acked = report["events"]["acked"]
    # The page has painted everything it received once the count stops moving.
    deadline, last, still_since = time.monotonic() + 60, -1, time.monotonic()
    while time.monotonic() < deadline:
        latency = browser.evaluate("window.chuteLatency")
        accounted = latency["received"] + latency["missed"]
        if latency["painted"] != last:
            last, still_since = latency["painted"], time.monotonic()
        if (accounted >= acked and latency["painted"] == latency["received"]) or time.monotonic() - still_since > 5:
            break
        time.sleep(0.5)
    latency = browser.evaluate("window.chuteLatency")
    renderer_after, renderer_seconds = renderer_metrics(browser), time.monotonic() - renderer_started
    busy = {name: round((renderer_after[name] - renderer_before[name]) / renderer_seconds, 3) for name in renderer_after}
    live = report.get("live") or {}
    return {
        "rate": rate,
        "duration_seconds": duration,
        "wall_seconds": round(time.monotonic() - started, 1),
        "acked": acked,
        "achieved_rate": report.get("achieved_rate"),
        "ack_p99_ms": report.get("ack_latency", {}).get("p99_ms"),
        "delivery_ok": (report.get("clickhouse") or {}).get("ok"),
        "page": {
            "received": latency["received"],
            "painted": latency["painted"],
            "missed_lagged": latency["missed"],
            "painted_all": latency["painted"] == acked,
            "ingest_to_pixel": summary(latency),
            "ingest_to_sse_in_browser": summary(latency["ingest_to_sse"]),
        },
        "loadtest_ingest_to_sse": {**(live.get("latency") or {}), "source": live.get("source"),
                                   "lagged_missed": live.get("lagged_missed")},
        # Share of wall time the page's main thread spent in tasks / script / layout / style.
        "renderer_main_thread_busy": busy,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    parser.add_argument("--rates", default="10000,50000")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per rate")
    parser.add_argument("--out", default="")
    parser.add_argument("--page-query", default="", help="extra page parameters, e.g. fps=60")
    args = parser.parse_args()

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"page-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="chute-bench-page-"))
    pipeline = Pipeline(work, Path(args.bin_dir))
    browser = None
    results = []
    try:
        print(f"==> pipeline from {args.bin_dir} in {work}", flush=True)
        pipeline.start()
        base = pipeline.start_query_api()
        browser = Browser(1280, 800, log_dir=work)
        browser.call("Performance.enable")
        extra = f"&{args.page_query}" if args.page_query else ""
        browser.navigate(f"{base}/?tenant={TENANT}&theme=light{extra}")
        browser.wait_for("window.chute && window.chute.snapshot().status === 'live'", "page live", 30)
        for rate in (int(r) for r in args.rates.split(",") if r):
            print(f"==> {rate} events/s for {args.duration} s", flush=True)
            results.append(run_rate(pipeline, browser, base, rate, args.duration, work))
            browser.screenshot(ROOT / "bench" / "results" / f"live-page-bench-{rate}.png")
            print(json.dumps(results[-1], indent=2), flush=True)
        errors = [str(e) for e in browser.errors()]
    finally:
        if browser:
            browser.close()
        pipeline.stop()

    document = {
        "date": stamp,
        "git": git_head(),
        "machine": {"cores": os.cpu_count(), "loadavg_end": loadavg()},
        "browser": "Debian chromium, headless, 1280x800, DevTools protocol",
        "page_query": args.page_query,
        "clock": "ingested_at_ms (ingestor) and the paint time (browser) come from the same machine's clock",
        "console_errors": errors,
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print("\nrate      acked   painted  missed | pixel p50   p99    max | browser SSE p50  p99 | loadtest SSE p50  p99 | load")
    for r in results:
        px, sse, lt = r["page"]["ingest_to_pixel"], r["page"]["ingest_to_sse_in_browser"], r["loadtest_ingest_to_sse"]
        print(f"{r['rate']:>6} {r['acked']:>9} {r['page']['painted']:>9} {r['page']['missed_lagged']:>7} | "
              f"{px['p50_ms'] or 0:>8.1f} {px['p99_ms'] or 0:>6.1f} {px['max_ms'] or 0:>6.0f} | "
              f"{sse['p50_ms'] or 0:>15.1f} {sse['p99_ms'] or 0:>4.1f} | "
              f"{lt.get('p50_ms') or 0:>16.1f} {lt.get('p99_ms') or 0:>4.1f} | {r['loadavg_after']}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
