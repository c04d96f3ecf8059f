"""The privilege model alone (chdev/access.py): no server, no engine; the ASTs are the engine's
`EXPLAIN AST` output for the statements, as captured from chdb 26.9."""

from __future__ import annotations

import pytest
from chdev.access import Access, Grant, User, implies, required_privileges
from chdev.errors import ClickHouseError


@pytest.mark.parametrize(
    "granted, needed, expected",
    [
        ("ALL", "DROP TABLE", True),
        ("ALTER", "ALTER DELETE", True),
        ("ALTER", "ALTER USER", False),  # access management is not a table ALTER
        ("CREATE", "CREATE TEMPORARY TABLE", True),
        ("CREATE TABLE", "CREATE TEMPORARY TABLE", True),
        ("ACCESS MANAGEMENT", "CREATE USER", True),
        ("SELECT", "INSERT", False),
        ("DROP TABLE", "DROP DATABASE", False),
    ],
)
def test_privilege_hierarchy(granted, needed, expected):
    assert implies(granted, needed) is expected


SELECT_AST = """SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   TablesInSelectQuery (children 2)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier db.v
    TablesInSelectQueryElement (children 2)
     TableExpression (children 1)
      TableIdentifier t
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function numbers (alias n) (children 1)
"""


def test_a_select_needs_select_on_every_table_and_a_table_function_needs_temporary_tables():
    needs = required_privileges("SELECT", "SELECT * FROM db.v, t, numbers(3) AS n", SELECT_AST, "cur")
    assert needs == [("SELECT", "db", "v"), ("SELECT", "cur", "t"), ("CREATE TEMPORARY TABLE", None, None)]


def test_a_cte_is_not_a_table():
    ast = "SelectWithUnionQuery\n TableExpression (children 1)\n  TableIdentifier a\n"
    assert required_privileges("WITH", "WITH a AS (SELECT 1) SELECT * FROM a", ast, "cur") == []


@pytest.mark.parametrize(
    "kind, sql, ast, expected",
    [
        ("INSERT", "INSERT INTO db.t FORMAT RowBinary", "InsertQuery   (children 2)\n Identifier db\n Identifier t\n",
         [("INSERT", "db", "t")]),
        ("INSERT", "INSERT INTO t (x) VALUES", "InsertQuery   (children 2)\n Identifier t\n ExpressionList (children 1)\n"
         "  Identifier x\n", [("INSERT", "cur", "t")]),
        ("DROP", "DROP TABLE t", "DropQuery  t (children 1)\n Identifier t\n", [("DROP TABLE", "cur", "t")]),
        ("DROP", "DROP DATABASE db", "DropQuery db  (children 1)\n Identifier db\n", [("DROP DATABASE", "db", None)]),
        ("TRUNCATE", "TRUNCATE TABLE db.t", "TruncateQuery db t (children 2)\n", [("TRUNCATE", "db", "t")]),
        ("OPTIMIZE", "OPTIMIZE TABLE db.t FINAL", "OptimizeQuery db t_final (children 2)\n", [("OPTIMIZE", "db", "t")]),
        ("ALTER", "ALTER TABLE db.t DELETE WHERE 1", "AlterQuery db t (children 3)\n", [("ALTER", "db", "t")]),
        ("CREATE", "CREATE DATABASE IF NOT EXISTS db2", "CreateQuery db2  (children 1)\n",
         [("CREATE DATABASE", "db2", None)]),
        ("CREATE", "CREATE TABLE db.x (a UInt8) ENGINE = Memory", "CreateQuery db x (children 4)\n",
         [("CREATE TABLE", "db", "x")]),
        ("CREATE", "CREATE MATERIALIZED VIEW db.mv TO db.x AS SELECT 1 FROM db.t",
         "CreateQuery db mv (children 4)\n TableExpression (children 1)\n  TableIdentifier db.t\n",
         [("CREATE VIEW", "db", "mv")]),
        ("SYSTEM", "SYSTEM FLUSH LOGS", "SYSTEM query\n", [("SYSTEM", None, None)]),
    ],
)
def test_statement_kinds(kind, sql, ast, expected):
    assert required_privileges(kind, sql, ast, "cur") == expected


def test_unclassified_statements_are_refused_not_allowed():
    with pytest.raises(ClickHouseError) as err:
        required_privileges("BACKUP", "BACKUP TABLE t TO Disk('x', 'y')", "BackupQuery\n", "cur")
    assert err.value.code == 48


def test_checks_system_tables_and_implicit_show(tmp_path):
    access = Access(str(tmp_path / "access.json"))
    user = User("u", grants=[Grant("INSERT", "db", "events")])
    access.check(user, [("SELECT", "system", "tables"), ("SHOW COLUMNS", "db", "events")])
    with pytest.raises(ClickHouseError) as err:
        access.check(user, [("SHOW COLUMNS", "db", "other")])
    assert (err.value.code, err.value.name) == (497, "ACCESS_DENIED")
    with pytest.raises(ClickHouseError) as err:
        access.check(user, [("SELECT", "db", "events")])
    assert "necessary to have the grant SELECT ON db.events" in err.value.message


def test_statements_update_the_store_and_persist(tmp_path):
    path = str(tmp_path / "access.json")
    access = Access(path)
    admin = access.authenticate("default", "")
    access.execute(admin, "CREATE USER IF NOT EXISTS m IDENTIFIED BY 'pw'", "cur")
    # The engine prints global-only privileges as `ON *`.
    access.execute(admin, "GRANT CREATE USER, ALTER USER ON * TO m", "cur")
    access.execute(admin, "GRANT SELECT, INSERT ON db.* TO m WITH GRANT OPTION WITH REPLACE OPTION", "cur")
    reloaded = Access(path)
    m = reloaded.authenticate("m", "pw")
    assert reloaded.execute(m, "SHOW GRANTS", "cur") == [
        "GRANT SELECT, INSERT ON db.* TO m WITH GRANT OPTION",
    ]
    # WITH REPLACE OPTION replaced the global grants too, as in ClickHouse.
    with pytest.raises(ClickHouseError):
        reloaded.execute(m, "CREATE USER x IDENTIFIED BY 'y'", "cur")
    with pytest.raises(ClickHouseError) as err:
        reloaded.authenticate("m", "wrong")
    assert err.value.code == 516
