"""Segmentation + depth in one model through train.py: CamVid masks and 7-Scenes depth mixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, DUBAI, KITCHEN, REPO, TINY, needs
from test_train import run_train

from dptune.data.multitask_datamodule import JointTrainSet, source_weights
from dptune.errors import ConfigError
from dptune.labels import LabelSet

pytestmark = [needs(CAMVID), needs(KITCHEN)]


# a joint run's splits: 10 CamVid frames and 9 of the 7-Scenes kitchen, with a few of each to validate on
SEG_SPLITS = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
              "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}
DEPTH_SPLITS = {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg", "depth": "train/depth/{stem}.png"},
                "val": {"images": "val/rgb/frame-00060[0-4].jpg", "depth": "val/depth/{stem}.png"}}

@pytest.mark.slow
def test_joint_fit_validates_each_task_and_rebuilds_from_its_checkpoint(tmp_path, monkeypatch):
    from dptune.tasks.checkpoints import load_module

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    seg, depth = SEG_SPLITS, DEPTH_SPLITS  # read only
    run = tmp_path / "run"
    run_train(["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
               "--data.segmentation.root", str(CAMVID), "--data.depth.root", str(KITCHEN),
               "--data.segmentation.splits", json.dumps(seg), "--data.depth.splits", json.dumps(depth),
               "--model.config", str(config), "--data.image_size", "64", "--data.batch_size", "4",
               "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.precision", "32-true",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--model.references", json.dumps({"mIoU": 0.3, "abs_rel": 0.2}),
               "--trainer.default_root_dir", str(run)], cwd=tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    val = torch.load(ckpt, map_location="cpu")["dptune"]["metrics"]["val"]
    assert 0 <= val["mIoU"] <= 1 and 0 < val["abs_rel"] < 1
    expected = 100 * ((val["mIoU"] - 0.3) / 0.3 - (val["abs_rel"] - 0.2) / 0.2) / 2
    assert val["delta_m"] == pytest.approx(expected)
    module = load_module(str(ckpt))
    assert module.task == "multitask" and module.model.depth.dpt is module.model.seg.dpt
    assert module.label_set.names[0] == "Sky"

    # export: one stock directory per task, one ONNX graph with both outputs
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    from transformers import AutoModelForDepthEstimation, DPTForSemanticSegmentation, pipeline

    from dptune.export import export

    out = export(ckpt, tmp_path / "export", onnx=True)
    card = (out / "README.md").read_text()
    assert 'subfolder="depth"' in card and "mIoU" in card and "AbsRel" in card and "model.onnx" in card
    seg_model = DPTForSemanticSegmentation.from_pretrained(out / "segmentation").eval()
    depth_model = AutoModelForDepthEstimation.from_pretrained(out / "depth").eval()
    assert seg_model.config.id2label[0] == "Sky" and depth_model.config.depth_units == "metres"
    assert "mIoU" in (out / "segmentation" / "README.md").read_text()
    assert "AbsRel" in (out / "depth" / "README.md").read_text()
    frame = Image.open(sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0])
    assert pipeline("depth-estimation", model=str(out / "depth"))(frame)["predicted_depth"].shape == (480, 640)
    assert len(pipeline("image-segmentation", model=str(out / "segmentation"))(frame)) >= 1
    x = torch.randn(1, 3, 64, 96)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_depth = sess.run(["logits", "predicted_depth"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = module.model.eval()(x)
        square = torch.randn(1, 3, 64, 64)  # plain transformers' ViT DPT: square inputs
        joint_logits, _, joint_depth = module.model(square)
        assert torch.allclose(seg_model(pixel_values=square).logits, joint_logits, atol=1e-5)
        assert torch.allclose(depth_model(pixel_values=square).predicted_depth, joint_depth, atol=1e-5)
    assert np.abs(onnx_logits - ref[0].numpy()).max() <= 1e-4 * np.abs(ref[0].numpy()).max()
    assert np.abs(onnx_depth - ref[2].numpy()).max() <= 1e-4 * np.abs(ref[2].numpy()).max()

    # evaluate.py scores each part of the checkpoint and of the export as validation did
    from dptune.tools.evaluate import main as evaluate_main

    for model in (str(ckpt), str(out)):
        seg_json, depth_json = tmp_path / "seg.json", tmp_path / "depth.json"
        assert evaluate_main(["--model", model, "--root", str(CAMVID), "--images", seg["val"]["images"],
                              "--masks", seg["val"]["masks"], "--labels", "labels.yaml", "--json", str(seg_json)]) == 0
        assert evaluate_main(["--model", model, "--root", str(KITCHEN), "--images", depth["val"]["images"],
                              "--depth", depth["val"]["depth"], "--max-depth", "10", "--json", str(depth_json)]) == 0
        assert json.loads(seg_json.read_text())["mIoU"] == pytest.approx(val["mIoU"], abs=1e-6)
        assert json.loads(depth_json.read_text())["abs_rel"] == pytest.approx(val["abs_rel"], abs=1e-5)

    # a multitask checkpoint or export starts either task (or both) with its weights
    from dptune.models import build_model
    from dptune.models.depth import build_depth_model

    names = module.label_set.names
    for source in (str(ckpt), str(out)):
        seg_start = build_model(names, pretrained=source).eval()
        depth_start = build_depth_model(pretrained=source, max_depth=10.0).eval()
        with torch.no_grad():
            assert torch.allclose(seg_start(pixel_values=square).logits, joint_logits, atol=1e-5)
            assert torch.allclose(depth_start(pixel_values=square).predicted_depth, joint_depth, atol=1e-5)

    # --push-to-hub uploads both subfolders, the graph and the top-level card (recorded: no hub here)
    import huggingface_hub

    class FakeApi:
        def create_repo(self, repo, exist_ok=False):
            pass

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            uploaded[repo_id] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))

    uploaded: dict[str, list[str]] = {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    export(ckpt, tmp_path / "pushed", push_to_hub="someone/joint")
    files = uploaded["someone/joint"]
    assert {"README.md", "segmentation/config.json", "depth/model.safetensors", "depth/README.md"} <= set(files)
    assert 'from_pretrained("someone/joint", subfolder="segmentation")' in (tmp_path / "pushed" / "README.md").read_text()


def test_mixed_stream_fills_the_missing_label_and_follows_the_weights():
    seg = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "mask": torch.ones(4, 4, dtype=torch.uint8), "index": i}
           for i in range(30)]
    depth = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "depth": torch.ones(4, 4), "index": i} for i in range(10)]
    data = JointTrainSet([seg, depth])
    assert len(data) == 40
    assert (data[0]["depth"] == 0).all() and (data[35]["mask"] == 255).all()  # "no label" of the other task
    assert (data[29]["mask"] == 1).all() and (data[30]["depth"] == 1).all()
    from dptune.data.order import TrainOrder

    weights = source_weights([30, 10], [1.0, 3.0])  # a quarter of the samples from segmentation
    order = TrainOrder(data, num_replicas=1, rank=0, seed=0, weights=torch.tensor(weights))
    drawn = []
    for epoch in range(100):  # 40 draws an epoch, each epoch its own
        order.set_epoch(epoch)
        drawn += list(order)
    assert list(order) != drawn[-80:-40]
    share = sum(k < 30 for k in drawn) / len(drawn)
    assert abs(share - 0.25) < 0.03


def _near_far_masks(tmp_path, frames):
    """Masks for 7-Scenes frames made from their own depth: Near (< 1.5 m), Far, 255 without depth."""
    import numpy as np
    from PIL import Image

    from dptune.data.depth_files import read_depth

    (tmp_path / "masks").mkdir()
    for frame in frames:
        depth = read_depth(str(KITCHEN / "train" / "depth" / f"{frame.stem}.png"))
        mask = np.where(depth == 0, 255, np.where(depth < 1.5, 0, 1)).astype(np.uint8)
        Image.fromarray(mask).save(tmp_path / "masks" / f"{frame.stem}.png")
    return {"names": ["Near", "Far"], "ignore_values": [255]}


@needs(DUBAI)
def test_sources_map_their_label_sets_by_name_and_a_source_may_carry_both_labels(tmp_path):
    """CamVid (11 classes) and Dubai (6, RGB masks) share Building and Road by name; 7-Scenes frames
    with masks made from their depth carry both labels, moved by the same augmentation."""
    import numpy as np

    from dptune.data.multitask_datamodule import MultiTaskDataModule

    frames = sorted((KITCHEN / "train" / "rgb").glob("frame-0000[0-1]*.jpg"))
    both = {"root": str(KITCHEN), "name": "kitchen", "labels": _near_far_masks(tmp_path, frames),
            "splits": {"train": {"images": "train/rgb/frame-0000[0-1]*.jpg", "depth": "train/depth/{stem}.png",
                                 "masks": str(tmp_path / "masks" / "{stem}.png")}}}
    camvid = {"root": str(CAMVID), "labels": "labels.yaml",
              "splits": {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}}}
    dubai = {"root": str(DUBAI), "name": "dubai", "labels": "labels.yaml",
             "splits": {"train": {"images": "Tile 1/images/image_part_00[1-2].jpg", "masks": "Tile 1/masks/{stem}.png"}}}
    dm = MultiTaskDataModule(segmentation=[camvid, dubai], depth=both, image_size=64, batch_size=2, num_workers=0)
    names = dm.label_set.names
    assert names[:11] == LabelSet.from_yaml(CAMVID / "labels.yaml").names
    assert names[11:] == ["Land", "Vegetation", "Water", "Unlabeled", "Near", "Far"]  # Building, Road shared
    assert [(s.name, s.kind) for s in dm.sources] == [("camvid", "segmentation"), ("dubai", "segmentation"),
                                                      ("kitchen", "both")]
    dm.setup("fit")
    data = dm.train_dataloader().dataset
    own = LabelSet.from_yaml(DUBAI / "labels.yaml")
    for k in range(len(data)):
        item = data[k]
        source = next(s for j, s in enumerate(dm.sources) if k < data.starts[j + 1])
        classes = set(np.unique(item["mask"].numpy()).tolist()) - {255}
        assert classes <= set(source.dm.label_set.annotated)  # each source labels only its own classes
        if source.kind == "segmentation":
            assert (item["depth"] == 0).all() and classes
        else:  # both labels, the same geometry: the mask is still the depth's near/far split
            depth, mask = item["depth"].numpy(), item["mask"].numpy()
            expected = np.where(depth == 0, 255, np.where(depth < 1.5, names.index("Near"), names.index("Far")))
            assert np.array_equal(mask, expected) and (depth > 0).mean() > 0.5
    dubai_ds = dm.sources[1].dm.dataset("train")
    image, mask = dubai_ds.load(dubai_ds.indices[0])
    from dptune.data.masks import read_mask

    raw = read_mask(dubai_ds.source.masks[dubai_ds.indices[0]], rgb=True)
    by_name = np.array([names.index(n) for n in own.names] + [255] * (256 - own.num_classes), np.uint8)
    assert np.array_equal(mask, by_name[own.encode(raw)])


@pytest.mark.slow
@needs(DUBAI)
def test_several_sources_validate_each_on_its_own_data_and_log_both_kinds_of_picture(tmp_path):
    """Two segmentation sources and a source carrying both labels through train.py: per-source
    validation figures under each source's name, W&B overlays and depth panels."""
    import yaml

    frames = sorted((KITCHEN / "train" / "rgb").glob("frame-0000[0-1]*.jpg"))
    split = {"images": "train/rgb/frame-0000[0-1]*.jpg", "depth": "train/depth/{stem}.png",
             "masks": str(tmp_path / "masks" / "{stem}.png")}
    camvid_split = {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}
    dubai_split = {"images": "Tile 1/images/image_part_00[1-3].jpg", "masks": "Tile 1/masks/{stem}.png"}
    data = {"image_size": 64, "batch_size": 4, "num_workers": 0,
            "segmentation": [{"root": str(CAMVID), "labels": "labels.yaml",
                              "splits": {"train": camvid_split, "val": camvid_split}},
                             {"root": str(DUBAI), "name": "dubai", "labels": "labels.yaml",
                              "splits": {"train": dubai_split, "val": dubai_split}}],
            "depth": {"root": str(KITCHEN), "name": "kitchen", "labels": _near_far_masks(tmp_path, frames),
                      "splits": {"train": split, "val": split}}}
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"data": data}))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    run_train(["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
               "--config", str(tmp_path / "sources.yaml"), "--model.config", str(config),
               "--trainer.max_epochs", "1", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run)], cwd=tmp_path)
    meta = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["dptune"]
    val = meta["metrics"]["val"]
    assert {"camvid/mIoU", "dubai/mIoU", "kitchen/mIoU", "mIoU", "abs_rel"} <= set(val)
    assert "kitchen/abs_rel" not in val  # one depth source: its figures are val/abs_rel
    assert meta["segmentation"]["labels"]["names"][-2:] == ["Near", "Far"]
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    assert len(list((media / "images" / "val").glob("overlays_*.jpg"))) >= 3  # camvid, dubai, kitchen
    assert list((media / "images" / "val").glob("depth_*.jpg")), "depth panels of the kitchen frames"
    assert list((media / "table" / "val").glob("per_class_IoU_*.json"))

    # every figure, per source too, is the same from two processes (gloo) as from one
    common = ["validate", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
              "--config", str(tmp_path / "sources.yaml"), "--model.config", str(config), "--data.val_batch_size", "2",
              "--trainer.logger", "false", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
              "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]

    def figures(devices: str) -> dict[str, float]:
        extra = ["--trainer.strategy", "ddp"] if devices == "2" else []
        out = run_train([*common, "--trainer.devices", devices, *extra, "--trainer.default_root_dir",
                         str(tmp_path / f"v{devices}")], cwd=tmp_path)
        words = next(ln for ln in (out.stdout + out.stderr).splitlines() if " val: " in ln).split(" val: ")[1].split()
        return {k: float(v) for k, v in zip(words[::2], words[1::2], strict=True)}

    one, two = figures("1"), figures("2")
    assert set(one) == set(two) and "dubai/mIoU" in one
    for key in one:
        assert abs(one[key] - two[key]) < 1e-6, (key, one[key], two[key])


def test_without_weights_every_sample_is_drawn_once_per_epoch():
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    seg = {"root": str(CAMVID), "splits": {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "splits": {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg",
                                                         "depth": "train/depth/{stem}.png"}}}
    dm = MultiTaskDataModule(segmentation=seg, depth=depth, image_size=64, batch_size=4, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(loader.dataset))) and order != sorted(order)
    with pytest.raises(ConfigError, match="to every source or to none"):
        MultiTaskDataModule(segmentation={**seg, "weight": 1.0}, depth=depth)
    with pytest.raises(ConfigError, match="each task needs a source"):
        MultiTaskDataModule(segmentation=[seg, {**seg, "name": "again"}])
    # inf passed "> 0" and failed in the sampler (inf / inf: "invalid multinomial distribution"); a string
    # or a bool is not a weight (data.segmentation is a dict setting, so nothing typed it): each one line
    for weight in (0, -1, float("nan"), float("inf"), "abc", True):
        with pytest.raises(ConfigError, match=r"data.segmentation source 'camvid': weight must be a finite number > 0"):
            MultiTaskDataModule(segmentation={**seg, "weight": weight}, depth={**depth, "weight": 1.0})


def test_predict_writes_masks_and_depth_from_one_forward_equal_to_each_export(tmp_path):
    """scripts/predict.py on a segmentation + depth export: masks equal the segmentation export's,
    depth equals the depth export's (16-bit millimetres), from one backbone pass."""
    import numpy as np
    from PIL import Image

    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.models import build_model
    from dptune.models.depth import build_depth_model
    from dptune.models.joint import JointDPT
    from dptune.tools.predict import main as predict_main

    depth_cfg = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    torch.manual_seed(0)
    joint = JointDPT(build_model(["a", "b", "c"], config=dict(TINY)), build_depth_model(config=depth_cfg)).eval()
    from transformers import DPTImageProcessorPil

    proc = DPTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name, model in (("segmentation", joint.seg), ("depth", joint.depth)):
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp_path / "out" / name)
        proc.save_pretrained(tmp_path / "out" / name)
    frame = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0]
    assert predict_main(["--model", str(tmp_path / "out"), "--images", str(frame), "--out", str(tmp_path / "p")]) == 0
    image = np.asarray(Image.open(frame).convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "p" / f"{frame.stem}.png"))
    assert np.array_equal(mask, Predictor.load(str(tmp_path / "out" / "segmentation")).predict(image)[0])
    from dptune.data.depth_files import read_depth

    spec = json.loads((tmp_path / "p" / "depth_format.json").read_text())  # no max_depth: float32 metres
    depth = read_depth(str(tmp_path / "p" / spec["file"].replace("<stem>", frame.stem)))
    ref = np.clip(DepthPredictor.load(str(tmp_path / "out" / "depth")).predict(image), 0, None)
    assert np.abs(depth - ref).max() <= 1e-5



def test_weighted_draws_are_split_across_processes_without_overlap():
    """Under DDP Lightning wraps the weighted sampler in a DistributedSamplerWrapper: every rank must
    list the same draw for the ranks' parts to be one draw, split."""
    import copy
    from collections import Counter

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from dptune.data.multitask_datamodule import MultiTaskDataModule

    seg = {"root": str(CAMVID), "weight": 3.0,
           "splits": {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "weight": 1.0,
             "splits": {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg", "depth": "train/depth/{stem}.png"}}}
    draws, parts = [], []
    for rank in (0, 1):
        torch.manual_seed(0)  # seed_everything on each rank
        dm = MultiTaskDataModule(segmentation=seg, depth=depth, image_size=64, batch_size=4, num_workers=0)
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        draws.append(list(copy.deepcopy(sampler)))  # what this rank's sampler draws (generator state copied)
        parts.append(list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)))
    assert draws[0] == draws[1]
    n = len(draws[0])
    assert len(parts[0]) == len(parts[1]) == (n + 1) // 2  # DistributedSampler pads to equal parts
    both = Counter(parts[0]) + Counter(parts[1])
    assert not Counter(draws[0]) - both and (both - Counter(draws[0])).total() == n % 2


def test_loader_workers_of_the_joint_task_draw_different_augmentations():
    """Two workers read the same training sample over and over: every draw (crop, flip, scale)
    must differ. The joint set holds its sources' datasets; worker seeding must reach their
    transforms (it reached only a dataset's own ``transform``, so worker 1 replayed worker 0)."""
    from dptune.data.loaders import collate, make_loader
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    seg = {"root": str(CAMVID), "splits": {"train": {"images": "train/0001TP_006900.jpg", "masks": "trainannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "splits": {"train": {"images": "train/rgb/frame-000000.jpg", "depth": "train/depth/{stem}.png"}}}
    torch.manual_seed(0)
    dm = MultiTaskDataModule(segmentation=seg, depth=depth, image_size=64, batch_size=1, num_workers=2)
    dm.setup("fit")
    data = dm.train_dataloader().dataset
    for index in (0, 1):  # the segmentation sample, then the depth sample
        loader = make_loader(data, "train", 1, None, 2, False, False, collate, sampler=[index] * 6)
        draws = [b["image"][0].flatten().tolist() for b in loader]
        assert len({tuple(d) for d in draws}) == 6, f"sample {index}: repeated augmentations across workers"


@pytest.mark.parametrize("task,setting,message", [
    ("segmentation", {"val_mode": "slide"}, "val_mode 'slide' is not supported in segmentation \\+ depth"),
    ("depth", {"eval_crop": "eigen"}, "eval_crop 'eigen' is not supported in segmentation \\+ depth"),
    ("depth", {"eval_crop": None}, "eval_crop must be none, eigen or garg, got None"),
    ("segmentation", {"val_mode": None}, "val_mode must be resize, got None"),
    # a source's own setting was named data.<setting>, not where it is
    ("segmentation", {"scale_range": [1.5, 0.75]},
     r"^data.segmentation source 'camvid': data.segmentation.scale_range \[1.5, 0.75\]: the smallest and largest"),
    ("segmentation", {"labels": {"names": ["a", "b"], "ignore_values": 11}},
     r"^data.segmentation source 'camvid': data.segmentation.labels: ignore_values must be a list"),
])
def test_settings_the_joint_validation_cannot_honour_stop_with_one_line(task, setting, message):
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    seg = {"root": str(CAMVID), "splits": {"train": {"images": "train/0001TP_006900.jpg", "masks": "trainannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "splits": {"train": {"images": "train/rgb/frame-000000.jpg", "depth": "train/depth/{stem}.png"}}}
    sources = {"segmentation": seg, "depth": depth}
    sources[task] = {**sources[task], **setting}
    with pytest.raises(ConfigError, match=message):
        MultiTaskDataModule(**sources, image_size=64)


def test_a_stage_the_joint_data_cannot_serve_is_one_line_before_the_run_starts(monkeypatch, capsys):
    """With no source holding a validation split, a joint fit trained without a word but
    ModelCheckpoint's warning (no best checkpoint, no validation figure); ``dptune test`` on the
    joint task was Lightning's traceback (it has no test stage)."""
    from dptune.cli import main
    from dptune.data.multitask_datamodule import MultiTaskDataModule
    from dptune.errors import DataError

    seg = {"root": str(CAMVID), "splits": {"train": {"images": "train/0001TP_006900.jpg", "masks": "trainannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "splits": {"train": {"images": "train/rgb/frame-000000.jpg", "depth": "train/depth/{stem}.png"}}}
    from types import SimpleNamespace

    for stage in ("fit", "validate"):
        dm = MultiTaskDataModule(segmentation=seg, depth=depth, image_size=64, num_workers=0)
        dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=stage), world_size=1, limit_val_batches=1.0,
                                     num_sanity_val_steps=0, check_val_every_n_epoch=1, max_epochs=1)
        with pytest.raises(DataError, match="no source has a 'val' split"):
            dm.prepare_data()  # Lightning's first hook of a run, before it starts the W&B run
    monkeypatch.chdir(REPO)
    rc = main(["test", "--config", "configs/multitask/camvid-7scenes.yaml", "--model.config", "configs/models/dpt-tiny.json"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "dptune evaluate" in err[0] and "--split test" in err[0], err


@pytest.mark.parametrize("key", ["segmentation_weight", "depth_weight", "aux_weight"])
def test_a_negative_loss_weight_of_the_joint_task_is_one_line_when_it_trains(tiny_config, key):
    """--model.depth_weight -1 trained, pushing the depth error up; a checkpoint holding such a value
    still loads (predict and export never use it)."""
    from types import SimpleNamespace

    from dptune.tasks.multitask import MultiTaskModule

    m = MultiTaskModule(config=dict(tiny_config), label_spec={"names": ["a", "b"]}, image_size=64, max_depth=10.0,
                        weighting="fixed", **{key: -1.0})
    m._trainer = SimpleNamespace(datamodule=None, precision="32-true", limit_train_batches=1.0, max_steps=-1,
                                 callbacks=[])
    with pytest.raises(ConfigError, match=rf"^model.{key} -1.0: .*a finite number >= 0"):
        m.check_stage("fit")


def test_a_joint_run_resumed_mid_epoch_with_larger_batches_trains_the_rest_of_the_epoch(tmp_path, monkeypatch):
    """19 joint samples cut at step 3 in batches of 2 (6 trained), resumed in batches of 4: the checkpoint's
    3 batches are counted as 1 of the new ones (the datamodule's length is the joint set's), so 3 steps
    take the 12 after the 6 trained and the epoch is validated."""
    from sigterm_helper import read_log, validations

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    seg, depth = SEG_SPLITS, DEPTH_SPLITS  # read only
    run, log = tmp_path / "run", tmp_path / "steps.log"
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))  # the callbacks' module, for the training process

    def fit(*extra: str):
        return run_train(["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
                          "--data.segmentation.root", str(CAMVID), "--data.depth.root", str(KITCHEN),
                          "--data.segmentation.splits", json.dumps(seg), "--data.depth.splits", json.dumps(depth),
                          "--model.config", str(config), "--data.image_size", "64", "--data.num_workers", "0",
                          "--trainer.max_epochs", "1", "--trainer.precision", "32-true", "--trainer.logger", "false",
                          "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=sigterm_helper.StepLog",
                          f"--trainer.callbacks.path={log}", "--trainer.default_root_dir", str(run), *extra],
                         cwd=tmp_path)

    fit("--data.batch_size", "2", "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=3")
    proc = fit("--data.batch_size", "4", "--ckpt_path", "last")
    assert "the checkpoint's 3 batches of it count as 1 at this run's batch size and number of processes (3 " \
           "batches of the epoch's 4 left)" in proc.stderr, proc.stderr[-3000:]
    assert "continues with 12 of the 13 of its 19 training samples it had not reached; the other 1 is left out" \
        in proc.stderr
    steps = read_log(log)[1]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6] and sorted(validations(log)) == [6]
