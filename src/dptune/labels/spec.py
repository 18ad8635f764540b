"""Parse the ``labels.yaml`` format into a :class:`~dptune.labels.LabelSet`.

Keys (all optional but ``names``/``from_checkpoint``)::

    names: [Sky, Building, ...]          # class i is names[i]
    colors: [[r, g, b], ...]             # palette; the encoding when mask_format is rgb
    mask_format: index | rgb             # default index
    ignore_values: [11]                  # index masks: source values with no label
    ignore_colors: [[0, 0, 0]]           # rgb masks: colours with no label
    reduce_labels: true                  # ADE20K style: value 0 = "other" (ignored), value k = class k-1
    map: {12: Car, 13: Car, 0: ignore}   # index masks: source value -> class name/index or "ignore";
                                         # when given it replaces "value i is class i"
    color_map: [[[r, g, b], Car], ...]   # rgb masks: colour -> class name/index or "ignore";
                                         # when given it replaces "colors[i] is class i"
    from_checkpoint: Intel/dpt-large-ade # names (and order) from a checkpoint's config.id2label
"""

from __future__ import annotations

from typing import Any

from dptune.errors import ConfigError
from dptune.labels.base import IGNORE_INDEX, color_tuple, name_key, whole_number

_KNOWN_KEYS = {
    "names", "colors", "mask_format", "ignore_values", "ignore_colors", "reduce_labels",
    "map", "color_map", "from_checkpoint", "value_map",
}


# YAML 1.1 reads yes/no/on/off/true/false (any case) as booleans and null/~ as nothing
QUOTE_HINT = (" (YAML reads an unquoted No, Yes, On, Off or Null as true/false/null, and 01, 0x10 or 1_000 as a "
              "number: quote the name, e.g. 'No' or '01')")


def _names_from_checkpoint(ref: str) -> list[str]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ref)
    id2label = {int(k): v for k, v in config.id2label.items()}
    return [id2label[i] for i in range(len(id2label))]


def _target(value: Any, names: list[str], source: str) -> int:
    """A map target: class name (case-insensitive), class index, or 'ignore'/255."""
    if isinstance(value, str):
        if name_key(value) == "ignore":
            return IGNORE_INDEX
        lowered = [name_key(n) for n in names]
        if name_key(value) not in lowered:
            raise ConfigError(f"{source}: map target {value!r} is not a class name")
        return lowered.index(name_key(value))
    if isinstance(value, int) and not isinstance(value, bool) and (0 <= value < len(names) or value == IGNORE_INDEX):
        return value
    raise ConfigError(f"{source}: map target {value!r} must be a class name, an index or 'ignore'"
                      f"{QUOTE_HINT if isinstance(value, bool) or value is None else ''}")


def _mask_value(v: Any, where: str, source: str) -> int:
    """A mask value of ``map``, ``value_map`` or ``ignore_values``: a whole number (never truncated)."""
    n = whole_number(v)
    if n is None:
        raise ConfigError(f"{source}: {where}: mask value {v!r} is not a whole number (masks hold whole numbers)")
    return n


def _mapping(spec: dict[str, Any], key: str, source: str) -> dict:
    value = spec[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{key}' must be a mapping of mask value -> class, got {value!r}")
    return value


def _index_map(spec: dict[str, Any], names: list[str], source: str) -> dict[int, int]:
    # each replaces "value i is class i": one would silently win (a key left empty says nothing)
    rules = [k for k in ("value_map", "map", "reduce_labels") if spec.get(k) not in (None, False)]
    if len(rules) > 1:
        raise ConfigError(f"{source}: {' and '.join(rules)} each say how mask values become classes: give one")
    if spec.get("value_map") is not None:  # the checkpoint form written by LabelSet.to_dict
        return {_mask_value(k, "value_map", source): _mask_value(v, "value_map", source)
                for k, v in _mapping(spec, "value_map", source).items()}
    if spec.get("map") is not None:
        value_map = {}
        for k, v in _mapping(spec, "map", source).items():
            k = _mask_value(k, "map", source)
            if k in value_map:  # 12 and "12" are one mask value: the second would silently win
                raise ConfigError(f"{source}: mask value {k} is mapped twice in 'map'")
            value_map[k] = _target(v, names, source)
    elif spec.get("reduce_labels"):
        value_map = {i + 1: i for i in range(len(names))}
        value_map[0] = IGNORE_INDEX
    else:
        value_map = {i: i for i in range(len(names))}
    ignored = spec.get("ignore_values") if spec.get("ignore_values") is not None else []
    if not isinstance(ignored, list):
        raise ConfigError(f"{source}: ignore_values must be a list of mask values, e.g. [{ignored!r}]")
    for v in ignored:
        v = _mask_value(v, "ignore_values", source)
        if value_map.get(v, IGNORE_INDEX) != IGNORE_INDEX:
            raise ConfigError(f"{source}: value {v} is both a class and in ignore_values")
        value_map[v] = IGNORE_INDEX
    return value_map


def _color_map(spec: dict[str, Any], names: list[str], colors: list, source: str) -> dict[tuple, int]:
    if "color_map" in spec:
        pairs = spec["color_map"] or []
        cmap = {}
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"{source}: color_map entries are [[r, g, b], class], got {pair!r}")
            color = color_tuple(pair[0], f"{source}: color_map")
            if color in cmap:  # the second entry would silently relabel the first's pixels
                raise ConfigError(f"{source}: colour {list(color)} is mapped twice in 'color_map'")
            cmap[color] = _target(pair[1], names, source)
    else:
        if not colors:
            raise ConfigError(f"{source}: mask_format rgb needs 'colors' (or 'color_map')")
        cmap = {}
        for i, c in enumerate(colors):
            color = color_tuple(c, f"{source}: colors")
            if color in cmap:  # an RGB mask cannot tell the two classes apart: one would never be read
                raise ConfigError(f"{source}: classes {names[cmap[color]]!r} and {names[i] if i < len(names) else i!r} "
                                  f"have the same colour {list(color)}")
            cmap[color] = i
    for c in spec.get("ignore_colors") or []:
        c = color_tuple(c, f"{source}: ignore_colors")
        if cmap.get(c, IGNORE_INDEX) != IGNORE_INDEX:
            raise ConfigError(f"{source}: colour {list(c)} is both a class and in ignore_colors")
        cmap[c] = IGNORE_INDEX
    return cmap


def parse_label_spec(cls: type, spec: dict[str, Any], source: str) -> Any:
    """``cls(...)`` (a :class:`~dptune.labels.LabelSet`) from a ``labels.yaml`` mapping."""
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN_KEYS)})")
    names = spec.get("names")
    if names is None and spec.get("from_checkpoint"):
        names = _names_from_checkpoint(str(spec["from_checkpoint"]))
    if not names or not isinstance(names, list):
        raise ConfigError(f"{source}: 'names' must be a non-empty list (or give 'from_checkpoint')")
    for i, n in enumerate(names):  # YAML reads 01 as 1, 0x10 as 16, No as false: only text is a name
        if not (isinstance(n, str) and n.strip()):
            hint = QUOTE_HINT if isinstance(n, (bool, int, float)) or n is None else ""
            raise ConfigError(f"{source}: names[{i}] is {n!r}, not a class name{hint}")
    if not isinstance(spec.get("reduce_labels", False), bool):
        raise ConfigError(f"{source}: reduce_labels must be true or false, got {spec['reduce_labels']!r}")
    colors = spec.get("colors") or []
    mask_format = spec.get("mask_format", "index")
    if mask_format not in ("index", "rgb"):
        raise ConfigError(f"{source}: mask_format must be 'index' or 'rgb', got {mask_format!r}")
    if mask_format == "index":
        if spec.get("ignore_colors") or "color_map" in spec:
            raise ConfigError(f"{source}: ignore_colors/color_map apply to mask_format rgb only")
        return cls(names=names, colors=colors, mask_format="index",
                   value_map=_index_map(spec, names, source), source=source)
    if spec.get("ignore_values") or "map" in spec or spec.get("reduce_labels"):
        raise ConfigError(f"{source}: ignore_values/map/reduce_labels apply to mask_format index only")
    if "color_map" in spec and not spec["color_map"] and not colors:
        raise ConfigError(f"{source}: empty color_map")
    cmap = _color_map(spec, names, colors, source)
    if not colors and "color_map" in spec:
        # display colours default to the first colour mapped to each class
        first = {}
        for c, t in cmap.items():
            first.setdefault(t, list(c))
        colors = [first.get(i) for i in range(len(names))]
        colors = colors if all(c is not None for c in colors) else []
    return cls(names=names, colors=colors, mask_format="rgb", color_map=cmap, source=source)
