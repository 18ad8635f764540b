"""scripts/predict.py on a segmentation + depth model: every option does what it does on the
single-task paths (point clouds, confidence, sliding windows, flips and scales), or is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, KITCHEN, TINY, needs
from PIL import Image

from dptune.tools.predict import main as predict_main

pytestmark = needs(KITCHEN)
FRAME = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0] if KITCHEN.is_dir() else Path("missing.jpg")
INTRINSICS = str(KITCHEN / "camera-intrinsics.txt")


def save_joint_export(out: Path, names: list[str], vary_depth: bool = True) -> Path:
    """A tiny segmentation + depth export in ``out``: ``segmentation/`` and ``depth/``, each a stock
    transformers directory, backbones identical (seed 0). ``vary_depth``: a fresh depth head predicts
    one depth everywhere; its last conv is drawn anew so that a mirrored view tells."""
    from transformers import DPTImageProcessorPil

    from dptune.models import build_model
    from dptune.models.depth import build_depth_model
    from dptune.models.joint import JointDPT

    depth_cfg = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    torch.manual_seed(0)
    joint = JointDPT(build_model(names, config=dict(TINY)), build_depth_model(config=depth_cfg)).eval()
    if vary_depth:
        with torch.no_grad():
            joint.depth.head.head[-2].weight.normal_(0, 0.02)
    proc = DPTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name, model in (("segmentation", joint.seg), ("depth", joint.depth)):
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out / name)
        proc.save_pretrained(out / name)
    return out


@pytest.fixture(scope="module")
def joint_export(tmp_path_factory) -> Path:
    """A tiny segmentation + depth export: ``segmentation/`` and ``depth/``, backbones identical."""
    return save_joint_export(tmp_path_factory.mktemp("joint"), ["a", "b", "c"])


def predict(model: Path, out: Path, *extra: str) -> int:
    return predict_main(["--model", str(model), "--images", str(FRAME), "--out", str(out), *extra])


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64)


def read_ply(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    return np.frombuffer(data[end:], dtype=dtype)


def test_joint_intrinsics_write_the_point_cloud_of_the_depth_path(joint_export, tmp_path):
    assert predict(joint_export, tmp_path / "joint", "--intrinsics", INTRINSICS) == 0
    assert predict(joint_export / "depth", tmp_path / "depth", "--intrinsics", INTRINSICS) == 0
    joint, alone = read_ply(tmp_path / "joint" / f"{FRAME.stem}.ply"), read_ply(tmp_path / "depth" / f"{FRAME.stem}.ply")
    assert len(joint) == len(alone) > 0
    for axis in "xyz":
        assert np.allclose(joint[axis], alone[axis], atol=1e-4)
    assert np.array_equal(joint["red"], alone["red"])


def test_joint_confidence_is_the_segmentation_paths(joint_export, tmp_path):
    assert predict(joint_export, tmp_path / "joint", "--confidence") == 0
    assert predict(joint_export / "segmentation", tmp_path / "seg", "--confidence") == 0
    name = f"{FRAME.stem}_confidence.png"
    assert np.abs(read_png(tmp_path / "joint" / name) - read_png(tmp_path / "seg" / name)).max() <= 1


def test_joint_slide_flip_scales_masks_as_the_segmentation_path_depth_mirrored(joint_export, tmp_path, capsys):
    tta = ["--mode", "slide", "--flip", "--scales", "1,0.75"]
    assert predict(joint_export, tmp_path / "joint", *tta) == 0
    said = capsys.readouterr()
    assert "whole image" in said.out + said.err  # says what depth does with these options
    assert predict(joint_export / "segmentation", tmp_path / "seg", *tta) == 0
    assert predict(joint_export, tmp_path / "plain") == 0
    mask = read_png(tmp_path / "joint" / f"{FRAME.stem}.png")
    assert np.array_equal(mask, read_png(tmp_path / "seg" / f"{FRAME.stem}.png"))
    assert not np.array_equal(mask, read_png(tmp_path / "plain" / f"{FRAME.stem}.png"))  # not ignored

    from dptune.inference.depth_predictor import DepthPredictor

    image = np.asarray(Image.open(FRAME).convert("RGB"))
    dp = DepthPredictor.load(str(joint_export / "depth"))
    mirrored = (dp.predict(image) + dp.predict(np.ascontiguousarray(image[:, ::-1]))[:, ::-1]) / 2
    # no max_depth in this hand-made export: float32 metres in a TIFF, as depth_format.json says
    from dptune.data.depth_files import read_depth

    spec = __import__("json").loads((tmp_path / "joint" / "depth_format.json").read_text())
    depth = read_depth(str(tmp_path / "joint" / spec["file"].replace("<stem>", FRAME.stem)))
    assert spec["dtype"] == "float32" and np.abs(depth - np.clip(mirrored, 0, None)).max() <= 1e-5


def test_depth_only_flip_mirrors_and_segmentation_options_are_refused(joint_export, tmp_path, capsys):
    """The depth path ignored --flip, --mode slide, --scales and --confidence without a word."""
    assert predict(joint_export / "depth", tmp_path / "flip", "--flip") == 0
    assert predict(joint_export, tmp_path / "joint", "--flip") == 0
    name = f"{FRAME.stem}_depth.tiff"  # no max_depth in this export: float32 metres
    assert np.abs(read_png(tmp_path / "flip" / name) - read_png(tmp_path / "joint" / name)).max() <= 1e-5
    assert predict(joint_export / "depth", tmp_path / "plain") == 0
    assert not np.array_equal(read_png(tmp_path / "flip" / name), read_png(tmp_path / "plain" / name))
    capsys.readouterr()
    for extra in (["--mode", "slide"], ["--scales", "1,1.5"], ["--confidence"]):
        assert predict(joint_export / "depth", tmp_path / "refused", *extra) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert len(err) == 1 and extra[0] in err[0], err


def test_joint_checkpoint_point_cloud_and_confidence_from_one_pass_equal_each_predictor(tmp_path):
    """A multitask .ckpt: one backbone pass gives each predictor's masks, confidence and depth."""
    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tools.depth import intrinsics

    torch.manual_seed(0)
    module = MultiTaskModule(config=dict(TINY), label_spec={"names": ["a", "b", "c"]}, image_size=64)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # what the trainer's checkpoint holds for dptune
    torch.save(ckpt, tmp_path / "joint.ckpt")
    assert predict(tmp_path / "joint.ckpt", tmp_path / "p", "--intrinsics", INTRINSICS, "--confidence") == 0
    image = np.asarray(Image.open(FRAME).convert("RGB"))
    mask, conf = Predictor.load(str(tmp_path / "joint.ckpt")).predict(image)
    assert np.array_equal(read_png(tmp_path / "p" / f"{FRAME.stem}.png"), mask)
    assert np.abs(read_png(tmp_path / "p" / f"{FRAME.stem}_confidence.png") - np.round(conf * 255)).max() <= 1
    depth = np.clip(DepthPredictor.load(str(tmp_path / "joint.ckpt")).predict(image), 0, None)
    cloud = read_ply(tmp_path / "p" / f"{FRAME.stem}.ply")
    assert len(cloud) == int((depth > 0).sum()) and np.allclose(np.sort(cloud["z"]), np.sort(depth[depth > 0]), atol=1e-4)
    fx, _, cx, _ = intrinsics(INTRINSICS)
    v, u = np.nonzero(depth > 0)
    assert np.allclose(cloud["x"], (u - cx) * depth[v, u] / fx, atol=1e-4)


# ============================================================================ evaluate with a config
def small_joint_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(joint config, CamVid-like data root, kitchen-like data root): two val images per task, the
    settings written as configs/multitask/camvid-7scenes.yaml writes them."""
    import shutil

    import yaml

    seg_root, depth_root = tmp_path / "streets", tmp_path / "kitchen"
    (seg_root / "val").mkdir(parents=True)
    (seg_root / "valannot").mkdir()
    (depth_root / "val" / "rgb").mkdir(parents=True)
    (depth_root / "val" / "depth").mkdir()
    shutil.copy(CAMVID / "labels.yaml", seg_root / "labels.yaml")
    for f in sorted((CAMVID / "val").glob("*.jpg"))[:2]:
        shutil.copy(f, seg_root / "val" / f.name)
        shutil.copy(CAMVID / "valannot" / f"{f.stem}.png", seg_root / "valannot" / f"{f.stem}.png")
    for f in sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[:2]:
        shutil.copy(f, depth_root / "val" / "rgb" / f.name)
        shutil.copy(KITCHEN / "val" / "depth" / f"{f.stem}.png", depth_root / "val" / "depth" / f"{f.stem}.png")
    config = tmp_path / "joint.yaml"
    config.write_text(yaml.safe_dump({"task": "multitask", "data": {
        "image_size": 64,
        "segmentation": {"root": str(seg_root), "labels": "labels.yaml", "cache": True,
                         "splits": {"val": {"images": "val/*.jpg", "masks": "valannot/{stem}.png"}}},
        "depth": {"root": str(depth_root), "depth_scale": 1000,
                  "splits": {"val": {"images": "val/rgb/*.jpg", "depth": "val/depth/{stem}.png"}}}}}))
    return config, seg_root, depth_root


@pytest.fixture(scope="module")
def camvid_joint_export(tmp_path_factory) -> Path:
    """A tiny segmentation + depth export whose classes are CamVid's."""
    import yaml

    names = yaml.safe_load((CAMVID / "labels.yaml").read_text())["names"]
    return save_joint_export(tmp_path_factory.mktemp("camvid-joint"), names, vary_depth=False)


def score_lines(text: str) -> tuple[list[str], list[str]]:
    lines = text.splitlines()
    return [ln for ln in lines if ln.startswith("mIoU ")], [ln for ln in lines if ln.startswith("abs_rel ")]


@needs(CAMVID)
def test_evaluate_a_joint_model_with_its_joint_config_scores_each_task_on_its_own_split(camvid_joint_export,
                                                                                       tmp_path, capsys):
    """``evaluate --model OUT --config <joint config>`` stopped with a TypeError (the segmentation
    datamodule given the joint data section); each part is now scored on its own source's split,
    the same figures as scoring that part alone with the flags the config stands for."""
    from dptune.tools.evaluate import main as evaluate_main

    config, seg_root, depth_root = small_joint_config(tmp_path)
    assert evaluate_main(["--model", str(camvid_joint_export), "--config", str(config), "--split", "val",
                          "--device", "cpu"]) == 0
    seg, depth = score_lines(capsys.readouterr().out)
    assert len(seg) == 1 and len(depth) == 1 and "(2 images" in seg[0]
    assert evaluate_main(["--model", str(camvid_joint_export / "segmentation"), "--root", str(seg_root),
                          "--images", "val/*.jpg", "--masks", "valannot/{stem}.png", "--labels", "labels.yaml",
                          "--device", "cpu"]) == 0
    assert score_lines(capsys.readouterr().out)[0] == seg
    assert evaluate_main(["--model", str(camvid_joint_export / "depth"), "--root", str(depth_root),
                          "--images", "val/rgb/*.jpg", "--depth", "val/depth/{stem}.png", "--depth-scale", "1000",
                          "--device", "cpu"]) == 0
    assert score_lines(capsys.readouterr().out)[1] == depth
    # one part of the joint model, or an exported part, with the joint config: that part's section
    assert evaluate_main(["--model", str(camvid_joint_export), "--config", str(config), "--part", "depth",
                          "--device", "cpu"]) == 0
    assert score_lines(capsys.readouterr().out) == ([], depth)
    assert evaluate_main(["--model", str(camvid_joint_export / "segmentation"), "--config", str(config),
                          "--device", "cpu"]) == 0
    assert score_lines(capsys.readouterr().out) == (seg, [])


@needs(CAMVID)
def test_evaluate_with_a_config_of_another_task_is_one_line(camvid_joint_export, tmp_path, capsys):
    """A segmentation export with a depth config stopped with ``TypeError ... depth_scale``."""
    import yaml

    from dptune.tools.evaluate import main as evaluate_main

    depth_config = tmp_path / "depth.yaml"
    depth_config.write_text(yaml.safe_dump({"task": "depth", "data": {"root": str(KITCHEN), "depth_scale": 1000,
                            "splits": {"val": {"images": "val/rgb/*.jpg", "depth": "val/depth/{stem}.png"}}}}))
    seg_config = tmp_path / "seg.yaml"
    seg_config.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "labels": "labels.yaml",
                          "splits": {"val": {"images": "*.jpg", "masks": "{stem}.png"}}}}))
    for model, config, words in ((camvid_joint_export / "segmentation", depth_config, "depth"),
                                 (camvid_joint_export / "depth", seg_config, "segmentation")):
        rc = evaluate_main(["--model", str(model), "--config", str(config), "--device", "cpu"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --config {config}: a {words} config"), err
        assert "Traceback" not in err[0]


@needs(CAMVID)
def test_evaluate_of_both_parts_checks_its_outputs_before_scoring_either(camvid_joint_export, tmp_path, capsys):
    """A joint config scoring both parts with --confusion x.txt refused the segmentation part in one
    line and then scored the depth part anyway (a review): the outputs are checked before either part
    runs. A --confusion PNG is the segmentation part's (a depth part has no confusion matrix)."""
    from dptune.tools.evaluate import main as evaluate_main

    config, _, _ = small_joint_config(tmp_path)
    base = ["--model", str(camvid_joint_export), "--config", str(config), "--split", "val", "--device", "cpu"]
    assert evaluate_main([*base, "--confusion", str(tmp_path / "c.txt")]) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --confusion") and ".png" in err[0], err
    assert score_lines(captured.out) == ([], []) and not (tmp_path / "c.txt").exists()
    assert evaluate_main([*base, "--confusion", str(tmp_path / "c.png")]) == 0, capsys.readouterr().err
    seg, depth = score_lines(capsys.readouterr().out)
    assert len(seg) == 1 and len(depth) == 1 and (tmp_path / "c.png").stat().st_size > 0
    # a picture of the user's, and an input mask: refused, nothing scored (a review saw depth scored after them)
    (tmp_path / "mine.png").write_bytes((tmp_path / "c.png").read_bytes()[:100] + b"x")
    mask = next((tmp_path / "streets" / "valannot").glob("*.png"))
    for target, said in ((tmp_path / "mine.png", "not written by evaluate"), (mask, "")):
        before = target.read_bytes()
        assert evaluate_main([*base, "--confusion", str(target)]) == 2
        captured = capsys.readouterr()
        err = [ln for ln in captured.err.splitlines() if ln.startswith("error")]
        assert len(err) == 1 and said in err[0] and score_lines(captured.out) == ([], []), (err, captured.out)
        assert target.read_bytes() == before


def test_a_depth_map_with_no_depth_anywhere_or_a_camera_of_another_size_is_said(joint_export, tmp_path, capsys):
    """A model that predicts no depth (all 0) wrote an all-no-depth map and an empty point cloud, exit 0,
    without a word (a user attack)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dead = shutil.copytree(joint_export / "depth", tmp_path / "dead")
    weights = load_file(dead / "model.safetensors")
    weights["head.head.4.weight"] = torch.zeros_like(weights["head.head.4.weight"])
    weights["head.head.4.bias"] = torch.full_like(weights["head.head.4.bias"], -1e4)  # then the head's ReLU: 0
    save_file(weights, dead / "model.safetensors", metadata={"format": "pt"})
    assert predict(dead, tmp_path / "out", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "warning: 1 depth map(s) have no depth above 0 anywhere" in err and str(FRAME) in err, err
    assert predict(joint_export / "depth", tmp_path / "live", "--device", "cpu") == 0
    assert "no depth above 0" not in capsys.readouterr().err
    # intrinsics of another image size (principal point outside this one): the clouds would be skewed, said
    h, w = np.asarray(Image.open(FRAME)).shape[:2]
    for model in (joint_export, joint_export / "depth"):
        assert predict(model, tmp_path / f"k{len(model.name)}", "--device", "cpu", "--intrinsics",
                       f"585,585,{w + 50},{h / 2}") == 0
        err = capsys.readouterr().err
        assert "warning: 1 image(s) do not hold the --intrinsics' principal point" in err and str(FRAME) in err, err
    assert predict(joint_export / "depth", tmp_path / "kin", "--device", "cpu", "--intrinsics",
                   f"585,585,{w / 2},{h / 2}") == 0
    assert "principal point" not in capsys.readouterr().err


def test_outputs_of_an_earlier_run_that_this_run_does_not_write_are_said(joint_export, tmp_path, capsys):
    """A rerun without --intrinsics into the same --out replaced the maps and left the earlier run's point
    cloud beside them, with no note (a user attack)."""
    out = tmp_path / "out"
    assert predict(joint_export / "depth", out, "--device", "cpu", "--intrinsics", "585,585,240,180") == 0
    cloud = out / f"{FRAME.stem}.ply"
    assert cloud.exists()
    capsys.readouterr()
    assert predict(joint_export / "depth", out, "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "note: 1 file(s) an earlier predict wrote for these images stay as they were" in err and str(cloud) in err
    assert cloud.exists()  # the user's to keep or remove


def test_a_foreign_depth_format_file_in_out_is_refused_before_anything_is_written(joint_export, tmp_path, capsys):
    """predict wrote its dptune-predict.json into the user's folder, then refused the depth_format.json
    that was there (a user attack)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "depth_format.json").write_text('{"note": "mine"}')
    for model in (joint_export / "depth", joint_export):
        assert predict(model, out, "--device", "cpu") == 2
        assert "describes other depth maps" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["depth_format.json"]


def test_intrinsics_are_of_the_upright_image_as_the_depth_map_is(joint_export, tmp_path, capsys):
    """A photo stored 96 wide and 32 tall with EXIF orientation 6 is shown (and read) 32 wide and 96
    tall: --intrinsics with the upright image's principal point (16, 48) fit it without a warning,
    and each point of the cloud projects back onto a pixel of the upright image."""
    stored = Image.open(FRAME).convert("RGB").resize((96, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    photo = tmp_path / "in" / "turned.jpg"
    stored.save(photo, exif=exif, quality=95)
    out = tmp_path / "out"
    assert predict_main(["--model", str(joint_export / "depth"), "--images", str(photo), "--out", str(out),
                         "--device", "cpu", "--intrinsics", "50,50,16,48"]) == 0
    assert "principal point" not in capsys.readouterr().err
    assert np.asarray(Image.open(out / "turned_depth.tiff")).shape == (96, 32)
    cloud = read_ply(out / "turned.ply")
    x, y, z = (cloud[a].astype(np.float64) for a in "xyz")
    u, v = x / z * 50 + 16, y / z * 50 + 48  # back to the pixel each point was made of
    assert 0 < len(cloud) <= 96 * 32 and np.allclose(u, np.round(u), atol=1e-2) and np.allclose(v, np.round(v), atol=1e-2)
    assert u.min() > -0.01 and u.max() < 31.01 and v.min() > -0.01 and v.max() < 95.01 and v.max() > 80
