"""predict / evaluate --backend onnx: the export's graph gives the torch path's outputs (masks,
confidence, depth maps) for the fp32 graph, and evaluate scores the INT8 graph as the card says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CAMVID, KITCHEN, TINY, needs
from PIL import Image

from dptune.labels import LabelSet

pytest.importorskip("onnxruntime")
pytestmark = [needs(CAMVID), needs(KITCHEN)]

EVAL_IMAGES = "val/0016E5_079[0-8]*.jpg"  # the split the card measures on (calibration images outside it)
DEPTH_TINY = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny CamVid segmentation export with model.onnx + model_int8.onnx (calibrated on other frames),
    and a tiny 7-Scenes depth export with model.onnx."""
    from dptune.export import export
    from dptune.export.serving import ServingOptions
    from dptune.tasks.depth import DepthModule
    from dptune.tasks.segmentation import SegmentationModule

    root = tmp_path_factory.mktemp("onnx-backend")
    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    torch.manual_seed(0)
    seg = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64).eval()
    seg.model.save_pretrained(root / "seg-src")
    seg.image_processor().save_pretrained(root / "seg-src")
    (root / "seg-src" / "dptune.json").write_text(json.dumps({"labels": labels.to_dict()}))
    cfg = root / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(CAMVID), "labels": "labels.yaml", "splits": {
        "val": {"images": EVAL_IMAGES, "masks": "valannot/{stem}.png"}}}}))
    depth = DepthModule(config=dict(DEPTH_TINY), image_size=64, max_depth=10.0).eval()
    depth.model.save_pretrained(root / "depth-src")
    depth.image_processor().save_pretrained(root / "depth-src")
    (root / "depth-src" / "dptune.json").write_text(json.dumps({"task": "depth", **depth.task_metadata()}))
    with torch.no_grad():
        export(str(root / "seg-src"), root / "seg", serving=ServingOptions(
            int8=True, data=str(cfg), calibration_images=str(CAMVID / "val" / "0016E5_08[01]*.jpg"), count=8))
        export(str(root / "depth-src"), root / "depth", onnx=True)
    return root


def predict(*argv) -> int:
    from dptune.tools.predict import main

    return main([str(a) for a in argv])


def test_predict_on_the_fp32_graph_writes_the_torch_masks_and_confidence(exports, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(CAMVID.glob("val/0016E5_08*.jpg"))[:3]:
        (images / p.name).symlink_to(p)
    for backend in ("torch", "onnx"):
        assert predict("--model", exports / "seg", "--images", images, "--out", tmp_path / backend,
                       "--confidence", "--backend", backend) == 0
    for p in sorted(images.iterdir()):
        a = np.array(Image.open(tmp_path / "torch" / f"{p.stem}.png"))
        b = np.array(Image.open(tmp_path / "onnx" / f"{p.stem}.png"))
        assert a.shape == b.shape and (a == b).mean() > 0.999  # to rounding: a tie may break the other way
        ca = np.array(Image.open(tmp_path / "torch" / f"{p.stem}_confidence.png")).astype(int)
        cb = np.array(Image.open(tmp_path / "onnx" / f"{p.stem}_confidence.png")).astype(int)
        assert np.abs(ca - cb).max() <= 1
        assert (tmp_path / "onnx" / f"{p.stem}_overlay.png").is_file()


def test_evaluate_on_the_int8_graph_gives_the_cards_figures(exports, tmp_path, capsys):
    from dptune.tools.evaluate import main

    out = tmp_path / "scores.json"
    rc = main(["--model", str(exports / "seg"), "--root", str(CAMVID), "--images", EVAL_IMAGES, "--masks",
               "valannot/{stem}.png", "--labels", "labels.yaml", "--backend", "onnx-int8", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    measured = json.loads((exports / "seg" / "dptune.json").read_text())["serving"]["measured"]["segmentation"]
    scores = json.loads(out.read_text())
    assert measured["images"] == scores["images"] == len(list(CAMVID.glob(EVAL_IMAGES)))
    assert scores["mIoU"] == pytest.approx(measured["int8"]["mIoU"], abs=1e-6)
    assert scores["pixel_acc"] == pytest.approx(measured["int8"]["pixel_acc"], abs=1e-6)


@pytest.fixture(scope="module")
def default_export(exports):
    """The default export: INT8 calibrated on the validation split's fit part, the rest held back."""
    from dptune.export import export
    from dptune.export.serving import ServingOptions

    with torch.no_grad():
        export(str(exports / "seg-src"), exports / "seg-default",
               serving=ServingOptions(int8=True, data=str(exports / "data.yaml"), count=4))
    return exports / "seg-default"


def test_evaluate_held_back_reproduces_the_cards_figures_in_the_default_export(exports, default_export, tmp_path,
                                                                                capsys):
    from dptune.tools.evaluate import main

    meta = json.loads((default_export / "dptune.json").read_text())["serving"]
    data, measured = meta["data"], meta["measured"]["segmentation"]
    split = sorted(CAMVID.glob(EVAL_IMAGES))
    held = data["segmentation"]["held_back"]
    assert data["segmentation"]["root"] == str(CAMVID) and len(data["segmentation"]["fit"]) == 4
    assert len(held) == measured["images"] == len(split) - 4 and not set(held) & set(data["segmentation"]["fit"])
    assert all((CAMVID / rel).is_file() and not rel.startswith("/") for rel in held)  # relative to the root
    command = meta["reproduce"]["segmentation"]
    assert "--held-back" in command and "--backend onnx-int8" in command and str(exports / "data.yaml") in command
    card = (default_export / "README.md").read_text()
    assert command.replace("EXPORT_DIR", "<this dir>") in card and "Written by" not in card
    out = tmp_path / "scores.json"
    rc = main(["--model", str(default_export), "--config", str(exports / "data.yaml"), "--backend", "onnx-int8",
               "--held-back", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    scores = json.loads(out.read_text())
    assert scores["images"] == len(held)
    assert scores["mIoU"] == pytest.approx(measured["int8"]["mIoU"], abs=1e-6)
    assert scores["pixel_acc"] == pytest.approx(measured["int8"]["pixel_acc"], abs=1e-6)


def test_held_back_of_an_export_without_a_list_is_one_line(exports, tmp_path, capsys):
    from dptune.tools.evaluate import main

    rc = main(["--model", str(exports / "depth"), "--root", str(KITCHEN), "--images", "val/rgb/*.jpg", "--depth",
               "val/depth/{stem}.png", "--depth-scale", "1000", "--held-back"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(err) == 1 and "held-back" in err[0] and str(exports / "depth") in err[0], err


def test_a_graph_is_looked_for_above_only_a_joint_exports_part_and_must_have_the_tasks_output(exports, tmp_path,
                                                                                              capsys):
    """A segmentation export without graphs in a folder holding another model's graph: not used. A
    joint export's part (dptune.json: graphs_in "..") uses the one above. A graph without the task's
    output is one line naming it, not a traceback."""
    import shutil

    from dptune.export import export
    from dptune.inference.onnx_runner import find_graph

    nest = tmp_path / "nest"
    with torch.no_grad():
        export(str(exports / "seg-src"), nest / "camvid")  # no graphs
    shutil.copy(exports / "depth" / "model.onnx", nest / "model.onnx")  # another model's
    image = sorted(CAMVID.glob("val/*.jpg"))[0]
    assert predict("--model", nest / "camvid", "--images", image, "--out", tmp_path / "a", "--backend", "onnx") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "no model.onnx" in err[0] and "Traceback" not in err[0], err
    # a joint export's part: its graph lies one level up, as its dptune.json says
    part = tmp_path / "joint" / "segmentation"
    shutil.copytree(nest / "camvid", part)
    meta = json.loads((part / "dptune.json").read_text())
    (part / "dptune.json").write_text(json.dumps({**meta, "serving": {"graphs_in": ".."}}))
    shutil.copy(exports / "seg" / "model.onnx", part.parent / "model.onnx")
    assert find_graph(part, "fp32") == part.parent / "model.onnx"
    # ... and a graph lacking the task's output (a depth graph beside a segmentation model)
    wrong = tmp_path / "wrong"
    shutil.copytree(nest / "camvid", wrong)
    shutil.copy(exports / "depth" / "model.onnx", wrong / "model.onnx")
    assert predict("--model", wrong, "--images", image, "--out", tmp_path / "b", "--backend", "onnx") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and str(wrong / "model.onnx") in err[0] and "'logits'" in err[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_benchmark_interleaves_the_engines_in_blocks():
    from dptune.tools.engine_rounds import interleaved

    calls = []
    got = interleaved({e: (lambda x, e=e: calls.append(e)) for e in "abc"}, np.zeros(1), warmup=1, runs=6, block=5)
    rounds = calls[3:]  # after one warm-up call each: 3 rounds, each engine 1 untimed + 2 timed calls in a row
    assert rounds == list("aaabbbccc") + list("bbbcccaaa") + list("cccaaabbb")  # the first engine rotates
    assert all(len(g["wall_s"]) == 6 and g["cpu_per_wall"] >= 0 for g in got.values())
    calls.clear()
    interleaved({e: (lambda x, e=e: calls.append(e)) for e in "ab"}, np.zeros(1), warmup=0, runs=3)
    assert calls == list("aabb") + list("bbaa") + list("aabb")  # 3 runs: still 3 rounds, every engine first once


def test_the_benchmark_times_an_engine_apart_from_the_spinning_threads_of_the_one_before():
    """Thread pools spin for tens of milliseconds after a run (ONNX Runtime's and OpenMP's): an engine
    run right after another shares the cores with the other's spinning threads. Modelled by a thread
    that burns CPU for 80 ms after each call; no call after the warm-up may start while the other
    engine's thread burns (a run of a fast engine is shorter than the spin)."""
    import hashlib
    import threading
    import time

    from dptune.tools.engine_rounds import interleaved

    state = {"last": None, "until": 0.0}
    seen = []  # per call: did it start while the other engine's threads spun?
    block = bytes(1 << 18)

    def burn(until):  # hashing a large buffer releases the GIL: CPU use that leaves the caller running
        while time.perf_counter() < until:
            hashlib.sha256(block).digest()

    def engine(name):
        def run(x):
            seen.append(state["last"] not in (None, name) and time.perf_counter() < state["until"])
            time.sleep(0.002)
            state["last"], state["until"] = name, time.perf_counter() + 0.08
            threading.Thread(target=burn, args=(state["until"],), daemon=True).start()
        return run

    got = interleaved({"a": engine("a"), "b": engine("b")}, np.zeros(1), warmup=1, runs=6)
    assert len(seen) == 2 + 2 * (3 + 6) and all(len(g["wall_s"]) == 6 for g in got.values())
    assert not any(seen[2:]), seen


def test_depth_predict_on_the_fp32_graph_writes_the_torch_depth_maps(exports, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(KITCHEN.glob("val/rgb/*.jpg"))[:2]:
        (images / p.name).symlink_to(p)
    for backend in ("torch", "onnx"):
        assert predict("--model", exports / "depth", "--images", images, "--out", tmp_path / backend,
                       "--backend", backend) == 0
    written = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert sum(n.endswith("_depth.png") for n in written) == 2, written
    for name in written:
        if name.endswith("_depth.png"):
            a = np.array(Image.open(tmp_path / "torch" / name)).astype(int)
            b = np.array(Image.open(tmp_path / "onnx" / name)).astype(int)
            assert np.abs(a - b).max() <= 1, name


def test_the_onnx_backend_needs_an_export_with_the_graph(exports, tmp_path, capsys):
    image = sorted(CAMVID.glob("val/*.jpg"))[0]
    assert predict("--model", exports / "depth", "--images", image, "--out", tmp_path / "a",
                   "--backend", "onnx-int8") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "model_int8.onnx" in err[0] and "--int8" in err[0], err
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    from dptune.errors import ConfigError
    from dptune.inference.onnx_runner import backend_graph

    with pytest.raises(ConfigError, match="not an exported directory"):
        backend_graph(str(ckpt), "onnx")
    assert not Path(tmp_path / "a").exists()


def test_the_inference_benchmark_times_each_engine_and_says_what_it_ran_on(exports, tmp_path, capsys):
    from dptune.tools.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--infer", str(exports / "seg"), "--threads", "1", "--runs", "3", "--warmup", "1", "--batch", "2",
                 "--engines", "eager,ort-fp32,ort-int8,ort-fp16", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == got
    assert got["threads"] == 1 and got["cpu"]["model"] and "onnxruntime" in got["versions"]
    assert got["sizes"]["export"] == [64, 64] and got["sizes"]["non_square"][1] > 64
    for engine in ("torch-eager", "ort-fp32", "ort-int8"):
        row = got["engines"][engine]
        assert 0 < row["export_size"]["p50_ms"] <= row["export_size"]["p95_ms"], engine
        assert row["non_square"]["p50_ms"] > 0 and row["throughput"]["images_per_s"] > 0 and row["throughput"]["batch"] == 2
    assert "skipped" in got["engines"]["ort-fp16"]  # no model_fp16.onnx in this export
    assert got["timing"].startswith("interleaved") and "torch" in got["threads_note"]
    assert set(got["load_average_1min"]) == {"before", "after"}
    assert all(got["engines"][e]["export_size"]["cpu_per_wall"] > 0 for e in ("torch-eager", "ort-fp32", "ort-int8"))
    assert got["int8_speedup_vs_fp32_batch1"] > 0


def test_the_profile_splits_each_graphs_time_into_arithmetic_and_the_rest(exports, tmp_path, capsys):
    """--profile: ONNX Runtime's per-node times by operator type, the convolutions and matrix products
    apart, so a user sees why an INT8 graph is as much faster as it is."""
    from dptune.tools.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--infer", str(exports / "seg"), "--threads", "1", "--runs", "2", "--warmup", "1",
                 "--engines", "ort-fp32,ort-int8", "--profile", "5", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["profile"]
    for engine, integer in (("ort-fp32", False), ("ort-int8", True)):
        row = prof[engine]
        assert row["runs"] == 5 and 0 < row["kernels_ms"] <= row["run_ms"] * 1.05, row
        assert (row["integer_arithmetic_ms"] > 0) == integer and row["float_arithmetic_ms"] > 0, row
        assert sum(row["ms_by_op_type"].values()) == pytest.approx(row["kernels_ms"], rel=1e-3)
        assert row["arithmetic_ms"] + row["rest_ms"] == pytest.approx(row["kernels_ms"])
        assert 0 < row["arithmetic_share"] < 1
        ops = set(row["ms_by_op_type"])
        assert bool(ops & {"QLinearConv", "MatMulIntegerToFloat"}) == integer, ops
    ratios = prof["int8_over_fp32"]
    assert ratios["arithmetic"] > 0 and ratios["rest"] > 0 and ratios["kernels"] > 0
    assert 0 < ratios["int8_float_arithmetic_share"] < 1  # the first convolution and attention products stay float


def test_the_profile_runs_a_graph_at_the_one_batch_it_takes(exports, tmp_path):
    """A graph with a fixed batch is timed at it only; the profile fed it batch 1 and ended in
    ONNX Runtime's traceback, the timings lost."""
    import shutil

    import onnx

    from dptune.tools.benchmark import main

    fixed = tmp_path / "seg"
    shutil.copytree(exports / "seg", fixed)
    graph = onnx.load(str(fixed / "model.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(graph, str(fixed / "model.onnx"))
    out = tmp_path / "bench.json"
    assert main(["--infer", str(fixed), "--threads", "1", "--runs", "2", "--warmup", "1", "--batch", "2",
                 "--engines", "ort-fp32", "--profile", "5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "skipped" in got["engines"]["ort-fp32"]["export_size"] and got["profile"]["ort-fp32"]["runs"] == 5
    assert got["profile"]["ort-fp32"]["batch"] == 2
    # beside an INT8 graph that ran at batch 1, the two are not compared (per run, batch 2 costs more)
    assert main(["--infer", str(fixed), "--threads", "1", "--runs", "2", "--warmup", "1", "--batch", "2",
                 "--engines", "ort-fp32,ort-int8", "--profile", "5", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["profile"]
    assert prof["ort-int8"]["batch"] == 1 and "skipped" in prof["int8_over_fp32"], prof["int8_over_fp32"]
    # a profile is not run for an export none of whose engines could be timed (it was, then thrown away)
    from dptune.tools import ort_profile

    called = []
    real = ort_profile.profile_graph
    ort_profile.profile_graph = lambda *a, **k: called.append(1) or real(*a, **k)
    try:
        assert main(["--infer", str(fixed), "--threads", "1", "--runs", "2", "--warmup", "1",
                     "--engines", "ort-fp32", "--profile", "5"]) == 2
    finally:
        ort_profile.profile_graph = real
    assert not called


def test_the_profile_leaves_out_the_warm_up_runs():
    """A warm-up run (first-run allocations, the thread pool starting) is many times a steady run: the
    nodes that start before the last warm-up run ends are not counted."""
    from dptune.tools.ort_profile import summarize

    events, t = [], 0
    for i, (conv, add) in enumerate([(900, 500), (800, 400), (10, 4), (12, 6), (14, 2)]):
        events.append({"cat": "Session", "name": "model_run", "ts": t, "dur": conv + add + 3})
        events.append({"cat": "Node", "name": f"c{i}_kernel_time", "ts": t + 1, "dur": conv, "args": {"op_name": "Conv"}})
        events.append({"cat": "Node", "name": f"a{i}_kernel_time", "ts": t + 2 + conv, "dur": add,
                       "args": {"op_name": "Add"}})
        events.append({"cat": "Node", "name": f"a{i}_fence_before", "ts": t + 2, "dur": 99})  # not a kernel
        t += conv + add + 10
    got = summarize(events, warmup=2)
    assert got["runs"] == 3
    assert got["arithmetic_ms"] == pytest.approx(12 / 1000) and got["rest_ms"] == pytest.approx(4 / 1000)
    assert got["run_ms"] == pytest.approx((17 + 21 + 19) / 3 / 1000)
    assert got["outside_kernels_ms"] == pytest.approx(3 / 1000)
    with pytest.raises(ValueError, match="warm-up"):
        summarize(events, warmup=5)


def test_the_inference_benchmark_refuses_bad_counts_threads_and_engines_before_measuring(exports, capsys,
                                                                                        monkeypatch):
    import os

    from dptune.tools import infer_bench
    from dptune.tools.benchmark import main

    def measured(*args, **kwargs):
        pytest.fail("the benchmark loaded the model before checking its options")

    monkeypatch.setattr(infer_bench, "torch_model", measured)
    cores = len(os.sched_getaffinity(0))
    for option, value in (("--batch", "0"), ("--runs", "0"), ("--warmup", "-1"), ("--threads", "0"),
                          ("--threads", str(cores + 1)), ("--engines", "eager,bogus"), ("--engines", ","),
                          ("--profile", "-1"), ("--profile", "4"), ("--profile", "101")):
        rc = main(["--infer", str(exports / "seg"), option, value])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and option in err[0], (option, value, err)
        assert "bogus" in err[0] or value != "eager,bogus"
    rc = main(["--infer", str(exports / "seg"), "--engines", "eager", "--profile", "5"])  # nothing it could profile
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--profile" in err[0] and "ort-fp32" in err[0], err
    assert main(["--infer", "--help"]) == 0  # the tool's own options, as benchmark --help says
    assert "--engines" in capsys.readouterr().out



def bench(capsys, *argv) -> tuple[int, list[str], str]:
    from dptune.tools.benchmark import main

    rc = main(["--infer", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, [ln for ln in err.splitlines() if ln.strip()], out


QUICK = ["--threads", "1", "--runs", "3", "--warmup", "1", "--batch", "2"]


def test_the_inference_benchmark_never_overwrites_a_file_it_did_not_write(exports, tmp_path, capsys, monkeypatch):
    """--json is checked before anything is loaded or timed: a file of the user's, a graph of the
    export, a folder or a path whose folder is missing is one line and nothing is written."""
    import shutil

    from dptune.tools import infer_engines

    monkeypatch.setattr(infer_engines, "interleaved", lambda *a, **k: pytest.fail("timed before checking --json"))
    seg = tmp_path / "seg"
    shutil.copytree(exports / "seg", seg)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    graph = seg / "model.onnx"
    before = graph.read_bytes()
    for target, words in ((notes, "not written by"), (graph, "exported model"), (tmp_path, "is a folder"),
                          (tmp_path / "no" / "such" / "b.json", "does not exist")):
        rc, err, _ = bench(capsys, seg, *QUICK, "--engines", "ort-fp32", "--json", target)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: --json") and words in err[0], (target, err)
    assert notes.read_text() == '{"mine": 1}' and graph.read_bytes() == before


def test_the_inference_benchmark_of_odd_exports_is_a_figure_or_one_line(exports, tmp_path, capsys):
    import shutil

    import onnx

    # a graph of another model in the export's place is refused, as predict --backend refuses it
    swapped = tmp_path / "swapped"
    shutil.copytree(exports / "seg", swapped)
    shutil.copy(exports / "depth" / "model.onnx", swapped / "model_int8.onnx")
    rc, err, _ = bench(capsys, swapped, *QUICK, "--engines", "ort-fp32,ort-int8")
    assert rc == 2 and len(err) == 1 and "model_int8.onnx" in err[0] and "'logits'" in err[0], err

    # a graph that takes one size and batch: timed at them, the other rows skipped and said
    fixed = tmp_path / "fixed"
    shutil.copytree(exports / "seg", fixed)
    model = onnx.load(str(fixed / "model.onnx"))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, 64, 64), strict=True):
        dim.Clear()
        dim.dim_value = value
    onnx.save(model, str(fixed / "model.onnx"))
    out = tmp_path / "fixed.json"
    rc, err, _ = bench(capsys, fixed, *QUICK, "--engines", "ort-fp32", "--json", out)
    assert rc == 0, err
    row = json.loads(out.read_text())["engines"]["ort-fp32"]
    assert row["export_size"]["p50_ms"] > 0
    assert "64x64" in row["non_square"]["skipped"] and "batch 1" in row["throughput"]["skipped"], row
    # a graph of another size than the export's processor, alone: nothing to time is one line, not a result
    rc, err, _ = bench(capsys, fixed, *QUICK, "--engines", "ort-fp32,ort-fp16", "--batch", "1", "--threads", "1")
    assert rc == 0, err  # 64x64 batch 1 is the export's size: timed
    model = onnx.load(str(fixed / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 80  # neither 64x64 nor the 64x96 one
    onnx.save(model, str(fixed / "model.onnx"))
    rc, err, _ = bench(capsys, fixed, *QUICK, "--engines", "ort-fp32")
    assert rc == 2 and len(err) == 1 and "no engine could be timed" in err[0] and "64x80 only" in err[0], err
    # a torch model that cannot be loaded: ONNX engines alone never load it; torch's is one line
    broken = tmp_path / "broken"
    shutil.copytree(exports / "seg", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    rc, err, _ = bench(capsys, broken, *QUICK, "--engines", "ort-fp32")
    assert rc == 0, err
    rc, err, _ = bench(capsys, broken, *QUICK, "--engines", "eager,ort-fp32")
    assert rc == 2 and len(err) == 1 and str(broken) in err[0] and "Traceback" not in err[0], err


def test_the_inference_benchmark_records_a_command_that_runs_and_batch_1_throughput(exports, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc, err, _ = bench(capsys, exports / "seg", "--threads", "1", "--runs", "3", "--warmup", "0", "--batch", "1",
                       "--engines", "ort-fp32", "--json", out)
    got = json.loads(out.read_text())
    assert rc == 0 and got["engines"]["ort-fp32"]["throughput"]["images_per_s"] > 0
    assert got["command"].startswith("dptune benchmark --infer ") and " --batch 1 " in got["command"]
    # rerunning it replaces the file the benchmark wrote
    rc, err, _ = bench(capsys, exports / "seg", *QUICK, "--engines", "ort-fp32", "--json", out)
    assert rc == 0, err


def test_the_inference_benchmark_stops_on_ctrl_c_and_huge_batches_with_one_line(exports, tmp_path, capsys,
                                                                                  monkeypatch):
    from dptune.tools import infer_engines

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_engines, "interleaved", interrupted)
    out = tmp_path / "b.json"
    rc, err, _ = bench(capsys, exports / "seg", *QUICK, "--engines", "ort-fp32", "--json", out)
    assert rc == 130 and len(err) == 1 and "interrupted" in err[0] and not out.exists(), err
    rc, err, _ = bench(capsys, exports / "seg", "--batch", "10000000", "--engines", "ort-fp32")
    assert rc == 2 and len(err) == 1 and "--batch" in err[0] and "memory" in err[0], err


def test_the_inference_benchmark_of_a_joint_exports_part_names_the_joint_export(exports, tmp_path, capsys):
    import shutil

    part = tmp_path / "joint" / "segmentation"
    shutil.copytree(exports / "seg", part, ignore=shutil.ignore_patterns("*.onnx"))
    meta = json.loads((part / "dptune.json").read_text())
    meta["serving"] = {"graphs_in": ".."}
    (part / "dptune.json").write_text(json.dumps(meta))
    rc, err, _ = bench(capsys, part, *QUICK, "--engines", "eager,ort-fp32")
    assert rc == 2 and len(err) == 1 and f"benchmark {part.parent}" in err[0], err


def test_the_inference_benchmark_reads_no_json_target_that_is_not_a_file(tmp_path):
    """--json /dev/stdout or a named pipe: written to, never read to check it (reading one waits for input)."""
    import os
    import threading

    from dptune.tools.infer_bench import check_json_out

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = threading.Event()
    threading.Thread(target=lambda: (check_json_out(str(fifo), tmp_path / "export"), done.set()), daemon=True).start()
    assert done.wait(10), "check_json_out blocked reading a named pipe"


def test_the_inference_benchmark_writes_no_json_among_a_runs_checkpoints(tmp_path):
    """docs/export.md: --json in a folder of checkpoints is refused (it would mix with the run's
    checkpoints); the folder beside it is fine, and the message does not speak of predictions."""
    import pytest

    from dptune.errors import ConfigError
    from dptune.tools.infer_bench import check_json_out

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"0")
    with pytest.raises(ConfigError) as e:
        check_json_out(str(ckpts / "bench.json"), tmp_path / "export")
    assert "a folder of checkpoints" in str(e.value) and "predictions" not in str(e.value)
    check_json_out(str(tmp_path / "run" / "bench.json"), tmp_path / "export")


def test_the_inference_benchmark_sizes_batches_by_the_memory_available(exports, capsys, monkeypatch):
    """A batch whose inference would not fit is one line before timing; an engine that runs out of
    memory while timing is one line too (ONNX Runtime's arena error was a traceback)."""
    from dptune.tools import infer_bench, infer_engines

    monkeypatch.setattr(infer_bench, "available_memory", lambda: 50 * 2**20)
    rc, err, _ = bench(capsys, exports / "seg", *QUICK[:-2], "--batch", "64", "--engines", "ort-fp32")
    assert rc == 2 and len(err) == 1 and "--batch 64" in err[0] and "0.05 GiB of memory available" in err[0], err

    def arena(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 AllocateRaw Failed to allocate memory")

    monkeypatch.setattr(infer_engines, "interleaved", arena)
    rc, err, _ = bench(capsys, exports / "seg", *QUICK, "--engines", "ort-fp32")
    assert rc == 2 and len(err) == 1 and "out of memory" in err[0] and "--batch" in err[0], err


def test_the_inference_benchmark_says_when_its_json_cannot_be_written_after_timing(exports, tmp_path, capsys,
                                                                                    monkeypatch):
    import shutil

    from dptune.tools import infer_bench

    real = infer_bench.run
    folder = tmp_path / "gone"
    folder.mkdir()

    def run_then_folder_removed(*a, **k):
        got = real(*a, **k)
        shutil.rmtree(folder)
        return got

    monkeypatch.setattr(infer_bench, "run", run_then_folder_removed)
    rc, err, out = bench(capsys, exports / "seg", *QUICK, "--engines", "ort-fp32", "--json", folder / "b.json")
    assert rc == 1 and len(err) == 1 and "could not be written" in err[0] and json.loads(out)["engines"], err


def test_a_segmentation_graph_with_another_class_count_is_another_models(exports, tmp_path, capsys):
    """Output names alone let another segmentation model's graph through (predict --backend onnx and the
    benchmark): its logits' class count must be the model's."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(exports / "seg", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["id2label"] = {str(i): f"c{i}" for i in range(5)}
    cfg["label2id"] = {f"c{i}": i for i in range(5)}
    (other / "config.json").write_text(json.dumps(cfg))
    rc, err, _ = bench(capsys, other, *QUICK, "--engines", "ort-fp32")
    assert rc == 2 and len(err) == 1 and "11 classes, the model has 5" in err[0], err
    from dptune.inference.onnx_runner import backend_graph

    with pytest.raises(Exception, match="11 classes, the model has 5"):
        backend_graph(str(other), "onnx", output="logits")
    assert backend_graph(str(exports / "seg"), "onnx-int8", output="logits") is not None


def test_onnx_sessions_take_the_cores_this_process_may_use(monkeypatch):
    """Left to itself ONNX Runtime counts the machine's cores and pins a thread to each, outside the
    share that ``taskset``, a container or a pinned test worker gives the process."""
    from dptune import cores
    from dptune.inference.onnx_runner import session_options

    monkeypatch.setattr(cores, "usable_cores", lambda: 1)
    assert session_options().intra_op_num_threads == 1 and session_options(3).intra_op_num_threads == 3
