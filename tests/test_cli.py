"""train.py's error handling: bad settings and data end in one line, bugs keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, needs
from test_resume import quickstart

pytestmark = pytest.mark.slow


def test_a_bug_inside_the_run_keeps_its_traceback(tmp_path):
    """A ValueError that is not a configuration or data error is not turned into "error: ..." exit 2."""
    proc = quickstart(tmp_path / "run", 1, "--trainer.callbacks+=sigterm_helper.RaiseAt", check=False)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: planted bug" in proc.stderr
    assert "error: planted bug" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--data.image_size", "72"], "data.image_size [72, 72] is not a multiple of 16"),
    (["--model.config", "no/such.json"], "no/such.json: model config not found"),
    (["--model.class_weights", "[1.0, 2.0]"], "model.class_weights has 2 values for 4 classes"),
    # a monitor no validation logs stopped the run with Lightning's traceback after the first epoch
    (["--checkpoint.monitor", "val/miou"], "checkpoint.monitor val/miou: validation logs no such value (val/mIoU,"),
    (["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/accuracy"],
     "EarlyStopping monitor val/accuracy: validation logs no such value"),
    # class names are matched as they are: "val/IoU/dis[ck]" is no pattern that lets val/IoU/disc through
    (["--checkpoint.monitor", "val/IoU/dis[ck]"], "checkpoint.monitor val/IoU/dis[ck]: validation logs no such value"),
    # each of these ended in a traceback from torch, PIL or Lightning, or ran with the value misread
    (["--data.batch_size", "0"], "data.batch_size 0: the images per batch, a whole number >= 1"),
    (["--data.image_size", "0"], "data.image_size [0, 0] is not a size"),
    (["--model.image_mean", "[0.5, 0.5]"], "model.image_mean [0.5, 0.5]: one value per colour channel (3: red, green, blue)"),
    (["--model.image_std", "[0, 0, 0]"], "model.image_std [0.0, 0.0, 0.0]: the pixels are divided by it"),
    (["--seed_everything", "-1"], "seed_everything -1: a seed is a whole number from 0 to 4294967295"),
    (["--data.scale_range", "[2.0, 0.5]"], "data.scale_range [2.0, 0.5]: the smallest and largest rescale"),
    (["--data.scale_range", "[-1, 0.5]"], "data.scale_range [-1.0, 0.5]: the smallest and largest rescale"),
    (["--model.class_weights", "[1, -1, 1, 1]"], "model.class_weights [1.0, -1.0, 1.0, 1.0]: each class's"),
    (["--model.aux_weight", "-1"], "model.aux_weight -1.0: the auxiliary head's share of the loss, a finite number >= 0"),
    (["--model.slide_stride", "0"], "model.slide_stride 0.0: the sliding windows' step"),
    (["--trainer.max_epochs", "0"], "trainer.max_epochs 0: a fit of 0 epochs trains nothing"),
    (["--trainer.max_steps", "0"], "trainer.max_steps 0: a fit of 0 steps trains nothing"),
    # a folder of files was called "a stream (no length)"
    (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches 0: a fit of 0 batches trains nothing"),
    # the first process waited for the other node's for good, without a word
    (["--trainer.num_nodes", "2"], "trainer.num_nodes 2: this process was not started as one node of several"),
    # a tenth of 4 batches is none: Lightning's traceback
    (["--trainer.limit_train_batches", "0.1"], "trainer settings: You requested to check 0.1 of the `train_dataloader`"),
])
def test_configuration_mistakes_end_in_one_line(tmp_path, args, message):
    proc = quickstart(tmp_path / "run", 1, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_a_saved_config_naming_classes_where_they_used_to_live_still_runs(tmp_path):
    """Run configs saved before callbacks, strategies and hardware moved into dptune.training name
    them by their old module (LightningCLI writes every class path out); they are read as the new
    paths, with one warning line per old name, and so is an old path given on the command line."""

    from conftest import REPO, run_python

    def print_config(*args: str) -> subprocess.CompletedProcess:
        return run_python(REPO / "train.py", ["fit", *args, "--print_config"], REPO, timeout=300)

    printed = print_config("--config", "configs/quickstart.yaml").stdout
    assert "dptune.training.callbacks.DPTuneWandbLogger" in printed
    old = tmp_path / "config.yaml"
    old.write_text(printed.replace("dptune.training.callbacks.", "dptune.callbacks."))
    proc = print_config("--config", str(old), "--trainer.strategy", "dptune.strategies.DPTFSDPStrategy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path: dptune.training.callbacks.DPTuneWandbLogger" in proc.stdout
    assert "dptune.training.strategies.DPTFSDPStrategy" in proc.stdout
    assert "dptune.callbacks." not in proc.stdout and "dptune.strategies." not in proc.stdout
    notes = [ln for ln in proc.stderr.splitlines() if "moved" in ln]
    assert len(notes) == 2, proc.stderr[-2000:]
    assert any("dptune.callbacks.DPTuneWandbLogger" in n and "dptune.training.callbacks.DPTuneWandbLogger" in n
               for n in notes)
    # the checkpoint callback and the Ctrl-C guard moved on from dptune.training.callbacks to
    # dptune.training.checkpointing: either old path of theirs resolves ("has no attribute" before)
    proc = print_config("--config", "configs/quickstart.yaml", "--trainer.callbacks+=dptune.callbacks.InterruptGuard",
                        "--trainer.callbacks+=dptune.training.callbacks.Checkpoint")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path: dptune.training.checkpointing.InterruptGuard" in proc.stdout
    assert "class_path: dptune.training.checkpointing.Checkpoint" in proc.stdout


SMALL = json.dumps({"train": {"count": 8, "seed": 0, "size": [64, 64]}, "val": {"count": 4, "seed": 1, "size": [64, 64]}})


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_a_fresh_fit_into_a_folder_holding_a_run_s_checkpoints_is_refused(tmp_path):
    """A second fit without --ckpt_path wrote last-v1.ckpt beside last.ckpt, a second best-* and a new
    config.yaml into the first run's folder: now one line, and nothing in the folder changes."""
    run = tmp_path / "run"
    quickstart(run, 1, "--data.splits", SMALL)
    before = _files(run)
    error = _one_error(quickstart(run, 1, "--data.splits", SMALL, check=False))
    assert str(run / "checkpoints") in error and "--ckpt_path last" in error and "--trainer.default_root_dir" in error
    assert _files(run) == before


def test_a_run_s_config_given_back_is_never_overwritten_and_does_not_resume_by_itself(tmp_path):
    """config.yaml given back as --config was rewritten by the run it started (max_epochs 1 for a run
    that never happened); it stored ckpt_path, and a max_epochs below the checkpoint's epochs was a
    MisconfigurationException traceback."""
    import yaml
    from conftest import REPO, run_python

    run = tmp_path / "run"
    quickstart(run, 2, "--data.splits", SMALL)
    config = run / "config.yaml"
    saved = config.read_bytes()
    assert yaml.safe_load(saved).get("ckpt_path") is None

    def again(*extra: str):
        env = dict(os.environ, WANDB_MODE="offline")
        return run_python(REPO / "train.py", ["fit", "--config", str(config), *extra], REPO, env, timeout=600)

    error = _one_error(again("--ckpt_path", "last", "--trainer.max_epochs", "1"))
    assert "has trained 2 epochs" in error and "--trainer.max_epochs 3" in error, error
    assert config.read_bytes() == saved and not (run / "config-2.yaml").exists()

    proc = again("--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert config.read_bytes() == saved
    resumed = yaml.safe_load((run / "config-2.yaml").read_text())
    assert resumed["trainer"]["max_epochs"] == 3 and resumed.get("ckpt_path") is None
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2

    # given back without --ckpt_path, it neither resumes silently nor mixes a second run into the folder
    assert "--ckpt_path last" in _one_error(again())
    assert config.read_bytes() == saved

    # a validate run in the fit's folder (not given its config) leaves the fit's record as it is
    env = dict(os.environ, WANDB_MODE="offline")
    proc = run_python(REPO / "train.py", ["validate", "--config", "configs/quickstart.yaml", "--data.splits", SMALL,
                                          "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
                                          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")], REPO, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert config.read_bytes() == saved and "is the record of the run there" in proc.stderr
    assert yaml.safe_load((run / "config-3.yaml").read_text())["trainer"]["max_epochs"] == 5  # the quickstart's


def test_a_model_config_or_pretrained_folder_that_is_no_model_is_one_line(tmp_path, monkeypatch, capsys):
    """--model.config given a JPEG was a UnicodeDecodeError traceback; --model.pretrained given an empty
    folder, or one without config.json, a ValueError ("Unrecognized model ... model_type key")."""
    from conftest import REPO
    from PIL import Image

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    base = ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false"]
    cases = [(["--model.config", str(tmp_path / "img.jpg")], f"{tmp_path / 'img.jpg'}: not a text file"),
             (["--model.config", "null", "--model.pretrained", str(tmp_path / "empty")], "an empty folder"),
             (["--model.config", "null", "--model.pretrained", str(tmp_path / "notes")], "a folder without config.json"),
             # a config JSON as the pretrained model went to torch.load: an unpickling traceback
             (["--model.pretrained", str(REPO / "configs" / "models" / "dpt-tiny.json")],
              "a DPTConfig JSON goes in model.config"),
             (["--model.pretrained", str(tmp_path / "img.jpg")], "a file, not a model directory"),
             (["--model.pretrained", str(tmp_path / "other.CKPT")], "other.CKPT"),  # read as a checkpoint: not one
             # transformers 5 checks each setting's type: its StrictDataclassFieldValidationError was a traceback
             (["--model.config", str(tmp_path / "typo.json")], "not a model config (Validation error for field 'hidden_size'")]
    (tmp_path / "typo.json").write_text('{"model_type": "dpt", "hidden_size": "32"}')
    (tmp_path / "other.CKPT").write_bytes(b"not a checkpoint")
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err[-2000:]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_mid_fit_says_how_to_resume_and_exits_130(tmp_path):
    """Ctrl-C ended a fit with exit 1 and no word (SIGTERM saves and says how to resume); the line
    leads with ``error:`` as every other tool's interrupted line does."""
    run = tmp_path / "run"
    proc = quickstart(run, 3, "--data.splits", SMALL, "--trainer.callbacks+=interrupt_helper.CtrlCAt", check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: interrupted (Ctrl-C) at step ")]
    assert len(lines) == 1 and "--ckpt_path last" in lines[0] and str(run / "checkpoints" / "last.ckpt") in lines[0]
    assert "Traceback" not in proc.stderr


def test_ctrl_c_after_the_last_checkpoint_says_which_step_it_holds(tmp_path):
    """Ctrl-C at step 6 of a run whose last.ckpt was written at the end of epoch 0 (step 4): the line
    said "resume from the last checkpoint" without saying that the two steps since are not in it."""
    run = tmp_path / "run"
    proc = quickstart(run, 3, "--data.splits", SMALL, "--data.batch_size", "2",
                      "--trainer.callbacks+=interrupt_helper.CtrlCAt", "--trainer.callbacks.batch=2", check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 4
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: interrupted (Ctrl-C) at step 6;"))
    assert "it holds step 4: the 2 steps since are not in it" in line, line


@needs(CAMVID)
def test_a_label_set_of_one_class_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    """A segmentation model over one class has nothing to choose between: the run trained, then its
    first validation ended in a traceback (``diag(): ... Got 0D``) from the 1x1 confusion matrix."""
    from conftest import REPO, SHARED

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    labels = tmp_path / "road.yaml"
    labels.write_text("names: [Road]\nvalue_map: {" + ", ".join(f"{v}: {0 if v == 3 else 255}" for v in range(12))
                      + "}\n")
    rc = main(["fit", "--config", "configs/camvid.yaml", "--data.root", str(CAMVID), "--data.labels", str(labels),
               "--model.class_weights", "null", "--model.config", str(SHARED / "bench" / "dpt-bench-tiny.json"),
               "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.default_root_dir",
               str(tmp_path / "run")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "1 class (Road)" in errors[0] and "at least 2" in errors[0], errors
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize("args, named", [
    (["--config", "configs/depth/7scenes.yaml", "--data.cache", "disk"], "data.cache"),  # depth caches in memory only
    (["--config", "configs/camvid.yaml", "--data.batch_size", "abc"], "data.batch_size"),
    # a blank value: jsonargparse's whole "Does not validate against any of the Union subtypes" (g2 review)
    (["--config", "configs/camvid.yaml", "--seed_everything", " "], "seed_everything: expected bool or int, given an empty value"),
    (["--config", "configs/camvid.yaml", "--trainer.max_steps", " "], "trainer.max_steps: expected int, given an empty value"),
    (["--config", "configs/camvid.yaml", "--model.lrr", "0.1"], "--model.lrr"),
    # a YAML word for true or false is said as typed (it was "given True")
    (["--config", "configs/camvid.yaml", "--data.batch_size", "yes"], "data.batch_size: expected int, given yes (read as true)"),
    (["--config", "configs/camvid.yaml", "--model.lr=off"], "model.lr: expected float, given off (read as false)"),
    # one key of a mapping setting: it said "given NestedArg(key='mIoU', val='abc')"
    (["--config", "configs/multitask/camvid-7scenes.yaml", "--model.references.mIoU", "abc"],
     "the command line: model.references.mIoU: expected float, given abc"),
    (["--config", "configs/multitask/camvid-7scenes.yaml", "--model.references.mIoU", "null"],
     "the command line: model.references.mIoU: expected float, given null"),
    (["--config", "configs/multitask/camvid-7scenes.yaml", "--model.references.mIoU", "[1,2]"],
     "the command line: model.references.mIoU: expected float, given [1, 2]"),
    (["--config", "configs/multitask/camvid-7scenes.yaml", "--model.references.mIoU="],
     "the command line: model.references.mIoU: expected float, given an empty value"),
])
def test_a_setting_of_the_wrong_type_or_name_is_one_line(args, named, monkeypatch, capsys):
    """jsonargparse printed the whole usage (110 lines) and a two-line message before the error."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["fit", *args, "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err[:5]
    assert "dptune fit --help" in err[0] or "--help" in err[0]


@pytest.mark.parametrize("text, where, shown", [
    ("trainer:\n  max_epochs: abc\n", "trainer.max_epochs", ["int or null", "abc"]),
    ("model:\n  lr: [1, 2]\n", "model.lr", ["float", "[1, 2]"]),
    ("model:\n  nosuch: 3\n", "model.nosuch", ["no such setting"]),
    ("trainer:\n  precision: 99x\n", "trainer.precision", ["'bf16-mixed'", "'auto'", "99x"]),
    # the preset sets each of these too: the file whose value was refused is named, not the first that has the key
    ("trainer:\n  max_epochs: 1e3\n", "trainer.max_epochs", ["int or null", "1000.0"]),  # YAML 1.1: a string
    ("trainer:\n  max_epochs:\n    a: 1\n", "trainer.max_epochs", ["int or null", "{'a': 1}"]),
    ("model:\n  val_mode: sliding\n", "model.val_mode", ["one of 'resize', 'slide'", "sliding"]),
    ("trainr:\n  max_epochs: 3\n", "trainr.max_epochs", ["no such setting"]),
    ("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n      init_args:\n"
     "        monitor: val/mIoU\n        patience: abc\n", "trainer.callbacks", ["EarlyStopping: patience: expected int"]),
    ("trainer:\n  callbacks:\n    - class_path: no.such.Cls\n", "trainer.callbacks", ["no.such.Cls: No module"]),
])
def test_a_config_files_bad_setting_names_the_file(text, where, shown, monkeypatch, capsys, tmp_path):
    """A wrong value in a config file was one line naming the key but not the file that gave it (a run
    takes several files), and a value of a Union type (``max_epochs: abc``) came with jsonargparse's
    list of subtype errors."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    bad = tmp_path / "mine.yaml"
    bad.write_text(text)
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(bad), "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err[:5]
    assert err[0].startswith(f"error: {bad}: {where}: "), err[0]
    assert all(s in err[0] for s in shown) and "<class" not in err[0] and "Subtypes" not in err[0], err[0]


def test_a_bad_setting_names_where_it_was_given(monkeypatch, capsys, tmp_path):
    """The same key in a file and on the command line: the error names the one that gave the bad value."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  batch_size: 4\n")
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(good), "--data.batch_size", "x",
               "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and str(good) not in err[0], err
    assert err[0].startswith("error: the command line: data.batch_size: expected int"), err[0]
    # a config given before the subcommand, under its name, is named as well
    nested = tmp_path / "nested.yaml"
    nested.write_text("fit:\n  trainer:\n    max_epochs: abc\n")
    rc = main(["--config", str(nested), "fit", "--config", "configs/quickstart.yaml", "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {nested}: trainer.max_epochs: "), err


@pytest.mark.parametrize("text, said", [
    ("task: [1, 2]\n", "task: expected one of segmentation, depth, multitask, given [1, 2]"),  # was a TypeError
    ("model: [1, 2, 3]\n", "model: a section of settings"),  # was accepted: every model setting dropped
    ("fit:\n  trainer: [max_epochs, 3]\n", "fit.trainer: a section of settings"),
    ("data: &a\n  x: *a\n", "a YAML alias refers to itself"),
    ("fit: [1, 2]\n", "fit: a section of settings"),  # an AttributeError traceback
    ("model:\n", "model: an empty section (nothing under it)"),  # "Unexpected config: model:", no file named
    ("fit:\n  trainer:\n", "fit.trainer: an empty section"),
])
def test_a_config_that_is_no_settings_is_one_line_naming_it(text, said, monkeypatch, capsys, tmp_path):
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    bad = tmp_path / "mine.yaml"
    bad.write_text(text)
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(bad), "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: ") and said in err[0], err


def test_a_section_may_be_a_file_of_its_settings_and_unclear_places_are_not_named(monkeypatch, capsys, tmp_path):
    """``data: part.yaml`` is jsonargparse's (the section's settings in a file of their own); a value
    refused with nothing to tell the places that set it apart names none of them (it named the first)."""
    import yaml
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    (tmp_path / "part.yaml").write_text("batch_size: 4\n")
    (tmp_path / "run.yaml").write_text(f"data: {tmp_path / 'part.yaml'}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "run.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["batch_size"] == 4
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--data", str(tmp_path / "missing.yaml"), "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "quickstart.yaml" not in err[0] and "missing.yaml" in err[0], err
    # a number as typed on the command line
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1e3", "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and err[0].startswith("error: the command line: trainer.max_epochs: expected int"), err
    # keys that are no strings do not break the check for self-referencing aliases
    (tmp_path / "date.yaml").write_text("model:\n  2024-01-01: 3\n")
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "date.yaml"), "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_a_config_before_the_subcommand_holds_its_settings_under_its_name(monkeypatch, capsys, tmp_path):
    """Given before ``fit``, a config's keys outside ``fit:`` were passed over without a word."""
    import yaml
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    top, under = tmp_path / "top.yaml", tmp_path / "under.yaml"
    top.write_text("data:\n  batch_size: 7\n")
    under.write_text("fit:\n  data:\n    batch_size: 7\n")
    rc = main(["--config", str(top), "fit", "--config", "configs/quickstart.yaml", "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and str(top) in err[0] and "data" in err[0] and "after the subcommand" in err[0]
    with pytest.raises(SystemExit):
        main(["--config", str(under), "fit", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["batch_size"] == 7
    # a path with a colon is a file that does not exist, not settings given inline
    rc = main(["fit", "--config", str(tmp_path / "no:such.yaml"), "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and err == [f"error: {tmp_path / 'no:such.yaml'}: no such config file"], err


def test_a_starting_point_on_the_command_line_replaces_a_presets(monkeypatch, capsys, tmp_path):
    """The backbone presets name a hub checkpoint; ``--model.config tiny.json`` beside one was refused
    ("give exactly one of model.pretrained or model.config") where any other command-line value
    replaces a config file's."""
    import yaml
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    preset = ["fit", "--config", "configs/camvid.yaml", "--config", "configs/backbones/dinov2.yaml"]
    tiny = "configs/models/dpt-dinov2-tiny.json"
    with pytest.raises(SystemExit) as done:
        main([*preset, "--model.config", tiny, "--print_config"])
    assert done.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["config"] == tiny and model["pretrained"] is None and model["backbone"] == "dinov2"
    # the other way round: a hub id on the command line replaces a config file's model.config
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", "--model.pretrained", "Intel/dpt-large-ade", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["pretrained"] == "Intel/dpt-large-ade" and model["config"] is None
    # clearing the preset's start on the command line, with the other from a second config file, still works
    (tmp_path / "tiny.yaml").write_text(f"model:\n  config: {tiny}\n")
    with pytest.raises(SystemExit):
        main([*preset, "--config", str(tmp_path / "tiny.yaml"), "--model.pretrained", "null", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["config"] == tiny and model["pretrained"] is None
    # the last value of a key counts: given, then cleared, it is not a starting point
    with pytest.raises(SystemExit):
        main([*preset, "--model.config", tiny, "--model.config", "null", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["pretrained"] == "facebook/dinov2-small" and model["config"] is None
    # both on the command line: still one line saying to give one
    rc = main([*preset, "--model.config", tiny, "--model.pretrained", "facebook/dinov2-small",
               "--trainer.default_root_dir", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "exactly one of model.pretrained" in err[0], err


@pytest.mark.parametrize("setting, named", [("--trainer.max_steps=-5", "max_steps"),
                                            ("--trainer.devices=[0,", "devices")])
def test_trainer_settings_lightning_refuses_are_one_line(setting, named, monkeypatch, capsys, tmp_path):
    """Lightning's own checks when it builds the trainer ended in a 40-line traceback, exit 1."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["fit", "--config", "configs/quickstart.yaml", setting, "--trainer.default_root_dir", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert rc == 2 and len(err) == 1 and named in err[0], err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_bug_while_the_trainer_is_built_keeps_its_traceback(monkeypatch, tmp_path):
    """Only Lightning's own checks become a "trainer settings" line: a TypeError from dptune's code
    (a bug) was said as a setting the user gave, exit 2, no traceback."""
    from conftest import REPO

    import dptune.training.hardware as hardware
    from dptune.cli import main

    def bug(settings):
        return None + 1

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(hardware, "_cpu_settings_for", bug)
    with pytest.raises(TypeError, match="NoneType"):
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path)])


def test_an_inline_model_config_with_a_wrong_typed_setting_is_one_line(monkeypatch, capsys, tmp_path):
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--model.config", '{"model_type": "dpt", "hidden_size": "big"}',
               "--trainer.default_root_dir", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: the command line: model.config: not a model config"), err


@pytest.mark.parametrize("settings, named", [
    (["--model.lr", "-1"], "model.lr"),  # torch's ValueError traceback once the data had loaded
    (["--model.lr", "0"], "model.lr"),  # trained nothing, without a word
    (["--model.lr", "1e999"], "model.lr"),  # inf: diverged at step 2
    (["--model.betas", "[1.5, 0.9]"], "model.betas"),
    (["--model.weight_decay", "-0.1"], "model.weight_decay"),
    (["--model.optimizer", "sgd", "--model.momentum", "-1"], "model.momentum"),
    (["--model.warmup_ratio", "2"], "model.warmup_ratio"),
    (["--model.warmup_steps", "-5"], "model.warmup_steps"),
    (["--model.min_lr_ratio", "1.5"], "model.min_lr_ratio"),
    (["--model.poly_power", "-1"], "model.poly_power"),
    (["--model.layer_decay", "0"], "model.layer_decay"),
    (["--model.head_lr_mult", "-1"], "model.head_lr_mult"),
])
def test_optimizer_settings_out_of_range_are_one_line_before_any_data_loads(settings, named, monkeypatch, capsys,
                                                                           tmp_path):
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["fit", "--config", "configs/quickstart.yaml", *settings, "--trainer.max_steps", "2",
               "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert rc == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in err, (settings, err[-1500:])
    assert lines[0].startswith(f"error: the command line: {named} "), lines  # where the value in effect was given
    assert "checking" not in err and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("text, named", [
    ("model:\n  warmup_ratio: 1.5\n", "model.warmup_ratio"),
    ("model:\n  lr: .inf\n", "model.lr"),
    ("data:\n  splits:\n    train:\n      images: train/*.jpg\n      masks: trainannot/{idx}.png\n"
     "    val:\n      images: val/*.jpg\n      masks: valannot/{stem}.png\n", "data.splits.train.masks"),
])
def test_a_setting_dptune_refuses_names_the_file_that_gave_it(text, named, monkeypatch, capsys, tmp_path):
    """dptune's own checks (a range, a template) named the setting but not the config file it came
    from, as jsonargparse's type errors do."""
    from conftest import CAMVID, REPO, SHARED

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    rc = main(["fit", "--config", "configs/camvid.yaml", "--config", str(mine), "--data.root", str(CAMVID),
               "--model.config", str(SHARED / "bench" / "dpt-bench-tiny.json"), "--trainer.max_steps", "1",
               "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {mine}: {named}"), err[-1500:]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_place_named_is_the_last_that_set_the_key_or_a_key_around_it(tmp_path):
    from dptune.cli.places import named_where

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data:\n  root: x\n  splits:\n    train:\n      images: i/*.jpg\n      masks: m/{stem}.png\n")
    b.write_text("data:\n  batch_size: 2\n")  # a data section without the key
    said = "data.splits.train.masks: m/{oops}.png: unknown placeholder {oops}"
    splits = '{train: {images: i/*.jpg, masks: "m/{oops}.png"}}'
    assert named_where(said, ["fit", "--config", str(a), "--config", str(b)]) == f"{a}: {said}"
    assert named_where(said, ["fit", "--config", str(a), "--data.splits", splits]) == f"the command line: {said}"
    assert named_where(said, ["fit", "--config", str(a), f"--data.splits={splits}", "--config", str(b)]) == \
        f"the command line: {said}"
    assert named_where(said, ["fit", "--config", str(a), "--data", f"{{splits: {splits}}}"]) == \
        f"the command line: {said}"
    assert named_where(said, ["fit", "--config", str(b)]) == said  # nobody set it: nothing to name
    section = tmp_path / "section.yaml"  # a section given as a file of its settings
    section.write_text("splits:\n  train:\n    images: i/*.jpg\n    masks: m/{oops}.png\n")
    c = tmp_path / "c.yaml"
    c.write_text(f"data: {section}\n")
    assert named_where(said, ["fit", "--config", str(c)]) == f"{section}: {said}"  # the file that holds it
    assert named_where(said, ["fit", "--config", str(a), "--data", str(section)]) == f"{section}: {said}"
    # a section file without the key sets none of it: the earlier place's value is in effect
    d = tmp_path / "d.yaml"
    d.write_text("batch_size: 4\n")
    e = tmp_path / "e.yaml"
    e.write_text(f"data: {d}\n")
    assert named_where(said, ["fit", "--config", str(a), "--data", str(d)]) == f"{a}: {said}"
    assert named_where(said, ["fit", "--config", str(a), "--config", str(e)]) == f"{a}: {said}"
    # a later file that sets the key wins over an earlier command-line value
    assert named_where(said, ["fit", "--data.splits", splits, "--config", str(a)]) == f"{a}: {said}"


def test_the_folders_a_run_config_names_for_its_root_follow_a_new_root_and_no_others(tmp_path):
    from jsonargparse import Namespace

    from dptune.cli.run_root import follow_the_root

    old, new = tmp_path / "old", tmp_path / "new"
    saved = tmp_path / "config.yaml"
    saved.write_text(f"trainer:\n  default_root_dir: {old}\ncheckpoint:\n  dirpath: {old}/checkpoints\n")

    def cfg(dirpath, save_dir):
        logger = Namespace(class_path="x.Logger", init_args=Namespace(save_dir=save_dir))
        return Namespace(trainer=Namespace(default_root_dir=str(new), logger=logger),
                         checkpoint=Namespace(dirpath=dirpath))

    args = ["fit", "--config", str(saved), "--trainer.default_root_dir", str(new)]
    got = cfg(f"{old}/checkpoints", str(old))
    follow_the_root(got, args, [got.trainer.logger])
    assert got.checkpoint.dirpath == str(new / "checkpoints") and got.trainer.logger.init_args.save_dir == str(new)
    # a folder given on the command line stays, even the earlier run's (the user asked for it)
    got = cfg(f"{old}/checkpoints", str(old))
    follow_the_root(got, [*args, "--checkpoint.dirpath", f"{old}/checkpoints", "--trainer.logger.init_args.save_dir",
                          str(old)], [got.trainer.logger])
    assert got.checkpoint.dirpath == f"{old}/checkpoints" and got.trainer.logger.init_args.save_dir == str(old)
    # another folder the file names stays too
    got = cfg(str(tmp_path / "elsewhere"), str(tmp_path / "logs"))
    follow_the_root(got, args, [got.trainer.logger])
    assert got.checkpoint.dirpath == str(tmp_path / "elsewhere") and got.trainer.logger.init_args.save_dir == str(
        tmp_path / "logs")


def test_a_key_deep_inside_a_mapping_setting_changes_that_key_and_keeps_the_rest(monkeypatch, capsys, tmp_path):
    """jsonargparse sets one key of a mapping setting from the command line and took anything deeper
    as that key's whole value: ``--data.splits.train.count 32`` on the quickstart replaced the train
    split by ``{count: 32}`` (its size and seed silently back to defaults), ``--data.splits.train.masks``
    on CamVid lost the split's images (and blamed the config file), and on the joint config
    ``--data.segmentation.splits.train.masks`` dropped both splits (``unknown stages ['train.masks']``)."""
    import yaml
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)

    def printed(*args: str) -> dict:
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    splits = printed("--config", "configs/quickstart.yaml", "--data.splits.train.count", "32")["data"]["splits"]
    assert splits["train"] == {"count": 32, "seed": 0, "size": [128, 128]} and splits["val"]["count"] == 64, splits
    splits = printed("--config", "configs/camvid.yaml", "--data.splits.train.masks=trainannot/{stem}_L.png",
                     "--data.splits.val.images", "val/0001*.jpg")["data"]["splits"]
    assert splits == {"train": {"images": "train/*.jpg", "masks": "trainannot/{stem}_L.png"},
                      "val": {"images": "val/0001*.jpg", "masks": "valannot/{stem}.png"}}, splits
    data = printed("--config", "configs/multitask/camvid-7scenes.yaml",
                   "--data.segmentation.splits.train.masks", "{stem}.png", "--data.depth.splits.val.depth", "d/{id}.png",
                   "--data.depth.root", "elsewhere")["data"]
    assert data["segmentation"]["splits"] == {"train": {"images": "train/*.jpg", "masks": "{stem}.png"},
                                              "val": {"images": "val/*.jpg", "masks": "valannot/{stem}.png"}}, data
    assert data["segmentation"]["root"] == "../shared/data/camvid" and data["depth"]["root"] == "elsewhere"
    assert data["depth"]["splits"]["val"] == {"images": "val/rgb/*.jpg", "depth": "d/{id}.png"}, data
    # values typed as jsonargparse types them; later options see earlier ones; no config: built from nothing
    splits = printed("--config", "configs/quickstart.yaml", "--data.splits.test.size", "[64, 96]",
                     "--data.splits.test.count", "8")["data"]["splits"]
    assert splits["test"] == {"size": [64, 96], "count": 8}, splits
    # a setting that holds a list of sources has no key to reach into: one line naming the option
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"data": {"segmentation": [
        {"root": "a", "splits": {"train": {"images": "*.jpg", "masks": "{stem}.png"}}},
        {"root": "b", "splits": {"train": {"images": "*.jpg", "masks": "{stem}.png"}}}]}}))
    rc = main(["fit", "--config", "configs/multitask/camvid-7scenes.yaml", "--config", str(tmp_path / "two.yaml"),
               "--data.segmentation.splits.train.masks", "x.png", "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--data.segmentation.splits.train.masks" in err[0] and "list" in err[0], err
    # a value that starts with -, given with =; the order of the config's keys is kept
    splits = printed("--config", "configs/camvid.yaml", "--data.splits.val.masks=-{stem}.png")["data"]["splits"]
    assert list(splits["val"].items()) == [("images", "val/*.jpg"), ("masks", "-{stem}.png")], splits
    # a value forgotten, an empty key: one line naming the option (an empty key replaced the split)
    for args in (["--data.splits.train.masks"], ["--data.splits.train.masks", "--data.batch_size", "2"],
                 ["--data.splits.train..masks", "x"], ["--data.splits.train.masks.", "x"]):
        rc = main(["fit", "--config", "configs/camvid.yaml", *args, "--print_config"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {args[0]}: "), (args, err)
    # a key inside a value that is no mapping
    rc = main(["fit", "--config", "configs/camvid.yaml", "--data.splits.train.images.x", "1", "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "data.splits.train.images" in err[0] and "train/*.jpg" in err[0], err


@pytest.mark.parametrize("given, said", [
    ("{model: {lr: 1e-3}", "settings given inline that are not valid YAML: expected ',' or '}'"),
    ("model:\n  lr: [1e-3\n", "settings given inline that are not valid YAML"),
    ("model: [1", "no such config file, nor settings given inline (not valid YAML"),
])
def test_broken_settings_given_inline_are_one_line_saying_so(given, said, monkeypatch, capsys):
    """``--config`` takes a file or settings inline. Broken inline settings were jsonargparse's
    ``config: while parsing a flow mapping in "<unicode string>" ...``, and a text with ": " that is
    neither was only "no such config file"."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", given, "--print_config"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and said in err[0] and "<unicode string>" not in err[0], err


def test_a_seed_lightning_refuses_names_the_config_that_gave_it(tmp_path, monkeypatch, capsys):
    """seed_everything -1 ended in Lightning's ValueError traceback; then in a line without its file."""
    from conftest import REPO

    from dptune.cli import main

    monkeypatch.chdir(REPO)
    bad = tmp_path / "seed.yaml"
    bad.write_text("seed_everything: -1\n")
    rc = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(bad)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and err == [f"error: {bad}: seed_everything -1: a seed is a whole number from 0 to 4294967295 "
                               "(true draws one)"], err


def test_a_checkpoint_holding_a_setting_now_refused_still_loads_for_predict_and_export(tiny_config):
    """A slide_stride of 1.5 stored by a run that never slid (val_mode resize), or negative class
    weights, made the module refuse to be built, so predict and export refused the checkpoint."""
    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    m = SegmentationModule(config=dict(tiny_config), label_spec=LabelSet(names=["a", "b"]).to_dict(), image_size=64,
                           slide_stride=1.5, class_weights=[1.0, -0.1])
    assert m.hparams.slide_stride == 1.5


def test_a_fit_without_checkpoints_runs_and_says_so(tmp_path):
    """--trainer.enable_checkpointing false stopped every fit with Lightning's "found ModelCheckpoint in
    callbacks list": the checkpoint callback is dptune's own, not one the user added."""
    proc = quickstart(tmp_path / "run", 1, "--trainer.enable_checkpointing", "false")
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert "enable_checkpointing false: no checkpoint is written" in proc.stderr
    assert "best checkpoint:" not in proc.stderr
    # stopped, it still says so: Ctrl-C (130 and the line), SIGTERM (exit 0, so it must not read as a whole run)
    off = ("--trainer.enable_checkpointing", "false", "--data.splits", SMALL)
    proc = quickstart(tmp_path / "c", 3, *off, "--trainer.callbacks+=interrupt_helper.CtrlCAt", check=False)
    assert proc.returncode == 130 and "error: interrupted (Ctrl-C) at step " in proc.stderr, proc.stderr[-2000:]
    assert "nothing was saved (trainer.enable_checkpointing false)" in proc.stderr
    proc = quickstart(tmp_path / "t", 3, *off, "--trainer.callbacks+=sigterm_helper.SigtermAt",
                      "--trainer.callbacks.step=1")
    assert "SIGTERM: the run stopped at step 1 of " in proc.stderr and "nothing was saved" in proc.stderr


def test_seed_everything_true_or_false_draws_a_seed_and_records_it(tmp_path, monkeypatch):
    """``--seed_everything true`` ("true draws one", the error line says) ran every run with seed 0:
    Lightning 2.6 seeds 0 for true, so two such runs trained the same weights. Two runs draw two seeds,
    each the one config.yaml records, and train different weights; a run given a drawn seed repeats its run."""
    import yaml

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # left over from an earlier seed_everything in the shell's process
    seeds, weights = [], []
    # false (no seed) drew one too: the training order and augmentations are always seeded, and its
    # config.yaml said false, which given back did not repeat the run (g2 review)
    for name, seed_arg in (("a", "true"), ("b", "false"), ("c", None)):
        run = tmp_path / name
        proc = quickstart(run, 1, "--data.splits", SMALL, "--seed_everything", seed_arg or str(seeds[0]),
                          "--trainer.limit_val_batches", "1", "--trainer.precision", "32-true")
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed_everything"]
        assert isinstance(seed, int) and not isinstance(seed, bool)
        assert (f"seed_everything {seed_arg}: this run's seed is {seed} (config.yaml records it" in proc.stderr) \
            is (seed_arg is not None), proc.stderr[-2000:]
        seeds.append(seed)
        weights.append(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"])
    assert seeds[0] != seeds[1] and seeds[2] == seeds[0]
    keys = [k for k, v in weights[0].items() if v.is_floating_point()]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in keys)
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in keys)


def test_under_torchrun_the_first_process_says_the_seed(tmp_path):
    """torchrun sets LOCAL_RANK in every process, 0 in the first: the drawn seed's line (and a resume's)
    was said by none (g3 review)."""
    import sys

    from conftest import REPO
    from test_resume import SPLITS

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py", "fit",
            "--config", "configs/quickstart.yaml", "--data.splits", json.dumps(SPLITS), "--data.image_size", "64",
            "--data.crop_size", "64", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run"), "--seed_everything", "true"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("seed_everything true: this run's seed is") == 1, proc.stderr[-3000:]


def test_every_task_has_its_command_line_settings_and_classes():
    """The tasks are named once (``dptune.TASKS``: checkpoints, configs, inspect and the reference read
    it); the command line keeps each one's links and "best" checkpoint, and builds its classes."""
    from dptune import TASKS
    from dptune.cli.tasks import TASK_SETTINGS, task_classes

    assert tuple(TASK_SETTINGS) == TASKS
    classes = {task: task_classes(task) for task in TASKS}
    assert len({c for pair in classes.values() for c in pair}) == 2 * len(TASKS)


@pytest.mark.parametrize("setting", ["--trainer.default_root_dir", "--checkpoint.dirpath"])
def test_a_run_folder_that_cannot_be_a_folder_is_one_line(tmp_path, setting):
    """A file where the run's folder (or a parent of it) should be ended the fit in a NotADirectoryError
    traceback when the config was first written, with and without several processes (a user attack)."""
    from test_resume import quickstart

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    proc = quickstart(tmp_path / "run", 1, setting, str(blocker / "run"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and setting[2:] in errors[0] and f"{blocker} is a file, not a folder" in errors[0], errors
    assert blocker.read_text() == "not a folder"


def _logged_quickstart(run, *extra: str, wandb_mode: str | None = "offline", **env_extra: str):
    """The quickstart of tests/test_resume.py, 1 epoch, with its W&B logger on (offline)."""
    from conftest import REPO, run_python
    from test_resume import SPLITS

    args = ["fit", "--config", "configs/quickstart.yaml", "--data.splits", json.dumps(SPLITS),
            "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "8",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(PYTHONPATH=str(REPO / "tests"), NETRC=str(run) + ".no-netrc")
    if wandb_mode is not None:
        env["WANDB_MODE"] = wandb_mode
    env.update(env_extra)
    return run_python(REPO / "train.py", args, REPO, env, timeout=600)


@pytest.mark.parametrize("wandb_mode,extra,said", [
    ("bogus", [], "WANDB_MODE 'bogus': W&B takes one of online, offline, disabled"),
    ("bogus", ["--trainer.logger.init_args.mode", "offline"], "WANDB_MODE 'bogus'"),
    (None, ["--trainer.logger.init_args.mode", "Offline"], "trainer.logger.init_args.mode 'Offline'"),
])
def test_a_wandb_mode_wandb_does_not_take_is_one_line(tmp_path, wandb_mode, extra, said):
    """An unknown W&B mode ended in jsonargparse's traceback (it builds the logger as one choice of a typed
    setting and reports any error raised there as its own), with dptune's line inside it (a review)."""
    proc = _logged_quickstart(tmp_path / "run", *extra, wandb_mode=wandb_mode)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and said in errors[0], errors


def test_wandb_mode_set_but_empty_with_a_mode_given_trains_and_a_sigterm_run_ends_as_exit_0(tmp_path):
    """``WANDB_MODE=`` with ``--trainer.logger.init_args.mode offline`` still ended in wandb's traceback (only
    the mode dptune picks itself read the variable; wandb reads it whatever the mode). A run stopped by SIGTERM,
    its checkpoint saved, exits 0 and its W&B run was marked with exit code 1 (Lightning ends it with a
    SystemExit whose code is None; a review): marked 0, as the command exits."""
    from test_train import wandb_exit_codes

    run = tmp_path / "run"
    proc = _logged_quickstart(run, "--trainer.logger.init_args.mode", "offline",
                              "--trainer.callbacks+=sigterm_helper.SigtermAtBatch", wandb_mode="")
    assert proc.returncode == 0 and "SIGTERM: saved" in proc.stderr, proc.stderr[-3000:]
    found = list((run / "wandb").glob("offline-run-*"))
    assert len(found) == 1 and wandb_exit_codes(found[0]) == [0]


def test_a_run_folder_through_a_dangling_link_is_one_line(tmp_path):
    """A run folder (or a parent of it) that is a link whose target is gone, as a ``runs -> /scratch/...``
    link after the scratch space was purged, passed the folder check and ended in a FileExistsError
    traceback when the config was first written (a review)."""
    from test_resume import quickstart

    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "purged")
    for root in (link, link / "run1"):
        proc = quickstart(root, 1, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"{link} is a link to {tmp_path / 'purged'}, which does not exist" in errors[0]


def test_a_second_fit_into_a_run_folder_given_with_a_tilde_is_refused(tmp_path):
    """``trainer.default_root_dir: ~/run`` (a config file does not expand it): the check for a run already in
    the folder looked for './~/run/checkpoints', found nothing, and the second fit wrote -v1 checkpoints beside
    the first run's and its config.yaml over the first's (a user attack); W&B made a folder named '~' in the
    working directory. ``~`` is expanded once, where the run's folders are settled."""
    from conftest import REPO, run_python
    from test_resume import SPLITS

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.splits", json.dumps(SPLITS),
            "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "8",
            "--model.config", str(REPO / "configs" / "models" / "dpt-tiny.json"),
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", "~/run", "--trainer.enable_progress_bar", "false"]
    env = dict(os.environ, HOME=str(home), WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"))
    first = run_python(REPO / "train.py", args, cwd, env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    config = (home / "run" / "config.yaml").read_bytes()
    second = run_python(REPO / "train.py", args, cwd, env, timeout=600)
    assert second.returncode == 2 and "already holds the checkpoints of a run" in second.stderr, second.stderr[-3000:]
    assert (home / "run" / "config.yaml").read_bytes() == config
    assert not list((home / "run" / "checkpoints").glob("*-v1.ckpt")) and not (cwd / "~").exists()


@pytest.mark.parametrize("case", ["save_dir_file", "wandb_file", "config_folder", "config_dangling"])
def test_files_in_the_way_of_the_run_files_are_one_line(tmp_path, case):
    """A file where the logger's save_dir is, a file named wandb in the run folder, a folder named config.yaml
    there: tracebacks (NotADirectoryError, FileExistsError, jsonargparse's PathError; a user attack)."""
    run = tmp_path / "run"
    run.mkdir()
    extra, said = [], ""
    if case == "save_dir_file":
        (tmp_path / "afile").write_text("x")
        extra, said = ["--trainer.logger.init_args.save_dir", str(tmp_path / "afile")], f"{tmp_path / 'afile'} is a file"
    elif case == "wandb_file":
        (run / "wandb").write_text("x")
        said = f"{run / 'wandb'} is a file, not a folder"
    elif case == "config_folder":
        (run / "config.yaml").mkdir()
        said = f"{run / 'config.yaml'} is a folder, where the run writes its config"
    else:
        (run / "config.yaml").symlink_to(tmp_path / "gone" / "c.yaml")
        said = f"{run / 'config.yaml'} is a link to {tmp_path / 'gone' / 'c.yaml'}, which does not exist"
    proc = _logged_quickstart(run, *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and said in errors[0], errors
    # refused before anything is built: no W&B run left behind (a review found one after the check had moved)
    assert not list(run.glob("wandb/offline-run-*"))


def test_online_wandb_without_credentials_is_one_line(tmp_path):
    """``WANDB_MODE=online`` with no credentials: wandb's UsageError traceback at the first log (a user
    attack). wandb itself decides whether it has credentials (a check of dptune's own refused a plain
    ``wandb login`` of wandb 0.31, a review); its refusal is one line."""
    proc = _logged_quickstart(tmp_path / "run", wandb_mode="online")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: W&B: ") and "WANDB_MODE=offline" in errors[0], errors


def test_a_wandb_server_address_wandb_does_not_take_is_one_line(tmp_path):
    """``WANDB_BASE_URL=https://app.wandb.ai`` (the UI's address, not the API's) ended an offline run in a
    pydantic ValidationError traceback from wandb's settings when the run started (a review)."""
    proc = _logged_quickstart(tmp_path / "run", WANDB_BASE_URL="https://app.wandb.ai")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: W&B: ") and "app.wandb.ai" in errors[0], errors
    assert "log offline" not in errors[0]  # it is offline already


def test_an_empty_wandb_variable_counts_as_unset(tmp_path):
    """``WANDB_BASE_URL=`` (exported, empty) ended every W&B run, offline ones too, in wandb's settings error
    after the model and data were built (a review); wandb refuses most of its variables empty."""
    proc = _logged_quickstart(tmp_path / "run", WANDB_BASE_URL="", WANDB_INIT_TIMEOUT="", WANDB_TAGS="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run").glob("wandb/offline-run-*"))


@pytest.mark.parametrize("case", ["short_netrc_key", "spaced_key", "binary_netrc"])
def test_credentials_wandb_refuses_are_one_line_with_the_right_advice(tmp_path, case):
    """A netrc key wandb refuses made the run log offline without a word (the same key in WANDB_API_KEY stopped
    it in one line); a key with a trailing space was refused with the advice to log offline, which fails the
    same way; a netrc that is not text under WANDB_MODE=online was wandb's UnicodeDecodeError traceback (a review)."""
    netrc = tmp_path / "netrc"
    env = {"NETRC": str(netrc), "WANDB_INIT_TIMEOUT": "5"}
    mode = None
    if case == "short_netrc_key":
        netrc.write_text("machine api.forge.coreweave.com login user password abc123\n")
        said, offline_advice = "40+ characters", True
    elif case == "spaced_key":
        env["WANDB_API_KEY"] = "a" * 40 + " "
        said, offline_advice = "whitespace", False
    else:
        netrc.write_bytes(bytes(range(128, 256)) * 2)
        mode, said, offline_advice = "online", f"{netrc}: not a text file", False
    netrc.touch()
    netrc.chmod(0o600)
    proc = _logged_quickstart(tmp_path / "run", wandb_mode=mode, **env)
    # wandb's telemetry thread (online runs) logs its own tracebacks at exit when it reads a netrc that is not text
    ours = proc.stderr.split("ERROR opentelemetry")[0]
    assert proc.returncode == 2 and "Traceback" not in ours, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: W&B: ") and said in errors[0], errors
    assert ("WANDB_MODE=offline" in errors[0]) == offline_advice, errors


def test_validate_into_a_run_folder_with_a_dangling_config_n_link_takes_the_next_name(tmp_path):
    """A validate run writes the first free config-N.yaml beside the run's config.yaml; a dangling link at
    config-2.yaml was taken for a free name and ended the command in jsonargparse's traceback (a review)."""
    from test_resume import quickstart

    run = tmp_path / "run"
    quickstart(run, 1)
    (run / "config-2.yaml").symlink_to(tmp_path / "gone" / "x.yaml")
    from conftest import REPO, run_python
    from test_resume import SPLITS

    out = run_python(REPO / "train.py", ["validate", "--config", str(run / "config.yaml"), "--data.splits",
                                         json.dumps(SPLITS), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")],
                     REPO, dict(os.environ, WANDB_MODE="offline"), timeout=600)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (run / "config-3.yaml").is_file() and (run / "config-2.yaml").is_symlink()


def test_a_monitor_whose_best_is_lowest_selects_the_lowest(tmp_path):
    """``--checkpoint.monitor val/loss`` kept the segmentation default ``mode: max``: the run named its worst
    epoch (the highest loss) "best" without a word (a review). The mode follows what the monitor measures, in a
    log line; every value the tasks log has a known direction."""
    import re

    import yaml

    from dptune.metrics.directions import monitor_mode

    assert [monitor_mode(k) for k in ("val/loss", "train/loss_aux", "val/abs_rel", "val/k1/abs_rel", "val/silog",
                                       "val/IoU/loss", "val/mIoU", "val/delta1", "val/delta_m", "epoch")] == \
        ["min", "min", "min", "min", "min", "max", "max", "max", "max", None]
    run = tmp_path / "run"
    proc = _logged_quickstart(run, "--checkpoint.monitor", "val/loss", "--trainer.max_epochs", "2",
                              "--checkpoint.save_top_k", "-1", wandb_mode="disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint.monitor val/loss: best is lowest, so checkpoint.mode is min (was max)" in proc.stderr
    scores = {p.name: float(re.search(r"loss([\d.]+)\.ckpt", p.name).group(1))
              for p in (run / "checkpoints").glob("best-*.ckpt")}
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    best = next(v["best_model_path"] for k, v in state.items() if "best_model_path" in v)
    assert len(scores) == 2 and Path(best).name == min(scores, key=scores.get), (scores, best)
    assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint"]["mode"] == "min"


def test_a_resume_whose_mode_now_follows_its_monitor_keeps_its_checkpoints_and_early_stopping_is_checked(tmp_path):
    """A run that selected val/loss by the default max (before the mode followed the monitor), resumed: Lightning
    files the checkpoint callback's state under a key holding the mode, so none of it came back: last-v1.ckpt
    beside a stale last.ckpt and a second best file (a review). An EarlyStopping on mIoU kept its default min and
    stopped a run as mIoU rose: one line now."""
    run = tmp_path / "run"
    proc = _logged_quickstart(run, "--checkpoint.monitor", "val/loss", wandb_mode="disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["callbacks"] if "'monitor': 'val/loss'" in k)
    ckpt["callbacks"][key.replace("'mode': 'min'", "'mode': 'max'")] = ckpt["callbacks"].pop(key)  # the earlier run's
    torch.save(ckpt, run / "checkpoints" / "old.ckpt")
    (run / "checkpoints" / "old.ckpt").replace(last)  # (last.ckpt is a hard link to the best: replaced, not written)
    proc = _logged_quickstart(run, "--checkpoint.monitor", "val/loss", "--trainer.max_epochs", "3",
                              "--ckpt_path", "last", wandb_mode="disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "now by min (what val/loss measures); its last and best checkpoints are kept" in proc.stderr
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(names) == 2 and "last.ckpt" in names and not any("-v1" in n for n in names), names
    stopped = _logged_quickstart(tmp_path / "run2", "--trainer.callbacks+=EarlyStopping",
                                 "--trainer.callbacks.monitor", "val/mIoU", wandb_mode="disabled")
    errors = [ln for ln in stopped.stderr.splitlines() if ln.startswith("error:")]
    assert stopped.returncode == 2 and len(errors) == 1, stopped.stderr[-3000:]
    assert "EarlyStopping monitor val/mIoU: best is highest, but its mode is min" in errors[0]
    assert "right after the --trainer.callbacks+= that adds it" in errors[0]  # the flag sets the last one added
