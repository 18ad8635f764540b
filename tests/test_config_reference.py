"""docs/configuration.md is what the generator writes from the CLI's own parser, so it cannot drift."""

from __future__ import annotations

import inspect
import re

from conftest import REPO

from dptune.tools.config_reference import main, render

DOC = REPO / "docs" / "configuration.md"


def test_the_configuration_reference_is_the_generated_one():
    generated = render()
    assert DOC.read_text() == generated, (
        "docs/configuration.md differs from what the CLI gives: run "
        "`python -m dptune.tools.config_reference --write` and commit the result")

    # options of each task's model and datamodule, with type, default and help, read from the parser
    for line in (
        "- `model.lr` (float; default `0.0001`): Peak learning rate of the backbone.",
        "- `model.nonfinite_skips` (int; default `3`): ",
        "- `data.image_size` (int | list[int]; default `384`): ",
        "- `data.depth_scale` (float | null; default `null`): ",
        "- `model.weighting` (fixed | uncertainty; default `uncertainty`): ",
        "- `data.image_size` (int; default `224`): ",
    ):
        assert line in generated, line
    # a default that differs per task is given per task; linked settings are said to be filled in
    assert re.search(r"`checkpoint.monitor` .*segmentation: `val/mIoU`; depth: `val/abs_rel`", generated)
    assert "`model.label_spec`: filled in from the datamodule" in generated
    # the sections sit under the task that has them
    depth = generated.split("### Depth (`task: depth`)", 1)[1].split("###", 1)[0]
    assert "`model.max_depth`" in depth and "`model.region_loss`" not in depth


def test_the_reference_follows_a_changed_default(monkeypatch):
    """Generated, not copied: a default changed in the code shows in the reference."""
    from dptune.tasks.segmentation import SegmentationModule

    sig = inspect.signature(SegmentationModule.__init__)
    changed = sig.replace(parameters=[p.replace(default=0.25) if p.name == "aux_weight" else p
                                      for p in sig.parameters.values()])
    monkeypatch.setattr(SegmentationModule.__init__, "__signature__", changed, raising=False)
    assert "- `model.aux_weight` (float; default `0.25`)" in render()


def test_write_puts_the_reference_where_asked(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert main(["--write", str(out)]) == 0
    assert out.read_text() == DOC.read_text()
