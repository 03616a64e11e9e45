"""Command line: `detectord serve`, `record`, `replay`, `score`, `check config`, `train`, `evaluate`, `tune`.

Flags follow Prometheus's conventions (`--config.file`, `--web.listen-address`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from detectord import __version__
from detectord.config import ByteSize, Config, Duration, load_config, with_listen_address
from detectord.errors import ConfigError, DetectordError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detectord", description="Anomaly detection for CoreDNS fleets.")
    p.add_argument("--version", action="version", version=f"detectord {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="receive remote-write, score instances, send alerts")
    s.add_argument(
        "--config.file", dest="config_file", default=None, help="YAML config file (default: built-in defaults)"
    )
    s.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=None,
        help="HOST:PORT to listen on; overrides web.listen_address",
    )
    s.add_argument(
        "--web.enable-lifecycle",
        dest="enable_lifecycle",
        action="store_true",
        help="allow POST /-/reload (off: 403, as in Prometheus); SIGHUP reloads either way",
    )
    s.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="exporter-toolkit web config: TLS, client certificates, basic auth, headers (re-read on change)",
    )
    s.add_argument("--log.format", dest="log_format", choices=["json", "console"], default=None)
    s.add_argument("--log.level", dest="log_level", choices=["debug", "info", "warning", "error"], default=None)

    c = sub.add_parser("check", help="validate files without starting")
    csub = c.add_subparsers(dest="what", required=True)
    cc = csub.add_parser("config", help="validate a config file (and the model it names)")
    cc.add_argument("file")
    cc.add_argument("--skip-model", action="store_true", help="do not load the model")
    cc.add_argument("--web.config.file", dest="web_config_file", default=None, help="validate this web config too")
    cw = csub.add_parser("web-config", help="validate web config files (--web.config.file), as promtool's")
    cw.add_argument("files", nargs="+")

    r = sub.add_parser("record", help="receive remote-write and append every request to a recording")
    r.add_argument("--out", required=True, help="recording file (appended to if it exists)")
    r.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default="0.0.0.0:9465",
        help="HOST:PORT to listen on (default 0.0.0.0:9465)",
    )
    r.add_argument(
        "--web.max-body-size",
        dest="max_body_size",
        default="16MiB",
        type=_size,
        help="compressed request body limit (default 16MiB)",
    )
    r.add_argument(
        "--fsync-interval",
        dest="fsync_interval",
        default="1s",
        type=_duration,
        help="how often appended records are fsynced (default 1s)",
    )

    p2 = sub.add_parser("replay", help="re-send a recording to a remote-write endpoint")
    p2.add_argument("file", help="recording (.drec, or .drec.xz)")
    p2.add_argument("--to", required=True, help="remote-write URL, e.g. http://localhost:9464/api/v1/write")
    p2.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 keeps the recorded pace, 10 is ten times faster, 0 as fast as possible",
    )

    sc = sub.add_parser("score", help="score a recording offline, exactly as serve would score it live")
    sc.add_argument("file", help="recording (.drec, or .drec.xz)")
    sc.add_argument("--model", default=None, help="model directory or model set (default: the shipped default set)")
    sc.add_argument(
        "--step", type=_duration, default=None, help="feature step (default: the model's; for a model set, 1m)"
    )
    sc.add_argument("--any-step", action="store_true", help="run the model even at a step it was not made for")
    sc.add_argument("--out", default=None, help="write every score as CSV (instance labels, timestamp_ms, score)")

    ex = sub.add_parser("export", help="read a time range over Prometheus remote read into a recording")
    ex.add_argument(
        "--from", dest="url", required=True, help="remote-read URL, e.g. http://prometheus:9090/api/v1/read"
    )
    ex.add_argument("--start", required=True, help="RFC 3339 (2024-05-01T12:00:00Z), Unix seconds, or now-2h")
    ex.add_argument("--end", default="now", help="as --start (default now); inclusive")
    ex.add_argument(
        "--match",
        action="append",
        default=None,
        help='series selector, repeatable (default {__name__=~"coredns_.+|process_.+|go_goroutines|up"})',
    )
    ex.add_argument(
        "--out", required=True, help="recording to write; if it exists, export resumes after its newest sample"
    )
    ex.add_argument("--chunk", default="1h", help="time read per remote-read request (default 1h)")
    ex.add_argument("--timeout", default="5m", help="limit for each remote-read request (default 5m)")

    rw = sub.add_parser(
        "remote-write",
        help="print Prometheus's remote_write for detectord, split into shards (hashmod) and replicas",
    )
    rw.add_argument(
        "--url",
        default="http://detectord:9464/api/v1/write",
        help="where each shard listens; may name {shard} and {replica}, e.g. "
        "http://detectord-{shard}.detectord-headless.detectord.svc:9464/api/v1/write",
    )
    rw.add_argument("--shards", type=int, default=1, help="shards the fleet is split into (default 1)")
    rw.add_argument("--replicas", type=int, default=1, help="replicas of each shard, for high availability")
    rw.add_argument(
        "--instance-labels", default="job,instance", help="detectord's ingest.instance_labels (default job,instance)"
    )
    rw.add_argument(
        "--operator", action="store_true", help="the Prometheus Operator's spec.remoteWrite instead of prometheus.yml"
    )

    sub.add_parser("train", help="train the detectors on labelled recordings (see train --help)")
    sub.add_parser("evaluate", help="evaluate models beside the comparisons (see evaluate --help)")
    sub.add_parser("tune", help="search a detector's hyperparameters with Optuna (see tune --help)")
    sub.add_parser("calibrate", help="set a model's threshold from your fleet's own history (see calibrate --help)")
    return p


def _load(path: str | None, listen: str | None) -> Config:
    cfg = load_config(path) if path else Config()
    if listen:
        cfg = with_listen_address(cfg, listen)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # training.py and tuning.py own their flags (`detectord train --help`).
        from detectord.offline.training import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from detectord.offline.training import evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] == ["tune"]:
        from detectord.offline.tuning import main as tune_main

        return tune_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        from detectord.offline.calibration import main as calibrate_main

        return calibrate_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        if args.what == "web-config":
            return max(_check_web_config(f) for f in args.files)
        status = _check_config(args.file, skip_model=args.skip_model)
        if args.web_config_file:
            status = max(status, _check_web_config(args.web_config_file))
        return status
    if args.command == "record":
        return _record(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "score":
        return _score(args)
    if args.command == "export":
        return _export(args)
    if args.command == "remote-write":
        return _remote_write(args)
    try:
        cfg = _load(args.config_file, args.listen_address)
    except ConfigError as exc:
        print(f"detectord: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from detectord.logs import configure

    configure(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    from detectord.serve.server import serve

    return asyncio.run(
        serve(
            cfg,
            config_path=args.config_file,
            listen_override=args.listen_address,
            enable_lifecycle=args.enable_lifecycle,
            web_config_file=args.web_config_file,
        )
    )


def _size(text: str) -> int:
    try:
        return int(ByteSize.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return float(Duration.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _record(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detectord.logs import configure
    from detectord.recordings.recorder import RecorderOptions, record

    configure("console", "info")
    opts = RecorderOptions(
        out=Path(args.out),
        listen_address=args.listen_address,
        max_body_size=args.max_body_size,
        fsync_interval=args.fsync_interval,
    )
    try:
        return asyncio.run(record(opts))
    except (DetectordError, OSError) as exc:
        print(f"detectord record: {exc}", file=sys.stderr)
        return 1


def _replay(args: argparse.Namespace) -> int:
    from detectord.recordings.replay import replay, summary

    if args.speed < 0:
        print("detectord replay: --speed must be >= 0", file=sys.stderr)
        return EXIT_CONFIG
    try:
        stats = asyncio.run(replay(args.file, args.to, speed=args.speed, progress=True))
    except (DetectordError, OSError) as exc:
        print(f"detectord replay: {exc}", file=sys.stderr)
        return 1
    print(f"detectord replay: {summary(stats)}")
    return 0 if not stats.failed and not stats.refused else 1


def _score(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import numpy as np

    from detectord.config import IngestConfig, ModelConfig
    from detectord.detectors import load_model
    from detectord.recordings.scoring import iter_rows, recording_windows, score_windows

    try:
        model_cfg = ModelConfig(any_step=args.any_step)
        if args.model is not None:
            model_cfg = ModelConfig(path=Path(args.model), any_step=args.any_step)
        model = load_model(model_cfg, args.step)
        got = recording_windows(
            args.file, step_seconds=args.step or model.step_seconds, window=model.window, inputs=model.inputs
        )
    except (DetectordError, OSError) as exc:
        print(f"detectord score: {exc}", file=sys.stderr)
        return 1
    scores = score_windows(got.requests, model)
    names = IngestConfig.instance_labels
    print(
        f"{args.file}: {got.read.records} requests, {len(got.requests)} windows scored by {model.name} "
        f"(window {model.window}, step {args.step or model.step_seconds:g}s)"
        + (f"; ignored a torn tail of {got.read.torn_bytes} bytes" if got.read.torn_bytes else "")
        + (f"; {got.bad_requests} requests had refused series" if got.bad_requests else "")
    )
    for key in sorted(scores):
        s = scores[key].scores
        print(
            f"  {dict(zip(names, key, strict=True))}: {len(s)} windows, max score {float(np.max(s)):.2f}, "
            f"{int(np.sum(s > 1.0))} anomalous"
        )
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*names, "timestamp_ms", "score"])
            for key, t, v in iter_rows(scores):
                w.writerow([*key, t, repr(float(v))])
    return 0


def _remote_write(args: argparse.Namespace) -> int:
    import yaml

    from detectord.sharding import remote_writes

    try:
        entries = remote_writes(
            args.url,
            shards=args.shards,
            replicas=args.replicas,
            instance_labels=[x.strip() for x in args.instance_labels.split(",") if x.strip()],
            style="operator" if args.operator else "prometheus",
        )
    except ValueError as exc:
        print(f"detectord remote-write: {exc}", file=sys.stderr)
        return 2
    key = "remoteWrite" if args.operator else "remote_write"
    print(yaml.safe_dump({key: entries}, sort_keys=False), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from detectord.ingest.remote_read import parse_selector
    from detectord.recordings.export import DEFAULT_MATCH, ExportOptions, export, parse_time

    try:
        now = time.time()
        opts = ExportOptions(
            url=args.url,
            start_ms=parse_time(args.start, now),
            end_ms=parse_time(args.end, now),
            out=Path(args.out),
            selectors=tuple(tuple(parse_selector(m)) for m in args.match or [DEFAULT_MATCH]),
            chunk_ms=round(float(Duration.parse(args.chunk)) * 1000),
            timeout=float(Duration.parse(args.timeout)),
        )
        stats = asyncio.run(export(opts))
    except (DetectordError, OSError, ValueError) as exc:
        print(f"detectord export: {exc}", file=sys.stderr)
        return 1
    print(f"detectord export: {stats.records} requests, {stats.samples} samples of {stats.series} series to {args.out}")
    return 0


def _check_config(path: str, *, skip_model: bool) -> int:
    try:
        cfg = load_config(path)
        if cfg.backfill.url:
            from detectord.serve.backfill import matchers

            matchers(cfg.backfill)
    except ConfigError as exc:
        print(f"detectord: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not skip_model:
        from detectord.detectors import load_model
        from detectord.errors import ModelError

        try:
            model = load_model(cfg.model, cfg.ingest.step)
        except ModelError as exc:
            print(f"detectord: model error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(
            f"model {model.name} {model.version}: window {model.window}, step {model.step_seconds:g}s, "
            f"{len(model.features)} features"
        )
    print(f"{path}: OK")
    return 0


def _check_web_config(path: str) -> int:
    """Every key, certificate, key and bcrypt hash of a web config file, as serve would load them."""
    from detectord.serve.webconfig import load_web_config

    try:
        loaded = load_web_config(path)
    except ConfigError as exc:
        print(f"detectord: web config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = loaded.config
    tls = f"TLS ({cfg.tls_server_config.client_auth_type or 'NoClientCert'})" if loaded.ssl_context else "no TLS"
    print(f"{path}: OK: {tls}, {len(cfg.basic_auth_users)} basic auth users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
