"""End to end through the real entry points: train.py fit / validate, resume, export."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, REPO, needs, run_python

pytestmark = [pytest.mark.slow, needs(CAMVID)]

TRAIN = {"images": "train/0001TP_006[89]*.jpg", "masks": "trainannot/{stem}.png"}
VAL = {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}


def run_train(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = run_python(REPO / "train.py", args, cwd, env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def wandb_records(run: Path) -> list:
    """The ``Record`` protobufs of an offline W&B run, read from the run's ``.wandb`` file: a LevelDB-style
    log (7-byte W&B header, 32 KiB blocks of records with a 7-byte header: crc, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run.glob("*.wandb")).read_bytes()
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, size, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending, pos = pending + raw[pos + 7:pos + 7 + size], pos + 7 + size
        if kind in (1, 4):  # a whole record, or a record's last fragment
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            records.append(record)
    return records


def wandb_offline_config(run: Path) -> dict:
    """The run config an offline W&B run recorded (its last config record). Offline runs write no
    ``config.yaml``."""
    config = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "config":
            config = {item.key: json.loads(item.value_json) for item in record.config.update}
    return config


def wandb_exit_codes(run: Path) -> list[int]:
    """The exit codes an offline W&B run recorded (one ``exit`` record per finish)."""
    return [r.exit.exit_code for r in wandb_records(run) if r.WhichOneof("record_type") == "exit"]


def camvid_args(run: Path, config: Path, epochs: int, train=TRAIN, root: Path = CAMVID) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "camvid.yaml"),
        "--data.root", str(root), "--model.config", str(config),
        "--data.splits", json.dumps({"train": train, "val": VAL}),
        "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("camvid-run")
    config = tmp / "tiny.json"
    from conftest import TINY

    config.write_text(json.dumps(TINY))
    run = tmp / "run"
    proc = run_train([*camvid_args(run, config, epochs=2), "--progress.every", "0"], cwd=tmp)
    return {"tmp": tmp, "run": run, "config": config, "stderr": proc.stderr}


def test_fit_writes_checkpoints_and_offline_wandb_run(trained):
    ckpts = sorted(p.name for p in (trained["run"] / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts
    assert any(n.startswith("best-") for n in ckpts)
    runs = list((trained["run"] / "wandb").glob("offline-run-*"))
    assert runs, "expected an offline wandb run"
    media = runs[0] / "files" / "media"
    assert list((media / "images" / "val").glob("overlays_*.jpg")), "validation overlays"
    assert list((media / "table" / "val").glob("per_class_IoU_*.table.json")), "per-class IoU table"
    ckpt = torch.load(trained["run"] / "checkpoints" / "last.ckpt", map_location="cpu")
    # 7 frames, batch 2, last partial batch dropped: 3 steps per epoch; last.ckpt is the final
    # state even when val/mIoU did not improve in the last epoch
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6
    assert ckpt["dptune"]["model_config"]["id2label"][0] == "Sky"
    assert 0.0 <= ckpt["dptune"]["metrics"]["val"]["mIoU"] <= 1.0


def test_a_redirected_run_logs_progress_and_ends_naming_its_checkpoints_and_wandb_run(trained):
    """Output to a file (no terminal): progress as lines, and the end of the run says where things are."""
    err, run = trained["stderr"], trained["run"]
    steps = [ln for ln in err.splitlines() if "images/s" in ln]
    assert any("epoch 1/2 step 1/6" in ln for ln in steps) and any("epoch 2/2 step 6/6" in ln for ln in steps), steps
    assert all("train/loss" in ln and "elapsed" in ln for ln in steps)
    assert f"last checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in err
    assert f"best checkpoint: {run / 'checkpoints'}" in err
    wandb_run = next((run / "wandb").glob("offline-run-*"))
    assert f"upload it with: wandb sync {wandb_run}" in err
    # the W&B run keeps the whole resolved config (the model's own ``config`` setting must not replace it)
    resolved = wandb_offline_config(wandb_run)["resolved_config"]
    assert resolved["trainer"]["max_epochs"] == 2 and resolved["data"]["image_size"] == 64
    assert resolved["model"]["config"] == str(trained["config"])


def test_train_py_predict_is_not_offered_and_says_what_to_use(tmp_path):
    proc = run_train(["predict", "--config", str(REPO / "configs" / "camvid.yaml")], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "scripts/predict.py" in proc.stderr


def test_resume_from_last_continues_the_step_count(trained):
    run = trained["run"]
    last = run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu")
    run_train([*camvid_args(run, trained["config"], epochs=3), "--ckpt_path", str(last)], cwd=trained["tmp"])
    after = torch.load(last, map_location="cpu")
    assert after["global_step"] == before["global_step"] + 3
    assert after["epoch"] == 2
    # the LR schedule continued rather than restarting: the scheduler saw every step
    sched = after["lr_schedulers"][0]
    assert sched["last_epoch"] == after["global_step"]


def test_export_then_from_pretrained_gives_identical_logits(trained):
    from transformers import AutoImageProcessor, DPTForSemanticSegmentation

    from dptune.export import export_checkpoint
    from dptune.tasks.checkpoints import load_module

    out = export_checkpoint(trained["run"] / "checkpoints" / "last.ckpt", trained["tmp"] / "export")
    assert (out / "model.safetensors").exists()
    module = load_module(str(trained["run"] / "checkpoints" / "last.ckpt"))
    model = DPTForSemanticSegmentation.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label[3] == "Road"
    assert processor.size["height"] == 64 and processor.size["width"] == 64
    from PIL import Image

    frame = sorted((CAMVID / "val").glob("*.jpg"))[0]
    pixels = processor(images=Image.open(frame), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = model(pixel_values=pixels).logits
        ours, _ = module(torch.from_numpy(np.asarray(Image.open(frame).convert("RGB").resize((64, 64), Image.BICUBIC)))
                         .permute(2, 0, 1)[None])
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def test_validate_subcommand_reports_the_same_miou(trained):
    proc = run_train(["validate", "--config", str(REPO / "configs" / "camvid.yaml"),
                      "--data.root", str(CAMVID), "--model.config", str(trained["config"]),
                      "--data.splits", json.dumps({"val": VAL}), "--data.image_size", "64",
                      "--data.num_workers", "0", "--trainer.default_root_dir", str(trained["tmp"] / "v"),
                      "--trainer.logger", "false", "--trainer.precision", "32-true",
                      "--ckpt_path", str(trained["run"] / "checkpoints" / "last.ckpt")], cwd=trained["tmp"])
    ckpt = torch.load(trained["run"] / "checkpoints" / "last.ckpt", map_location="cpu")
    expected = ckpt["dptune"]["metrics"]["val"]["mIoU"]
    line = next(ln for ln in proc.stdout.splitlines() if "val/mIoU" in ln)
    assert abs(float(line.split()[-2]) - expected) < 1e-6, line


def test_unknown_mask_value_stops_before_training_with_one_line(tmp_path, tiny_config_path):
    root = tmp_path / "camvid"
    for sub in ("train", "trainannot", "val", "valannot"):
        (root / sub).mkdir(parents=True)
    (root / "labels.yaml").write_text((CAMVID / "labels.yaml").read_text())
    from PIL import Image

    for split in ("train", "val"):
        for f in sorted((CAMVID / split).glob("*.jpg"))[:3]:
            (root / split / f.name).symlink_to(f)
            mask = np.asarray(Image.open(CAMVID / f"{split}annot" / f"{f.stem}.png")).copy()
            if split == "train" and f == sorted((CAMVID / split).glob("*.jpg"))[1]:
                mask[0, 0] = 200
            Image.fromarray(mask).save(root / f"{split}annot" / f"{f.stem}.png")
    args = camvid_args(tmp_path / "run", tiny_config_path, epochs=1, root=root)
    args[args.index("--data.splits") + 1] = json.dumps({"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"},
                                                        "val": {"images": "val/*.jpg", "masks": "valannot/{stem}.png"}})
    proc = run_train(args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    bad = [ln for ln in proc.stderr.splitlines() if "[200]" in ln]
    assert len(bad) == 1 and "trainannot/" in bad[0] and bad[0].count("0001TP") == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def _planted_faults(tmp_path: Path) -> Path:
    """A copy of a few CamVid frames with the faults users bring (the originals stay untouched)."""
    import cv2
    from PIL import Image

    root = tmp_path / "faulty"
    for sub in ("train", "trainannot", "val", "valannot"):
        (root / sub).mkdir(parents=True)
    (root / "labels.yaml").write_text((CAMVID / "labels.yaml").read_text())
    frames = sorted((CAMVID / "train").glob("0001TP_006[89]*.jpg"))[:7]
    for f in frames:
        (root / "train" / f.name).write_bytes(f.read_bytes())
        (root / "trainannot" / f"{f.stem}.png").write_bytes((CAMVID / "trainannot" / f"{f.stem}.png").read_bytes())
    for f in sorted((CAMVID / "val").glob("0016E5_0799*.jpg")):
        (root / "val" / f.name).symlink_to(f)
        (root / "valannot" / f"{f.stem}.png").symlink_to(CAMVID / "valannot" / f"{f.stem}.png")
    names = [f.stem for f in frames]
    data = (root / "train" / f"{names[0]}.jpg").read_bytes()
    (root / "train" / f"{names[0]}.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    mask = np.asarray(Image.open(root / "trainannot" / f"{names[1]}.png"))
    Image.fromarray(mask[:300, :400]).save(root / "trainannot" / f"{names[1]}.png")  # wrong size
    (root / "trainannot" / f"{names[2]}.png").unlink()  # missing mask
    bad = mask.copy()
    bad[10, 10] = 200
    Image.fromarray(bad).save(root / "trainannot" / f"{names[3]}.png")  # unknown value
    grey = cv2.imread(str(root / "train" / f"{names[4]}.jpg"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(root / "train" / f"{names[4]}.jpg"), grey)  # grayscale JPEG: must work
    m16 = np.asarray(Image.open(root / "trainannot" / f"{names[5]}.png")).astype(np.uint16)
    cv2.imwrite(str(root / "trainannot" / f"{names[5]}.png"), m16)  # 16-bit mask: must work
    return root


def test_planted_faults_stop_before_training_or_are_skipped(tmp_path, tiny_config_path):
    root = _planted_faults(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    splits = json.dumps({"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"}, "val": VAL})
    args = camvid_args(tmp_path / "run", tiny_config_path, epochs=1, root=root)
    args[args.index("--data.splits") + 1] = splits
    proc = run_train(args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "0001TP" in ln]
    assert len(lines) == 4, proc.stderr[-3000:]
    text = "\n".join(lines)
    assert "truncated JPEG" in text and "no mask" in text and "[200]" in text and "but its image is 480x360" in text
    assert "4 bad sample(s)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

    proc = run_train([*args, "--data.on_bad_sample", "skip"], cwd=tmp_path)
    assert "skipped 4 bad sample(s) of 7" in proc.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["global_step"] == 1  # 3 good frames, batch 2
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing written over the input data


@pytest.mark.parametrize("sub, bad, said", [
    # found when the datamodule is set up
    ("fit", ["--data.splits.train.masks", "trainannot/{nope}.png"], "unknown placeholder {nope}"),
    # found when the model is set up
    ("fit", ["--data.image_size", "72", "--data.crop_size", "72"], "not a multiple of 16"),
    # a split the stage needs and the config lacks was found when its loader was asked for, after the run started
    ("fit", ["--data.splits", json.dumps({"train": TRAIN})], "no 'val' split"),
    # no sanity check: the fit loop asks for the loader at its first epoch all the same
    ("fit", ["--data.splits", json.dumps({"train": TRAIN}), "--trainer.num_sanity_val_steps", "0"], "no 'val' split"),
    ("test", [], "no 'test' split"),
])
def test_a_fit_refused_before_it_trains_leaves_no_run_behind(tmp_path, sub, bad, said):
    """Lightning creates every logger's run before the datamodule and the model are set up: a fit
    that bad data or a size the backbone cannot take stopped there still left an (empty) W&B run --
    a crashed run on the user's W&B page when online -- and the run's config.yaml. The W&B run now
    starts when something first logs to it, and config.yaml is written when the stage starts."""
    from conftest import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    proc = run_train([sub, *camvid_args(run, config, epochs=1)[1:], *bad], cwd=tmp_path, check=False)
    err = [ln for ln in proc.stderr.split("\n") if ln.startswith("error:")]  # a line of its own in a log file
    assert proc.returncode == 2 and len(err) == 1 and said in err[0], proc.stderr[-3000:]
    # no progress bar drawn into a file: a cleared one left the error after a carriage return
    assert "checking train data" not in proc.stderr, proc.stderr[-3000:]
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*")) if run.exists() else []
    assert left == [], left


def test_a_fit_with_validation_turned_off_needs_no_val_split(tmp_path):
    """A split the stage scores is refused up front only where Lightning would ask for its loader:
    a train-only fit with ``--trainer.limit_val_batches 0`` trains (it was refused for the missing
    val split it never reads)."""
    from conftest import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    args = [*camvid_args(tmp_path / "run", config, epochs=1), "--data.splits", json.dumps({"train": TRAIN}),
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    run_train(args, cwd=tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


TWICE = """
import json, sys
from dptune.cli import main
codes = [main(json.loads(a)) for a in sys.argv[1:]]
print("codes", codes)
"""


def test_commands_run_one_after_another_in_a_process_each_get_their_wandb_run(tmp_path, tiny_config_path):
    """A notebook calling ``dptune.cli.main`` twice: the second fit attached to the first fit's W&B run, which
    was never finished, and logged its metrics and pictures into the first run's folder (a review); a run that
    stopped on a bad image was marked as ended with exit code 0. Each command's run is its own and ends with
    the command's exit status."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CAMVID / "labels.yaml", data)
    for split, stems in (("train", ["0001TP_006690", "0001TP_006720"]), ("val", ["0016E5_07959", "0016E5_07961"])):
        (data / split).mkdir()
        (data / f"{split}annot").mkdir()
        for stem in stems:
            shutil.copy(CAMVID / split / f"{stem}.jpg", data / split)
            shutil.copy(CAMVID / f"{split}annot" / f"{stem}.png", data / f"{split}annot")
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    jpg = bad / "train" / "0001TP_006720.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])  # truncated: found when a loader reads it, mid-epoch
    splits = {"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}.png"},
              "val": {"images": "val/*.jpg", "masks": "valannot/{stem}.png"}}

    def args(root: Path, run: Path) -> str:
        got = camvid_args(run, tiny_config_path, epochs=1, train=splits["train"], root=root)
        got[got.index("--data.splits") + 1] = json.dumps(splits)
        return json.dumps([*got, "--data.check", "false", "--data.cache", "false"])

    script = tmp_path / "twice.py"
    script.write_text(TWICE)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), args(data, tmp_path / "a"), args(data, tmp_path / "b"),
                           args(bad, tmp_path / "c")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "codes [0, 0, 2]" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-3000:])
    runs = {name: list((tmp_path / name / "wandb").glob("offline-run-*")) for name in "abc"}
    assert all(len(found) == 1 for found in runs.values()), runs
    assert len({found[0].name for found in runs.values()}) == 3
    assert wandb_exit_codes(runs["a"][0]) == [0] and wandb_exit_codes(runs["b"][0]) == [0]
    assert wandb_exit_codes(runs["c"][0]) == [2]
