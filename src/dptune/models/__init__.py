"""Building DPTs (hub id, directory, config, backbone family), fresh-layer initialisation, the
forward passes, FLOPs."""

from dptune.models.build import (
    adapt_classifiers,
    build_model,
    freeze_unused,
    he_init,
    he_init_layer,
    load_exported,
)
from dptune.models.forward import BACKBONE_PREFIXES, segment
from dptune.models.source import load_config, pretrained_config

__all__ = [
    "BACKBONE_PREFIXES", "adapt_classifiers", "build_model", "freeze_unused", "he_init", "he_init_layer",
    "load_config", "load_exported", "pretrained_config", "segment",
]
