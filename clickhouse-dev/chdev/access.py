"""Users, passwords, grants and per-user settings, enforced the way clickhouse-server does.

What the engine can and cannot do (chdb-core 26.9, measured): every chdb connection is
authenticated as `default` by chdb itself (`ChdbClient` calls `authenticate("default", "")`), the
only access storage is a read-only `users_xml` (`CREATE USER` fails with 514
ACCESS_STORAGE_FOR_INSERTION_NOT_FOUND) and `EXECUTE AS` is disabled (344: the embedded server
never reads `access_control_improvements`). So the engine cannot store users or run a statement as
one. What it can do is used: it parses and normalises every access statement
(`formatQuerySingleLine`), lists the tables a statement names (`EXPLAIN AST`), enforces `readonly`
(164) from the user's settings, and formats `SHOW GRANTS` / `SHOW USERS` results. This module does
the rest, the way ClickHouse's access control does it:

* users with a SHA-256 password (`IDENTIFIED [WITH sha256_password|plaintext_password] BY`,
  `WITH sha256_hash BY 'hex' [SALT 's']`, `WITH no_password`), kept in `<data-dir>/access.json`;
  `default` is the users.xml user: all privileges with grant option, not alterable (495);
* `GRANT [ON CLUSTER c] privs ON target, ... TO users [WITH GRANT OPTION] [WITH REPLACE OPTION]`
  and `REVOKE`, at the `*.*`, `db.*` and `db.table` levels, with ClickHouse's privilege hierarchy
  for the privileges listed in `_CHILDREN`;
* authentication of every request (516 AUTHENTICATION_FAILED), the privilege check before a
  statement runs (497 ACCESS_DENIED, with ClickHouse's message), and `max_concurrent_queries_for_user`
  (202 TOO_MANY_SIMULTANEOUS_QUERIES).

Not modelled (README "Users and grants"): roles, row policies, quotas, settings profiles and
constraints, column-level grants, partial revokes, host restrictions, and row filtering of
`system` tables (every user may read `system.*` and `information_schema`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading

from .errors import ClickHouseError

DEFAULT_USER = "default"

# Settings this server enforces itself instead of handing them to the engine (the engine would
# count the queries of every user together: chdb runs them all as `default`).
SERVER_ENFORCED_SETTINGS = frozenset({"max_concurrent_queries_for_user"})

# ClickHouse's privilege tree, as far as Chute and its tests need it (src/Access/Common/AccessType.h).
_CHILDREN = {
    "ALL": None,  # everything
    "SHOW": {"SHOW DATABASES", "SHOW TABLES", "SHOW COLUMNS", "SHOW DICTIONARIES"},
    "CREATE": {"CREATE DATABASE", "CREATE TABLE", "CREATE VIEW", "CREATE DICTIONARY", "CREATE TEMPORARY TABLE",
               "CREATE ARBITRARY TEMPORARY TABLE", "CREATE FUNCTION"},
    "DROP": {"DROP DATABASE", "DROP TABLE", "DROP VIEW", "DROP DICTIONARY", "DROP FUNCTION"},
    "ACCESS MANAGEMENT": {"CREATE USER", "ALTER USER", "DROP USER", "CREATE ROLE", "ALTER ROLE", "DROP ROLE",
                          "ROLE ADMIN", "SHOW USERS", "SHOW ROLES", "SHOW ACCESS"},
    "SHOW ACCESS": {"SHOW USERS", "SHOW ROLES"},
    "CREATE TABLE": {"CREATE ARBITRARY TEMPORARY TABLE"},
    "CREATE ARBITRARY TEMPORARY TABLE": {"CREATE TEMPORARY TABLE"},
}
# Privileges granted at the global level only (`ON *.*`).
_GLOBAL_ONLY = frozenset({"CREATE USER", "ALTER USER", "DROP USER", "CREATE ROLE", "ALTER ROLE", "DROP ROLE",
                          "ROLE ADMIN", "SHOW USERS", "SHOW ROLES", "SHOW ACCESS", "ACCESS MANAGEMENT",
                          "CREATE TEMPORARY TABLE", "CREATE ARBITRARY TEMPORARY TABLE", "SYSTEM", "KILL QUERY",
                          "CREATE FUNCTION", "DROP FUNCTION"})
_ACCESS_ALTERS = frozenset({"ALTER USER", "ALTER ROLE", "ALTER QUOTA", "ALTER ROW POLICY", "ALTER SETTINGS PROFILE"})
_ALIASES = {"ALL PRIVILEGES": "ALL", "ALTER TABLE": "ALTER"}

_STRING = r"'((?:[^'\\]|\\.)*)'"
_ACCESS_STATEMENT = re.compile(
    r"^\s*(?:(?:CREATE|ALTER|DROP)\s+USER\b|GRANT\b|REVOKE\b|SHOW\s+(?:GRANTS|USERS|CREATE\s+USER)\b)",
    re.IGNORECASE,
)
_CTE_NAME = re.compile(r"(?:\bWITH|,)\s+`?([A-Za-z_][A-Za-z0-9_]*)`?\s+AS\s*\(", re.IGNORECASE)
_SYSTEM_DATABASES = frozenset({"system", "information_schema", "INFORMATION_SCHEMA"})


def is_access_statement(sql: str) -> bool:
    return bool(_ACCESS_STATEMENT.match(sql))


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _password_hash(password: str, salt: str) -> str:
    return hashlib.sha256((password + salt).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Grant:
    privilege: str
    database: str | None  # None: every database
    table: str | None  # None: every table of `database`
    grant_option: bool = False

    def target(self) -> str:
        return f"{self.database or '*'}.{self.table or '*'}" if self.database else "*.*"

    def covers(self, database: str | None, table: str | None) -> bool:
        if self.database is None:
            return True
        if self.database != database:
            return False
        return self.table is None or self.table == table


def implies(granted: str, needed: str) -> bool:
    """Whether holding `granted` gives `needed` (ClickHouse's privilege hierarchy)."""
    if granted == needed or granted == "ALL":
        return True
    if granted == "ALTER" and needed.startswith("ALTER ") and needed not in _ACCESS_ALTERS:
        return True
    return any(implies(child, needed) for child in _CHILDREN.get(granted) or ())


@dataclasses.dataclass
class User:
    name: str
    auth: str = "sha256_password"  # or no_password
    password_hash: str = ""
    salt: str = ""
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    grants: list[Grant] = dataclasses.field(default_factory=list)

    def check_password(self, password: str) -> bool:
        if self.auth == "no_password":
            return password == ""
        return hashlib.sha256((password + self.salt).encode()).hexdigest() == self.password_hash

    def has(self, privilege: str, database: str | None, table: str | None, grant_option: bool = False) -> bool:
        return any(
            implies(grant.privilege, privilege) and grant.covers(database, table)
            and (grant.grant_option or not grant_option)
            for grant in self.grants
        )

    def has_any_on(self, database: str, table: str | None) -> bool:
        """Any privilege on the table (or database): what `SHOW`/`DESCRIBE` need implicitly."""
        return any(
            grant.covers(database, table) or (table is None and grant.database == database)
            for grant in self.grants
        )

    def engine_settings(self) -> dict[str, str]:
        return {k: v for k, v in self.settings.items() if k not in SERVER_ENFORCED_SETTINGS}

    def to_json(self) -> dict:
        return {
            "auth": self.auth, "password_hash": self.password_hash, "salt": self.salt, "settings": self.settings,
            "grants": [dataclasses.asdict(grant) for grant in self.grants],
        }

    @classmethod
    def from_json(cls, name: str, data: dict) -> "User":
        return cls(name, data["auth"], data["password_hash"], data["salt"], dict(data["settings"]),
                   [Grant(**grant) for grant in data["grants"]])


def _default_user(password: str) -> User:
    return User(
        DEFAULT_USER,
        auth="sha256_password" if password else "no_password",
        password_hash=_password_hash(password, "") if password else "",
        grants=[Grant("ALL", None, None, grant_option=True)],
    )


def access_denied(user: str, privilege: str, target: str) -> ClickHouseError:
    return ClickHouseError(
        497, "ACCESS_DENIED",
        f"{user}: Not enough privileges. To execute this query, it's necessary to have the grant "
        f"{privilege} ON {target}",
    )


def grant_option_denied(user: str, privilege: str, target: str) -> ClickHouseError:
    return ClickHouseError(
        497, "ACCESS_DENIED",
        f"{user}: Not enough privileges. To execute this query, it's necessary to have the grant "
        f"{privilege} ON {target} WITH GRANT OPTION",
    )


def authentication_failed(user: str) -> ClickHouseError:
    return ClickHouseError(
        516, "AUTHENTICATION_FAILED",
        f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
    )


class Access:
    """The user store and the checks. Thread-safe; persisted to `path` on every change."""

    def __init__(self, path: str, default_password: str = ""):
        self.path = path
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._users: dict[str, User] = {DEFAULT_USER: _default_user(default_password)}
        if os.path.exists(path):
            with open(path) as file:
                for name, data in json.load(file).get("users", {}).items():
                    self._users[name] = User.from_json(name, data)

    # --- authentication and limits ----------------------------------------------------------

    def authenticate(self, name: str, password: str) -> User:
        with self._lock:
            user = self._users.get(name)
        if user is None or not user.check_password(password):
            raise authentication_failed(name)
        return user

    @contextlib.contextmanager
    def running(self, user: User):
        """Counts the user's statement while it runs; refuses one over `max_concurrent_queries_for_user`."""
        limit = int(user.settings.get("max_concurrent_queries_for_user", "0") or 0)
        with self._lock:
            current = self._running.get(user.name, 0)
            if limit and current >= limit:
                raise ClickHouseError(
                    202, "TOO_MANY_SIMULTANEOUS_QUERIES",
                    f"Too many simultaneous queries for user {user.name}. Current: {current}, maximum: {limit}",
                )
            self._running[user.name] = current + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[user.name] -= 1

    # --- privilege checks ------------------------------------------------------------------

    def check(self, user: User, needs: list[tuple[str, str | None, str | None]]) -> None:
        """Raises ACCESS_DENIED for the first need the user lacks. A need on a table with
        privilege `SHOW COLUMNS`/`SHOW TABLES` is met by any grant on it, as in ClickHouse."""
        for privilege, database, table in needs:
            if database in _SYSTEM_DATABASES:
                continue
            if privilege in ("SHOW COLUMNS", "SHOW TABLES", "SHOW DATABASES") and database is not None:
                if user.has_any_on(database, table if privilege == "SHOW COLUMNS" else None):
                    continue
            if not user.has(privilege, database, table):
                target = "*.*" if database is None else f"{database}.{table or '*'}"
                raise access_denied(user.name, privilege, target)

    # --- access statements -----------------------------------------------------------------

    def execute(self, user: User, normalized: str, current_database: str) -> list[str] | None:
        """Runs one access statement (normalised by the engine's `formatQuerySingleLine`).
        Returns the result rows for SHOW statements, None for the others."""
        upper = normalized.upper()
        if upper.startswith("SHOW GRANTS"):
            return self._show_grants(user, normalized)
        if upper.startswith("SHOW USERS"):
            self.check(user, [("SHOW USERS", None, None)])
            with self._lock:
                return sorted(self._users)
        if upper.startswith("SHOW CREATE USER"):
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "SHOW CREATE USER is not supported by chserver")
        if upper.startswith("CREATE USER"):
            self._create_user(user, normalized)
        elif upper.startswith("ALTER USER"):
            self._alter_user(user, normalized)
        elif upper.startswith("DROP USER"):
            self._drop_user(user, normalized)
        elif upper.startswith("GRANT"):
            self._grant(user, normalized, current_database)
        elif upper.startswith("REVOKE"):
            self._revoke(user, normalized, current_database)
        else:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", f"Not supported by chserver: {normalized[:80]}")
        return None

    def _save(self) -> None:
        data = {"users": {name: u.to_json() for name, u in self._users.items() if name != DEFAULT_USER}}
        temporary = f"{self.path}.tmp{os.getpid()}"
        with open(temporary, "w") as file:
            json.dump(data, file, indent=1, sort_keys=True)
        os.replace(temporary, self.path)

    @staticmethod
    def _names(text: str) -> list[str]:
        return [name.strip().strip("`") for name in text.split(",") if name.strip()]

    @staticmethod
    def _parse_auth(text: str) -> tuple[str, str, str] | None:
        """(auth, password hash, salt) from an `IDENTIFIED ...` clause, None when there is none."""
        match = re.search(r"\bIDENTIFIED WITH no_password\b|\bNOT IDENTIFIED\b", text)
        if match:
            return "no_password", "", ""
        match = re.search(rf"\bIDENTIFIED WITH sha256_hash BY {_STRING}(?: SALT {_STRING})?", text)
        if match:
            return "sha256_password", _unescape(match.group(1)).lower(), _unescape(match.group(2) or "")
        match = re.search(rf"\bIDENTIFIED(?: WITH (sha256_password|plaintext_password))? BY {_STRING}", text)
        if match:
            return "sha256_password", _password_hash(_unescape(match.group(2)), ""), ""
        match = re.search(r"\bIDENTIFIED WITH (\w+)", text)
        if match:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", f"chserver supports no authentication type {match.group(1)}")
        return None

    @staticmethod
    def _parse_settings(text: str) -> dict[str, str]:
        settings = {}
        for match in re.finditer(rf"(\w+) = ({_STRING}|[^,\s]+)", text):
            value = match.group(2)
            settings[match.group(1)] = _unescape(value[1:-1]) if value.startswith("'") else value
        return settings

    def _require(self, user: User, privilege: str) -> None:
        self.check(user, [(privilege, None, None)])

    def _create_user(self, user: User, sql: str) -> None:
        self._require(user, "CREATE USER")
        match = re.match(
            r"CREATE USER (IF NOT EXISTS |OR REPLACE )?(.+?)(?= ON CLUSTER | IDENTIFIED | NOT IDENTIFIED| HOST "
            r"| SETTINGS | DEFAULT |$)", sql)
        if not match:
            raise ClickHouseError(62, "SYNTAX_ERROR", f"Cannot parse {sql[:80]}")
        mode, names = match.group(1) or "", self._names(match.group(2))
        auth = self._parse_auth(sql) or ("no_password", "", "")
        settings_match = re.search(r" SETTINGS (.+?)(?= DEFAULT DATABASE |$)", sql)
        settings = self._parse_settings(settings_match.group(1)) if settings_match else {}
        with self._lock:
            for name in names:
                if name in self._users:
                    if mode.startswith("IF NOT EXISTS"):
                        continue
                    if not mode.startswith("OR REPLACE") or name == DEFAULT_USER:
                        storage = "users_xml" if name == DEFAULT_USER else "local_directory"
                        raise ClickHouseError(493, "ACCESS_ENTITY_ALREADY_EXISTS",
                                              f"user `{name}`: cannot insert because user `{name}` already exists "
                                              f"in {storage}")
                self._users[name] = User(name, *auth, settings=dict(settings))
            self._save()

    def _alter_user(self, user: User, sql: str) -> None:
        self._require(user, "ALTER USER")
        match = re.match(r"ALTER USER (IF EXISTS )?(.+?)(?= ON CLUSTER | IDENTIFIED | NOT IDENTIFIED| RENAME TO "
                         r"| HOST | DROP ALL | ADD SETTINGS? | SETTINGS? | DEFAULT |$)", sql)
        if not match:
            raise ClickHouseError(62, "SYNTAX_ERROR", f"Cannot parse {sql[:80]}")
        if " RENAME TO " in sql:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", "ALTER USER ... RENAME TO is not supported by chserver")
        if_exists, names = bool(match.group(1)), self._names(match.group(2))
        auth = self._parse_auth(sql)
        add = re.search(r" ADD SETTINGS? (.+?)(?= DEFAULT DATABASE |$)", sql)
        with self._lock:
            for name in names:
                if name == DEFAULT_USER:
                    raise ClickHouseError(495, "ACCESS_STORAGE_READONLY",
                                          "user `default`: Cannot update user `default` in users_xml because this "
                                          "storage is readonly")
                target = self._users.get(name)
                if target is None:
                    if if_exists:
                        continue
                    raise ClickHouseError(192, "UNKNOWN_USER", f"There is no user `{name}` in user directories")
                if auth is not None:
                    target.auth, target.password_hash, target.salt = auth
                if " DROP ALL SETTINGS" in sql:
                    target.settings = {}
                if add:
                    target.settings.update(self._parse_settings(add.group(1)))
            self._save()

    def _drop_user(self, user: User, sql: str) -> None:
        self._require(user, "DROP USER")
        match = re.match(r"DROP USER (IF EXISTS )?(.+?)(?= ON CLUSTER |$)", sql)
        if not match:
            raise ClickHouseError(62, "SYNTAX_ERROR", f"Cannot parse {sql[:80]}")
        with self._lock:
            for name in self._names(match.group(2)):
                if name == DEFAULT_USER:
                    raise ClickHouseError(495, "ACCESS_STORAGE_READONLY",
                                          "user `default`: Cannot remove user `default` from users_xml because this "
                                          "storage is readonly")
                if name not in self._users:
                    if match.group(1):
                        continue
                    raise ClickHouseError(192, "UNKNOWN_USER", f"There is no user `{name}` in user directories")
                del self._users[name]
            self._save()

    @staticmethod
    def _parse_elements(text: str, current_database: str) -> list[tuple[str, str | None, str | None]]:
        """`SELECT, INSERT ON db.t, ALTER ON db.*` -> [(privilege, database, table), ...]."""
        elements = []
        for match in re.finditer(r"(.+?) ON ((?:`[^`]*`|[^\s,`])+)(?:, |$)", text):
            privileges, target = match.group(1), match.group(2).replace("`", "")
            if "(" in privileges:
                raise ClickHouseError(48, "NOT_IMPLEMENTED", "Column-level grants are not supported by chserver")
            names = [p.strip().upper() for p in privileges.split(", ")]
            if target == "*.*" or (target == "*" and all(_ALIASES.get(n, n) in _GLOBAL_ONLY for n in names)):
                # The engine prints global-only privileges as `ON *`.
                database, table = None, None
            elif "." in target:
                database, table = target.split(".", 1)
                table = None if table == "*" else table
            else:
                database, table = current_database, None if target == "*" else target
            for privilege in privileges.split(", "):
                privilege = _ALIASES.get(privilege.strip().upper(), privilege.strip().upper())
                if privilege in _GLOBAL_ONLY and database is not None:
                    raise ClickHouseError(
                        36, "BAD_ARGUMENTS", f"The privilege {privilege} can only be granted on *.*"
                    )
                elements.append((privilege, database, table))
        if not elements:
            raise ClickHouseError(62, "SYNTAX_ERROR", f"Cannot parse the privileges in {text[:80]}")
        return elements

    def _grant(self, user: User, sql: str, current_database: str) -> None:
        match = re.match(r"GRANT (?:ON CLUSTER \S+ )?(.+) TO (.+?)((?: WITH (?:GRANT|REPLACE) OPTION)*)$", sql)
        if not match:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", f"Not supported by chserver (roles?): {sql[:80]}")
        elements = self._parse_elements(match.group(1), current_database)
        grant_option = "WITH GRANT OPTION" in match.group(3)
        replace = "WITH REPLACE OPTION" in match.group(3)
        for privilege, database, table in elements:
            if not user.has(privilege, database, table, grant_option=True):
                target = "*.*" if database is None else f"{database}.{table or '*'}"
                raise grant_option_denied(user.name, privilege, target)
        with self._lock:
            for name in self._names(match.group(2)):
                grantee = self._users.get(name)
                if grantee is None:
                    raise ClickHouseError(511, "UNKNOWN_ROLE", f"There is no role `{name}` in user directories")
                if name == DEFAULT_USER:
                    raise ClickHouseError(495, "ACCESS_STORAGE_READONLY",
                                          "user `default`: Cannot update user `default` in users_xml because this "
                                          "storage is readonly")
                grants = [] if replace else list(grantee.grants)
                for privilege, database, table in elements:
                    old = next((g for g in grants if (g.privilege, g.database, g.table) == (privilege, database, table)),
                               None)
                    option = grant_option or (old is not None and old.grant_option)
                    grants = [g for g in grants if g is not old]
                    grants.append(Grant(privilege, database, table, option))
                grantee.grants = grants
            self._save()

    def _revoke(self, user: User, sql: str, current_database: str) -> None:
        match = re.match(r"REVOKE (?:ON CLUSTER \S+ )?(GRANT OPTION FOR )?(.+) FROM (.+)$", sql)
        if not match:
            raise ClickHouseError(48, "NOT_IMPLEMENTED", f"Not supported by chserver (roles?): {sql[:80]}")
        elements = self._parse_elements(match.group(2), current_database)
        for privilege, database, table in elements:
            if not user.has(privilege, database, table, grant_option=True):
                target = "*.*" if database is None else f"{database}.{table or '*'}"
                raise grant_option_denied(user.name, privilege, target)
        with self._lock:
            for name in self._names(match.group(3)):
                grantee = self._users.get(name)
                if grantee is None:
                    raise ClickHouseError(511, "UNKNOWN_ROLE", f"There is no role `{name}` in user directories")
                kept = []
                for grant in grantee.grants:
                    revoked = False
                    for privilege, database, table in elements:
                        wider_target = database is None or (
                            grant.database == database and (table is None or grant.table == table))
                        if implies(privilege, grant.privilege) and wider_target:
                            revoked = True
                        elif (implies(grant.privilege, privilege) or implies(privilege, grant.privilege)) and (
                                grant.covers(database, table) or wider_target):
                            raise ClickHouseError(48, "NOT_IMPLEMENTED",
                                                  "Partial revokes are not supported by chserver")
                    if revoked and match.group(1):
                        kept.append(dataclasses.replace(grant, grant_option=False))
                    elif not revoked:
                        kept.append(grant)
                grantee.grants = kept
            self._save()

    def _show_grants(self, user: User, sql: str) -> list[str]:
        match = re.match(r"SHOW GRANTS(?: FOR (.+))?$", sql)
        names = self._names(match.group(1)) if match and match.group(1) else [user.name]
        if names != [user.name]:
            self._require(user, "SHOW USERS")
        lines = []
        with self._lock:
            for name in names:
                target = self._users.get(name)
                if target is None:
                    raise ClickHouseError(511, "UNKNOWN_ROLE", f"There is no role `{name}` in user directories")
                by_target: dict[tuple[str, bool], list[str]] = {}
                for grant in target.grants:
                    by_target.setdefault((grant.target(), grant.grant_option), []).append(grant.privilege)
                for (target_text, option), privileges in by_target.items():
                    suffix = " WITH GRANT OPTION" if option else ""
                    lines.append(f"GRANT {', '.join(privileges)} ON {target_text} TO {name}{suffix}")
        return lines


# --- what a statement needs --------------------------------------------------------------

_TOP_WITH_TARGET = re.compile(r"^(\w+Query) ?(\S*) (\S*)")


def required_privileges(kind: str, sql: str, ast: str, current_database: str) -> list[tuple[str, str | None, str | None]]:
    """The privileges a (non-access) statement needs, from its kind and the engine's `EXPLAIN AST`."""
    lines = ast.splitlines()
    top = lines[0].strip() if lines else ""
    ctes = set(_CTE_NAME.findall(sql))
    needs: list[tuple[str, str | None, str | None]] = []

    def qualified(name: str) -> tuple[str, str]:
        name = name.replace("`", "")
        if "." in name:
            database, table = name.split(".", 1)
            return database, table
        return current_database, name

    # Tables read anywhere in the statement (SELECT parts, subqueries, INSERT ... SELECT).
    previous = ""
    for line in lines:
        text = line.strip()
        if text.startswith("TableIdentifier "):
            name = text.split()[1]
            if "." not in name and name in ctes:
                continue
            needs.append(("SELECT", *qualified(name)))
        elif text.startswith("Function ") and previous == "TableExpression":
            needs.append(("CREATE TEMPORARY TABLE", None, None))
        previous = text.split(" (")[0]

    def top_target() -> tuple[str, str]:
        # `DropQuery db t`, `DropQuery  t` (no database), `DropQuery db ` (a database).
        match = re.match(r"^\w+ (\S*) (\S*)", top + " ")
        database, table = (match.group(1), match.group(2)) if match else ("", "")
        return database or current_database, table

    upper = kind.upper()
    if upper == "INSERT":
        identifiers = []
        for line in lines[1:]:
            if line.startswith(" Identifier "):
                identifiers.append(line.split()[1])
            elif not line.startswith("  "):
                break
        if len(identifiers) >= 2:
            needs.insert(0, ("INSERT", identifiers[0], identifiers[1]))
        elif identifiers:
            needs.insert(0, ("INSERT", current_database, identifiers[0]))
        else:  # INSERT INTO FUNCTION ...
            needs.insert(0, ("CREATE TEMPORARY TABLE", None, None))
    elif upper in ("CREATE", "ATTACH", "REPLACE"):
        database, table = top_target()
        if not table:
            needs.insert(0, ("CREATE DATABASE", database, None))
        elif re.match(r"\s*(CREATE|ATTACH)\s+(OR\s+REPLACE\s+)?(MATERIALIZED\s+|LIVE\s+|WINDOW\s+)?VIEW\b", sql, re.I):
            needs = [("CREATE VIEW", database, table)]  # a view's query runs as its definer
        elif re.match(r"\s*(CREATE|ATTACH)\s+(OR\s+REPLACE\s+)?DICTIONARY\b", sql, re.I):
            needs.insert(0, ("CREATE DICTIONARY", database, table))
        elif re.match(r"\s*CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\b", sql, re.I):
            needs = [("CREATE FUNCTION", None, None)]
        elif re.match(r"\s*CREATE\s+TEMPORARY\s+TABLE\b", sql, re.I):
            needs.insert(0, ("CREATE TEMPORARY TABLE", None, None))
        else:
            needs.insert(0, ("CREATE TABLE", database, table))
    elif upper in ("DROP", "DETACH", "UNDROP"):
        database, table = top_target()
        if top.startswith("DropQuery") and not table:
            needs.insert(0, ("DROP DATABASE", database, None))
        elif re.match(r"\s*(DROP|DETACH)\s+VIEW\b", sql, re.I):
            needs.insert(0, ("DROP VIEW", database, table))
        elif re.match(r"\s*(DROP|DETACH)\s+DICTIONARY\b", sql, re.I):
            needs.insert(0, ("DROP DICTIONARY", database, table))
        elif re.match(r"\s*DROP\s+FUNCTION\b", sql, re.I):
            needs = [("DROP FUNCTION", None, None)]
        else:
            needs.insert(0, ("DROP TABLE", database, table))
    elif upper == "TRUNCATE":
        needs.insert(0, ("TRUNCATE", *top_target()))
    elif upper == "OPTIMIZE":
        database, table = top_target()
        needs.insert(0, ("OPTIMIZE", database, table.removesuffix("_final")))
    elif upper == "ALTER":
        needs.insert(0, ("ALTER", *top_target()))
    elif upper in ("RENAME", "EXCHANGE"):
        identifiers = [line.split()[1] for line in lines[1:] if line.startswith(" Identifier ")]
        for source, target in zip(identifiers[0::4], identifiers[1::4]):
            needs += [("ALTER", source, target), ("DROP TABLE", source, target)]
        for database, table in zip(identifiers[2::4], identifiers[3::4]):
            needs.append(("CREATE TABLE", database, table))
    elif upper == "SYSTEM":
        needs.insert(0, ("SYSTEM", None, None))
    elif upper == "KILL":
        needs.insert(0, ("KILL QUERY", None, None))
    elif upper in ("DESCRIBE", "DESC"):
        needs = [("SHOW COLUMNS", d, t) for _, d, t in needs if t] or needs
    elif upper == "SHOW":
        if top.startswith("ShowCreate"):
            needs.insert(0, ("SHOW COLUMNS", *top_target()))
        elif top.startswith("ShowTables"):
            needs = needs  # rows are not filtered by access here (README)
    elif upper == "EXISTS":
        pass  # answers only whether the user could see it
    elif upper not in ("SELECT", "WITH", "EXPLAIN", "SET", "USE", ""):
        raise ClickHouseError(48, "NOT_IMPLEMENTED",
                              f"chserver cannot check privileges for {upper} statements; run them as `default`")
    return needs
