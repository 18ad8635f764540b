import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, DUBAI, needs
from PIL import Image

from dptune.data.datamodule import SegmentationDataModule
from dptune.data.images import read_image
from dptune.data.loaders import collate
from dptune.data.sources import FolderSource
from dptune.data.templates import mask_path_for
from dptune.errors import DataError
from dptune.labels import IGNORE_INDEX, LabelSet

CAMVID_SPLITS = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
                 "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}


def test_mask_template_placeholders():
    assert mask_path_for("/d/Tile 1/images/a.jpg", "{dir}/../masks/{stem}.png", "/d") == "/d/Tile 1/masks/a.png"
    assert mask_path_for("/d/train/x.jpg", "trainannot/{stem}.png", "/d") == "/d/trainannot/x.png"
    assert mask_path_for("/d/train/x.jpg", "m/{name}", "/d") == "/d/m/x.jpg"
    # a relative root, as in --data.root ../shared/data/dubai-aerial
    assert mask_path_for("../s/d/Tile 1/images/a.jpg", "{dir}/../masks/{stem}.png", "../s/d") == "../s/d/Tile 1/masks/a.png"


@needs(CAMVID)
def test_the_id_placeholder_pairs_images_and_masks_named_apart(tmp_path):
    """docs/segmentation.md's example: ``img/frame_*.jpg`` with ``ann/label_{id}.png``."""
    files = sorted((CAMVID / "train").glob("*.jpg"))[:3]
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    for k, f in enumerate(files):
        shutil.copy(f, tmp_path / "img" / f"frame_{k:04d}.jpg")
        shutil.copy(CAMVID / "trainannot" / f"{f.stem}.png", tmp_path / "ann" / f"label_{k:04d}.png")
    src = FolderSource(str(tmp_path), "img/frame_*.jpg", "ann/label_{id}.png")
    assert [Path(m).name for m in src.masks] == ["label_0000.png", "label_0001.png", "label_0002.png"]
    for k, f in enumerate(files):
        _, mask, _ = src.load(k)
        assert np.array_equal(mask, np.asarray(Image.open(CAMVID / "trainannot" / f"{f.stem}.png")))
    assert mask_path_for(str(tmp_path / "img" / "frame_0007.JPG"), "ann/label_{id}.png", str(tmp_path),
                         "img/frame_*.jpg") == str(tmp_path / "ann" / "label_0007.png")
    # a string format pads: frame_7.jpg with label_00007.png
    assert mask_path_for(str(tmp_path / "img" / "frame_7.jpg"), "ann/label_{id:0>5}.png", str(tmp_path),
                         "img/frame_*.jpg") == str(tmp_path / "ann" / "label_00007.png")


@needs(DUBAI)
def test_relative_root_finds_every_mask(monkeypatch):
    monkeypatch.chdir(DUBAI.parent)
    src = FolderSource("dubai-aerial", "Tile [1-5]/images/*.jpg", "{dir}/../masks/{stem}.png", rgb_masks=True)
    assert len(src) == 45 and all(Path(m).exists() for m in src.masks)


@needs(CAMVID)
def test_camvid_reads_in_place_and_validation_keeps_mask_size():
    dm = SegmentationDataModule(root=str(CAMVID), splits=CAMVID_SPLITS, image_size=96, crop_size=64,
                                batch_size=2, num_workers=0, cache=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (2, 64, 64)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == (96, 96)
    assert val["mask"].shape[-2:] == (360, 480) and val["sizes"][0] == (360, 480)
    values = set(torch.unique(val["mask"]).tolist())
    assert values <= set(range(11)) | {IGNORE_INDEX} and IGNORE_INDEX in values  # void 11 -> 255


@needs(DUBAI)
def test_dubai_layout_with_spaces_and_rgb_masks():
    dm = SegmentationDataModule(
        root=str(DUBAI), splits={"val": {"images": "Tile 6/images/*.jpg", "masks": "{dir}/../masks/{stem}.png"}},
        image_size=64, batch_size=2, num_workers=0, check=False)
    ds = dm.dataset("val")
    assert len(ds) == 9
    item = ds[0]
    assert item["image"].shape == (3, 64, 64)
    h, w = item["mask"].shape
    assert h != w  # native, non-square label size is kept for scoring
    assert set(torch.unique(item["mask"]).tolist()) <= set(range(6)) | {IGNORE_INDEX}


def test_collate_pads_masks_with_255():
    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "mask": torch.zeros(4, 6, dtype=torch.uint8), "index": 0},
             {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "mask": torch.ones(5, 3, dtype=torch.uint8), "index": 1}]
    b = collate(items)
    assert b["mask"].shape == (2, 5, 6) and b["sizes"] == [(4, 6), (5, 3)]
    assert (b["mask"][0, 4:] == IGNORE_INDEX).all() and (b["mask"][1, :, 3:] == IGNORE_INDEX).all()


def test_one_collate_pads_images_masks_and_depth_each_with_its_own_no_label():
    """Samples that carry a mask and a depth map (segmentation + depth), at different sizes."""
    items = [{"image": torch.full((3, 4, 6), 7, dtype=torch.uint8), "mask": torch.zeros(4, 6, dtype=torch.uint8),
              "depth": torch.ones(4, 6), "index": 0},
             {"image": torch.full((3, 5, 3), 9, dtype=torch.uint8), "mask": torch.ones(5, 3, dtype=torch.uint8),
              "depth": torch.full((5, 3), 2.0), "index": 1}]
    b = collate(items)
    assert b["image"].shape == (2, 3, 5, 6) and b["image"].dtype == torch.uint8
    assert (b["image"][0, :, 4:] == 0).all() and (b["image"][1, :, :, 3:] == 0).all() and (b["image"][1, :, :, :3] == 9).all()
    assert (b["mask"][0, 4:] == IGNORE_INDEX).all() and (b["mask"][1, :, 3:] == IGNORE_INDEX).all()
    assert b["depth"].dtype == torch.float32 and (b["depth"][0, 4:] == 0).all() and (b["depth"][1, :, :3] == 2).all()
    assert b["sizes"] == [(4, 6), (5, 3)] and b["index"].tolist() == [0, 1]
    same = collate([items[0], items[0]])  # one size: stacked as they are
    assert same["image"].shape == (2, 3, 4, 6) and same["depth"].shape == (2, 4, 6)


def test_synthetic_source_is_seeded():
    dm = SegmentationDataModule(source="synthetic", splits={"train": {"count": 4, "seed": 3, "size": [64, 64]}},
                                image_size=64, num_workers=0, check=False)
    a = dm.dataset("train").source.load(2)
    b = SegmentationDataModule(source="synthetic", splits={"train": {"count": 4, "seed": 3, "size": [64, 64]}},
                               image_size=64, num_workers=0, check=False).dataset("train").source.load(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert dm.label_set.names == ["background", "disc", "box", "triangle"]


def _hf_dataset(tmp_path, n=4, size=(48, 64)):
    import datasets

    rng = np.random.default_rng(0)

    def split(k):
        imgs = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(k)]
        masks = [Image.fromarray(rng.integers(0, 4, size, dtype=np.uint8)) for _ in range(k)]
        feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
        return datasets.Dataset.from_dict({"image": imgs, "annotation": masks}, features=feats)

    path = tmp_path / "hfds"
    datasets.DatasetDict({"train": split(n), "validation": split(2)}).save_to_disk(str(path))
    return path


def test_hf_dataset_from_disk_with_reduce_labels(tmp_path):
    path = _hf_dataset(tmp_path)
    dm = SegmentationDataModule(
        source="hf", hf={"dataset": str(path), "image_column": "image", "mask_column": "annotation"},
        labels={"names": ["a", "b", "c"], "reduce_labels": True},
        splits={"train": {"split": "train"}, "val": {"split": "validation"}},
        image_size=32, crop_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0, 1, 2, IGNORE_INDEX}
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape[-2:] == (48, 64)
    with pytest.raises(DataError, match="no column 'label'"):
        SegmentationDataModule(source="hf", hf={"dataset": str(path)}, labels={"names": ["a"]},
                               splits={"train": {"split": "train"}}, num_workers=0).dataset("train")


def test_a_saved_dataset_without_splits_or_with_an_empty_split_is_one_line(tmp_path):
    """A folder holding one Dataset (not a DatasetDict) served any split name asked of it: train and
    val were the same rows and a val mIoU came out with no word. A split of no rows was an
    IndexError from inside datasets."""
    import datasets

    single = tmp_path / "single"
    datasets.load_from_disk(str(_hf_dataset(tmp_path)))["train"].save_to_disk(str(single))
    spec = {"source": "hf", "hf": {"dataset": str(single), "image_column": "image", "mask_column": "annotation"},
            "labels": {"names": ["a", "b", "c"], "reduce_labels": True}, "image_size": 32, "crop_size": 32,
            "batch_size": 2, "num_workers": 0}
    dm = SegmentationDataModule(**spec, splits={"train": {"split": "train"}, "val": {"split": "validation"}})
    with pytest.raises(DataError, match=r"single: holds one Dataset, not a DatasetDict of named splits: it has no "
                                        r"split 'train'"):
        dm.setup("fit")
    rows = {"image": [], "annotation": []}
    feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    empty = tmp_path / "empty"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(single)),
                          "validation": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(empty))
    spec["hf"]["dataset"] = str(empty)
    dm = SegmentationDataModule(**spec, splits={"train": {"split": "train"}, "val": {"split": "validation"}})
    with pytest.raises(DataError, match=r"empty: split 'validation' holds no rows"):
        dm.setup("fit")
    # parquet files, as a file or a folder of them: said to be what they are, with the way in
    datasets.load_from_disk(str(single)).to_parquet(str(tmp_path / "train.parquet"))
    for where, what in ((tmp_path / "train.parquet", "a file, not a directory"),
                        (tmp_path, "a directory not written by save_to_disk")):
        spec["hf"]["dataset"] = str(where)
        dm = SegmentationDataModule(**spec, splits={"train": {"split": "train"}})
        with pytest.raises(DataError, match=rf"{re.escape(str(where))}: {what}; data\.hf\.dataset takes a hub name"):
            dm.setup("fit")


def test_hugging_face_rows_of_arrays_read_exactly_and_rows_without_pixels_say_what_they_hold(tmp_path):
    """An image column of uint8 arrays (which datasets returns as lists of Python ints) was refused as
    "image must be uint8, got int64"; a path string, encoded bytes or None were "got <U45", "got |S28873",
    "got object"; an H x W x 1 mask was "index mask expected (one channel), got 1 channels"."""
    import datasets

    from dptune.data.hf_sources import HFSource, row_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (6, 8, 1), dtype=np.uint8)
    feats = datasets.Features({"image": datasets.Array3D((6, 8, 3), "uint8"),
                               "annotation": datasets.Array3D((6, 8, 1), "uint8")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [image], "annotation": [mask]}, features=feats)}
                         ).save_to_disk(str(tmp_path / "arrays"))
    src = HFSource(str(tmp_path / "arrays"), "train", "image", "annotation")
    got, raw, name = src.load(0)
    assert got.dtype == np.uint8 and np.array_equal(got, image)
    labels = LabelSet(names=["a", "b", "c"], source="test")
    assert np.array_equal(labels.encode(raw, name), mask[..., 0])
    for value, said in ((str(tmp_path / "x.jpg"), "a string (a file path?)"), (b"\xff\xd8\xff", "encoded bytes"),
                        (None, "no image (None)"), ({"bytes": b"", "path": None}, "a mapping (encoded bytes or a path?)")):
        with pytest.raises(DataError, match=r"row#0: the image is " + re.escape(said) + r", not pixels; .*datasets\.Image"):
            row_image(value, "row#0")
    with pytest.raises(DataError, match=r"row#0: image must be uint8, got int64"):
        row_image(np.array([[[0, 300, 1]]]), "row#0")
    # the mask column likewise (a class number, None, a path or bytes crashed deep in the size check or
    # the label mapping with Python's own error: a user attack)
    from dptune.data.hf_sources import decode_row

    for value, said in ((3, "the int64 value 3, not a label map"), (None, "no mask (None), not pixels"),
                        ("ann/x.png", "a string (a file path?), not pixels"), (b"\x89PNG", "encoded bytes, not pixels")):
        with pytest.raises(DataError, match=r"row#0: the mask in column 'label' is " + re.escape(said)):
            decode_row({"image": image, "label": value}, "row#0", "image", "label", False)
    # the column's declared type decides, not each row's values: a uint16 column is refused on every
    # row (a dark one passed as 8-bit); a grey H x W x 1 uint8 column reads as RGB (it reached training
    # as one channel)
    feats = datasets.Features({"image": datasets.Array3D((6, 8, 1), "uint16"), "annotation": datasets.Array2D((6, 8), "uint8"),
                               "grey": datasets.Array3D((6, 8, 1), "uint8")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [np.full((6, 8, 1), 200, np.uint16)], "annotation": [mask[..., 0]], "grey": [image[..., :1]]},
        features=feats)}).save_to_disk(str(tmp_path / "wide"))
    with pytest.raises(DataError, match=r"wide\[train\]#0: image must be uint8, got uint16"):
        HFSource(str(tmp_path / "wide"), "train", "image", "annotation").load(0)
    got, _, _ = HFSource(str(tmp_path / "wide"), "train", "grey", "annotation").load(0)
    assert got.shape == (6, 8, 3) and np.array_equal(got, np.repeat(image[..., :1], 3, axis=2))


def _broken_copy(tmp_path):
    """A tiny folder dataset with a missing mask and a mask with an unknown value."""
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir()
    (root / "labels.yaml").write_text("names: [a, b]\n")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        mask = rng.integers(0, 2, (32, 32), dtype=np.uint8)
        if i == 1:
            mask[3, 3] = 200
        if i != 2:
            Image.fromarray(mask).save(root / "ann" / f"{i}.png")
    return root


def test_bad_samples_error_lists_each_file(tmp_path):
    root = _broken_copy(tmp_path)
    dm = SegmentationDataModule(root=str(root), splits={"train": {"images": "img/*.png", "masks": "ann/{stem}.png"}},
                                image_size=32, num_workers=0)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    lines = str(err.value).splitlines()
    assert any("img/2.png: no mask" in ln for ln in lines)
    assert any("ann/1.png: mask has values [200]" in ln for ln in lines)
    assert lines[-1].startswith("2 bad sample(s)") and "pass --data.on_bad_sample skip" in lines[-1]
    # a source of a joint config: the hint names its own setting (--data.on_bad_sample is no setting there)
    dm = SegmentationDataModule(root=str(root), splits={"train": {"images": "img/*.png", "masks": "ann/{stem}.png"}},
                                image_size=32, num_workers=0)
    dm.config_path = "data.segmentation"
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert "pass --data.segmentation.on_bad_sample skip" in str(err.value).splitlines()[-1]


def test_bad_samples_skip(tmp_path, caplog):
    root = _broken_copy(tmp_path)
    (root / "ann" / "2.png").write_bytes((root / "ann" / "0.png").read_bytes())
    dm = SegmentationDataModule(root=str(root), splits={"train": {"images": "img/*.png", "masks": "ann/{stem}.png"}},
                                image_size=32, num_workers=0, on_bad_sample="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and dm.skipped["train"] == 1
    dm2 = SegmentationDataModule(root=str(root), splits={"train": {"images": "img/*.png", "masks": "ann/{stem}.png"}},
                                 image_size=32, num_workers=0)
    with pytest.raises(DataError, match=r"1\.png: mask has values \[200\]"):
        dm2.setup("fit")


def test_truncated_jpeg_is_refused(tmp_path):
    p = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated JPEG"):
        read_image(str(p))
    g = tmp_path / "g.jpg"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(g)
    assert read_image(str(g)).shape == (8, 8, 3)  # grayscale becomes RGB


def test_folder_source_no_match(tmp_path):
    with pytest.raises(DataError, match="no images match"):
        FolderSource(str(tmp_path), "nothing/*.jpg", "{stem}.png")


@needs(CAMVID)
def test_disk_cache_serves_the_decoded_samples_and_follows_file_changes(tmp_path):
    """cache: disk writes each sample once (outside the data), later runs read it back unchanged,
    and a touched mask misses the cache."""
    import os
    import shutil

    root = tmp_path / "camvid"
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    for f in sorted((CAMVID / "train").glob("*.jpg"))[:3]:
        shutil.copy(f, root / "train" / f.name)
        shutil.copy(CAMVID / "trainannot" / f"{f.stem}.png", root / "trainannot" / f"{f.stem}.png")
    kw = dict(root=str(root), splits={"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"}},
              image_size=64, num_workers=0, cache="disk", cache_dir=str(tmp_path / "cache"))
    before = sorted(p.name for p in root.rglob("*"))
    ds = SegmentationDataModule(**kw).dataset("train")
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 6
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written beside the data
    plain = SegmentationDataModule(**{**kw, "cache": False}).dataset("train")
    for i in range(3):
        a, b = ds.load(i), plain.load(i)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    again = SegmentationDataModule(**kw).dataset("train")
    assert all(i in again.cache for i in range(3))
    mask = root / "trainannot" / f"{Path(again.source.images[1]).stem}.png"
    os.utime(mask, ns=(1, 1))
    third = SegmentationDataModule(**kw).dataset("train")  # re-checked and re-written
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 8
    assert all(i in third.cache for i in range(3))


def _binary_camvid(tmp_path: Path, frames: int = 6) -> Path:
    """CamVid frames turned into Car vs rest, masks written as 0/255 (images linked, not copied)."""
    root = tmp_path / "cars"
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True)
    for f in sorted((CAMVID / "train").glob("0001TP_0069*.jpg"))[:frames]:
        (root / "train" / f.name).symlink_to(f)
        mask = np.asarray(Image.open(CAMVID / "trainannot" / f"{f.stem}.png"))
        Image.fromarray(np.where(mask == 8, 255, 0).astype(np.uint8)).save(root / "trainannot" / f"{f.stem}.png")
    return root


@needs(CAMVID)
def test_binary_masks_stored_as_0_255_stop_with_the_fix_named(tmp_path):
    """A two-class label set over 0/255 masks: 255 is 'no label' unless the file says otherwise, so
    Car would silently never be trained. The pre-flight check stops and names both fixes."""
    root = _binary_camvid(tmp_path)
    split = {"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"}}

    def setup(labels):
        dm = SegmentationDataModule(root=str(root), labels=labels, splits=split, image_size=64, num_workers=0)
        dm.setup("fit")
        return dm

    with pytest.raises(DataError) as err:
        setup({"names": ["background", "Car"]})
    msg = str(err.value)
    assert "class 'Car' never occurs" in msg and "map: {0: background, 255: Car}" in msg and "ignore_values: [255]" in msg
    assert "trainannot/{stem}.png" in msg and "%" in msg
    # the fix the message names: 255 is Car; every Car pixel of the source masks reaches training as class 1
    dm = setup({"names": ["background", "Car"], "map": {0: "background", 255: "Car"}})
    ds = dm.datasets["train"]
    cars = sum(int((ds.load(i)[1] == 1).sum()) for i in ds.indices)
    ref = sum(int((np.asarray(Image.open(CAMVID / "trainannot" / f"{Path(p).stem}.png")) == 8).sum())
              for p in ds.source.images)
    assert cars == ref > 0
    # or it is stated as ignore: then an absent class is only a warning
    setup({"names": ["background", "Car"], "ignore_values": [255]})


@needs(CAMVID)
def test_a_training_split_without_a_labelled_pixel_stops(tmp_path):
    """Masks that are 'no label' everywhere (255, stated as ignore) trained on nothing, exit 0, with a
    'never occurs' warning per class (a user attack)."""
    root = _binary_camvid(tmp_path, frames=2)
    for mask in (root / "trainannot").glob("*.png"):
        Image.fromarray(np.full((360, 480), 255, np.uint8)).save(mask)
    split = {"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"}}
    dm = SegmentationDataModule(root=str(root), labels={"names": ["background", "Car"], "ignore_values": [255]},
                                splits=split, image_size=64, num_workers=0)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert "trainannot/{stem}.png" in str(err.value)
    assert "no labelled pixel in any of its 2 masks" in str(err.value)


def test_label_file_round_trip_keeps_whether_255_was_stated():
    from dptune.labels import LabelSet

    implied, stated = LabelSet(names=["a", "b"]), LabelSet.from_dict({"names": ["a", "b"], "ignore_values": [255]})
    assert implied.implicit_ignore and not stated.implicit_ignore
    assert LabelSet.from_dict(implied.to_dict()).implicit_ignore
    assert not LabelSet.from_dict(stated.to_dict()).implicit_ignore
    raw = np.array([[0, 255], [1, 255]], np.uint8)
    assert implied.implicit_ignore_pixels(raw) == 2 and stated.implicit_ignore_pixels(raw) == 0
    assert np.array_equal(implied.encode(raw), stated.encode(raw))  # same encoding either way


def camvid_with_a_corrupt_body(root: Path) -> tuple[list[Path], Path]:
    """Three CamVid frames as PNGs under ``root/train`` (masks linked under ``root/trainannot``), the
    second with zeros in the middle of its pixel data: its header reads fine. (frames, the bad file)."""
    import cv2

    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    frames = sorted((CAMVID / "train").glob("0001TP_0069*.jpg"))[:3]
    for f in frames:
        cv2.imwrite(str(root / "train" / f"{f.stem}.png"), cv2.imread(str(f)))
        (root / "trainannot" / f"{f.stem}.png").symlink_to(CAMVID / "trainannot" / f"{f.stem}.png")
    bad = root / "train" / f"{frames[1].stem}.png"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4000] = bytes(4000)
    bad.write_bytes(bytes(data))
    return frames, bad


@needs(CAMVID)
def test_png_with_a_corrupt_body_is_caught_before_training(tmp_path):
    """The header of such a PNG reads fine; only decoding the pixels finds the damage."""
    root = tmp_path / "corrupt"
    frames, bad = camvid_with_a_corrupt_body(root)
    from PIL import Image as PILImage

    with PILImage.open(bad) as im:
        assert im.size == (480, 360)  # the header is intact
    split = {"train": {"images": "train/*.png", "masks": "trainannot/{stem}.png"}}
    labels = str(CAMVID / "labels.yaml")
    dm = SegmentationDataModule(root=str(root), labels=labels, splits=split, image_size=64, num_workers=0)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(bad) in str(err.value) and "1 bad sample" in str(err.value)
    fast = SegmentationDataModule(root=str(root), labels=labels, splits=split, image_size=64, num_workers=0,
                                  check="header")
    fast.setup("fit")  # header-only: documented to miss it
    assert len(fast.datasets["train"]) == 3


def test_loader_workers_default_to_none_on_two_cores_else_half_up_to_eight(monkeypatch):
    """README: no loader worker on machines with 2 cores or fewer, else half the cores up to 8 (the
    cores this process may use); an explicit data.num_workers wins."""
    from dptune.data.loaders import default_workers

    for cores, workers in ((1, 0), (2, 0), (3, 1), (4, 2), (12, 6), (64, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert default_workers(None) == workers, cores
    assert default_workers(5) == 5 and default_workers(0) == 0


@pytest.mark.parametrize("image, pattern, expected", [
    ("rgb_00045.jpg", "rgb/rgb_*.jpg", "00045"), ("RGB_00045.JPG", "rgb_*.jpg", "00045"),
    ("0001_rgb.jpeg", "*_rgb.jp*g", "0001"),  # the widened glob dptune itself suggests for .jpeg beside .jpg
    ("0001_rgb.png", "*_rgb.*", "0001"), ("0001_rgb.png", "*_rgb.[jp][pn]g", "0001"),
    ("frame-000000.color.png", "*.color.*", "frame-000000"), ("frame-000000.color.png", "frame-*.color.png", "000000"),
    ("0001_left", "*_left", "0001"), ("rgb_7.jpg", "rgb_*", "7"), ("a_1_b_2.png", "a_*_b_*.png", "1_b_2"),
    ("x7.png", "x?.png", "7"), ("x7.png", "x[0-9].png", "7"), ("xb.png", "x[!a].png", "b"),
    ("a.jpg", "a.jpg", "a"), ("frame.png", "frame.*", "frame"), ("a.b.jpg", "s/**/*.jpg", "a.b"),
])
def test_the_id_is_what_the_file_name_wildcards_matched_whatever_the_extension(image, pattern, expected):
    from dptune.data.templates import glob_id

    assert glob_id(f"/d/{image}", pattern) == expected


def test_an_image_file_of_several_images_gives_its_first_and_says_so(tmp_path, caplog):
    """A multi-page TIFF or an animated PNG was read as its first image without a word (the docs said so
    of GIFs only): the rest of the file was dropped silently."""
    import logging

    from PIL import Image

    from dptune.data.images import read_image

    first = np.zeros((8, 12, 3), np.uint8)
    first[:, :6] = 200
    second = np.full((8, 12, 3), 50, np.uint8)
    pages = [Image.fromarray(first), Image.fromarray(second)]
    for name, kw in (("pages.tiff", {}), ("moving.png", {"duration": 100}), ("moving.gif", {"duration": 100})):
        pages[0].save(tmp_path / name, save_all=True, append_images=pages[1:], **kw)
    Image.fromarray(first).save(tmp_path / "one.tiff")
    with caplog.at_level(logging.WARNING, logger="dptune.data.images"):
        for name in ("pages.tiff", "moving.png", "moving.gif", "pages.tiff", "one.tiff"):
            img = read_image(str(tmp_path / name))
            assert np.abs(img.astype(int) - first).max() <= 2, name  # the first image (a GIF's palette rounds)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and all("holds 2 images (pages or frames); the first is read" in m for m in said), said
    assert {m.split(":")[0] for m in said} == {str(tmp_path / n) for n in ("pages.tiff", "moving.png", "moving.gif")}


def test_hf_settings_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    """A misspelt data.hf key was dropped when streaming (the run trained on the default column, exit 0)
    and named 'HFSource.__init__()' otherwise; num_shards abc was a traceback, 0 and streaming: maybe were
    taken; a local path that is not there became a Hub lookup and a 66-line traceback (a user attack)."""
    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.data.hf_sources import open_hf_split
    from dptune.errors import ConfigError

    splits = {"train": {"split": "train"}}
    for hf, said in (({"dataset": "x", "mask_colum": "fine", "streaming": True}, r"data.hf.mask_colum: no such setting "
                      r"\(did you mean mask_column\?"),
                     ({"dataset": "x", "num_shards": "abc"}, r"data.hf.num_shards 'abc': a whole number >= 1"),
                     ({"dataset": "x", "num_shards": 0}, r"data.hf.num_shards 0: a whole number >= 1"),
                     ({"dataset": "x", "shuffle_buffer": -1}, r"data.hf.shuffle_buffer -1"),
                     ({"dataset": "x", "streaming": "maybe"}, r"data.hf.streaming 'maybe': true or false")):
        with pytest.raises(ConfigError, match=said):
            SegmentationDataModule(source="hf", hf=hf, labels={"names": ["a"]}, splits=splits)
    with pytest.raises(ConfigError, match=r"data.hf.mask_column: no such setting .*depth_column"):
        DepthDataModule(source="hf", hf={"dataset": "x", "mask_column": "y"}, splits=splits)
    (tmp_path / "ds").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.hf.dataset ./ds/does_not_exist: no such directory"):
        open_hf_split("./ds/does_not_exist", "train")
    # owner/name is a hub name even beside a folder called like its owner (a review): the Hub is asked
    import datasets

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: asked.append(name) or "loaded")
    assert open_hf_split("ds/sidewalk", "train") == "loaded" and asked == ["ds/sidewalk"]

    def offline(name, *a, **k):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"data.hf.dataset ds/does_not_exist: no such directory here .* Hub gave no"):
        open_hf_split("ds/does_not_exist", "train")


@needs(CAMVID)
def test_a_validation_split_sharing_images_with_training_is_said(caplog):
    """A val split that names training images was scored (and picked the best checkpoint) on images the model
    trains on, without a word (a user attack): a warning counts them and names the first."""
    import logging

    shared = {"train": CAMVID_SPLITS["train"],
              "val": {"images": "train/0001TP_00696*.jpg", "masks": "trainannot/{stem}.png"}}
    dm = SegmentationDataModule(root=str(CAMVID), splits=shared, image_size=64, crop_size=64, batch_size=2,
                                num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dptune"):
        dm.setup("fit")
    n = len(dm.dataset("val"))
    said = [r.getMessage() for r in caplog.records if "also in the train split" in r.getMessage()]
    assert len(said) == 1 and f"data.splits.val: {n} of its {n} images are also in the train split" in said[0], said
    caplog.clear()
    apart = SegmentationDataModule(root=str(CAMVID), splits=CAMVID_SPLITS, image_size=64, crop_size=64,
                                   batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dptune"):
        apart.setup("fit")
    assert not [r for r in caplog.records if "also in the train split" in r.getMessage()]


def test_images_left_out_of_the_glob_only_by_their_format_but_labelled_are_said(tmp_path, caplog):
    """Three of six training images saved as PNG (their masks kept) trained on the other three, exit 0, without
    a word (a user attack): a warning counts the labelled images beside the split's that its glob leaves out
    only for their extension. A glob taking a subset of a folder, and the masks beside the images, are not
    counted."""
    import logging

    for k in range(6):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"f{k}.{'png' if k < 3 else 'jpg'}")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"f{k}_mask.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "g0.png")  # no mask: not a sample
    with caplog.at_level(logging.WARNING, logger="dptune"):
        src = FolderSource(str(tmp_path), "*.jpg", "{stem}_mask.png")
    said = [r.getMessage() for r in caplog.records]
    assert len(src) == 3 and len(said) == 1, said
    assert "3 image file(s) beside the images of '*.jpg' have a mask but do not match it" in said[0], said
    assert "f0.png" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dptune"):
        assert len(FolderSource(str(tmp_path), "f[345].jpg", "{stem}_mask.png")) == 3  # a subset: on purpose
        assert len(FolderSource(str(tmp_path), "f[012].png", "{stem}_mask.png")) == 3
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_the_two_data_warnings_are_said_once_and_a_copy_in_another_format_is_no_sample_left_out(tmp_path, caplog):
    """The shared-images warning came twice per fit (prepare_data runs the stage's setup, Lightning again); the
    left-out warning counted copies of the split's images in another format (a.png beside a.jpg, one mask
    each), which the glob the warning advised then refused as two images of one mask (a review)."""
    import logging

    for k in range(3):
        for ext in ("jpg", "png"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"f{k}.{ext}")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"f{k}_mask.png")
    (tmp_path / "labels.yaml").write_text("names: [a, b]\n")
    split = {"images": "*.jpg", "masks": "{stem}_mask.png"}
    dm = SegmentationDataModule(root=str(tmp_path), splits={"train": split, "val": split}, labels="labels.yaml",
                                image_size=8, crop_size=8, batch_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dptune"):
        dm.setup("fit")
        dm.setup("fit")
    said = [r.getMessage() for r in caplog.records]
    assert sum("also in the train split" in m for m in said) == 1 and not any("beside" in m for m in said), said
