"""glibc's malloc told to keep the memory a training step frees, so the next step reuses it.

A training step on a CPU allocates and frees its large activations and gradients in every step. With
glibc's defaults a freed block goes back to the kernel when it is mmapped (every block of 32 MiB or more,
and smaller ones until the first frees raise glibc's dynamic threshold) or when more than twice that
threshold lies free at the top of the heap, which the end of each backward pass leaves (the heap shrinks
by about 150 MB there in the 7-Scenes depth step); the next step takes fresh pages, each zeroed by the
kernel on first touch, a page fault per 4 KiB. That step (the bench-tiny depth model, 8 x 224 x 224 in
bf16) took about 45,000 page faults, a fifth of its time. With the mmap and trim thresholds raised to
1 GiB, freed blocks below that stay in the process and are reused: no faults in the steady state. Where
every step has the same shapes the peak stays within a few percent of glibc's; where shapes change from
step to step, freed blocks of one size may not fit the next, and the process holds more. What PyTorch's
CPU tuning guide gets from preloading jemalloc or tcmalloc, done with glibc's own ``mallopt`` in each
training process (``KeepFreedMemory``); what is free at the end of a fit, validation or test goes back
to the kernel (``malloc_trim``). The thresholds stay for the life of the process (glibc's dynamic
threshold cannot be turned back on). An older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2;
the 2.36 this was measured on takes 1 GiB): there it is 32 MiB, and blocks above it are still mmapped (most
of the gain where the large tensors are smaller, as in bf16; about half of it for float32 feature maps
above it), as the log line says. What glibc serves from its other arenas (threads other than the one that
trains, which may share them) keeps glibc's behaviour: a freed heap there still goes back to the kernel.

Left alone: anything but Linux with glibc serving ``malloc``; a process where the user set glibc's
thresholds already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_``, or those ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``); and
``DPTUNE_MALLOC=system``, which keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

from lightning.pytorch.callbacks import Callback

KEEP_BELOW = 1 << 30  # bytes: freed blocks below this stay in the process (glibc's mallopt takes an int)
OLD_GLIBC_MAX = 32 << 20  # the largest mmap threshold an older glibc takes (HEAP_MAX_SIZE / 2 on 64-bit)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")
OPT_OUT = "DPTUNE_MALLOC"
CHOICES = {"": "dptune", "dptune": "dptune", "on": "dptune", "1": "dptune", "true": "dptune", "yes": "dptune",
           "system": "system", "off": "system", "0": "system", "false": "system", "no": "system"}

_said: str | None = None  # set by the first call in a process: once per process


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc and serves ``malloc`` (no other allocator preloaded), its
    ``mallopt`` ready to call; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        own, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own: musl's mallopt takes none of these
            return None
        # the malloc this process calls is glibc's, not one from LD_PRELOAD (jemalloc, tcmalloc, mimalloc)
        if ctypes.cast(own.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def choice(env: dict[str, str] | None = None) -> str:
    """``DPTUNE_MALLOC``: ``dptune`` (unset, empty, ``dptune``, on/1/true/yes) or ``system`` (off/0/false/no)."""
    from dptune.errors import ConfigError

    value = (os.environ if env is None else env).get(OPT_OUT, "")
    picked = CHOICES.get(value.strip().lower())
    if picked is None:
        raise ConfigError(f"{OPT_OUT}={value!r}: 'system' (or off) keeps glibc's malloc defaults, 'dptune' (or unset) "
                          "keeps freed memory for the next step")
    return picked


def left_to(env: dict[str, str] | None = None) -> str | None:
    """Why this process's malloc thresholds are not dptune's to set, or None where they are."""
    env = os.environ if env is None else env
    if choice(env) == "system":
        return f"{OPT_OUT}={env.get(OPT_OUT, '').strip()}"
    own = [name for name in USER_SETTINGS if name in env]
    tunables = [part.split("=", 1)[0].strip() for part in env.get("GLIBC_TUNABLES", "").split(":")]
    own += [name for name in USER_TUNABLES if name in tunables]
    if own:
        return f"{', '.join(own)} set in the environment"
    return None


def keep_freed_memory() -> str | None:
    """Raises glibc's mmap and trim thresholds to ``KEEP_BELOW`` in this process. The first call says, in
    words, what it did or why it left them (None off glibc, where there is nothing to set); later calls
    return None."""
    global _said
    if _said is not None:
        return None
    reason = left_to()
    libc = glibc()
    if libc is None:
        _said = ""
        return None
    if reason is not None:
        _said = f"glibc malloc left as it is ({reason})"
        return _said
    # the mmap threshold first (setting either one stops glibc's dynamic threshold); an older glibc takes at
    # most HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
    mmap = next((size for size in (KEEP_BELOW, OLD_GLIBC_MAX) if libc.mallopt(M_MMAP_THRESHOLD, size)), None)
    if mmap is None or not libc.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW):
        _said = "glibc malloc left as it is (mallopt refused the thresholds)"
        return _said
    _said = (f"glibc malloc keeps freed blocks below {mmap >> 20} MiB for reuse (no page faults on each step's "
             f"large tensors; {OPT_OUT}=system keeps glibc's defaults)")
    return _said


def give_back_freed_memory() -> None:
    """What is free in the process's heap goes back to the kernel (``malloc_trim``), where dptune set the
    thresholds: the end of a fit, validation or test in a process that goes on (a notebook)."""
    if _said and _said.startswith("glibc malloc keeps"):
        libc = glibc()
        if libc is not None:
            libc.malloc_trim(0)


class KeepFreedMemory(Callback):
    """``keep_freed_memory`` in every process of a CPU run (a spawned DDP process does not run the
    Trainer's ``__init__``), and the free memory given back at each stage's end."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        give_back_freed_memory()
