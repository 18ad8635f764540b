"""Exported model folders on disk: the check that one holds readable files before a loader reads it
(one line naming the file, not the loader's traceback)."""

from __future__ import annotations

import json
from pathlib import Path

from dptune.errors import ConfigError

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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{weights}: not a readable safetensors file ({first}): truncated or damaged; export the "
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
