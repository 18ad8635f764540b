"""Reading a dptune checkpoint file safely: tensors and plain types only, so that opening one
cannot run code."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

import torch

from dptune import TASKS
from dptune.errors import ConfigError


def is_remote(path: Any) -> bool:
    """A URL (``https://``, ``s3://``, ...) rather than a local file."""
    return isinstance(path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


# what torch's safe unpickler says of a file that holds Python objects beyond tensors and plain
# types; any other refusal (an unknown opcode, a string too long, ...) comes from a damaged file
_OBJECT_REFUSALS = ("Unsupported global", "GLOBAL", "Can only create new object", "Can only build",
                    "unrecognized function")


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False,
                    trusted: bool | None = None) -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` (tensors and plain types: what dptune writes),
    so that opening a checkpoint cannot run code. One that holds other Python objects is refused,
    unless ``trusted`` (default: ``DPTUNE_TRUST_CHECKPOINTS=1``) says its source is. A missing,
    empty, truncated or damaged file, and a URL, is one line naming the file. ``mmap``: map the
    tensors instead of reading them (a quick look at the metadata of a large file)."""
    if is_remote(path):
        raise ConfigError(f"{path}: a URL; dptune reads checkpoints from local files only (Lightning would unpickle a "
                          "remote one with weights_only=False, which can run code): download it first and pass its path")
    if trusted is None:
        trusted = os.environ.get("DPTUNE_TRUST_CHECKPOINTS") == "1"
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format
        ckpt = torch.load(path, map_location=map_location, weights_only=not trusted, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a checkpoint file") from None
    except pickle.UnpicklingError as e:
        text = str(e).strip()
        if trusted or not any(mark in text for mark in _OBJECT_REFUSALS):
            raise _unreadable(path, "damaged", _reason(text, e)) from None
        raise ConfigError(f"{path}: holds Python objects beyond tensors and plain types ({_reason(text, e)}); "
                          "loading it could run code. If you trust its source, set DPTUNE_TRUST_CHECKPOINTS=1") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError, OverflowError) as e:
        raise _unreadable(path, "empty", _reason(str(e).strip(), e)) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    if not mmap:  # a map reads a few bytes of the file only: nothing to check the sums of
        check_sums(path)
    return ckpt


def check_sums(path: str) -> None:
    """The CRC-32 that torch's zip format stores for each tensor, against the bytes read: torch does
    not compare them, so bytes changed inside a weight (a bad disk, a broken copy) loaded as
    numbers. One line naming the damaged entry. Reads the file once more (about a second per GB)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format has no sums
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:  # torch read it: a fault of the second read
        raise ConfigError(f"{path}: damaged ({_reason(str(e).strip(), e)})") from None
    if bad is not None:
        raise ConfigError(f"{path}: damaged (the stored checksum of {bad} does not match its bytes: changed on disk "
                          "or in a copy); use another copy of the checkpoint")


def _unreadable(path: str, first: str, reason: str) -> ConfigError:
    """A checkpoint torch could not read: what the file is when its start says (``_foreign_start``),
    else torch's ``reason`` (``first``: the likeliest damage, "damaged" or "empty")."""
    said = _foreign_start(path) or f"{first}, truncated or not a torch file: {reason}"
    return ConfigError(f"{path}: not a readable checkpoint ({said})")


def _foreign_start(path: str) -> str | None:
    """What the file is, when its first bytes are not what torch writes (its zip format, or a pickle
    of protocol 2 or later): the unpickler's own error is then a byte's code (``101``, ``Unsupported
    operand 60``). None when they are, or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it points to: fetch it with git lfs pull"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page: a download that returned a web page instead of the file?"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file: decompress it first"
    return f"not a file torch writes: it starts with {head[:20]!r}"


def _reason(text: str, e: BaseException) -> str:
    """The line of an error message that says what went wrong (torch's safe-loader messages open
    with a paragraph on ``weights_only``, whose advice does not apply to a damaged file)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.split(":", 1)[1].strip()
    useful = [ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the documentation")]
    first = (useful or lines or [type(e).__name__])[0]
    return first.split(". ")[0]  # torch's zip reader goes on about how files get corrupted


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
