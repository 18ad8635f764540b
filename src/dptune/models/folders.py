"""Model folders on disk: what makes a folder an exported model's (or a run's checkpoints'), the
refusal to write outputs into one (predict, evaluate and export share it), and the check that an
exported folder holds readable files before a loader reads it (one line naming the file, not the
loader's traceback)."""

from __future__ import annotations

import json
from pathlib import Path

from dptune.errors import ConfigError, first_line

# what dptune export writes into a task's folder, as the messages name it
EXPORT_LAYOUT = "dptune export writes config.json, model.safetensors and preprocessor_config.json"
# weights transformers also loads, which a folder may hold instead of model.safetensors (not written by dptune)
OTHER_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_export_files(ref: str | Path) -> None:
    """An exported model folder (one task's; a joint export's part) holds what its loaders read, each
    readable: ``config.json`` (a JSON object with a ``model_type``), ``preprocessor_config.json`` (a
    JSON object), ``model.safetensors`` whose header reads and covers the file (a folder with other
    weights ``transformers`` loads is left to it), and ``dptune.json``, where there is one, a JSON
    object. ``ConfigError`` naming the file otherwise, before any loader reads it: a truncated
    ``model.safetensors`` was safetensors' traceback, a missing ``config.json`` transformers'
    "Unrecognized model ... model_type"."""
    folder = Path(ref)
    json_object(folder / "config.json", "the model's config", key="model_type")
    json_object(folder / "preprocessor_config.json", "the image processor's settings")
    if (folder / "dptune.json").exists():
        json_object(folder / "dptune.json", "dptune's record of the export")
    weights = folder / "model.safetensors"
    if not weights.exists():
        if any((folder / name).is_file() for name in OTHER_WEIGHTS):
            return
        raise ConfigError(f"{folder}: no model.safetensors (the model's weights): not a complete exported model "
                          f"({EXPORT_LAYOUT})")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt"):  # reads the header, checks it covers the whole file
            pass
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({first_line(e)}): truncated or damaged; export the "
                          "model again from its checkpoint") from None


def json_object(path: Path, what: str, key: str | None = None) -> dict:
    """The JSON object in ``path`` (``what`` it holds, for the message), with ``key`` when one is given;
    ``ConfigError`` naming the file when it is missing, unreadable, not JSON or another JSON value."""
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no {path.name} ({what}): not an exported model, or an incomplete one ({EXPORT_LAYOUT})")
    try:
        spec = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: not {what} (a JSON object) but a JSON {type(spec).__name__}")
    if key is not None and key not in spec:
        raise ConfigError(f"{path}: no {key}; not {what}")
    return spec


def is_export_folder(folder: Path) -> bool:
    """A dptune export (or any ``from_pretrained`` model directory): ``config.json`` with
    ``model.safetensors``, a ``dptune.json`` card, or a joint export's ``segmentation/`` + ``depth/``."""
    from dptune.models.source import is_joint_export

    try:
        return (((folder / "config.json").is_file() and (folder / "model.safetensors").is_file())
                or (folder / "dptune.json").is_file() or is_joint_export(str(folder)))
    except OSError:
        return False


def holds_checkpoint(folder: Path) -> bool:
    """A folder with a ``.ckpt`` file in it (a run's checkpoints)."""
    try:
        return folder.is_dir() and any(p.suffix == ".ckpt" and p.is_file() for p in folder.iterdir())
    except OSError:
        return False


def export_folder_around(path: str | Path, itself: bool = True) -> Path | None:
    """The exported model's folder that ``path`` (links resolved) is, or lies inside: the nearest one
    at or above it (only above it when not ``itself``); None when there is none."""
    t = Path(path).resolve()
    for d in (t, *t.parents) if itself else t.parents:
        if d.is_dir() and is_export_folder(d):
            return d
    return None


def refuse_model_folders(out: str | Path, flag: str = "--out") -> None:
    """``out`` is not a dptune export's folder nor inside one, and not a folder holding a checkpoint
    (a folder beside a checkpoint, ``./preds`` beside ``./model.ckpt``, is fine): any model, not only
    the one in use, so that outputs never mix into a model (a later ``export --overwrite`` there
    would then be refused, or delete them)."""
    t = Path(out).resolve()
    d = export_folder_around(t)
    if d is not None:
        raise ConfigError(f"{flag} {out}: {'is' if t == d else 'is inside'} {d}, an exported model's folder; "
                          "dptune never writes into a model (it would add files to that folder, or replace "
                          "some). Write to a folder of its own")
    if holds_checkpoint(t):
        raise ConfigError(f"{flag} {out}: is {t}, a folder of checkpoints; what dptune writes would mix with the "
                          "run's checkpoints. Write it to a folder of its own")
