"""Depth end to end on real 7-Scenes frames: train.py fit, export, plain transformers / ONNX Runtime /
predict agreement, exact 2-process validation, a segmentation checkpoint as the start, bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs
from PIL import Image
from test_train import camvid_args, run_train

pytestmark = [pytest.mark.slow, needs(KITCHEN)]

TRAIN = {"images": "train/rgb/frame-0000[0-3]*.jpg", "depth": "train/depth/{stem}.png"}  # 20 frames
VAL = {"images": "val/rgb/frame-00060[0-9].jpg", "depth": "val/depth/{stem}.png"}  # 5 frames: odd
DEPTH_TINY = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}


def depth_args(run: Path, config: Path, epochs: int = 2, root: Path = KITCHEN, train=TRAIN, val=VAL) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "depth" / "7scenes.yaml"), "--data.root", str(root),
            "--model.config", str(config), "--data.splits", json.dumps({"train": train, "val": val}),
            "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("depth-run")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(DEPTH_TINY))
    run = tmp / "run"
    proc = run_train(depth_args(run, config), cwd=tmp)
    return {"tmp": tmp, "run": run, "config": config, "stderr": proc.stderr}


def test_fit_logs_depth_metrics_and_writes_checkpoints(depth_run):
    ckpts = sorted(p.name for p in (depth_run["run"] / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") and "absrel" in n for n in ckpts)
    ckpt = torch.load(depth_run["run"] / "checkpoints" / "last.ckpt", map_location="cpu")
    meta = ckpt["dptune"]
    assert meta["task"] == "depth" and meta["depth"]["mode"] == "metric" and meta["depth"]["units"] == "metres"
    val = meta["metrics"]["val"]
    assert val["images"] == 5 and 0 < val["abs_rel"] < 1 and 0 <= val["delta1"] <= 1
    runs = list((depth_run["run"] / "wandb").glob("offline-run-*"))
    assert list((runs[0] / "files" / "media" / "images" / "val").glob("depth_*.jpg")), "validation depth panels"


def test_export_loads_in_plain_transformers_and_onnx_and_predict_agree(depth_run, tmp_path):
    """pipeline("depth-estimation"), ONNX Runtime and scripts/predict.py give the same depth."""
    import onnxruntime as ort
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    from dptune.export import export
    from dptune.tools.predict import main as predict_main

    out = export(depth_run["run"] / "checkpoints" / "last.ckpt", tmp_path / "export", onnx=True)
    card = (out / "README.md").read_text()
    assert "metric** depth in **metres" in card and "AbsRel" in card
    model = AutoModelForDepthEstimation.from_pretrained(out).eval()
    assert type(model).__name__ == "DPTForDepthEstimation" and model.config.depth_units == "metres"
    pipe = pipeline("depth-estimation", model=str(out))
    frames = sorted((KITCHEN / "val" / "rgb").glob("frame-00060*.jpg"))[:2]
    assert predict_main(["--model", str(out), "--images", str(frames[0].parent / "frame-00060[02].jpg"),
                         "--out", str(tmp_path / "pred"),
                         "--intrinsics", str(KITCHEN / "camera-intrinsics.txt")]) == 0
    proc = AutoImageProcessor.from_pretrained(out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for f in frames:
        theirs = pipe(Image.open(f))["predicted_depth"].numpy()
        assert theirs.shape == (480, 640)
        ours = np.asarray(Image.open(tmp_path / "pred" / f"{f.stem}_depth.png")).astype(np.float64) / 1000
        assert np.abs(ours - np.clip(theirs, 0, None)).max() <= 0.0005 + 1e-6  # 16-bit millimetres: rounding only
        x = proc(images=Image.open(f), return_tensors="pt")["pixel_values"]
        onnx_depth = sess.run(["predicted_depth"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            torch_depth = model(pixel_values=x).predicted_depth.numpy()
        assert np.abs(onnx_depth - torch_depth).max() <= 1e-4 * np.abs(torch_depth).max()
        assert (tmp_path / "pred" / f"{f.stem}_depth_color.png").exists() and (tmp_path / "pred" / f"{f.stem}.ply").exists()
    # non-square input of another size: ONNX and dptune's forward agree (the stock ViT forward cannot do this)
    from dptune.models.depth import depth_forward

    x = torch.randn(1, 3, 64, 160)
    with torch.no_grad():
        ref = depth_forward(model, x).numpy()
    got = sess.run(["predicted_depth"], {"pixel_values": x.numpy()})[0]
    assert got.shape == ref.shape == (1, 64, 160)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_two_process_validation_equals_one(depth_run):
    """5 val frames, batch 2, 2 processes: shards of 3 and 2; the per-image averages agree to 1e-6."""
    ckpt = depth_run["run"] / "checkpoints" / "last.ckpt"
    common = ["validate", "--config", str(REPO / "configs" / "depth" / "7scenes.yaml"), "--data.root", str(KITCHEN),
              "--model.config", str(depth_run["config"]), "--data.splits", json.dumps({"val": VAL}),
              "--data.image_size", "64", "--data.val_batch_size", "2", "--trainer.logger", "false",
              "--trainer.precision", "32-true", "--ckpt_path", str(ckpt), "--trainer.accelerator", "cpu"]
    tmp = depth_run["tmp"]
    one = run_train([*common, "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp / "v1")], cwd=tmp)
    two = run_train([*common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--trainer.default_root_dir", str(tmp / "v2")], cwd=tmp)

    def metrics(stdout: str) -> dict[str, float]:
        return {key: float(next(ln for ln in stdout.splitlines() if f" {key} " in ln).split()[-2])
                for key in ("val/abs_rel", "val/rmse", "val/silog", "val/delta1", "val/loss")}

    a, b = metrics(one.stdout), metrics(two.stdout)
    for key in a:
        assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])



def test_the_validation_loss_averages_the_images_it_scores_only(depth_run):
    """A map with no valid depth counts in no loss and no metric (the datamodule says so): the loss
    of a frame and such a map, one per batch, is the frame's alone (it was averaged with a 0)."""
    import cv2

    root = depth_run["tmp"] / "unscored"
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    frame = sorted((KITCHEN / "val" / "rgb").glob("frame-00060*.jpg"))[0]
    depth = KITCHEN / "val" / "depth" / f"{frame.stem}.png"
    for name in ("a", "b"):
        (root / "rgb" / f"{name}.jpg").symlink_to(frame)
    (root / "depth" / "a.png").symlink_to(depth)
    cv2.imwrite(str(root / "depth" / "b.png"), np.zeros(cv2.imread(str(depth), cv2.IMREAD_UNCHANGED).shape, np.uint16))
    common = ["validate", "--config", str(REPO / "configs" / "depth" / "7scenes.yaml"), "--data.root", str(root),
              "--model.config", str(depth_run["config"]), "--data.image_size", "64", "--data.val_batch_size", "1",
              "--trainer.logger", "false", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
              "--ckpt_path", str(depth_run["run"] / "checkpoints" / "last.ckpt")]

    def loss(images: str, name: str) -> float:
        split = {"val": {"images": images, "depth": "depth/{stem}.png"}}
        proc = run_train([*common, "--data.splits", json.dumps(split), "--trainer.default_root_dir",
                          str(root / name)], cwd=root)
        return float(next(ln for ln in proc.stdout.splitlines() if " val/loss " in ln).split()[-2])

    both, alone = loss("rgb/*.jpg", "both"), loss("rgb/a.jpg", "alone")
    assert alone > 0 and abs(both - alone) < 1e-6 * alone, (both, alone)

@needs(CAMVID)
def test_a_segmentation_checkpoint_starts_a_depth_model_with_its_backbone_and_neck(tmp_path, tiny_config_path):
    from dptune.models.depth import build_depth_model
    from dptune.tasks.checkpoints import load_module

    run_train(camvid_args(tmp_path / "seg", tiny_config_path, epochs=1), cwd=tmp_path)
    ckpt = str(tmp_path / "seg" / "checkpoints" / "last.ckpt")
    seg = load_module(ckpt).model.state_dict()
    depth = build_depth_model(pretrained=ckpt).state_dict()
    carried = [k for k in seg if k.startswith(("dpt.", "neck."))]
    assert len(carried) > 50
    assert all(torch.equal(seg[k], depth[k]) for k in carried)
    assert not any(k.startswith("auxiliary_head") for k in depth)
    # and back: a depth model's backbone and neck start a segmentation model
    from dptune.models import build_model

    back = build_model(["a", "b"], pretrained=ckpt).state_dict()
    assert all(torch.equal(back[k], seg[k]) for k in carried)


def test_bad_depth_input_is_named_before_training(tmp_path):
    """Truncated PNG, 8-bit depth, a depth map of another size, a missing depth map: one line each,
    exit 2, no traceback, no checkpoint."""
    root = tmp_path / "kitchen"
    for sub in ("train/rgb", "train/depth", "val/rgb", "val/depth"):
        (root / sub).mkdir(parents=True)
    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:6]
    for f in frames:
        (root / "train" / "rgb" / f.name).symlink_to(f)
        (root / "train" / "depth" / f"{f.stem}.png").write_bytes((KITCHEN / "train" / "depth" / f"{f.stem}.png").read_bytes())
    for f in sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[:2]:
        (root / "val" / "rgb" / f.name).symlink_to(f)
        (root / "val" / "depth" / f"{f.stem}.png").symlink_to(KITCHEN / "val" / "depth" / f"{f.stem}.png")
    d = root / "train" / "depth"
    data = (d / f"{frames[0].stem}.png").read_bytes()
    (d / f"{frames[0].stem}.png").write_bytes(data[: len(data) // 2])
    depth = np.asarray(Image.open(d / f"{frames[1].stem}.png"))
    Image.fromarray((depth // 256).astype(np.uint8)).save(d / f"{frames[1].stem}.png")
    Image.fromarray(depth[:240, :320]).save(d / f"{frames[2].stem}.png")
    os.remove(d / f"{frames[3].stem}.png")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(DEPTH_TINY))
    all_frames = {"images": "train/rgb/*.jpg", "depth": "train/depth/{stem}.png"}
    val = {"images": "val/rgb/*.jpg", "depth": "val/depth/{stem}.png"}
    proc = run_train(depth_args(tmp_path / "run", config, root=root, train=all_frames, val=val), cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "frame-0000" in ln]
    assert len(lines) == 4, proc.stderr[-3000:]
    text = "\n".join(lines)
    assert "not a readable depth map" in text and "8-bit image" in text and "no depth map" in text
    assert "depth map is 320x240 but its image is 640x480" in text
    assert not (tmp_path / "run" / "checkpoints").exists()
    # or left out, counted, and the other two frames train
    args = depth_args(tmp_path / "run", config, epochs=1, root=root, train=all_frames, val=val)
    proc = run_train([*args, "--data.on_bad_sample", "skip", "--data.batch_size", "2", "--trainer.logger", "false"],
                     cwd=tmp_path)
    assert "skipped 4 bad sample(s) of 6" in proc.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 1


def test_evaluate_agrees_with_the_independent_scorer(depth_run, tmp_path, capsys):
    """scripts/evaluate.py on an export = scripts/score_depth_plain.py (plain transformers + numpy)."""
    import subprocess
    import sys

    from dptune.export import export
    from dptune.tools.evaluate import main as evaluate_main

    out = export(depth_run["run"] / "checkpoints" / "last.ckpt", tmp_path / "export")
    images, depth = str(KITCHEN / VAL["images"]), str(KITCHEN / "val" / "depth" / "{stem}.png")
    plain = subprocess.run([sys.executable, str(REPO / "scripts" / "score_depth_plain.py"), str(out), "--images", images,
                            "--depth", depth, "--depth-scale", "1000", "--max-depth", "10"],
                           capture_output=True, text=True, check=True)
    theirs = json.loads(plain.stdout.strip().splitlines()[-1])
    assert evaluate_main(["--model", str(out), "--images", images, "--depth", depth, "--json", str(tmp_path / "s.json")]) == 0
    ours = json.loads((tmp_path / "s.json").read_text())
    assert ours["images"] == theirs["images"] == 5
    for key in ("abs_rel", "rmse", "silog", "delta1"):
        assert abs(ours[key] - theirs[key]) < 1e-6, (key, ours[key], theirs[key])

    # without --min-depth the model's own min_depth applies (it was 0.001 m whatever the model said)
    meta = json.loads((out / "dptune.json").read_text())
    meta["depth"]["min_depth"] = 1.5
    (out / "dptune.json").write_text(json.dumps(meta))
    scores = {}
    for name, extra in (("model's", []), ("given", ["--min-depth", "1.5"]), ("low", ["--min-depth", "0.001"])):
        assert evaluate_main(["--model", str(out), "--images", images, "--depth", depth, *extra,
                              "--json", str(tmp_path / f"{name}.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["abs_rel"]
    assert scores["model's"] == scores["given"] != scores["low"], scores

    # a map with no measurement (all 0 or 65535) is not scored, and said with its name (it was left out silently)
    import shutil

    import cv2

    folder = tmp_path / "blank"
    (folder / "rgb").mkdir(parents=True)
    (folder / "depth").mkdir()
    frames = sorted((KITCHEN / "val" / "rgb").glob("frame-00060[0-9].jpg"))
    for f in frames:
        shutil.copy(f, folder / "rgb" / f.name)
        shutil.copy(KITCHEN / "val" / "depth" / f"{f.stem}.png", folder / "depth" / f"{f.stem}.png")
    blank = folder / "depth" / f"{frames[1].stem}.png"
    cv2.imwrite(str(blank), np.full_like(cv2.imread(str(blank), cv2.IMREAD_UNCHANGED), 65535))
    capsys.readouterr()
    assert evaluate_main(["--model", str(out), "--images", str(folder / "rgb" / "*.jpg"),
                          "--depth", str(folder / "depth" / "{stem}.png"), "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["images"] == 4
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "1 of 5 images" in warned[0] and frames[1].name in warned[0], warned

    # what fit refuses, evaluate refuses too, in one line: no scale, no range, nothing scored, not metres
    capsys.readouterr()
    for extra, message in ((["--depth-scale", "0"], "--depth-scale must be a positive number"),
                           (["--min-depth", "5", "--max-depth", "1"], "--max-depth must be above --min-depth"),
                           (["--min-depth", "20", "--max-depth", "30"], "nothing was scored"),
                           (["--depth-scale", "1"], "not plausible for metres")):
        assert evaluate_main(["--model", str(out), "--images", images, "--depth", depth, *extra]) == 2, extra
        said = capsys.readouterr().err
        err = [ln for ln in said.splitlines() if ln.startswith("error")]
        assert len(err) == 1 and message in err[0] and "Traceback" not in said, (extra, err)

    # one map in metres among millimetre maps: training names it as a bad map; evaluate scored it (AbsRel 270)
    odd = folder / "depth" / f"{frames[2].stem}.png"
    mm = cv2.imread(str(odd), cv2.IMREAD_UNCHANGED).astype(np.float64)
    cv2.imwrite(str(odd), np.round(mm / 1000).astype(np.uint16))
    assert evaluate_main(["--model", str(out), "--images", str(folder / "rgb" / "*.jpg"),
                          "--depth", str(folder / "depth" / "{stem}.png")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and odd.name in err[0] and "another unit" in err[0], err
    # a template that gives every image the same map pairs them all with it: refused before anything runs
    assert evaluate_main(["--model", str(out), "--images", images, "--depth", str(KITCHEN / "val" / "depth" /
                                                                                 "frame-000600.png")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "same depth file" in err[0] and "{stem}" in err[0], err


def test_a_validation_that_scores_no_depth_image_is_nan_and_never_the_best_checkpoint(tmp_path):
    """No ground truth inside [min_depth, max_depth]: nothing is scored, so the figures are NaN (they
    were 0.0, which won a mode: min checkpoint), a warning says so, and no best-*.ckpt is written."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(DEPTH_TINY))
    run = tmp_path / "run"
    # no pre-flight check (and no cache, which runs it): it would stop this run at start (next test)
    proc = run_train([*depth_args(run, config, epochs=1), "--trainer.logger", "false", "--data.check", "false", "--data.cache", "false",
                      "--model.min_depth", "0.0001", "--model.max_depth", "0.001"], cwd=tmp_path)
    meta = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["dptune"]
    assert meta["metrics"]["val"]["images"] == 0 and math.isnan(meta["metrics"]["val"]["abs_rel"])
    assert "no depth image had a valid pixel" in proc.stderr
    assert "val/abs_rel is NaN" in proc.stderr
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("best-")]


def test_data_wholly_outside_the_model_range_stops_before_training(tmp_path):
    """Training maps all beyond max_depth (here: 10 m with a 1 m model) would train on nothing with a
    zero loss; the run stops at start naming the split and the range. Some maps outside: a warning."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(DEPTH_TINY))
    proc = run_train([*depth_args(tmp_path / "run", config, epochs=1), "--trainer.logger", "false",
                      "--model.max_depth", "0.5"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "data.splits.train: no depth map has valid depth inside the model's range [0.001, 0.5] m" in proc.stderr
    bad = run_train([*depth_args(tmp_path / "bad", config, epochs=1), "--model.min_depth", "5",
                     "--model.max_depth", "1"], cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "model.max_depth must be above model.min_depth" in bad.stderr


def test_a_datamodule_with_its_own_prepare_data_still_gets_every_check(tmp_path):
    """The module's checks that read the data (the depth range) run before the W&B run only when the
    datamodule has checked its data by then; a datamodule whose own ``prepare_data`` (Lightning's
    place for downloads) does not call dptune's trained with max_depth 0.5 on 7-Scenes (median 1.9 m)."""
    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.errors import DataError
    from dptune.tasks.depth import DepthModule
    from dptune.training.hardware import DPTuneTrainer

    class Downloads(DepthDataModule):
        def prepare_data(self) -> None:
            pass  # a download, say; dptune's check is not called

    splits = {"train": {"images": "train/rgb/frame-00000[0-3].jpg", "depth": "train/depth/{stem}.png"},
              "val": {"images": "val/rgb/frame-00060[0-1].jpg", "depth": "val/depth/{stem}.png"}}
    dm = Downloads(root=str(KITCHEN), splits=splits, depth_scale=1000, image_size=64, batch_size=2, num_workers=0)
    (tmp_path / "tiny.json").write_text(json.dumps(DEPTH_TINY))
    model = DepthModule(config=str(tmp_path / "tiny.json"), image_size=64, mode="metric", max_depth=0.5, init_depth=0.3)
    trainer = DPTuneTrainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                            precision="32-true")
    with pytest.raises(DataError, match="inside the model's range"):
        trainer.fit(model, dm)


def test_evaluate_of_a_depth_model_averages_the_mirror_with_flip_and_refuses_what_it_cannot_use(depth_run, tmp_path,
                                                                                               capsys):
    """--flip, --mode slide and --scales were ignored by a depth model's evaluate: the scores were the
    plain image's whatever was asked. With --flip the score is the same on a mirrored copy of the
    data (the prediction averages an image and its mirror), which the plain prediction's is not."""
    import cv2

    from dptune.export import export
    from dptune.tools.evaluate import main as evaluate_main

    out = export(depth_run["run"] / "checkpoints" / "last.ckpt", tmp_path / "export")
    for folder, turn in (("plain", lambda a: a), ("mirrored", lambda a: np.ascontiguousarray(a[:, ::-1]))):
        (tmp_path / folder / "rgb").mkdir(parents=True)
        (tmp_path / folder / "depth").mkdir()
        for frame in sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[:3]:  # PNG: no JPEG re-encoding between the two
            cv2.imwrite(str(tmp_path / folder / "rgb" / f"{frame.stem}.png"), turn(cv2.imread(str(frame))))
            gt = cv2.imread(str(KITCHEN / "val" / "depth" / f"{frame.stem}.png"), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(tmp_path / folder / "depth" / f"{frame.stem}.png"), turn(gt))

    def abs_rel(folder: str, *extra: str) -> float:
        path = tmp_path / f"{folder}{'-'.join(extra)}.json"
        assert evaluate_main(["--model", str(out), "--images", str(tmp_path / folder / "rgb" / "*.png"), "--depth",
                              str(tmp_path / folder / "depth" / "{stem}.png"), *extra, "--json", str(path)]) == 0
        return json.loads(path.read_text())["abs_rel"]

    assert abs(abs_rel("plain", "--flip", "h") - abs_rel("mirrored", "--flip", "h")) < 1e-5
    assert abs(abs_rel("plain") - abs_rel("mirrored")) > 1e-4
    capsys.readouterr()
    for extra in (["--mode", "slide"], ["--scales", "0.5,1"]):
        assert evaluate_main(["--model", str(out), "--images", str(tmp_path / "plain" / "rgb" / "*.png"), "--depth",
                              str(tmp_path / "plain" / "depth" / "{stem}.png"), *extra]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert len(err) == 1 and err[0].startswith(f"error: {extra[0]} ") and "a depth model predicts" in err[0], err
    # --confusion was ignored too: nothing written, exit 0
    assert evaluate_main(["--model", str(out), "--images", str(tmp_path / "plain" / "rgb" / "*.png"), "--depth",
                          str(tmp_path / "plain" / "depth" / "{stem}.png"), "--confusion", str(tmp_path / "c.png")]) == 2
    assert "a depth model has no classes, so no confusion matrix" in capsys.readouterr().err
