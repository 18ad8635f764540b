"""What a command's processes say: dptune's log lines at INFO, and warnings whose advice does not apply to a
dptune run left out. ``main`` sets this in the process a command starts; ``ProcessLog``'s setup sets it again in
each process of the run, which matters for the processes ``ddp_spawn`` starts: fresh interpreters, to which
neither the logging configuration nor the warning filters carry (they logged nothing of dptune's at INFO and
gave Lightning's advice to sync values that are already summed exactly)."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import Callback


def quiet() -> None:
    """Configure this process's logging and warning filters (again: each step is idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # validation logs values it has summed over every process itself (exact, each image once): Lightning's
    # advice to average them across processes (14 lines per validation of a 2-process run) does not apply
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # dptune always hands LightningCLI its argv itself (renamed class paths, the subcommand of the
    # dptune command): a plain command line is no mistake
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dptune").setLevel(logging.INFO)


class ProcessLog(Callback):
    """``quiet()`` in every process of the run, before the data and the model are set up."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        quiet()
