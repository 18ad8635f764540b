"""Each benchmark measurement in a fresh process: nothing one measurement loads, compiles or leaks
(threads, allocator state, compiled graphs) reaches the next."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def _child(job: Callable[[dict[str, Any]], dict[str, Any]], opts: dict[str, Any], queue) -> None:
    try:
        queue.put(job(opts))
    except Exception as e:  # reported by the parent as a failed measurement
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_job(job: Callable[[dict[str, Any]], dict[str, Any]], opts: dict[str, Any]) -> dict[str, Any]:
    """``job(opts)`` in a spawned process; a module-level function, so the child can import it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, opts, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
