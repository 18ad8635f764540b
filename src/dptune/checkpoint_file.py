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
    trusted = os.environ.get("DPTUNE_TRUST_CHECKPOINTS") == "1"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trusted)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a checkpoint file") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise ConfigError(f"{path}: not a readable checkpoint (truncated or not a torch file: {first})") from None
        raise ConfigError(f"{path}: holds Python objects beyond tensors and plain types ({first}); loading it could "
                          "run code. If you trust its source, set DPTUNE_TRUST_CHECKPOINTS=1") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a readable checkpoint (empty, truncated or not a torch file: {first})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


TASKS = ("segmentation", "depth", "multitask")


def dptune_parts(ckpt: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``dptune`` metadata, the hyperparameters) of a dptune checkpoint; one line naming what is
    missing when it is not one (or not a whole one)."""
    if "dptune" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"{path}: not a dptune checkpoint (no model config stored)")
    meta, hp = ckpt["dptune"], ckpt["hyper_parameters"]
    missing = [f"dptune.{k}" for k in ("model_config", "image_mean", "image_std") if k not in meta]
    missing += [f"hyper_parameters.{k}" for k in ("image_size",) if k not in hp]
    missing += ["state_dict"] if not isinstance(ckpt.get("state_dict"), dict) else []
    if missing:
        raise ConfigError(f"{path}: a dptune checkpoint without {', '.join(missing)} (damaged, or not written by dptune)")
    if meta.get("task", "segmentation") not in TASKS:
        raise ConfigError(f"{path}: unknown dptune task {meta.get('task')!r} (known: {', '.join(TASKS)})")
    return meta, hp
