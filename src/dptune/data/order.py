"""The training order: a function of the run's seed and the epoch, so that a run resumed in the
middle of an epoch trains the images that epoch had not reached, in the order it would have.

Lightning restarts an interrupted epoch's loader from its first batch and stops it after the steps
that were left: with a plain shuffled loader the rest of the epoch was a fresh shuffle, so some
images were trained twice in it and others not at all. ``TrainOrder`` draws each epoch's order from
(seed, epoch), the same on every process; the datamodule (``OrderState``) writes into each
checkpoint how far into its epoch the run was, and a resumed run's order leaves those positions out.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


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
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
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
        if self.resume is not None and self.resume[0] == self.epoch:
            _, consumed, left = self.resume
            rest = order[consumed:]
            short = (left or 0) * self.num_replicas - len(rest)
            if short > 0:  # another batch size or number of processes: Lightning runs more steps than are left
                rest = torch.cat([rest, order.repeat(math.ceil(short / len(order)))[:short]])
            order = rest
        if len(order) == 0:
            return iter([])
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        padded = order.repeat(math.ceil(total / len(order)))[:total]
        return iter(padded[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)  # a whole epoch's share: Lightning counts its steps from it


class OrderState:
    """Datamodule hooks (put before ``LightningDataModule`` among the bases): each checkpoint holds
    the training order's seed, its epoch and how many of the epoch's positions the run had trained
    (``state_dict``); a run resumed from it continues that order (``train_order``)."""

    _order: TrainOrder | None = None
    _order_batch: int = 0
    _resume_order: dict[str, Any] | None = None

    def train_order(self, dataset, batch_size: int, weights: torch.Tensor | None = None) -> TrainOrder:
        trainer = self.trainer
        world, me = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        state = self._resume_order
        seed = state["seed"] if state else torch.initial_seed() % 2**32  # a resumed run keeps its orders
        order = TrainOrder(dataset, world, me, seed, weights)
        if state and state["size"] != len(dataset):
            log.warning("resume: the training split has %d samples, the checkpoint's run had %d: the interrupted "
                        "epoch's order starts over", len(dataset), state["size"])
        elif state and not state["done"] and state["consumed"] > 0:
            left = len(order) - state["batches"] * batch_size  # Lightning counts the steps done in the old batches
            order.resume_at(state["epoch"], state["consumed"], left)
            # Lightning warns that a plain loader cannot resume mid-epoch; this order does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            if me == 0:
                self._say_resumed(state, len(dataset), left * world)
        elif state:
            order.resume_at(state["epoch"] + 1, 0)
        self._order, self._order_batch = order, batch_size
        return order

    @staticmethod
    def _say_resumed(state: dict[str, Any], n: int, takes: int) -> None:
        rest = max(0, n - state["consumed"])
        extra = ("" if takes == rest or rest == 0 else
                 f", and {takes - rest} from its start" if takes > rest else
                 f"; {rest - max(takes, 0)} of them are not trained in this epoch")
        log.info("resume: epoch %d continues with the %d of its %d training samples it had not reached%s%s",
                 state["epoch"], rest, n, extra, "" if not extra else
                 " (Lightning counts the steps left in this epoch from the checkpoint's batches)")

    def state_dict(self) -> dict[str, Any]:
        order, trainer = self._order, self.trainer
        if order is None or trainer is None or trainer.state.fn != "fit":
            return {}
        loop = trainer.fit_loop.epoch_loop
        batches = loop.batch_progress.current.processed
        return {"seed": order.seed, "size": order.n, "epoch": order.epoch, "batches": batches,
                "consumed": batches * self._order_batch * order.num_replicas,
                "done": batches >= trainer.num_training_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_order = None
        if not state_dict:
            return  # a checkpoint without it (written before dptune recorded the order): a fresh order
        try:
            state = {key: int(state_dict[key]) for key in ("seed", "size", "epoch", "batches", "consumed")}
            state["done"] = bool(state_dict["done"])
        except (KeyError, TypeError, ValueError):
            state = None
        if state is None or min(state.values()) < 0 or state["seed"] >= 2**63:
            log.warning("resume: the checkpoint's record of the training order is not one dptune wrote (%.200r); "
                        "the interrupted epoch's order starts over", state_dict)
            return
        self._resume_order = state
