"""Fine-tuning from weights, through train.py as a user runs it: every start (an export, a dptune
``.ckpt`` of either task, a segmentation + depth export) trains with the whole network in train
mode (``from_pretrained`` hands models over in eval mode: frozen BatchNorm statistics, no dropout),
and a ``.ckpt`` start finishes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs
from test_depth_train import DEPTH_TINY, depth_args
from test_train import camvid_args, run_train

pytestmark = [pytest.mark.slow, needs(CAMVID), needs(KITCHEN)]

JOINT_SEG = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
             "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}
JOINT_DEPTH = {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg", "depth": "train/depth/{stem}.png"},
               "val": {"images": "val/rgb/frame-00060[0-4].jpg", "depth": "val/depth/{stem}.png"}}


def joint_args(run: Path, model: list[str]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
            "--data.segmentation.root", str(CAMVID), "--data.depth.root", str(KITCHEN),
            "--data.segmentation.splits", json.dumps(JOINT_SEG), "--data.depth.splits", json.dumps(JOINT_DEPTH),
            *model, "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_epochs", "1", "--trainer.precision", "32-true", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]


def start_from(args: list[str], ref) -> list[str]:
    """``args`` with ``--model.config X`` replaced by ``--model.pretrained ref``."""
    i = args.index("--model.config")
    return [*args[:i], "--model.pretrained", str(ref), *args[i + 2:]]


def probed_fit(args: list[str], tmp: Path) -> dict:
    """Run ``train.py fit`` with a callback that records, at the first training step, the modules
    that are in eval mode."""
    probe = tmp / f"probe-{len(list(tmp.glob('probe-*')))}.json"
    env = {"DPTUNE_MODE_PROBE": str(probe), "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = run_train([*args, "--trainer.callbacks+=mode_probe.ModeProbe"], cwd=tmp)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {**json.loads(probe.read_text()), "stderr": proc.stderr, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """A segmentation run and a segmentation + depth run (one epoch each, tiny DPT), exported."""
    from dptune.export import export

    tmp = tmp_path_factory.mktemp("finetune")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(TINY))
    run_train(camvid_args(tmp / "seg", config, epochs=1) + ["--trainer.logger", "false"], cwd=tmp)
    run_train(joint_args(tmp / "joint", ["--model.config", str(config)]), cwd=tmp)
    seg_ckpt, joint_ckpt = tmp / "seg" / "checkpoints" / "last.ckpt", tmp / "joint" / "checkpoints" / "last.ckpt"
    return {"tmp": tmp, "config": config, "seg_ckpt": seg_ckpt, "joint_ckpt": joint_ckpt,
            "seg_export": export(seg_ckpt, tmp / "seg-export"), "joint_export": export(joint_ckpt, tmp / "joint-export")}


def test_a_fit_from_an_export_trains_every_module_in_train_mode(sources):
    tmp = sources["tmp"]
    args = camvid_args(tmp / "from-export", sources["config"], epochs=1)
    args = start_from(args, sources["seg_export"])
    probe = probed_fit([*args, "--trainer.logger", "false"], tmp)
    assert probe["modules"] > 100 and probe["eval"] == [], probe["eval"][:10]
    assert "modules were in eval mode" in probe["stderr"] and "training in train mode (0 of" not in probe["stderr"]
    # Lightning's model summary (printed at fit start, before the first step) counts the modes too
    summary = [ln for ln in (probe["stdout"] + probe["stderr"]).splitlines() if "Modules in eval mode" in ln]
    assert summary and all(ln.split(":")[-1].split()[0] == "0" for ln in summary), summary


def test_a_fit_from_a_dptune_ckpt_finishes_in_train_mode_for_either_task(sources):
    tmp = sources["tmp"]
    args = camvid_args(tmp / "from-ckpt", sources["config"], epochs=1)
    args = start_from(args, sources["seg_ckpt"])
    probe = probed_fit([*args, "--trainer.logger", "false"], tmp)
    assert probe["eval"] == [], probe["eval"][:10]
    assert "11 of 11 classes carried over" in probe["stderr"]
    assert (tmp / "from-ckpt" / "checkpoints" / "last.ckpt").is_file()

    # a depth model from the segmentation checkpoint: backbone and neck carry over, the head starts fresh
    depth_config = tmp / "depth-tiny.json"
    depth_config.write_text(json.dumps(DEPTH_TINY))
    args = depth_args(tmp / "depth-from-seg", depth_config, epochs=1)
    args = start_from(args, sources["seg_ckpt"])
    probe = probed_fit([*args, "--trainer.logger", "false"], tmp)
    assert probe["eval"] == [], probe["eval"][:10]
    assert "backbone and neck carried over" in probe["stderr"]
    ckpt = torch.load(tmp / "depth-from-seg" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["dptune"]["task"] == "depth"


def test_a_joint_fit_from_a_joint_export_or_ckpt_trains_in_train_mode(sources):
    tmp = sources["tmp"]
    for name in ("joint_export", "joint_ckpt"):
        probe = probed_fit(joint_args(tmp / f"from-{name}", ["--model.pretrained", str(sources[name])]), tmp)
        assert probe["eval"] == [], (name, probe["eval"][:10])
        assert (tmp / f"from-{name}" / "checkpoints" / "last.ckpt").is_file()


def test_a_ckpt_start_leaves_no_temporary_directory_behind(sources, tmp_path):
    """The checkpoint is unpacked for ``from_pretrained``; what was unpacked is gone when the run ends.
    The run has a temporary folder of its own (a fresh interpreter with TMPDIR): the shared one holds
    the other test worker's folders too, for as long as its runs hold them."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    own = tmp_path / "tmp"
    own.mkdir()
    args = camvid_args(tmp_path / "run", sources["config"], epochs=1)
    args = start_from(args, sources["seg_ckpt"])
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--trainer.logger", "false",
                           "--trainer.max_steps", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(own), WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(own.glob("dptune-ckpt-*"))


@pytest.mark.parametrize("content, said", [
    (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "a Git LFS pointer"),
    (b"\x1f\x8b\x08\x00rest", "gzip-compressed"),
    (b'{"model": 1}', "not a file torch writes: it starts with b'{\"model\": 1}'"),
    (b"", "an empty file (0 bytes)"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, said):
    """The unpickler's error on a file torch did not write is a byte's code ("Unsupported operand 60"
    for a web page a download returned, "101" for text): the line says what the file is instead."""
    from dptune.errors import ConfigError
    from dptune.models.checkpoint_file import load_checkpoint

    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(path))
    assert str(err.value).startswith(f"{path}: not a readable checkpoint (") and said in str(err.value), str(err.value)
    assert "operand" not in str(err.value), str(err.value)


def test_a_damaged_or_foreign_ckpt_as_the_start_is_one_line_naming_it(sources, tmp_path):
    """Empty, truncated, not a torch file, a dptune checkpoint missing what rebuilding needs, a task
    dptune does not know, a config that is no DPT: one line naming the file, never a traceback, and
    never a silent start as another task."""
    from dptune.errors import ConfigError
    from dptune.models.source import resolve_pretrained

    good = torch.load(sources["seg_ckpt"], map_location="cpu", weights_only=True)
    raw = sources["seg_ckpt"].read_bytes()

    def edited(change) -> dict:
        ckpt = {**good, "dptune": dict(good["dptune"]), "hyper_parameters": dict(good["hyper_parameters"])}
        change(ckpt)
        return ckpt

    cases = {
        "empty.ckpt": (b"", "not a readable checkpoint"),
        "truncated.ckpt": (raw[:100_000], "not a readable checkpoint"),
        # it said "(empty, truncated or not a torch file: 101)": the unpickler's KeyError of a byte
        "text.ckpt": (b"hello, not a checkpoint\n", r"not a readable checkpoint \(not a file torch writes: it "
                                                    r"starts with b'hello, not a checkpo'\)"),
        "no-config.ckpt": (edited(lambda c: c["dptune"].pop("model_config")), "without dptune.model_config"),
        "no-size.ckpt": (edited(lambda c: c["hyper_parameters"].pop("image_size")), "without hyper_parameters.image_size"),
        "bogus-task.ckpt": (edited(lambda c: c["dptune"].update(task="bogus")), "unknown dptune task 'bogus'"),
        "bert.ckpt": (edited(lambda c: c["dptune"].update(model_config={"model_type": "bert"})), "not a DPT"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(ConfigError, match=message) as err:
            resolve_pretrained(str(path))
        assert name in str(err.value), (name, str(err.value))

    args = camvid_args(tmp_path / "run", sources["config"], epochs=1)
    args = start_from(args, tmp_path / "empty.ckpt")
    proc = run_train([*args, "--trainer.logger", "false"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "empty.ckpt" in proc.stderr, proc.stderr[-2000:]
