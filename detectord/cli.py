"""Command line: `detectord serve`, `detectord check config`, `detectord train`.

Flags follow Prometheus's conventions (`--config.file`, `--web.listen-address`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__
from .config import Config, load_config, with_listen_address
from .errors import ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detectord", description="Anomaly detection for CoreDNS fleets.")
    p.add_argument("--version", action="version", version=f"detectord {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="receive remote-write, score instances, send alerts")
    s.add_argument("--config.file", dest="config_file", default=None,
                   help="YAML config file (default: built-in defaults)")
    s.add_argument("--web.listen-address", dest="listen_address", default=None,
                   help="HOST:PORT to listen on; overrides web.listen_address")
    s.add_argument("--log.format", dest="log_format", choices=["json", "console"], default=None)
    s.add_argument("--log.level", dest="log_level", choices=["debug", "info", "warning", "error"], default=None)

    c = sub.add_parser("check", help="validate files without starting")
    csub = c.add_subparsers(dest="what", required=True)
    cc = csub.add_parser("config", help="validate a config file (and the model it names)")
    cc.add_argument("file")
    cc.add_argument("--skip-model", action="store_true", help="do not load the model")

    sub.add_parser("train", help="train the default model on regenerated synthetic data (see train --help)")
    return p


def _load(path: str | None, listen: str | None) -> Config:
    cfg = load_config(path) if path else Config()
    if listen:
        cfg = with_listen_address(cfg, listen)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # training.py owns its flags (`detectord train --help`).
        from .training import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check_config(args.file, skip_model=args.skip_model)
    try:
        cfg = _load(args.config_file, args.listen_address)
    except ConfigError as exc:
        print(f"detectord: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .logs import configure

    configure(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    from .server import serve

    return asyncio.run(serve(cfg, config_path=args.config_file, listen_override=args.listen_address))


def _check_config(path: str, *, skip_model: bool) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"detectord: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not skip_model:
        from .errors import ModelError
        from .model_loader import load_model

        try:
            model = load_model(cfg.model)
        except ModelError as exc:
            print(f"detectord: model error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"model {model.name} {model.version}: window {model.window}, step {model.step_seconds:g}s, "
              f"{len(model.features)} features")
    print(f"{path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
