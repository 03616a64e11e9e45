"""Recordings: remote-write requests kept verbatim, with their arrival time, in one append-only file.

Layout: an 8-byte magic, then records of a 20-byte header (body length, CRC-32 of the rest of the
header and the body, arrival time in ns, protocol version) and the body exactly as it arrived
(snappy-compressed protobuf). A record is written by one `write` call, so `kill -9` leaves at most
one torn record at the tail; readers stop there and say how many bytes they skipped. Files ending
in `.xz` (how data sets are committed) are read transparently.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from detectord.errors import DetectordError, RemoteWriteError
from detectord.ingest.remote_write import PROTO_V1, PROTO_V2, DecodedWrite, LabelCache, Version, decode

MAGIC = b"DRECv001"
_HEADER = struct.Struct("<IIqB3x")  # body length, crc32, arrival ns, version code
_VERSION_CODES: dict[Version, int] = {"1.0": 1, "2.0": 2}
_VERSIONS: dict[int, Version] = {v: k for k, v in _VERSION_CODES.items()}
CONTENT_TYPES: dict[Version, str] = {
    "1.0": f"application/x-protobuf;proto={PROTO_V1}",
    "2.0": f"application/x-protobuf;proto={PROTO_V2}",
}
# A body larger than this in a header is a torn or corrupt header, not a record.
MAX_RECORD_BYTES = 1 << 30


class RecordingError(DetectordError):
    """A file that is not a recording (bad magic) or cannot be opened for appending."""


@dataclass(frozen=True, slots=True)
class Record:
    arrival_ns: int
    version: Version
    body: bytes  # as received: snappy-compressed protobuf

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.version]


@dataclass(slots=True)
class ReadStats:
    records: int = 0
    body_bytes: int = 0
    # Bytes after the last whole record: a torn tail (the writer was killed mid-record).
    torn_bytes: int = 0


def _pack(arrival_ns: int, version: Version, body: bytes) -> bytes:
    code = _VERSION_CODES[version]
    rest = struct.pack("<qB3x", arrival_ns, code)
    crc = zlib.crc32(body, zlib.crc32(rest))
    return _HEADER.pack(len(body), crc, arrival_ns, code) + body


def _open_read(path: Path) -> BinaryIO:
    if path.suffix == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]  # an LZMAFile reads like a binary file
    return open(path, "rb")


def read_records(path: str | Path, stats: ReadStats | None = None) -> Iterator[Record]:
    """Every whole record in order; a torn or corrupt tail ends the iteration (see stats.torn_bytes)."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    with _open_read(path) as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                stats.torn_bytes = len(magic)
                return
            raise RecordingError(f"{path}: not a detectord recording (magic {magic!r}, want {MAGIC!r})")
        while True:
            header = f.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                stats.torn_bytes = len(header)
                return
            length, crc, arrival_ns, code = _HEADER.unpack(header)
            body = f.read(length) if length <= MAX_RECORD_BYTES and code in _VERSIONS else b""
            if len(body) != length or zlib.crc32(body, zlib.crc32(header[8:])) != crc:
                stats.torn_bytes = len(header) + len(body) + len(f.read())
                return
            stats.records += 1
            stats.body_bytes += length
            yield Record(arrival_ns, _VERSIONS[code], body)


def valid_length(path: Path) -> int:
    """Bytes of `path` up to the end of its last whole record (the magic alone if it has none)."""
    stats = ReadStats()
    for _ in read_records(path, stats):
        pass
    return path.stat().st_size - stats.torn_bytes


class RecordingWriter:
    """Appends records to a recording; reopening one first cuts off a torn tail. Thread-safe.

    Each record reaches the OS in one write (so a killed process loses at most the record being
    written); `fsync_interval` bounds what a power loss can take.
    """

    def __init__(self, path: str | Path, *, fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        if self.path.suffix == ".xz":
            raise RecordingError(f"{self.path}: cannot append to a compressed recording")
        self.fsync_interval = fsync_interval
        self.truncated_bytes = 0
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                os.write(self._fd, MAGIC)
            else:
                good = valid_length(self.path)
                if good < len(MAGIC):
                    os.ftruncate(self._fd, 0)
                    os.write(self._fd, MAGIC)
                elif good < size:
                    os.ftruncate(self._fd, good)
                self.truncated_bytes = size - good
            os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        self._last_sync = time.monotonic()
        self.records = 0
        self.bytes = os.fstat(self._fd).st_size

    def append(self, body: bytes, version: Version, arrival_ns: int | None = None) -> None:
        data = _pack(time.time_ns() if arrival_ns is None else arrival_ns, version, body)
        with self._lock:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.records += 1
            self.bytes += len(data)
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(self._fd)
                self._last_sync = now

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class DecodeStats:
    requests: int = 0
    samples: int = 0
    # Requests a receiver would have refused (corrupt snappy or protobuf): skipped, counted.
    bad_requests: int = 0
    first_error: str | None = None


def read_writes(
    path: str | Path,
    cache: LabelCache,
    *,
    read_stats: ReadStats | None = None,
    decode_stats: DecodeStats | None = None,
    max_decoded: int = MAX_RECORD_BYTES,
) -> Iterator[tuple[Record, DecodedWrite]]:
    """Each record decoded exactly as `serve` decodes a request body."""
    ds = decode_stats if decode_stats is not None else DecodeStats()
    for rec in read_records(path, read_stats):
        ds.requests += 1
        try:
            write = decode(rec.body, rec.version, cache, max_decoded=max_decoded)
        except RemoteWriteError as exc:
            ds.bad_requests += 1
            ds.first_error = ds.first_error or str(exc)
            continue
        ds.samples += write.samples
        yield rec, write
