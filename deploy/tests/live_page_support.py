"""Helpers for the live page's browser test and benchmark: a headless Chromium driven over the
DevTools protocol, a real pipeline on free loopback ports, and a gRPC sender.

The browser is Debian's `chromium` (no browser download): started with its own empty profile and
`--remote-debugging-port=0`; the port comes from the profile's `DevToolsActivePort` file and the
page is driven over one WebSocket (`websocket-client`) with the handful of CDP methods the tests
need (navigate, evaluate, screenshot, device metrics, console and exception events). Everything is
bounded in time and fails with the browser's log tail.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class BrowserError(AssertionError):
    pass


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError("chromium is not installed: `scripts/install-deps.sh` (apt-get install -y chromium)")


@dataclass
class ConsoleEntry:
    source: str  # console, exception, network, ... (CDP Log.entryAdded source or our own)
    level: str
    text: str
    url: str = ""

    def __str__(self) -> str:
        return f"[{self.source}/{self.level}] {self.text} {self.url}".strip()


class Browser:
    """One headless Chromium with one page, driven synchronously over CDP."""

    def __init__(self, width: int = 1280, height: int = 800, log_dir: Path | None = None):
        import websocket  # websocket-client, from requirements-dev.txt

        self.profile = Path(tempfile.mkdtemp(prefix="chute-chromium-"))
        self.log_path = (log_dir or self.profile) / "chromium.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        self.ids = itertools.count(1)
        self.console: list[ConsoleEntry] = []
        try:
            port = self._wait_port(timeout=30)
            target = self._page_target(port, timeout=10)
            self.ws = websocket.create_connection(target, timeout=30, suppress_origin=True)
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.set_viewport(width, height)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ process and protocol

    def _tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def _wait_port(self, timeout: float) -> int:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}:\n{self._tail()}")
            if active.exists():
                lines = active.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port within {timeout:.0f} s:\n{self._tail()}")

    def _page_target(self, port: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                targets = json.load(resp)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise BrowserError("chromium shows no page target")

    def _dispatch(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            level = "error" if params["type"] != "warning" else "warning"
            self.console.append(ConsoleEntry("console", level, text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(ConsoleEntry("exception", "error", text, details.get("url", "")))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") in ("error", "warning"):
                self.console.append(ConsoleEntry(entry.get("source", "?"), entry["level"], entry.get("text", ""),
                                                 entry.get("url", "")))

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        import websocket

        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"CDP {method} got no answer within {timeout:.0f} s")
            self.ws.settimeout(remaining)
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"CDP {method}: {message['error']}")
                return message.get("result", {})
            self._dispatch(message)

    # ------------------------------------------------------------ page

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float = 30):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout: float, interval: float = 0.1):
        """Polls `expression` until it is truthy; fails with the page's state and console."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except BrowserError as err:
                last = str(err)
            else:
                if last:
                    return last
            time.sleep(interval)
        state = self.try_evaluate("JSON.stringify(window.chute && window.chute.snapshot())")
        raise BrowserError(
            f"{what}: not reached within {timeout:.0f} s (last value {last!r})\npage state: {str(state)[:3000]}\n"
            f"console: {[str(c) for c in self.console][-20:]}"
        )

    def try_evaluate(self, expression: str):
        try:
            return self.evaluate(expression, timeout=5)
        except Exception as err:  # noqa: BLE001 - diagnostics only
            return f"<{err}>"

    def set_viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self, allow_network: bool = False) -> list[ConsoleEntry]:
        """Console errors and uncaught exceptions so far (network errors too unless allowed)."""
        self.pump()
        return [c for c in self.console if c.level == "error" and not (allow_network and c.source == "network")]

    def clear_console(self) -> None:
        self.pump()
        self.console.clear()

    def pump(self) -> None:
        """Reads the events already waiting (console entries) without sending anything."""
        import websocket

        self.ws.settimeout(0.01)
        while True:
            try:
                self._dispatch(json.loads(self.ws.recv()))
            except (websocket.WebSocketTimeoutException, BlockingIOError):
                return

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# ---------------------------------------------------------------- pipeline


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 2.0) -> int:
    import http.client
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, http.client.HTTPException):
        return 0


def git_head() -> str:
    """The checkout's short commit id, for result files ("" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Pipeline:
    """nats-server, the ClickHouse dev server, ingestor, aggregator and query APIs on loopback."""

    work: Path
    bin_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    nats_url: str = ""
    clickhouse_url: str = ""
    grpc_target: str = ""
    query: dict[str, str] = field(default_factory=dict)  # query API name -> base URL
    query_argv: dict[str, list[str]] = field(default_factory=dict)

    def start_process(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "ab"), cwd=ROOT, **kwargs)
        self.procs[name] = proc
        return proc

    def wait_until(self, what: str, owner: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[owner]
            if proc.poll() is not None:
                raise AssertionError(f"{owner} exited with {proc.returncode}:\n{tail(self.logs[owner])}")
            if check():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s; {owner} log:\n{tail(self.logs[owner])}")
            time.sleep(0.1)

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise AssertionError(
                f"{path} is missing: `cargo build -p chute-ingestor -p chute-aggregator -p chute-query-api`")
        return str(path)

    def start(self, clickhouse_python: str = sys.executable) -> "Pipeline":
        nats_server = shutil.which("nats-server")
        if not nats_server:
            raise AssertionError("nats-server is not installed: scripts/install-deps.sh")
        nats_port = free_port()
        self.start_process("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(nats_port), "-js",
                                           "-sd", str(self.work / "jetstream")])
        self.nats_url = f"nats://127.0.0.1:{nats_port}"
        ready = self.work / "clickhouse.port"
        self.start_process("clickhouse", [clickhouse_python, str(ROOT / "clickhouse-dev" / "chserver.py"), "--port", "0",
                                          "--ready-file", str(ready), "--data-dir", str(self.work / "clickhouse"),
                                          "--watch-stdin", "--log-level", "warning"], stdin=subprocess.PIPE)
        self.wait_until("nats-server listening", "nats-server", lambda: tcp_open(nats_port), 15)
        self.wait_until("ClickHouse dev server ready", "clickhouse",
                        lambda: ready.exists() and ready.read_text().strip() != "", 90)
        self.clickhouse_url = f"http://127.0.0.1:{ready.read_text().strip()}/"
        migrate = subprocess.run([self.binary("aggregator"), "migrate", "--clickhouse-url", self.clickhouse_url,
                                  "--nats-url", self.nats_url], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert migrate.returncode == 0, f"aggregator migrate failed:\n{migrate.stdout}\n{migrate.stderr}"
        grpc_port, ingest_admin, agg_admin = free_port(), free_port(), free_port()
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        ingestor = self.binary("ingestor")
        # The OTLP listeners default to fixed ports (4317/4318), which a parallel run or a local
        # collector may hold: off here (older binaries have no such flags).
        help_text = subprocess.run([ingestor, "--help"], capture_output=True, text=True, timeout=30).stdout
        otlp_off = ["--otlp-grpc-listen", "off", "--otlp-http-listen", "off"] if "--otlp-grpc-listen" in help_text else []
        self.start_process("ingestor", [ingestor, "--nats-url", self.nats_url, "--grpc-listen", self.grpc_target,
                                        "--admin-listen", f"127.0.0.1:{ingest_admin}", "--stream-max-bytes", "1GiB",
                                        *otlp_off])
        self.start_process("aggregator", [self.binary("aggregator"), "--nats-url", self.nats_url, "--clickhouse-url",
                                          self.clickhouse_url, "--admin-listen", f"127.0.0.1:{agg_admin}"])
        for name, port in (("ingestor", ingest_admin), ("aggregator", agg_admin)):
            self.wait_until(f"{name} ready", name, lambda p=port: http_status(f"http://127.0.0.1:{p}/readyz") == 200, 60)
        return self

    def start_query_api(self, name: str = "query-api", extra: list[str] | None = None, port: int | None = None) -> str:
        """Starts (or restarts on its old port) a query API; returns its base URL."""
        port = port or free_port()
        argv = [self.binary("query-api"), "--listen", f"127.0.0.1:{port}", "--nats-url", self.nats_url,
                "--clickhouse-url", self.clickhouse_url, *(extra or [])]
        self.query_argv[name] = argv
        self.start_process(name, argv)
        base = f"http://127.0.0.1:{port}"
        self.query[name] = base
        self.wait_until(f"{name} ready", name, lambda: http_status(base + "/readyz") == 200, 60)
        return base

    def stop_process(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def restart_query_api(self, name: str = "query-api") -> None:
        argv = self.query_argv[name]
        self.start_process(name, argv)
        self.wait_until(f"{name} ready again", name, lambda: http_status(self.query[name] + "/readyz") == 200, 60)

    def clickhouse(self, sql: str) -> str:
        request = urllib.request.Request(self.clickhouse_url, data=sql.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                if proc.stdin:
                    proc.stdin.close()
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ---------------------------------------------------------------- sending events


def grpc_stubs():
    import grpc
    from grpc_tools import protoc

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


class Sender:
    """Publishes LLM-call-shaped events through the ingestor with Python grpcio."""

    MODELS = ("chute-small", "chute-large", "chute-vision")
    NAMES = ("llm.request", "llm.embedding", "tool.call")

    def __init__(self, target: str, api_key: str = ""):
        self.grpc, self.pb, rpc = grpc_stubs()
        self.channel = self.grpc.insecure_channel(target)
        self.stub = rpc.IngestServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.counter = itertools.count()

    def publish(self, tenant: str, count: int, time_offset_s: float = 0.0) -> int:
        events = []
        for _ in range(count):
            i = next(self.counter)
            # Uneven mixes (3:2:1), so the page's lines and top list differ.
            event = self.pb.Event(tenant=tenant, name=self.NAMES[(0, 0, 0, 1, 1, 2)[i % 6]],
                                  session_id=f"conv-{i % 7}",
                                  user_id=f"user-{i % 11}")
            event.time.FromNanoseconds(int((time.time() + time_offset_s) * 1e9))
            event.attributes["model"] = self.MODELS[(0, 1, 0, 2, 1, 0)[i % 6]]
            event.metrics["latency_ms"] = 20.0 + (i * 37) % 400
            event.metrics["tokens_in"] = 100 + i % 50
            event.metrics["tokens_out"] = 20 + i % 30
            event.metrics["cost_usd"] = 0.0001 * (1 + i % 5)
            events.append(event)
        request = self.pb.PublishRequest(events=events, idempotency_key=f"page-{uuid.uuid4()}")
        response = self.stub.Publish(request, metadata=self.metadata, timeout=20)
        assert response.rejected == 0, f"rejected: {list(response.errors)[:3]}"
        return response.accepted

    def close(self) -> None:
        self.channel.close()
