"""DepthDataModule: images with depth maps from folders or Hugging Face datasets, checked before
training, augmented without changing depth, batched for one or many processes."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from dptune.data.base import SplitDataModule, check_each, pair, settle_problems
from dptune.data.depth import (
    DepthDataset,
    DepthFolderSource,
    HFDepthSource,
    depth_train_transforms,
    eval_crop_mask,
)
from dptune.data.depth_files import check_depth_size
from dptune.data.depth_values import check_depth_range, check_split_depth
from dptune.data.hf_sources import STREAM_SETTINGS, check_hf_settings
from dptune.data.images import image_header_size
from dptune.data.loaders import augment_seed
from dptune.data.transforms import MASK_RESIZE, eval_preprocessing, seed_augmentations
from dptune.errors import ConfigError, DataError
from dptune.labels import load_labels
from dptune.losses.depth import MIN_VALID

log = logging.getLogger(__name__)


class DepthDataModule(SplitDataModule):
    def __init__(
        self,
        root: str = ".",
        source: Literal["folder", "hf"] = "folder",
        splits: dict[str, dict[str, Any]] | None = None,
        hf: dict[str, Any] | None = None,
        depth_scale: float | None = None,
        image_size: int | list[int] = 384,
        crop_size: int | list[int] | None = None,
        jitter: bool = True,
        eval_crop: Literal["none", "eigen", "garg"] = "none",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        check: bool | Literal["header"] = True,
        cache: bool = False,
        on_bad_sample: Literal["error", "skip"] = "error",
        labels: str | dict[str, Any] | None = None,
        negative_depth: Literal["error", "invalid"] = "error",
    ) -> None:
        """
        Args:
            root: Dataset folder; relative paths in ``splits`` are relative to it.
            source: ``folder`` (image glob + depth path template) or ``hf`` (Hugging Face dataset).
            splits: Per stage (``train``, ``val``, ``test``). folder:
                ``{images: "train/rgb/*.jpg", depth: "train/depth/{stem}.png"}`` (placeholders
                ``{stem}``, ``{name}``, ``{dir}``, and ``{id}``: what the glob's wildcards matched in the file
                name); hf: ``{split: validation}``.
            hf: For ``source: hf``: ``{dataset: <hub name or save_to_disk dir>, image_column, depth_column,
                config_name}``.
            depth_scale: Stored value per metre: 1000 for millimetre PNGs (NYU, 7-Scenes), 256 for
                KITTI, 1 for depth already in metres. Default: by the file's type, 1 for floating-point
                data (.npy, float TIFF, float dataset columns: metres) and 1000 for integers (16-bit PNG
                or TIFF: millimetres). 0 is "no measurement" in every format. A split whose median
                valid depth is not plausible metres (outside 0.05-1000 m) stops the run naming the
                likely scale.
            image_size: Input size (h, w) for training and evaluation, and of the exported processor;
                multiples of the patch size. Keep the images' aspect ratio (e.g. [192, 256] for 4:3).
            crop_size: Optional random crop (h, w) of the resized training images.
            jitter: Brightness/contrast/saturation jitter of training images (depth untouched).
            eval_crop: Score only the standard crop: ``eigen`` (NYU Depth v2) or ``garg`` (KITTI).
            batch_size: Training batch size per process.
            val_batch_size: Validation/test batch size per process (default: ``batch_size``).
            num_workers: Loader worker processes. Default: none with 2 cores or fewer, else half the cores, at most 8.
            pin_memory: Pin host memory (default: on when CUDA is available).
            persistent_workers: Keep workers alive between epochs.
            check: Decode every image and depth map before training, so bad files stop the run early;
                ``header``: images by their headers only (faster; a corrupt image body then stops the
                run when training reaches it). Depth maps are always decoded.
            cache: Keep decoded samples in memory (small datasets: decode once per run).
            on_bad_sample: ``error`` stops before training listing the bad files; ``skip`` leaves them
                out and logs how many.
            labels: Samples that carry a mask too (segmentation + depth in one model): a label file
                (relative to ``root``) or inline label spec; folder splits then name ``masks`` (a path
                template, as ``depth``). Masks are read only when this is set.
            negative_depth: A negative stored depth is not a distance: ``error`` names the file and how
                many values are negative (a bad sample, see ``on_bad_sample``); ``invalid`` reads them as
                "no measurement", for formats that mark missing depth with -1 (logged once per split).
        """
        super().__init__()
        self.save_hyperparameters()
        self.root, self.source_kind, self.hf = root, source, hf or {}
        check_hf_settings(self.hf, "depth")
        self.init_splits_and_loaders(splits, batch_size, val_batch_size, num_workers, pin_memory, persistent_workers)
        eval_crop_mask((8, 8), eval_crop)  # an unknown crop name stops here
        self.image_size, self.crop_size = pair(image_size), pair(crop_size)
        # settings as attributes: self.hparams is not reliable when another datamodule builds this one
        if depth_scale is not None and not 0 < np.float32(depth_scale) < np.inf:  # maps are divided in float32
            raise ConfigError(f"data.depth_scale must be a positive number of stored values per metre, got {depth_scale}")
        self.depth_scale, self.jitter, self.eval_crop = depth_scale, jitter, eval_crop
        self.check, self.cache, self.on_bad_sample = check, cache, on_bad_sample
        if negative_depth not in ("error", "invalid"):
            raise ConfigError(f"data.negative_depth must be error or invalid, got {negative_depth!r}")
        self.negative_depth = negative_depth
        self.label_set = None if labels is None else load_labels(labels, self.root)
        self.datasets: dict[str, DepthDataset] = {}
        self.skipped: dict[str, int] = {}
        # per split, each map's (name, 1%, 50%, 99% of its valid depth): the model checks its range on them
        self.depth_stats: dict[str, list[tuple[str, float, float, float]]] = {}
        self.config_path = "data"  # where this datamodule's settings sit in the config (a joint task's source: deeper)

    def _source(self, stage: str):
        spec = dict(self.splits[stage])
        try:
            if self.source_kind == "folder":
                masks = spec["masks"] if self.label_set is not None else None
                return DepthFolderSource(self.root, spec["images"], spec["depth"], self.depth_scale, masks,
                                         self.label_set is not None and self.label_set.mask_format == "rgb",
                                         self.negative_depth)
            if self.label_set is not None:
                raise DataError("data.labels (masks beside depth) needs source: folder")
            if self.source_kind == "hf":
                stream = [k for k in STREAM_SETTINGS if k in self.hf and (k != "streaming" or self.hf[k])]
                if stream:  # it was dropped without a word: the whole split was downloaded
                    raise DataError(f"data.hf.{stream[0]}: depth data is read whole, not streamed (streaming is for "
                                    "segmentation data); remove it")
                hf = {k: v for k, v in self.hf.items() if k != "streaming"}
                return HFDepthSource(split=spec.get("split", stage), scale=self.depth_scale,
                                     negative=self.negative_depth, **hf)
        except KeyError as e:
            raise DataError(f"data.splits.{stage}: missing key {e} for source {self.source_kind!r}") from None
        except TypeError as e:
            raise DataError(f"data.splits.{stage}: {e}") from None
        raise DataError(f"data.source must be folder or hf, got {self.source_kind!r}")

    def dataset(self, stage: str) -> DepthDataset:
        if stage in self.datasets:
            return self.datasets[stage]
        if stage not in self.splits:
            raise DataError(f"data.splits has no {stage!r} split (has {sorted(self.splits)})")
        train = stage == "train"
        transform = None
        if train:
            transform = depth_train_transforms(self.image_size, self.crop_size, self.jitter)
            seed_augmentations(transform, augment_seed())
        ds = DepthDataset(self._source(stage), transform=transform,
                          image_size=None if train else eval_preprocessing(self.trainer, self.image_size),
                          labels=self.label_set)
        if self.negative_depth == "invalid":
            log.info("%s.splits.%s: negative depth values are read as no measurement (negative_depth: invalid)",
                     self.config_path, stage)
        if self.check or self.cache:
            self._check(ds, stage)
        self.datasets[stage] = ds
        return ds

    def _check(self, ds: DepthDataset, stage: str) -> None:
        """Every sample once, before training: unreadable files, 8-bit depth, sizes that differ and
        missing depth maps are listed together (or skipped under ``on_bad_sample: skip``)."""
        keep = bool(self.cache)
        full = keep or self.check != "header" or not hasattr(ds.source, "depths") or ds.labels is not None

        def one(i: int) -> tuple[np.ndarray | None, ...]:
            if full:
                return ds.load(i)
            depth = ds.source._depth(i)
            check_depth_size(ds.source.depths[i], image_header_size(ds.source.images[i]), depth)
            return None, depth

        good, problems, cache, empty, sparse, stats = [], [], {}, [], [], {}
        for i, out, problem in check_each(ds.indices, one, f"checking {stage} data"):
            if problem is not None:
                problems.append(problem)
                continue
            good.append(i)
            measured = out[1][out[1] > 0]
            if not measured.size:
                empty.append(i)
            else:  # per map: 1%, 50%, 99% of its valid depth
                stats[i] = np.quantile(measured, (0.01, 0.5, 0.99))
                if stage == "train" and valid_at(out[1], self.image_size) < MIN_VALID:
                    sparse.append(i)
            if keep:
                cache[i] = out
        settle_problems(problems, good, len(ds.indices), stage, self.on_bad_sample, self.config_path)
        good = self._check_values(ds, stage, good, stats)
        name = ds.source.depths.__getitem__ if hasattr(ds.source, "depths") else ds.source.name
        if empty:
            log.warning("%s: %d depth map(s) have no valid pixel (first: %s); they count in no loss and no metric",
                        stage, len(empty), name(empty[0]))
        sparse = [i for i in sparse if i in good]
        if sparse:
            h, w = self.image_size
            counted = len([i for i in good if i not in sparse and i not in empty])
            said = (f"{self.config_path}.splits.{stage}: {len(sparse)} depth map(s) keep fewer than {MIN_VALID} valid "
                    f"pixels once resized to the training size {h}x{w} (first: {name(sparse[0])}), the least a loss "
                    "counts an image with")
            if not counted:
                raise DataError(f"{said}: no map of the split counts in the loss; train at a larger data.image_size, "
                                "or densify the maps")
            log.warning("%s; they count in no loss", said)
        self.skipped[stage] = len(ds.indices) - len(good)
        ds.indices, ds.cache = good, {i: cache[i] for i in good} if keep else None

    def check_model_range(self, min_depth: float, max_depth: float | None) -> None:
        """Each checked split's depth against the range a model trains and scores on (``check_depth_range``)."""
        for split, maps in self.depth_stats.items():
            check_depth_range(f"{self.config_path}.splits.{split}", maps, min_depth, max_depth)

    def _check_values(self, ds: DepthDataset, stage: str, good: list[int], stats: dict) -> list[int]:
        """The split's depth must be plausible metres (else the likely scale is named), and so must
        each map's (a map in another unit among the rest is a bad sample); records each map's depth
        quantiles (``depth_stats``) for the model's range check. Returns the samples kept."""
        where = f"{self.config_path}.splits.{stage}"
        name = ds.source.depths.__getitem__ if hasattr(ds.source, "depths") else ds.source.name
        scale, problems = check_split_depth(where, {i: q[1] for i, q in stats.items()}, ds.source, name)
        odd = list(problems)
        settle_problems(list(problems.values()), [i for i in good if i not in odd], len(good), stage,
                        self.on_bad_sample, self.config_path)
        kept = [i for i in good if i not in odd]
        self.depth_stats[stage] = [(name(i), *stats[i]) for i in kept if i in stats]
        medians = [q[1] for i, q in stats.items() if i in kept]
        used = sorted({ds.source.used_scales.get(i, scale) for i in kept if i in stats})
        per = f"{scale:g}" if len(used) < 2 else " or ".join(f"{s:g}" for s in used) + " (by folder)"
        log.info("%s: depth = stored value / %s per metre; median valid depth %.3g m over %d maps", where, per,
                 float(np.median(medians)), len(medians))
        return kept


def valid_at(depth: np.ndarray, size) -> int:
    """Valid (> 0) pixels of ``depth`` once resized to the training ``size`` (h, w) by nearest
    neighbour, as ``depth_train_transforms`` resizes it: what the loss sees of a sparse map."""
    import cv2

    h, w = int(size[0]), int(size[1])
    return int(cv2.resize((depth > 0).astype(np.uint8), (w, h), interpolation=MASK_RESIZE).sum())
