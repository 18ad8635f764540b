"""A run resumed in the middle of an epoch (``dptune.data.order``): the checkpoint's record of how far
into its epoch's order the run was, checked; Lightning's count of the epoch's batches re-expressed
at the resumed run's batch size and number of processes (``rebatch``); and the lines that say what
the rest of the epoch trains."""

from __future__ import annotations

import logging
import math
from typing import Any

from dptune.data.loaders import drops_last_batch

log = logging.getLogger(__name__)

COUNTS = ("seed", "size", "epoch", "batches", "consumed")
BATCH_PROGRESS = ("loops", "fit_loop", "epoch_loop.batch_progress")
_STAGES = ("ready", "started", "processed", "completed")


def checked_record(record: Any) -> dict[str, Any] | None:
    """The order record as dptune writes it (Python ints below 2**63, the seed one that
    seed_everything takes, ``done`` a bool, ``identity`` a string), or None: a hand-made record or
    none (``{}``: a checkpoint written before dptune recorded the order)."""
    if not isinstance(record, dict):
        return None
    try:
        state = {key: record[key] for key in COUNTS}
        state["done"], state["identity"] = record["done"], record["identity"]
    except KeyError:
        return None
    good = (all(type(state[k]) is int and 0 <= state[k] < 2**63 for k in COUNTS)
            and isinstance(state["done"], bool) and isinstance(state["identity"], str) and state["seed"] < 2**32)
    return state if good else None


def steps_per_epoch(trainer, share: int, batch_size: int) -> int:
    """The training batches of an epoch as Lightning counts them: a process's share in batches (the last
    partial one dropped where a process has a whole one, as ``make_loader`` does), within
    ``limit_train_batches``."""
    steps = share // batch_size if drops_last_batch(share, batch_size) else math.ceil(share / batch_size)
    limit = getattr(trainer, "limit_train_batches", None)
    if isinstance(limit, float) and limit < 1:
        steps = int(steps * limit)
    elif isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        steps = min(steps, limit)
    return steps


def _batch_progress(ckpt: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]] | None:
    progress: Any = ckpt
    for key in BATCH_PROGRESS:
        progress = progress.get(key) if isinstance(progress, dict) else None
    if not isinstance(progress, dict):
        return None
    current, total = progress.get("current"), progress.get("total")
    if not all(isinstance(p, dict) and all(type(p.get(k)) is int and p[k] >= 0 for k in _STAGES)
               for p in (current, total)) or any(total[k] < current[k] for k in _STAGES):
        return None
    return current, total


def loop_epoch(ckpt: dict[str, Any]) -> int | None:
    """The epoch a checkpoint written inside it was in, as Lightning's loop state counts (None: no such count)."""
    try:
        epoch = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        return None
    return epoch if type(epoch) is int else None


def rebatch(ckpt: dict[str, Any], key: str, n: int, batch_size: int, trainer) -> tuple[int, int] | str | None:
    """Lightning counts the steps left in an interrupted epoch from the checkpoint's batches: at another
    batch size or number of processes those are the old run's batches, so the resumed epoch took more
    or fewer samples than its order had left (a whole epoch of the new run's batches: no step, and no
    validation of that epoch). The checkpoint's count (its loop state and the order record ``key``)
    becomes the batches of this run that the samples trained so far fill: ``n`` training samples in
    batches of ``batch_size`` on ``trainer.world_size`` processes, rounded down (up to a batch of
    samples may be drawn a second time at the epoch's end, as where the samples trained are not a whole
    number of this run's batches), and at most one batch short of the epoch, which so ends with a step
    and its validation. Nothing changes where the record is not dptune's, counts no batch, ends its
    epoch, or holds another set of ``n``. Returns (the checkpoint's batches, this run's) where it
    changed them; ``"disagrees"`` where the record's epoch or batches are not the loop state's (a hand-made
    record)."""
    state, progress = checked_record(ckpt.get(key)), _batch_progress(ckpt)
    if state is None or progress is None or state["done"] or state["consumed"] == 0 or state["size"] != n:
        return None
    current, total = progress
    batches, gap = current["processed"], current["processed"] - current["completed"]
    if batches != state["batches"] or gap not in (0, 1) or any(current[k] != batches for k in _STAGES[:3]) \
            or loop_epoch(ckpt) != state["epoch"]:
        return "disagrees"  # Lightning writes ready = started = processed, and completed one less as a batch ends
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    steps = steps_per_epoch(trainer, math.ceil(n / world), batch_size)
    now = max(0, min(state["consumed"] // (batch_size * world), steps - 1))
    if now == batches or steps < 1:
        return None
    # every count by as much (Lightning's restart reads their differences), but a batch written as it ended
    # (completed one less) at a count of 0: Lightning would count it complete on restart, one of this run's
    drop = gap if now < gap else 0
    for part in (current, total):
        for stage in _STAGES:
            part[stage] += now - batches + (drop if stage == "completed" else 0)
    stepped = ckpt["loops"]["fit_loop"].get("epoch_loop.state_dict")
    if drop and isinstance(stepped, dict) and type(stepped.get("_batches_that_stepped")) is int:
        stepped["_batches_that_stepped"] += 1  # the logger's step, which that restart would have counted
    ckpt[key]["batches"] = now
    return batches, now


def say_rebatched(epoch: int, batches: int, now: int, steps: int) -> None:
    """One line: the checkpoint's batches of the interrupted epoch counted in this run's (``rebatch``)."""
    log.info("resume: epoch %d: the checkpoint's %d training batches count as %d at this run's batch size and "
             "number of processes (%d of the epoch's %d steps left)", epoch, batches, now, steps - now, steps)


def say_resumed(state: dict[str, Any], n: int, takes: int, share: int, batch_size: int, world: int) -> None:
    """One line: what the rest of the interrupted epoch trains (``takes`` samples, all processes)."""
    consumed, why = state["consumed"], " (the steps this run leaves in the epoch, in whole batches of its size)"
    rest = max(0, n - consumed)
    if consumed >= n:  # an earlier resume went on into the epoch's second pass
        said = (f"had reached each of its {n} training samples; it continues with {takes} of them drawn a second "
                f"time{why}")
    elif takes >= rest:
        said = f"continues with the {rest} of its {n} training samples it had not reached"
        said += f", and {takes - rest} from its start{why}" if takes > rest else ""
    else:
        other = rest - takes
        # a last partial batch that every epoch leaves out (each process drops its own)
        dropped = (share % batch_size) * world if drops_last_batch(share, batch_size) else 0
        said = (f"continues with {takes} of the {rest} of its {n} training samples it had not reached; the other "
                f"{other} {'is' if other == 1 else 'are'} " + ("left out, as every epoch's last partial batch is"
                                                               if other <= dropped else f"not trained in this epoch{why}"))
    log.info("resume: epoch %d %s", state["epoch"], said)
