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
STAGES = ("ready", "started", "processed", "completed")  # the counts of a Lightning progress


def checked_record(record: Any) -> dict[str, Any] | None:
    """The order record as dptune writes it (Python ints below 2**48, far above any count of samples,
    so that positions and draws stay within int64; the seed one that
    seed_everything takes, ``done`` a bool, ``identity`` a string), or None: a hand-made record or
    none (``{}``: a checkpoint written before dptune recorded the order)."""
    if not isinstance(record, dict):
        return None
    try:
        state = {key: record[key] for key in COUNTS}
        state["done"], state["identity"] = record["done"], record["identity"]
    except KeyError:
        return None
    good = (all(type(state[k]) is int and 0 <= state[k] < 2**48 for k in COUNTS)
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


BATCHES = "epoch_loop.batch_progress"  # the fit loop's count of the epoch's batches
_PROGRESS = ("epoch_progress", BATCHES)


def damaged_loops(loops: Any, names: tuple[str, ...] = _PROGRESS) -> str | None:
    """What is wrong with the counts a resume restarts from (Lightning's epoch and batch progress of the
    fit loop, which it reads without a check), or None: each a count of ``ready``, ``started``,
    ``processed`` and ``completed``, whole numbers from 0, for the run (``total``) and the epoch (``current``)."""
    fit = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit, dict):
        return "loops.fit_loop is missing"
    for name in names:
        progress = fit.get(name)
        if not isinstance(progress, dict):
            return f"loops.fit_loop[{name!r}] is missing"
        for part in ("total", "current"):
            counts = progress.get(part)
            if not isinstance(counts, dict):
                return f"loops.fit_loop[{name!r}].{part} is missing"
            for stage in STAGES:
                value = counts.get(stage)
                if type(value) is not int or value < 0:
                    return f"loops.fit_loop[{name!r}].{part}.{stage} is {value!r}, not a count"
    return None


def batch_progress(ckpt: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]] | None:
    """The fit loop's batch progress of a checkpoint (current, total), or None where its counts are damaged
    (``damaged_loops``) or the run's total is below the epoch's."""
    if damaged_loops(ckpt.get("loops"), (BATCHES,)) is not None:
        return None
    progress = ckpt["loops"]["fit_loop"][BATCHES]
    current, total = progress["current"], progress["total"]
    if any(total[k] < current[k] for k in STAGES):
        return None
    return current, total


def loop_epoch(ckpt: dict[str, Any]) -> int | None:
    """The epoch a checkpoint written inside it was in, as Lightning's loop state counts (None: no such count)."""
    try:
        epoch = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        return None
    return epoch if type(epoch) is int else None


def step_samples(share: int, batch_size: int) -> int:
    """The samples a process's training batch holds: ``batch_size``, or its whole share where that is less
    (an epoch of one partial batch, which ``make_loader`` keeps)."""
    return min(batch_size, share) if share > 0 else batch_size


def written_as_a_batch_ended(total: dict[str, int]) -> bool:
    """Whether the run's batch counts are those of a checkpoint written as a batch ended, before Lightning
    counted it complete (ready = started = processed = completed + 1): Lightning's restart completes it."""
    return total["started"] == total["ready"] == total["processed"] == total["completed"] + 1


def restart_count(current: dict[str, int], total: dict[str, int]) -> int:
    """The batches of the interrupted epoch that Lightning's restart counts done: its completed count,
    and the batch it completes where the checkpoint was written as that batch ended."""
    return current["completed"] + written_as_a_batch_ended(total)


def validates_at(trainer, steps: int, epoch: int, earlier: int):
    """Whether Lightning's restart at a count of the epoch's batches (``steps`` an epoch; ``earlier``: the
    run's batches before this epoch) is one of its validation points, as its training loop asks
    (``_should_check_val_fx`` at the batch before the count; a count of 0 asks at batch -1): a function
    of the count, or None where it validates by time. No validation this epoch: never."""
    interval, every_n = getattr(trainer, "val_check_interval", 1.0), getattr(trainer, "check_val_every_n_epoch", 1)
    if getattr(trainer, "limit_val_batches", 1) == 0 or (every_n is not None and (epoch + 1) % every_n):
        return lambda count: False
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    if isinstance(interval, int) and not isinstance(interval, bool):
        every = max(1, interval)
    elif isinstance(interval, float):
        every = max(1, int(steps * interval))
    else:
        return None
    return (lambda count: count % every == 0) if every_n is not None else \
        (lambda count: (earlier + count) % every == 0)  # across epochs: the run's count of batches


def epoch_started(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint was written inside an epoch (Lightning's epoch progress: one more epoch ready
    than completed), not after one ended."""
    try:
        epochs = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(epochs["ready"]) > int(epochs["completed"])
    except (KeyError, TypeError, ValueError):
        return False


def rebatch(ckpt: dict[str, Any], key: str, n: int, batch_size: int, trainer,
            cut: bool = False) -> tuple[int, int, int, bool] | str | None:
    """Lightning counts the steps left in an interrupted epoch from the checkpoint's batches: at another
    batch size or number of processes those are the old run's batches, so the resumed epoch took more
    or fewer samples than its order had left (a whole epoch of the new run's batches: no step, and no
    validation of that epoch). The checkpoint's count (its loop state and the order record ``key``)
    becomes the batches of this run that the samples trained so far fill: ``n`` training samples in
    batches of ``batch_size`` on ``trainer.world_size`` processes, rounded down (up to a batch of
    samples may be drawn a second time at the epoch's end, as where the samples trained are not a whole
    number of this run's batches), and at most one batch short of the epoch, which so ends with a step
    and its validation. A checkpoint ``cut`` inside a validation: Lightning runs it again only where its
    count is a validation point, so the count is the last one at or before it (for a validation cut at
    an epoch's end, the epoch's end where that is one; the checkpoint's last batch of the epoch still
    ends the epoch after that validation). Nothing changes where the record is not dptune's,
    counts no batch, ends its epoch (uncut), or holds another set of ``n``. Returns (the checkpoint's
    batches, this run's, the epoch's batches, whether a cut validation is not run again: no validation
    point to count at) where it changed them; ``"disagrees"`` where the record's
    epoch or batches are not what Lightning's restart reads from the loop state (a hand-made record)."""
    state, progress = checked_record(ckpt.get(key)), batch_progress(ckpt)
    if state is None or progress is None or state["consumed"] == 0 or state["size"] != n:
        return None
    # an epoch whose samples were all trained, and whose restart Lightning begins inside it (an epoch ended
    # and validated has begun none since): counted as a whole epoch of this run's, so that the restart ends it
    # (a count below the new epoch's length was taken for the next epoch's first batches, which it then skipped).
    # Written at the validation that ends the epoch (the last.ckpt of a finished run, extended by a resume),
    # Lightning's loop state counts the epoch processed already and starts the next: nothing to count either
    if state["done"] and not cut and (not epoch_started(ckpt) or loop_epoch(ckpt) == state["epoch"] + 1):
        return None
    current, total = progress
    batches = restart_count(current, total)
    if batches != state["batches"] or loop_epoch(ckpt) != state["epoch"]:
        return "disagrees"
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    share = math.ceil(n / world)
    steps = steps_per_epoch(trainer, share, batch_size)
    if steps < 1:
        return None
    now = max(0, min(state["consumed"] // (step_samples(share, batch_size) * world), steps - 1))
    point = validates_at(trainer, steps, state["epoch"], total["ready"] - current["ready"])
    if state["done"]:
        now = steps
    if cut:  # the last validation point at or before the count (an epoch's end: the whole epoch)
        while point is not None and now > 0 and not point(now):
            now -= 1
    if now == batches:
        return None
    # every count by as much: Lightning's restart reads their differences. A count of 0 written as a batch
    # ended (completed one less) is written as that batch complete: the restart would have completed it
    ended = now == 0 and written_as_a_batch_ended(total)
    for part in (current, total):
        for stage in STAGES:
            part[stage] += now - batches + (1 if ended and stage == "completed" else 0)
    stepped = ckpt["loops"]["fit_loop"].get("epoch_loop.state_dict")
    if now == 0 and not ended and not cut and current["ready"] == current["completed"] and point is not None \
            and point(0) and isinstance(stepped, dict) and type(stepped.get("_batches_that_stepped")) is int \
            and stepped["_batches_that_stepped"] > 0:
        # Lightning's restart at a count of 0 after a whole batch, where it asks for a validation, spends an
        # iteration on no batch (it takes that validation as run), which counts the logger's step
        stepped["_batches_that_stepped"] -= 1
    ckpt[key]["batches"] = now
    return batches, now, steps, cut and (point is None or not point(now))


def say_rebatched(epoch: int, batches: int, now: int, steps: int) -> None:
    """One line: the checkpoint's batches of the interrupted epoch counted in this run's (``rebatch``)."""
    def count(k: int) -> str:
        return f"{k} batch" if k == 1 else f"{k} batches"

    log.info("resume: epoch %d: the checkpoint's %s of it count as %d at this run's batch size and number of "
             "processes (%s of the epoch's %d left)", epoch, count(batches), now, count(steps - now), steps)


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
