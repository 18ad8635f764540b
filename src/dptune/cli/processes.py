"""Which process of a run this is, and whether a failed collective means another process of the run ended."""

from __future__ import annotations

import os


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


def refuse_started_processes(trainer) -> None:
    """A strategy whose processes Lightning starts from the launching one (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``: its multiprocessing launcher) is refused by the command line in one line, before any
    process starts. The command's multi-process runs are ``ddp``: each process runs the command itself, so
    each has dptune's signal handling, logging and error lines. Under ``ddp_spawn`` the launcher died on a
    SIGTERM with its processes unsaved (ddp saves and exits 0), a Ctrl-C's line said no checkpoint had been
    written when one had, the data's log lines were lost, and the W&B run was the launcher's."""
    from lightning.pytorch.strategies import DDPStrategy

    method = getattr(trainer.strategy, "_start_method", "popen")  # DDPStrategy's start_method argument
    try:
        device = trainer.strategy.root_device.type
    except Exception:  # noqa: BLE001 - a strategy that cannot say it yet is left to Lightning
        device = None
    # on CPUs and GPUs; a TPU's strategy (XLA, a DDPStrategy that forks) has no ddp to use instead
    if isinstance(trainer.strategy, DDPStrategy) and method != "popen" and device in ("cpu", "cuda", "mps"):
        from dptune.errors import ConfigError

        raise ConfigError(f"trainer.strategy: processes started from this one ({method}) are not supported by the "
                          "command line; use --trainer.strategy ddp, which starts every process as this command "
                          "(the same training and results; preemption, Ctrl-C and errors handled in each)")
