"""Request body streams: HTTP framing (Content-Length / chunked) and a size limit."""

from __future__ import annotations

from .errors import ClickHouseError

READ_SIZE = 1 << 20


def too_large(limit: int) -> ClickHouseError:
    return ClickHouseError(
        393,
        "QUERY_IS_TOO_LARGE",
        f"Request body is larger than the server limit of {limit} bytes (--max-body-bytes)",
    )


class RequestBody:
    """Reads the body off the socket in chunks; `read()` returns b"" at the end."""

    def __init__(self, rfile, content_length: int | None, chunked: bool, limit: int):
        self.rfile = rfile
        self.remaining = content_length
        self.chunked = chunked
        self.limit = limit
        self.received = 0
        self.eof = not chunked and not content_length
        self._chunk_left = 0
        if content_length is not None and content_length > limit:
            raise too_large(limit)

    def read(self) -> bytes:
        if self.eof:
            return b""
        if self.chunked:
            data = self._read_chunked()
        else:
            data = self.rfile.read(min(READ_SIZE, self.remaining))
            if not data:
                raise ClickHouseError(
                    33, "CANNOT_READ_ALL_DATA", "Unexpected end of request body: the client closed the connection"
                )
            self.remaining -= len(data)
            self.eof = self.remaining == 0
        self.received += len(data)
        if self.received > self.limit:
            raise too_large(self.limit)
        return data

    def _read_chunked(self) -> bytes:
        if self._chunk_left == 0:
            line = self.rfile.readline(1024)
            if not line:
                raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Unexpected end of chunked request body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ClickHouseError(
                    27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", f"Invalid chunk size line in request body: {line!r}"
                ) from None
            if size == 0:
                # Trailer section ends with an empty line.
                while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass
                self.eof = True
                return b""
            self._chunk_left = size
        data = self.rfile.read(min(READ_SIZE, self._chunk_left))
        if not data:
            raise ClickHouseError(33, "CANNOT_READ_ALL_DATA", "Unexpected end of chunked request body")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self.rfile.readline(16)  # CRLF after the chunk data
        return data

    def drain(self, budget: int) -> bool:
        """Discards up to `budget` bytes of unread body; True if the body was fully read."""
        try:
            while not self.eof and budget > 0:
                budget -= len(self.read())
        except ClickHouseError:
            return False
        return self.eof


class ByteStream:
    """Adds exact reads and push-back over a chunk source (anything with `read()`)."""

    def __init__(self, source, prefix: bytes = b""):
        self.source = source
        self._buffer = bytearray(prefix)
        self._eof = False

    def read(self) -> bytes:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        if self._eof:
            return b""
        data = self.source.read()
        if not data:
            self._eof = True
        return data

    def read_exact(self, size: int, allow_eof: bool = False) -> bytes:
        while len(self._buffer) < size and not self._eof:
            data = self.source.read()
            if not data:
                self._eof = True
                break
            self._buffer += data
        if len(self._buffer) < size:
            if allow_eof and not self._buffer:
                return b""
            raise ClickHouseError(
                33,
                "CANNOT_READ_ALL_DATA",
                f"Cannot read all data. Bytes read: {len(self._buffer)}. Bytes expected: {size}.",
            )
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            data = self.read()
            if not data:
                return bytes(out)
            out += data
            if len(out) > limit:
                raise too_large(limit)

    def chunks(self, min_size: int = 1 << 20):
        """Yields the rest of the stream in chunks of at least `min_size` (except the last)."""
        pending = bytearray()
        while True:
            data = self.read()
            if not data:
                break
            if not pending and len(data) >= min_size:
                yield data
                continue
            pending += data
            if len(pending) >= min_size:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)
