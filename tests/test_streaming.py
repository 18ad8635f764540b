"""Hugging Face streaming: per-rank shards that cover the data exactly once, a repeating
shuffled training stream, bad examples named, and a real train.py fit on a stream."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from dptune.data.streaming import StreamingSegmentation, open_stream
from dptune.errors import DataError
from dptune.labels import LabelSet

LABELS = LabelSet(names=["a", "b", "c"], source="test")


def _dataset(tmp_path, n: int, bad: int | None = None):
    """Rows whose image carries the row number in pixel (0, 0); row ``bad`` has mask value 9."""
    import datasets

    imgs, masks = [], []
    for i in range(n):
        img = np.full((32, 48, 3), 100, np.uint8)
        img[0, 0] = [i, i, i]
        mask = np.full((32, 48), i % 3, np.uint8)
        if i == bad:
            mask[5, 5] = 9
        imgs.append(Image.fromarray(img))
        masks.append(Image.fromarray(mask))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    path = tmp_path / "hf"
    ds = datasets.Dataset.from_dict({"image": imgs, "label": masks}, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(path))
    return path


def _rows(dataset: StreamingSegmentation, limit: int | None = None) -> list[int]:
    out = []
    for item in dataset:
        out.append(int(item["image"][0, 0, 0]))
        if limit and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("n, shards", [(7, 4), (8, 4), (5, 5), (4, 8)])  # 4 rows, 8 shards: was datasets' ValueError
def test_eval_stream_gives_each_rank_a_disjoint_part_covering_everything(tmp_path, n, shards):
    path = _dataset(tmp_path, n)
    parts = [_rows(StreamingSegmentation(open_stream(str(path), "validation", num_shards=shards), LABELS, "v",
                                         rank=r, world_size=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(n))
    assert parts[0] and parts[1]


def test_train_stream_repeats_and_reshuffles_each_pass(tmp_path):
    n = 12
    path = _dataset(tmp_path, n)
    ds = StreamingSegmentation(open_stream(str(path), "train", num_shards=4), LABELS, "t", train=True,
                               shuffle_buffer=n, seed=0)
    rows = _rows(ds, limit=3 * n)
    passes = [rows[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert passes[0] != passes[1] or passes[1] != passes[2]


def test_bad_example_is_named_or_skipped_and_counted(tmp_path):
    path = _dataset(tmp_path, 4, bad=2)
    strict = StreamingSegmentation(open_stream(str(path), "validation", num_shards=1), LABELS, "hf[validation]")
    with pytest.raises(DataError, match=r"hf\[validation\] rank 0 example 2: .*9"):
        _rows(strict)
    lenient = StreamingSegmentation(open_stream(str(path), "validation", num_shards=1), LABELS, "hf[validation]",
                                    on_bad_sample="skip")
    assert _rows(lenient) == [0, 1, 3] and lenient.skipped == 1


def test_a_bad_example_of_a_training_stream_is_named_by_pass_and_skipped_on_each(tmp_path, caplog):
    """A repeating, reshuffled training stream named a bad row "example 2" then "example 0" and
    counted "2 skipped" for one bad row, as if two rows were bad."""
    path = _dataset(tmp_path, 4, bad=2)
    train = StreamingSegmentation(open_stream(str(path), "train", num_shards=1), LABELS, "hf[train]", train=True,
                                  on_bad_sample="skip", shuffle_buffer=4)
    with caplog.at_level("WARNING", logger="dptune.data.streaming"):
        rows = _rows(train, limit=7)  # two whole passes of the 3 good rows, and the first of the third
    assert sorted(rows[:6]) == [0, 0, 1, 1, 3, 3]
    said = [r.getMessage() for r in caplog.records]
    passes = [int(re.search(r"hf\[train\] rank 0 pass (\d+) example \d \(shuffled order\)", m).group(1)) for m in said]
    assert passes[:2] == [1, 2] and passes == sorted(set(passes)) and train.skipped == len(passes), said  # once a pass
    assert all("skipped again on each pass" in m for m in said), said


def test_a_training_stream_whose_every_example_is_skipped_stops_after_a_pass(tmp_path):
    """Under on_bad_sample: skip a training stream of nothing but bad examples was passed over again and
    again (4741 passes in 2 minutes, step 0, only Ctrl-C stopped it: a user attack)."""
    path = _dataset(tmp_path, 3)
    two = LabelSet(names=["a", "b"], value_map={1: 0, 2: 1}, source="t")  # mask value 0 (row 0, 3, ...) is no class
    train = StreamingSegmentation(open_stream(str(path), "train", num_shards=1), two, "hf[train]", train=True,
                                  on_bad_sample="skip", shuffle_buffer=3)
    assert len(_rows(StreamingSegmentation(open_stream(str(path), "validation", num_shards=1), two, "v",
                                           on_bad_sample="skip"))) == 2
    train.labels = LabelSet(names=["a"], value_map={5: 0}, source="t")  # no row's values are classes
    with pytest.raises(DataError, match=r"hf\[train\] rank 0: every one of the 3 examples of a pass was bad and "
                                        r"skipped; nothing to train on"):
        _rows(train, limit=10)
    assert train.skipped == 3
    # one process's shards only (DDP): said as its part, not as the whole data (a review)
    rank = StreamingSegmentation(open_stream(str(path), "train", num_shards=2), train.labels, "hf[train]", train=True,
                                 on_bad_sample="skip", rank=1, world_size=2)
    with pytest.raises(DataError, match=r"rank 1: every one of the \d examples of a pass of its shards was bad .*"
                                        r"data.hf.num_shards"):
        _rows(rank, limit=10)


def test_fit_on_a_stream_needs_max_steps_and_then_runs_them(tmp_path):
    from test_train import REPO, run_train

    path = _dataset(tmp_path, 10)
    args = ["fit", "--model.config", str(REPO / "configs" / "models" / "dpt-tiny.json"),
            "--data.source", "hf", "--data.hf", json.dumps({"dataset": str(path), "streaming": True, "num_shards": 2}),
            "--data.labels", json.dumps({"names": ["a", "b", "c"]}),
            "--data.splits", json.dumps({"train": {"split": "train"}, "val": {"split": "validation"}}),
            "--data.image_size", "32", "--data.crop_size", "32", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]
    # refused before the run starts: no W&B run is left (the refusal came after it, from configure_optimizers)
    logged = args[:args.index("--trainer.logger")] + args[args.index("--trainer.logger") + 2:]
    proc = run_train(logged, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "set --trainer.max_steps" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists(), sorted((tmp_path / "run").rglob("*"))
    run_train([*args, "--trainer.max_steps", "7", "--trainer.val_check_interval", "7"], cwd=tmp_path)
    # a whole number of batches per epoch bounds the run too
    run_train([*args, "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(tmp_path / "bounded")], cwd=tmp_path)
    assert (tmp_path / "bounded" / "checkpoints" / "last.ckpt").is_file()
    import torch

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["global_step"] == 7  # more steps than one pass over the 10 examples (5 batches)
    assert 0.0 <= ckpt["dptune"]["metrics"]["val"]["mIoU"] <= 1.0


@pytest.mark.parametrize("shards", [3, 4])
def test_train_stream_first_pass_is_split_exactly_across_ranks(tmp_path, monkeypatch, shards):
    """Each rank's first pass over the shuffled training stream the datamodule builds: together they
    hold every example once, also when the world size does not divide the shard count (datasets
    then keeps every world_size-th example on each rank: a partition only if every rank shuffles
    alike, so the shuffle seed must not differ per rank as augmentation seeds do)."""
    from types import SimpleNamespace

    from dptune.data.datamodule import SegmentationDataModule

    n = 12
    path = _dataset(tmp_path, n)
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = SegmentationDataModule(source="hf", labels={"names": ["a", "b", "c"]}, splits={"train": {"split": "train"}},
                                    hf={"dataset": str(path), "streaming": True, "num_shards": shards,
                                        "shuffle_buffer": 4}, image_size=32, num_workers=0)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        first = next(dm._stream("train").passes())
        parts.append([int(np.asarray(row["image"])[0, 0, 0]) for row in first])
    assert sorted(parts[0] + parts[1]) == list(range(n)), parts


def test_a_streamed_validation_that_scores_no_image_is_nan_and_never_the_best_checkpoint(tmp_path):
    """Every validation example skipped (on_bad_sample: skip): the log said 'mIoU nan (0 images)' while
    val/mIoU was logged as 0.0 and won best-epoch00-mIoU0.0000.ckpt (a user attack)."""
    import datasets
    from test_train import REPO, run_train

    good = _dataset(tmp_path, 6)
    bad_masks = [Image.fromarray(np.full((32, 48), 9, np.uint8)) for _ in range(3)]
    imgs = [Image.fromarray(np.full((32, 48, 3), 100, np.uint8)) for _ in range(3)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    train = datasets.load_from_disk(str(good))["train"]
    path = tmp_path / "mixed"
    datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict(
        {"image": imgs, "label": bad_masks}, features=feats)}).save_to_disk(str(path))
    run = tmp_path / "run"
    proc = run_train(["fit", "--model.config", str(REPO / "configs" / "models" / "dpt-tiny.json"),
                      "--data.source", "hf", "--data.hf", json.dumps({"dataset": str(path), "streaming": True}),
                      "--data.labels", json.dumps({"names": ["a", "b", "c"]}), "--data.on_bad_sample", "skip",
                      "--data.splits", json.dumps({"train": {"split": "train"}, "val": {"split": "validation"}}),
                      "--data.image_size", "32", "--data.crop_size", "32", "--data.batch_size", "2",
                      "--data.num_workers", "0", "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
                      "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                      "--trainer.num_sanity_val_steps", "0"], cwd=tmp_path)
    assert "val: no image was scored" in proc.stderr, proc.stderr[-3000:]
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("best-")]


def test_a_hugging_face_row_past_pils_own_pixel_limit_reads_as_from_a_folder(tmp_path, monkeypatch):
    """A 182 M-pixel tile and its mask in a save_to_disk dataset stopped the data check with a raw
    DecompressionBombError from ``datasets``' PIL decoding, where the same files in a folder read (a
    review). PIL's limit is lowered here so that a 32 x 48 row passes it."""
    from dptune.data.hf_sources import HFSource

    path = _dataset(tmp_path, 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    source = HFSource(str(path), "train", "image", "label")
    image, mask, _ = source.load(1)
    assert image.shape == (32, 48, 3) and image[0, 0, 0] == 1 and int(mask.max()) == 1
    assert Image.MAX_IMAGE_PIXELS == 100
