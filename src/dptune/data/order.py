"""The training order: a function of the run's seed and the epoch, so that a run resumed in the
middle of an epoch trains the images that epoch had not reached, in the order it would have.

Lightning restarts an interrupted epoch's loader from its first batch and stops it after the steps
that were left: with a plain shuffled loader the rest of the epoch was a fresh shuffle, so some
images were trained twice in it and others not at all. ``TrainOrder`` draws each epoch's order from
(seed, epoch), the same on every process; the datamodule (``OrderState``) writes into each
checkpoint how far into its epoch the run was, and a resumed run's order leaves those positions out.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from dptune.data.loaders import datasets_of
from dptune.data.order_resume import (
    checked_record,
    loop_epoch,
    rebatch,
    say_rebatched,
    say_resumed,
    step_samples,
    steps_per_epoch,
)

log = logging.getLogger(__name__)


_M64 = 2**64 - 1


def _mix(*parts: int) -> int:
    """One 63-bit seed from several whole numbers (a seed, an epoch, a position): each part folded in
    by SplitMix64's finalizer, so that neighbouring numbers give unrelated seeds."""
    h = 0
    for p in parts:
        z = ((h ^ (int(p) & _M64)) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        h = z ^ (z >> 31)
    return h >> 1


class Drawn(int):
    """A sample index as the training order yields it, with the seed of that sample's augmentations
    (``reseed``): a function of the run's seed, the epoch and the position in the epoch's order, so
    that the same epoch draws the same augmentations whatever the loader workers or a resume."""

    seed: int

    def __new__(cls, index: int, seed: int) -> Drawn:
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __getnewargs__(self) -> tuple[int, int]:  # pickled to loader workers
        return int(self), self.seed

    def moved(self, index: int) -> Drawn:
        """The same draw as an index into a part of the dataset (a joint set's source)."""
        return Drawn(index, self.seed)


def reseed(transform, k: int) -> None:
    """Before a training sample's augmentations: seed them from its draw (a plain index: left as is)."""
    if isinstance(k, Drawn) and transform is not None:
        from dptune.data.transforms import seed_augmentations

        seed_augmentations(transform, k.seed)


class TrainOrder(DistributedSampler):
    """Each epoch a permutation of the split (or, with ``weights``, as many draws with replacement,
    each sample drawn in proportion to its weight) from a generator seeded by ``seed`` and the
    epoch, the same on every process; process r of W takes positions r, r + W, r + 2W, ... (the
    order padded from its start to a multiple of W, as ``DistributedSampler`` does).

    ``resume_at(epoch, consumed)`` leaves out the first ``consumed`` positions of that epoch's
    order: what the steps before a checkpoint took on every process. The positions are those of the
    epoch's whole order, so a run may resume with another number of processes or batch size.
    A subclass of ``DistributedSampler``, so that Lightning keeps it in a run of several processes
    (and tells it the epoch)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int,
                 weights: torch.Tensor | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n = len(dataset)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.resume: tuple[int, int, int | None] | None = None  # (epoch, positions trained, see resume_at)

    def order(self, epoch: int) -> torch.Tensor:
        """The whole order of ``epoch`` (every process's positions)."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        if self.weights is None:
            return torch.randperm(self.n, generator=g)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g)

    def resume_at(self, epoch: int, consumed: int, left: int | None = None) -> None:
        """Leave out the first ``consumed`` positions of ``epoch``'s order; with ``left`` (the samples
        per process that the epoch's remaining steps take, as Lightning counts them) the rest is made
        that long at least, from the epoch's first positions, so that the epoch ends where Lightning ends it."""
        self.epoch = epoch  # a loader with workers draws its first indices before Lightning sets the epoch
        self.resume = (epoch, consumed, left) if consumed > 0 else None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.resume is not None and self.resume[0] != epoch:
            self.resume = None  # the interrupted epoch is over: later ones are whole

    def __iter__(self):
        order = self.order(self.epoch)
        n = len(order)
        start, end = 0, n  # draws of the epoch: draw t is position t % n in its pass t // n
        if self.resume is not None and self.resume[0] == self.epoch:
            # another batch size or number of processes: Lightning may run more steps than positions are left,
            # which take the epoch's first positions again (their second pass), and an earlier resume may have
            # gone on into that pass already
            _, start, left = self.resume
            end = max(n, start + (left or 0) * self.num_replicas)
        if end <= start or n == 0:
            return iter([])
        drawn = torch.arange(start, end)
        positions, passes = drawn % n, drawn // n
        slots = torch.arange(math.ceil(len(positions) / self.num_replicas) * self.num_replicas)
        slots = slots[self.rank::self.num_replicas]  # padded from the start to a multiple of the processes
        mine, again = positions[slots % len(positions)], passes[slots % len(positions)] + slots // len(positions)
        return (Drawn(i, _mix(self.seed, self.epoch, p, k) if k else _mix(self.seed, self.epoch, p))
                for i, p, k in zip(order[mine].tolist(), mine.tolist(), again.tolist(), strict=True))

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)  # a whole epoch's share: Lightning counts its steps from it


def sample_identity(dataset, legacy: bool = False) -> str:
    """A short fingerprint of which samples a training set holds, in its order: the kept indices of
    each source and its image files' places within their folder where it has them (a joint set: each
    of its sets). ``legacy``: the fingerprint checkpoints written before 2026-12-05 hold (the paths as
    given, names of ``Path`` objects), which a resume of such a checkpoint also accepts."""
    parts: list[str] = []
    for ds in datasets_of(dataset):
        if getattr(ds, "datasets", None):
            continue  # a joint set: its sets follow
        images = getattr(getattr(ds, "source", None), "images", None)
        names = ([getattr(p, "name", str(p)) for p in images] if isinstance(images, list) else []) if legacy \
            else _places(images)
        parts.append(repr((len(ds), list(getattr(ds, "indices", [])), names)))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _places(images) -> list[str]:
    """Image files by their places within the folder that holds them all: the same set copied or
    moved elsewhere (scratch to home) is the same set."""
    if not isinstance(images, list) or not images:
        return []
    paths = [os.fspath(p) if isinstance(p, (str, os.PathLike)) else str(p) for p in images]
    try:
        base = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths mixed, or other drives
        return [os.path.basename(p) for p in paths]
    if not base:
        return paths
    cut = len(base.rstrip(os.sep)) + 1  # a slice, not relpath: millions of files
    return [p[cut:] if p.startswith(base) else os.path.relpath(p, base) for p in paths]


class OrderState:
    """Datamodule hooks (put before ``LightningDataModule`` among the bases): each checkpoint holds
    the training order's seed, its epoch and how many of the epoch's positions the run had trained
    (``state_dict``); a run resumed from it continues that order (``train_order``)."""

    _order: TrainOrder | None = None
    _order_batch: int = 0
    _resume_order: dict[str, Any] | None = None
    _resumed_at: tuple[int, int, int] | None = None  # (epoch, positions skipped, Lightning's batches then)
    _said_resume = False

    def train_order(self, dataset, batch_size: int, weights: torch.Tensor | None = None) -> TrainOrder:
        trainer = self.trainer
        world, me = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        state, identity = self._resume_order, sample_identity(dataset)
        # a resumed run keeps its orders, and so does a loader made again
        seed = state["seed"] if state else self._order.seed if self._order is not None else torch.initial_seed() % 2**32
        if world > 1:  # one order for all: without seed_everything each process has its own initial seed
            seed = int(trainer.strategy.broadcast(seed, src=0))
        order = TrainOrder(dataset, world, me, seed, weights)
        self._order, self._order_batch, self._identity, self._resumed_at = order, batch_size, identity, None
        # the epoch Lightning runs next, as far as its loops know (a loader with workers draws its first
        # indices before Lightning sets it): 0 while the loader is made before the loops are restored
        # (Lightning's estimated_stepping_batches makes it), the epoch itself when made again each epoch
        loops = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
        if not state or loops > state["epoch"]:
            order.set_epoch(loops)
            return order
        if state["identity"] not in (identity, sample_identity(dataset, legacy=True)) or state["size"] != len(dataset):
            if me == 0 and not self._said_resume:
                cut = not state["done"] and state["consumed"] > 0
                log.warning("resume: the training set holds other samples than the checkpoint's run had (%d, was "
                            "%d; or other files or samples left out)%s", len(dataset), state["size"],
                            ": the interrupted epoch is drawn afresh, so some samples are trained twice in it and "
                            "others not" if cut else "; the next epochs are drawn from this set")
            order.resume_at(state["epoch"] + state["done"], 0)
        elif not state["done"] and state["consumed"] > 0:
            # the samples per process that the steps Lightning leaves in the epoch take: it counts the steps
            # done in the checkpoint's batches (made this run's by ``rebatch``, but where a validation was cut);
            # a last partial batch is dropped where a process has a whole one
            left = max(0, steps_per_epoch(trainer, len(order), batch_size) - state["batches"]) * \
                step_samples(len(order), batch_size)
            order.resume_at(state["epoch"], state["consumed"], left)
            self._resumed_at = (state["epoch"], state["consumed"], state["batches"])
            # Lightning warns that a plain loader cannot resume mid-epoch; this order does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            if me == 0 and not self._said_resume:
                say_resumed(state, len(dataset), left * world, len(order), batch_size, world)
        else:
            order.resume_at(state["epoch"] + state["done"], 0)
        self._said_resume = True  # a loader made again in the same epoch resumes it again, without a word
        return order

    def train_length(self) -> int | None:
        """The training set's number of samples (None: a stream, which has no order)."""
        return None

    def rebatch(self, ckpt: dict[str, Any], cut: bool = False) -> None:
        """Before Lightning restores its loops from ``ckpt`` (a resumed fit; ``cut``: inside a validation):
        its count of the interrupted epoch's batches made this run's (``order_resume.rebatch``), so that
        the steps Lightning leaves in the epoch take what the epoch's order has left."""
        trainer, n = self.trainer, self.train_length()
        if trainer is None or n is None:
            return
        key = type(self).__qualname__
        done = rebatch(ckpt, key, n, self.batch_size, trainer, cut)
        if done == "disagrees":
            if trainer.is_global_zero:
                log.warning("resume: the checkpoint's record of the training order is at batch %r of epoch %r, its "
                            "loop state at batch %r of epoch %r: not a record dptune wrote; the interrupted epoch is "
                            "drawn afresh, so some of its samples are trained twice and others not in it",
                            ckpt[key].get("batches"), ckpt[key].get("epoch"),
                            ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"].get("processed"),
                            loop_epoch(ckpt))
            ckpt[key] = {}
        elif done is not None and trainer.is_global_zero:
            say_rebatched(ckpt[key]["epoch"], *done[:3])
            if done[3]:
                log.warning("resume: the validation the checkpoint's run was cut in is not run again: Lightning "
                            "runs it only at one of its validation points, and this run's batches have none at "
                            "or before the samples trained (trainer.val_check_interval by time, or in batches "
                            "across epochs); score the checkpoint with dptune validate --ckpt_path %s",
                            getattr(trainer, "ckpt_path", None) or "CKPT")

    def batch_seed(self, batch_idx: int, rank: int) -> int | None:
        """The seed of torch's random numbers (dropout) for a training batch: of the run's seed, the
        epoch, the batch and the process; None without a training order (a stream)."""
        order = self._order
        return None if order is None else _mix(order.seed, order.epoch, batch_idx, rank, 1)

    def state_dict(self) -> dict[str, Any]:
        order, trainer = self._order, self.trainer
        if order is None or trainer is None or trainer.state.fn != "fit":
            return {}
        loader = getattr(trainer.fit_loop, "_combined_loader", None)
        if loader is None or not any(getattr(dl, "sampler", None) is order for dl in loader.flattened):
            return {}  # Lightning put another sampler in (overfit_batches): this order is not what trains
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        per_batch = step_samples(len(order), self._order_batch) * order.num_replicas
        consumed = batches * per_batch
        if self._resumed_at is not None and self._resumed_at[0] == order.epoch:
            # resumed in this epoch, maybe with another batch size: positions skipped then + trained since
            epoch, skipped, then = self._resumed_at
            consumed = skipped + (batches - then) * per_batch
        return {"seed": order.seed, "size": order.n, "identity": self._identity, "epoch": order.epoch,
                "batches": batches, "consumed": consumed,
                # Lightning counts an epoch stopped by max_steps as done: a longer run goes on with the next
                "done": batches >= trainer.num_training_batches
                or trainer.fit_loop.epoch_progress.current.processed > order.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_order = None
        if not state_dict:
            return  # a checkpoint without it (written before dptune recorded the order): Lightning warns
        state = checked_record(state_dict)
        if state is None:
            log.warning("resume: the checkpoint's record of the training order is not one dptune wrote (%.200r): "
                        "the interrupted epoch is drawn afresh, so some of its samples are trained twice and others "
                        "not in it", state_dict)
            return
        self._resume_order = state
