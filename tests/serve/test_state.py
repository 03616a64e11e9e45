"""No amnesia: a restart restores every instance's state from the snapshot in `state.dir` and
scores on as if it had never stopped; a firing alert stays active in Alertmanager with the same
`startsAt`; a snapshot that cannot be trusted is refused, said and counted, and the daemon starts
clean."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import structlog

from detectord.config import AlertmanagerConfig
from detectord.ingest import features
from detectord.ingest.features import extract
from detectord.ingest.remote_write import LabelCache, decode
from detectord.recordings.format import Record, RecordingWriter, read_records
from detectord.recordings.replay import replay
from detectord.serve import snapshots
from lab.peers.alertmanager import run_alertmanager
from lab.peers.detectord import Detectord, run_detectord
from tests.serve.test_liveness import A, Fleet
from tests.support import REPO, metric, running_server, slice_recording, test_config

STEP_S = 5.0


def _config(state: Path, **sections: dict[str, Any]) -> Any:
    return test_config(
        ingest={"step": STEP_S, "instance_ttl": 3600.0},
        model={"path": REPO / "models/default", "any_step": False},
        inference={"score_history": 100_000, "queue_size": 100_000},
        state={"dir": str(state), "snapshot_interval": 3600.0},
        **sections,
    )


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """25 minutes of a real fleet of CoreDNS under faults, as Prometheus wrote them."""
    path = slice_recording(REPO / "data/faults-1.drec.xz", tmp_path_factory.mktemp("rec") / "r.drec", 25)
    return list(read_records(path))


async def _send(srv: Any, records: Sequence[Record]) -> None:
    url = f"http://127.0.0.1:{srv.port}/api/v1/write"
    async with aiohttp.ClientSession() as s:
        for rec in records:
            headers = {"Content-Encoding": "snappy", "Content-Type": rec.content_type}
            async with s.post(url, data=rec.body, headers=headers) as r:
                assert r.status == 204, await r.text()
    await _settle(srv)


async def _settle(srv: Any) -> None:
    """Until every window submitted has been scored and delivered."""
    deadline = time.monotonic() + 60
    while not srv.pipeline.worker.idle():
        assert time.monotonic() < deadline, "the inference worker never caught up"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


def _scores(srv: Any) -> dict[tuple[str, ...], dict[int, float]]:
    return {k: dict(v.pairs()) for k, v in srv.sink.history.items()}


def _as_format_1(state: Path) -> None:
    """The snapshot in `state` as detectord wrote it before format 2: every series of an instance
    a tuple (labels, last_ts, last_v, held, gauge bin, gauge bin), not a label block and numbers."""
    snap = snapshots.read(state, _header((state / snapshots.FILE_NAME).read_bytes())["fingerprint"], max_age_s=3600)
    assert snap is not None
    with snap:
        instances, alerts = list(snap.instances()), snap.alerts()
        header = snap.header
    for st in instances:
        st["series"] = features._unpack_series(st.pop("labels"), st["series"])
        assert st["series"] and isinstance(st["series"][0][1], int)
    snapshots.write(state, header["fingerprint"], header["model"], [snapshots.encode(i) for i in instances], alerts)
    path = state / snapshots.FILE_NAME
    path.write_bytes(_with_header(path.read_bytes(), format=1))


@pytest.mark.parametrize("saved_by", ["this detectord", "format 1"])
async def test_after_a_restart_scores_go_on_as_if_it_never_stopped(
    tmp_path: Path, records: list[Record], saved_by: str
) -> None:
    """Also when the snapshot is of format 1, as the detectord before an upgrade saved it."""
    half = len(records) // 2
    async with running_server(_config(tmp_path / "whole")) as srv:
        await _send(srv, records)
        whole = _scores(srv)
    async with running_server(_config(tmp_path / "state")) as srv:
        await _send(srv, records[:half])
        before = _scores(srv)
    assert (tmp_path / "state" / snapshots.FILE_NAME).exists()
    if saved_by == "format 1":
        _as_format_1(tmp_path / "state")
    async with running_server(_config(tmp_path / "state")) as srv:
        assert all(not srv.ingestor.is_warming(k) for k in before), "restored instances must score at once"
        await _send(srv, records[half:])
        after = _scores(srv)
        text = await _metrics(srv)
    assert metric(text, "detectord_state_restored_total", what="instances") == len(whole)
    assert set(after) == set(whole)
    compared = 0
    for key, scores in whole.items():
        want = {t: s for t, s in scores.items() if t not in before.get(key, {})}
        assert sorted(after[key]) == sorted(want), f"{key}: other steps scored after the restart"
        got = np.array([after[key][t] for t in sorted(want)])
        # Batches are padded differently: float32 sums may differ in the last bits.
        np.testing.assert_allclose(got, [want[t] for t in sorted(want)], rtol=1e-4, atol=1e-5, err_msg=str(key))
        compared += len(want)
    assert compared > 100
    # Anomalous steps are among them: the recording holds faults after the restart.
    assert max(max(s.values()) for s in after.values()) > 1.0


async def _metrics(srv: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{srv.port}/metrics") as r:
        return await r.text()


# ---- refused snapshots -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory: pytest.TempPathFactory, records: list[Record]) -> bytes:
    state = tmp_path_factory.mktemp("good")

    async def make() -> None:
        async with running_server(_config(state)) as srv:
            await _send(srv, records[: len(records) // 3])

    asyncio.run(make())
    return (state / snapshots.FILE_NAME).read_bytes()


def _header(data: bytes) -> dict[str, Any]:
    n = len(snapshots.MAGIC)
    (size,) = struct.unpack_from("<I", data, n)
    header: dict[str, Any] = json.loads(data[n + 4 : n + 4 + size])
    return header


def _with_header(data: bytes, **changes: Any) -> bytes:
    n = len(snapshots.MAGIC)
    (size,) = struct.unpack_from("<I", data, n)
    header = _header(data)
    header.update(changes)
    head = json.dumps(header).encode()
    return data[:n] + struct.pack("<I", len(head)) + head + data[n + 4 + size :]


def _flip_last_record_byte(data: bytes) -> bytes:
    return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]


@pytest.mark.parametrize(
    ("reason", "damage", "sections"),
    [
        ("corrupt", _flip_last_record_byte, {}),
        ("corrupt", lambda d: b"NOTASNAP" + d[8:], {}),
        ("truncated", lambda d: d[: len(d) * 2 // 3], {}),
        ("corrupt", lambda d: d + b"\0", {}),
        ("version", lambda d: _with_header(d, format=snapshots.FORMAT + 1), {}),
        ("too_old", lambda d: _with_header(d, written_at=time.time() - 7200), {}),
        # The same snapshot, for a daemon whose model runs at another step.
        ("model", lambda d: d, {"ingest": {"step": 10.0}, "model": {"any_step": True}}),
    ],
    ids=["corrupt", "not-a-snapshot", "truncated", "data-after", "wrong-version", "too-old", "wrong-model"],
)
async def test_a_snapshot_that_cannot_be_trusted_is_refused_and_the_daemon_starts_clean(
    tmp_path: Path,
    good_snapshot: bytes,
    reason: str,
    damage: Callable[[bytes], bytes],
    sections: dict[str, dict[str, Any]],
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / snapshots.FILE_NAME).write_bytes(damage(good_snapshot))
    cfg = _config(state)
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as srv:
            assert srv.ready
            text = await _metrics(srv)
            assert srv.ingestor.extractor.instances == 0, "nothing of a refused snapshot is kept"
    assert metric(text, "detectord_state_restore_refused_total", reason=reason) == 1
    refused = [e for e in logs if e["event"] == "state snapshot refused; starting clean"]
    assert len(refused) == 1 and refused[0]["reason"] == reason, logs
    assert refused[0]["detail"], "the log line says what exactly is wrong"


# ---- alerts across a restart -----------------------------------------------------------------


async def test_a_firing_alert_stays_active_in_alertmanager_across_a_restart(tmp_path: Path) -> None:
    """A dead instance's alert fires; detectord restarts; Alertmanager shows the alert active all
    along, with the same startsAt, and detectord keeps it firing without sending it anew."""
    async with run_alertmanager(tmp_path / "am") as am:
        cfg = test_config(
            alerting={"alertmanagers": (AlertmanagerConfig(url=am.url),), "resend_interval": 2.0},
            state={"dir": str(tmp_path / "state"), "snapshot_interval": 3600.0},
        )

        async def active() -> list[dict[str, Any]]:
            return [
                a for a in await am.alerts() if a["labels"].get("instance") == A[1] and a["status"]["state"] == "active"
            ]

        seen: list[str] = []
        async with aiohttp.ClientSession() as session:
            async with running_server(cfg) as srv:
                fleet = Fleet(srv, session)
                await fleet.until(lambda: not srv.ingestor.is_warming(A), "ok", timeout=120)
                await fleet.until(lambda: fleet.alert() is not None, "failing")
                deadline = time.monotonic() + 20
                while not await active():
                    assert time.monotonic() < deadline, "the alert never reached Alertmanager"
                    await asyncio.sleep(0.2)
                seen += [a["startsAt"] for a in await active()]
                k = fleet.k
            # Down for a while: longer than the resend interval.
            for _ in range(6):
                seen += [a["startsAt"] for a in await active()] or ["inactive"]
                await asyncio.sleep(0.5)
            async with running_server(cfg) as srv:
                assert srv.sink.alerts.is_firing(A), "the alert state is restored firing"
                fleet = Fleet(srv, session)
                fleet.k = k
                for _ in range(8):
                    await fleet.scrape("failing")
                    seen += [a["startsAt"] for a in await active()] or ["inactive"]
                    await asyncio.sleep(0.5)
                assert srv.sink.alerts.is_firing(A)
    assert len(set(seen)) == 1 and seen[0] != "inactive", seen


# ---- kill -9 ---------------------------------------------------------------------------------


def _write(path: Path, records: Sequence[Record]) -> Path:
    with RecordingWriter(path) as w:
        for rec in records:
            w.append(rec.body, rec.version, rec.arrival_ns)
    return path


async def _until_metric(det: Detectord, name: str, value: float, timeout: float = 60.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric(await det.metrics(), name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_after_kill_9_the_last_snapshot_is_restored_and_the_gap_filled(
    tmp_path: Path, records: list[Record]
) -> None:
    """`kill -9` loses what came after the last snapshot, and nothing before it: restarted, every
    instance scores at its next step. The steps it missed are a gap like a missed scrape: short,
    they are held over (the window goes on); never a new warm-up."""
    cut = len(records) // 2
    # Ten seconds of data lost with the daemon: two steps.
    lost = [r for r in records[cut:] if r.arrival_ns < records[cut].arrival_ns + 10e9]
    first = _write(tmp_path / "first.drec", records[:cut])
    rest = _write(tmp_path / "rest.drec", records[cut + len(lost) :])
    config = (
        f"ingest:\n  step: {STEP_S:g}s\n  instance_ttl: 1h\nstate:\n  snapshot_interval: 1s\n"
        "inference:\n  score_history: 100000\n"
    )
    async with run_detectord(config, workdir=tmp_path / "d") as det:
        stats = await replay(first, det.write_url, speed=0)
        assert stats.sent == cut and not stats.refused
        # Two more snapshots: the second began after every write above was in.
        done = metric(await det.metrics(), "detectord_state_snapshots_total", result="success")
        await _until_metric(det, "detectord_state_snapshots_total", done + 2, result="success")
        text = await det.metrics()
        assert metric(text, "detectord_state_snapshot_bytes") > 0
        instances = await det.instances()
        det.child.signal(signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, det.child.proc.wait)
    assert {not i["warming"] for i in instances} == {True}
    async with run_detectord(config, workdir=tmp_path / "d") as det:
        assert "state restored" in det.log.read_text()
        assert [i for i in await det.instances() if i["warming"]] == []
        stats = await replay(rest, det.write_url, speed=0)
        assert not stats.refused and not stats.failed
        await _until_metric(det, "detectord_windows_scored_total", 1)
        text = await det.metrics()
        scores = await _scores_of(det)
    # No instance started its window over, but where the recording itself makes one (a killed CoreDNS).
    assert metric(text, "detectord_window_restarts_total") == _restarts_after(records, records[cut].arrival_ns)
    assert metric(text, "detectord_gap_steps_total") > 0, "the lost steps were held over"
    t0 = records[cut].arrival_ns // 1_000_000
    for key, pairs in scores.items():
        # The first step after the lost ones is scored: no warm-up.
        assert min(t for t, _ in pairs) <= t0 + 10_000 + 2 * STEP_S * 1000, key


def _restarts_after(records: Sequence[Record], t_ns: int) -> int:
    """Window restarts the recording makes after `t_ns` when scored offline, without a break."""
    labels = LabelCache()
    writes = (decode(r.body, r.version, labels, max_decoded=1 << 30) for r in records)
    series = extract(writes, round(STEP_S * 1000))
    return sum(int(s.timestamps_ms[i] >= t_ns // 1_000_000) for s in series.values() for i in s.restarts)


async def _scores_of(det: Detectord) -> dict[tuple[str, ...], list[list[float]]]:
    async with aiohttp.ClientSession() as s, s.get(f"{det.url}/api/v1/scores") as r:
        data = (await r.json())["data"]
    return {(d["labels"]["job"], d["labels"]["instance"]): d["scores"] for d in data}


async def test_a_state_dir_it_cannot_write_is_said_and_counted_and_harms_nothing(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the state directory should be")
    cfg = test_config(state={"dir": str(blocked), "snapshot_interval": 1.0})
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as srv:
            async with aiohttp.ClientSession() as session:
                fleet = Fleet(srv, session)
                for _ in range(3):
                    await fleet.scrape()
                    await asyncio.sleep(0.5)
            text = await _metrics(srv)
    assert metric(text, "detectord_state_snapshots_total", result="failure") >= 1
    assert metric(text, "detectord_state_restore_refused_total", reason="unreadable") == 1
    assert any(e["event"] == "state snapshot not written" for e in logs)
    assert blocked.read_text() == "a file where the state directory should be"


def test_a_restore_decodes_one_instance_at_a_time(tmp_path: Path, good_snapshot: bytes) -> None:
    """A restore holds one instance's decoded state beside the daemon's, not the whole snapshot's
    (at fleet scale that was half as much memory again as the daemon): the instances before a
    damaged record come out before the damage is found, which then refuses the snapshot."""
    header = _header(good_snapshot)
    fp = header["fingerprint"]
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / snapshots.FILE_NAME).write_bytes(good_snapshot)
    with snapshots.read(tmp_path / "good", fp, max_age_s=3600) as snap:  # type: ignore[union-attr]
        instances, alerts = list(snap.instances()), snap.alerts()
    records = [snapshots.encode(i) for i in instances]
    records[-1] = records[-1][:-1] + bytes([records[-1][-1] ^ 0xFF])
    snapshots.write(tmp_path / "bad", fp, header["model"], records, alerts)
    taken: list[list[str]] = []
    bad = snapshots.read(tmp_path / "bad", fp, max_age_s=3600)
    assert bad is not None
    with bad, pytest.raises(snapshots.SnapshotRefused, match="checksum") as refused:
        taken.extend(st["key"] for st in bad.instances())  # appended one at a time, as restored
    assert refused.value.reason == "corrupt"
    assert len(instances) > 1 and taken == [i["key"] for i in instances[:-1]]


def _slot_short(instance: dict[str, Any]) -> None:
    instance["acc"] = (instance["acc"][0][:-1], instance["acc"][1])


def _numbers_short(instance: dict[str, Any]) -> None:
    instance["series"] = instance["series"][:-40]


def _label_block_cut(instance: dict[str, Any]) -> None:
    instance["labels"] = instance["labels"][:-8]


def _timestamp_beyond_int64(instance: dict[str, Any]) -> None:
    """In format 1, whose series carried their timestamps as Python ints."""
    series = features._unpack_series(instance.pop("labels"), instance["series"])
    labels, _, *rest = series[-1]
    series[-1] = (labels, 2**63, *rest)
    instance["series"] = series


@pytest.mark.parametrize("damage", [_slot_short, _numbers_short, _label_block_cut, _timestamp_beyond_int64])
async def test_a_state_that_does_not_fit_halfway_through_leaves_nothing_behind(
    tmp_path: Path, good_snapshot: bytes, damage: Callable[[dict[str, Any]], None]
) -> None:
    """Whole and checksummed, but its last instance's state does not fit (an accumulator slot
    short, a series' last timestamp that no write can carry): refused as corrupt, and none of the
    instances restored before it is kept."""
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / snapshots.FILE_NAME).write_bytes(good_snapshot)
    header = _header(good_snapshot)
    snap = snapshots.read(tmp_path / "good", header["fingerprint"], max_age_s=3600)
    assert snap is not None
    with snap:
        instances, alerts = list(snap.instances()), snap.alerts()
    assert len(instances) > 1
    damage(instances[-1])
    state = tmp_path / "state"
    snapshots.write(state, header["fingerprint"], header["model"], [snapshots.encode(i) for i in instances], alerts)
    with structlog.testing.capture_logs() as logs:
        async with running_server(_config(state)) as srv:
            assert srv.ingestor.extractor.instances == 0
            text = await _metrics(srv)
    assert metric(text, "detectord_state_restore_refused_total", reason="corrupt") == 1
    assert any(e["event"] == "state snapshot refused; starting clean" for e in logs)
