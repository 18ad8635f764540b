"""The ground every label set stands on: ``IGNORE_INDEX`` (255, "no label"), the class limit, the
default palette, colour checks, and the YAML loader that refuses a key given twice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import yaml

from dptune.errors import ConfigError

IGNORE_INDEX = 255
MAX_CLASSES = 255  # 0..254; 255 is reserved for "no label"

MaskFormat = Literal["index", "rgb"]


def default_palette(n: int) -> list[list[int]]:
    """A deterministic, well-spread palette (the PASCAL VOC bit-interleaving scheme)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


def rgb_key(rgb: np.ndarray) -> np.ndarray:
    """Pack an (..., 3) uint8 array into one int32 per pixel so colours compare in one op."""
    rgb = rgb.astype(np.int32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def whole_number(v: Any) -> int | None:
    """``v`` as an int when it is one (a YAML integer, or digits in quotes: ``12`` and ``"12"``), else
    None: a fraction (1.7), a boolean (YAML reads yes/no/on/off as true/false), anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit():
        return int(v.strip())
    return None


def color_tuple(c: Sequence[int], what: str) -> tuple[int, int, int]:
    values = [whole_number(v) for v in c] if isinstance(c, (list, tuple)) else []
    if len(values) != 3 or any(v is None or not 0 <= v <= 255 for v in values):
        raise ConfigError(f"{what}: expected [r, g, b] with whole numbers 0-255, got {c!r}")
    return values[0], values[1], values[2]


class DuplicateKey(ValueError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping. YAML keeps the last of two
    equal keys, so a second ``names:`` (or ``map`` entry) would silently replace the first. A merge
    key (``<<``) overridden by an explicit key is YAML's stated rule and stays allowed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKey(f"key {key!r} given twice (lines {first} and {line}); YAML would keep only "
                                    "the last, so say it once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def name_key(name: object) -> str:
    """A class name as names are matched (a checkpoint's to a label file's, a map's target to a class):
    case and surrounding spaces aside (ADE20K's published id2label writes "bed " with a space)."""
    return str(name).strip().lower()
