"""glibc's malloc told to keep the memory a training step frees, so the next step reuses it.

By default glibc gives every block of 32 MiB or more (less until the first frees raise its dynamic
threshold) to the kernel when it is freed, and takes fresh pages for the next one: each page of a
fresh block is zeroed by the kernel on first touch, a page fault per 4 KiB. A training step on a CPU
allocates and frees its large activations and gradients in every step: the depth head's
full-resolution feature maps of the 7-Scenes recipe (8 x 32 x 224 x 224 in bf16, 26 MB each) cost
about 45,000 page faults a step, a fifth of the step's time. With the thresholds raised to 1 GiB,
freed blocks below that stay in the process and are reused: no faults in the steady state, the same
peak memory (the next step needs the same blocks again). What PyTorch's CPU tuning guide gets from
preloading jemalloc or tcmalloc, done with glibc's own ``mallopt`` where the run starts.

Left alone: anything but Linux with glibc; a process where the user set glibc's malloc already
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``,
``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) or preloaded another allocator (``LD_PRELOAD``); and
``DPTUNE_MALLOC=system``, which keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEEP_BELOW = 1 << 30  # bytes: freed blocks below this stay in the process (glibc's mallopt takes an int)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OPT_OUT = "DPTUNE_MALLOC"  # "system": glibc's defaults

_done: str | None = None  # what the first call did, in words: once per process


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (its mallopt ready to call), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own: musl's mallopt takes none of these
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def left_to(env: dict[str, str] | None = None) -> str | None:
    """Why this process's malloc is not dptune's to set, or None where it is."""
    env = os.environ if env is None else env
    if env.get(OPT_OUT, "").strip().lower() == "system":
        return f"{OPT_OUT}=system"
    own = [name for name in USER_SETTINGS if name in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    if own:
        return f"{', '.join(own)} set in the environment"
    if env.get("LD_PRELOAD", "").strip():
        return "LD_PRELOAD set (another allocator may serve malloc)"
    return None


def keep_freed_memory() -> str | None:
    """Raises glibc's mmap and trim thresholds to ``KEEP_BELOW`` in this process, once. Returns what was
    done, in words, the first time it changes something; None otherwise (done already, not glibc, or
    left to the user's settings)."""
    global _done
    if _done is not None or left_to() is not None:
        return None
    libc = glibc()
    if libc is None:
        return None
    # the mmap threshold first: setting either one stops glibc's dynamic threshold
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW)):
        return None
    _done = (f"glibc malloc keeps freed blocks below {KEEP_BELOW >> 20} MiB for reuse (no page faults on each "
             f"step's large tensors; {OPT_OUT}=system keeps glibc's defaults)")
    return _done
