"""Faults in label files and data that used to pass silently: a key given twice in a label file, a
class that no joint source labels, fewer validation images than processes, negative depth, NaN
camera intrinsics. Each ends in one line naming the file (or setting) and the problem."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, needs

from dptune.errors import ConfigError, DataError, DataErrors
from dptune.labels import LabelSet

CAMVID_TRAIN = {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}
KITCHEN_TRAIN = {"images": "train/rgb/frame-00000[0-2].jpg", "depth": "train/depth/{stem}.png"}


# ---------------------------------------------------------------------------------------- label files
@pytest.mark.parametrize("text, key, lines", [
    ("names: [a, b]\ncolors: [[0, 0, 0], [1, 1, 1]]\nnames: [c, d]\n", "key 'names'", (1, 3)),
    ("names: [Car, Road]\nmap:\n  12: Car\n  13: Road\n  12: Road\n", "key 12", (3, 5)),
    ("names: [Car, Road]\nmap: {12: Car, 12: Road}\n", "key 12", (2, 2)),
])
def test_a_key_given_twice_in_a_label_file_stops_naming_the_file_the_key_and_both_lines(tmp_path, text, key, lines):
    """YAML keeps the last of two equal keys; a label file whose second ``names:`` or ``map`` entry
    silently replaced the first trained on other classes than the user wrote."""
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        LabelSet.from_yaml(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and key in msg, msg
    assert f"lines {lines[0]} and {lines[1]}" in msg, msg


def test_merge_keys_and_distinct_keys_still_load(tmp_path):
    """What is not a duplicate keeps loading: a YAML merge key overridden on purpose, nested maps,
    and the shared example label files."""
    path = tmp_path / "labels.yaml"
    path.write_text("names: [Car, Road]\nmap:\n  <<: {12: Car, 13: Road}\n  12: Road\n  0: ignore\n")
    assert LabelSet.from_yaml(path).value_map == {12: 1, 13: 1, 0: 255, 255: 255}  # YAML's override rule
    for shared in (CAMVID / "labels.yaml", CAMVID.parent / "dubai-aerial" / "labels.yaml"):
        if shared.exists():
            assert LabelSet.from_yaml(shared).num_classes > 1


@pytest.mark.parametrize("spec, message", [
    ({"names": ["Car", "Road"], "map": {12: "Car", "12": "Road"}}, "mask value 12 is mapped twice"),
    ({"names": ["Car", "Road"], "mask_format": "rgb",
      "color_map": [[[1, 2, 3], "Car"], [[9, 9, 9], "Road"], [[1, 2, 3], "Road"]]}, "colour [1, 2, 3] is mapped twice"),
    ({"names": ["Car", "Road"], "mask_format": "rgb", "colors": [[1, 2, 3], [1, 2, 3]]},
     "classes 'Car' and 'Road' have the same colour [1, 2, 3]"),
])
def test_a_value_or_colour_mapped_twice_stops(spec, message):
    """The same rule one level down: ``12`` and ``"12"`` are one mask value, a colour listed twice in
    ``color_map`` is one colour; keeping the last one silently relabels those pixels."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LabelSet.from_dict(spec, source="labels.yaml")


# ---------------------------------------------------------------------------------------- joint labels
def _joint(labels=None, seg_labels="labels.yaml"):
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    return MultiTaskDataModule(
        segmentation={"root": str(CAMVID), "labels": seg_labels, "splits": {"train": CAMVID_TRAIN}},
        depth={"root": str(KITCHEN), "name": "kitchen", "splits": {"train": KITCHEN_TRAIN}},
        labels=labels, image_size=64, batch_size=2, num_workers=0)


@needs(CAMVID)
@needs(KITCHEN)
def test_a_joint_class_that_no_source_labels_stops_naming_it():
    """A class in the model's list that no source's labels can ever mark is only ever trained as
    "not this class": it can never be learned, and the exported model would still offer it."""
    names = LabelSet.from_yaml(CAMVID / "labels.yaml").names
    with pytest.raises(ConfigError) as err:
        _joint(labels=[*names, "Boat", "Tram"])
    msg = str(err.value)
    assert "\n" not in msg and "'Boat'" in msg and "'Tram'" in msg and "data.labels" in msg, msg
    # a source's label file that names a class but maps no mask value to it is the same case
    spec = {"names": ["Sky", "Road", "Car"], "map": {0: "Sky", 3: "Road", 8: "ignore"}}
    with pytest.raises(ConfigError, match="'Car'"):
        _joint(seg_labels=spec)


@needs(CAMVID)
@needs(KITCHEN)
def test_the_joint_class_list_is_logged_once_at_setup(caplog):
    dm = _joint()
    with caplog.at_level(logging.INFO, logger="dptune"):
        dm.setup("fit")
        dm.setup("fit")
    lines = [r.getMessage() for r in caplog.records if "model classes" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "0 Sky" in lines[0] and "10 Bicyclist" in lines[0] and "camvid" in lines[0], lines[0]


# ---------------------------------------------------------------------------------------- DDP, 1 val image
@pytest.mark.slow
@needs(CAMVID)
def test_fewer_validation_images_than_processes_stops_before_training(tmp_path, tiny_config_path):
    """Two gloo processes, one validation image: one process would score nothing, which Lightning
    answers with a crash on that rank and collective errors (or a hang) on the others. It stops
    before training in one line, saying how many images for how many processes."""
    from test_train import TRAIN

    args = ["fit", "--config", str(REPO / "configs" / "camvid.yaml"), "--data.root", str(CAMVID),
            "--model.config", str(tiny_config_path),
            "--data.splits", json.dumps({"train": TRAIN, "val": {"images": "val/0016E5_07991.jpg",
                                                                 "masks": "valannot/{stem}.png"}}),
            "--data.image_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the launched ranks too
        out, err = proc.communicate()
        pytest.fail(f"train.py hung with 1 validation image on 2 processes:\n{err[-3000:]}")
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors and "1 validation image" in errors[0] and "2 processes" in errors[0], err[-3000:]
    assert "data.splits.val" in errors[0], errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_the_process_count_check_counts_what_is_left_after_skipping():
    """The unit under the test above: a split that holds at least one sample per process passes; one
    with fewer stops; no trainer (or one process) never stops."""
    from types import SimpleNamespace

    from dptune.data.base import check_eval_shards

    two = SimpleNamespace(world_size=2)
    check_eval_shards("data", {"val": list(range(2))}, two)
    check_eval_shards("data", {"val": [0]}, None)
    check_eval_shards("data", {"val": [0], "train": [0]}, SimpleNamespace(world_size=1))
    check_eval_shards("data", {"train": [0]}, two)  # training shards are padded by the sampler
    with pytest.raises(DataError, match=r"data.splits.test: 1 test image\(s\) for 2 processes"):
        check_eval_shards("data", {"test": [0]}, two)


# ---------------------------------------------------------------------------------------- depth values
def _depth_folder(tmp_path: Path) -> Path:
    """Three real 7-Scenes frames as metres (.npy); the second's depth is 2 m with -1 on every 7th pixel."""
    from PIL import Image

    for sub in ("rgb", "depth"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    for k, f in enumerate(sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:3]):
        (tmp_path / "train" / "rgb" / f.name).symlink_to(f)
        depth = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png")).astype(np.float32) / 1000
        if k == 1:
            depth = np.where(np.arange(depth.size).reshape(depth.shape) % 7 == 0, -1.0, 2.0).astype(np.float32)
        np.save(tmp_path / "train" / "depth" / f"{f.stem}.npy", depth)
    return tmp_path


def test_negative_depth_is_reported_naming_the_file_and_count(tmp_path):
    from dptune.data.depth_files import read_depth

    np.save(tmp_path / "d.npy", np.array([[1.0, -0.5], [-2.0, np.nan]], np.float32))
    with pytest.raises(DataError) as err:
        read_depth(str(tmp_path / "d.npy"))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "d.npy") in msg and "2 negative" in msg, msg
    # an explicit setting reads them as "no measurement" (formats that mark missing depth with -1)
    got = read_depth(str(tmp_path / "d.npy"), negative="invalid")
    assert np.array_equal(got, np.array([[1.0, 0.0], [0.0, 0.0]], np.float32))


@needs(KITCHEN)
def test_a_depth_split_with_negative_values_stops_before_training_or_reads_them_as_invalid_when_told(
        tmp_path, caplog):
    from dptune.data.depth_datamodule import DepthDataModule

    root = _depth_folder(tmp_path)
    splits = {"train": {"images": "train/rgb/*.jpg", "depth": "train/depth/{stem}.npy"}}
    dm = DepthDataModule(root=str(root), image_size=64, num_workers=0, splits=splits)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    bad = sorted((root / "train" / "depth").glob("*.npy"))[1]
    assert str(bad) in msg and "negative" in msg, msg
    n = int(np.count_nonzero(np.load(bad) < 0))
    assert f"{n} negative" in msg, msg

    dm = DepthDataModule(root=str(root), image_size=64, num_workers=0, splits=splits, negative_depth="invalid")
    with caplog.at_level(logging.INFO, logger="dptune"):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 3
    assert any("negative_depth" in r.getMessage() for r in caplog.records)


def test_evaluate_scores_depth_with_negative_values_only_when_told(tmp_path, capsys):
    """A test set that marks missing depth with -1 (trained with data.negative_depth: invalid) must be
    scorable too: evaluate.py --negative-depth invalid; without it, one line naming the file."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    from dptune.tools.evaluate import main as evaluate

    root = _depth_folder(tmp_path / "data")
    torch.manual_seed(0)
    cfg = {k: v for k, v in json.loads((REPO / "configs" / "models" / "dpt-tiny.json").read_text()).items()
           if k not in ("use_auxiliary_head", "semantic_loss_ignore_index", "num_labels")}
    model = DPTForDepthEstimation(DPTConfig(**cfg)).eval()
    model.save_pretrained(tmp_path / "m")
    DPTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--root", str(root), "--images", "train/rgb/*.jpg",
            "--depth", "train/depth/{stem}.npy", "--device", "cpu"]
    assert evaluate(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "negative" in err[0] and "--negative-depth invalid" in err[0], err
    assert evaluate([*args, "--negative-depth", "invalid"]) == 0


# ---------------------------------------------------------------------------------------- intrinsics
@pytest.mark.parametrize("text, problem", [
    ("nan 0 320\n0 585 240\n0 0 1\n", "not finite"),
    ("585 0 320\n0 inf 240\n0 0 1\n", "not finite"),
    ("0 0 320\n0 585 240\n0 0 1\n", "focal length"),
    # a user attack: points at infinity (1e-40), a normalised matrix (0.5), a skew dropped without a word
    ("1e-40 0 320\n0 1e-40 240\n0 0 1\n", "in pixels, at least 1"),
    ("0.5 0 0.5\n0 0.6 0.5\n0 0 1\n", "normalised"),
    ("585 5 320\n0 585 240\n0 0 1\n", "is not a pinhole camera matrix"),
    ("", "0 values"),  # numpy's own warning was printed first
])
def test_bad_camera_intrinsics_stop_naming_the_file(tmp_path, text, problem, recwarn):
    from dptune.data.depth_files import read_intrinsics

    path = tmp_path / "camera-intrinsics.txt"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_intrinsics(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and problem in msg, msg
    assert not [w for w in recwarn if "loadtxt" in str(w.message)]
    with pytest.raises(DataError, match="not finite"):
        read_intrinsics("585,nan,320,240")
    with pytest.raises(DataError, match="at least 1"):
        read_intrinsics("1e-30,1e-30,320,240")


@needs(KITCHEN)
def test_real_camera_intrinsics_read():
    from dptune.data.depth_files import read_intrinsics

    assert read_intrinsics(str(KITCHEN / "camera-intrinsics.txt")) == (585.0, 585.0, 320.0, 240.0)
    assert read_intrinsics("585,585,320,240.5") == (585.0, 585.0, 320.0, 240.5)


def test_predict_intrinsics_with_nan_stop(tmp_path):
    from dptune.tools.depth import intrinsics

    path = tmp_path / "k.txt"
    path.write_text("nan 0 320\n0 585 240\n0 0 1\n")
    with pytest.raises(DataError, match="not finite"):
        intrinsics(str(path))


@pytest.mark.parametrize("text, expect", [
    ("585 0 0\n0 585 0\n320 240 1\n", "transposed"),      # K written column by column
    ("585 0 320\n0 585 240\n0 0 0\n", "not a pinhole camera matrix"),
])
def test_intrinsics_that_are_not_a_pinhole_matrix_are_refused(tmp_path, text, expect):
    from dptune.data.depth_files import read_intrinsics

    (tmp_path / "k.txt").write_text(text)
    with pytest.raises(DataError, match=expect):
        read_intrinsics(str(tmp_path / "k.txt"))
    with pytest.raises(DataError, match="no such file"):
        read_intrinsics(str(tmp_path / "missing.txt"))
    assert read_intrinsics("585,585,320,240") == (585.0, 585.0, 320.0, 240.0)


def test_a_split_mostly_beyond_max_depth_is_warned_about(caplog):
    """Depth x8 (median 15 m) against max_depth 10: most valid pixels count in nothing; say so."""
    from dptune.data.depth_values import check_depth_range

    stats = [(f"d{i}.png", 9.0, 15.0, 20.0) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="dptune"):
        check_depth_range("data.splits.train", stats, 0.001, 10.0)
    assert any("4 of 4 depth maps have most of their valid depth outside" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dptune"):
        check_depth_range("data.splits.train", [(f"d{i}.png", 1.0, 3.0, 9.0) for i in range(4)], 0.001, 10.0)
    assert not caplog.records


class _Raises(torch.utils.data.Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error


@pytest.mark.parametrize("error", [
    DataError("photos/a.jpg: truncated JPEG (no end-of-image marker)"),
    ConfigError("data.splits.train: no such transform 'flipp'"),
    DataErrors(["a.png: not an image", "b.png: truncated"], hint="fix or remove them"),
])
def test_an_error_from_a_loader_worker_keeps_its_own_message(error):
    """With ``--data.num_workers`` >= 1 a bad file read in a loader worker came to the command as the same
    class built from "Caught DataError in DataLoader worker process 0." and the worker's whole traceback,
    which was printed after ``error:`` (a review). The error keeps the message it was raised with."""
    loader = torch.utils.data.DataLoader(_Raises(error), num_workers=1)
    with pytest.raises(type(error)) as got:
        next(iter(loader))
    assert str(got.value) == str(error)
    assert "Traceback" not in str(got.value) and "worker" not in str(got.value)


@needs(CAMVID)
def test_an_image_that_is_a_dangling_link_is_a_bad_sample_not_dropped(tmp_path):
    """A training image that is a link whose target is gone was left out of the glob's files without a word
    (one batch fewer, a user attack); it is read, and named as a file that is not there."""
    from dptune.data.datamodule import SegmentationDataModule

    root = tmp_path / "data"
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True)
    for stem in ("0001TP_006690", "0001TP_006720"):
        (root / "train" / f"{stem}.jpg").write_bytes((CAMVID / "train" / f"{stem}.jpg").read_bytes())
        (root / "trainannot" / f"{stem}.png").write_bytes((CAMVID / "trainannot" / f"{stem}.png").read_bytes())
    (root / "labels.yaml").write_bytes((CAMVID / "labels.yaml").read_bytes())
    (root / "train" / "0001TP_006690.jpg").unlink()
    (root / "train" / "0001TP_006690.jpg").symlink_to(tmp_path / "gone.jpg")
    dm = SegmentationDataModule(root=str(root), labels="labels.yaml", image_size=64, num_workers=0,
                                splits={"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"}})
    with pytest.raises(DataError, match="0001TP_006690.jpg"):
        dm.setup("fit")
