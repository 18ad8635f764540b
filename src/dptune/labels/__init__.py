"""Label sets: class names, colours, and how the pixels of a mask map to class indices.

Everything downstream (loss, metrics, padding, export) relies on two facts established here:
class indices are contiguous ``0..C-1`` and ``IGNORE_INDEX`` (255) means "no label".

``base`` holds the constants, palette and the duplicate-key YAML loader; ``spec`` parses the
``labels.yaml`` format; ``labelset`` is the :class:`LabelSet` that encodes masks.
"""

from dptune.labels.base import (
    IGNORE_INDEX,
    MAX_CLASSES,
    DuplicateKey,
    MaskFormat,
    UniqueKeyLoader,
    color_tuple,
    default_palette,
    name_key,
)
from dptune.labels.labelset import LabelSet, check_same_classes, load_labels

__all__ = [
    "IGNORE_INDEX", "MAX_CLASSES", "DuplicateKey", "LabelSet", "MaskFormat", "check_same_classes", "UniqueKeyLoader", "color_tuple",
    "default_palette", "load_labels", "name_key",
]
