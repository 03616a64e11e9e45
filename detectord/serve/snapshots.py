"""State snapshots: every instance's features, baseline, window, liveness and alert state, written
crash-safely to `state.dir` and restored at start, so a restart or an upgrade forgets nothing.

A snapshot file is `MAGIC`, a length-prefixed JSON header (format version, the model's input
fingerprint, when it was written, how many records follow) and records: a length, a CRC-32 and a
zstd-compressed pickle of plain values (`plainpickle`: no classes), one per instance and one for
the alert states. Records are encoded one at a time, so no encoding step
holds the GIL for long, and decoded one at a time as they are restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from detectord.ingest import plainpickle
from detectord.ingest.normalise import InputPlan

MAGIC = b"DTCDSNAP"
# 2: an instance's series as a label block and packed numbers (FeatureExtractor.instance_state).
FORMAT = 2
# Formats this detectord restores: an upgrade keeps what the last version saved.
READS = (1, 2)
FILE_NAME = "snapshot.dsnap"
_LEN = struct.Struct("<I")
_RECORD = struct.Struct("<II")  # payload length, CRC-32 of the payload
# A header or record longer than this is a corrupt length, not data.
MAX_RECORD_BYTES = 1 << 28

Refusal = Literal["unreadable", "corrupt", "truncated", "version", "model", "too_old"]
REFUSALS: tuple[Refusal, ...] = ("unreadable", "corrupt", "truncated", "version", "model", "too_old")


class SnapshotRefused(Exception):
    """A snapshot that is not restored: why (a `Refusal`) and what exactly was wrong."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def fingerprint(
    *, features: Sequence[str], window: int, step_s: float, inputs: InputPlan, instance_labels: Sequence[str]
) -> dict[str, Any]:
    """What a model's per-instance state depends on: windows and baselines made for another one
    mean nothing to it. `digest` is what snapshots compare; the rest says what differs."""
    what: dict[str, Any] = {
        "features": list(features),
        "window": window,
        "step_ms": round(step_s * 1000),
        "inputs": inputs.to_dict(),
        "instance_labels": list(instance_labels),
    }
    what["digest"] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return what


class Snapshot:
    """An open snapshot file whose header was read and checked. Its records are read and decoded
    one at a time as `instances` yields them, then `alerts`: a restore holds one instance's
    decoded state beside the daemon's own, not every instance's (the whole decoded took about
    half as much memory again as the restored daemon, and a process keeps its peak). Damage found
    on the way raises SnapshotRefused. Close it (a context manager)."""

    def __init__(self, f: BinaryIO, header: dict[str, Any]) -> None:
        self._f, self.header = f, header
        self.count = int(header["instances"])
        self._payloads = _payloads(f, self.count + 1)
        self._taken = 0

    @property
    def written_at(self) -> float:
        return float(self.header["written_at"])

    def instances(self) -> Iterator[dict[str, Any]]:
        """Each instance's state, in the order written."""
        while self._taken < self.count:
            yield self._next()

    def alerts(self) -> dict[str, Any]:
        """The alert states: the last record, once every instance was taken."""
        if self._taken != self.count:
            raise RuntimeError(f"{self.count - self._taken} instances not taken before the alert states")
        rec = self._next()
        for _ in self._payloads:  # none: this makes it check that nothing follows
            pass
        return rec

    def _next(self) -> dict[str, Any]:
        i = self._taken
        payload = next(self._payloads)
        self._taken += 1
        try:
            rec = plainpickle.loads(payload)
        except Exception as exc:  # any failure to decode is damage
            raise SnapshotRefused("corrupt", f"record {i} does not decode ({exc})") from exc
        if not isinstance(rec, dict):
            raise SnapshotRefused("corrupt", f"record {i} is a {type(rec).__name__}, not a mapping")
        return rec

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WriteStats:
    bytes: int
    seconds: float
    instances: int


def encode(record: Mapping[str, Any]) -> bytes:
    """One record as the file holds it, framing and all (instances are encoded as they are read,
    so a snapshot holds its records' bytes, not every instance's state as Python objects)."""
    payload = plainpickle.dumps(record)
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def write(
    directory: Path,
    fp: Mapping[str, Any],
    model: Mapping[str, str],
    instances: Sequence[bytes],
    alerts: Mapping[str, Any],
) -> WriteStats:
    """Write a snapshot of `instances` (each `encode`d) and `alerts` crash-safely: a temporary
    file, fsync, rename over the last one, fsync of the directory. A crash at any point leaves the
    previous snapshot or the new one whole."""
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    tmp = directory / (FILE_NAME + ".tmp")
    header = {
        "format": FORMAT,
        "written_at": time.time(),
        "fingerprint": dict(fp),
        "model": dict(model),
        "instances": len(instances),
    }
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            head = json.dumps(header).encode()
            f.write(MAGIC + _LEN.pack(len(head)) + head)
            for rec in instances:
                f.write(rec)
            f.write(encode(alerts))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return WriteStats(size, time.perf_counter() - t0, len(instances))


def read(directory: Path, fp: Mapping[str, Any], *, max_age_s: float, now: float | None = None) -> Snapshot | None:
    """The snapshot in `directory`, open, if it may be restored; None if there is none. A snapshot
    of another format or model or one older than `max_age_s` raises SnapshotRefused, and so does
    damage, here in the header or later in a record as it is read."""
    path = directory / FILE_NAME
    try:
        f = open(path, "rb")  # noqa: SIM115  # the Snapshot owns it, or it is closed below
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotRefused("unreadable", f"{path}: {exc.strerror}") from exc
    try:
        header = _header(f, path)
        _check_model(header, fp)
        now = time.time() if now is None else now
        age = now - float(header["written_at"])
        if age > max_age_s:
            raise SnapshotRefused("too_old", f"written {age:.0f}s ago, state.max_age is {max_age_s:g}s")
    except BaseException:
        f.close()
        raise
    return Snapshot(f, header)


def _header(f: BinaryIO, path: Path) -> dict[str, Any]:
    head = f.read(len(MAGIC) + _LEN.size)
    if len(head) < len(MAGIC) + _LEN.size:
        raise SnapshotRefused("truncated", f"{path} ends within its header")
    if head[: len(MAGIC)] != MAGIC:
        raise SnapshotRefused("corrupt", f"{path} is not a detectord snapshot (bad magic)")
    (n,) = _LEN.unpack_from(head, len(MAGIC))
    if n > MAX_RECORD_BYTES:
        raise SnapshotRefused("corrupt", f"{path}: a header of {n} bytes")
    raw = f.read(n)
    if len(raw) < n:
        raise SnapshotRefused("truncated", f"{path} ends within its header")
    try:
        header = json.loads(raw)
        version = header["format"]
        written_at = float(header["written_at"])
        int(header["instances"])
        if not isinstance(header["fingerprint"], dict) or not isinstance(header.get("model", {}), dict):
            raise TypeError("fingerprint and model must be mappings")
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotRefused("corrupt", f"{path}: unreadable header ({exc})") from exc
    if version not in READS:
        raise SnapshotRefused(
            "version", f"{path} is snapshot format {version!r}; this detectord reads {', '.join(map(str, READS))}"
        )
    header["written_at"] = written_at
    return dict(header)


def _check_model(header: Mapping[str, Any], fp: Mapping[str, Any]) -> None:
    theirs = header["fingerprint"]
    if theirs.get("digest") == fp["digest"]:
        return
    differ = [k for k in fp if k != "digest" and theirs.get(k) != fp[k]] or ["digest"]
    model = header.get("model", {})
    raise SnapshotRefused(
        "model",
        f"made for model {model.get('name', '?')} {model.get('version', '?')}, whose "
        f"{', '.join(differ)} differ from the loaded model's",
    )


def _payloads(f: BinaryIO, count: int) -> Iterator[bytes]:
    for i in range(count):
        head = f.read(_RECORD.size)
        if len(head) < _RECORD.size:
            raise SnapshotRefused("truncated", f"ends after {i} of {count} records")
        n, crc = _RECORD.unpack(head)
        if n > MAX_RECORD_BYTES:
            raise SnapshotRefused("corrupt", f"record {i} claims {n} bytes")
        payload = f.read(n)
        if len(payload) < n:
            raise SnapshotRefused("truncated", f"ends within record {i} of {count}")
        if zlib.crc32(payload) != crc:
            raise SnapshotRefused("corrupt", f"record {i} fails its checksum")
        yield payload
    if f.read(1):
        raise SnapshotRefused("corrupt", f"data after its {count} records")
