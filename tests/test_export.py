"""What export writes besides the weights' values: file modes a team can share."""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager

import pytest
import torch
from conftest import TINY

from dptune.labels import LabelSet


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An exported-directory source (what export.py re-exports), tiny random 3-class DPT."""
    from dptune.tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("source")
    labels = LabelSet(names=["a", "b", "c"])
    m = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64).eval()
    m.model.save_pretrained(out)
    m.image_processor().save_pretrained(out)
    (out / "dptune.json").write_text(json.dumps({"labels": labels.to_dict()}))
    return out


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_exported_files_follow_the_umask_like_any_new_file(source, tmp_path):
    """safetensors writes through a 0600 temp file renamed into place: without care the weights are
    private to the exporting user while config.json beside them is world-readable."""
    from dptune.export import export

    for mask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = tmp_path / f"out{mask:o}"
        with umask(mask):
            export(str(source), out)
        modes = _modes(out)
        assert "model.safetensors" in modes and "README.md" in modes
        assert modes == dict.fromkeys(modes, mode), modes

    # replacing an earlier export (whose weights an older dptune wrote 0600) gives every file the
    # umask's mode: the files are written anew
    again = tmp_path / "out22"
    (again / "model.safetensors").chmod(0o600)
    with umask(0o022):
        export(str(source), again, overwrite=True)
    modes = _modes(again)
    assert modes == dict.fromkeys(modes, 0o644), modes


def test_an_fp16_export_leaves_the_model_it_was_given_in_float32(tmp_path):
    """A joint export writes each part (fp16 with --fp16) and then traces ONNX from the same modules:
    halving them in place made the float32 ONNX graph from fp16-rounded weights."""
    import torch
    from conftest import TINY

    from dptune.export import write_directory
    from dptune.labels import LabelSet
    from dptune.models import build_model
    from dptune.preprocessing import Preprocessing

    model = build_model(["a", "b"], config=dict(TINY)).eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    got = {"model": model, "processor": Preprocessing.of_task(64, [0.5] * 3, [0.5] * 3).processor(), "metrics": {}, "evaluation": {},
           "labels": LabelSet.from_dict({"names": ["a", "b"]}), "meta": {"task": "segmentation"}}
    write_directory(got, tmp_path / "out", "x.ckpt", onnx=False, fp16=True, tolerance=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "model.safetensors").values()
    assert {t.dtype for t in stored if t.is_floating_point()} == {torch.float16}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_export_leaves_the_modes_of_files_it_did_not_write(source, tmp_path):
    """A private key in the output directory (even one with a future timestamp) keeps its 0600 and
    its content: the export is refused there, --overwrite included (the directory holds no export)."""
    from dptune.export import export
    from dptune.export.target import OutputDirError

    out = tmp_path / "out"
    (out / "keys").mkdir(parents=True)
    key = out / "keys" / "id_rsa"
    key.write_text("secret")
    key.chmod(0o600)
    os.utime(key, (2e9, 2e9))  # 2033
    for overwrite in (False, True):
        with umask(0o022), pytest.raises(OutputDirError):
            export(str(source), out, overwrite=overwrite)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_text() == "secret"
    assert sorted(p.name for p in out.rglob("*")) == ["id_rsa", "keys"]


def test_a_validation_that_scored_nothing_has_no_figures_in_cards_or_json():
    """NaN figures (nothing scored) must not print as 'nan' tables nor be written as JSON's non-standard NaN."""
    import json
    import math

    from dptune.export import nan_to_null
    from dptune.export.card import NOT_SCORED, depth_card, multitask_card
    from dptune.labels import LabelSet
    from dptune.preprocessing import Preprocessing

    nan = {k: math.nan for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2",
                                 "delta3")}
    card = depth_card({"depth": {"mode": "metric"}}, Preprocessing.of_task(64, [0.5] * 3, [0.5] * 3).processor(),
                      {"val": {**nan, "images": 0}}, "x.ckpt")
    assert NOT_SCORED in card and "nan" not in card
    labels = LabelSet.from_dict({"names": ["a", "b"]})
    top = multitask_card(labels, {"segmentation": {"val": {"mIoU": 0.5, "pixel_acc": 0.7, "images": 3}},
                                  "depth": {"val": {**nan, "images": 0}}}, "x.ckpt", onnx=False)
    assert "mIoU 0.5000 on 3 validation images" in top and f"- depth: {NOT_SCORED}" in top and "nan" not in top
    text = json.dumps(nan_to_null({"val": {**nan, "IoU": [0.5, math.nan]}}), allow_nan=False)
    assert json.loads(text)["val"]["abs_rel"] is None and json.loads(text)["val"]["IoU"] == [0.5, None]


def test_an_onnx_export_prints_no_tracer_warnings_and_checks_the_graph_instead(source, tmp_path, caplog):
    """Six "might not generalize to other inputs" TracerWarnings (shape checks of transformers and
    dptune, constant for a traced size) met every ONNX export; the parity check at square,
    non-square and batch-2 inputs is what tells whether the graph generalizes."""
    import warnings

    from dptune.export import export

    with warnings.catch_warnings(record=True) as seen, caplog.at_level("INFO", logger="dptune"):
        warnings.simplefilter("always")
        export(str(source), tmp_path / "out", onnx=True)
    assert not [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]
    parity = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ONNX parity")]
    assert parity and "(1, 64, 64), (2, 64, 96)" in parity[0]
