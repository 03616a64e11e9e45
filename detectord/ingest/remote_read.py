"""Prometheus remote read: raw samples back from Prometheus, Cortex, Mimir or Thanos, as SAMPLES or XOR chunks.

Selectors, requests, responses and XOR chunks decode in pure functions; `RemoteReadClient` runs them off the loop.
"""

from __future__ import annotations

import asyncio
import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Literal

import aiohttp
import cramjam
import google_crc32c
import numpy as np
from google.protobuf.message import DecodeError

from detectord import __version__
from detectord.errors import RemoteReadError
from detectord.ingest._proto import remote_read_pb2 as pbr
from detectord.ingest.remote_write import DecodedWrite, LabelCache, Labels

MatchType = Literal["=", "!=", "=~", "!~"]
ResponseType = Literal["STREAMED_XOR_CHUNKS", "SAMPLES"]

_MATCH_TYPES: dict[str, int] = {
    "=": pbr.LabelMatcher.EQ,
    "!=": pbr.LabelMatcher.NEQ,
    "=~": pbr.LabelMatcher.RE,
    "!~": pbr.LabelMatcher.NRE,
}
_RESPONSE_TYPES: dict[str, int] = {
    "SAMPLES": pbr.ReadRequest.SAMPLES,
    "STREAMED_XOR_CHUNKS": pbr.ReadRequest.STREAMED_XOR_CHUNKS,
}
STREAMED_CONTENT_TYPE = "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"
REQUEST_HEADERS = {
    "Content-Type": "application/x-protobuf",
    "Content-Encoding": "snappy",
    "Accept-Encoding": "snappy",
    "X-Prometheus-Remote-Read-Version": "0.1.0",
}
# A frame longer than this is garbage, not data (Prometheus sends frames of about 1 MiB).
MAX_FRAME_BYTES = 64 << 20
# Streamed bodies go to the parser, in a worker thread, this much at a time.
FEED_BYTES = 1 << 20


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a selector; regular expressions are RE2, anchored, as in PromQL."""

    type: MatchType
    name: str
    value: str


@dataclass(slots=True)
class ReadSeries:
    """One series read back: samples sorted by timestamp (ms), stale markers kept bit for bit."""

    labels: Labels
    timestamps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


# ---- selectors ---------------------------------------------------------------------------------

_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OP = re.compile(r"=~|!~|!=|=")
_OPS: dict[str, MatchType] = {"=": "=", "!=": "!=", "=~": "=~", "!~": "!~"}
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def parse_selector(text: str) -> list[Matcher]:
    """The matchers of a PromQL series selector: `up{job="x"}`, `{__name__=~"coredns_.+"}`."""
    pos = _skip(text, 0)
    matchers: list[Matcher] = []
    name = _METRIC.match(text, pos)
    if name:
        matchers.append(Matcher("=", "__name__", name.group()))
        pos = name.end()
    pos = _skip(text, pos)
    if pos < len(text) and text[pos] == "{":
        pos += 1
        while True:
            pos = _skip(text, pos)
            if pos < len(text) and text[pos] == "}":
                pos += 1
                break
            label = _LABEL.match(text, pos)
            if not label:
                raise _bad(text, pos, "a label name")
            pos = _skip(text, label.end())
            op = _OP.match(text, pos)
            if not op:
                raise _bad(text, pos, "one of =, !=, =~, !~")
            pos = _skip(text, op.end())
            value, pos = _string(text, pos)
            if label.group() == "__name__" and name:
                raise RemoteReadError(f"bad selector {text!r}: the metric name is set twice")
            matchers.append(Matcher(_OPS[op.group()], label.group(), value))
            pos = _skip(text, pos)
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos >= len(text) or text[pos] != "}":
                raise _bad(text, pos, "',' or '}'")
    pos = _skip(text, pos)
    if pos != len(text):
        raise _bad(text, pos, "the end of the selector")
    if not matchers:
        raise RemoteReadError(f'bad selector {text!r}: it has no matchers (use e.g. up or {{job="coredns"}})')
    return matchers


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _bad(text: str, pos: int, wanted: str) -> RemoteReadError:
    found = repr(text[pos]) if pos < len(text) else "the end"
    return RemoteReadError(f"bad selector {text!r}: expected {wanted} at position {pos}, found {found}")


def _string(text: str, pos: int) -> tuple[str, int]:
    """A PromQL string literal ("...", '...' with Go escapes, or `raw`) at `pos`; its value and end."""
    if pos >= len(text) or text[pos] not in "\"'`":
        raise _bad(text, pos, "a quoted label value")
    quote = text[pos]
    out: list[str] = []
    i = pos + 1
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\" and quote != "`":
            e = text[i + 1 : i + 2]
            if e == quote or e in _ESCAPES:
                out.append(_ESCAPES.get(e, e))
                i += 2
                continue
            if e in _HEX_ESCAPES:
                digits = text[i + 2 : i + 2 + _HEX_ESCAPES[e]]
                if len(digits) == _HEX_ESCAPES[e] and all(d in "0123456789abcdefABCDEF" for d in digits):
                    out.append(chr(int(digits, 16)))
                    i += 2 + len(digits)
                    continue
            digits = text[i + 1 : i + 4]
            if len(digits) == 3 and all(d in "01234567" for d in digits):
                out.append(chr(int(digits, 8)))
                i += 4
                continue
            raise RemoteReadError(f"bad selector {text!r}: unknown escape \\{e} at position {i}")
        if c == "\n" and quote != "`":
            break
        out.append(c)
        i += 1
    raise RemoteReadError(f"bad selector {text!r}: the string at position {pos} is not closed")


# ---- requests and responses --------------------------------------------------------------------


def encode_read_request(
    start_ms: int,
    end_ms: int,
    matchers: Sequence[Matcher],
    accepted: Sequence[ResponseType] = ("STREAMED_XOR_CHUNKS", "SAMPLES"),
) -> bytes:
    """A snappy-compressed ReadRequest with one query for [start_ms, end_ms] (both inclusive)."""
    req = pbr.ReadRequest(accepted_response_types=[_RESPONSE_TYPES[a] for a in accepted])
    q = req.queries.add(start_timestamp_ms=start_ms, end_timestamp_ms=end_ms)
    for m in matchers:
        q.matchers.add(type=_MATCH_TYPES[m.type], name=m.name, value=m.value)
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


def decode_samples_response(body: bytes, start_ms: int | None = None, end_ms: int | None = None) -> list[ReadSeries]:
    """A SAMPLES answer (snappy ReadResponse) as series; samples outside [start_ms, end_ms] are dropped.

    Values are as sent, except -0.0: proto3 senders leave a zero off the wire, so it comes back 0.0."""
    try:
        data = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises several unrelated types for corrupt input
        raise RemoteReadError(f"SAMPLES response: corrupt snappy ({exc.__class__.__name__})") from None
    try:
        msg = pbr.ReadResponse.FromString(data)
    except DecodeError as exc:
        raise RemoteReadError(f"SAMPLES response: cannot parse ReadResponse: {exc}") from None
    out: dict[Labels, ReadSeries] = {}
    for result in msg.results:
        for ts in result.timeseries:
            labels = tuple(sorted((lb.name, lb.value) for lb in ts.labels))
            s = out.get(labels)
            if s is None:
                s = out[labels] = ReadSeries(labels)
            s.timestamps.extend([x.timestamp for x in ts.samples])
            s.values.extend([x.value for x in ts.samples])
    return _finish(out.values(), start_ms, end_ms, ordered=False)


def _finish(
    series: Iterable[ReadSeries], start_ms: int | None, end_ms: int | None, *, ordered: bool
) -> list[ReadSeries]:
    """Each series sorted by time without repeated timestamps (chunks may overlap), cut to the range."""
    out = []
    for s in series:
        ts, vs = s.timestamps, s.values
        if not ordered and any(ts[i] >= ts[i + 1] for i in range(len(ts) - 1)):
            pairs = sorted(zip(ts, vs, strict=True), key=itemgetter(0))  # stable: the first of equals stays
            ts, vs = [], []
            for t, v in pairs:
                if not ts or t != ts[-1]:
                    ts.append(t)
                    vs.append(v)
        lo = 0 if start_ms is None else bisect_left(ts, start_ms)
        hi = len(ts) if end_ms is None else bisect_right(ts, end_ms)
        if lo or hi < len(ts):
            ts, vs = ts[lo:hi], vs[lo:hi]
        if ts:
            out.append(ReadSeries(s.labels, ts, vs))
    return out


# ---- STREAMED_XOR_CHUNKS -----------------------------------------------------------------------


class StreamedResponseParser:
    """Incremental parser of a STREAMED_XOR_CHUNKS body: `feed` bytes as they arrive, then `finish`.

    Each frame is a uvarint length, the big-endian CRC-32C of the data, and a ChunkedReadResponse.
    A series split over several frames or chunks comes back as one ReadSeries."""

    def __init__(self, start_ms: int | None = None, end_ms: int | None = None) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.frames = 0
        self.chunks = 0
        self.skipped_chunks = 0  # native-histogram chunks: not float samples
        self._buf = bytearray()
        self._series: dict[Labels, ReadSeries] = {}
        self._ordered = True

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            length = shift = 0
            i = pos
            while True:
                if i >= n:
                    del buf[:pos]
                    return
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise RemoteReadError(f"streamed response: frame {self.frames + 1} has a bad length")
            if length > MAX_FRAME_BYTES:
                raise RemoteReadError(
                    f"streamed response: frame {self.frames + 1} claims {length} bytes, more than {MAX_FRAME_BYTES}"
                )
            if i + 4 + length > n:
                break
            want = int.from_bytes(buf[i : i + 4], "big")
            frame = bytes(buf[i + 4 : i + 4 + length])
            got = google_crc32c.value(frame)
            if got != want:
                raise RemoteReadError(
                    f"streamed response: frame {self.frames + 1} fails its CRC-32C check "
                    f"(header {want:#010x}, data {got:#010x})"
                )
            self._frame(frame)
            pos = i + 4 + length
        del buf[:pos]

    def _frame(self, frame: bytes) -> None:
        self.frames += 1
        try:
            msg = pbr.ChunkedReadResponse.FromString(frame)
        except DecodeError as exc:
            raise RemoteReadError(
                f"streamed response: frame {self.frames} is not a ChunkedReadResponse: {exc}"
            ) from None
        lo, hi = self.start_ms, self.end_ms
        for cs in msg.chunked_series:
            labels = tuple(sorted((lb.name, lb.value) for lb in cs.labels))
            s = self._series.get(labels)
            if s is None:
                s = self._series[labels] = ReadSeries(labels)
            for chunk in cs.chunks:
                self.chunks += 1
                if chunk.type != pbr.Chunk.XOR:
                    self.skipped_chunks += 1
                    continue
                if (lo is not None and chunk.max_time_ms < lo) or (hi is not None and chunk.min_time_ms > hi):
                    continue
                ts, vs = decode_xor_chunk(chunk.data)
                if ts and s.timestamps and ts[0] <= s.timestamps[-1]:
                    self._ordered = False
                s.timestamps += ts
                s.values += vs

    def finish(self) -> list[ReadSeries]:
        if self._buf:
            raise RemoteReadError(
                f"streamed response: cut off inside frame {self.frames + 1} ({len(self._buf)} bytes left over)"
            )
        return _finish(self._series.values(), self.start_ms, self.end_ms, ordered=self._ordered)


def decode_streamed_response(body: bytes, start_ms: int | None = None, end_ms: int | None = None) -> list[ReadSeries]:
    """A whole STREAMED_XOR_CHUNKS body as series (see StreamedResponseParser)."""
    parser = StreamedResponseParser(start_ms, end_ms)
    parser.feed(body)
    return parser.finish()


# A 4-bit peek at a delta-of-delta's prefix: (bits the prefix takes, bits of the value after it).
_DOD_PREFIX = [(1, 0)] * 8 + [(2, 14)] * 4 + [(3, 17)] * 2 + [(4, 20), (4, 64)]
_PAD = bytes(9)


def decode_xor_chunk(data: bytes) -> tuple[list[int], list[float]]:
    """Timestamps (ms) and values of a Prometheus XOR (Gorilla) chunk, bit-exact.

    Bits run MSB first: a 16-bit sample count; t0 as a zigzag varint and v0 as 64 raw bits; then
    a uvarint time delta, then deltas of deltas behind prefixes 0, 10, 110, 1110, 1111; each value
    XORed with the previous one behind 0 (same), 10 (the previous window) or 11 (a new window)."""
    if len(data) < 2:
        raise RemoteReadError(f"corrupt XOR chunk: {len(data)} bytes, shorter than its header")
    total = (data[0] << 8) | data[1]
    if total == 0:
        return [], []
    buf = bytes(data) + _PAD  # every read below may look 9 bytes ahead
    end_bit = len(data) * 8
    from_bytes = int.from_bytes

    u, i = _uvarint(buf, 2, len(data))
    t = (u >> 1) ^ -(u & 1)
    if i + 8 > len(data):
        raise RemoteReadError("corrupt XOR chunk: cut off in its first sample")
    vbits = from_bytes(buf[i : i + 8], "big")
    tss = [t]
    vals = [vbits]
    if total == 1:
        return tss, _floats(vals)
    delta, i = _uvarint(buf, i + 8, len(data))
    if delta >= 1 << 63:
        delta -= 1 << 64
    pos = i * 8
    leading = trailing = 0
    for n in range(1, total):
        if n > 1:
            b = pos >> 3
            peek = (from_bytes(buf[b : b + 2], "big") >> (12 - (pos & 7))) & 0xF
            used, size = _DOD_PREFIX[peek]
            pos += used
            if size:
                b = pos >> 3
                dod = (from_bytes(buf[b : b + 9], "big") >> (72 - (pos & 7) - size)) & ((1 << size) - 1)
                pos += size
                if size == 64:
                    if dod >= 1 << 63:
                        dod -= 1 << 64
                elif dod > 1 << (size - 1):
                    dod -= 1 << size
                delta += dod
        t += delta
        b = pos >> 3
        control = (from_bytes(buf[b : b + 2], "big") >> (14 - (pos & 7))) & 3
        if control < 2:  # 0: the value repeats
            pos += 1
        else:
            pos += 2
            if control == 3:  # 11: a new window of significant bits
                b = pos >> 3
                w = (from_bytes(buf[b : b + 3], "big") >> (13 - (pos & 7))) & 0x7FF
                pos += 11
                leading = w >> 6
                sig = (w & 0x3F) or 64
                trailing = 64 - leading - sig
                if trailing < 0:
                    raise RemoteReadError(f"corrupt XOR chunk: sample {n} has {leading}+{sig} bits")
            sig = 64 - leading - trailing
            b = pos >> 3
            x = (from_bytes(buf[b : b + 9], "big") >> (72 - (pos & 7) - sig)) & ((1 << sig) - 1)
            pos += sig
            vbits ^= x << trailing
        if pos > end_bit:
            raise RemoteReadError(f"corrupt XOR chunk: cut off in sample {n} of {total}")
        tss.append(t)
        vals.append(vbits)
    return tss, _floats(vals)


def _uvarint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while i < end and shift < 70:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise RemoteReadError("corrupt XOR chunk: bad varint")


def _floats(bits: list[int]) -> list[float]:
    # One copy of the raw bits: NaN payloads (the stale marker) survive unchanged.
    return array("d", array("Q", bits).tobytes()).tolist()


# ---- the client --------------------------------------------------------------------------------


class RemoteReadClient:
    """Reads series from one remote-read endpoint (e.g. http://prometheus:9090/api/v1/read).

    It asks for `accepted` response types in order of preference and decodes whichever the server
    chose (by its Content-Type). Decompression and decoding run in worker threads."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        accepted: Sequence[ResponseType] = ("STREAMED_XOR_CHUNKS", "SAMPLES"),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.url = url
        self.session = session
        self.timeout = timeout
        self.headers = {"User-Agent": f"detectord/{__version__}", **(headers or {}), **REQUEST_HEADERS}
        self.accepted = tuple(accepted)
        # What the server chose for the latest read.
        self.last_response_type: ResponseType | None = None

    async def read(self, start_ms: int, end_ms: int, matchers: Sequence[Matcher]) -> list[ReadSeries]:
        """Every series matching `matchers` with its samples in [start_ms, end_ms] (both inclusive)."""
        body = encode_read_request(start_ms, end_ms, matchers, self.accepted)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._read(body, start_ms, end_ms)
        except RemoteReadError as exc:
            if exc.url is not None:
                raise
            raise RemoteReadError(exc.reason, url=self.url, status=exc.status, body=exc.body) from None
        except TimeoutError:
            raise RemoteReadError(f"no complete answer within {self.timeout:g}s", url=self.url) from None
        except aiohttp.ClientError as exc:
            raise RemoteReadError(f"{exc.__class__.__name__}: {exc}", url=self.url) from None

    async def _read(self, body: bytes, start_ms: int, end_ms: int) -> list[ReadSeries]:
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            if not 200 <= resp.status < 300:
                head = b""
                while len(head) <= 200:
                    piece = await resp.content.read(201 - len(head))
                    if not piece:
                        break
                    head += piece
                raise RemoteReadError(resp.reason or "error", url=self.url, status=resp.status, body=head)
            ctype = resp.headers.get("Content-Type", "")
            media, _, params = ctype.partition(";")
            media = media.strip().lower()
            if media == "application/x-streamed-protobuf":
                proto = params.replace(" ", "").lower()
                if proto and proto != "proto=prometheus.chunkedreadresponse":
                    raise RemoteReadError(f"unexpected streamed message type {ctype!r}", url=self.url)
                self.last_response_type = "STREAMED_XOR_CHUNKS"
                parser = StreamedResponseParser(start_ms, end_ms)
                pending: list[bytes] = []
                size = 0
                async for piece in resp.content.iter_chunked(1 << 16):
                    pending.append(piece)
                    size += len(piece)
                    if size >= FEED_BYTES:
                        await asyncio.to_thread(parser.feed, b"".join(pending))
                        pending, size = [], 0
                if pending:
                    await asyncio.to_thread(parser.feed, b"".join(pending))
                return await asyncio.to_thread(parser.finish)
            if media == "application/x-protobuf":
                self.last_response_type = "SAMPLES"
                raw = await resp.read()
                return await asyncio.to_thread(decode_samples_response, raw, start_ms, end_ms)
            raise RemoteReadError(f"unexpected Content-Type {ctype!r}", url=self.url)


# ---- into the ingest path ----------------------------------------------------------------------


def writes_in_time_order(series: Sequence[ReadSeries], labels: LabelCache, slice_ms: int) -> Iterator[DecodedWrite]:
    """All samples as 1.0 DecodedWrites, one per time slice [k·slice_ms, (k+1)·slice_ms) that has
    samples, in increasing k; within one, each series' samples in time order.

    The FeatureExtractor closes a step once a sample two steps later arrives, so history must come
    in time order, as live remote write brings it, never series by series. The samples are
    ordered by one sort over all of them: hours of a fleet's history are tens of millions."""
    if slice_ms <= 0:
        raise ValueError(f"slice_ms must be > 0, got {slice_ms}")
    keys = [labels.intern(s.labels) for s in series]
    lengths = np.fromiter((len(s.timestamps) for s in series), dtype=np.int64, count=len(series))
    n = int(lengths.sum())
    if not n:
        return
    ts = np.concatenate([np.asarray(s.timestamps, dtype=np.int64) for s in series])
    # Floats are sorted as raw bits: a stale marker's NaN payload must survive.
    bits = np.concatenate([np.frombuffer(array("d", s.values), dtype=np.int64) for s in series])
    sid = np.repeat(np.arange(len(series), dtype=np.int64), lengths)
    slot = ts // slice_ms
    order = np.lexsort((ts, sid, slot))
    ts, bits, sid, slot = ts[order], bits[order], sid[order], slot[order]
    # Runs: one series' samples within one slice.
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(sid[1:], sid[:-1], out=new_run[1:])
    new_run[1:] |= slot[1:] != slot[:-1]
    run_starts = np.flatnonzero(new_run)
    run_counts = np.diff(np.append(run_starts, n))
    run_sid = sid[run_starts].tolist()
    run_slot = slot[run_starts]
    slice_edges = np.flatnonzero(np.diff(run_slot)) + 1
    values = bits.view(np.float64)
    a = 0
    for b in [*slice_edges.tolist(), len(run_starts)]:
        lo, hi = int(run_starts[a]), int(run_starts[b]) if b < len(run_starts) else n
        out = DecodedWrite("1.0")
        out.keys = [keys[i] for i in run_sid[a:b]]
        out.counts = run_counts[a:b].tolist()
        out.timestamps = ts[lo:hi].tolist()
        out.values = values[lo:hi].tolist()
        out.samples = hi - lo
        a = b
        yield out
