"""ClickHouse exceptions as the HTTP interface reports them."""

from __future__ import annotations

import re

# Filled in at startup from the engine's `version()`.
ENGINE_VERSION = "26.9"

# src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, keyed by error name.
_STATUS_BY_NAME = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        ["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"],
        403,
    ),
    **dict.fromkeys(
        [
            "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
            "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        ],
        400,
    ),
    **dict.fromkeys(
        [
            "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING", "UNKNOWN_AGGREGATE_FUNCTION",
            "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE",
        ],
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_CODE_PREFIX = re.compile(r"^Code: (\d+)\. DB::Exception: ")
_NAME_SUFFIX = re.compile(r"\s*\(([A-Z][A-Z0-9_]+)\)$")
_VERSION_SUFFIX = re.compile(r"\s*\(version [0-9.]+(?: \([^()]*\))?\)\.?$")
# What the engine adds to errors of `INSERT ... FROM INFILE '/dev/fd/N'` (how chserver feeds
# request bodies); a real server reading the HTTP body says neither.
_INFILE_CONTEXT = re.compile(
    r": \(in file/uri /dev/fd/\d+\)|While reading from: /dev/fd/\d+|"
    r": While executing File: data for INSERT was parsed from file\.?"
)


class ClickHouseError(Exception):
    def __init__(self, code: int, name: str, message: str):
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    @property
    def http_status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)

    def body(self) -> bytes:
        return (
            f"Code: {self.code}. DB::Exception: {self.message} ({self.name}) "
            f"(version {ENGINE_VERSION} (official build))\n"
        ).encode()

    def without_infile_context(self) -> "ClickHouseError":
        return ClickHouseError(self.code, self.name, _INFILE_CONTEXT.sub("", self.message))

    @classmethod
    def from_engine(cls, text: str) -> "ClickHouseError":
        """Parses chdb's exception text, e.g. `Code: 60. DB::Exception: ... (UNKNOWN_TABLE)`.

        chdb sometimes nests the message (`Code: 72. DB::Exception: Code: 72. ... (version x). (NAME)`);
        the nesting and version tags are stripped so the body looks like the real server's.
        """
        text = text.strip()
        match = _CODE_PREFIX.match(text)
        if not match:
            return cls(1001, "STD_EXCEPTION", text)
        code = int(match.group(1))
        name = None
        while True:
            match = _CODE_PREFIX.match(text)
            if not match:
                break
            text = text[match.end() :]
        while True:
            match = _NAME_SUFFIX.search(text)
            if match:
                name = name or match.group(1)
                text = text[: match.start()]
                continue
            match = _VERSION_SUFFIX.search(text)
            if match:
                text = text[: match.start()]
                continue
            break
        return cls(code, name or "UNKNOWN_EXCEPTION", text)
