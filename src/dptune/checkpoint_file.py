"""Reading a dptune checkpoint file safely: tensors and plain types only, so that opening one
cannot run code."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from dptune.errors import ConfigError


def load_checkpoint(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` (tensors and plain types: what dptune writes),
    so that opening a checkpoint cannot run code. One that holds other Python objects is refused,
    unless ``DPTUNE_TRUST_CHECKPOINTS=1`` says its source is trusted."""
    if os.environ.get("DPTUNE_TRUST_CHECKPOINTS") == "1":
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: holds Python objects beyond tensors and plain types ({first}); loading it could "
                          "run code. If you trust its source, set DPTUNE_TRUST_CHECKPOINTS=1") from None


def dptune_parts(ckpt: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``dptune`` metadata, the hyperparameters) of a dptune checkpoint; one line if it is not one."""
    if "dptune" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"{path}: not a dptune checkpoint (no model config stored)")
    return ckpt["dptune"], ckpt["hyper_parameters"]
