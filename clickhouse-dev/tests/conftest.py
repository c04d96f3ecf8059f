"""Starts chserver processes on free ports in temp dirs; talks to them with http.client only."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import time
import urllib.parse

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # for chdev.compression in tests

ERROR_BODY = re.compile(r"^Code: (\d+)\. DB::Exception: .+ \(([A-Z_]+)\) \(version 26\.9[0-9.]* \(official build\)\)\n$", re.S)


def assert_error(response, status: int, code: int, name: str):
    """The response is ClickHouse's error: status, exception code header, body format."""
    assert response.status == status, response.text
    assert response.headers["x-clickhouse-exception-code"] == str(code)
    match = ERROR_BODY.match(response.text)
    assert match, response.text
    assert match.groups() == (str(code), name)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()


class ServerProcess:
    def __init__(self, tmp_path, *extra_args: str):
        self.data_dir = str(tmp_path / "data")
        ready = tmp_path / "port"
        self.log_path = tmp_path / "server.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "chserver.py"), "--port", "0", "--data-dir", self.data_dir,
             "--ready-file", str(ready), "--log-level", "info", *extra_args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while not ready.exists():
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chserver did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(ready.read_text())

    def request(self, method: str, path: str = "/", body: bytes | None = None, headers=None, **params) -> Response:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def post(self, body: bytes | str = b"", headers=None, **params) -> Response:
        if isinstance(body, str):
            body = body.encode()
        return self.request("POST", "/", body, headers, **params)

    def sql(self, query: str, **params) -> str:
        response = self.post(query, **params)
        assert response.status == 200, response.text
        return response.text

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("chserver"))
    yield process
    process.stop()


@pytest.fixture
def database(server, request):
    """A fresh database named after the test; yields its name."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    server.sql(f"DROP DATABASE IF EXISTS {name}")
    server.sql(f"CREATE DATABASE {name}")
    yield name
    server.sql(f"DROP DATABASE IF EXISTS {name}")
