"""Users, passwords, grants, readonly and per-user concurrency, as clickhouse-server enforces them."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import ssl
import subprocess

import pytest

from conftest import ServerProcess, assert_error


def as_user(user: str, password: str) -> dict[str, str]:
    return {"X-ClickHouse-User": user, "X-ClickHouse-Key": password}


@pytest.fixture
def users(server, request):
    """A unique prefix for this test's users; drops them afterwards."""
    prefix = "u_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    created = []

    def create(suffix: str, password: str, extra: str = "") -> str:
        name = f"{prefix}_{suffix}"
        server.sql(f"CREATE USER IF NOT EXISTS {name} IDENTIFIED BY '{password}' {extra}")
        created.append(name)
        return name

    yield create
    for name in created:
        server.sql(f"DROP USER IF EXISTS {name}")


def test_authentication_by_header_basic_and_parameters(server, users):
    name = users("reader", "s3cret-pw")
    ok = server.post("SELECT currentDatabase()", headers=as_user(name, "s3cret-pw"))
    assert ok.status == 200, ok.text
    basic = base64.b64encode(f"{name}:s3cret-pw".encode()).decode()
    assert server.post("SELECT 1", headers={"Authorization": f"Basic {basic}"}).status == 200
    assert server.post("SELECT 1", user=name, password="s3cret-pw").status == 200

    for headers in (as_user(name, "wrong"), as_user("nobody_at_all", "x"), as_user(name, "")):
        response = server.post("SELECT 1", headers=headers)
        assert_error(response, 403, 516, "AUTHENTICATION_FAILED")
        assert "Authentication failed: password is incorrect, or there is no user with such name" in response.text
    assert_error(server.post("SELECT 1", user=name, password="nope"), 403, 516, "AUTHENTICATION_FAILED")


def test_grants_are_enforced_per_table_and_statement(server, database, users):
    server.sql(f"CREATE TABLE {database}.events (x UInt32) ENGINE = MergeTree ORDER BY x")
    server.sql(f"CREATE TABLE {database}.other (x UInt32) ENGINE = MergeTree ORDER BY x")
    writer = users("writer", "writer-pw")
    reader = users("reader", "reader-pw")
    server.sql(f"GRANT INSERT ON {database}.events, SELECT ON {database}.* TO {writer}")
    server.sql(f"GRANT SELECT ON {database}.* TO {reader}")
    w, r = as_user(writer, "writer-pw"), as_user(reader, "reader-pw")

    # The writer inserts into events (VALUES and a body in a binary format), not elsewhere.
    assert server.post(f"INSERT INTO {database}.events VALUES (1), (2)", headers=w).status == 200
    body = (3).to_bytes(4, "little")
    response = server.post(body, headers=w, query=f"INSERT INTO {database}.events FORMAT RowBinary")
    assert response.status == 200, response.text
    response = server.post(body, headers=w, database=database, query="INSERT INTO events FORMAT RowBinary")
    assert response.status == 200, response.text
    denied = server.post(f"INSERT INTO {database}.other VALUES (1)", headers=w)
    assert_error(denied, 403, 497, "ACCESS_DENIED")
    assert f"{writer}: Not enough privileges. To execute this query, it's necessary to have the grant INSERT ON " \
           f"{database}.other" in denied.text
    assert_error(server.post(f"DROP TABLE {database}.events", headers=w), 403, 497, "ACCESS_DENIED")
    assert_error(server.post(f"TRUNCATE TABLE {database}.events", headers=w), 403, 497, "ACCESS_DENIED")

    # The reader reads every table of the database (joins and subqueries included), writes nothing.
    query = f"SELECT count() FROM {database}.events WHERE x IN (SELECT x FROM {database}.other) OR 1"
    assert server.post(query, headers=r).text == "4\n"
    assert server.post("WITH a AS (SELECT 1 AS x) SELECT count() FROM a", headers=r).text == "1\n"
    assert server.post(f"DESCRIBE TABLE {database}.events", headers=r).status == 200
    assert server.post("SELECT count() > 0 FROM system.tables", headers=r).status == 200
    for statement in (
        f"INSERT INTO {database}.events VALUES (9)",
        f"ALTER TABLE {database}.events DELETE WHERE 1",
        f"ALTER TABLE {database}.events ADD COLUMN y UInt8",
        f"DROP TABLE {database}.events",
        f"CREATE TABLE {database}.mine (x UInt8) ENGINE = Memory",
        f"OPTIMIZE TABLE {database}.events FINAL",
        "SELECT * FROM numbers(3)",
        "CREATE DATABASE reader_made_this",
    ):
        assert_error(server.post(statement, headers=r), 403, 497, "ACCESS_DENIED")
    assert_error(server.post(f"SELECT 1 FROM {database}_elsewhere.t", headers=r), 403, 497, "ACCESS_DENIED")
    assert server.sql(f"SELECT count() FROM {database}.events") == "4\n"


def test_readonly_2_allows_settings_but_not_writes_or_readonly_itself(server, database, users):
    server.sql(f"CREATE TABLE {database}.t (x UInt32) ENGINE = MergeTree ORDER BY x")
    name = users("query", "query-pw", "SETTINGS readonly = 2")
    # Even with INSERT granted, readonly refuses the write (ClickHouse checks grants first).
    server.sql(f"GRANT SELECT, INSERT ON {database}.* TO {name}")
    headers = as_user(name, "query-pw")
    response = server.post(f"SELECT count() FROM {database}.t", headers=headers, max_execution_time="5",
                           max_memory_usage="100000000", max_result_rows="1000", max_rows_to_read="1000000",
                           result_overflow_mode="throw")
    assert response.status == 200, response.text
    assert server.post("SELECT getSetting('readonly')", headers=headers).text == "2\n"
    assert_error(server.post(f"INSERT INTO {database}.t VALUES (1)", headers=headers), 500, 164, "READONLY")
    assert_error(server.post("SELECT 1", headers=headers, readonly="0"), 500, 164, "READONLY")
    # A limit set per query is enforced by the engine.
    too_many = server.post("SELECT number FROM system.numbers LIMIT 100", headers=headers, max_result_rows="10",
                           result_overflow_mode="throw")
    assert_error(too_many, 500, 396, "TOO_MANY_ROWS_OR_BYTES")
    # The same pooled connections serve `default` afterwards without its settings.
    assert server.sql("SELECT getSetting('readonly')") == "0\n"
    assert server.sql(f"INSERT INTO {database}.t VALUES (1)") == ""


def test_max_concurrent_queries_for_user(server, users):
    name = users("limited", "limited-pw", "SETTINGS max_concurrent_queries_for_user = 1")
    headers = as_user(name, "limited-pw")
    # Two queries of ~1.5 s sent together overlap: one runs, the other is refused at once.
    slow = "SELECT sleepEachRow(0.5) FROM system.numbers LIMIT 3 SETTINGS max_block_size = 1"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: server.post(slow, headers=headers), range(2)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 500], [r.text for r in responses]
    refused = next(r for r in responses if r.status == 500)
    assert_error(refused, 500, 202, "TOO_MANY_SIMULTANEOUS_QUERIES")
    assert server.post("SELECT 1", headers=headers).status == 200
    # Other users are not counted against it.
    assert server.sql("SELECT 1") == "1\n"


def test_user_management_is_idempotent_and_grants_replace(server, database, users):
    name = users("svc", "first-pw")
    assert server.sql(f"CREATE USER IF NOT EXISTS {name} IDENTIFIED BY 'ignored'") == ""
    assert_error(server.post(f"CREATE USER {name} IDENTIFIED BY 'x'"), 500, 493, "ACCESS_ENTITY_ALREADY_EXISTS")
    # ALTER USER changes the password (a SHA-256 hash, as the migration runner sends it).
    digest = __import__("hashlib").sha256(b"second-pw").hexdigest()
    server.sql(f"ALTER USER {name} IDENTIFIED WITH sha256_hash BY '{digest}' SETTINGS readonly = 2")
    assert_error(server.post("SELECT 1", headers=as_user(name, "first-pw")), 403, 516, "AUTHENTICATION_FAILED")
    assert server.post("SELECT getSetting('readonly')", headers=as_user(name, "second-pw")).text == "2\n"

    server.sql(f"GRANT SELECT, INSERT ON {database}.* TO {name}")
    server.sql(f"GRANT SELECT ON {database}.* TO {name} WITH REPLACE OPTION")
    grants = server.sql(f"SHOW GRANTS FOR {name}")
    assert grants == f"GRANT SELECT ON {database}.* TO {name}\n"
    server.sql(f"REVOKE SELECT ON {database}.* FROM {name}")
    assert server.sql(f"SHOW GRANTS FOR {name}") == ""
    assert name in server.sql("SHOW USERS").split()

    assert_error(server.post("ALTER USER default IDENTIFIED BY 'x'"), 500, 495, "ACCESS_STORAGE_READONLY")
    assert_error(server.post("GRANT SELECT ON nope.* TO no_such_user"), 404, 511, "UNKNOWN_ROLE")
    assert_error(server.post("CREATE USER bad IDENTIFIED BY"), 400, 62, "SYNTAX_ERROR")


def test_a_grantor_needs_grant_option_and_access_management(server, database, users):
    admin = users("admin", "admin-pw")
    server.sql(f"GRANT SELECT, INSERT, CREATE TABLE ON {database}.* TO {admin} WITH GRANT OPTION")
    server.sql(f"GRANT CREATE USER, ALTER USER ON *.* TO {admin}")
    headers = as_user(admin, "admin-pw")
    child = f"{admin}_child"
    try:
        assert server.post(f"CREATE USER IF NOT EXISTS {child} IDENTIFIED BY 'c'", headers=headers).status == 200
        response = server.post(f"GRANT SELECT ON {database}.* TO {child}", headers=headers)
        assert response.status == 200, response.text
        denied = server.post(f"GRANT ALTER ON {database}.* TO {child}", headers=headers)
        assert_error(denied, 403, 497, "ACCESS_DENIED")
        assert f"necessary to have the grant ALTER ON {database}.* WITH GRANT OPTION" in denied.text
        assert_error(server.post(f"DROP USER {child}", headers=headers), 403, 497, "ACCESS_DENIED")
        created = server.post(f"CREATE TABLE {database}.t (x UInt8) ENGINE = Memory", headers=headers)
        assert created.status == 200, created.text
    finally:
        server.sql(f"DROP USER IF EXISTS {child}")


def test_users_survive_a_restart(tmp_path):
    first = ServerProcess(tmp_path)
    try:
        first.sql("CREATE USER kept IDENTIFIED BY 'kept-pw'")
        first.sql("GRANT SELECT ON system.* TO kept")
    finally:
        assert first.stop() == 0
    (tmp_path / "port").unlink()
    second = ServerProcess(tmp_path)
    try:
        assert second.post("SELECT 1", headers=as_user("kept", "kept-pw")).status == 200
        assert second.sql("SHOW GRANTS FOR kept") == "GRANT SELECT ON system.* TO kept\n"
        stored = json.loads((tmp_path / "data" / "chserver_access.json").read_text())
        assert "kept-pw" not in json.dumps(stored), "the password is stored in clear"
    finally:
        second.stop()


def test_default_password_file(tmp_path):
    secret = tmp_path / "default-password"
    secret.write_text("admin-secret\n")
    server = ServerProcess(tmp_path, "--default-password-file", str(secret))
    try:
        assert_error(server.post("SELECT 1"), 403, 516, "AUTHENTICATION_FAILED")
        assert server.post("SELECT 1", headers=as_user("default", "admin-secret")).text == "1\n"
    finally:
        server.stop()


def test_https_with_a_private_ca(tmp_path):
    """--tls-cert/--tls-key: HTTPS verified against the CA that signed the certificate; plain HTTP
    and clients that do not trust the CA are refused."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca_cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    key, csr, cert = tmp_path / "server.key", tmp_path / "server.csr", tmp_path / "server.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
            "-days", "2", "-subj", "/CN=chute test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))

    server = ServerProcess(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
        conn.request("POST", "/", body=b"SELECT 40 + 2")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"42\n")
        conn.close()

        untrusted = http.client.HTTPSConnection("127.0.0.1", server.port, context=ssl.create_default_context(),
                                                timeout=30)
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted.request("POST", "/", body=b"SELECT 1")
        untrusted.close()

        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("POST", "/", body=b"SELECT 1")
            plain.getresponse()
        plain.close()
    finally:
        assert server.stop() == 0
    assert os.path.exists(server.log_path)
