"""ClickHouse's compressed-block framing (`decompress=1` / `compress=1`) and HTTP encodings.

A block on the wire:

    checksum: 16 bytes  CityHash128 v1.0.2 of everything below, as (low u64 LE, high u64 LE)
    method:    1 byte   0x82 LZ4, 0x02 none, 0x90 ZSTD
    size:      u32 LE   compressed size including this 9-byte header
    raw_size:  u32 LE   uncompressed size
    data:      size - 9 bytes
"""

from __future__ import annotations

import struct
import zlib

import lz4.block
import lz4.frame
import zstandard
from clickhouse_cityhash.cityhash import CityHash128

from .errors import ClickHouseError

METHOD_NONE = 0x02
METHOD_LZ4 = 0x82
METHOD_ZSTD = 0x90

CHECKSUM_SIZE = 16
HEADER_SIZE = 9
# ClickHouse refuses blocks above 1 GiB (`TOO_LARGE_SIZE_COMPRESSED`).
MAX_BLOCK_SIZE = 1 << 30
# ClickHouse's max_compress_block_size: size of blocks we emit for `compress=1`.
OUTPUT_BLOCK_SIZE = 1 << 20

_U64 = (1 << 64) - 1


def checksum(header_and_data: bytes | memoryview) -> bytes:
    value = CityHash128(bytes(header_and_data))
    # The library returns `first << 64 | second`; ClickHouse stores `first` then `second`.
    return struct.pack("<QQ", value >> 64, value & _U64)


def encode_block(data: bytes | memoryview, method: int = METHOD_LZ4) -> bytes:
    if method == METHOD_LZ4:
        payload = lz4.block.compress(bytes(data), store_size=False)
    elif method == METHOD_ZSTD:
        payload = zstandard.ZstdCompressor(level=1).compress(bytes(data))
    elif method == METHOD_NONE:
        payload = bytes(data)
    else:
        raise ValueError(f"unknown compression method {method:#x}")
    header = struct.pack("<BII", method, HEADER_SIZE + len(payload), len(data))
    return checksum(header + payload) + header + payload


def encode_blocks(data: bytes | memoryview, method: int = METHOD_LZ4) -> bytes:
    view = memoryview(data)
    if not len(view):
        return b""
    return b"".join(
        encode_block(view[i : i + OUTPUT_BLOCK_SIZE], method)
        for i in range(0, len(view), OUTPUT_BLOCK_SIZE)
    )


def decode_block(meta: bytes, payload: bytes) -> bytes:
    """Verifies and decompresses one block; `meta` is checksum + 9-byte header."""
    expected = meta[:CHECKSUM_SIZE]
    header = meta[CHECKSUM_SIZE:]
    actual = checksum(header + payload)
    if actual != expected:
        ref = struct.unpack("<QQ", expected)
        got = struct.unpack("<QQ", actual)
        raise ClickHouseError(
            40,
            "CHECKSUM_DOESNT_MATCH",
            f"Checksum doesn't match: corrupted data. Reference: {ref[0]:016x}{ref[1]:016x}. "
            f"Actual: {got[0]:016x}{got[1]:016x}. Size of compressed block: {len(header) + len(payload)}",
        )
    method, _size, raw_size = struct.unpack("<BII", header)
    try:
        if method == METHOD_LZ4:
            data = lz4.block.decompress(payload, uncompressed_size=raw_size)
        elif method == METHOD_ZSTD:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_size)
        elif method == METHOD_NONE:
            data = payload
        else:
            raise ClickHouseError(
                89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown compression method: {method}"
            )
    except ClickHouseError:
        raise
    except Exception as err:  # lz4/zstd raise their own error types
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"Cannot decompress: {err}") from err
    if len(data) != raw_size:
        raise ClickHouseError(
            271,
            "CANNOT_DECOMPRESS",
            f"Cannot decompress: decompressed size {len(data)} differs from declared {raw_size}",
        )
    return data


class BlockDecoder:
    """Reads `decompress=1` blocks from a byte source; `read()` returns one block's data."""

    def __init__(self, source):
        self.source = source

    def read(self) -> bytes:
        meta = self.source.read_exact(CHECKSUM_SIZE + HEADER_SIZE, allow_eof=True)
        if not meta:
            return b""
        _method, size, raw_size = struct.unpack_from("<BII", meta, CHECKSUM_SIZE)
        if size < HEADER_SIZE or size > MAX_BLOCK_SIZE or raw_size > MAX_BLOCK_SIZE:
            raise ClickHouseError(
                246,
                "TOO_LARGE_SIZE_COMPRESSED",
                f"Too large size_compressed_without_checksum: {size}. Most likely corrupted data.",
            )
        payload = self.source.read_exact(size - HEADER_SIZE)
        return decode_block(meta, payload)


# --- HTTP Content-Encoding ------------------------------------------------------------

SUPPORTED_ENCODINGS = ("gzip", "deflate", "zstd", "lz4")


def choose_encoding(accept_encoding: str | None) -> str | None:
    """Picks the first encoding of the client's list that we can produce."""
    if not accept_encoding:
        return None
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if params.replace(" ", "") in ("q=0", "q=0.0"):
            continue
        if name in SUPPORTED_ENCODINGS:
            return name
    return None


def encode_http(data: bytes, encoding: str, level: int = 3) -> bytes:
    if encoding == "gzip":
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        return compressor.compress(data) + compressor.flush()
    if encoding == "deflate":
        return zlib.compress(data, level)
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    if encoding == "lz4":
        return lz4.frame.compress(data)
    raise ValueError(encoding)


class HttpDecoder:
    """Streaming decoder for a request's Content-Encoding."""

    def __init__(self, source, encoding: str):
        self.source = source
        self.done = False
        if encoding == "gzip":
            self._decoder = zlib.decompressobj(31)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj(15)
        elif encoding == "zstd":
            self._decoder = zstandard.ZstdDecompressor().decompressobj()
        elif encoding == "lz4":
            self._decoder = lz4.frame.LZ4FrameDecompressor()
        else:
            raise ClickHouseError(
                89, "UNKNOWN_COMPRESSION_METHOD", f"Unknown Content-Encoding of HTTP request: {encoding}"
            )

    def read(self) -> bytes:
        while not self.done:
            chunk = self.source.read()
            if not chunk:
                self.done = True
                flush = getattr(self._decoder, "flush", None)
                return flush() if flush else b""
            try:
                out = self._decoder.decompress(chunk)
            except Exception as err:
                raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"Cannot decompress request body: {err}") from err
            if out:
                return out
        return b""
