"""Two CPU processes (gloo DDP): one log, one set of checkpoints, exact validation metrics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAMVID, REPO, needs
from test_train import VAL, camvid_args, run_train

pytestmark = [pytest.mark.slow, needs(CAMVID)]


def _val_metrics(stdout: str) -> dict[str, float]:
    out = {}
    for key in ("val/mIoU", "val/pixel_acc", "val/mAcc", "val/loss"):
        line = next(ln for ln in stdout.splitlines() if f" {key} " in ln)
        out[key] = float(line.split()[-2])
    return out


def test_ddp_fit_logs_once_and_validation_is_exact(tmp_path, tiny_config_path):
    run = tmp_path / "run"
    args = camvid_args(run, tiny_config_path, epochs=1)
    proc = run_train([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp"], cwd=tmp_path)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # rank 0 only
    assert len([p for p in (run / "checkpoints").iterdir() if p.name.startswith("best-")]) == 1
    assert proc.stderr.count("val: mIoU") + proc.stdout.count("val: mIoU") == 1
    # said once a run, not by each process; no advice to average values that are summed exactly (a user attack)
    assert proc.stderr.count("normalisation: mean") == 1 and "sync_dist=True" not in proc.stderr
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu")
    assert saved["global_step"] == 2  # 7 frames / (2 x 2), rounded down
    assert saved["dptune"]["metrics"]["val"]["images"] == 5  # shards of 3 and 2, summed

    # 5 val frames, batch 2, 2 processes: shards of 3 and 2, nothing repeated
    common = ["validate", "--config", str(REPO / "configs" / "camvid.yaml"), "--data.root", str(CAMVID),
              "--model.config", str(tiny_config_path), "--data.splits", json.dumps({"val": VAL}),
              "--data.image_size", "64", "--data.val_batch_size", "2", "--trainer.logger", "false",
              "--trainer.precision", "32-true", "--ckpt_path", str(ckpt)]
    single = run_train([*common, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                        "--trainer.default_root_dir", str(tmp_path / "v1")], cwd=tmp_path)
    double = run_train([*common, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                        "--trainer.default_root_dir", str(tmp_path / "v2")], cwd=tmp_path)
    # the loss is the split's mean over labelled pixels: the same whatever the batches and processes
    # (Lightning's own mean across processes divided by an integer count: 1.25x here)
    batch1 = run_train([*common, "--data.val_batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                        "--trainer.default_root_dir", str(tmp_path / "v3")], cwd=tmp_path)
    one, two, three = _val_metrics(single.stdout), _val_metrics(double.stdout), _val_metrics(batch1.stdout)
    for key in one:
        assert abs(one[key] - two[key]) < 1e-6, (key, one[key], two[key])
        assert abs(one[key] - three[key]) < 1e-5 * max(1.0, abs(one[key])), (key, one[key], three[key])


def test_two_processes_with_fewer_images_each_than_a_batch_train_on_a_partial_one(tmp_path, tiny_config_path):
    """4 training images, batch 3: one process trains one batch of 3; two processes (2 images each)
    dropped their only, partial batch, trained on nothing and stopped with "the training data is a
    stream (no length)" (a user attack): the partial batch was dropped by the split's size, not the
    process's share."""
    run = tmp_path / "run"
    train = {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}  # 4 frames
    args = camvid_args(run, tiny_config_path, epochs=1, train=train)
    proc = run_train([*args, "--data.batch_size", "3", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp", "--trainer.logger", "false"], cwd=tmp_path)
    assert "stream" not in proc.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 1


def test_trainer_sync_batchnorm_in_a_cpu_run_of_two_processes_is_one_line(tmp_path, tiny_config_path):
    """PyTorch's "SyncBatchNorm layers only work with GPU modules" ended a 2-process CPU fit in a
    traceback from each process at its first step (a user attack)."""
    args = camvid_args(tmp_path / "run", tiny_config_path, epochs=1)
    proc = run_train([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.sync_batchnorm", "true", "--trainer.logger", "false"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer.sync_batchnorm true: PyTorch syncs BatchNorm on GPUs only" in errors[0]


def _linked_subset(root):
    """A small CamVid folder of links: 4 training frames, 5 validation frames (files may be replaced)."""
    for sub in ("train", "trainannot", "val", "valannot"):
        (root / sub).mkdir(parents=True)
        for f in sorted((CAMVID / sub).glob("0001TP_0069*" if sub.startswith("train") else "0016E5_0799*")):
            (root / sub / f.name).symlink_to(f)
    (root / "labels.yaml").symlink_to(CAMVID / "labels.yaml")
    return root


def test_an_image_that_fails_in_one_process_mid_run_is_one_line_in_each_and_exit_2(tmp_path, tiny_config_path):
    """A validation image whose header reads but whose body does not (--data.check header), read by the
    second process: that process said the file in one line, the first dumped gloo's "Connection closed
    by peer" traceback and the run exited 1 (a user attack). Each process says one line; exit 2."""
    import io

    import numpy as np
    from PIL import Image

    root = _linked_subset(tmp_path / "data")
    bad = root / "val" / "0016E5_07997.jpg"  # the second process's second image (every other one is its)
    bad.unlink()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(CAMVID / "val" / bad.name))).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # the pixels, not the header
    bad.write_bytes(bytes(data))
    run = tmp_path / "run"
    args = camvid_args(run, tiny_config_path, epochs=1, root=root)
    proc = run_train([*args, "--data.check", "header", "--data.cache", "false", "--trainer.accelerator", "cpu",
                      "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger", "false"],
                     cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert any(str(bad) in ln for ln in errors), errors


def test_a_bad_file_every_process_finds_before_training_is_said_once(tmp_path, tiny_config_path):
    """Every process of a run checks the data before training; each printed the same error line, so a
    2-process run said each bad file twice. The line is said once; both processes exit 2."""
    root = _linked_subset(tmp_path / "data")
    bad = sorted((root / "trainannot").iterdir())[0]
    bad.unlink()
    bad.write_bytes(b"not a png")
    args = camvid_args(tmp_path / "run", tiny_config_path, epochs=1, root=root)
    proc = run_train([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.logger", "false"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], proc.stderr[-3000:]
    assert proc.stderr.count("bad sample(s) found before training") == 1, proc.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_strategies_that_start_processes_from_the_launcher_are_one_line(tmp_path, tiny_config_path, strategy):
    """``ddp_spawn`` ended in a KeyError from jsonargparse in each spawned process; made to train, it still
    lost a SIGTERM's checkpoint (the launcher died, ddp saves and exits 0), said after a Ctrl-C that no
    checkpoint had been written when one had, and lost the data's log lines (a review). The command line
    runs its processes with ddp and says so in one line, before any process starts or any file is written."""
    run = tmp_path / "run"
    args = camvid_args(run, tiny_config_path, epochs=1)
    proc = run_train([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                      "--trainer.strategy", strategy], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer.strategy" in errors[0] and "--trainer.strategy ddp" in errors[0], errors
    assert not run.exists() or not any(run.rglob("*.ckpt")), sorted(run.rglob("*"))
    assert not (tmp_path / "wandb").exists()


SPAWNED_VALIDATION = """
import sys
sys.path.insert(0, {tests!r})
from conftest import TINY
from dptune.data.datamodule import SegmentationDataModule
from dptune.tasks.segmentation import SegmentationModule
from dptune.training.hardware import DPTuneTrainer

class Counted(SegmentationModule):
    def on_validation_epoch_end(self):
        print(f"rank {{self.global_rank}} images {{int(self.val_confmat.images)}}", flush=True)
        return super().on_validation_epoch_end()

if __name__ == "__main__":
    dm = SegmentationDataModule(source="synthetic", splits={{"val": {{"count": 5, "seed": 1, "size": [64, 64]}}}},
                                image_size=64, num_workers=0, val_batch_size=2)
    m = Counted(config=TINY, label_spec=dm.labels_spec, image_size=64)
    trainer = DPTuneTrainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, precision="32-true",
                            enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(m, dm)
"""


def test_a_spawned_validation_counts_each_process_own_images(tmp_path):
    """Through the Python API (the command line refuses ddp_spawn), 5 validation images on 2 spawned processes:
    each process counted 5, its shard of 3 or 2 and the other's, because torch.multiprocessing had moved the
    metrics' state tensors into memory both processes added into (a review). Each counts its own shard."""
    import subprocess
    import sys

    script = tmp_path / "spawned_validation.py"
    script.write_text(SPAWNED_VALIDATION.format(tests=str(REPO / "tests")))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = sorted(int(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("rank "))
    assert counts == [2, 3], out.stdout
