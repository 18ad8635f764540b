"""What every datamodule shares: sizes, worker seeding, the evaluation sampler that counts each
sample once across processes, and the loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from dptune.labels import IGNORE_INDEX

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


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def augment_seed() -> int:
    """Per process (and per worker) seed for albumentations: torch's seed, offset by the rank so
    that processes of a multi-GPU run do not draw the same augmentations."""
    return (torch.initial_seed() + 1_000_003 * rank()) % 2**32


def stream_seed() -> int:
    """The shuffle seed of a training stream: the run's seed, the same on every rank. When the
    world size does not divide the shard count, ``datasets`` gives each rank every
    ``world_size``-th example of the stream, which splits it exactly only if all ranks shuffle alike."""
    return torch.initial_seed() % 2**32


def _datasets(ds) -> list:
    """``ds`` and every dataset it is made of (``datasets``: a joint set, ``ConcatDataset``), depth first."""
    found = [ds]
    for child in getattr(ds, "datasets", None) or []:
        found.extend(_datasets(child))
    return found


def seed_worker(worker_id: int) -> None:
    """Each loader worker reseeds the augmentations of every dataset it reads (a joint set's sources
    too), so that workers do not replay the main process's random stream; each dataset gets its own."""
    import cv2

    cv2.setNumThreads(0)  # OpenCV's own thread pool would oversubscribe the cores the workers share
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    for k, ds in enumerate(_datasets(info.dataset)):
        transform = getattr(ds, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed((augment_seed() + 7919 * k) % 2**32)


class EvalDistributedSampler(DistributedSampler):
    """Shards evaluation data across processes without padding.

    ``DistributedSampler`` repeats samples to even out the shards, and a repeated sample would
    be counted twice in the confusion matrix. Here rank r takes samples r, r + W, r + 2W, ...;
    shards may differ in length by one, which evaluation (no gradient sync) does not mind.
    """

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        # a DistributedSampler subclass, so that Lightning keeps it instead of installing its own
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.n = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))



# what a batch's labels are padded with where samples differ in size: "no label" of each kind
LABEL_PADDING = (("mask", IGNORE_INDEX), ("depth", 0.0))


def _stack_padded(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Stack tensors of one rank; where their sizes differ, each at the top left of a ``fill`` tensor
    of the largest size."""
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
    out = tensors[0].new_full((len(tensors), *shape), fill)
    for b, t in enumerate(tensors):
        out[b][tuple(slice(0, n) for n in t.shape)] = t
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch of every datamodule: images, and whichever labels the items carry (``mask``,
    ``depth``), stacked; where sizes differ (evaluation at native label size) padded at the bottom
    and right, images with 0 and labels with "no label" (``LABEL_PADDING``: 255 in masks, 0 in
    depth). ``sizes`` keeps each sample's label size (h, w) so that predictions are resized per sample."""
    labels = [(key, fill) for key, fill in LABEL_PADDING if key in items[0]]
    batch = {"image": _stack_padded([it["image"] for it in items], 0)}
    for key, fill in labels:
        values = [it[key] for it in items]
        if key == "depth":  # metres in float32, whatever each item holds (no item's dtype rounds another's)
            values = [v.float() for v in values]
        batch[key] = _stack_padded(values, fill)
    batch["index"] = torch.tensor([it["index"] for it in items])
    batch["sizes"] = [tuple(it[labels[0][0]].shape) for it in items]
    return batch


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


def default_workers(num_workers: int | None) -> int:
    """Loader workers: none on machines with 2 cores or fewer (a worker would compete with the
    model for them), else half the cores, at most 8."""
    if num_workers is not None:
        return num_workers
    from dptune.cores import usable_cores

    cores = usable_cores()
    return 0 if cores <= 2 else min(8, cores // 2)


def make_loader(ds, stage: str, batch_size: int, trainer, num_workers: int, pin_memory: bool,
                persistent_workers: bool, collate_fn: Callable, streaming: bool = False,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """The loader of every datamodule: a training loader (shuffled unless a ``sampler`` draws, last
    partial batch dropped) or an evaluation loader (each sample on exactly one process); workers
    reseed the augmentations (``seed_worker``)."""
    if sampler is None and not streaming and stage != "train" and trainer is not None and trainer.world_size > 1:
        sampler = EvalDistributedSampler(ds, trainer.world_size, trainer.global_rank)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=stage == "train" and not streaming and sampler is None, sampler=sampler,
        drop_last=stage == "train" and (streaming or len(ds) > batch_size), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent_workers, collate_fn=collate_fn,
        worker_init_fn=seed_worker,
    )


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


def settle_problems(problems: list[str], good: list[int], total: int, stage: str, on_bad_sample: str) -> None:
    """What the pre-flight check does with bad samples: stop listing them all (``error``), or log
    each and how many were left out (``skip``); a split with no good sample left stops either way."""
    import logging

    from dptune.errors import DataError, DataErrors

    if problems and on_bad_sample == "error":
        raise DataErrors(problems, hint="Fix them, or pass --data.on_bad_sample skip to leave them out.")
    if not problems:
        return
    log = logging.getLogger("dptune.data")
    for p in problems:
        log.warning("skipping %s", p)
    log.warning("%s: skipped %d bad sample(s) of %d", stage, len(problems), total)
    if not good:
        raise DataError(f"{stage}: every sample is bad; nothing to train on")



class SplitDataModule(pl.LightningDataModule):
    """What the segmentation and the depth datamodules share: their ``splits`` (train / val / test),
    the loader settings, the datasets a stage needs, built and checked in ``setup``, and the loaders
    (``make_loader``, ``collate``; a stream shuffles itself and is already this process's part). A
    subclass calls ``init_splits_and_loaders`` from its ``__init__`` and builds a split's dataset
    in ``dataset(stage)``; ``config_path`` is where its settings sit in the config."""

    config_path = "data"

    def init_splits_and_loaders(self, splits: dict | None, batch_size: int, val_batch_size: int | None,
                                num_workers: int | None, pin_memory: bool | None, persistent_workers: bool) -> None:
        from dptune.errors import DataError

        self.splits = splits or {}
        unknown = set(self.splits) - set(STAGES)
        if unknown:
            raise DataError(f"data.splits: unknown stages {sorted(unknown)} (use {list(STAGES)})")
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
        return make_loader(ds, stage, size, self.trainer, self.num_workers, self.pin_memory, self.persistent_workers,
                           collate, streaming=isinstance(ds, IterableDataset))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
