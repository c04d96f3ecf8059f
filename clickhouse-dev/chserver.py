#!/usr/bin/env python3
"""chserver: ClickHouse 26.9 (the chdb-core engine) behind ClickHouse's HTTP interface.

A development/CI stand-in for clickhouse-server; production uses a real ClickHouse.
See README.md next to this file for what it supports.

    .venv/bin/python clickhouse-dev/chserver.py --port 8123 --data-dir .local/clickhouse
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import http.server

# The engine takes its default timezone from TZ; pin it so results match the
# `X-ClickHouse-Timezone: UTC` header whatever the host says.
os.environ["TZ"] = "UTC"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chdev import errors  # noqa: E402
from chdev.access import Access  # noqa: E402
from chdev.engine import Engine  # noqa: E402
from chdev.handler import Handler  # noqa: E402

log = logging.getLogger("chserver")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, engine: Engine, access: Access, args):
        self.engine = engine
        self.access = access
        self.tls = None
        if args.tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls.load_cert_chain(args.tls_cert, args.tls_key)
        self.max_body_bytes = args.max_body_bytes
        self.keep_alive_timeout = args.keep_alive_timeout
        self.receive_timeout = args.receive_timeout
        self.display_name = args.display_name or socket.gethostname()
        self.stopping = False
        self._handlers: set = set()
        self._handlers_lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name with getfqdn(), which can stall
        # for seconds on machines without DNS; the plain TCP bind is all we need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        connection, address = super().get_request()
        if self.tls is not None:
            # The handshake runs on the handler's thread (first read), not in the accept loop.
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            log.info("TLS connection from %s failed: %s", client_address[0], sys.exc_info()[1])
            return
        super().handle_error(request, client_address)

    def track(self, handler, active: bool) -> None:
        with self._handlers_lock:
            if active:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def close_idle_connections(self) -> None:
        """Wakes handlers parked on idle keep-alive connections so they can exit."""
        with self._handlers_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            if handler.idle:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="HTTP port; 0 picks a free port (default 8123)")
    parser.add_argument("--data-dir", default=".local/clickhouse", help="engine data directory (created if missing)")
    parser.add_argument("--ready-file", help="write the bound port to this file once ready to serve")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 30, help="request body limit (default 1 GiB)")
    parser.add_argument(
        "--max-connections", type=int, default=16, help="engine connections, i.e. statements run at once (default 16)"
    )
    parser.add_argument("--keep-alive-timeout", type=float, default=10.0, help="idle keep-alive seconds (default 10)")
    parser.add_argument("--receive-timeout", type=float, default=60.0, help="socket read timeout within a request")
    parser.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to wait for in-flight requests")
    parser.add_argument("--display-name", help="X-ClickHouse-Server-Display-Name (default: host name)")
    parser.add_argument(
        "--watch-stdin",
        action="store_true",
        help="shut down when stdin reaches EOF (test harnesses: the server dies with its parent)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--default-password-file",
        help="file holding the password of the `default` user (default: none, as in a fresh install)",
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate chain (needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


def write_ready_file(path: str, port: int) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as file:
        file.write(f"{port}\n")
    os.replace(temporary, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s chserver: %(message)s",
    )
    os.makedirs(args.data_dir, exist_ok=True)
    engine = Engine(os.path.abspath(args.data_dir), args.max_connections)
    errors.ENGINE_VERSION = engine.version

    default_password = ""
    if args.default_password_file:
        with open(args.default_password_file) as file:
            default_password = file.read().strip()
    access = Access(os.path.join(os.path.abspath(args.data_dir), "chserver_access.json"), default_password)
    server = Server((args.host, args.port), engine, access, args)
    port = server.server_address[1]

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.watch_stdin:

        def watch_stdin():
            while sys.stdin.buffer.read(4096):
                pass
            log.info("stdin closed, shutting down")
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()

    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="accept")
    serving.start()
    log.info("ClickHouse %s (chdb) listening on %s://%s:%d, data in %s", engine.version,
             "https" if server.tls else "http", args.host, port, args.data_dir)
    if args.ready_file:
        write_ready_file(args.ready_file, port)

    stop.wait()
    server.stopping = True
    server.shutdown()  # stop accepting
    serving.join()
    server.close_idle_connections()
    # server_close() joins the handler threads: in-flight requests finish first.
    closer = threading.Thread(target=server.server_close, name="drain")
    closer.start()
    closer.join(args.shutdown_grace)
    if closer.is_alive():
        log.warning("in-flight requests still running after %.0fs; closing anyway", args.shutdown_grace)
    engine.close()
    log.info("stopped")
    logging.shutdown()
    if closer.is_alive():
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
