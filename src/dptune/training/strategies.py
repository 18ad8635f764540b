"""FSDP for large backbones: ``--trainer.strategy dptune.training.strategies.DPTFSDPStrategy``.

Lightning's ``fsdp`` strategy wraps the whole model as one unit unless told what to shard. This
one makes each transformer block its own FSDP unit, for every backbone family: in
``transformers`` the blocks are ``GradientCheckpointingLayer``s (DPT's ViT layers, BEiT and
DINOv2 layers, Swin stages). ``use_orig_params`` keeps parameter names (layer-wise LR decay and
the head/backbone split read them) and lets frozen and trainable weights share a unit (dptune
freezes the weights its forward never uses). Lightning runs FSDP on GPUs only.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from transformers.modeling_layers import GradientCheckpointingLayer

BLOCKS = {GradientCheckpointingLayer}


class DPTFSDPStrategy(FSDPStrategy):
    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: str = "full",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state),
                ``SHARD_GRAD_OP`` (keeps parameters whole between forward and backward: faster,
                more memory) or ``HYBRID_SHARD`` (full sharding inside a node, replicas across nodes).
            activation_checkpointing: Recompute each block's activations in backward.
            state_dict_type: ``full`` writes ordinary ``last.ckpt`` files that export and resume read.
        """
        kwargs.setdefault("auto_wrap_policy", set(BLOCKS))
        kwargs.setdefault("use_orig_params", True)
        if activation_checkpointing:
            kwargs.setdefault("activation_checkpointing_policy", set(BLOCKS))
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
