"""Timing inference engines fairly on a shared machine: engines interleaved in rounds of short
blocks (the starting engine rotating), each block after the previous engine's threads stopped
spinning; latency percentiles and throughput from the timed runs; the load average and versions
recorded beside them (``dptune.tools.infer_bench``)."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "onnx", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def settle(quiet_s: float = 0.01, limit_s: float = 1.0) -> None:
    """Wait until this process's threads stop using the CPU: ONNX Runtime's and OpenMP's worker
    threads spin for tens of milliseconds after a run (measured: 30-80 ms after an ONNX Runtime
    run at 2 threads). Returns once a ``quiet_s`` window used under a tenth of it in CPU time, or
    after ``limit_s``."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        c = time.process_time()
        time.sleep(quiet_s)
        if time.process_time() - c < quiet_s / 10:
            return


def schedule(runs: int, block: int = 5) -> list[int]:
    """Timed runs per round: at least 3 rounds when there are 3 runs or more (so the rotation
    reaches every engine first), blocks of at most ``block`` runs, the rounds as even as can be."""
    rounds = min(runs, max(3, -(-runs // block)))
    return [runs // rounds + (r < runs % rounds) for r in range(rounds)]


def interleaved(fns: dict, x: np.ndarray, warmup: int, runs: int, block: int = 5) -> dict[str, dict]:
    """Time every engine of ``fns`` on ``x``: ``runs`` timed calls each, in rounds (``schedule``)
    that give every engine a block of calls in a row, the first engine rotating round by round;
    per engine the wall times and the process CPU time they took.

    Rounds let a change in machine load fall on all engines alike. Before each block the previous
    engine's worker threads are let stop spinning (``settle``) and one untimed call is made, so an
    engine's figures are its own: timed run by run, each engine shared the cores with the one
    before (at 2 threads that doubled the latencies measured)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n](x)
    wall = {n: [] for n in names}
    cpu = dict.fromkeys(names, 0.0)
    for r, todo in enumerate(schedule(runs, block)):
        for n in names[r % len(names):] + names[:r % len(names)]:
            settle()
            fns[n](x)  # untimed: the engine's own caches and threads are warm again
            for _ in range(todo):
                c, t = time.process_time(), time.perf_counter()
                fns[n](x)
                wall[n].append(time.perf_counter() - t)
                cpu[n] += time.process_time() - c
    return {n: {"wall_s": wall[n], "cpu_per_wall": cpu[n] / max(sum(wall[n]), 1e-12)} for n in names}


def latency(got: dict) -> dict:
    ms = np.array(got["wall_s"]) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "runs": len(ms),
            "cpu_per_wall": got["cpu_per_wall"]}


def throughput(got: dict, batch: int) -> dict:
    return {"images_per_s": batch * len(got["wall_s"]) / sum(got["wall_s"]), "batch": batch,
            "runs": len(got["wall_s"]), "cpu_per_wall": got["cpu_per_wall"]}
