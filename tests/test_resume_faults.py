"""Resuming and scoring checkpoints through train.py: a run's settings are its own (what only changes
the run is applied and logged, what changes the model stops the run naming the setting), and a bad
checkpoint or config file is one ``error:`` line naming it, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs, run_python
from test_depth_train import DEPTH_TINY, depth_args
from test_finetune import joint_args
from test_train import TRAIN, camvid_args, run_train

pytestmark = [pytest.mark.slow, needs(CAMVID)]

SHORT = ["--trainer.logger", "false", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def stops(capsys, args: list[str], *parts: str) -> str:
    """``train.py ARGS`` run in this process (a fault is found before or as the checkpoint is read:
    no need to pay for a fresh interpreter) stops with one ``error:`` line holding ``parts``."""
    from dptune.cli import main

    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def with_epochs(args: list[str], epochs: int) -> list[str]:
    args = list(args)
    args[args.index("--trainer.max_epochs") + 1] = str(epochs)
    return args


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> dict:
    """A 1-epoch CamVid run (2 steps, 11 classes, the config's class weights)."""
    tmp = tmp_path_factory.mktemp("seg")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(TINY))
    args = [*camvid_args(tmp / "run", config, epochs=1), *SHORT]
    run_train(args, cwd=tmp)
    return {"tmp": tmp, "args": args, "config": config, "last": tmp / "run" / "checkpoints" / "last.ckpt"}


def fit_args(seg: dict, name: str, *extra: str, ckpt_path=None) -> list[str]:
    """The run resumed for a second epoch in ``name``."""
    args = with_epochs(seg["args"], 2)
    args[args.index("--trainer.default_root_dir") + 1] = str(seg["tmp"] / name)
    return [*args, "--ckpt_path", str(ckpt_path or seg["last"]), *extra]


def validate_args(seg: dict, *extra: str, ckpt_path=None) -> list[str]:
    return ["validate", *seg["args"][1:], "--trainer.default_root_dir", str(seg["tmp"] / "val"),
            "--ckpt_path", str(ckpt_path or seg["last"]), *extra]


# ---------------------------------------------------------------------- what a resume may change


def test_a_resume_trains_and_records_the_learning_rate_and_decay_this_run_sets(seg):
    """Lightning's CLI put the checkpoint's hyperparameters over the command line, and the restored
    optimizer and schedule kept the old LR and weight decay: --model.lr 0.123 trained at 5e-4."""
    assert ckpt(seg["last"])["hyper_parameters"]["lr"] == pytest.approx(5e-4)
    proc = run_train(fit_args(seg, "lr", "--model.lr", "0.123", "--model.weight_decay", "0.2"), cwd=seg["tmp"])
    changes = [ln[ln.index("resume: model."):] for ln in proc.stderr.splitlines() if "resume: model." in ln]
    assert changes == ["resume: model.lr 0.0005 -> 0.123 (this run's setting)",
                       "resume: model.weight_decay 0.05 -> 0.2 (this run's setting)"]  # and nothing else
    after = ckpt(seg["tmp"] / "lr" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4  # resumed at step 2, not started again
    assert after["hyper_parameters"]["lr"] == pytest.approx(0.123)
    groups = after["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.123] * len(groups))  # head_lr_mult 1
    assert after["lr_schedulers"][0]["base_lrs"] == pytest.approx([0.123] * len(groups))
    assert {g["weight_decay"] for g in groups} == {0.0, 0.2}
    # the Adam moments are the checkpoint's: every parameter's step count went on from 2
    assert {float(s["step"]) for s in after["optimizer_states"][0]["state"].values()} == {4.0}


def test_another_label_set_stops_on_the_label_set_not_on_a_setting_the_user_removed(seg, capsys):
    """camvid-merged5.yaml clears the 11-class weights; the checkpoint's were put back, and the run
    stopped on 'model.class_weights has 11 values for 5 classes'."""
    merged = ["--config", REPO / "configs" / "camvid-merged5.yaml"]
    line = stops(capsys, fit_args(seg, "merged", *merged), str(seg["last"]), "predicts 11 classes",
                 "label set has 5", "--model.pretrained")
    assert "class_weights" not in line
    stops(capsys, validate_args(seg, *merged), "predicts 11 classes", "label set has 5")


def test_a_resume_cannot_change_the_network_the_normalisation_or_the_optimizer(seg, capsys):
    """Each was replaced by the checkpoint's, silently (the run trained on, under settings other
    than the ones it was given)."""
    other = seg["tmp"] / "other.json"
    other.write_text(json.dumps({**TINY, "layer_norm_eps": 1e-6}))  # same tensors, another network
    stops(capsys, fit_args(seg, "net", "--model.config", other), "network has layer_norm_eps 1e-12", "1e-06")
    mean = ["--model.image_mean", "[0.4, 0.5, 0.5]", "--model.image_std", "[0.5, 0.5, 0.5]"]
    stops(capsys, fit_args(seg, "mean", *mean), "image_mean [0.5, 0.5, 0.5]", "[0.4, 0.5, 0.5]")
    stops(capsys, fit_args(seg, "sgd", "--model.optimizer", "sgd"), "model.optimizer is 'adamw'", "'sgd'")


def test_settings_that_regroup_the_parameters_stop_naming_the_groups(seg, capsys):
    """layer_decay splits the backbone into per-block groups: the checkpoint's optimizer state has
    no place in them (before: the checkpoint's layer_decay 1.0 silently replaced 0.9)."""
    stops(capsys, fit_args(seg, "ld", "--model.layer_decay", "0.9"), "4 parameter groups",
          "model.layer_decay changed")


# ---------------------------------------------------------------------- files that are not whole checkpoints


def _damaged(seg: dict, kind: str) -> Path:
    raw = seg["last"].read_bytes()
    path = seg["tmp"] / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    else:
        state = ckpt(seg["last"])
        if kind == "missing-tensor":
            del state["state_dict"]["model.head.head.0.weight"]
        elif kind == "nan-tensor":  # damaged bytes: torch keeps no checksum
            state["state_dict"]["model.head.head.0.weight"][0].fill_(float("nan"))
        else:  # weights only
            del state["optimizer_states"], state["lr_schedulers"]
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "empty", "random"])
def test_an_unreadable_ckpt_path_is_one_line_naming_it(seg, capsys, kind):
    """Lightning's loader raised a raw traceback that never named the file; for random bytes it
    advised the unsafe weights_only=False."""
    path = _damaged(seg, kind)
    for args in (fit_args(seg, kind, ckpt_path=path), validate_args(seg, ckpt_path=path)):
        line = stops(capsys, args, f"{path}: not a readable checkpoint")
        assert "weights_only" not in line and "DPTUNE_TRUST_CHECKPOINTS" not in line


def test_a_checkpoint_missing_a_tensor_is_one_line(seg, capsys):
    path = _damaged(seg, "missing-tensor")
    for args in (fit_args(seg, "missing", ckpt_path=path), validate_args(seg, ckpt_path=path)):
        stops(capsys, args, str(path), "lacks 1 of the model's", "model.head.head.0.weight")


def test_a_checkpoint_with_nan_weights_is_one_line_naming_it(seg, capsys):
    """Validate scored NaN weights as a real model (mIoU 0.0078); a resume stopped without naming the file."""
    path = _damaged(seg, "nan-tensor")
    for args in (fit_args(seg, "nan", ckpt_path=path), validate_args(seg, ckpt_path=path)):
        stops(capsys, args, str(path), "hold NaN/inf", "model.head.head.0.weight")


def test_the_same_classes_read_from_the_masks_another_way_stop_a_resume(seg, capsys, tmp_path):
    """Building and Road swapped by a map: the same 11 names, other pixels for two classes. The
    resume went on without a word."""
    import yaml

    spec = yaml.safe_load((CAMVID / "labels.yaml").read_text())
    swapped = {**spec, "map": {**{i: i for i in range(11)}, 1: 3, 3: 1, 11: "ignore"}}
    spec.pop("ignore_values", None)
    swapped.pop("ignore_values", None)
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(swapped))
    labels = ["--data.labels", str(tmp_path / "swapped.yaml")]
    for args in (fit_args(seg, "swapped", *labels), validate_args(seg, *labels)):
        stops(capsys, args, str(seg["last"]), "reads masks differently")


def test_lightning_s_last_best_and_hpc_that_stand_for_no_file_are_one_line(seg, capsys, tmp_path):
    """validate --ckpt_path last with no last.ckpt scored an untrained model (exit 0); best in a new
    process and hpc with no hpc checkpoint were tracebacks."""
    fresh = ["--trainer.default_root_dir", str(tmp_path / "fresh")]
    stops(capsys, [*validate_args(seg, ckpt_path="last"), *fresh], "--ckpt_path last: no", "untrained")
    stops(capsys, [*validate_args(seg, ckpt_path="best"), *fresh], "--ckpt_path best")
    stops(capsys, [*validate_args(seg, ckpt_path="hpc"), *fresh], "--ckpt_path hpc: no hpc_ckpt")


def test_a_missing_or_directory_config_is_one_line(tmp_path, capsys):
    for path, problem in ((tmp_path / "nope.yaml", "no such config file"), (tmp_path, "a directory")):
        stops(capsys, ["fit", "--config", path, "--trainer.default_root_dir", tmp_path / "run"], f"{path}: {problem}")


def test_a_refused_resume_leaves_the_run_s_config_yaml_as_it_was(seg, capsys):
    """Lightning wrote config.yaml (and started a W&B run) before the checkpoint was checked: a
    refused resume overwrote the run's record with the settings it refused."""
    run = seg["tmp"] / "run"
    before = (run / "config.yaml").read_bytes()
    args = fit_args(seg, "run", "--config", REPO / "configs" / "camvid-merged5.yaml", "--model.lr", "0.3")
    stops(capsys, args, "label set has 5")
    assert (run / "config.yaml").read_bytes() == before


def test_a_resume_with_nothing_left_to_train_says_so(seg, capsys):
    """A finished 1-epoch run resumed with --trainer.max_epochs 1 trained nothing and exited 0."""
    args = fit_args(seg, "nothing")
    args[args.index("--trainer.max_epochs") + 1] = "1"
    stops(capsys, args, "nothing is left to train", "--trainer.max_epochs")


def test_predict_and_export_of_a_checkpoint_missing_a_tensor_are_one_line(seg, tmp_path, capsys):
    from dptune.export.cli import main as export
    from dptune.tools.predict import main as predict

    path = _damaged(seg, "missing-tensor")
    assert export([str(path), str(tmp_path / "out")]) == 2
    image = sorted((CAMVID / "val").glob("*.jpg"))[0]
    assert predict(["--model", str(path), "--images", str(image), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and all("lacks 1 of the model's" in ln for ln in lines), lines


def test_a_weights_only_checkpoint_cannot_resume(seg, capsys):
    path = _damaged(seg, "weights-only")
    stops(capsys, fit_args(seg, "wo", ckpt_path=path), str(path), "optimizer_states", "--model.pretrained")


def test_a_damaged_last_checkpoint_is_one_line_too(seg, capsys):
    """``--ckpt_path last`` is resolved by Lightning; the file it picks is read by dptune's reader."""
    (seg["tmp"] / "lastrun" / "checkpoints").mkdir(parents=True)
    (seg["tmp"] / "lastrun" / "checkpoints" / "last.ckpt").write_bytes(seg["last"].read_bytes()[:1000])
    stops(capsys, fit_args(seg, "lastrun", ckpt_path="last"), "last.ckpt: not a readable checkpoint")


def test_a_remote_ckpt_path_is_refused(seg, capsys):
    """Lightning reads an http(s) checkpoint with weights_only=False: it could run code."""
    stops(capsys, fit_args(seg, "remote", ckpt_path="https://example.invalid/last.ckpt"),
          "https://example.invalid/last.ckpt", "download it first")


# ---------------------------------------------------------------------- checkpoints of another task


@pytest.fixture(scope="module")
def depth(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("depth")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(DEPTH_TINY))
    args = [*depth_args(tmp / "run", config, epochs=1), *SHORT]
    run_train(args, cwd=tmp)
    return {"tmp": tmp, "args": args, "last": tmp / "run" / "checkpoints" / "last.ckpt"}


@needs(KITCHEN)
def test_a_checkpoint_of_another_task_is_one_line(seg, depth, capsys):
    stops(capsys, fit_args(seg, "from-depth", ckpt_path=depth["last"]),
          f"{depth['last']}: a depth checkpoint; this run trains segmentation", "--task depth")
    stops(capsys, validate_args(seg, ckpt_path=depth["last"]), "a depth checkpoint; this run scores segmentation")
    stops(capsys, [*with_epochs(depth["args"], 2), "--ckpt_path", seg["last"]],
          "a segmentation checkpoint; this run trains depth")
    joint = joint_args(seg["tmp"] / "joint", ["--model.config", str(seg["config"])])
    stops(capsys, [*joint, "--ckpt_path", seg["last"]], "a segmentation checkpoint; this run trains multitask")


@needs(KITCHEN)
def test_a_multitask_resume_with_fixed_weighting_drops_the_learned_weights(tmp_path):
    """--model.weighting fixed on resuming a learned-weighting run was ignored (the checkpoint's
    setting came back); now it applies: the learned weights and their optimizer group are dropped."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    run = tmp_path / "run"
    args = [*joint_args(run, ["--model.config", str(tmp_path / "tiny.json")]), *SHORT[2:]]
    run_train(args, cwd=tmp_path)
    first = ckpt(run / "checkpoints" / "last.ckpt")
    assert any(k.startswith("weights.") for k in first["state_dict"])
    assert first["optimizer_states"][0]["param_groups"][-1]["name"] == "task"
    again = with_epochs(args, 2)
    again[again.index("--trainer.default_root_dir") + 1] = str(tmp_path / "fixed")
    proc = run_train([*again, "--model.weighting", "fixed", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")],
                     cwd=tmp_path)
    assert "resume: model.weighting uncertainty -> fixed (this run's setting)" in proc.stderr
    after = ckpt(tmp_path / "fixed" / "checkpoints" / "last.ckpt")
    assert after["hyper_parameters"]["weighting"] == "fixed"
    assert after["global_step"] > first["global_step"]
    assert not any(k.startswith("weights.") for k in after["state_dict"])
    assert [g["name"] for g in after["optimizer_states"][0]["param_groups"]] == [
        g["name"] for g in first["optimizer_states"][0]["param_groups"][:-1]]


# ---------------------------------------------------------------------- config files


@pytest.mark.parametrize("text, problem", [
    ("model:\n  lr: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "not a list"),
    ("just words\n", "not a str"),
    ("# only a comment\n", "an empty config"),
    ("model:\n  lr: 0.1\nmodel:\n  lr: 0.2\n", "key 'model' given twice"),
    ("a: &a [*a]\n", "refers to itself"),
])
def test_a_config_file_that_is_not_a_mapping_of_settings_is_one_line(tmp_path, capsys, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    for flag in (["--config", bad], [f"--config={bad}"], ["-c", bad]):
        stops(capsys, ["fit", *flag, "--trainer.default_root_dir", tmp_path / "run"], f"{bad}: ", problem)


def test_a_resume_says_each_data_setting_it_changes(seg, caplog):
    """A resume on another batch size and another training split trained on them without a word
    (the model's settings were said, ``resume: model.lr ...``)."""
    from dptune.cli import main

    splits = json.loads(seg["args"][seg["args"].index("--data.splits") + 1])
    splits["train"]["images"] = "train/0001TP_0069*.jpg"
    args = fit_args(seg, "data", "--data.batch_size", "1", "--data.splits", json.dumps(splits))
    with caplog.at_level("INFO", logger="dptune"):
        assert main([str(a) for a in args]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: data.")]
    assert said == ["resume: data.batch_size 2 -> 1 (this run's setting)",
                    f"resume: data.splits.train.images {TRAIN['images']} -> train/0001TP_0069*.jpg (this run's setting)"]


def test_a_resume_in_the_run_s_folder_keeps_its_config_yaml_and_writes_changed_settings_beside_it(seg, tmp_path):
    """A resume with --model.lr 0.123 in the run's own folder rewrote config.yaml: the record of the
    settings the first part trained with was gone. A requeued job (the same command again) writes the
    same file again, no third one."""
    run = tmp_path / "run"
    first = [str(a) for a in with_epochs(seg["args"], 1)]
    first[first.index("--trainer.default_root_dir") + 1] = str(run)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"))
    assert run_python(REPO / "train.py", first, tmp_path, env).returncode == 0
    before = (run / "config.yaml").read_bytes()
    cut = [*with_epochs(first, 3), "--model.lr", "0.123", "--ckpt_path", "last",
           "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=3"]
    proc = run_python(REPO / "train.py", cut, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "config.yaml").read_bytes() == before
    assert "lr: 0.123" in (run / "config-2.yaml").read_text()
    assert f"{run / 'config.yaml'} is the record of the run's earlier settings" in proc.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 3
    after_cut = (run / "config-2.yaml").read_bytes()
    # a validate in the folder writes its own record; the requeued job given the run's record back as
    # --config has the same settings: it rewrites that record as it is, and writes no other (a review)
    scored = run_python(REPO / "train.py", ["validate", "--config", str(run / "config-2.yaml"), "--ckpt_path", "last"],
                        tmp_path, env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    records = sorted(p.name for p in run.glob("config*.yaml"))
    proc = run_python(REPO / "train.py", ["fit", "--config", str(run / "config-2.yaml"), "--ckpt_path", "last"],
                      tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 6
    assert (run / "config-2.yaml").read_bytes() == after_cut
    assert sorted(p.name for p in run.glob("config*.yaml")) == records


def test_a_long_setting_a_resume_changes_is_shown_where_it_changes():
    """resume: data.root /lustre/.../lef... -> /lustre/.../lef...: two cluster paths cut at 77
    characters read as the same one (a review); each is shown from a little before they differ."""
    from dptune.tasks.resume import show_setting

    old = "/lustre/scratch/project/users/someone/datasets/cityscapes_fine_2048x1024/leftImg8bit/train/aachen"
    new = old.replace("aachen", "bochum")
    shown = show_setting(old, new), show_setting(new, old)
    assert shown[0] != shown[1] and shown[0].endswith("aachen") and shown[1].endswith("bochum")
    assert all(len(s) <= 83 for s in shown)
