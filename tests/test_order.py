"""The training order: each epoch's samples and augmentations are a function of the run's seed and
the epoch, the same whatever the loader workers, and split exactly over processes."""

from __future__ import annotations

import pytest
import torch
from conftest import CAMVID, needs

from dptune.data.order import TrainOrder

SPLITS = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}}


def _batches(workers: int, epoch: int) -> list[dict]:
    from dptune.data.datamodule import SegmentationDataModule

    torch.manual_seed(7)  # the run's seed (Lightning's seed_everything)
    dm = SegmentationDataModule(root=str(CAMVID), splits=SPLITS, image_size=96, crop_size=64, batch_size=2,
                                num_workers=workers, cache=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(1234 + workers)  # what else drew from torch's generator must not matter
    return list(loader)


@needs(CAMVID)
def test_an_epoch_draws_the_same_samples_and_augmentations_with_or_without_loader_workers():
    """Augmentations were drawn from each worker's own random stream: another number of workers (or a
    resume) trained on other crops and flips of the same images."""
    for epoch in (0, 1):
        plain, workers = _batches(0, epoch), _batches(2, epoch)
        assert [b["index"].tolist() for b in plain] == [b["index"].tolist() for b in workers]
        for a, b in zip(plain, workers, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    one, two = _batches(0, 0), _batches(0, 1)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(one, two, strict=True))


@pytest.mark.parametrize("n", [10, 11, 3])
def test_processes_share_each_epoch_and_a_resume_on_other_processes_takes_the_rest(n):
    """Two processes take disjoint halves of the epoch's order (padded from its start to an even
    count, as DistributedSampler); resumed after 4 positions on 3 processes, they take the rest."""
    data = list(range(n))
    two = [TrainOrder(data, 2, r, seed=5) for r in range(2)]
    for o in two:
        o.set_epoch(3)
    drawn = [list(map(int, o)) for o in two]
    assert len(drawn[0]) == len(drawn[1]) == len(two[0]) == -(-n // 2)
    whole = two[0].order(3).tolist()
    assert sorted(drawn[0][:n // 2] + drawn[1][:n // 2]) == sorted(whole[:n // 2 * 2])
    assert set(drawn[0]) | set(drawn[1]) == set(data)
    three = [TrainOrder(data, 3, r, seed=5) for r in range(3)]
    for o in three:
        o.resume_at(3, 4)
    rest = [i for o in three for i in map(int, o)]
    assert set(rest) == set(whole[4:]) and len(rest) == -(-(n - 4) // 3) * 3 if n > 4 else rest == []
    for o in three:
        o.set_epoch(4)  # the next epoch is whole again
    assert sorted({i for o in three for i in map(int, o)}) == data


def test_neighbouring_epochs_and_seeds_draw_unrelated_orders():
    """The seed of an epoch's order mixed the numbers so poorly that epochs 98 and 99 drew the same order."""
    orders = {tuple(TrainOrder(list(range(12)), 1, 0, seed=s).order(e).tolist()) for s in range(4) for e in range(200)}
    assert len(orders) == 800


def test_a_damaged_order_record_is_one_warning_and_a_fresh_epoch(caplog):
    """A record with an infinite count was a raw OverflowError traceback (a user attack). Each bad record
    below is a warning and an epoch drawn afresh."""
    from dptune.data.order import OrderState

    good = {"seed": 0, "size": 32, "identity": "ab", "epoch": 0, "batches": 2, "consumed": 16, "done": False}
    for bad in ({**good, "consumed": float("inf")}, {**good, "done": "False"}, {**good, "seed": -1},
                {**good, "batches": None}, {k: v for k, v in good.items() if k != "identity"}, [1, 2],
                # a string count was taken as its number; a seed seed_everything refuses (order_seed drops it,
                # so the run's seed was the command's while its order followed the record's; g5 review)
                {**good, "batches": "2"}, {**good, "seed": 2**32}, {**good, "size": 32.0}, {**good, "consumed": 2**70}):
        state = OrderState()
        caplog.clear()
        state.load_state_dict(bad)
        assert state._resume_order is None
        assert "not one dptune wrote" in caplog.text and "trained twice" in caplog.text
    state = OrderState()
    state.load_state_dict(good)
    assert state._resume_order == good


@needs(CAMVID)
def test_a_training_set_with_other_samples_of_the_same_count_is_told_apart():
    """A resume whose ``on_bad_sample skip`` left out another file (same count) took the positions of
    the checkpoint's set as its own: samples trained twice and others never, without a word."""
    from dptune.data.datamodule import SegmentationDataModule
    from dptune.data.order import sample_identity

    dm = SegmentationDataModule(root=str(CAMVID), splits=SPLITS, image_size=96, crop_size=64, batch_size=2,
                                num_workers=0, cache=False)
    dm.setup("fit")
    ds = dm.dataset("train")
    before = sample_identity(ds)
    assert sample_identity(ds) == before
    ds.indices = [0, 1, 3]  # sample 2 left out, then sample 3
    other = sample_identity(ds)
    ds.indices = [0, 1, 2]
    assert len({before, other, sample_identity(ds)}) == 3


def _flips(seeding) -> dict[str, int]:
    """Which of the four flip combinations 2000 samples get from [HorizontalFlip, VerticalFlip]."""
    import collections

    import numpy as np

    from dptune.data.transforms import build_transforms

    t = build_transforms([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}])
    image = np.arange(4, dtype=np.uint8).reshape(2, 2, 1).repeat(3, 2)
    kinds = {(0, 1, 2, 3): "none", (1, 0, 3, 2): "h", (2, 3, 0, 1): "v", (3, 2, 1, 0): "h+v"}
    return collections.Counter(kinds[tuple(out.ravel())] for out in seeding(t, image))


def test_each_transform_of_a_pipeline_draws_its_own_numbers():
    """Albumentations' set_random_seed gives every transform of a pipeline the same seed: after each
    per-sample reseed they drew the same numbers, so a horizontal flip came only with a vertical one
    (and in the default pipeline a flip only with a zoomed-out, jittered crop; f3 review). Seeded
    once (the workers' and processes' seed) two such transforms were locked together too."""
    from dptune.data.order import reseed
    from dptune.data.transforms import seed_augmentations

    def per_sample(t, image):
        order = TrainOrder(list(range(2000)), 1, 0, seed=0)
        for d in order:
            reseed(t, d)
            yield t(image=image)["image"][..., 0]

    def once(t, image):
        seed_augmentations(t, 3)
        for _ in range(2000):
            yield t(image=image)["image"][..., 0]

    for seeding in (per_sample, once):
        counts = _flips(seeding)
        assert set(counts) == {"none", "h", "v", "h+v"} and min(counts.values()) > 400, (seeding.__name__, counts)


def test_a_sample_drawn_twice_in_an_epoch_gets_other_augmentations_the_second_time():
    """5 samples on 2 processes: the padding repeats the epoch's first sample on the second process; a
    resume with a smaller batch takes the epoch's first samples again. Each repeat carried the seed of the
    first draw: the same augmented copy trained twice (f3 review)."""
    data = list(range(5))
    drawn = [d for r in range(2) for d in TrainOrder(data, 2, r, seed=1)]
    assert len(drawn) == 6 and len({int(d) for d in drawn}) == 5 and len({d.seed for d in drawn}) == 6
    first = list(TrainOrder(data, 1, 0, seed=1))
    resumed = TrainOrder(data, 1, 0, seed=1)
    resumed.resume_at(0, 3, left=4)  # 2 positions left, Lightning's steps take 4: 2 from the start again
    rest = list(resumed)
    assert [int(d) for d in rest] == [int(d) for d in first[3:] + first[:2]]
    assert [d.seed for d in rest[:2]] == [d.seed for d in first[3:]]  # as in the uninterrupted epoch
    assert not {d.seed for d in rest[2:]} & {d.seed for d in first}


def test_the_resume_line_says_what_the_rest_of_the_epoch_trains(caplog):
    """33 samples on 2 processes in batches of 8, cut after one step: the line said "the 17 ... and 1 from
    its start" where the resume trains 16 (each process drops its last partial batch, as every epoch
    does; f4 review). With batches of 16 after 8, how many wait; the counts it gives add up to the
    samples not reached (it said "8 of the 13 ...; 4 of them are not trained" where 5 were not: g1
    review); after an earlier resume that went on into the epoch's second pass, what it draws again."""
    import logging

    from dptune.data.order_resume import say_resumed

    state = {"seed": 0, "size": 33, "epoch": 0, "batches": 1, "consumed": 16, "done": False, "identity": "x"}
    with caplog.at_level(logging.INFO, logger="dptune.data.order_resume"):
        say_resumed(state, 33, 16, 17, 8, 2)
        say_resumed({**state, "size": 32, "consumed": 16, "batches": 2}, 32, 0, 32, 16, 1)
        say_resumed({**state, "size": 17, "consumed": 4, "batches": 1}, 17, 8, 17, 8, 1)
        say_resumed({**state, "size": 32, "consumed": 44, "batches": 13}, 32, 6, 32, 2, 1)
        say_resumed({**state, "size": 32, "consumed": 24, "batches": 3}, 32, 26, 32, 2, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("resume: epoch 0 continues with 16 of the 17 of its 33 training samples it had not reached; "
                        "the other 1 is left out, as every epoch's last partial batch is")
    assert lines[1].startswith("resume: epoch 0 continues with 0 of the 16 of its 32 training samples it had not "
                               "reached; the other 16 are not trained in this epoch (the steps this run")
    assert lines[2].startswith("resume: epoch 0 continues with 8 of the 13 of its 17 training samples it had not "
                               "reached; the other 5 are not trained in this epoch (the steps this run")
    assert lines[3].startswith("resume: epoch 0 had reached each of its 32 training samples; it continues with 6 "
                               "of them drawn a second time (the steps this run")
    assert lines[4].startswith("resume: epoch 0 continues with the 8 of its 32 training samples it had not "
                               "reached, and 18 from its start (the steps this run")


_FORMS = {"after": (0, 0), "ended": (0, -1), "raised": (1, 0)}  # (ready/started, completed) beside processed


def _cut(batches: int, consumed: int, form: str = "after", earlier: int = 0, done: bool = False) -> dict:
    """A checkpoint's loop state and order record, ``batches`` into epoch 0 (``earlier`` batches of epochs
    before), in the form Lightning writes it: after the batch (SIGTERM), as it ended (every_n_train_steps:
    not yet counted complete) or inside the next one (save_on_exception: started, not processed)."""
    more, less = _FORMS[form]

    def counts(k: int) -> dict:
        return {"ready": k + more, "started": k + more, "processed": k, "completed": k + less}
    return {"loops": {"fit_loop": {"epoch_progress": {"current": {"ready": 1, "started": 1, "processed": 0,
                                                                  "completed": 0}},
                                   "epoch_loop.batch_progress": {"current": counts(batches),
                                                                 "total": counts(batches + earlier)},
                                   "epoch_loop.state_dict": {"_batches_that_stepped": batches + earlier}}},
            "DM": {"seed": 1, "size": 32, "identity": "x", "epoch": 0, "batches": batches, "consumed": consumed,
                   "done": done}}


@pytest.mark.parametrize("batches, consumed, batch, world, limit, form, now", [
    (3, 24, 16, 1, 1.0, "after", 1),  # 24 trained, batches of 16: 1 (8 drawn again at the end)
    (2, 16, 4, 1, 1.0, "after", 4),   # smaller batches: exactly the 16 trained
    (3, 24, 32, 1, 1.0, "after", 0),  # one step an epoch: at most one short of it
    (3, 24, 64, 1, 1.0, "after", 0),  # batches larger than the set: one of the set's 32
    (1, 8, 8, 2, 1.0, "after", 0),    # two processes take 16 a step
    (2, 16, 8, 2, 1.0, "after", 1),
    (3, 24, 4, 1, 5, "after", 4),     # limit_train_batches 5: one short of the epoch's 5
    (3, 24, 4, 1, 0.5, "after", 3),   # 0.5 of 8
    (3, 24, 16, 1, 1.0, "ended", 1),  # written as the batch ended
    (1, 8, 16, 1, 1.0, "ended", 0),   # ... at a count of 0: written as that batch complete
    (3, 24, 16, 1, 1.0, "raised", 1),  # written inside the next batch
    (3, 24, 8, 1, 1.0, "raised", 3),  # ... at the same size: nothing to change
])
def test_rebatch_counts_the_samples_trained_in_this_run_s_batches(batches, consumed, batch, world, limit, form, now):
    """The checkpoint's count of the interrupted epoch's batches (Lightning's loop state and the order
    record) made this run's: the samples trained, in this run's batches on its processes, rounded down,
    at most one short of the epoch (so it ends with a step and its validation); each of Lightning's
    counts by as much, so that its restart reads the same form. A count of 0 written as its batch ended
    is written as that batch complete; Lightning's restart at 0 from a complete batch counts the logger's
    step once on its own, which the restart from the batch's end does too, and from a SIGTERM one does not."""
    from types import SimpleNamespace

    from dptune.data.order_resume import rebatch

    ckpt = _cut(batches, consumed, form, earlier=8)
    trainer = SimpleNamespace(world_size=world, limit_train_batches=limit)
    steps = {16: 2, 4: 8, 32: 1, 64: 1, 8: 4 // world}[batch] if limit == 1.0 else {5: 5, 0.5: 4}[limit]
    assert rebatch(ckpt, "DM", 32, batch, trainer) == ((batches, now, steps, False) if now != batches else None)
    more, less = _FORMS[form]
    if form == "ended" and now == 0:
        less = 0
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for part, base in (("current", now), ("total", now + 8)):
        assert progress[part] == {"ready": base + more, "started": base + more, "processed": base,
                                  "completed": base + less}
    assert ckpt["DM"]["batches"] == now and ckpt["DM"]["consumed"] == consumed
    stepped = ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    assert stepped == batches + 8 - (now == 0 and form == "after")


@pytest.mark.parametrize("interval, every_n, done, now", [
    (0.5, 1, False, 4), (0.25, 1, False, 4), (0.375, 1, False, 3), (3, 1, False, 3),
    (1.0, 1, True, 8), (0.5, 1, True, 8),
    (3, 1, True, 6), (0.375, 1, True, 6),  # the epoch's end (8) is no validation point: the last one before it
    (3, None, False, 4),  # validation every 3 batches of the run: 8 before this epoch, so at counts 1, 4, 7
])
def test_a_cut_validation_is_counted_at_a_validation_point(interval, every_n, done, now):
    """A checkpoint cut inside a validation: Lightning runs that validation again only where its restored
    count is one of its validation points, so the count is the last one at or before the samples trained
    at this run's size (the validation at an epoch's end: the epoch's end where it is one; the checkpoint's
    last batch ends the epoch after it). 20 samples of 32 trained, batches of 4 (8 an epoch)."""
    from types import SimpleNamespace

    from dptune.data.order_resume import rebatch

    ckpt = _cut(32 // 8 if done else 2, 32 if done else 20, earlier=8, done=done)
    trainer = SimpleNamespace(world_size=1, limit_train_batches=1.0, val_check_interval=interval,
                              check_val_every_n_epoch=every_n)
    assert rebatch(ckpt, "DM", 32, 4, trainer, cut=True) == (4 if done else 2, now, 8, False)
    assert ckpt["DM"]["done"] is done
    # uncut: the samples trained, or (done, inside the epoch's restart) the whole epoch
    assert rebatch(_cut(2, 20, done=done), "DM", 32, 4, trainer, cut=False) == (2, 8 if done else 5, 8, False)
    # by time: no validation point to count at, said
    trainer._val_check_time_interval = 60.0
    assert rebatch(_cut(2, 20), "DM", 32, 4, trainer, cut=True)[3] is True


def test_rebatch_leaves_what_it_cannot_re_express():
    """No change for a record of an epoch that ended, counts nothing, is of another set, or is not dptune's;
    a record whose batches are not the loop state's is said to disagree."""
    from types import SimpleNamespace

    from dptune.data.order_resume import rebatch

    trainer = SimpleNamespace(world_size=1, limit_train_batches=1.0)
    for change in ({"done": True}, {"consumed": 0}, {"size": 31}, {"batches": "3"}, {"seed": 2**32},
                   {"consumed": 2**63 - 1}):
        ckpt = _cut(3, 24)
        ckpt["DM"].update(change)
        if change.get("done"):  # an epoch that ended (and was validated): Lightning's restart begins no epoch
            ckpt["loops"]["fit_loop"]["epoch_progress"]["current"].update(ready=1, processed=1, completed=1)
        assert rebatch(ckpt, "DM", 32, 16, trainer) is None
        assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3
    for key, value in (("batches", 2), ("epoch", 1)):
        ckpt = _cut(3, 24)
        ckpt["DM"][key] = value
        assert rebatch(ckpt, "DM", 32, 16, trainer) == "disagrees"
    assert rebatch({"DM": _cut(3, 24)["DM"]}, "DM", 32, 16, trainer) is None  # no loop state


def test_a_second_resume_in_an_epoch_continues_its_second_pass():
    """8 samples in batches of 6, cut after one step, resumed in batches of 2 (the 2 left and 4 from the
    epoch's start), cut again after 2 of those: the second resume drew the epoch's first samples again,
    with the augmentation seeds they had just trained with (g1 review), not the 2 after them."""
    data = list(range(8))
    first = TrainOrder(data, 1, 0, seed=3)
    first.resume_at(0, 6, left=6)
    once = list(first)
    assert [d.seed for d in once[:2]] == [d.seed for d in list(TrainOrder(data, 1, 0, seed=3))[6:]]
    again = TrainOrder(data, 1, 0, seed=3)
    again.resume_at(0, 10, left=2)  # positions 6, 7 and 0, 1 (second pass) trained
    twice = list(again)
    assert [(int(d), d.seed) for d in twice] == [(int(d), d.seed) for d in once[4:6]]


def test_an_end_of_epoch_checkpoint_with_another_training_set_says_no_epoch_was_cut(caplog):
    """An end-of-epoch checkpoint resumed on a training set of 31 samples (32 before) warned that the
    interrupted epoch was drawn afresh, with samples trained twice: no epoch was interrupted (g1 review)."""
    import logging
    from types import SimpleNamespace

    from dptune.data.order import OrderState

    class State(OrderState):
        trainer = SimpleNamespace(world_size=1, global_rank=0,
                                  fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(
                                      current=SimpleNamespace(processed=0))))

    done = {"seed": 0, "size": 32, "identity": "ab", "epoch": 0, "batches": 4, "consumed": 32, "done": True}
    for record, cut in ((done, False), ({**done, "batches": 2, "consumed": 16, "done": False}, True)):
        state = State()
        state.load_state_dict(record)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dptune.data.order_resume"):
            order = state.train_order(list(range(31)), 8)
        assert order.epoch == 1 - cut  # the next epoch, or the cut one drawn afresh
        assert "the training set holds other samples than the checkpoint's run had (31, was 32" in caplog.text
        assert ("trained twice" in caplog.text) is cut, caplog.text


@needs(CAMVID)
def test_the_same_training_set_in_another_folder_is_the_same_set(tmp_path):
    """A run resumed with --data.root on a copy of its data (scratch to home) warned that the training
    set held other samples and drew the interrupted epoch afresh: the fingerprint held the full paths
    (g2 review). The files' places within the folder are what it holds."""
    from dptune.data.datamodule import SegmentationDataModule
    from dptune.data.order import sample_identity

    copy = tmp_path / "camvid"
    for sub in ("train", "trainannot"):
        (copy / sub).mkdir(parents=True)
        for f in (CAMVID / sub).glob("0001TP_0069*"):
            (copy / sub / f.name).write_bytes(f.read_bytes())
    (copy / "labels.yaml").write_bytes((CAMVID / "labels.yaml").read_bytes())
    identities = []
    for root in (CAMVID, copy):
        dm = SegmentationDataModule(root=str(root), splits=SPLITS, image_size=96, crop_size=64, batch_size=2,
                                    num_workers=0, cache=False)
        dm.setup("fit")
        identities.append(sample_identity(dm.dataset("train")))
    assert identities[0] == identities[1]


@needs(CAMVID)
def test_a_checkpoint_of_the_earlier_fingerprint_resumes_in_order(caplog):
    """Checkpoints written before the fingerprint held places within the folder hold the paths as given:
    resumed, their interrupted epoch was drawn afresh (g3 review, on nested Dubai tiles)."""
    import logging
    from types import SimpleNamespace

    from dptune.data.datamodule import SegmentationDataModule
    from dptune.data.order import OrderState, sample_identity

    dm = SegmentationDataModule(root=str(CAMVID), splits=SPLITS, image_size=96, crop_size=64, batch_size=2,
                                num_workers=0, cache=False)
    dm.setup("fit")
    ds = dm.dataset("train")
    assert sample_identity(ds, legacy=True) != sample_identity(ds)

    class State(OrderState):
        trainer = SimpleNamespace(world_size=1, global_rank=0, limit_train_batches=1.0,
                                  fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(
                                      current=SimpleNamespace(processed=0))))

    state = State()
    state.load_state_dict({"seed": 0, "size": len(ds), "identity": sample_identity(ds, legacy=True), "epoch": 0,
                           "batches": 1, "consumed": 2, "done": False})
    with caplog.at_level(logging.INFO, logger="dptune.data.order_resume"):
        order = state.train_order(ds, 2)
    assert "other samples" not in caplog.text and order.resume == (0, 2, len(ds) - 2), caplog.text
