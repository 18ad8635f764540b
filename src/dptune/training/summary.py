"""The model summary a fit prints first: Lightning's table, without a FLOPs count it never took.

Lightning counts FLOPs by running the module's ``example_input_array``; dptune's tasks leave it
unset (that forward would run the unsharded module under FSDP, and cost a forward of the full
model at start-up), so its table had a FLOPs column of zeros and "0 Total Flops". The FLOPs of a
training step are in the step profile and MFU of ``scripts/benchmark.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary

# where Lightning writes its summary (its own handler prints it)
log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class ModelTable(ModelSummary):
    """Lightning's model summary as plain text (its layout), with the FLOPs column and total only
    where they were counted (a module with an ``example_input_array``)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], *args: Any, **kwargs: Any) -> None:
        if kwargs.get("total_flops"):
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, *args, **kwargs)
            return
        from lightning.pytorch.utilities.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )

        columns = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, values)]) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns), strict=True)]
        lines = [" | ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)) for row in rows]
        rule = "-" * (sum(widths) + 3 * len(widths))
        totals = [(get_human_readable_count(trainable_parameters), "Trainable params"),
                  (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
                  (get_human_readable_count(total_parameters), "Total params"),
                  (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
                  (total_training_modes["train"], "Modules in train mode"),
                  (total_training_modes["eval"], "Modules in eval mode")]
        log.info("\n".join(["", lines[0], rule, *lines[1:], rule, *(f"{v!s:<10}{what}" for v, what in totals)]))


def gives_summary(settings: dict[str, Any]) -> bool:
    """The trainer settings ``settings`` turn the summary off or give a summary callback of their own."""
    callbacks = settings.get("callbacks")
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    return settings.get("enable_model_summary") is False or any(isinstance(cb, ModelSummary) for cb in callbacks)


def use_model_table(trainer: Any) -> None:
    """``ModelTable`` in place of the summary callback Lightning added to ``trainer`` by default."""
    from lightning.pytorch.callbacks import RichModelSummary

    trainer.callbacks[:] = [ModelTable() if type(cb) in (ModelSummary, RichModelSummary) else cb
                            for cb in trainer.callbacks]
