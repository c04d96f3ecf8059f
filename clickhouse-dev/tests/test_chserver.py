from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import struct
import threading
import time
import uuid

import lz4.frame
import pytest
from chdev import compression
from conftest import ServerProcess, assert_error


# --- basics ---------------------------------------------------------------------------------


def test_ping_and_health_endpoints(server):
    for path in ("/ping", "/", "/replicas_status"):
        response = server.request("GET", path)
        assert response.status == 200
        assert response.body == b"Ok.\n"
    assert server.request("GET", "/no/such/handler").status == 404


def test_select_formats_and_headers(server):
    query = "SELECT number AS n, toString(number) AS s FROM numbers(3)"
    response = server.request("GET", "/", query=query)
    assert response.status == 200
    assert response.body == b"0\t0\n1\t1\n2\t2\n"
    assert response.headers["x-clickhouse-format"] == "TabSeparated"
    assert response.headers["x-clickhouse-timezone"] == "UTC"
    assert response.headers["x-clickhouse-server-display-name"]
    summary = json.loads(response.headers["x-clickhouse-summary"])
    assert (summary["read_rows"], summary["result_rows"]) == ("3", "3")
    # read_rows counts what the engine read, result_rows what it returned.
    summary = json.loads(server.post("SELECT count() FROM numbers(1000)").headers["x-clickhouse-summary"])
    assert (summary["read_rows"], summary["read_bytes"], summary["result_rows"]) == ("1000", "8000", "1")

    response = server.post(query, default_format="JSONEachRow", query_id="my-query")
    assert [json.loads(line) for line in response.text.splitlines()] == [
        {"n": 0, "s": "0"}, {"n": 1, "s": "1"}, {"n": 2, "s": "2"}]
    assert response.headers["x-clickhouse-query-id"] == "my-query"
    assert response.headers["x-clickhouse-format"] == "JSONEachRow"

    assert server.post(query + " FORMAT CSV").text == '0,"0"\n1,"1"\n2,"2"\n'
    assert server.post(query + " FORMAT CSV").headers["x-clickhouse-format"] == "CSV"
    assert json.loads(server.post(query + " FORMAT JSON").text)["rows"] == 3

    # RowBinaryWithNamesAndTypes: the format the clickhouse crate validates schemas with.
    body = server.post("SELECT 7::UInt8 AS x", default_format="RowBinaryWithNamesAndTypes").body
    assert body == b"\x01\x01x\x05UInt8\x07"
    assert server.post("SELECT 7::UInt8 AS x", default_format="Native").body == b"\x01\x01\x01x\x05UInt8\x07"


def test_query_from_url_and_body_are_concatenated(server):
    # ClickHouse joins the `query` parameter and the body with a line break.
    assert server.post("+ 1", query="SELECT 1").text == "2\n"


def test_get_is_readonly(server, database):
    response = server.request("GET", "/", query=f"CREATE TABLE {database}.t (a UInt8) ENGINE = Memory")
    assert_error(response, 500, 164, "READONLY")


# --- parameters and settings ----------------------------------------------------------------


def test_param_binding_is_injection_safe(server, database):
    server.sql(f"CREATE TABLE {database}.t (s String) ENGINE = MergeTree ORDER BY s")
    server.sql(f"INSERT INTO {database}.t VALUES ('a')")
    hostile = "a' OR 1=1; DROP TABLE t; --"
    response = server.post(
        "SELECT {s:String} AS v, count() AS n FROM t WHERE s = {s:String}",
        database=database,
        param_s=hostile.replace("\\", "\\\\").replace("'", "\\'"),  # HTTP params use escaped TSV
        default_format="JSONEachRow",
    )
    assert response.status == 200, response.text
    assert json.loads(response.text) == {"v": hostile, "n": 0}
    assert server.sql("SELECT count() FROM t", database=database) == "1\n"

    # Identifier parameters are quoted by the engine, not spliced.
    response = server.post("SELECT count() FROM {tbl:Identifier}", database=database, param_tbl="t; DROP TABLE t")
    assert_error(response, 404, 60, "UNKNOWN_TABLE")
    # A value that is not of the declared type is rejected, not interpreted.
    response = server.post("SELECT {n:UInt32}", param_n="1 OR 1=1")
    assert response.status != 200
    assert response.headers["x-clickhouse-exception-code"] == "457"


def test_params_in_multipart_body_like_the_clickhouse_crate(server):
    boundary = "clickhouse-rs-boundary-abc"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"query\"\r\n\r\nSELECT {{x:String}}, {{y:UInt8}}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"param_x\"\r\n\r\nhello\\tworld\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"param_y\"\r\n\r\n42\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    response = server.post(body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                           default_format="JSONCompactEachRow")
    assert response.status == 200, response.text
    assert json.loads(response.text) == ["hello\tworld", 42]


def test_params_in_insert_with_data_in_body(server, database):
    server.sql(f"CREATE TABLE {database}.events (k String, v UInt64) ENGINE = MergeTree ORDER BY k "
               "SETTINGS non_replicated_deduplication_window = 10")
    rows = b'{"k":"a","v":1}\n{"k":"b","v":2}\n'
    # What Vector's ClickHouse sink sends.
    response = server.post(rows, query="INSERT INTO {database:Identifier}.{table:Identifier} FORMAT JSONEachRow",
                           param_database=database, param_table="events")
    assert response.status == 200, response.text
    assert json.loads(response.headers["x-clickhouse-summary"])["written_rows"] == "2"
    assert server.sql(f"SELECT count(), sum(v) FROM {database}.events") == "2\t3\n"

    # String and numeric parameters are values, quoted by the engine: the repeat with the same
    # token is deduplicated, and so is a plain statement that spells the token as a literal.
    token = "it's a \\\\ token"  # escaped TSV, as HTTP parameters are: the value is `it's a \ token`
    query = ("INSERT INTO {table:Identifier} SETTINGS insert_deduplication_token = {token:String}, "
             "max_insert_block_size = {rows:UInt64} FORMAT JSONEachRow")
    for _ in range(2):
        response = server.post(rows, query=query, database=database, param_table="events", param_token=token,
                               param_rows="1000")
        assert response.status == 200, response.text
    literal = "INSERT INTO events SETTINGS insert_deduplication_token = 'it\\'s a \\\\ token' FORMAT JSONEachRow"
    assert server.post(rows, query=literal, database=database).status == 200
    assert server.sql(f"SELECT count() FROM {database}.events") == "4\n"

    # Hostile and missing parameters fail like on a real server, and store nothing.
    response = server.post(rows, query="INSERT INTO {table:Identifier} FORMAT JSONEachRow", database=database,
                           param_table="events; DROP TABLE events")
    assert_error(response, 404, 60, "UNKNOWN_TABLE")
    response = server.post(rows, query="INSERT INTO {database:Identifier}.{table:Identifier} FORMAT JSONEachRow",
                           param_table="events")
    assert_error(response, 500, 456, "UNKNOWN_QUERY_PARAMETER")
    response = server.post(rows, query=query, database=database, param_table="events", param_token="t",
                           param_rows="1 OR 1=1")
    assert_error(response, 500, 457, "BAD_QUERY_PARAMETER")
    assert server.sql(f"SELECT count() FROM {database}.events") == "4\n"


def test_settings_pass_through_and_do_not_leak(server):
    assert server.sql("SELECT getSetting('max_threads')", max_threads="1") == "1\n"
    response = server.post("SELECT number FROM numbers(10)", max_result_rows="2", result_overflow_mode="throw")
    assert response.status != 200
    assert response.headers["x-clickhouse-exception-code"] == "396"  # TOO_MANY_ROWS_OR_BYTES
    # The next request on a pooled connection sees the defaults again.
    for _ in range(20):
        assert server.sql("SELECT getSetting('max_result_rows')") == "0\n"
    assert_error(server.post("SELECT 1", no_such_setting="1"), 404, 115, "UNKNOWN_SETTING")
    # HTTP-only parameters are accepted and not passed to the engine.
    assert server.sql("SELECT 1", user="default", password="", session_id="x", buffer_size="10",
                      wait_end_of_query="1", http_response_buffer_size="1") == "1\n"


@pytest.fixture(scope="module")
def one_connection_server(tmp_path_factory):
    """A server with a single engine connection: every request reuses it, or waits for it."""
    process = ServerProcess(tmp_path_factory.mktemp("one_connection"), "--max-connections", "1")
    yield process
    assert process.stop() == 0


def test_each_request_gets_exactly_its_settings_on_a_reused_connection(one_connection_server):
    """The connection keeps the last request's settings and the next request changes only what
    differs, so check every kind of transition."""
    process = one_connection_server
    process.request("POST", "/dev/stats?reset")
    names = ("max_threads", "max_result_rows", "readonly", "result_overflow_mode")
    query = "SELECT " + ", ".join(f"toString(getSetting('{name}'))" for name in names)

    def settings(**params):
        return dict(zip(names, process.sql(query, **params).rstrip("\n").split("\t")))

    defaults = settings()
    assert defaults["readonly"] == "0" and defaults["max_result_rows"] == "0"
    assert settings(max_threads="1", max_result_rows="5") == {**defaults, "max_threads": "1", "max_result_rows": "5"}
    assert settings(max_threads="1", max_result_rows="5") == {**defaults, "max_threads": "1", "max_result_rows": "5"}
    assert settings(max_threads="1") == {**defaults, "max_threads": "1"}
    assert settings(max_result_rows="7") == {**defaults, "max_result_rows": "7"}
    assert settings(max_result_rows="7", result_overflow_mode="break") == {
        **defaults, "max_result_rows": "7", "result_overflow_mode": "break"}
    assert settings() == defaults
    # A failed SET (bad value, unknown name) leaves nothing behind, also after other settings.
    assert settings(max_threads="3") == {**defaults, "max_threads": "3"}
    assert_error(process.post("SELECT 1", max_result_rows="abc"), 400, 27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED")
    assert settings() == defaults
    assert settings(max_threads="3") == {**defaults, "max_threads": "3"}
    assert_error(process.post("SELECT 1", no_such_setting="1"), 404, 115, "UNKNOWN_SETTING")
    assert settings() == defaults
    # readonly=1 cannot be reset on its connection: the next request still gets its own settings.
    assert settings(readonly="1") == {**defaults, "readonly": "1"}
    assert settings(max_threads="2") == {**defaults, "max_threads": "2"}
    assert settings(readonly="1") == {**defaults, "readonly": "1"}
    assert settings() == defaults
    # A request's own SET does not outlive it either.
    assert process.sql("SET max_threads = 5") == ""
    assert settings() == defaults
    # Nor does its database.
    assert process.sql("SELECT currentDatabase()", database="system", max_threads="1") == "system\n"
    assert process.sql("SELECT currentDatabase()") == "default\n"
    assert settings() == defaults
    stats = json.loads(process.request("GET", "/dev/stats").body)
    assert stats["queries"] == 22 and stats["errors"] == 2  # the server's USE/SET are not counted


def test_summary_elapsed_is_engine_time(one_connection_server):
    """elapsed_ns is the engine's time for the statement: neither a slowly sent request body nor
    the wait for an engine connection is in it."""
    process = one_connection_server
    query = b"SELECT sleep(0.2)"
    conn = socket.create_connection(("127.0.0.1", process.port), timeout=30)
    try:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nSELECT " % len(query))
        time.sleep(0.5)
        conn.sendall(query[len(b"SELECT "):])
        response = http.client.HTTPResponse(conn)
        response.begin()
        assert response.status == 200, response.read()
        summary = json.loads(response.getheader("X-ClickHouse-Summary"))
    finally:
        conn.close()
    assert 0.2e9 <= int(summary["elapsed_ns"]) < 0.45e9

    slow = threading.Thread(target=process.sql, args=("SELECT sleep(0.6)",))
    slow.start()
    time.sleep(0.2)
    started = time.perf_counter()
    response = process.post("SELECT 1")  # waits for the only connection
    waited = time.perf_counter() - started
    slow.join()
    assert response.status == 200
    assert waited > 0.2
    assert int(json.loads(response.headers["x-clickhouse-summary"])["elapsed_ns"]) < 0.15e9


def test_keep_alive_responses_are_not_delayed(server):
    """Headers and a small body leave in one write, with TCP_NODELAY: no ~40 ms delayed-ACK stall."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        times = []
        for _ in range(21):
            started = time.perf_counter()
            conn.request("POST", "/", body=b"SELECT 1")
            response = conn.getresponse()
            assert response.read() == b"1\n"
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    assert sorted(times)[10] < 0.03, times


# --- inserts --------------------------------------------------------------------------------

TABLE = "(id UInt64, name String, tags Map(String, Float64), at DateTime64(3, 'UTC'), u UUID)"
ROWS_QUERY = (
    "SELECT number AS id, 'name ' || toString(number) || '\\t\"x\"' AS name, "
    "map('a', number / 2) AS tags, toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + number AS at, "
    "generateUUIDv4(number) AS u FROM numbers(1000)"
)


@pytest.mark.parametrize(
    "fmt", ["RowBinary", "RowBinaryWithNamesAndTypes", "JSONEachRow", "TSV", "CSV", "Native", "TabSeparatedWithNames"]
)
def test_insert_each_format(server, database, fmt):
    server.sql(f"CREATE TABLE {database}.src {TABLE} ENGINE = MergeTree ORDER BY id")
    server.sql(f"CREATE TABLE {database}.dst {TABLE} ENGINE = MergeTree ORDER BY id")
    server.sql(f"INSERT INTO {database}.src {ROWS_QUERY}")
    data = server.post(f"SELECT * FROM {database}.src ORDER BY id FORMAT {fmt}").body
    response = server.post(data, query=f"INSERT INTO {database}.dst FORMAT {fmt}")
    assert response.status == 200, response.text
    summary = json.loads(response.headers["x-clickhouse-summary"])
    assert summary["written_rows"] == "1000"
    check = "SELECT count(), sum(cityHash64(*)) FROM {} FORMAT TSV"
    assert server.sql(check.format(f"{database}.dst")) == server.sql(check.format(f"{database}.src"))


def test_insert_with_query_in_body(server, database):
    server.sql(f"CREATE TABLE {database}.t (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
    response = server.post(f"INSERT INTO {database}.t (a, s) SETTINGS async_insert = 0 FORMAT TSV\n1\tx\n2\ty\n")
    assert response.status == 200, response.text
    # Binary data right after the format name and the line break, including leading whitespace bytes.
    row = struct.pack("<I", 0x20202020) + b"\x02 \n"
    response = server.post(f"INSERT INTO {database}.t FORMAT RowBinary\n".encode() + row)
    assert response.status == 200, response.text
    rows = server.sql(f"SELECT a, s FROM {database}.t ORDER BY a FORMAT JSONCompactEachRow").splitlines()
    assert [json.loads(row) for row in rows] == [[1, "x"], [2, "y"], [0x20202020, " \n"]]
    assert_error(server.post("", query=f"INSERT INTO {database}.t FORMAT TSV"), 500, 108, "NO_DATA_TO_INSERT")


def test_insert_chunked_transfer_encoding(server, database):
    server.sql(f"CREATE TABLE {database}.t (a UInt64) ENGINE = MergeTree ORDER BY a")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    lines = (f"{i}\n".encode() for i in range(10000))
    conn.request("POST", f"/?query=INSERT+INTO+{database}.t+FORMAT+TSV", body=lines, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    conn.close()
    assert server.sql(f"SELECT count(), sum(a) FROM {database}.t") == f"10000\t{sum(range(10000))}\n"


def test_bad_data_is_rejected_and_connection_stays_usable(server, database):
    server.sql(f"CREATE TABLE {database}.t (a UInt64) ENGINE = MergeTree ORDER BY a")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", f"/?query=INSERT+INTO+{database}.t+FORMAT+TSV", body=b"1\nnot a number\n" + b"2\n" * 100000)
    response = conn.getresponse()
    assert response.status == 400
    assert response.getheader("X-ClickHouse-Exception-Code") == "27"
    response.read()
    conn.request("POST", "/", body=f"SELECT count() FROM {database}.t")
    response = conn.getresponse()
    assert response.read() == b"0\n"
    conn.close()


# --- compression ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [compression.METHOD_LZ4, compression.METHOD_NONE, compression.METHOD_ZSTD])
def test_compressed_insert(server, database, method):
    server.sql(f"CREATE TABLE {database}.t (a UInt64, s String) ENGINE = MergeTree ORDER BY a")
    data = b"".join(f"{i}\tvalue {i}\n".encode() for i in range(50000))
    # Several blocks, split at arbitrary byte positions (blocks need not end on rows).
    body = b"".join(compression.encode_block(data[i : i + 100_003], method) for i in range(0, len(data), 100_003))
    response = server.post(body, query=f"INSERT INTO {database}.t FORMAT TSV", decompress="1")
    assert response.status == 200, response.text
    assert server.sql(f"SELECT count(), sum(a) FROM {database}.t") == f"50000\t{sum(range(50000))}\n"


def test_corrupted_checksum_is_rejected(server, database):
    server.sql(f"CREATE TABLE {database}.t (a UInt64) ENGINE = MergeTree ORDER BY a")
    block = bytearray(compression.encode_block(b"1\n2\n3\n"))
    block[3] ^= 0xFF
    response = server.post(bytes(block), query=f"INSERT INTO {database}.t FORMAT TSV", decompress="1")
    assert_error(response, 500, 40, "CHECKSUM_DOESNT_MATCH")
    block = bytearray(compression.encode_block(b"1\n2\n3\n"))
    block[-1] ^= 0xFF  # payload corruption is caught by the same checksum
    response = server.post(bytes(block), query=f"INSERT INTO {database}.t FORMAT TSV", decompress="1")
    assert_error(response, 500, 40, "CHECKSUM_DOESNT_MATCH")
    assert server.sql(f"SELECT count() FROM {database}.t") == "0\n"


def test_compressed_response(server):
    query = "SELECT number FROM numbers(300000)"
    plain = server.post(query).body
    framed = server.post(query, compress="1").body
    decoded, pos = b"", 0
    while pos < len(framed):
        _method, size, _raw = struct.unpack_from("<BII", framed, pos + 16)
        meta = framed[pos : pos + 25]
        decoded += compression.decode_block(meta, framed[pos + 25 : pos + 16 + size])  # verifies checksum
        pos += 16 + size
    assert decoded == plain
    assert len(framed) < len(plain)

    response = server.post(query, headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(response.body) == plain
    response = server.post(query, headers={"Accept-Encoding": "lz4"})  # what the clickhouse crate asks for
    assert response.headers["content-encoding"] == "lz4"
    assert lz4.frame.decompress(response.body) == plain
    response = server.post(query, headers={"Accept-Encoding": "gzip"}, enable_http_compression="0")
    assert "content-encoding" not in response.headers
    assert response.body == plain


def test_gzip_request_body(server, database):
    server.sql(f"CREATE TABLE {database}.t (a UInt64) ENGINE = MergeTree ORDER BY a")
    body = gzip.compress(b"".join(f"{i}\n".encode() for i in range(1000)))
    response = server.post(body, headers={"Content-Encoding": "gzip"}, query=f"INSERT INTO {database}.t FORMAT TSV")
    assert response.status == 200, response.text
    assert server.sql(f"SELECT count() FROM {database}.t") == "1000\n"


# --- errors ---------------------------------------------------------------------------------


def test_error_mapping(server):
    assert_error(server.post("SELEC 1"), 400, 62, "SYNTAX_ERROR")
    assert_error(server.post("SELECT * FROM no_such_table"), 404, 60, "UNKNOWN_TABLE")
    assert_error(server.post("SELECT 1", database="no_such_db"), 404, 81, "UNKNOWN_DATABASE")
    assert_error(server.post("SELECT no_such_function(1)"), 404, 46, "UNKNOWN_FUNCTION")
    assert_error(server.post("SELECT throwIf(1)"), 500, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO")
    assert_error(server.post(""), 400, 62, "SYNTAX_ERROR")  # empty query
    response = server.post("SELECT sleep(1) FROM numbers(3) SETTINGS max_block_size = 1", max_execution_time="0.5")
    assert_error(response, 408, 159, "TIMEOUT_EXCEEDED")


# --- concurrency, dedup, stats --------------------------------------------------------------


def test_concurrent_inserts_and_selects(server, database):
    server.sql(f"CREATE TABLE {database}.t (w UInt8, i UInt32) ENGINE = MergeTree ORDER BY (w, i)")
    failures = []

    def inserter(worker):
        for batch in range(15):
            data = b"".join(f"{worker}\t{batch * 100 + i}\n".encode() for i in range(100))
            response = server.post(data, query=f"INSERT INTO {database}.t FORMAT TSV")
            if response.status != 200:
                failures.append(response.text)

    def reader(_worker):
        for _ in range(15):
            response = server.post(f"SELECT count(), uniqExact(w) FROM {database}.t")
            if response.status != 200:
                failures.append(response.text)

    threads = [threading.Thread(target=inserter, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert server.sql(f"SELECT count(), uniqExact(w, i) FROM {database}.t") == "6000\t6000\n"


def test_engine_runs_requests_in_parallel(server):
    query = "SELECT sleep(1)"
    started = time.perf_counter()
    threads = [threading.Thread(target=server.sql, args=(query,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.perf_counter() - started < 2.5


def test_insert_deduplication_token_through_materialized_views(server, database):
    window = "SETTINGS non_replicated_deduplication_window = 100"
    server.sql(f"CREATE TABLE {database}.raw (k String, v UInt64) ENGINE = MergeTree ORDER BY k {window}")
    server.sql(
        f"CREATE TABLE {database}.rollup (k String, n UInt64, s UInt64) ENGINE = SummingMergeTree ORDER BY k {window}")
    server.sql(f"CREATE MATERIALIZED VIEW {database}.mv TO {database}.rollup AS "
               f"SELECT k, count() AS n, sum(v) AS s FROM {database}.raw GROUP BY k")
    block = b'{"k":"a","v":1}\n{"k":"b","v":2}\n'
    for _ in range(3):
        response = server.post(block, query=f"INSERT INTO {database}.raw FORMAT JSONEachRow",
                               insert_deduplication_token="stream:0:1-2",
                               deduplicate_blocks_in_dependent_materialized_views="1")
        assert response.status == 200, response.text
    assert server.sql(f"SELECT count(), sum(v) FROM {database}.raw") == "2\t3\n"
    assert server.sql(f"SELECT sum(n), sum(s) FROM {database}.rollup") == "2\t3\n"
    # A different token is a different batch.
    server.post(block, query=f"INSERT INTO {database}.raw FORMAT JSONEachRow", insert_deduplication_token="other",
                deduplicate_blocks_in_dependent_materialized_views="1")
    assert server.sql(f"SELECT count() FROM {database}.raw") == "4\n"
    assert server.sql(f"SELECT sum(n) FROM {database}.rollup") == "4\n"


def test_dev_stats_counts_selects(server, database):
    before = json.loads(server.request("GET", "/dev/stats").body)
    server.sql("SELECT 1", database=database)
    server.sql("SELECT 2", database=database)
    after = json.loads(server.request("GET", "/dev/stats").body)
    assert after["selects"] - before["selects"] == 2
    assert after["databases"][database]["selects"] == 2


# --- process lifecycle and limits -----------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp_path):
    process = ServerProcess(tmp_path)
    result = {}

    def slow():
        result["response"] = process.post("SELECT sleep(1.5)")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    process.process.send_signal(signal.SIGTERM)
    thread.join(10)
    assert result["response"].status == 200
    assert process.process.wait(20) == 0
    process.log.close()


def test_body_size_limit(tmp_path):
    process = ServerProcess(tmp_path, "--max-body-bytes", "1000")
    try:
        process.sql("CREATE TABLE t (a UInt64) ENGINE = MergeTree ORDER BY a")
        response = process.post(b"1\n" * 1000, query="INSERT INTO t FORMAT TSV")
        assert_error(response, 413, 393, "QUERY_IS_TOO_LARGE")
        # Chunked bodies have no Content-Length; the limit applies while streaming.
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
        conn.request("POST", "/?query=INSERT+INTO+t+FORMAT+TSV", body=(b"1\n" * 100 for _ in range(50)),
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        conn.close()
        assert process.sql("SELECT count() FROM t") == "0\n"
        assert process.sql("SELECT 1") == "1\n"
    finally:
        assert process.stop() == 0


def test_data_persists_across_restart(tmp_path):
    process = ServerProcess(tmp_path)
    process.sql("CREATE TABLE t (a UInt64) ENGINE = MergeTree ORDER BY a")
    process.post(b"1\n2\n", query="INSERT INTO t FORMAT TSV")
    assert process.stop() == 0
    (tmp_path / "port").unlink()
    process = ServerProcess(tmp_path)
    try:
        assert process.sql("SELECT sum(a) FROM t") == "3\n"
    finally:
        process.stop()


def test_uuid_roundtrip_rowbinary(server, database):
    # UUID byte order in RowBinary is easy to get wrong in clients; make sure the engine agrees with Python.
    value = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    body = server.post(f"SELECT toUUID('{value}') FORMAT RowBinary").body
    assert body == value.bytes[:8][::-1] + value.bytes[8:][::-1]
