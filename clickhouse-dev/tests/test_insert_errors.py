"""Inserts the engine refuses must come back as errors, and nothing they did not store may be reported.

chdb's streaming insert once answered 200 for both reproductions below while storing nothing.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from chdev import compression
from conftest import assert_error


def count(server, table: str) -> int:
    return int(server.sql(f"SELECT count() FROM {table}"))


def stats_errors(server, database: str) -> int:
    return json.loads(server.request("GET", "/dev/stats").body)["databases"].get(database, {}).get("errors", 0)


def day_rows_rowbinary(days: int) -> bytes:
    # (d Date, v UInt32): Date is days since 1970-01-01 as UInt16.
    return b"".join(struct.pack("<HI", 20454 + day, day) for day in range(days))


def test_too_many_partitions_in_one_insert_is_an_error(server, database):
    table = f"{database}.by_day"
    server.sql(f"CREATE TABLE {table} (d Date, v UInt32) ENGINE = MergeTree PARTITION BY d ORDER BY v")
    # What the Rust client sends: RowBinary in LZ4 blocks with decompress=1.
    body = compression.encode_blocks(day_rows_rowbinary(101))
    response = server.post(body, query="INSERT INTO by_day FORMAT RowBinary", decompress="1", database=database)
    assert_error(response, 500, 252, "TOO_MANY_PARTS")
    assert "Too many partitions for single INSERT block" in response.text
    assert "x-clickhouse-summary" not in response.headers
    assert count(server, table) == 0
    assert stats_errors(server, database) == 1

    # At the limit (max_partitions_per_insert_block = 100) the same insert is stored.
    body = compression.encode_blocks(day_rows_rowbinary(100))
    response = server.post(body, query=f"INSERT INTO {table} FORMAT RowBinary", decompress="1")
    assert response.status == 200, response.text
    assert json.loads(response.headers["x-clickhouse-summary"])["written_rows"] == "100"
    assert count(server, table) == 100


def test_materialized_view_that_throws_fails_the_insert(server, database):
    server.sql(f"CREATE TABLE {database}.src (v UInt32) ENGINE = MergeTree ORDER BY v")
    server.sql(f"CREATE TABLE {database}.dst (v UInt32) ENGINE = MergeTree ORDER BY v")
    server.sql(f"CREATE MATERIALIZED VIEW {database}.mv TO {database}.dst AS "
               f"SELECT v + throwIf(v = 5, 'row 5 is refused') AS v FROM {database}.src")
    body = b"".join(struct.pack("<I", v) for v in range(10))
    response = server.post(body, query=f"INSERT INTO {database}.src FORMAT RowBinary")
    assert_error(response, 500, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO")
    assert "row 5 is refused" in response.text
    # As on a real server: the source table's part was committed before the view threw, the
    # view's target got nothing, and the client is told the insert failed.
    assert count(server, f"{database}.src") == 10
    assert count(server, f"{database}.dst") == 0


def test_type_error_in_rowbinary_body(server, database):
    table = f"{database}.t"
    server.sql(f"CREATE TABLE {table} (id UInt32, name String, value Float64) ENGINE = MergeTree ORDER BY id")
    good = b"".join(struct.pack("<I", i) + b"\x03abc" + struct.pack("<d", i / 2) for i in range(100))
    # A client that encodes `value` as UInt16 instead of Float64: every later field is misread
    # and the data ends in the middle of a row.
    bad = struct.pack("<I", 100) + b"\x03abc" + struct.pack("<H", 7)
    response = server.post(good + bad, query=f"INSERT INTO {table} FORMAT RowBinary")
    assert_error(response, 500, 33, "CANNOT_READ_ALL_DATA")
    assert "/dev/fd/" not in response.text  # how the dev server feeds the engine stays hidden
    assert count(server, table) == 0
    # The same rows without the bad one are stored.
    response = server.post(good, query=f"INSERT INTO {table} FORMAT RowBinary")
    assert response.status == 200, response.text
    assert count(server, table) == 100


def test_bad_checksum_in_a_later_block_stores_nothing(server, database):
    table = f"{database}.t"
    server.sql(f"CREATE TABLE {table} (a UInt64) ENGINE = MergeTree ORDER BY a")
    first = compression.encode_block(b"".join(f"{i}\n".encode() for i in range(10000)))
    second = bytearray(compression.encode_block(b"".join(f"{i}\n".encode() for i in range(10000, 20000))))
    second[-1] ^= 0xFF
    response = server.post(first + bytes(second), query=f"INSERT INTO {table} FORMAT TSV", decompress="1")
    # The rows of the first block ended on a row boundary: a body cut there must not be
    # committed as if it were the whole insert.
    assert_error(response, 500, 40, "CHECKSUM_DOESNT_MATCH")
    assert count(server, table) == 0


def test_client_gone_midway_stores_nothing(server, database):
    table = f"{database}.t"
    server.sql(f"CREATE TABLE {table} (a UInt64) ENGINE = MergeTree ORDER BY a")
    rows = b"".join(f"{i}\n".encode() for i in range(10000))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST /?query=INSERT+INTO+t+FORMAT+TSV&database={database} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(rows) * 2}\r\n\r\n".encode() + rows
        )
        time.sleep(0.3)
    # The server notices the closed connection, aborts the insert and serves on.
    deadline = time.time() + 10
    while time.time() < deadline and stats_errors(server, database) == 0:
        time.sleep(0.05)
    assert stats_errors(server, database) == 1
    assert count(server, table) == 0
