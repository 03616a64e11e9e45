"""Remote write over HTTP, for every receiver (`serve` and `record`): the protocol a request's
headers ask for, its body read within the size limits, and the answer Prometheus expects (a
status, a reason, and for 2.0 the `X-Prometheus-Remote-Write-*-Written` headers).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from detectord.errors import RemoteWriteError
from detectord.ingest.remote_write import Version, check_encoding, declared_length, protocol_of

WRITTEN_HEADERS = (
    "X-Prometheus-Remote-Write-Samples-Written",
    "X-Prometheus-Remote-Write-Histograms-Written",
    "X-Prometheus-Remote-Write-Exemplars-Written",
)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int  # compressed bytes
    max_decoded: int  # what the snappy header may declare


@dataclass(frozen=True, slots=True)
class Written:
    samples: int = 0
    histograms: int = 0
    exemplars: int = 0


async def read_request(request: web.Request, limits: Limits) -> tuple[Version, bytes]:
    """The protocol version the request's Content-Type asks for, and its compressed body.

    Raises RemoteWriteError (with `version` set once the Content-Type was understood): 415 for
    another type or encoding, 413 beyond `limits` (the declared decompressed length is checked
    before anything is decompressed), 400 for an empty body."""
    version = protocol_of(request.headers.get("Content-Type"))
    try:
        check_encoding(request.headers.get("Content-Encoding"))
        return version, await _read_body(request, limits)
    except RemoteWriteError as exc:
        exc.version = version
        raise


async def _read_body(request: web.Request, limits: Limits) -> bytes:
    limit = limits.max_body
    if request.content_length is not None and request.content_length > limit:
        raise RemoteWriteError(413, f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RemoteWriteError(413, f"body exceeds the limit of {limit} bytes") from None
    if len(body) > limit:
        raise RemoteWriteError(413, f"body of {len(body)} bytes exceeds the limit of {limit} bytes")
    if not body:
        raise RemoteWriteError(400, "empty body")
    declared = declared_length(body)
    if declared > limits.max_decoded:
        raise RemoteWriteError(
            413, f"declared decompressed length {declared} exceeds the limit of {limits.max_decoded} bytes"
        )
    return body


def written_headers(version: Version | None, written: Written | None = None) -> dict[str, str]:
    if version != "2.0":
        return {}
    w = written or Written()
    return dict(zip(WRITTEN_HEADERS, (str(w.samples), str(w.histograms), str(w.exemplars)), strict=True))


def accepted(version: Version, written: Written, error: str | None = None) -> web.Response:
    """204, or 400 naming why some series were refused (the rest was taken)."""
    headers = written_headers(version, written)
    if error is not None:
        return web.Response(status=400, text=f"some series were refused: {error}\n", headers=headers)
    return web.Response(status=204, headers=headers)


def refused(exc: RemoteWriteError) -> web.Response:
    version: Version | None = "2.0" if exc.version == "2.0" else None
    return web.Response(status=exc.status, text=exc.reason + "\n", headers=written_headers(version))
