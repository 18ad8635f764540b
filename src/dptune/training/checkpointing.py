"""Checkpoints that are never stale, half-written or of a diverged run, and Ctrl-C / SIGTERM that
are never lost: ``Checkpoint`` and ``InterruptGuard``."""

from __future__ import annotations

import logging
import os
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer

from dptune.training.checkpoint_state import follow_moved, same_file, template_field, twin_file

log = logging.getLogger(__name__)

INTERRUPTED: list[str] = []  # a fit stopped by Ctrl-C: what to tell the user (set by Checkpoint.on_exception)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state after every validation.

    Lightning 2.6 only refreshes ``last.ckpt`` when a top-k checkpoint is written in the same
    step, so a run whose metric stops improving would leave a stale ``last.ckpt`` to resume
    from or export. At a step that wrote a best checkpoint, ``last.ckpt`` is a hard link to it (the
    same bytes, written once: ``checkpoint_state.twin_file``).

    A run whose weights or optimizer state hold a NaN or inf has diverged: no checkpoint of it is
    written or selected as best (the run stops with one line instead; while Lightning handles
    another exception, such a checkpoint is left unwritten with a warning).
    """

    _in_exception = False
    _validation_cut = False  # on_exception: SIGTERM stopped a validation of the fit

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        """Lightning's names, where a logged value whose key holds ``[ ] { } :`` (``val/IoU/Tree[s]``,
        named after a class) can be a field of the template, written as it is (``{val/IoU/Tree[s]:.4f}``)
        or as ``template_field(key)``: Lightning's template reader stops at those characters."""
        template = filename or self.filename
        aliases = {}
        for key, value in metrics.items():
            field = template_field(key)
            if field != key and field not in metrics:
                aliases[field] = value
                if template:
                    template = template.replace("{" + key + ":", "{" + field + ":").replace("{" + key + "}",
                                                                                         "{" + field + "}")
        return super().format_checkpoint_name({**metrics, **aliases}, template, ver, prefix)

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state, without the +-inf "no k-th best yet" sentinel: a checkpoint holds no
        non-finite tensor at all (the sentinel is rebuilt from the mode on load)."""
        import torch

        state = super().state_dict()
        for key in ("kth_value", "best_model_score", "current_score"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                if key == "kth_value":
                    del state[key]
                else:
                    state[key] = None
        return state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A run resumed with the other mode (its monitor's own since the mode follows it: an earlier run kept
        the task's default) keeps its last and best files: Lightning files this callback's state under a key
        that holds the mode, so none of it came back (last-v1.ckpt beside a stale last.ckpt, a second best
        file). Its best is chosen by the new mode from the next validation on."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        other = "max" if self.mode == "min" else "min"
        earlier = self.state_key.replace(f"'mode': '{self.mode}'", f"'mode': '{other}'")
        if earlier in states:
            state = states[self.state_key] = dict(states.pop(earlier))
            kept = {path: float(score) for path, score in (state.get("best_k_models") or {}).items()}
            if kept:  # the best and the k-th of the files kept, by the new mode (the old k-th is the new best)
                best, kth = (min, max) if self.mode == "min" else (max, min)
                first, last = best(kept, key=kept.get), kth(kept, key=kept.get)
                state.update(best_model_path=first, best_model_score=state["best_k_models"][first],
                             kth_best_model_path=last, kth_value=state["best_k_models"][last])
            from dptune.data.loaders import rank

            if rank() == 0:
                log.info("resume: the run chose its best checkpoint by mode %s, now by %s (what %s measures); its "
                         "last and best checkpoints are kept", other, self.mode, self.monitor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run moved to another folder with its checkpoints (scratch to home) and resumed there keeps
        its best score and its last and best files, followed to the new folder; Lightning forgot them
        (the folder's path changed), wrote last-v1.ckpt beside a stale last.ckpt, and chose a best
        among the resumed epochs only. A checkpoint resumed into a folder without those files starts
        the folder's best afresh, as Lightning does."""
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            followed = follow_moved(state_dict, str(old), str(self.dirpath), self.mode)
            if followed is not None:
                from dptune.data.loaders import rank

                if os.path.realpath(old) != os.path.realpath(self.dirpath) and rank() == 0:
                    log.info("resume: the run's checkpoints moved from %s to %s; its last and best checkpoints "
                             "are followed there", old, self.dirpath)
                state_dict = followed
        super().load_state_dict(state_dict)

    @staticmethod
    def _nonfinite(trainer: pl.Trainer) -> list[str]:
        """This process's parameters, buffers and optimizer state tensors that hold a NaN or inf."""
        from dptune.tasks.optim import nonfinite_tensors

        module = trainer.lightning_module
        named = [*module.named_parameters(), *module.named_buffers()]
        for i, opt in enumerate(trainer.optimizers):
            for state in opt.state.values():
                named += [(f"optimizer {i} state {k}", v) for k, v in state.items()]
        return nonfinite_tensors(named)

    def _check_weights(self, trainer: pl.Trainer) -> None:
        """Stop (on every process alike) rather than write or select a checkpoint of non-finite weights."""
        if self._in_exception:
            return  # ``_save_checkpoint`` looks, without collectives
        if getattr(self, "_finite_at_step", None) == trainer.global_step:
            return  # checked for the other checkpoint of this step
        bad = self._nonfinite(trainer)
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            self._finite_at_step = trainer.global_step
            return
        from dptune.errors import ConfigError

        raise ConfigError(f"training diverged: at step {trainer.global_step} {len(bad) or 'some'} tensors of the run "
                          f"hold NaN/inf (e.g. {bad[0] if bad else 'on another process'}); no checkpoint written. "
                          f"Resume from an earlier checkpoint with a lower --model.lr")

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._in_exception:
            bad = self._nonfinite(trainer)
            if bad:
                log.warning("not writing %s: %d tensors hold NaN/inf (e.g. %s)", filepath, len(bad), bad[0])
                return
        # atomic: a job killed while writing leaves the previous file, never half of a new one
        partial = f"{filepath}.partial"
        twin = None if self._in_exception or filepath != self.last_model_path else \
            twin_file(getattr(self, "_written", None), trainer.global_step, filepath, len(trainer.checkpoint_callbacks),
                      clocked=any(isinstance(cb, Timer) for cb in trainer.callbacks))
        if twin is None:
            super()._save_checkpoint(trainer, partial)
            if trainer.is_global_zero:
                os.replace(partial, filepath)
            self._written = (trainer.global_step, filepath, self.last_model_path)
        else:
            if trainer.is_global_zero:
                same_file(twin, partial)
                os.replace(partial, filepath)
            self._last_global_step_saved = trainer.global_step
            for logger in trainer.loggers if trainer.is_global_zero else []:
                logger.after_save_checkpoint(proxy(self))  # as Lightning's own save tells them
        trainer.strategy.barrier("dptune-checkpoint")
        self._last_checkpoint_saved = filepath
        if filepath == self.last_model_path:
            self._last_step_saved = trainer.global_step  # what a Ctrl-C line says last.ckpt holds

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (preemption; Lightning stops at the next step) write ``last.ckpt`` mid-epoch,
        so that ``--ckpt_path last`` resumes at the same global step."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._in_exception = True  # no collectives, no new exception: a non-finite state is left unwritten
        # stopped inside a validation of the fit: its scores are lost with the process, so the checkpoint
        # says the validation has not started (see on_save_checkpoint) and the resume runs all of it
        self._validation_cut = (isinstance(exception, SIGTERMException) and trainer.validating
                                and not trainer.sanity_checking)
        try:
            super().on_exception(trainer, pl_module, exception)
            if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit" and trainer.is_global_zero:
                # Lightning ends a Ctrl-C with a bare exit 1; dptune.cli.main turns it into this line and 130
                last = self.last_model_path if self.last_model_path and os.path.isfile(self.last_model_path) else None
                held = getattr(self, "_last_step_saved", None)
                since = trainer.global_step - held if held is not None and last else 0
                INTERRUPTED.append(f"interrupted (Ctrl-C) at step {trainer.global_step}; "
                                   + (f"resume from the last checkpoint with --ckpt_path last ({last})" if last else
                                      "no checkpoint was written yet: start the run again")
                                   + (f"; it holds step {held}: the {since} step{'s' * (since > 1)} since "
                                      f"{'are' if since > 1 else 'is'} not in it" if since > 0 else ""))
            if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
                if self._last_global_step_saved != trainer.global_step:
                    self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                last = self.last_model_path if self.last_model_path and os.path.isfile(self.last_model_path) else None
                if trainer.is_global_zero and last:
                    log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path last", last, trainer.global_step)
                elif trainer.is_global_zero:
                    log.warning("SIGTERM at step %d: no checkpoint was written (nothing trained yet); the run starts "
                                "from the beginning when started again", trainer.global_step)
        finally:
            self._in_exception = self._validation_cut = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written at SIGTERM during a validation of the fit (SIGTERM at an epoch's last
        training step is one: Lightning stops after the first validation batch) records that validation
        as cut at its first batch, which Lightning's resume runs again from the start. Saved as it was, the
        resume took the validation for done: the epoch was never scored nor its best checkpoint chosen,
        and at the run's last step the resume had nothing left to train. Every other checkpoint records
        its validations as whole (a cut one that was run again counts one batch too many, which would
        read as another cut: a finished run would resume, and train nothing, instead of being refused)."""
        from dptune.tasks.optimizing import mark_validation_cut

        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        mark_validation_cut(checkpoint, cut=self._validation_cut)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """A NaN monitored value (nothing was scored) is no result: it never becomes "best"; nor
        do non-finite weights (see ``_check_weights``)."""
        import torch

        self._check_weights(trainer)
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and torch.isnan(torch.as_tensor(current)).any():
            if trainer.is_global_zero:
                log.warning("%s is NaN at step %d (nothing was scored, or the predictions were non-finite): no best "
                            "checkpoint from it", self.monitor,
                            trainer.global_step)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last:
            self._check_weights(trainer)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # after the parent's own save for this epoch (it saves at train-epoch end or validation end)
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


class InterruptGuard(Callback):
    """A Ctrl-C is never lost. Python turns SIGINT into a KeyboardInterrupt wherever the program is;
    when that is a finalizer (``__del__``, run by the garbage collector inside any call) Python prints
    "Exception ignored" and goes on, and the run trained to its end. While a fit runs, SIGINT notes
    itself before raising; one that did not stop the run is raised again at the next batch's end, or
    when training ends. Outside a fit the handler acts as Python's own (Lightning puts the handlers it
    found at the fit's start back after a failed run, this one included). Each process of a DDP run
    guards itself: a Ctrl-C from a terminal reaches them all."""

    def __init__(self) -> None:
        self.pending = False
        self.active = False
        self._before = None

    def _sigint(self, signum, frame) -> None:
        if self.active:
            self.pending = True
        raise KeyboardInterrupt

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import signal
        import threading

        self.pending, self.active = False, True
        # only where Python's own handler is in place (a job started in the background ignores SIGINT) or an
        # earlier guard's, which acts as Python's outside its fit: a fit that failed skips the teardown that
        # removes it, and Lightning puts it back as the handler it found; the next fit stands in for it
        handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and \
                (handler is signal.default_int_handler or isinstance(getattr(handler, "__self__", None), InterruptGuard)):
            self._before = signal.signal(signal.SIGINT, self._sigint)

    def _raise_lost(self, *args: Any) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = on_train_end = _raise_lost

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit without checkpoints (``trainer.enable_checkpointing false``, so no ``Checkpoint`` to say
        it) stopped by Ctrl-C or SIGTERM says so: SIGTERM ends the process with 0, which read as a whole run."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self.pending, self.active = False, False  # it stopped the run
        if trainer.checkpoint_callback is not None or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        if isinstance(exception, KeyboardInterrupt):
            INTERRUPTED.append(f"interrupted (Ctrl-C) at step {trainer.global_step}; nothing was saved "
                               "(trainer.enable_checkpointing false)")
        elif isinstance(exception, SIGTERMException):
            log.warning("SIGTERM: the run stopped at step %d of %d; nothing was saved (trainer.enable_checkpointing "
                        "false)", trainer.global_step, trainer.estimated_stepping_batches)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import signal

        self.active = False
        if self._before is not None and signal.getsignal(signal.SIGINT) == self._sigint:
            earlier = getattr(self._before, "__self__", None)
            # an earlier guard's handler left behind by a failed fit acts as Python's own: put Python's own back
            gone = isinstance(earlier, InterruptGuard) and not earlier.active
            signal.signal(signal.SIGINT, signal.default_int_handler if gone else self._before)
        self._before = None
