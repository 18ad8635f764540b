"""Where a model comes from: a config (JSON file, directory or dict), a hub id or directory, a dptune
``.ckpt`` (unpacked once per file version), or one part of a segmentation + depth model."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, DPTConfig, PretrainedConfig

from dptune.errors import ConfigError
from dptune.models.backbones import check_family, depth_model_class, model_class
from dptune.models.checkpoint_file import dptune_parts, load_checkpoint
from dptune.preprocessing import Preprocessing

log = logging.getLogger(__name__)


def model_source(pretrained: str | None, config: str | Mapping[str, Any] | None, backbone: str | None,
                 part: str, fresh_init: str) -> tuple[str | None, PretrainedConfig]:
    """What every model builder starts from: (a ``from_pretrained`` reference or None, its config),
    from exactly one of ``pretrained`` and ``config``, checked against the ``backbone`` family;
    ``fresh_init`` (how layers without weights start) checked too."""
    if fresh_init not in ("he", "hf"):
        raise ConfigError(f"model.fresh_init must be 'he' or 'hf', not {fresh_init!r}")
    if (pretrained is None) == (config is None):
        raise ConfigError("give exactly one of model.pretrained (hub id / directory / .ckpt) or model.config "
                          "(DPTConfig JSON)")
    if pretrained is None:
        cfg = load_config(config)
        check_family(cfg, backbone, "model.config")
        return None, cfg
    ref = resolve_pretrained(pretrained, part)
    cfg = pretrained_config(ref)
    check_family(cfg, backbone, pretrained)
    return ref, cfg


def load_config(config: str | Mapping[str, Any]) -> PretrainedConfig:
    """A ``DPTConfig`` (or a bare backbone's config, e.g. ``"model_type": "dinov2"``) from a JSON
    file, a directory holding ``config.json``, or a dict."""
    if isinstance(config, Mapping):
        return _checked_config(dict(config), "model.config")
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a model config (a DPTConfig JSON file)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a model config (a DPTConfig JSON file)") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a model config is a JSON object of settings, not a {type(spec).__name__}")
    return _checked_config(spec, str(path))


def _checked_config(spec: dict[str, Any], name: str) -> PretrainedConfig:
    """``_config_from_dict``, a setting it refuses said in one line naming ``name``."""
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 checks each setting's type

    try:
        return _config_from_dict(spec)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as e:
        words = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{name}: not a model config ({words})") from None


def _config_from_dict(spec: dict[str, Any]) -> PretrainedConfig:
    spec = {k: v for k, v in spec.items() if k not in ("architectures", "auto_map")}
    kind = spec.pop("model_type", "dpt")
    return DPTConfig(**spec) if kind == "dpt" else AutoConfig.for_model(kind, **spec)


def pretrained_config(ref: str) -> PretrainedConfig:
    """The config of a hub id or local directory; one clear line when it cannot be had."""
    if Path(ref).is_dir() and not (Path(ref) / "config.json").is_file():
        what = "an empty folder" if not any(Path(ref).iterdir()) else "a folder without config.json"
        raise ConfigError(f"model.pretrained {ref}: {what}, not a model directory (give a folder that "
                          "from_pretrained reads, e.g. a dptune export, a hub id, or a dptune .ckpt)")
    try:
        return AutoConfig.from_pretrained(ref)
    except ValueError as e:
        raise ConfigError(f"model.pretrained {ref!r}: its config.json is no model config transformers knows: "
                          f"{str(e).splitlines()[0]}") from None
    except OSError as e:
        where = "local directory" if Path(ref).exists() else "hub id (offline, or no such repository?)"
        raise ConfigError(f"model.pretrained {ref!r}: cannot load its config.json as a {where}: "
                          f"{str(e).splitlines()[0]}") from None


def resolve_pretrained(ref: str, part: str = "segmentation") -> str:
    """A ``from_pretrained`` reference for ``ref``: hub ids and directories as they are; a dptune
    ``.ckpt`` (any task) written out once as a directory (weights, config, image processor), so
    that its backbone and neck can start a model of either task. A segmentation + depth source (a
    multitask ``.ckpt`` or export directory) gives its ``part`` (``segmentation`` or ``depth``)."""
    if ref.lower().endswith(".ckpt") and Path(ref).is_file():
        ref = _unpack_checkpoint(str(Path(ref).resolve()), Path(ref).stat().st_mtime_ns)
    elif Path(ref).is_file():  # transformers would hand it to torch.load: an unpickling traceback
        hint = "; a DPTConfig JSON goes in model.config" if ref.lower().endswith(".json") else ""
        raise ConfigError(f"model.pretrained {ref}: a file, not a model directory, hub id or dptune .ckpt{hint}")
    return joint_part(ref, part)


def is_joint_export(ref: str) -> bool:
    """A segmentation + depth export: ``segmentation/`` and ``depth/``, each a model directory."""
    return (Path(ref) / "segmentation" / "config.json").is_file() and (Path(ref) / "depth" / "config.json").is_file()


def joint_part(ref: str, part: str) -> str:
    """``ref/part`` when ``ref`` is a segmentation + depth export, else ``ref``."""
    return str(Path(ref) / part) if is_joint_export(ref) else ref


@functools.lru_cache(maxsize=4)
def _unpack_checkpoint(ckpt: str, mtime_ns: int) -> str:
    """Once per checkpoint file and version (a multitask build asks for both parts): each model of
    a dptune ``.ckpt`` (one, or a joint model's two) written as a ``from_pretrained`` directory with
    its image processor, removed when the process ends. Built from the stored configs and weights
    alone, never through a task module: the run that asks may be building one, and Lightning's CLI
    hands its own settings to every module built meanwhile."""
    state = load_checkpoint(ckpt)
    meta, hp = dptune_parts(state, ckpt)
    out = Path(tempfile.mkdtemp(prefix="dptune-ckpt-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    processor = Preprocessing.of_task(hp["image_size"], meta["image_mean"], meta["image_std"]).processor()
    try:
        parts = _checkpoint_parts(meta)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{ckpt}: {e}") from None
    for name, (prefix, cfg, cls) in parts.items():
        model = cls(cfg)
        weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ConfigError(f"{ckpt}: its weights do not fit the model config it stores "
                              f"({str(e).strip().splitlines()[0]})") from None
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
    log.info("%s: %s checkpoint unpacked to %s", ckpt, meta.get("task", "segmentation"), out)
    return str(out)


def _checkpoint_parts(meta: dict[str, Any]) -> dict[str, tuple[str, PretrainedConfig, type]]:
    """(state-dict prefix, config, class) of each model a checkpoint holds, by directory name. A
    segmentation + depth checkpoint stores its depth model's config beside it (older ones did not:
    their depth model was built from the segmentation config)."""
    cfg = _config_from_dict(dict(meta["model_config"]))
    task = meta.get("task", "segmentation")
    if cfg.model_type not in ("dpt", "depth_anything") or (task != "depth" and cfg.model_type != "dpt"):
        raise ConfigError(f"its stored model config is a {cfg.model_type!r} model, not a DPT")
    if task == "multitask":
        depth = _config_from_dict(dict(meta.get("depth_model_config") or meta["model_config"]))
        return {"segmentation": ("model.seg.", cfg, model_class(cfg)),
                "depth": ("model.depth.", depth, depth_model_class(depth))}
    return {".": ("model.", cfg, depth_model_class(cfg) if task == "depth" else model_class(cfg))}
