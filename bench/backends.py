"""Per Keras backend: how long `detectord serve` takes to become ready on the shipped default
model set, its resident memory once ready and idle, and what it prints besides JSON log lines.

    .venv/bin/python bench/backends.py                      # every installed backend, 3 runs each
    .venv/bin/python bench/backends.py --backends jax --runs 5

Needs the machine to itself: start-up is mostly importing and compiling, which other work slows.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectord.children import free_port
from detectord.detectors.backend import MODULES, PREFERRED


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _installed_mib(module: str) -> float:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent
    dirs = [root, *(root.parent / n for n in (f"{module}lib", f"{module}_plugins") if (root.parent / n).is_dir())]
    return sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file()) / 2**20


def one_run(backend: str, workdir: Path, idle_s: float) -> tuple[float, float, int]:
    """Start, wait for ready, idle, stop: seconds to ready, idle RSS, non-JSON lines printed."""
    port = free_port()
    cfg = workdir / "detectord.yml"
    cfg.write_text(f'web: {{listen_address: "127.0.0.1:{port}"}}\nstate: {{dir: "{workdir / "state"}"}}\n')
    log = workdir / f"{backend}.log"
    env = {**os.environ, "KERAS_BACKEND": backend}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "detectord", "serve", "--config.file", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"detectord exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        ready_s = time.monotonic() - t0
        time.sleep(idle_s)
        rss = _rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    noise = sum(1 for line in log.read_text().splitlines() if not line.startswith("{"))
    return ready_s, rss, noise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(b for b in PREFERRED if importlib.util.find_spec(MODULES[b])))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds idle after ready before RSS is read")
    args = ap.parse_args()
    print("backend     first start s   restart s   idle RSS MiB   non-JSON lines   installed MiB")
    for backend in args.backends.split(","):
        first, again = [], []
        for _ in range(args.runs):
            # A first start (nothing in state.dir), then a restart on what it left there.
            with tempfile.TemporaryDirectory() as tmp:
                first.append(one_run(backend, Path(tmp), args.idle))
                again.append(one_run(backend, Path(tmp), args.idle))
        runs = first + again
        cold, warm = statistics.median(r[0] for r in first), statistics.median(r[0] for r in again)
        print(
            f"{backend:<11} {cold:>13.1f} {warm:>11.1f} "
            f"{statistics.median(r[1] for r in runs):>14.0f} {max(r[2] for r in runs):>16} "
            f"{_installed_mib(MODULES[backend]):>15.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
