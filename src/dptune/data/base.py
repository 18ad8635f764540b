"""What every datamodule shares: sizes, the pre-flight check of every sample, the splits each
stage builds and scores, and the base class (the loaders, their seeding and batches:
``dptune.data.loaders``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from dptune.data.loaders import collate, datasets_of, default_workers, make_loader, rank
from dptune.data.order import OrderState

STAGES = ("train", "val", "test")


@dataclass(frozen=True)
class ValidationSource:
    """What a datamodule declares about one of its validation loaders, for a task's metrics: the
    ``name`` its figures are logged under (``val/<name>/mIoU``) and which labels its batches carry
    (``masks``, ``depth``). A datamodule with several validation loaders lists them, in loader order,
    from ``validation_sources()``; the task reads that once, in ``setup``."""

    name: str
    masks: bool
    depth: bool


def pair(v: int | Sequence[int] | None) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def check_each(indices: Sequence[int], check: Callable[[int], Any], desc: str,
               workers: int = 2) -> Iterator[tuple[int, Any, str | None]]:
    """The pre-flight check of every datamodule: ``check(i)`` on every sample ``i`` (in a thread pool,
    results in order, one progress bar per job). Yields ``(i, result, None)``, or ``(i, None, problem)``
    where ``check`` raised a ``DataError``: its one line naming the file."""
    from tqdm.auto import tqdm

    from dptune.errors import DataError

    def one(i: int) -> tuple[int, Any, str | None]:
        try:
            return i, check(i), None
        except DataError as e:
            return i, None, str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        # a bar on a terminal only: in a log file its clearing left the next line after a carriage return
        yield from tqdm(pool.map(one, indices), total=len(indices), desc=desc, leave=False,
                        disable=True if rank() != 0 else None)


def setup_splits(splits: dict, stage: str | None, build: Callable[[str], object], trainer=None,
                 where: str = "data") -> None:
    """Build (and check) the datasets a Lightning stage needs; fitting needs a training split, and
    each evaluation split needs a sample for every process (``check_eval_shards``)."""
    from dptune.data.templates import check_template
    from dptune.errors import DataError

    wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(stage or "fit", STAGES)
    for split in wanted:  # a label template's own mistake, named by its setting before any file is read
        spec = splits.get(split)
        for key in ("masks", "depth"):
            if isinstance(spec, dict) and isinstance(spec.get(key), str):
                try:
                    check_template(spec[key])
                except DataError as e:
                    raise DataError(f"{where}.splits.{split}.{key}: {e}") from None
    built = {s: build(s) for s in wanted if s in splits}
    if stage == "fit" and "train" not in splits:
        raise DataError(f"{where}.splits needs a 'train' split to fit")
    check_eval_shards(where, built, trainer)
    if "train" in built and rank() == 0:
        say_shared_images(built, where)


def _image_files(ds) -> list[str]:
    """The image files a dataset reads (of each source it is made of), resolved; none for a hub dataset."""
    import os

    files = []
    for part in datasets_of(ds):
        images = getattr(getattr(part, "source", None), "images", None)
        if isinstance(images, list):
            files.extend(os.path.realpath(p) for p in images)
    return files


_SAID_SHARED: weakref.WeakSet = weakref.WeakSet()  # evaluation datasets already compared with training's


def say_shared_images(built: dict, where: str) -> None:
    """A warning for each evaluation split that shares image files with the train split: its scores (and the
    best checkpoint they pick) would be on images the model trains on."""
    import logging

    train = set(_image_files(built["train"]))
    for split in ("val", "test"):
        files = _image_files(built[split]) if split in built else []
        if not files or built[split] in _SAID_SHARED:  # a stage's setup can run twice (prepare_data)
            continue
        _SAID_SHARED.add(built[split])  # (a dataset of dptune's: it has image files)
        shared = [f for f in files if f in train]
        if shared:
            logging.getLogger(__name__).warning(
                "%s.splits.%s: %d of its %d images are also in the train split (first: %s): its scores are on "
                "images the model trains on", where, split, len(shared), len(files), shared[0])


_SPLIT_WORDS = {"val": "validation", "test": "test"}
EVALUATED_ON = {"fit": "val", "validate": "val", "test": "test"}  # the split each stage scores


def stage_of(trainer) -> str:
    """The Lightning stage a trainer runs (fit, validate, test, predict)."""
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn) or "fit")


def one_process_stage(trainer) -> str | None:
    """The stage a run of one process is starting, for the checks of ``prepare_data`` (Lightning's
    first hook, before it starts the run's loggers); None in a multi-process run (or outside a
    run): there the hook runs on one process while the others wait in a collective, which an error
    would break with a traceback of their own, so their checks stay in ``setup``."""
    if trainer is None or trainer.world_size != 1:
        return None
    return stage_of(trainer)


def asks_for_scores(trainer, stage: str) -> bool:
    """Whether Lightning will ask for the loader of the split ``stage`` scores: a fit asks at its
    start (the sanity check, or the fit loop's first epoch) unless validation is off
    (``limit_val_batches 0``) or comes every N epochs with N past the run's epochs."""
    if stage != "fit":
        return stage in EVALUATED_ON
    every, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    past_the_run = every is not None and epochs not in (None, -1) and every > epochs
    return trainer.limit_val_batches != 0 and not past_the_run


def check_evaluation_split(splits: dict, stage: str, where: str = "data") -> None:
    """The split a stage scores (``EVALUATED_ON``) is in ``splits``: one line naming the setting,
    before the run starts (Lightning asks for the loader once it has)."""
    from dptune.errors import DataError

    split = EVALUATED_ON.get(stage)
    if split is not None and split not in splits:
        raise DataError(f"{where}.splits has no {split!r} split (has {sorted(splits)}); {stage} scores the model on "
                        f"its {_SPLIT_WORDS[split]} split")


def check_eval_shards(where: str, datasets: dict[str, object], trainer) -> None:
    """Stop when an evaluation split (after bad samples were left out) has fewer samples than there
    are processes. Evaluation shards are not padded (a repeated sample would count twice), so a
    process would get none: Lightning stops that rank, and the others wait in the metric sync for
    it. A process that scores nothing cannot join that sync, so exact metrics need a sample on
    each. Streams (no length) split by shards and are not counted here."""
    from dptune.errors import DataError

    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    for split, ds in datasets.items():
        n = len(ds) if split != "train" and hasattr(ds, "__len__") else None
        if n is not None and 0 < n < world:
            raise DataError(f"{where}.splits.{split}: {n} {_SPLIT_WORDS.get(split, split)} image(s) for {world} "
                            f"processes; each process scores its own share and needs at least one (use at most {n} "
                            "processes, trainer.devices x trainer.num_nodes, or give the split more images)")


def settle_problems(problems: list[str], good: list[int], total: int, stage: str, on_bad_sample: str,
                    where: str = "data") -> None:
    """What the pre-flight check does with bad samples: stop listing them all (``error``), or log
    each and how many were left out (``skip``); a split with no good sample left stops either way.
    ``where``: the source's place in the config (``data.depth`` in a joint config), for the hint."""
    import logging

    from dptune.errors import DataError, DataErrors

    if problems and on_bad_sample == "error":
        raise DataErrors(problems, hint=f"Fix them, or pass --{where}.on_bad_sample skip to leave them out.")
    if not problems:
        return
    log = logging.getLogger("dptune.data")
    for p in problems:
        log.warning("skipping %s", p)
    log.warning("%s: skipped %d bad sample(s) of %d", stage, len(problems), total)
    if not good:
        raise DataError(f"{stage}: every sample is bad; nothing to train on")



class SplitDataModule(OrderState, pl.LightningDataModule):
    """What the segmentation and the depth datamodules share: their ``splits`` (train / val / test),
    the loader settings, the datasets a stage needs, built and checked in ``setup``, and the loaders
    (``make_loader``, ``collate``; a stream shuffles itself and is already this process's part). A
    subclass calls ``init_splits_and_loaders`` from its ``__init__`` and builds a split's dataset
    in ``dataset(stage)``; ``config_path`` is where its settings sit in the config."""

    config_path = "data"

    def init_splits_and_loaders(self, splits: dict | None, batch_size: int, val_batch_size: int | None,
                                num_workers: int | None, pin_memory: bool | None, persistent_workers: bool) -> None:
        from dptune.errors import ConfigError, DataError

        self.splits = splits or {}
        unknown = set(self.splits) - set(STAGES)
        if unknown:
            raise DataError(f"data.splits: unknown stages {sorted(unknown)} (use {list(STAGES)})")
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{self.config_path}.{key} {value}: the images per batch, a whole number >= 1")
        if num_workers is not None and (isinstance(num_workers, bool) or num_workers < 0):
            raise ConfigError(f"{self.config_path}.num_workers {num_workers}: loader processes, a whole number >= 0 "
                              "(0 loads in the training process)")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = default_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0

    def dataset(self, stage: str):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        setup_splits(self.splits, stage, self.dataset, self.trainer, self.config_path)

    def prepare_data(self) -> None:
        """Before Lightning starts the run's loggers (the W&B run), in a run of one process
        (``one_process_stage``): the evaluation split the stage needs and the whole pre-flight
        check (``setup``: its datasets are kept for Lightning's own call), so that a run refused
        for its data leaves no run behind."""
        stage = one_process_stage(self.trainer)
        if stage is None:
            return
        if asks_for_scores(self.trainer, stage):
            check_evaluation_split(self.splits, stage, self.config_path)
        self.setup(stage)
        self.checked_stage = stage  # the module's checks of the data (its depth range) may run now

    def _loader(self, stage: str) -> DataLoader:
        ds = self.dataset(stage)
        size = self.batch_size if stage == "train" else self.val_batch_size
        streaming = isinstance(ds, IterableDataset)
        order = self.train_order(ds, size) if stage == "train" and not streaming else None
        return make_loader(ds, stage, size, self.trainer, self.num_workers, self.pin_memory, self.persistent_workers,
                           collate, streaming=streaming, sampler=order)

    def train_length(self) -> int | None:
        ds = self.dataset("train")
        return None if isinstance(ds, IterableDataset) else len(ds)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
