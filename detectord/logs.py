"""structlog set-up: JSON lines for machines or a console renderer for people."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import structlog


def configure(fmt: str = "json", level: str = "info") -> None:
    lvl = getattr(logging, level.upper())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (aiohttp, JAX, TensorFlow) go to the same
    # stream in the same format, with the logger's name.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
    # A backend's C++ start-up lines (TensorFlow's oneDNN and cpu_feature_guard notes, absl's
    # preamble) would land between the JSON lines; --log.level debug shows them. TensorFlow
    # reads this at its import, which comes later.
    global _backend_noise_shown
    _backend_noise_shown = lvl <= logging.DEBUG
    if not _backend_noise_shown:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


_backend_noise_shown = True
# What C++ libraries print outside any log level: absl/glog lines ("I0000 00:00:… port.cc:153] …"),
# absl's preamble and TensorFlow's CPU instruction note.
_NOISE = re.compile(
    rb"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|To enable the following instr)"
)


@contextlib.contextmanager
def backend_noise_held() -> Iterator[None]:
    """While a backend is imported and first run, hold what reaches file descriptor 2 and pass on
    all but the libraries' start-up notes (TensorFlow prints some before any log level applies).
    Lines other threads log meanwhile are passed on when it ends. Shown as is at debug level."""
    if _backend_noise_shown:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                for line in held:
                    if not _NOISE.match(line):
                        os.write(2, line)
    finally:
        os.close(saved)
