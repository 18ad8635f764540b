"""A :class:`LabelSet`: class names, colours, and how the pixels of a mask map to class indices."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dptune.errors import ConfigError, DataError, yaml_problem
from dptune.labels.base import (
    IGNORE_INDEX,
    MAX_CLASSES,
    DuplicateKey,
    MaskFormat,
    UniqueKeyLoader,
    color_tuple,
    default_palette,
    name_key,
    rgb_key,
)
from dptune.labels.spec import parse_label_spec

_UNKNOWN = -1  # a source value no rule maps


@dataclass
class LabelSet:
    """Class names and the rule that turns a mask into class indices.

    ``value_map`` (index masks) and ``color_map`` (RGB masks) say which source value or colour
    becomes which class index (or ``IGNORE_INDEX``). Anything not in the map is an error.
    """

    names: list[str]
    colors: list[list[int]] = field(default_factory=list)
    mask_format: MaskFormat = "index"
    value_map: dict[int, int] = field(default_factory=dict)
    color_map: dict[tuple[int, int, int], int] = field(default_factory=dict)
    source: str = "<labels>"
    # the classes this source's masks can hold (None: all); a label set retargeted to a larger
    # class list (several sources, one model) annotates only the classes its own names matched
    annotated: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError(f"{self.source}: a label set needs at least one class name")
        if len(self.names) > MAX_CLASSES:
            raise ConfigError(f"{self.source}: at most {MAX_CLASSES} classes (255 means ignore), got {len(self.names)}")
        seen: dict[str, str] = {}
        for n in self.names:
            if name_key(n) in seen:
                raise ConfigError(f"{self.source}: class names must be unique, case and surrounding spaces aside: "
                                  f"{seen[name_key(n)]!r} and {n!r}")
            seen[name_key(n)] = n
        if not self.colors:
            self.colors = default_palette(len(self.names))
        if len(self.colors) != len(self.names):
            raise ConfigError(f"{self.source}: {len(self.colors)} colors for {len(self.names)} names")
        self.colors = [list(color_tuple(c, f"{self.source}: colors")) for c in self.colors]
        if self.mask_format == "index" and not self.value_map:
            self.value_map = {i: i for i in range(len(self.names))}
        if self.mask_format == "rgb" and not self.color_map:
            self.color_map = {tuple(c): i for i, c in enumerate(self.colors)}
        # 255 is "no label" everywhere in dptune, also in the masks users bring; whether the label
        # file said so is kept: an unstated 255 may be a class stored as 0/255 (binary masks)
        self.implicit_ignore = self.mask_format == "index" and IGNORE_INDEX not in self.value_map
        if self.mask_format == "index":
            self.value_map.setdefault(IGNORE_INDEX, IGNORE_INDEX)
        self._build_lookup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path: str | Path) -> LabelSet:
        path = Path(path)
        try:
            spec = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
        except FileNotFoundError:
            raise DataError(f"{path}: label file not found") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a folder, not a label file (labels.yaml)") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a UTF-8 text file (byte {e.start}); a label file is YAML text") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
        except DuplicateKey as e:
            raise DataError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(spec, Mapping):
            raise DataError(f"{path}: expected a mapping with at least 'names'")
        try:
            return cls.from_dict(spec, source=str(path))
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], source: str = "<labels>") -> LabelSet:
        try:
            return parse_label_spec(cls, dict(spec), source)
        except (TypeError, KeyError) as e:  # a value of the wrong shape (colors: 5) the checks did not name
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str], source: str = "<id2label>") -> LabelSet:
        ids = sorted(int(k) for k in id2label)
        if ids != list(range(len(ids))):
            raise ConfigError(f"{source}: id2label keys must be 0..C-1, got {ids[:5]}...")
        names = [id2label[i] if i in id2label else id2label[str(i)] for i in ids]
        return cls(names=list(names), source=source)

    # ------------------------------------------------------------------ properties
    def retarget(self, names: Sequence[str], colors: Sequence[Sequence[int]] | None = None) -> LabelSet:
        """The same masks read into another class list, matched by name (case-insensitive): raw
        value (or colour) -> this set's class -> the class of the same name in ``names``. Every
        class of this set must be in ``names``; classes of ``names`` this set lacks are never
        annotated by its masks (``annotated``)."""
        where = {name_key(n): i for i, n in enumerate(names)}
        missing = [n for n in self.names if name_key(n) not in where]
        if missing:
            raise ConfigError(f"{self.source}: classes {missing} are not in the model's label set {list(names)} "
                              "(add them there, or map them to another class or to ignore in this source's labels)")
        to = [where[name_key(n)] for n in self.names]

        def move(v: int) -> int:
            return IGNORE_INDEX if v == IGNORE_INDEX else to[v]

        value_map = {k: move(v) for k, v in self.value_map.items() if not (self.implicit_ignore and k == IGNORE_INDEX)}
        return LabelSet(names=list(names), colors=[list(c) for c in colors] if colors else [],
                        mask_format=self.mask_format, value_map=value_map,
                        color_map={k: move(v) for k, v in self.color_map.items()}, source=self.source,
                        annotated=sorted({move(v) for v in [*self.value_map.values(), *self.color_map.values()]}
                                         - {IGNORE_INDEX}))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that ``from_dict`` reads back (used in checkpoints)."""
        spec: dict[str, Any] = {"names": list(self.names), "colors": self.colors, "mask_format": self.mask_format}
        if self.mask_format == "index":
            spec["value_map"] = {int(k): int(v) for k, v in self.value_map.items()
                                 if not (self.implicit_ignore and k == IGNORE_INDEX)}
        else:
            spec["color_map"] = [[list(k), int(v)] for k, v in self.color_map.items()]
        return spec

    # ------------------------------------------------------------------ encoding
    def _build_lookup(self) -> None:
        for target in [*self.value_map.values(), *self.color_map.values()]:
            if target != IGNORE_INDEX and not 0 <= target < self.num_classes:
                raise ConfigError(f"{self.source}: mapping points to class {target}, outside 0..{self.num_classes - 1}")
        size = 65536 if any(v > 255 for v in self.value_map) else 256
        lut = np.full(size, _UNKNOWN, dtype=np.int16)
        for src, dst in self.value_map.items():
            if not 0 <= src < 65536:
                raise ConfigError(f"{self.source}: mask value {src} outside 0..65535")
            lut[src] = dst
        self._lut = lut
        self._color_keys = np.array([rgb_key(np.array(c, dtype=np.uint8)) for c in self.color_map], dtype=np.int32)
        self._color_targets = np.array(list(self.color_map.values()), dtype=np.uint8)

    def encode(self, mask: np.ndarray, path: str | Path = "<mask>") -> np.ndarray:
        """Raw mask (HxW index or HxWx3 RGB) -> HxW uint8 class indices with 255 for ignore.

        Raises ``DataError`` naming ``path`` when the mask holds a value the label set does not know.
        """
        if self.mask_format == "index":
            return self._encode_index(mask, path)
        return self._encode_rgb(mask, path)

    def _encode_index(self, mask: np.ndarray, path: str | Path) -> np.ndarray:
        if mask.ndim == 3:
            if mask.shape[2] == 1:
                mask = mask[..., 0]  # an H x W x 1 array: one channel
            elif mask.shape[2] >= 3 and np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(
                mask[..., 0], mask[..., 2]
            ):
                mask = mask[..., 0]  # a grey mask saved as RGB: all channels equal
            else:
                raise DataError(f"{path}: index mask expected (one channel), got {mask.shape[2]} channels")
        if mask.dtype not in (np.uint8, np.uint16):
            if mask.min() < 0 or mask.max() >= 65536 or not np.all(np.equal(np.mod(mask, 1), 0)):
                raise DataError(f"{path}: mask values must be integers 0..65535")
            mask = mask.astype(np.uint16)
        lut = self._lut
        if int(mask.max()) >= len(lut):
            bad = np.unique(mask[mask >= len(lut)])
            raise DataError(f"{path}: mask has values {_fmt_values(bad)} that the label set does not define")
        out = lut[mask]
        if (out == _UNKNOWN).any():
            bad = np.unique(mask[out == _UNKNOWN])
            raise DataError(
                f"{path}: mask has values {_fmt_values(bad)} that the label set does not define "
                f"(known: {_fmt_values(np.array(sorted(self.value_map)))})"
            )
        return out.astype(np.uint8)

    def _encode_rgb(self, mask: np.ndarray, path: str | Path) -> np.ndarray:
        if mask.ndim != 3 or mask.shape[2] not in (3, 4):
            raise DataError(f"{path}: RGB mask expected (3 channels), got shape {tuple(mask.shape)}")
        if mask.dtype != np.uint8:
            raise DataError(f"{path}: RGB mask must be 8-bit per channel, got {mask.dtype}")
        key = rgb_key(mask[..., :3])
        out = np.full(key.shape, _UNKNOWN, dtype=np.int16)
        for k, target in zip(self._color_keys, self._color_targets, strict=True):
            out[key == k] = target
        unknown = out == _UNKNOWN
        if unknown.any():
            bad = np.unique(key[unknown])[:5]
            colors = ", ".join(f"({k >> 16},{(k >> 8) & 255},{k & 255})" for k in bad)
            raise DataError(
                f"{path}: mask has {int(unknown.sum())} pixels of colours the label set does not define, e.g. {colors}"
            )
        return out.astype(np.uint8)

    def implicit_ignore_pixels(self, raw: np.ndarray) -> int:
        """Pixels of a raw mask whose value is 255 when the label file did not state 255 as
        ignore (``ignore_values: [255]`` or a ``map`` entry): such pixels are read as "no label"."""
        if not self.implicit_ignore:
            return 0
        if raw.ndim == 3:
            raw = raw[..., 0]
        return int(np.count_nonzero(raw == IGNORE_INDEX))

    def colorize(self, index_mask: np.ndarray, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """HxW class indices -> HxWx3 uint8 in the label set's colours (ignore in ``ignore_color``)."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.array(self.colors, dtype=np.uint8)
        palette[IGNORE_INDEX] = np.array(ignore_color, dtype=np.uint8)
        return palette[index_mask]


def load_labels(labels: str | Mapping[str, Any] | None, root: str, where: str = "data.labels") -> LabelSet:
    """A label set from a file (``labels.yaml`` format, relative to ``root``) or the same content inline."""
    if labels is None:
        raise DataError(f"{where}: a label file (or inline label spec) is required")
    if isinstance(labels, Mapping):
        return LabelSet.from_dict(labels, source=where)
    return LabelSet.from_yaml(labels if os.path.isabs(labels) else os.path.join(root, labels))


def _fmt_values(values: np.ndarray, limit: int = 8) -> str:
    vals = [int(v) for v in values[:limit]]
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return "[" + ", ".join(map(str, vals)) + more + "]"


def check_same_classes(model_names: list[str], data_names: list[str], model: str = "", labels: str = "") -> None:
    """The model's classes must be the data's, in the same order: a confusion matrix of two
    different label sets would score class i of one as class i of the other (evaluate and the
    export's held-back scoring). ``model`` and ``labels``: where each came from, for the message."""
    if [name_key(n) for n in model_names] == [name_key(n) for n in data_names]:
        return
    if len(model_names) != len(data_names):
        raise DataError(f"{model + ': ' if model else ''}the model has {len(model_names)} classes, the label set"
                        f"{' ' + labels if labels else ''} {len(data_names)}")
    if sorted(name_key(n) for n in model_names) == sorted(name_key(n) for n in data_names):
        raise DataError(f"the model and the label set have the same classes in another order (model: "
                        f"{model_names}, labels: {data_names}); list the names in the model's order")
    i = next(i for i, (a, b) in enumerate(zip(model_names, data_names, strict=True)) if name_key(a) != name_key(b))
    raise DataError(f"class {i} is {model_names[i]!r} in the model but {data_names[i]!r} in the label set "
                    f"(model: {model_names}, labels: {data_names})")
