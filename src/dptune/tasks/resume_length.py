"""How far a checkpoint's run got, and whether it leaves the run that resumes it anything to train: one
line before anything is restored or written where it does not (``dptune.tasks.checkpoints.ResumeCheck``
calls these)."""

from __future__ import annotations

import logging
from typing import Any

from dptune.errors import ConfigError

log = logging.getLogger(__name__)


def epochs_done(ckpt: dict[str, Any]) -> int:
    """The epochs a checkpoint's run has trained through (a checkpoint written as an epoch's
    validation ends counts that epoch: it is "processed", not yet "completed" in Lightning's loop)."""
    try:
        progress = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(max(progress["processed"], progress["completed"]))
    except (KeyError, TypeError, ValueError):
        return int(ckpt.get("epoch") or 0)


def order_record(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's record of its training order (the datamodule's; ``dptune.data.order``), if it has one."""
    for key, value in ckpt.items():
        if key.endswith("DataModule") and isinstance(value, dict) and "identity" in value:
            return value
    return None


def _run_config(path: str) -> str:
    """The config.yaml of the run that wrote the checkpoint ``path`` (beside its checkpoints/ folder), or
    where it would be."""
    from pathlib import Path

    here = Path(path).resolve().parent
    found = next((d / "config.yaml" for d in (here, here.parent) if (d / "config.yaml").is_file()), None)
    return str(found) if found else "RUN/config.yaml"


def check_epochs(ckpt: dict[str, Any], path: str, max_epochs: int | None, max_steps: int | None = None) -> None:
    """One line, before anything is restored or written, when this run's ``max_epochs`` is below the
    epochs the checkpoint has trained (Lightning raised a MisconfigurationException with a traceback,
    after the run's config.yaml was written), or when it leaves nothing to train: ``max_epochs`` at
    the epochs trained (a checkpoint cut inside the next epoch: Lightning said nothing, trained
    nothing and exited 0) or ``max_steps`` at the steps done. A checkpoint cut inside a validation
    still has that validation to run, except at ``max_steps`` (Lightning's fit stops before it): a warning
    says to score it."""
    from dptune.tasks.optimizing import validation_cut

    done = epochs_done(ckpt)
    if max_epochs is not None and max_epochs != -1 and done > max_epochs:
        raise ConfigError(f"{path}: the checkpoint has trained {done} epochs; this run sets trainer.max_epochs "
                          f"{max_epochs}, below that: resume with --trainer.max_epochs {done + 1} or more to train "
                          f"on, or start a new run from its weights: --model.pretrained {path} without --ckpt_path")
    step = ckpt.get("global_step")
    if validation_cut(ckpt):
        if max_steps is not None and max_steps != -1 and isinstance(step, int) and step >= max_steps:
            from dptune.data.loaders import rank

            if rank() == 0:  # Lightning's fit runs nothing once max_steps is reached, the cut validation neither
                log.warning("resume: %s stopped inside the validation at this run's last step (trainer.max_steps "
                            "%d), which Lightning does not run again once max_steps is reached: the run is done; "
                            "score that checkpoint with dptune validate --config %s --ckpt_path %s (from where the "
                            "run started: its paths are relative to there)", path, max_steps, _run_config(path), path)
        return
    record = order_record(ckpt) or {}
    batches = record.get("batches")  # read before the record's own check (OrderState): a hand-made one is any type
    part = " and part of the next" if record.get("done") is False and type(batches) is int and batches > 0 else ""
    if max_epochs is not None and max_epochs != -1 and done == max_epochs:
        raise ConfigError(f"{path}: the checkpoint has trained {done} epochs{part}; this run sets "
                          f"trainer.max_epochs {max_epochs}: nothing is left to train; resume with "
                          f"--trainer.max_epochs {done + 1} or more to train on")
    if max_steps is not None and max_steps != -1 and isinstance(step, int) and step >= max_steps:
        raise ConfigError(f"{path}: the checkpoint has done {step} optimizer steps; this run sets trainer.max_steps "
                          f"{max_steps}: nothing is left to train; raise --trainer.max_steps (or -1: no limit)")
