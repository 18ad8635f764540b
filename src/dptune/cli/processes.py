"""Which process of a run this is, and whether a failed collective means another process of the run ended."""

from __future__ import annotations

import os
import re


def first_process() -> bool:
    """Whether this is the run's first process, which says what the run is: torchrun sets RANK in every
    process (LOCAL_RANK 0 too in its first); Lightning's launcher starts the others with LOCAL_RANK 1, 2, ..."""
    rank = os.environ.get("RANK")
    if rank:
        return rank == "0"
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") and os.environ.get("NODE_RANK", "0") in ("", "0")


# what gloo and NCCL raise in the other processes of a run when one of them ended (bad data found
# while training, a setting refused by one process)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
             "NCCL communicator was aborted", "Broken pipe")


def peer_stopped(e: BaseException) -> bool:
    """A collective of a run of several processes failed because another process of the run ended."""
    several = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") or os.environ.get("LOCAL_RANK") is not None
    return several and any(m in str(e) for m in PEER_GONE)


def spawned_error(text: str) -> Exception | None:
    """The ``DataError`` or ``ConfigError`` that a process ``ddp_spawn`` started raised, from the text torch
    hands the launching process (``ProcessRaisedException``: the process's traceback, formatted): the last
    exception of that traceback, where it is one of those two kinds (its subclasses as their base); None
    for any other exception, which is a bug and keeps its traceback."""
    from dptune import errors

    found = list(re.finditer(r"^dptune\.errors\.(\w+): ", text, re.M))
    if not found:
        return None
    last = found[-1]
    said = text[last.end():].rstrip()
    if re.search(r"^Traceback \(most recent call last\):|^\s+File \"", said, re.M):
        return None  # not the last exception of the traceback
    kind = getattr(errors, last.group(1), None)
    for base in (errors.DataError, errors.ConfigError):
        if isinstance(kind, type) and issubclass(kind, base):
            return base(said)
    return None
