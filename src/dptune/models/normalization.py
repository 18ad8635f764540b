"""The normalisation a run prepares images with, resolved in one place for the task and the tools
that mimic a run (the loader benchmark): the settings, else the pretrained checkpoint's image
processor, else the backbone family's published statistics."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dptune.models.backbones import family, family_normalization
from dptune.models.source import resolve_pretrained


def processor_normalization(pretrained: str) -> tuple[list[float], list[float]] | None:
    """The normalisation of a checkpoint's own image processor config (a hub id or directory, a
    dptune ``.ckpt`` or segmentation + depth export: its unpacked model directory's; both parts
    share it), as ``(x / 255 - mean) / std``: a processor that rescales by another factor or does
    not normalise gives the mean/std that do the same. None when it ships none (or cannot be read)."""
    try:
        from transformers.utils import cached_file

        path = cached_file(resolve_pretrained(pretrained), "preprocessor_config.json",
                           _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if not path:
        return None
    cfg = json.loads(Path(path).read_text())
    if cfg.get("do_normalize", True) is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    elif "image_mean" in cfg and "image_std" in cfg:
        mean, std = list(cfg["image_mean"]), list(cfg["image_std"])
    else:
        return None
    factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    if factor != 1 / 255:  # x * factor == (x / 255) * (255 * factor)
        k = 255 * factor
        mean, std = [m / k for m in mean], [s / k for s in std]
    return mean, std


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """``model.image_mean`` / ``image_std`` as set: three finite numbers each, the std's above 0."""
    import math

    from dptune.errors import ConfigError

    for key, values in (("image_mean", mean), ("image_std", std)):
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"model.{key} {values}: one value per colour channel (3: red, green, blue), each a "
                              "finite number in units of the 0-1 pixel range (ImageNet's: [0.485, 0.456, 0.406])")
        if key == "image_std" and min(values) <= 0:
            raise ConfigError(f"model.{key} {values}: the pixels are divided by it, so each value must be above 0 "
                              "(ImageNet's: [0.229, 0.224, 0.225])")


def resolve_normalization(mean: Sequence[float] | None, std: Sequence[float] | None, pretrained: str | None,
                          kind: str) -> tuple[list[float], list[float], str, bool]:
    """(mean, std, why, known): from (in order) the settings (``mean`` and ``std``), the
    ``pretrained`` checkpoint's image processor, or the statistics of the backbone family ``kind``
    (``family(config)``: vit, hybrid, beit, dinov2, swin...; ImageNet's, not ``known``, for a
    family without published ones). A setting given alone overrides its half of the others."""
    check_normalization(mean, std)
    if mean is not None and std is not None:
        return list(mean), list(std), "model.image_mean/image_std", True
    found = processor_normalization(pretrained) if pretrained else None
    known = True
    if found is not None:
        why = f"{pretrained}'s preprocessor_config.json"
    else:
        fmean, fstd, known = family_normalization(kind)
        found = (list(fmean), list(fstd))
        why = (f"the {kind} family's published statistics" if known else
               f"ImageNet statistics: no image processor and no known default for the {kind!r} family; "
               "set model.image_mean/image_std if its checkpoints used others")
        if pretrained:
            why = f"{pretrained} ships no preprocessor_config.json; {why}"
    return list(mean or found[0]), list(std or found[1]), why, known


def settings_family(model: Mapping[str, Any]) -> str:
    """The backbone family a run's ``model`` settings build, without building it: ``backbone``
    when set (a run checks its model against it), else the family of ``config``, else of the
    ``pretrained`` checkpoint's config; a plain DPT (vit) for settings that name none."""
    from transformers import DPTConfig

    from dptune.models.source import load_config, pretrained_config

    if model.get("backbone"):
        return str(model["backbone"])
    if model.get("config") is not None:
        return family(load_config(model["config"]))
    if model.get("pretrained"):
        return family(pretrained_config(resolve_pretrained(model["pretrained"])))
    return family(DPTConfig())
