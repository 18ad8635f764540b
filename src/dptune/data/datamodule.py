"""SegmentationDataModule: owns files, label set, checks, augmentations and loaders."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

import numpy as np

from dptune.data.base import SplitDataModule, pair, settle_problems
from dptune.data.cache import DiskCache
from dptune.data.dataset import SegmentationDataset, scan
from dptune.data.hf_sources import check_hf_settings
from dptune.data.loaders import augment_seed, stream_seed
from dptune.data.sources import SYNTHETIC_COLORS, SYNTHETIC_NAMES, build_source
from dptune.data.streaming import StreamingSegmentation, open_stream
from dptune.data.transforms import build_transforms, default_train_transforms, eval_preprocessing
from dptune.errors import ConfigError, DataError
from dptune.labels import LabelSet, load_labels

log = logging.getLogger(__name__)



def check_coverage(labels: LabelSet, class_pixels: np.ndarray, implicit_ignore: int, where: str, masks: int) -> None:
    """Stop when a class never occurs in the training masks while raw 255, which the label file
    never declared as "no label", does: binary masks stored as 0/255 would otherwise train on the
    background alone. An implied 255 with every class present, or an absent class without it,
    is logged loudly instead. Masks without a labelled pixel at all stop the run: nothing would be learnt."""
    classes = range(labels.num_classes) if labels.annotated is None else labels.annotated
    missing = [labels.names[c] for c in classes if class_pixels[c] == 0]
    total = int(class_pixels.sum())
    if not int(class_pixels[:labels.num_classes].sum()) and not implicit_ignore:
        raise DataError(f"{where}: no labelled pixel in any of its {masks} masks (every pixel is 'no label', "
                        "255 or an ignore value of the label file): there is nothing to train on")
    if implicit_ignore and missing:
        share = implicit_ignore / max(1, total)
        # a map names every stored value: the other classes keep their index, 255 becomes the missing class
        mapping = ", ".join([f"{i}: {n}" for i, n in enumerate(labels.names) if n != missing[0]] + [f"255: {missing[0]}"])
        raise DataError(
            f"{where}: class {missing[0]!r} never occurs in the training masks, while {share:.1%} of their pixels "
            f"are 255, which dptune reads as 'no label'. If 255 stores {missing[0]!r} (masks saved as 0/255), add "
            f"'map: {{{mapping}}}' to the label file; if 255 means no label, say so with 'ignore_values: [255]'")
    if implicit_ignore:
        log.warning("%s: %.1f%% of the training pixels are 255 and read as 'no label' (ignore_values does not list "
                    "255; add it to say that this is meant)", where, 100 * implicit_ignore / max(1, total))
    for name in missing:
        log.warning("%s: class %r never occurs in the training masks", where, name)


class SegmentationDataModule(SplitDataModule):
    def __init__(
        self,
        root: str = ".",
        labels: str | dict[str, Any] | None = "labels.yaml",
        source: Literal["folder", "hf", "synthetic"] = "folder",
        splits: dict[str, dict[str, Any]] | None = None,
        hf: dict[str, Any] | None = None,
        image_size: int | list[int] = 384,
        crop_size: int | list[int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        train_transforms: list[dict[str, Any]] | None = None,
        val_mode: Literal["resize", "slide"] = "resize",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        check: bool | Literal["header"] = True,
        cache: bool | Literal["memory", "disk"] = False,
        cache_dir: str | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
    ) -> None:
        """
        Args:
            root: Dataset folder; relative paths in ``labels`` and ``splits`` are relative to it.
            labels: Label file (``labels.yaml`` format, relative to ``root``) or the same content inline.
                Not needed for ``source: synthetic``.
            source: ``folder`` (image glob + mask template), ``hf`` (Hugging Face dataset) or ``synthetic``.
            splits: Per stage (``train``, ``val``, ``test``) the split spec. folder:
                ``{images: "train/*.jpg", masks: "trainannot/{stem}.png"}`` (placeholders ``{stem}``,
                ``{name}``, ``{dir}``, and ``{id}``: what the glob's wildcards matched in the file name); hf:
                ``{split: validation}``; synthetic: ``{count: 200, seed: 0}``.
            hf: For ``source: hf``: ``{dataset: <hub name or save_to_disk dir>, image_column, mask_column, config_name}``;
                add ``streaming: true`` to stream instead of downloading (each process reads its own
                shards; training repeats the stream, so set ``trainer.max_steps``; ``shuffle_buffer``
                (1000) examples are shuffled at a time; a ``save_to_disk`` dir streams as ``num_shards`` (8)).
            image_size: Evaluation and export size (h, w) or one int for square. Whole images are resized
                to it for validation exactly as the exported image processor will; plain ``transformers``
                needs it square. Training crops are drawn at this scale.
            crop_size: Training crop (h, w); defaults to ``image_size``.
            scale_range: Random rescale range for training, relative to ``image_size``.
            train_transforms: Replace the default training pipeline: a list of
                ``{name: <albumentations or dptune transform>, **kwargs}``.
            val_mode: ``resize``: validate on whole images resized to ``image_size`` (what a plain
                ``transformers`` user does with the exported processor); ``slide``: validate at native
                resolution with ``image_size`` sliding windows, and draw training crops at native scale
                (large images such as aerial tiles).
            batch_size: Training batch size per process.
            val_batch_size: Validation/test batch size per process (default: ``batch_size``).
            num_workers: Loader worker processes per loader. Default: none on machines with 2 cores or
                fewer (a worker would compete with the model for them), else half the cores, at most 8.
            pin_memory: Pin host memory (default: on when CUDA is available).
            persistent_workers: Keep workers alive between epochs.
            check: Decode every sample before training starts, so bad files stop the run early (and
                count the classes: a class that never occurs in training next to unstated 255s stops
                the run). ``header``: images are checked from their headers only (faster; a corrupt
                image body then stops the run when training reaches it); masks are always decoded.
            cache: ``memory`` (or ``true``): keep decoded images and encoded masks in memory (small
                datasets: decode once per run). ``disk``: write them once as raw arrays under
                ``cache_dir`` and read those in every later epoch and run (folder sources; shared by
                processes and workers; entries follow file and label-set changes).
            cache_dir: Where ``cache: disk`` writes (default ``~/.cache/dptune/samples``).
            on_bad_sample: ``error`` stops before training listing the bad files; ``skip`` leaves them
                out and logs how many.
        """
        super().__init__()
        self.save_hyperparameters()
        self.root = os.path.expanduser(root)
        self.source_kind = source
        self.init_splits_and_loaders(splits, batch_size, val_batch_size, num_workers, pin_memory, persistent_workers)
        self.hf = hf or {}
        check_hf_settings(self.hf, "segmentation")
        self.image_size = pair(image_size)
        self.crop_size = pair(crop_size) or self.image_size
        self.scale_range = tuple(float(v) for v in scale_range)
        lo, hi = (self.scale_range + (math.nan, math.nan))[:2]
        if len(self.scale_range) != 2 or not 0 < lo <= hi < math.inf:  # NaN too
            raise ConfigError(f"data.scale_range {list(self.scale_range)}: the smallest and largest rescale of a "
                              "training image, relative to image_size: 0 < smallest <= largest (e.g. [0.5, 2.0])")
        self.train_transforms_spec = train_transforms
        self.val_mode = val_mode
        self.cache = "memory" if cache is True else cache or None
        self.cache_dir = cache_dir
        self.check, self.on_bad_sample = check, on_bad_sample
        self.label_set = self._load_labels(labels)
        self.datasets: dict[str, SegmentationDataset] = {}
        self.skipped: dict[str, int] = {}
        self.config_path = "data"  # where this datamodule's settings sit in the config (a joint task's source: deeper)

    # ------------------------------------------------------------------ labels
    def _load_labels(self, labels: str | dict[str, Any] | None) -> LabelSet:
        if self.source_kind == "synthetic" and labels in (None, "labels.yaml"):
            return LabelSet(names=list(SYNTHETIC_NAMES), colors=[list(c) for c in SYNTHETIC_COLORS], source="synthetic")
        return load_labels(labels, self.root)

    @property
    def labels_spec(self) -> dict[str, Any]:
        """The label set as a plain dict: what the model receives (by ``link_arguments``)."""
        return self.label_set.to_dict()

    # ------------------------------------------------------------------ datasets
    def train_transform(self):
        base = self.image_size if self.val_mode == "resize" else None  # native scale for sliding windows
        spec = self.train_transforms_spec or default_train_transforms(self.crop_size, self.scale_range, base)
        return build_transforms(spec, seed=augment_seed())

    @property
    def streaming(self) -> bool:
        return self.source_kind == "hf" and bool(self.hf.get("streaming"))

    def _stream(self, stage: str) -> StreamingSegmentation:
        hf = self.hf
        trainer = self.trainer
        split = self.splits[stage].get("split", stage)
        stream = open_stream(hf["dataset"], split, hf.get("config_name"), hf.get("num_shards", 8))
        return StreamingSegmentation(
            stream, self.label_set, f"{hf['dataset']}[{split}]",
            columns=(hf.get("image_column", "image"), hf.get("mask_column", "label")),
            rgb_masks=self.label_set.mask_format == "rgb",
            transform=self.train_transform() if stage == "train" else None,
            image_size=None if stage == "train" or self.val_mode == "slide" else eval_preprocessing(self.trainer, self.image_size),
            train=stage == "train", on_bad_sample=self.on_bad_sample, shuffle_buffer=hf.get("shuffle_buffer", 1000),
            seed=stream_seed(), rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
        )

    def dataset(self, stage: str) -> SegmentationDataset | StreamingSegmentation:
        if stage in self.datasets:
            return self.datasets[stage]
        if stage not in self.splits:
            raise DataError(f"data.splits has no {stage!r} split (has {sorted(self.splits)})")
        if self.streaming:
            if "dataset" not in self.hf:
                raise DataError("data.hf.dataset: required for source hf")
            self.datasets[stage] = self._stream(stage)
            return self.datasets[stage]
        src = build_source(
            self.source_kind, dict(self.splits[stage]), self.root, self.label_set.mask_format == "rgb", stage, self.hf
        )
        ds = SegmentationDataset(
            src, self.label_set, transform=self.train_transform() if stage == "train" else None,
            image_size=None if stage == "train" or self.val_mode == "slide" else eval_preprocessing(self.trainer, self.image_size),
        )
        if self.check or self.cache:
            self._check(ds, stage)
        self.datasets[stage] = ds
        return ds

    def _check(self, ds: SegmentationDataset, stage: str) -> None:
        store = DiskCache(ds.source, self.label_set, self.cache_dir) if self.cache == "disk" else None
        found = scan(ds, f"checking {stage} data", keep=self.cache == "memory", store=store,
                     decode_images=self.check != "header")
        problems, good = found.problems, found.good
        settle_problems(problems, good, len(ds.indices), stage, self.on_bad_sample, self.config_path)
        if stage == "train":
            check_coverage(self.label_set, found.class_pixels, found.implicit_ignore, self._where(stage), len(good))
        ds.indices = good
        ds.cache = store if store is not None else found.cache if self.cache == "memory" else None
        self.skipped[stage] = len(problems)

    def _where(self, stage: str) -> str:
        spec = self.splits.get(stage, {})
        return f"{self.config_path}.splits.{stage} ({spec.get('masks', spec.get('split', stage))})"
