"""What the machine a run lands on can do fast, and the precision chosen from it.

``precision: auto`` (the default of every shipped config, of ``train.py`` and of
``scripts/benchmark.py``) resolves, where the run starts, to:

- CUDA with bf16 support -> ``bf16-mixed``; CUDA without (pre-Ampere) -> ``16-mixed``;
- CPU with native bf16 (AVX-512 BF16 or AMX, as oneDNN reports it to torch) -> ``bf16-mixed``;
- any other CPU -> ``32-true`` (there bf16 is emulated: about ten times slower than fp32).

An explicit precision (``--trainer.precision bf16-mixed``) is always used as given.
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine dispatch, and
resolve, as an AVX2 one does.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer

from dptune.cores import cpu_native_bf16, usable_cores
from dptune.training.memory import KeepFreedMemory, keep_freed_memory
from dptune.training.summary import gives_summary, use_model_table

log = logging.getLogger("dptune")

AUTO = "auto"
# Lightning's precision values (tests/test_precision.py keeps this list equal to Lightning's own) and "auto"
PrecisionSetting = Literal[
    64, 32, 16, "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "32-true", "64-true", "64", "32", "16", "bf16", "auto",
] | None


def fit_threads() -> str | None:
    """Caps torch's intra-op threads at the usable cores (torch counts the machine's cores, not a
    container's quota: more threads than cores makes every matrix product wait on the others).
    Returns what was changed, in words, or None."""
    cores = usable_cores()
    if torch.get_num_threads() > cores:
        before = torch.get_num_threads()
        torch.set_num_threads(cores)
        return f"torch threads {before} -> {cores} (the cores this process may use)"
    return None


def _uses_cuda(accelerator: Any) -> bool:
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    name = (name or AUTO).lower()
    if name in ("cpu", "cpuaccelerator"):
        return False
    if name in ("auto", "gpu", "cuda", "cudaaccelerator"):
        return torch.cuda.is_available()
    return False


def resolve_precision(precision: Any, accelerator: Any = AUTO, strategy: Any = AUTO) -> tuple[Any, str]:
    """The precision a run uses and why. Anything but ``"auto"`` (or None) comes back as given."""
    if precision is not None and str(precision) != AUTO:
        return precision, "as given"
    if _uses_cuda(accelerator):
        if any(word in str(strategy) for word in ("fork", "notebook")):
            from dptune.errors import ConfigError

            raise ConfigError(f"trainer.precision auto asks the GPU what it supports, which a forked strategy "
                              f"({strategy}) forbids before the fork; give --trainer.precision bf16-mixed (Ampere "
                              "and newer) or 16-mixed")
        name = torch.cuda.get_device_name(0)
        # native bf16 only (Ampere and newer): torch also says yes where it is emulated, slowly (T4, V100)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"CUDA device {name} supports bf16"
        return "16-mixed", f"CUDA device {name} has no bf16; fp16 with loss scaling"
    native, why = cpu_native_bf16()
    return ("bf16-mixed" if native else "32-true"), why


# Trainer settings read outside ``__init__``: LightningCLI (jsonargparse) reads a ``kwargs.get`` in its
# body as a new, untyped setting, which would shadow Lightning's typed ``strategy``
def _resolve_for(precision: Any, settings: dict[str, Any]) -> tuple[Any, str]:
    return resolve_precision(precision, settings.get("accelerator", AUTO), settings.get("strategy", AUTO))


def _cpu_settings_for(settings: dict[str, Any]) -> list[str] | None:
    """A CPU run's threads and allocator (``dptune.training.memory``), set here; what was done, in words
    (None for a CUDA run)."""
    if _uses_cuda(settings.get("accelerator", AUTO)):
        return None
    return [said for said in (fit_threads(), keep_freed_memory()) if said]


class DPTuneTrainer(Trainer):
    """Lightning's Trainer with ``precision="auto"`` resolved for the machine it starts on.

    ``precision_reason`` says why the precision was chosen; the choice is logged once.
    """

    def __init__(self, *args: Any, precision: PrecisionSetting = AUTO, **kwargs: Any) -> None:
        resolved, reason = _resolve_for(precision, kwargs)
        self.precision_requested = AUTO if precision is None else precision
        self.precision_reason = reason
        cpu_settings = _cpu_settings_for(kwargs)
        own_summary = gives_summary(kwargs)
        super().__init__(*args, precision=resolved, **kwargs)
        if kwargs.get("sync_batchnorm") and self.world_size > 1 and self.strategy.root_device.type != "cuda":
            from dptune.errors import ConfigError

            raise ConfigError(f"trainer.sync_batchnorm true: PyTorch syncs BatchNorm on GPUs only, this run is on "
                              f"{self.strategy.root_device.type}; leave it out (dptune's model.sync_batchnorm, on by "
                              "default, syncs the neck's and heads' BatchNorm in multi-GPU runs)")
        if cpu_settings is not None:  # every process of the run, a spawned one too, keeps freed memory
            self.callbacks.append(KeepFreedMemory())
        check_nodes(self)
        if not own_summary:
            use_model_table(self)
        if self.is_global_zero:
            if reason != "as given":
                log.info("precision %s chosen: %s (--trainer.precision overrides)", self.precision, reason)
            for said in cpu_settings or []:
                log.info(said)


def check_nodes(trainer: Trainer) -> None:
    """``trainer.num_nodes`` above 1 in a process that no launcher started as one node of several
    (no torchrun, SLURM or other cluster environment; no MASTER_ADDR / NODE_RANK of one's own): the
    first process waited for the other nodes' processes for good, without a word."""
    import os

    from lightning.fabric.plugins.environments import LightningEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if trainer.num_nodes <= 1 or not isinstance(env, LightningEnvironment) or \
            any(k in os.environ for k in ("NODE_RANK", "MASTER_ADDR", "GROUP_RANK")):
        return
    from dptune.errors import ConfigError

    raise ConfigError(f"trainer.num_nodes {trainer.num_nodes}: this process was not started as one node of several "
                      f"(no torchrun, SLURM job or NODE_RANK / MASTER_ADDR), so it would wait for the other nodes' "
                      "processes for good: start it on each node as docs/distributed.md shows, or leave num_nodes out")
