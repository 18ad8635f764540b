"""A resume or a scoring run pointed at the wrong place, or given a setting that cannot run: one line
and a non-zero exit, nothing of another run overwritten (g2 review, a user's attack)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from test_resume import quickstart

pytestmark = pytest.mark.slow


def _digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    quickstart(run, 1)
    return run


def test_last_of_a_run_config_given_back_with_a_new_root_is_that_root_s(one_epoch, tmp_path):
    """`validate --config RUN/config.yaml --trainer.default_root_dir NEW --ckpt_path last` scored an
    untrained model and exited 0 (`last` was looked for in RUN's folder, and Lightning looked in NEW's);
    a fit the same way trained from epoch 0 without a word."""
    new = tmp_path / "validate"
    said = _error(_given_back(one_epoch, "validate", new))
    assert f"no {new / 'checkpoints' / 'last.ckpt'}" in said
    new = tmp_path / "fit"
    proc = _given_back(one_epoch, "fit", new, "--trainer.max_epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--ckpt_path last: no {new / 'checkpoints' / 'last.ckpt'} yet; the run starts from the beginning" \
        in proc.stderr, proc.stderr[-3000:]


def _given_back(run, sub, new, *extra):
    from conftest import REPO, run_python

    env = dict(os.environ, WANDB_MODE="offline")
    args = [sub, "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(new), "--ckpt_path", "last",
            "--trainer.logger", "false", *extra]
    return run_python(REPO / "train.py", args, REPO, env, timeout=600)


def test_a_checkpoint_resumed_into_another_run_s_folder_is_refused(one_epoch, tmp_path):
    """Run A's last.ckpt resumed with B's root, B holding a run of its own: B's last.ckpt was overwritten
    and the log said A's checkpoints had moved to B."""
    other = tmp_path / "b"
    quickstart(other, 1, "--seed_everything", "3")
    before = _digests(other / "checkpoints")
    proc = quickstart(other, 2, "--ckpt_path", str(one_epoch / "checkpoints" / "last.ckpt"), check=False)
    said = _error(proc)
    assert str(other / "checkpoints") in said and "already holds the checkpoints of a run" in said
    assert _digests(other / "checkpoints") == before and not (other / "config-2.yaml").exists()


def test_the_run_s_own_checkpoints_by_any_path_resume(one_epoch, tmp_path):
    """Its hpc_ckpt_*.ckpt (Lightning writes it in the root) and a link to its last.ckpt were refused as
    another run's (g3 review)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt")
    (tmp_path / "latest.ckpt").symlink_to(run / "checkpoints" / "last.ckpt")
    for epochs, path in ((2, run / "hpc_ckpt_1.ckpt"), (3, tmp_path / "latest.ckpt")):
        proc = quickstart(run, epochs, "--ckpt_path", str(path), check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 4 * epochs


@pytest.mark.parametrize("value", ["0", "-1"])
def test_accumulate_grad_batches_below_one_is_one_line(tmp_path, value):
    """0 ended in Lightning's ZeroDivisionError traceback; -1 in "lower data.batch_size"."""
    said = _error(quickstart(tmp_path / "run", 1, "--trainer.accumulate_grad_batches", value, check=False))
    assert f"trainer.accumulate_grad_batches {value}" in said


def test_a_mid_epoch_checkpoint_resumed_with_max_epochs_at_its_epoch_is_nothing_left_to_train(tmp_path):
    """Cut in epoch 2 (index 1) and resumed with --trainer.max_epochs 1: it said it continued the epoch,
    trained nothing and exited 0, last.ckpt as it was."""
    run = tmp_path / "run"
    quickstart(run, 2, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=6")
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 6
    before = _digests(run / "checkpoints")
    said = _error(quickstart(run, 1, "--ckpt_path", "last", check=False))
    assert "nothing is left to train" in said and "--trainer.max_epochs 2" in said
    assert _digests(run / "checkpoints") == before and not (run / "config-2.yaml").exists()


def test_a_resume_refused_as_nothing_left_to_train_writes_no_config(one_epoch):
    """It wrote a config-2.yaml (max_steps 1) of a run that never trained, and config-3.yaml the next time."""
    names = sorted(p.name for p in one_epoch.iterdir())
    said = _error(quickstart(one_epoch, 2, "--trainer.max_steps", "1", "--ckpt_path", "last", check=False))
    assert "nothing is left to train" in said
    assert sorted(p.name for p in one_epoch.iterdir()) == names


def test_a_last_checkpoint_that_is_a_broken_link_is_one_line(tmp_path):
    """last.ckpt linked to an unmounted disk: "no last.ckpt yet; the run starts from the beginning", and
    the run replaced the link with its own file."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").symlink_to(tmp_path / "unmounted" / "last.ckpt")
    said = _error(quickstart(run, 1, "--ckpt_path", "last", check=False))
    assert str(run / "checkpoints" / "last.ckpt") in said and "unmounted" in said
    assert (run / "checkpoints" / "last.ckpt").is_symlink()


def test_an_empty_ckpt_path_is_named(tmp_path):
    said = _error(quickstart(tmp_path / "run", 1, "--ckpt_path", "", check=False))
    assert "--ckpt_path" in said


def test_a_validation_cut_at_the_last_step_of_max_steps_is_said_on_resume(tmp_path):
    """SIGTERM in the validation at max_steps: the resume passed the check (a cut validation is left to
    run) and Lightning, at max_steps, ran nothing: no score, no word, exit 0 (g3 review)."""
    run = tmp_path / "run"
    limit = ["--trainer.max_steps", "8", "--data.val_batch_size", "2"]  # 4 validation batches: one is cut
    quickstart(run, -1, *limit, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=8")
    proc = quickstart(run, -1, *limit, "--ckpt_path", "last")
    assert "which Lightning does not run again once max_steps is reached" in proc.stderr, proc.stderr[-3000:]
    assert "dptune validate --config RUN/config.yaml --ckpt_path" in proc.stderr


def test_a_relative_path_that_starts_with_registry_is_a_file_and_is_refused_in_another_run_s_folder(one_epoch, tmp_path):
    """`--ckpt_path registry_copies/b.ckpt` (a file) was taken for Lightning's model registry, passed the
    check, and the resume wrote over the other run's last.ckpt (g5 review)."""
    import importlib.util
    import shutil

    from conftest import REPO, run_python

    other = tmp_path / "b"
    quickstart(other, 1, "--seed_everything", "3")
    before = _digests(other / "checkpoints")
    (tmp_path / "registry_copies").mkdir()
    shutil.copy(one_epoch / "checkpoints" / "last.ckpt", tmp_path / "registry_copies" / "a.ckpt")
    # `registry` itself is a file too where Lightning's registry package (litmodels) is not installed (g6)
    shutil.copy(one_epoch / "checkpoints" / "last.ckpt", tmp_path / "registry")
    names = ["registry_copies/a.ckpt"] + ([] if importlib.util.find_spec("litmodels") else ["registry"])
    for name in names:
        args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.config",
                str(REPO / "configs" / "models" / "dpt-tiny.json"), "--data.image_size", "64", "--data.crop_size",
                "64", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(other), "--trainer.logger",
                "false", "--ckpt_path", name]
        proc = run_python(REPO / "train.py", args, tmp_path, dict(os.environ, WANDB_MODE="offline"), timeout=600)
        assert f"resuming {name} there would mix two runs" in _error(proc)
        assert _digests(other / "checkpoints") == before


def test_a_hand_edited_order_record_of_another_type_is_a_warning_not_a_traceback(one_epoch, tmp_path):
    """A record whose `batches` is a string: TypeError in the nothing-left check, which reads the record
    before the record's own check (g5 review)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k in ckpt if k.endswith("DataModule"))
    ckpt[key].update(done=False, batches="2")
    torch.save(ckpt, tmp_path / "hand.ckpt")
    proc = quickstart(tmp_path / "new", 2, "--ckpt_path", str(tmp_path / "hand.ckpt"), check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "not one dptune wrote" in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def cut_at_step_3(tmp_path_factory):
    """Batches of 8 (4 steps an epoch), cut at step 3 of epoch 0."""
    run = tmp_path_factory.mktemp("cut3") / "run"
    quickstart(run, 2, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=3")
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 3
    return run


def test_a_resume_whose_larger_batches_leave_the_epoch_no_step_says_its_validation_does_not_run(cut_at_step_3, tmp_path):
    """Resumed with batches of 16 (2 steps an epoch, fewer than the 3 done): Lightning ended epoch 0 with
    no step and no validation; the log said only "continues with 0 of the 8" (g5 review). The warning
    named last.ckpt, which the run then wrote over with epoch 1's weights (g6 review): the checkpoint is
    kept under the epoch's name, and the command given scores it."""
    import shutil

    from sigterm_helper import validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    shutil.copytree(cut_at_step_3, run)
    proc = quickstart(run, 2, "--ckpt_path", "last", "--data.batch_size", "16",
                      "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}")
    assert "resume: epoch 0 ends at once" in proc.stderr and "its validation is not run" in proc.stderr, \
        proc.stderr[-3000:]
    kept = run / "checkpoints" / "epoch00-not-validated.ckpt"
    assert f"dptune validate --config RUN/config.yaml --ckpt_path {kept}" in proc.stderr, proc.stderr[-3000:]
    assert "continues with 0 of" not in proc.stderr
    assert len(validations(log)) == 1  # epoch 1's: Lightning ran none for epoch 0
    assert torch.load(kept, map_location="cpu")["global_step"] == 3
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 5
    # the kept file resumed in its turn is kept as it is: no second link to it (g8)
    proc = quickstart(run, 2, "--ckpt_path", str(kept), "--data.batch_size", "16")
    assert f"--ckpt_path {kept}" in proc.stderr and not list(run.glob("checkpoints/epoch00-not-validated-v*.ckpt")), proc.stderr[-3000:]


def test_a_cut_validation_resumed_with_larger_batches_is_run_without_a_warning(tmp_path):
    """Cut inside the validation in the middle of epoch 0 (val_check_interval 0.5), resumed with batches
    of 16: Lightning runs that validation on the checkpoint's weights, and the warning said it did not (g6)."""
    run = tmp_path / "run"
    every = ["--trainer.val_check_interval", "0.5", "--data.val_batch_size", "2"]
    quickstart(run, 2, *every, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=2")
    proc = quickstart(run, 2, *every, "--ckpt_path", "last", "--data.batch_size", "16")
    assert "ends at once" not in proc.stderr and "epoch 0 step 2 val:" in proc.stderr, proc.stderr[-3000:]


def test_a_strategy_that_restores_after_its_optimizers_runs_a_validation_cut_at_the_last_step(tmp_path):
    """FSDP and DeepSpeed read the checkpoint after configure_optimizers: the schedule did not know that a
    validation was left, and a resume cut in the run's last validation was refused as nothing left to
    train, after config-2.yaml was written (g6 review)."""
    run = tmp_path / "run"
    limit = ["--data.val_batch_size", "2"]  # 4 validation batches: one is cut
    quickstart(run, 1, *limit, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=4")
    proc = quickstart(run, 1, *limit, "--ckpt_path", "last", "--trainer.strategy",
                      '{"class_path": "sigterm_helper.LateRestore"}')
    assert "epoch 0 step 4 val:" in proc.stderr, proc.stderr[-3000:]


def test_a_resume_whose_larger_batches_leave_nothing_to_train_writes_no_config(cut_at_step_3, tmp_path):
    """max_epochs 1 and batches of 16: the schedule's check refused it after config-2.yaml was written
    (g5 review)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_at_step_3, run)
    names = sorted(p.name for p in run.iterdir())
    proc = quickstart(run, 1, "--ckpt_path", "last", "--data.batch_size", "16", check=False)
    assert "nothing is left to train" in _error(proc)
    assert sorted(p.name for p in run.iterdir()) == names
    assert "ends at once" not in proc.stderr  # a warning of a run that does not run (g6)


@pytest.mark.parametrize("key", ["--trainer.default_root_dir", "--checkpoint.dirpath", "--trainer.val_check_interval"])
def test_a_blank_folder_or_interval_is_one_line(tmp_path, key):
    """`--trainer.default_root_dir ""` trained into runs/dptune, `--checkpoint.dirpath ""` wrote checkpoints
    into the working folder past the check for a run there, a blank interval said "Invalid time format" (g5)."""
    said = _error(quickstart(tmp_path / "run", 1, key, "", check=False))
    assert f"{key[2:]}: given an empty value" in said
    assert not (tmp_path / "run").exists()
