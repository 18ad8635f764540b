"""What every dptune task shares: building the network, normalisation, precision and memory
switches, SyncBatchNorm, the evaluation loss, checkpoint metadata, the optimizer and schedule
(``optimizing``: parameter groups with layer-wise LR decay, warmup-poly) and the divergence guard
(``divergence``). Nothing here knows what the heads predict: each task (``segmentation``, ``depth``)
owns its head, loss, metrics and export."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dptune.data.base import ValidationSource, one_process_stage
from dptune.errors import ConfigError, first_line
from dptune.metrics import SplitMean, private_states
from dptune.models.backbones import family
from dptune.models.dpt_backbone import uses_backbone
from dptune.models.normalization import resolve_normalization
from dptune.preprocessing import Preprocessing
from dptune.tasks.divergence import DivergenceGuard
from dptune.tasks.optim import NonFiniteSteps, check_optimizer_settings
from dptune.tasks.optimizing import Optimizing
from dptune.tasks.stage_checks import StageChecks

log = logging.getLogger(__name__)

# precisions that keep the weights, and every float tensor of a batch, in 16 bits
SIXTEEN_BIT_WEIGHTS = ("bf16-true", "16-true")


def wants_sync_batchnorm(trainer) -> bool:
    """SyncBatchNorm for multi-process GPU runs (NCCL); it has no CPU implementation."""
    return trainer is not None and trainer.world_size > 1 and trainer.strategy.root_device.type == "cuda"


class DPTTask(DivergenceGuard, Optimizing, StageChecks, pl.LightningModule):
    """Base of every task. A task implements the ``configure_*`` hooks (network, losses, metrics;
    see "what a task provides"), its forward pass, steps and ``task_metadata``."""

    task: ClassVar[str] = ""
    # the parts of the network that are convolutional (channels-last, see __init__)
    conv_parts: ClassVar[tuple[str, ...]] = ("neck", "head")

    def __init__(
        self,
        pretrained: str | None = None,
        config: str | dict[str, Any] | None = None,
        backbone: str | None = None,
        image_size: int | list[int] = 384,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        momentum: float = 0.9,
        head_lr_mult: float = 10.0,
        layer_decay: float = 1.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        warmup_steps: int | None = None,
        poly_power: float = 1.0,
        min_lr_ratio: float = 0.0,
        attn_implementation: str = "auto",
        fresh_init: Literal["he", "hf"] = "he",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        gradient_checkpointing: bool = False,
        sync_batchnorm: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        log_images: int = 4,
        nonfinite_skips: int = 3,
    ) -> None:
        """
        Args:
            pretrained: Hub id or local directory of a checkpoint (e.g. ``Intel/dpt-large-ade``), or a
                dptune ``.ckpt`` / export of either task: what fits carries over (backbone, neck, and
                the head when it is this task's).
            config: ``DPTConfig`` JSON file (or dict) for a randomly initialised model.
                ``pretrained`` and ``config`` may also name a bare backbone (e.g. ``facebook/dinov2-small``
                or a ``"model_type": "dinov2"`` JSON): it gets a fresh DPT neck and heads.
            backbone: Backbone family the model must be: ``vit`` (DPT's own), ``hybrid`` (DPT-Hybrid),
                ``swinv2``, ``beit``, ``dinov2`` or another ``transformers`` backbone type. Optional; a
                mismatch with what ``pretrained``/``config`` holds is an error.
            image_size: Evaluation/export size, filled in from ``data.image_size``.
            optimizer: ``adamw`` (default) or ``sgd`` with momentum (the DPT paper's ADE20K recipe).
            lr: Peak learning rate of the backbone.
            momentum: SGD momentum.
            head_lr_mult: The neck and heads (newly initialised layers included) train at ``lr * head_lr_mult``.
            layer_decay: Layer-wise learning-rate decay of the backbone: block ``i`` of ``n`` trains at
                ``lr * layer_decay ** (n + 1 - i)``, the embeddings at ``lr * layer_decay ** (n + 1)``.
                ``1.0`` (default) turns it off; the BEiT recipe uses 0.9.
            weight_decay: Weight decay; never applied to norms, biases, position embeddings, CLS token
                and Swin-V2's logit scale and position-bias MLP.
            betas: AdamW betas.
            warmup_ratio: Linear warmup length as a fraction of all optimizer steps.
            warmup_steps: Linear warmup length in optimizer steps (overrides ``warmup_ratio``).
            poly_power: Exponent of the polynomial decay after warmup.
            min_lr_ratio: Final learning rate as a fraction of the peak.
            attn_implementation: ``auto`` (default): ``eager`` on a CPU in bfloat16 for sequences of up
                to 400 tokens (PyTorch's fused attention is the slower kernel there; ``python -m
                dptune.models.attention`` times both), ``sdpa`` otherwise; the log says which.
                ``sdpa`` or ``eager`` choose one.
            fresh_init: How the convolutional neck and heads start where they have no pretrained
                weights (a model from ``config``, a bare backbone, a checkpoint of the other task):
                ``he`` (He-normal; default) or ``hf`` (``transformers``' N(0, 0.02), which leaves a DPT
                trained from scratch stuck on the largest classes; docs/benchmarks.md).
            image_mean: Normalisation mean (0-1 scale); default: the checkpoint's image processor, else the
                backbone family's published statistics (0.5 for DPT's ViT/Hybrid and BEiT, ImageNet's for
                DINOv2 and Swin); the log says which was used.
            image_std: Normalisation std; default as for ``image_mean``.
            gradient_checkpointing: Recompute backbone activations in backward to save memory.
            sync_batchnorm: In multi-GPU runs, synchronise the BatchNorm statistics of the fusion
                blocks and heads across processes (GPU only; CPU/gloo runs keep plain BatchNorm).
            compile: ``torch.compile`` the forward pass (pays a compile at start; pays off on long GPU runs).
            channels_last: Channels-last memory format for the convolutional neck and heads (GPU).
            log_images: Validation images logged per epoch (overlays or depth panels).
            nonfinite_skips: Optimizer steps in a row whose loss or gradients are NaN/inf that are
                skipped (the weights and BatchNorm statistics stay as they were; a warning each)
                before the run stops as diverged, with an error naming the step. 0 stops at the first.
        """
        super().__init__()
        self.save_hyperparameters()  # the task's own arguments too (Lightning collects every __init__ frame)
        check_optimizer_settings(self.hparams)  # before the network is built and any data loads
        try:
            self.configure_models()  # the hooks' order: see "what a task provides" below
        except (ValueError, ImportError) as e:
            if attn_implementation in ("auto", "sdpa", "eager"):
                raise
            # an attention transformers does not know, or cannot run here (flash_attention_2 on a CPU)
            raise ConfigError(f"model.attn_implementation {attn_implementation!r}: {first_line(e, 200)} (auto, sdpa "
                              "and eager run everywhere)") from None
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if channels_last:
            for name in self.conv_parts:
                part = getattr(self.model, name, None)
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        self._run = torch.compile(self.network_forward) if compile else self.network_forward
        self.image_mean, self.image_std = self._mean_std(pretrained, image_mean, image_std)
        # how images are prepared, defined once (validation, windows, predictors and export read it)
        self.preprocessing = Preprocessing.of_task(self.hparams.image_size, self.image_mean, self.image_std)
        scale, shift = self.preprocessing.scale_shift()  # (x / 255 - mean) / std as one multiply-add
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        self.configure_losses()
        self.configure_metrics()
        self.eval_loss = nn.ModuleDict({stage: SplitMean() for stage in ("val", "test")})  # see log_eval_loss
        self.last_metrics: dict[str, Any] = {}
        self._nonfinite = NonFiniteSteps(nonfinite_skips)  # checks the setting now, before any data loads
        self._window_open = False  # an accumulation window (of batches, up to an optimizer step) has started

    # ------------------------------------------------------------------ what a task provides
    # ``__init__`` calls the three ``configure_*`` hooks in this order: ``configure_models`` first
    # (the network switches and the normalisation read ``self.model``), then ``configure_losses``,
    # then ``configure_metrics``; each may read what the hooks before it set, and ``self.hparams``.
    # ``setup`` then calls ``configure_source_metrics`` with what the datamodule declares.
    def configure_models(self) -> None:
        """Build the network from ``self.hparams`` into ``self.model`` (a ``transformers`` model),
        and set up its parts (frozen heads, dropout kind)."""
        raise NotImplementedError(f"{type(self).__qualname__}.configure_models: set self.model (the network, built "
                                  "from self.hparams) in this hook; every task implements it")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "build_network" in vars(cls):  # the hook's old name: the stock network would silently win
            raise TypeError(f"{cls.__qualname__}.build_network: dptune builds a task's network in configure_models "
                            "now; rename the method and set self.model there instead of returning the network")

    def configure_losses(self) -> None:
        """The loss settings and anything the losses own (class weights, learned task weights).
        Trainable parameters set here, outside ``self.model``, are optimised too: in one ``task``
        group at ``lr * head_lr_mult`` without weight decay (see ``param_groups``)."""

    def configure_metrics(self) -> None:
        """The validation and test metrics (``torchmetrics`` modules)."""

    def configure_source_metrics(self, sources: list[ValidationSource]) -> None:
        """Metrics that depend on the validation data: called from ``setup`` with the datamodule's
        ``validation_sources()`` (``dptune.data.base.ValidationSource``, one per validation loader,
        in loader order; empty when the datamodule declares none)."""

    def network_forward(self, model: nn.Module, pixel_values: torch.Tensor, *args: Any) -> Any:
        """The task's forward pass on normalised images (compiled with ``compile``)."""
        raise NotImplementedError

    def task_metadata(self) -> dict[str, Any]:
        """Task facts a checkpoint carries beside the weights (read by export and ``load_module``)."""
        return {}

    def log_eval_loss(self, stage: str, mean: torch.Tensor, weight: torch.Tensor) -> None:
        """``{stage}/loss``: the split's mean, each batch's ``mean`` weighted by what it averages
        (``SplitMean``). Lightning's own epoch mean of a value logged with ``sync_dist`` averages the
        processes' batch counts as integers (shards of 3 and 2 images: 2, so the loss came out 1.25x),
        and counted a batch that scored nothing as a 0."""
        self.eval_loss[stage].update(mean, weight)
        self.log(f"{stage}/loss", self.eval_loss[stage])

    # ------------------------------------------------------------------ normalisation and sizes
    def _mean_std(self, pretrained, mean, std) -> tuple[list[float], list[float]]:
        """The normalisation, from (in order) the settings, the checkpoint's image processor, or
        the backbone family's published statistics (``resolve_normalization``, which the loader
        benchmark reads too); one log line says which."""
        mean, std, why, known = resolve_normalization(mean, std, pretrained, family(self.model.config))
        from dptune.data.loaders import rank

        if rank() == 0:  # said once a run, not by every process
            (log.info if known else log.warning)("normalisation: mean %s std %s (%s)", mean, std, why)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # in the buffers' dtype: float32, or bfloat16 when the whole module is (bf16-true; 0-255 is exact there)
        return torch.addcmul(self._shift, images.to(self._scale.dtype), self._scale)

    def prepare_data(self) -> None:
        """After the datamodule's (which checked the data), before Lightning starts the run's loggers,
        in a run of one process (``one_process_stage``): the stage's checks (``check_stage``), so
        that a run refused for its settings leaves no run behind."""
        stage = one_process_stage(self.trainer)
        # only once the datamodule has checked its data here (one that overrides prepare_data may not)
        if stage is not None and getattr(self.trainer.datamodule, "checked_stage", None) == stage:
            self.check_stage(stage)
            self._checked_before_setup = stage

    def setup(self, stage: str) -> None:
        if getattr(self, "_checked_before_setup", None) != stage:
            self.check_stage(stage)
        self._checked_before_setup = None
        private_states(self)  # not shared with other processes (ddp_spawn)
        dm = getattr(self.trainer, "datamodule", None)
        size = self.hparams.image_size
        square = isinstance(size, int) or int(size[0]) == int(size[1])
        stock_vit = self.model.config.model_type == "dpt" and not uses_backbone(self.model.config)
        if stage == "fit" and not square and stock_vit:
            log.warning("image_size %s is not square: dptune trains and validates on it, but plain transformers' DPT "
                        "(ViT) forward runs square inputs only, so the export will not run in pipeline(...)", size)
        if stage == "fit":
            self._train_mode()
            if str(self.trainer.precision) in SIXTEEN_BIT_WEIGHTS and self.trainer.is_global_zero:
                log.warning("precision %s keeps the weights in 16 bits: an update smaller than half their spacing is "
                            "lost (LayerNorm weights barely move at lr 1e-4); bf16-mixed trains in float32 weights",
                            self.trainer.precision)
        self._choose_attention()
        self.configure_source_metrics(list(dm.validation_sources()) if hasattr(dm, "validation_sources") else [])
        # before the strategy wraps the model in DDP
        if self.hparams.sync_batchnorm and wants_sync_batchnorm(self.trainer):
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            log.info("BatchNorm layers synchronised across %d processes", self.trainer.world_size)

    @property
    def built_attention(self) -> str:
        """The attention the model is built with: ``auto`` builds ``sdpa``; ``setup`` may switch it to
        ``eager`` once the run's device and precision are known (``dptune.models.attention``)."""
        impl = self.hparams.attn_implementation
        return "sdpa" if impl == "auto" else impl

    def _choose_attention(self) -> None:
        """``attn_implementation: auto``: the kernel ``dptune.models.attention`` picks for this run's
        device, precision and input sizes, set on every transformers model of the network; one log line
        says which and why."""
        from dptune.models.attention import choose_attention, set_attention

        if self.hparams.attn_implementation != "auto":
            return
        dm = getattr(self.trainer, "datamodule", None)
        sizes = [self.hparams.image_size, getattr(dm, "crop_size", None)]  # eval and train inputs
        pick, why = choose_attention(self.model.config, self.trainer.strategy.root_device.type, self.trainer.precision,
                                     sizes)
        set_attention(self.model, pick)
        if self.trainer.is_global_zero:
            log.info("%s attention chosen: %s (model.attn_implementation overrides)", pick, why)

    def _train_mode(self) -> None:
        """Train the whole network in train mode. ``from_pretrained`` hands models over in eval mode
        (BatchNorm on frozen running statistics, dropout off) and Lightning keeps the modes it finds,
        so every start from weights would otherwise fine-tune in eval mode. Called from ``setup``,
        before any callback's ``on_fit_start`` (the model summary counts modes there). What stays
        frozen on purpose (weights the forward pass never reads) is said once."""
        switched = sum(not m.training for m in self.modules())
        self.train()
        frozen = [n for n, p in self.named_parameters() if not p.requires_grad]
        if self.trainer.is_global_zero:
            log.info("training in train mode (%d of %d modules were in eval mode); %d parameter tensors frozen: "
                     "unused by the forward pass%s", switched, len(list(self.modules())), len(frozen),
                     f" ({', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''})" if frozen else "")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Torch's random numbers (dropout) for this batch seeded from the run's seed, the epoch, the
        batch and the process (the datamodule's ``batch_seed``): a resumed run draws what the
        uninterrupted one does."""
        datamodule = getattr(self._trainer, "datamodule", None)
        seed = datamodule.batch_seed(batch_idx, self.global_rank) if hasattr(datamodule, "batch_seed") else None
        if seed is not None:
            torch.manual_seed(seed)
        return super().on_train_batch_start(batch, batch_idx)

    # ------------------------------------------------------------------ export support
    def image_processor(self):
        """The ``DPTImageProcessor`` that reproduces validation preprocessing for plain transformers."""
        return self.preprocessing.processor()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # enough to rebuild the model offline, without the hub (see load_module)
        checkpoint["dptune"] = {
            "task": self.task,
            "model_config": self.model.config.to_dict(),
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "metrics": self.last_metrics,
            **self.task_metadata(),
        }
        trainer = self._trainer
        if trainer is not None:  # the precision it trained in, and why (precision: auto); export's card says it
            checkpoint["dptune"]["precision"] = {
                "precision": str(trainer.precision),
                "requested": str(getattr(trainer, "precision_requested", trainer.precision)),
                "reason": getattr(trainer, "precision_reason", "as given"),
            }
