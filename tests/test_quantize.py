"""INT8 and fp16 ONNX graphs of an export: calibrated on real images, dynamic shapes kept, both outputs
of a joint graph, every graph measured against the fp32 torch model on held-back images, and the
options' bad input as one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CAMVID, KITCHEN, REPO, TINY, camvid_subset, needs
from PIL import Image

from dptune.labels import LabelSet

pytest.importorskip("onnxruntime")
pytestmark = [needs(CAMVID), needs(KITCHEN)]

SEG_IMAGES = "val/0016E5_079*.jpg"  # 21 CamVid frames
DEPTH_IMAGES = "val/rgb/frame-0006[0-3]*.jpg"  # 20 7-Scenes frames
DEPTH_TINY = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}


def seg_data(root: Path = CAMVID) -> dict:
    return {"root": str(root), "labels": "labels.yaml", "source": "folder",
            "splits": {"val": {"images": SEG_IMAGES, "masks": "valannot/{stem}.png"}}}


def depth_data() -> dict:
    return {"root": str(KITCHEN), "depth_scale": 1000,
            "splits": {"val": {"images": DEPTH_IMAGES, "depth": "val/depth/{stem}.png"}}}


def write_config(path: Path, data: dict, task: str = "segmentation") -> Path:
    path.write_text(yaml.safe_dump({"task": task, "data": data}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random DPTs: a CamVid segmentation directory, a 7-Scenes depth directory, and a joint
    checkpoint inside a run folder (``RUN/checkpoints/last.ckpt`` beside ``RUN/config.yaml``)."""
    from dptune.tasks.depth import DepthModule
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    root = tmp_path_factory.mktemp("src")
    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    torch.manual_seed(0)
    seg = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64).eval()
    seg.model.save_pretrained(root / "seg")
    seg.image_processor().save_pretrained(root / "seg")
    (root / "seg" / "dptune.json").write_text(json.dumps({"labels": labels.to_dict()}))
    depth = DepthModule(config=dict(DEPTH_TINY), image_size=64, max_depth=10.0).eval()
    depth.model.save_pretrained(root / "depth")
    depth.image_processor().save_pretrained(root / "depth")
    (root / "depth" / "dptune.json").write_text(json.dumps({"task": "depth", **depth.task_metadata()}))
    # the label set a joint run stores: the sources' classes by name, without CamVid's ignore value (11)
    from dptune.data.multitask_datamodule import joint_label_set

    joint_labels = joint_label_set([labels], None).to_dict()
    joint = MultiTaskModule(config=dict(TINY), label_spec=joint_labels, image_size=64, max_depth=10.0).eval()
    ckpt = {"state_dict": joint.state_dict(), "hyper_parameters": dict(joint.hparams)}
    joint.on_save_checkpoint(ckpt)
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, root / "run" / "checkpoints" / "last.ckpt")
    write_config(root / "run" / "config.yaml", {"segmentation": seg_data(), "depth": depth_data()}, "multitask")
    return {"seg": root / "seg", "depth": root / "depth", "joint": root / "run" / "checkpoints" / "last.ckpt",
            "seg_config": write_config(root / "seg.yaml", seg_data()),
            "depth_config": write_config(root / "depth.yaml", depth_data(), "depth")}


def export_cli(capsys, *argv) -> tuple[int, list[str]]:
    from dptune.export.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return rc, [ln for ln in err if ln.startswith("error")]


def run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    from dptune.inference.onnx_runner import OnnxGraph

    return OnnxGraph(path)(x)


def quantized_nodes(path: Path) -> int:
    import onnx

    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def seg_export(sources, tmp_path_factory):
    from dptune.export import export
    from dptune.export.serving import ServingOptions

    out = tmp_path_factory.mktemp("exports") / "seg"
    with torch.no_grad():
        export(str(sources["seg"]), out, serving=ServingOptions(int8=True, fp16=True, data=str(sources["seg_config"]),
                                                                count=6))
    return out


def test_segmentation_int8_and_fp16_graphs_are_written_measured_and_keep_dynamic_shapes(seg_export):
    out = seg_export
    for name in ("model.onnx", "model_int8.onnx", "model_fp16.onnx"):
        assert (out / name).is_file(), name
    assert quantized_nodes(out / "model_int8.onnx") > 10
    assert quantized_nodes(out / "model.onnx") == 0
    # dynamic batch, height and width survive quantization and the fp16 conversion
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    ref = run(out / "model.onnx", x)["logits"]
    for name in ("model_int8.onnx", "model_fp16.onnx"):
        got = run(out / name, x)["logits"]
        assert got.shape == ref.shape == (2, 11, 64, 96) and got.dtype == np.float32
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9, name  # the same function, less precisely

    meta = json.loads((out / "dptune.json").read_text())["serving"]
    int8 = meta["graphs"]["int8"]
    assert int8["calibration_images"] == 6 and int8["kept_float_nodes"]  # boundary convs / attention kept float
    seg = meta["measured"]["segmentation"]
    assert seg["images"] == 21 - 6  # the held-back part: never the calibration images
    assert {"torch", "fp32", "int8", "fp16"} <= set(seg)
    assert seg["fp32"]["agreement_with_torch"] > 0.999 and abs(seg["fp32"]["mIoU"] - seg["torch"]["mIoU"]) < 1e-3
    assert 0 <= seg["int8"]["mIoU"] <= 1 and "mIoU_relative_change" in seg["int8"]
    card = (out / "README.md").read_text()
    assert "## ONNX graphs for serving" in card and "model_int8.onnx" in card and "| int8 |" in card
    assert f"Segmentation, {seg['images']} held-back images" in card


def test_the_measured_figures_are_what_the_graphs_score(seg_export, sources):
    """The card's int8 figures are reproduced by scoring the graph directly on the held-back images."""
    from transformers import AutoImageProcessor

    from dptune.export.serving_data import prepare, serving_data
    from dptune.metrics.segmentation import metrics_from_confmat

    data = serving_data(str(sources["seg"]), "segmentation", str(sources["seg_config"]), count=6)
    part = data.tasks["segmentation"]
    assert not set(part.fit) & set(part.held)
    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    proc = AutoImageProcessor.from_pretrained(seg_export)
    from dptune.export.temperature import ece

    conf = torch.zeros(11, 11, dtype=torch.long)
    xs, ys = [], []
    for i in part.held:
        image, raw, name = part.source.load(i)
        mask = torch.from_numpy(labels.encode(raw, name).astype(np.int64))
        logits = torch.from_numpy(run(seg_export / "model_int8.onnx", prepare(proc, image))["logits"])
        up = torch.nn.functional.interpolate(logits, size=mask.shape, mode="bilinear")[0]
        pred = up.argmax(0)
        ok = mask != 255
        conf += torch.bincount(mask[ok] * 11 + pred[ok], minlength=121).reshape(11, 11)
        xs.append(up.reshape(11, -1)[:, ok.reshape(-1)].T)
        ys.append(mask[ok])
    recorded = json.loads((seg_export / "dptune.json").read_text())["serving"]["measured"]["segmentation"]
    assert float(metrics_from_confmat(conf)["mIoU"]) == pytest.approx(recorded["int8"]["mIoU"], abs=1e-6)
    # the ECE of what the INT8 graph serves (the temperature is fitted on fp32 logits), in the card too
    assert recorded["int8"]["ece"] == pytest.approx(ece(torch.cat(xs), torch.cat(ys)), abs=1e-9)
    card = (seg_export / "README.md").read_text()
    assert "| ECE |" in card and f"{recorded['int8']['ece']:.4f} |" in card


def test_depth_int8_graph_is_measured_by_absrel_and_the_card_says_what_values_mean(sources, tmp_path):
    from dptune.export import export
    from dptune.export.serving import ServingOptions

    out = tmp_path / "depth"
    with torch.no_grad():
        export(str(sources["depth"]), out, serving=ServingOptions(int8=True, data=str(sources["depth_config"]), count=4))
    x = np.random.default_rng(1).standard_normal((1, 3, 96, 64)).astype(np.float32)
    assert run(out / "model_int8.onnx", x)["predicted_depth"].shape == (1, 96, 64)
    depth = json.loads((out / "dptune.json").read_text())["serving"]["measured"]["depth"]
    assert depth["images"] == 20 - 4 and {"abs_rel", "delta1"} <= set(depth["int8"])
    assert depth["fp32"]["rel_difference_to_torch"] < 1e-4
    card = (out / "README.md").read_text()
    assert "| model | AbsRel | delta1 |" in card and "## What the depth values mean" in card
    assert "metres" in card and "no per-pixel uncertainty" in card


def test_joint_int8_graph_gives_both_outputs_and_each_part_records_its_task(sources, tmp_path, capsys, caplog):
    """From a run's checkpoint: the validation splits come from the run's config.yaml by default (the
    CamVid masks' ignore value 11 is read with the source's own label set, not the joint model's)."""
    import logging

    out = tmp_path / "joint"
    with caplog.at_level(logging.INFO):
        rc, err = export_cli(capsys, sources["joint"], out, "--int8", "--calibration-count", "8")
    assert rc == 0, err
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exported")]
    assert len(said) == 1 and str(out) in said[0] and "11 classes" in said[0] and "depth" in said[0], said
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 96)).astype(np.float32)
    got = run(out / "model_int8.onnx", x)
    assert got["logits"].shape == (2, 11, 64, 96) and got["predicted_depth"].shape == (2, 64, 96)
    seg = json.loads((out / "segmentation" / "dptune.json").read_text())["serving"]
    depth = json.loads((out / "depth" / "dptune.json").read_text())["serving"]
    assert "mIoU" in seg["measured"]["segmentation"]["int8"] and "depth" not in seg["measured"]
    assert "abs_rel" in depth["measured"]["depth"]["int8"] and seg["graphs_in"] == ".."
    card = (out / "README.md").read_text()
    assert "Segmentation, " in card and "Depth, " in card
    assert seg["data"]["segmentation"]["held_back"] and "depth" not in seg["data"]
    assert depth["data"]["depth"]["held_back"] and "--held-back" in depth["reproduce"]["depth"]
    # the inference benchmark's torch engine runs both heads, as the joint graph does
    from dptune.tools.infer_bench import task_dir, torch_model

    with torch.no_grad():
        logits, pred = torch_model(out, task_dir(out))(torch.from_numpy(x))
    ref = run(out / "model.onnx", x)
    assert np.allclose(logits.numpy(), ref["logits"], atol=1e-4) and np.allclose(pred.numpy(), ref["predicted_depth"],
                                                                                  atol=1e-4)


def test_bad_calibration_input_is_one_line(sources, tmp_path, capsys):
    seg, cfg = sources["seg"], sources["seg_config"]
    rc, err = export_cli(capsys, seg, tmp_path / "a", "--int8", "--data", cfg, "--calibration-images",
                         str(tmp_path / "nothing" / "*.jpg"))
    assert rc == 2 and len(err) == 1 and "no images match" in err[0] and "nothing" in err[0], err
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(CAMVID.glob("val/0016E5_08*.jpg"))[:2]:
        (few / p.name).symlink_to(p)
    rc, err = export_cli(capsys, seg, tmp_path / "b", "--int8", "--data", cfg, "--calibration-images",
                         str(few / "*.jpg"))
    assert rc == 2 and len(err) == 1 and "2 images match" in err[0] and "at least" in err[0], err
    rc, err = export_cli(capsys, seg, tmp_path / "c", "--int8")  # an exported directory has no run config
    assert rc == 2 and len(err) == 1 and "--data" in err[0], err
    rc, err = export_cli(capsys, sources["depth"], tmp_path / "d", "--calibrate-temperature", "--data",
                         sources["depth_config"])
    assert rc == 2 and len(err) == 1 and "depth model" in err[0], err
    rc, err = export_cli(capsys, seg, tmp_path / "e", "--data", cfg)
    assert rc == 2 and len(err) == 1 and "--int8" in err[0], err
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_a_missing_onnxruntime_says_how_to_install_it(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    rc, err = export_cli(capsys, sources["seg"], tmp_path / "out", "--int8", "--data", sources["seg_config"])
    assert rc == 2 and len(err) == 1 and "dptune[onnx]" in err[0], err
    assert not (tmp_path / "out").exists()


def test_calibration_images_from_a_glob_are_left_out_of_the_held_back_part(sources, tmp_path):
    """... and a folder given as --calibration-images is its images (it said 'no images match')."""
    from dptune.export.serving_data import serving_data

    glob = str(CAMVID / "val" / "0016E5_0796*.jpg")
    data = serving_data(str(sources["seg"]), "segmentation", str(sources["seg_config"]), glob, count=32)
    chosen = {Path(p).resolve() for p in data.calibration}
    assert len(chosen) == len(list(CAMVID.glob("val/0016E5_0796*.jpg"))) >= 4
    held = {Path(data.tasks["segmentation"].image(i)).resolve() for i in data.tasks["segmentation"].held}
    assert held and not held & chosen
    folder = tmp_path / "calibration"
    folder.mkdir()
    for p in CAMVID.glob("val/0016E5_0796*.jpg"):
        (folder / p.name).symlink_to(p)
    by_folder = serving_data(str(sources["seg"]), "segmentation", str(sources["seg_config"]), str(folder), count=32)
    assert {Path(p).resolve() for p in by_folder.calibration} == chosen


def test_a_run_on_synthetic_shapes_asks_for_a_data_config_to_calibrate_on(tmp_path, capsys):
    """The quickstart trains on synthetic shapes: export --int8 of its checkpoint said
    'RUN/config.yaml: labels.yaml: label file not found', sending the user after a file that never
    existed."""
    import yaml

    from dptune.export.serving_data import CalibrationError, serving_data

    config = tmp_path / "config.yaml"
    quick = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config.write_text(yaml.safe_dump(quick))
    with pytest.raises(CalibrationError) as e:
        serving_data(str(tmp_path / "last.ckpt"), "segmentation", str(config))
    assert "synthetic shapes (data.source: synthetic), not a folder split; give --data CONFIG" in str(e.value)


def test_a_joint_model_calibrates_on_at_most_the_count_split_between_its_tasks(sources, tmp_path, capsys):
    """--calibration-count N is "at most N" for a joint model too: N is split between its tasks (the
    odd one to segmentation), each needing the 4 images a single-task split needs, so a joint N
    under 8 is one line instead of the 8 images it used to calibrate on."""
    from dptune.export.serving_data import serving_data

    data = serving_data(str(sources["joint"]), "multitask", count=9)
    assert len(data.calibration) == 9
    assert [len(data.tasks[t].fit) for t in ("segmentation", "depth")] == [5, 4]
    rc, err = export_cli(capsys, sources["joint"], tmp_path / "out", "--int8", "--calibration-count", "4")
    assert rc == 2 and len(err) == 1 and "--calibration-count 4" in err[0] and "at least 8" in err[0], err
    assert not (tmp_path / "out").exists()
    # calibration images of one's own are not split: a joint model takes up to N of them, 4 included
    # (without a temperature to fit, the splits' fit parts are not used)
    glob = str(CAMVID / "val" / "0016E5_0796*.jpg")
    assert len(serving_data(str(sources["joint"]), "multitask", pattern=glob, count=4).calibration) == 4


def test_only_a_split_something_is_fitted_on_sets_images_aside(sources):
    """A split's fit part is held out of the measurement only when something is fitted on it: INT8
    calibration (without --calibration-images) on every task's, the temperature on segmentation's.
    A joint model's depth split with --calibration-images and --calibrate-temperature, or any split
    of an fp16-only export, used to lose its fit part to nothing; now all of it can be measured on."""
    from dptune.export.serving_data import serving_data

    glob = str(CAMVID / "val" / "0016E5_0796*.jpg")
    data = serving_data(str(sources["joint"]), "multitask", pattern=glob, count=8, int8=True, temperature=True)
    seg, depth = data.tasks["segmentation"], data.tasks["depth"]
    assert len(seg.fit) == 8 and not set(seg.fit) & set(seg.held)  # the temperature's images, all of the count
    assert depth.fit == [] and depth.held == list(range(len(depth.source)))  # nothing fitted on depth
    # the count is not split between the tasks when only one fits: 4 is enough for the temperature alone
    assert len(serving_data(str(sources["joint"]), "multitask", pattern=glob, count=4, temperature=True)
               .tasks["segmentation"].fit) == 4
    only_fp16 = serving_data(str(sources["seg"]), "segmentation", str(sources["seg_config"]), int8=False)
    assert only_fp16.calibration == [] and only_fp16.tasks["segmentation"].fit == []
    assert only_fp16.tasks["segmentation"].held == list(range(len(only_fp16.tasks["segmentation"].source)))
    # INT8 from the splits: every task gives calibration images, the count split between them
    both = serving_data(str(sources["joint"]), "multitask", count=9, int8=True, temperature=True)
    assert [len(both.tasks[t].fit) for t in ("segmentation", "depth")] == [5, 4] and len(both.calibration) == 9


def int8_weights(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return np.concatenate([numpy_helper.to_array(i).ravel().astype(int) for i in model.graph.initializer
                           if i.data_type == onnx.TensorProto.INT8])


def test_int8_weights_are_7_bit_by_default_and_the_card_says_which_cpu_measured(seg_export, tmp_path):
    """ONNX Runtime's u8 x s8 kernels on AVX2 without VNNI add pairs of products in int16, which clip
    with 8-bit weights: the default graph has 7-bit weights (reduce_range), the same on any x86 CPU;
    --int8-target vnni keeps 8 bits."""
    from dptune.export.quantize import quantize_int8

    portable = int8_weights(seg_export / "model_int8.onnx")
    assert len(portable) > 1000 and np.abs(portable).max() <= 64
    batches = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(4)]
    done = quantize_int8(seg_export / "model.onnx", tmp_path / "vnni.onnx", batches, target="vnni")
    assert done["reduce_range"] is False and np.abs(int8_weights(tmp_path / "vnni.onnx")).max() > 64
    import onnx

    quantize_int8(seg_export / "model.onnx", tmp_path / "u8.onnx", batches, target="u8")  # u8 x u8: no int16 sums
    types = {i.data_type for i in onnx.load(str(tmp_path / "u8.onnx")).graph.initializer}
    assert onnx.TensorProto.UINT8 in types and onnx.TensorProto.INT8 not in types
    meta = json.loads((seg_export / "dptune.json").read_text())["serving"]
    assert meta["graphs"]["int8"]["reduce_range"] is True and meta["graphs"]["int8"]["target"] == "portable"
    cpu = meta["measured_by"]["cpu"]
    assert cpu["model"] and isinstance(cpu["flags"], list) and meta["measured_by"]["onnxruntime"]
    card = (seg_export / "README.md").read_text()
    assert f"Measured on {cpu['model']}" in card and "7-bit" in card


def test_keep_float_names_are_model_onnx_conv_or_matmul_nodes_listed_once(seg_export, tmp_path):
    """--int8-keep-float takes the names model.onnx shows, of the nodes INT8 quantizes (Conv, MatMul):
    any other node (a Constant, which ONNX Runtime's pre-processing folds away; a ConvTranspose, left
    in float anyway) would be recorded as kept in float while meaning nothing, so it is refused in one
    line naming the graph, as is a name not in it; a name given twice is kept (and listed) once."""
    import onnx

    from dptune.export.quantize import quantize_int8

    model = onnx.load(str(seg_export / "model.onnx"))
    folded = next(n.name for n in model.graph.node if n.op_type == "Constant")
    upsample = next(n.name for n in model.graph.node if n.op_type == "ConvTranspose")
    conv = [n.name for n in model.graph.node if n.op_type == "Conv"][3]
    batches = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(4)]
    done = quantize_int8(seg_export / "model.onnx", tmp_path / "a.onnx", list(batches), exclude=[conv, conv])
    assert done["kept_float_nodes"].count(conv) == 1
    assert len(done["kept_float_nodes"]) == len(set(done["kept_float_nodes"]))
    for name, says in ((folded, "a Constant node"), (upsample, "a ConvTranspose node"), ("/no/such/Conv", "no node")):
        with pytest.raises(ValueError, match=f"--int8-keep-float {name}: {says}.* in .*model.onnx.*Conv and MatMul"):
            quantize_int8(seg_export / "model.onnx", tmp_path / "b.onnx", list(batches), exclude=[conv, name])
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("which", ["seg", "joint"])
def test_a_keep_float_name_is_checked_once_the_graph_exists_and_named_where_the_user_can_look(
        sources, tmp_path, capsys, monkeypatch, which):
    """Checked as soon as model.onnx is written, before its parity check and the calibration; the
    line names the graph the user can look at (the export's model.onnx), not the hidden staging
    folder that is gone by then."""
    import onnxruntime

    import dptune.export as export

    def too_late(*args, **kwargs):
        raise AssertionError("ONNX Runtime ran before --int8-keep-float was checked")

    monkeypatch.setattr(export, "onnx_parity", too_late)
    monkeypatch.setattr(onnxruntime, "InferenceSession", too_late)  # the joint graph's parity
    out = tmp_path / "out"
    data = [] if which == "joint" else ["--data", sources["seg_config"]]
    rc, err = export_cli(capsys, sources[which], out, "--int8", *data, "--int8-keep-float", "/Constant")
    assert rc == 2 and len(err) == 1 and "--int8-keep-float /Constant: " in err[0], err
    assert ".partial" not in err[0] and "the model.onnx exported from" in err[0] and str(out) in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_nothing_is_announced_as_exported_before_the_whole_export_succeeded(sources, tmp_path, capsys, caplog,
                                                                             monkeypatch):
    import logging

    from dptune.export import serving

    def fail(*args, **kwargs):
        raise ValueError("quantization failed")

    monkeypatch.setattr(serving, "write_graphs", fail)  # after both parts of the joint export are written
    with caplog.at_level(logging.INFO):
        rc, err = export_cli(capsys, sources["joint"], tmp_path / "out", "--int8", "--calibration-count", "8")
    assert rc == 2 and len(err) == 1 and "quantization failed" in err[0], err
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("exported")]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


MERGED5 = {"names": ["Sky", "Road", "Car", "Structure", "Other"],
           "map": {0: "Sky", 3: "Road", 8: "Car", 1: "Structure", 2: "Structure", 6: "Structure", 7: "Structure",
                   4: "Other", 5: "Other", 9: "Other", 10: "Other", 11: "ignore"}}


def test_data_of_another_label_set_task_or_mask_shape_is_refused_before_the_slow_steps(sources, tmp_path, capsys,
                                                                                       monkeypatch):
    from PIL import Image

    import dptune.export as ex

    def too_late(*args, **kwargs):
        raise AssertionError("the data was checked only once the graphs were being written")

    monkeypatch.setattr(ex, "write_onnx", too_late)
    monkeypatch.setattr(ex, "export_joint_onnx", too_late)
    m5 = write_config(tmp_path / "m5.yaml", {**seg_data(), "labels": MERGED5})
    rc, err = export_cli(capsys, sources["seg"], tmp_path / "a", "--int8", "--data", m5)
    assert rc == 2 and len(err) == 1 and str(m5) in err[0] and "11 classes" in err[0] and "5" in err[0], err
    rc, err = export_cli(capsys, sources["seg"], tmp_path / "b", "--int8", "--data", sources["depth_config"])
    assert rc == 2 and len(err) == 1 and "a depth config" in err[0] and "segmentation model" in err[0], err
    rc, err = export_cli(capsys, sources["depth"], tmp_path / "c", "--int8", "--data", sources["seg_config"])
    assert rc == 2 and len(err) == 1 and "a segmentation config" in err[0] and "depth model" in err[0], err
    rc, err = export_cli(capsys, sources["joint"], tmp_path / "d", "--int8", "--data", sources["seg_config"])
    assert rc == 2 and len(err) == 1 and "a segmentation config" in err[0] and "joint" in err[0], err
    jm5 = write_config(tmp_path / "jm5.yaml", {"segmentation": {**seg_data(), "labels": MERGED5},
                                               "depth": depth_data()}, "multitask")
    rc, err = export_cli(capsys, sources["joint"], tmp_path / "e", "--int8", "--data", jm5)
    assert rc == 2 and len(err) == 1 and "Structure" in err[0] and str(jm5) in err[0], err
    # index masks saved as colour pictures (three different channels): found before calibrating
    rgb = tmp_path / "rgb"
    (rgb / "val").mkdir(parents=True)
    (rgb / "valannot").mkdir()
    (rgb / "labels.yaml").symlink_to(CAMVID / "labels.yaml")
    for p in sorted(CAMVID.glob(SEG_IMAGES))[:8]:
        (rgb / "val" / p.name).symlink_to(p)
        mask = np.array(Image.open(CAMVID / "valannot" / f"{p.stem}.png"))
        Image.fromarray(np.stack([mask, mask // 2, mask], -1).astype(np.uint8)).save(rgb / "valannot" / f"{p.stem}.png")
    cfg = write_config(tmp_path / "rgb.yaml", seg_data(rgb))
    rc, err = export_cli(capsys, sources["seg"], tmp_path / "f", "--int8", "--data", cfg)
    assert rc == 2 and len(err) == 1 and "3 channels" in err[0] and str(rgb / "valannot") in err[0], err
    # a mask of another size than its image: it was read, resized into, and scored on without a word
    short = tmp_path / "short"
    frames = sorted(CAMVID.glob(SEG_IMAGES))[:8]
    camvid_subset(short, frames, short=2)
    cfg = write_config(tmp_path / "short.yaml", seg_data(short))
    for out, extra in (("g", ["--int8"]), ("h", ["--calibrate-temperature"])):
        rc, err = export_cli(capsys, sources["seg"], tmp_path / out, *extra, "--data", cfg)
        assert rc == 2 and len(err) == 1 and f"{frames[2].stem}.png: mask is 480x350 but its image is 480x360" in err[0], err
    # calibration images that are not images: found before the graphs are written, named as given
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in "abcd":
        (junk / f"{name}.jpg").write_text("not an image")
    rc, err = export_cli(capsys, sources["seg"], tmp_path / "i", "--int8", "--data", sources["seg_config"],
                         "--calibration-images", str(junk / "*.jpg"))
    assert rc == 2 and len(err) == 1 and f"{junk / 'a.jpg'}: not a readable image" in err[0], err
    assert not any((tmp_path / d).exists() for d in "abcdefghi")


def test_calibration_options_apply_only_with_what_they_set_and_the_refusal_lists_them(sources, tmp_path, capsys):
    seg, cfg = sources["seg"], sources["seg_config"]
    every = ("--calibration-images", "--calibration-count", "--calibration-method", "--data", "--int8-keep-float",
             "--int8-target")
    for given in (["--calibration-count", "8"], ["--calibration-method", "entropy"], ["--data", cfg]):
        rc, err = export_cli(capsys, seg, tmp_path / "a", "--onnx", *given)
        assert rc == 2 and len(err) == 1 and all(o in err[0] for o in every) and given[0] in err[0].split("given")[-1], err
    rc, err = export_cli(capsys, seg, tmp_path / "b", "--onnx-fp16", "--data", cfg, "--calibration-method", "entropy")
    assert rc == 2 and len(err) == 1 and "--calibration-method" in err[0] and "--int8" in err[0], err
    rc, err = export_cli(capsys, seg, tmp_path / "c", "--onnx-fp16", "--data", cfg, "--calibration-count", "8")
    assert rc == 2 and len(err) == 1 and "--calibration-count" in err[0] and "--calibrate-temperature" in err[0], err
    # calibration images without --int8 would only be set aside from the measurement (the adversarial review)
    glob = str(CAMVID / "val" / "0016E5_0796*.jpg")
    for serving in (["--onnx-fp16"], ["--calibrate-temperature"]):
        rc, err = export_cli(capsys, seg, tmp_path / "d", *serving, "--data", cfg, "--calibration-images", glob)
        assert rc == 2 and len(err) == 1 and "--calibration-images" in err[0] and "--int8" in err[0], err
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_a_glob_that_leaves_fewer_than_4_held_back_images_is_refused(sources):
    """A 5-image split and a glob taking 4 of them measured on 1 image (only 0 was refused)."""
    from dptune.export.serving_data import CalibrationError, serving_data

    glob = str(CAMVID / "val" / "0016E5_0796[1-7].jpg")
    small = dict(seg_data(), splits={"val": {"images": "val/0016E5_0796*.jpg", "masks": "valannot/{stem}.png"}})
    config = write_config(sources["seg"].parent / "six.yaml", small)
    with pytest.raises(CalibrationError, match="leaves 1 held-back segmentation image .*at least 4"):
        serving_data(str(sources["seg"]), "segmentation", str(config), glob, count=5)


SLOW_EXPORT = """
import signal, sys, time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
import dptune.export.serving as serving


def slow(*args, **kwargs):  # the INT8 calibration, made slow: the signal comes while it runs
    Path(sys.argv[1]).touch()
    time.sleep(120)


serving.write_graphs = slow
from dptune.export.cli import main

sys.exit(main(sys.argv[2:]))
"""


def test_an_interrupted_export_says_so_in_one_line_and_leaves_nothing(sources, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM while the graphs are being written: one error line, a non-zero exit,
    and the hidden staging folder removed."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        d = tmp_path / sig.name
        d.mkdir()
        procs[sig] = (d, subprocess.Popen(
            [sys.executable, "-c", SLOW_EXPORT, str(d / "started"), str(sources["seg"]), str(d / "out"), "--int8",
             "--data", str(sources["seg_config"]), "--calibration-count", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + 240
    for sig, (d, p) in procs.items():
        while not (d / "started").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        assert list(d.glob(".out.*.partial"))  # the export is being built
        p.send_signal(sig)
    for sig, (d, p) in procs.items():
        _, stderr = p.communicate(timeout=60)
        err = [ln for ln in stderr.splitlines() if ln.startswith("error")]
        assert p.returncode == 128 + sig, (sig, p.returncode, stderr[-2000:])
        assert len(err) == 1 and "interrupted" in err[0] and sig.name in err[0] and str(d / "out") in err[0], stderr
        assert "Traceback" not in stderr, stderr[-2000:]
        assert sorted(q.name for q in d.iterdir()) == ["started"], (sig, list(d.iterdir()))


def test_int8_projections_give_float_outputs_and_still_multiply_in_int8(seg_export, tmp_path):
    """A MatMul with weights (attention and MLP projections) keeps its output in float: requantizing it
    to 8 bits before the bias and residual adds costs accuracy and a Quantize/Dequantize pair each.
    ONNX Runtime then runs it as MatMulIntegerToFloat (int8 inputs, float output), not in float."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(seg_export / "model_int8.onnx"))
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    weighted = [n for n in g.node if n.op_type == "MatMul"
                and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                        and producers[i].input[0] in {t.name for t in g.initializer} for i in n.input)]
    assert len(weighted) > 10
    consumers = {i: n for n in g.node for i in n.input}
    requantized = [n.name for n in weighted if consumers.get(n.output[0]) is not None
                   and consumers[n.output[0]].op_type == "QuantizeLinear"]
    assert not requantized, requantized
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(seg_export / "model_int8.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(weighted), ops


def test_the_histogram_calibrators_leave_stdout_to_the_export(seg_export, tmp_path, capsys):
    """ONNX Runtime's percentile and entropy calibrators print their progress with print(); stdout is
    the export's (its last line is the output folder, which scripts read), so those lines go to stderr."""
    from dptune.export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(4)]
    for method in ("percentile", "entropy"):
        quantize_int8(seg_export / "model.onnx", tmp_path / f"{method}.onnx", iter(batches), method=method)
        out = capsys.readouterr()
        assert out.out == "" and "histogram" in out.err.lower(), (method, out.out[:200])


def test_onnx_fp16_refuses_a_model_whose_activations_overflow_float16(sources, tmp_path, capsys):
    # ONNX Runtime's CPU provider runs the fp16 graph's nodes in float32: its measurement could not
    # see an overflow a GPU's float16 would make, and the card gave float32's scores as fp16's
    from transformers import DPTForSemanticSegmentation

    source = tmp_path / "loud"
    shutil.copytree(sources["seg"], source)
    model = DPTForSemanticSegmentation.from_pretrained(source)
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.fill_(3e4)  # logits near 1e6: finite in float32, inf in float16
    model.save_pretrained(source)
    rc, err = export_cli(capsys, source, tmp_path / "out", "--onnx-fp16", "--data", sources["seg_config"])
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {source}: --onnx-fp16: the output of layer "), err
    assert "beyond float16's range" in err[0] and not (tmp_path / "out").exists()
    rc, err = export_cli(capsys, source, tmp_path / "out32", "--int8", "--data", sources["seg_config"],
                         "--calibration-count", "4")
    assert rc == 0, err  # the INT8 graph (float32 activations between its quantized nodes) is not refused


@pytest.mark.parametrize("part,extra", [("depth", []), ("seg", ["--calibrate-temperature"])])
def test_onnx_fp16_of_a_joint_checkpoint_checks_each_part(sources, part, extra, tmp_path, capsys):
    # with a temperature, the segmentation part's record replaced the options the check reads (recheck)
    from dptune.tasks.checkpoints import load_module

    ckpt = torch.load(sources["joint"], weights_only=False)
    key = [k for k in ckpt["state_dict"] if k.startswith(f"model.{part}.head.") and k.endswith("weight")][-1]
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], 3e4)
    run = tmp_path / "run"
    shutil.copytree(sources["joint"].parent.parent, run)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    assert load_module(str(run / "checkpoints" / "last.ckpt")) is not None
    rc, err = export_cli(capsys, run / "checkpoints" / "last.ckpt", tmp_path / "out", "--onnx-fp16", *extra)
    assert rc == 2 and len(err) == 1 and "--onnx-fp16: the output of layer head." in err[0], err
    assert not (tmp_path / "out").exists()


def test_int8_quantization_writes_its_temporary_graphs_beside_the_output(seg_export, tmp_path, monkeypatch):
    """ONNX Runtime's quantization writes copies of the graph (pre-processed, augmented for
    calibration) into temporary folders: in the system's temporary folder (often small on clusters), a
    full one read as the export's own disk being full. They go beside the output and are removed."""
    import tempfile

    from dptune.export.quantize import quantize_int8

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-system-tmp"))
    batches = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(2)]
    (tmp_path / "out").mkdir()
    quantize_int8(seg_export / "model.onnx", tmp_path / "out" / "int8.onnx", batches)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["int8.onnx"]
    assert tempfile.tempdir == str(tmp_path / "no-such-system-tmp")


@pytest.mark.parametrize("height", [1, 3, 4])
def test_a_strip_image_is_prepared_as_the_pipeline_prepares_it(height, tmp_path):
    """Calibration and held-back images 1-4 pixels tall: transformers guesses the channel axis of an
    array without being told, so a 3 x 200 strip was read channels-first (calibrated on scrambled
    pixels, without a word) and 1 x 200 or 4 x 200 failed with 'mean must have 1 elements', an
    error that named the checkpoint."""
    from transformers import DPTImageProcessor

    from dptune.export.serving_data import prepare

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, 200, 3), dtype=np.uint8)
    proc = DPTImageProcessor(size={"height": 32, "width": 32}, do_pad=False)
    got = prepare(proc, image)
    expected = proc(images=image, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert got.shape == (1, 3, 32, 32) and np.array_equal(got, expected.astype(np.float32))
    path = tmp_path / "strip.png"
    Image.fromarray(image).save(path)
    assert np.array_equal(prepare(proc, str(path)), got)
