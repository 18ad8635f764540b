"""``dptune export --fp16`` stores float16 weights: it refuses a model that float16 cannot hold
(weights or activations past 65504 would be stored or computed as inf), and its export is predicted
on a CPU as on a GPU. Before, a weight of 1e5 was written as inf (exit 0), and predict on a CPU died
on every image ("Input type (float) and bias type (c10::Half) should be the same")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_joint_tools import save_joint_export
from transformers import DPTForDepthEstimation, DPTForSemanticSegmentation

from dptune.export.cli import main as export_main
from dptune.inference.depth_predictor import DepthPredictor
from dptune.inference.predictor import Predictor


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    return save_joint_export(tmp_path_factory.mktemp("parts"), ["a", "b", "c"])


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]


def last_conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def altered(parts: Path, dest: Path, change, half: bool = False) -> tuple[Path, DPTForSemanticSegmentation]:
    """The segmentation part of ``parts`` with ``change(model)`` made to its weights, saved in ``dest``
    (in float16 where ``half``) with its image processor."""
    model = DPTForSemanticSegmentation.from_pretrained(parts / "segmentation")
    with torch.no_grad():
        change(model)
    (model.half() if half else model).save_pretrained(dest)
    (dest / "preprocessor_config.json").write_text((parts / "segmentation" / "preprocessor_config.json").read_text())
    return dest, model


def test_an_fp16_export_predicts_on_a_cpu_what_the_float32_model_does(parts, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    for part, cls in (("segmentation", Predictor), ("depth", DepthPredictor)):
        out = tmp_path / part
        assert export_main([str(parts / part), str(out), "--fp16"]) == 0
        half, full = cls.load(str(out)), cls.load(str(parts / part))
        assert {p.dtype for p in half.model.parameters()} == {torch.float32}  # the stored float16 values, in float32
        if part == "segmentation":
            (got, conf), (ref, ref_conf) = half.predict(image), full.predict(image)
            assert (got == ref).mean() > 0.99 and np.abs(conf - ref_conf).max() < 1e-2
        else:
            got, ref = half.predict(image), full.predict(image)
            assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("scale,what", [(1e5, "weight head.head.4.weight holds values up to 100000, beyond float16's range"),
                                        (6e4, "the output of layer head.head.4 reaches [0-9.e+]+ on a 64x64 image, "
                                              "beyond float16's range")])
def test_fp16_export_refuses_a_model_float16_cannot_hold(parts, scale, what, tmp_path, capsys):
    # finite in float32 (and its float32 output too); not in float16
    source, _ = altered(parts, tmp_path / "source", lambda m: last_conv(m.head).weight.fill_(scale))
    rc = export_main([str(source), str(tmp_path / "out"), "--fp16"])
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {source}: --fp16: "), err
    import re

    assert re.search(what, err[0]) and "leave --fp16 out" in err[0], err
    assert not (tmp_path / "out").exists()
    assert export_main([str(source), str(tmp_path / "out32")]) == 0  # in float32 it exports


def test_depth_fp16_export_keeps_a_depth_model_within_float16(parts, tmp_path):
    model = DPTForDepthEstimation.from_pretrained(parts / "depth")
    assert export_main([str(parts / "depth"), str(tmp_path / "out"), "--fp16"]) == 0
    stored = DPTForDepthEstimation.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in stored.parameters()} == {torch.float16}
    assert all(torch.equal(a.half(), b) for a, b in zip(model.parameters(), stored.parameters(), strict=True))


def test_fp16_export_stores_a_weight_float16_rounds_to_its_largest_value(parts, tmp_path):
    # 65504 < x < 65520 rounds to 65504, not inf: no reason to refuse
    # in the auxiliary head, not run to predict
    source, _ = altered(parts, tmp_path / "source", lambda m: last_conv(m.auxiliary_head).weight[0, 0].fill_(65510.0))
    assert export_main([str(source), str(tmp_path / "out"), "--fp16"]) == 0
    stored = DPTForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert float(last_conv(stored.auxiliary_head).weight.max()) == 65504.0


def test_a_float16_export_whose_float16_activations_overflow_re_exports_in_float32(parts, tmp_path, capsys):
    # an --fp16 export (of another tool, or an older dptune) runs in float32 on a CPU: predict serves
    # it, and export refused it, checking it in float16 and blaming the weights
    source, model = altered(parts, tmp_path / "half", lambda m: last_conv(m.head).weight.fill_(6e4), half=True)
    for extra in ([], ["--onnx"]):
        out = tmp_path / f"out{len(extra)}"
        assert export_main([str(source), str(out), *extra]) == 0, errors(capsys)
        stored = DPTForSemanticSegmentation.from_pretrained(out)
        assert {p.dtype for p in stored.parameters()} == {torch.float32}  # float16 only with --fp16
        assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), stored.parameters(), strict=True))
    assert export_main([str(source), str(tmp_path / "again16"), "--fp16"]) == 2
    assert "the output of layer head.head.4 reaches" in errors(capsys)[0]


def test_a_folder_whose_config_says_float16_is_read_in_float32(parts, tmp_path):
    # transformers loads weights in the config's dtype: a float32 weight of 7e4 became inf on load,
    # and export, predict and fine-tuning from the folder saw a diverged model (or trained float16 weights)
    import json

    from dptune.models import build_model

    source, model = altered(parts, tmp_path / "cfg16", lambda m: last_conv(m.auxiliary_head).weight[0, 0].fill_(7e4))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    assert export_main([str(source), str(tmp_path / "out")]) == 0
    stored = DPTForSemanticSegmentation.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), stored.parameters(), strict=True))
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    assert Predictor.load(str(source)).predict(image)[0].shape == (48, 80)
    tuned = build_model(["x", "y"], pretrained=str(source))
    assert {p.dtype for p in tuned.parameters()} == {torch.float32}


def test_an_fp16_exports_graph_and_figures_are_of_the_weights_it_stores(parts, tmp_path):
    """With --fp16 the ONNX graph (and the card's figures, measured on the same model) came from the float32
    weights before they were rounded to the float16 ones stored: the card's torch row differed from what
    ``dptune evaluate`` measured on the export (a user attack). The rounded weights are what every part uses."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "out"
    assert export_main([str(parts / "segmentation"), str(out), "--fp16", "--onnx"]) == 0
    stored = DPTForSemanticSegmentation.from_pretrained(out, dtype=torch.float16)
    weight = last_conv(stored.head).weight.detach().float().numpy()
    graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    same = [name for name, value in graph.items() if value.shape == weight.shape and np.array_equal(value, weight)]
    assert same, "the graph holds no initializer equal to the stored float16 classifier weight"


def test_a_joint_fp16_exports_graph_is_of_the_weights_its_parts_store(tmp_path):
    """The joint export's --fp16 graph (and its serving figures) came from the unrounded float32 weights while
    its parts store float16 ones (a second review); the caller's model stays float32."""
    import onnx
    from conftest import TINY
    from onnx import numpy_helper

    from dptune.export import export_multitask
    from dptune.tasks.multitask import MultiTaskModule

    module = MultiTaskModule(config=dict(TINY), label_spec={"names": ["a", "b", "c"]}, image_size=64)
    got = {"model": module.model, "processor": module.image_processor(), "metrics": {}, "meta": {},
           "evaluation": {}, "labels": module.label_set}
    out = tmp_path / "joint"
    out.mkdir()
    export_multitask(got, out, "joint.ckpt", onnx=True, fp16=True, tolerance=1e-2)
    stored = DPTForSemanticSegmentation.from_pretrained(out / "segmentation", dtype=torch.float16)
    weight = last_conv(stored.head).weight.detach().float().numpy()
    graph = [numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer]
    assert any(v.shape == weight.shape and np.array_equal(v, weight) for v in graph)
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
