"""Inference on an accelerator: windows/s and batch latency of the shipped model's compiled
forward pass, per backend and batch size, and through the real inference worker.

Made for a GPU machine that has JAX or PyTorch but not TensorFlow: the models are backend-agnostic
Keras 3, so they load and score there with `KERAS_BACKEND=jax` or `torch`. Runs on CPU too.

    .venv/bin/python bench/device_inference.py --backend jax --batch 1024 4096 16384
    python bench/device_inference.py --backend torch --batch 1024 4096 16384 65536   # on a device

Prints the device, then for each batch size: windows/s, and p50 and p99 seconds per batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP_S = 15.0


def _device(backend: str) -> str:
    if backend == "jax":
        import jax

        return ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return "cpu"


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("jax", "torch", "tensorflow"), default="jax")
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--seconds", type=float, default=5.0, help="timed per batch size")
    p.add_argument("--model", type=Path, default=REPO / "models/default")
    p.add_argument("--no-worker", action="store_true", help="time the forward pass only")
    p.add_argument("--worker-batch", type=int, help="the worker's max batch (default: the biggest --batch)")
    p.add_argument("--worker-windows", type=int, default=4_000_000, help="windows sent through the worker, at most")
    args = p.parse_args()
    # Before Keras is imported anywhere: the backend is fixed at import.
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np

    from detectord.config import ModelConfig
    from detectord.detectors import load_model

    model = load_model(ModelConfig(path=args.model), STEP_S)
    print(f"keras {keras.__version__} on {keras.backend.backend()}; device: {_device(args.backend)}")
    print(f"model {model.name}: window {model.window} x {len(model.features)} features")
    rng = np.random.default_rng(0)
    biggest = max(args.batch)
    windows = rng.random((biggest, model.window, len(model.features)), dtype=np.float32)

    print(f"{'batch':>7} {'windows/s':>12} {'p50 s/batch':>12} {'p99 s/batch':>12} {'batches':>8}")
    for b in args.batch:
        x = windows[:b]
        model.score_batch(x)  # compiles this batch size
        lat: list[float] = []
        t_end = time.perf_counter() + args.seconds
        while time.perf_counter() < t_end or len(lat) < 20:
            t0 = time.perf_counter()
            model.score_batch(x)  # returns numpy: the device's work is done when it does
            lat.append(time.perf_counter() - t0)
        rate = b * len(lat) / sum(lat)
        print(f"{b:>7} {rate:>12,.0f} {_percentile(lat, 0.5):>12.5f} {_percentile(lat, 0.99):>12.5f} {len(lat):>8}")

    if not args.no_worker:
        from bench.ingest_inference import bench_inference

        batch = args.worker_batch or biggest
        _, through, backend = bench_inference(args.seconds, batch, args.model, args.worker_windows)
        print(f"through the inference worker (batch {batch}, {backend}): {through:,.0f} windows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
