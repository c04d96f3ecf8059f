"""The request scanner alone: no server, no engine."""

from __future__ import annotations

import pytest
from chdev.sqltext import scan


@pytest.mark.parametrize(
    "query, target, settings, fmt",
    [
        ("INSERT INTO t FORMAT TSV\n1\n", "INSERT INTO t ", "", "TSV"),
        ("INSERT INTO t (a, s) SETTINGS async_insert = 0 FORMAT TSV\n", "INSERT INTO t (a, s) ",
         "SETTINGS async_insert = 0 ", "TSV"),
        ("INSERT INTO t(a) SETTINGS s = 'FORMAT' FORMAT TSV\n", "INSERT INTO t(a) ", "SETTINGS s = 'FORMAT' ", "TSV"),
        # Keywords as table and database names.
        ("INSERT INTO settings FORMAT TSV\n", "INSERT INTO settings ", "", "TSV"),
        ("INSERT INTO db.format FORMAT RowBinary\n", "INSERT INTO db.format ", "", "RowBinary"),
        ("insert into `format`.`settings` format TSV\n", "insert into `format`.`settings` ", "", "TSV"),
        # Query parameters in the target and in the settings (what Vector's sink sends).
        ("INSERT INTO {database:Identifier}.{table:Identifier} FORMAT JSONEachRow\n{}",
         "INSERT INTO {database:Identifier}.{table:Identifier} ", "", "JSONEachRow"),
        ("INSERT INTO {settings:Identifier} SETTINGS a = {v:UInt8} FORMAT `JSONEachRow`\n",
         "INSERT INTO {settings:Identifier} ", "SETTINGS a = {v:UInt8} ", "JSONEachRow"),
        ("INSERT INTO TABLE FUNCTION file('x') SETTINGS a=1 FORMAT TSV\n", "INSERT INTO TABLE FUNCTION file('x') ",
         "SETTINGS a=1 ", "TSV"),
    ],
)
def test_insert_target_settings_and_format(query, target, settings, fmt):
    statement = scan(query)
    assert (statement.insert_target, statement.insert_settings, statement.insert_format) == (target, settings, fmt)
    assert query[statement.data_offset - 1] == "\n"


@pytest.mark.parametrize(
    "query", ["INSERT INTO t VALUES (1)", "INSERT INTO t SELECT 1", "INSERT INTO t FROM INFILE 'f' FORMAT TSV"]
)
def test_inserts_without_request_data(query):
    statement = scan(query)
    assert statement.kind == "INSERT"
    assert not statement.is_insert_with_data
