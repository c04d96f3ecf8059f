"""Just enough of ClickHouse's SQL lexer to route an HTTP request.

The dev server never rewrites user SQL. It only needs to know:
  * what kind of statement a request carries (SELECT, INSERT, SET, ...),
  * for `INSERT ... FORMAT <fmt>`: where the query text ends and the data begins, and where
    its `SETTINGS` clause starts (the engine wants `FROM INFILE` before it),
  * for other statements: the output `FORMAT` clause, if any (for response headers).

The scanner stops right after an INSERT's format name, so binary data that follows is
never looked at.
"""

from __future__ import annotations

import dataclasses

# Statement kinds that read data; counted as "selects" in /dev/stats.
READ_KINDS = frozenset({"SELECT", "WITH", "EXPLAIN", "SHOW", "DESCRIBE", "DESC", "EXISTS"})


@dataclasses.dataclass
class Statement:
    kind: str  # upper-cased first keyword, "SELECT" for "(SELECT ...)", "" if empty
    # For INSERT ... FORMAT: the text before the FORMAT keyword, split into the target
    # (`INSERT INTO t (a, b) `) and the `SETTINGS ...` clause ("" if none), and the format name.
    insert_target: str | None = None
    insert_settings: str = ""
    insert_format: str | None = None
    # Byte offset in the scanned buffer where INSERT data starts (None: no data part).
    data_offset: int | None = None
    # True when the scan hit the end of the buffer before it could decide `data_offset`;
    # the caller should supply more bytes if it has them.
    needs_more: bool = False
    # Output format named by a top-level `FORMAT x` clause of a non-INSERT statement.
    output_format: str | None = None

    @property
    def is_insert_with_data(self) -> bool:
        return self.insert_format is not None

    @property
    def insert_prefix(self) -> str:
        return (self.insert_target or "") + self.insert_settings


class _Lexer:
    """Yields (kind, start, end) tokens; kinds: word, quoted, string, number, punct."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.truncated = False  # a token (string, comment) ran into the end of the text

    def next(self):
        text, n = self.text, len(self.text)
        i = self.pos
        while i < n:
            c = text[i]
            if c in " \t\r\n\f\v":
                i += 1
            elif text.startswith("--", i) or c == "#":
                j = text.find("\n", i)
                if j < 0:
                    self.truncated = True
                    i = n
                else:
                    i = j + 1
            elif text.startswith("/*", i):
                # ClickHouse allows nested block comments.
                depth, i = 1, i + 2
                while i < n and depth:
                    if text.startswith("/*", i):
                        depth, i = depth + 1, i + 2
                    elif text.startswith("*/", i):
                        depth, i = depth - 1, i + 2
                    else:
                        i += 1
                if depth:
                    self.truncated = True
            else:
                break
        if i >= n:
            self.pos = n
            return None
        start, c = i, text[i]
        if c.isalpha() or c == "_":
            i += 1
            while i < n and (text[i].isalnum() or text[i] in "_$"):
                i += 1
            kind = "word"
        elif c in "'`\"":
            i = self._skip_quoted(i, c)
            kind = "string" if c == "'" else "quoted"
        elif c.isdigit():
            i += 1
            while i < n and (text[i].isalnum() or text[i] in "._"):
                i += 1
            kind = "number"
        else:
            i += 1
            kind = "punct"
        self.pos = i
        return kind, start, i

    def _skip_quoted(self, i: int, quote: str) -> int:
        text, n = self.text, len(self.text)
        i += 1
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
            elif c == quote:
                if i + 1 < n and text[i + 1] == quote:  # doubled quote
                    i += 2
                else:
                    return i + 1
            else:
                i += 1
        self.truncated = True
        return n


def _data_start(text: str, i: int) -> int:
    """ClickHouse's rule: after the format name skip blanks, then at most one line break."""
    n = len(text)
    while i < n and text[i] in " \t\f":
        i += 1
    if i < n and text[i] == "\r":
        i += 1
    if i < n and text[i] == "\n":
        i += 1
    return i


def scan(buffer: bytes | str, complete: bool = True) -> Statement:
    """Classifies the statement at the start of `buffer`.

    `complete` tells whether `buffer` is the whole request text; when it is only a head
    of a longer body the result may say `needs_more`.
    """
    # latin-1 keeps byte offsets equal to character offsets.
    text = buffer.decode("latin-1") if isinstance(buffer, (bytes, bytearray, memoryview)) else buffer
    lexer = _Lexer(text)
    first = lexer.next()
    if first is None:
        return Statement(kind="", needs_more=not complete)
    kind_name, start, end = first
    if kind_name == "punct" and text[start] == "(":
        kind = "SELECT"
    else:
        kind = text[start:end].upper()
    if kind == "INSERT":
        return _scan_insert(text, lexer, complete)
    return Statement(kind=kind, output_format=_output_format(lexer, text))


def _scan_insert(text: str, lexer: _Lexer, complete: bool) -> Statement:
    depth = 0
    previous_word = ""
    expect_table = False
    after_table_name = False
    settings_start = None
    while True:
        token = lexer.next()
        if token is None:
            return Statement(kind="INSERT", needs_more=not complete)
        kind, start, end = token
        value = text[start:end]
        upper = value.upper() if kind == "word" else ""
        if kind == "punct":
            # Brackets, and braces of `{name:Type}` query parameters, hide their contents.
            if value in "({":
                depth += 1
            elif value in ")}":
                depth -= 1
            if depth:
                continue
            if value == "}" and expect_table:
                # `{table:Identifier}` stands for the name.
                expect_table, after_table_name = False, True
            elif value == "." and after_table_name:
                # `db.table`: the word after the dot is still the table name.
                expect_table, after_table_name = True, False
            else:
                expect_table = after_table_name = False
            continue
        if depth:
            continue
        if expect_table:
            # The table name may itself be a keyword such as `format` or `settings`.
            if upper not in ("TABLE", "FUNCTION"):
                expect_table = False
                after_table_name = True
            previous_word = upper
            continue
        after_table_name = False
        if upper == "INTO":
            expect_table = True
        elif upper in ("SELECT", "WITH") or (upper == "INFILE" and previous_word == "FROM"):
            # INSERT ... SELECT and INSERT ... FROM INFILE carry no data in the request.
            return Statement(kind="INSERT", output_format=None)
        elif upper == "VALUES":
            return Statement(kind="INSERT")
        elif upper == "SETTINGS" and settings_start is None:
            settings_start = start
        elif upper == "FORMAT":
            name = lexer.next()
            if name is None:
                return Statement(kind="INSERT", needs_more=not complete)
            name_kind, name_start, name_end = name
            if name_kind not in ("word", "quoted"):
                return Statement(kind="INSERT")
            if name_end >= len(text) and not complete:
                return Statement(kind="INSERT", needs_more=True)
            offset = _data_start(text, name_end)
            if offset >= len(text) and not complete and offset - name_end < 2:
                # The line break that ends the query may still be on its way.
                return Statement(kind="INSERT", needs_more=True)
            fmt = text[name_start:name_end].strip("`\"")
            target_end = start if settings_start is None else settings_start
            return Statement(
                kind="INSERT",
                insert_target=_utf8(text[:target_end]),
                insert_settings=_utf8(text[target_end:start]),
                insert_format=fmt,
                data_offset=offset,
            )
        previous_word = upper


def _utf8(latin1_text: str) -> str:
    return latin1_text.encode("latin-1").decode("utf-8", "replace")


def _output_format(lexer: _Lexer, text: str) -> str | None:
    """Returns the name of the last top-level `FORMAT name` clause, if any."""
    depth = 0
    found = None
    while True:
        token = lexer.next()
        if token is None:
            return found
        kind, start, end = token
        value = text[start:end]
        if kind == "punct":
            depth += value == "("
            depth -= value == ")"
        elif kind == "word" and depth == 0 and value.upper() == "FORMAT":
            name = lexer.next()
            if name is not None and name[0] in ("word", "quoted"):
                found = text[name[1] : name[2]].strip("`\"")
