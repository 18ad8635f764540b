"""A resume or a scoring run pointed at the wrong place, or given a setting that cannot run: one line
and a non-zero exit, nothing of another run overwritten (g2 review, a user's attack)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from test_resume import quickstart

from dptune.data.order import TrainOrder

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
    assert f"dptune validate --config {run / 'config.yaml'} --ckpt_path" in proc.stderr, proc.stderr[-3000:]


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


@pytest.mark.parametrize("batch, validated", [(16, [4, 6]), (32, [4, 5]), (64, [4, 5])])
def test_a_resume_with_larger_batches_trains_the_rest_of_the_epoch_and_validates_it(cut_at_step_3, tmp_path, batch,
                                                                                    validated):
    """Resumed with batches of 16 (2 steps an epoch) or 32 (1), fewer than the 3 done: Lightning counted the
    checkpoint's 3 batches of 8 as 3 of the new size and ended epoch 0 with no step and no validation (g5;
    then only said, with the checkpoint kept). The count is made this run's, at most one batch short of
    the epoch: the epoch trains the 8 samples it had not reached (and the rest of that batch from its
    start) and is scored; the schedule ends with the run. Batches of 64, more than the 32 samples: the
    step took 64 draws, each sample up to three times (g10); an epoch's batch is the set's 32."""
    import shutil

    from sigterm_helper import read_log, trained_per_epoch, validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    shutil.copytree(cut_at_step_3, run)
    order = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    first = TrainOrder(range(32), 1, 0, seed=next(v for k, v in order.items() if k.endswith("DataModule"))["seed"])
    proc = quickstart(run, 2, "--ckpt_path", "last", "--data.batch_size", str(batch),
                      "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}")
    step = min(batch, 32)
    assert f"epoch 0: the checkpoint's 3 batches of it count as {1 if batch == 16 else 0} at this run's" in proc.stderr
    assert f"epoch 0 continues with the 8 of its 32 training samples it had not reached, and {step - 8} from its " \
           "start" in proc.stderr, proc.stderr[-3000:]
    assert sorted(validations(log)) == validated
    rest = trained_per_epoch(read_log(log)[1])[0]
    assert rest[:8] == first.order(0)[24:].tolist() and rest[8:] == first.order(0)[:step - 8].tolist()
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == validated[-1] == end["lr_schedulers"][0]["last_epoch"]
    assert not list(run.glob("checkpoints/*not-validated*"))


@pytest.mark.parametrize("batch, validated", [(16, [2, 3, 4, 5]), (4, [2, 6, 10, 14])])
def test_a_validation_cut_mid_epoch_is_run_again_at_another_batch_size(tmp_path, batch, validated):
    """Cut inside the validation in the middle of epoch 0 (val_check_interval 0.5, after 16 samples),
    resumed with batches of 16 or 4: Lightning runs a cut validation again only where its restored count
    is a validation point. Kept at the checkpoint's 2 batches, at batches of 4 (a validation every 4) it
    was not: the validation was never run, and 8 samples were trained twice (g9, g10); at batches of 16 the
    rest of the epoch was not trained. Counted at a validation point of this run's, it is run, and the
    epoch then trains the samples it had not reached."""
    from sigterm_helper import read_log, trained_per_epoch, validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    every = ["--trainer.val_check_interval", "0.5", "--data.val_batch_size", "2",
             "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, *every, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=2")
    proc = quickstart(run, 2, *every, "--ckpt_path", "last", "--data.batch_size", str(batch))
    assert "epoch 0 step 2 val:" in proc.stderr, proc.stderr[-3000:]
    assert sorted(validations(log)) == validated
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen[0]) == list(range(32)) and sorted(seen[1]) == list(range(32))


def test_a_validation_cut_at_an_epoch_s_end_is_run_again_with_smaller_batches(tmp_path):
    """Cut inside epoch 0's last validation (4 batches of 8), resumed with batches of 4: Lightning took the
    4 batches for half of an 8-batch epoch, trained its first 16 samples again, and never ran the cut
    validation, without a word (g10). Counted as the whole epoch at the new size, the validation is run
    and epoch 1 follows."""
    from sigterm_helper import read_log, trained_per_epoch, validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    logged = ["--data.val_batch_size", "2", "--trainer.callbacks+=sigterm_helper.StepLog",
              f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, *logged, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=4")
    proc = quickstart(run, 2, *logged, "--ckpt_path", "last", "--data.batch_size", "4")
    assert "epoch 0 step 4 val:" in proc.stderr, proc.stderr[-3000:]
    assert sorted(validations(log)) == [4, 12]
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen[0]) == list(range(32)) and sorted(seen[1]) == list(range(32))


@pytest.mark.parametrize("every, step, batch, validated, steps", [
    (["--trainer.val_check_interval", "0.5"], 4, "6", [2, 4, 6, 8], 9),  # epoch 0's end; 5 batches of 6, every 2
    (["--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", "3"], 3, "16", [3, 6], 7),
])
def test_a_cut_validation_whose_count_is_no_validation_point_of_the_new_run_is_run_again(tmp_path, every, step,
                                                                                         batch, validated, steps):
    """Epoch 0's last validation cut, resumed in batches of 6 (5 an epoch, a validation every 2): the count
    was made the epoch's 5, no validation point, so the cut validation was never run, a 5th batch of samples
    the epoch had trained was trained, and the schedule ended one step early (g11). Validating every 3
    batches of the run (check_val_every_n_epoch null), the count was not aligned at all (g11). Counted at the
    last validation point at or before it, the validation is run, and the epoch ends there (at a validation
    point before the samples trained, the epoch's last batches are filled from its start, and said)."""
    from sigterm_helper import read_log, trained_per_epoch, validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    args = [*every, "--data.val_batch_size", "2", "--trainer.callbacks+=sigterm_helper.StepLog",
            f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, *args, "--trainer.callbacks+=sigterm_helper.SigtermAt", f"--trainer.callbacks.step={step}")
    proc = quickstart(run, 2, *args, "--ckpt_path", "last", "--data.batch_size", batch)
    assert f"epoch 0 step {step} val:" in proc.stderr and f"this run has {steps};" in proc.stderr, proc.stderr[-3000:]
    assert sorted(validations(log)) == validated
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == steps
    seen = trained_per_epoch(read_log(log)[1])  # every sample of each epoch (epoch 0's last batches filled)
    assert sorted(set(seen[0])) == list(range(32)) and len(seen[1]) == len(set(seen[1]))


def test_a_checkpoint_written_on_an_exception_resumes_the_rest_of_its_epoch(tmp_path):
    """`checkpoint.save_on_exception` writes the loop state of a batch started and not processed (ready 4,
    processed 3): the resume took it for a hand-made record, drew the epoch afresh and trained 8 samples
    twice and 8 not at all, even at the same batch size (g9). Lightning's restart counts its 3 complete
    batches, and so does the order."""
    from sigterm_helper import read_log, trained_per_epoch, validations

    run, log = tmp_path / "run", tmp_path / "steps.log"
    logged = ["--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, *logged, "--checkpoint.save_on_exception", "true",
               "--trainer.callbacks+=sigterm_helper.RaiseInStep", "--trainer.callbacks.step=3", check=False)
    proc = quickstart(run, 2, *logged, "--ckpt_path", "last")
    assert "epoch 0 continues with the 8 of its 32 training samples it had not reached\n" in proc.stderr, \
        proc.stderr[-3000:]
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen[0]) == list(range(32)) and sorted(validations(log)) == [4, 8]
    # the schedule spans the steps the run takes (the batch started on the exception is trained again)
    assert read_log(log)[1][-1]["lr"][0] > 0  # at LR 0 where the schedule was a step short


@pytest.mark.parametrize("batch, steps", [("8", 8), ("6", 9)])
def test_a_run_stopped_after_an_epoch_it_does_not_validate_resumes_the_next_one(tmp_path, batch, steps):
    """check_val_every_n_epoch 2, SIGTERM at epoch 0's last step: the epoch ended, but the loop state still
    holds its 4 batches, which the schedule took for 4 batches into epoch 1: "nothing is left to train"
    (g12). The run trains epoch 1 whole, and the schedule ends with it."""
    from sigterm_helper import read_log, trained_per_epoch

    run, log = tmp_path / "run", tmp_path / "steps.log"
    args = ["--trainer.check_val_every_n_epoch", "2", "--trainer.callbacks+=sigterm_helper.StepLog",
            f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, *args, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=4")
    proc = quickstart(run, 2, *args, "--ckpt_path", "last", "--data.batch_size", batch)
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == steps == end["lr_schedulers"][0]["last_epoch"], proc.stderr[-3000:]
    assert f"this run has {steps};" in proc.stderr or batch == "8"  # said where the length changes
    assert len(set(trained_per_epoch(read_log(log)[1])[1])) >= 30


def test_a_checkpoint_written_at_an_epoch_s_last_batch_resumed_with_smaller_batches_trains_the_next_epoch(tmp_path):
    """A ModelCheckpoint(every_n_train_steps=4) file of epoch 0's last batch, resumed in batches of 6 (5 an
    epoch): Lightning's restart counted 4 batches, below the new epoch's 5, took them for the next epoch's,
    and epoch 1 trained one batch of 6 samples, unsaid (g12). Counted as the whole of epoch 0 at the new
    size, epoch 1 trains its 5 batches."""
    from sigterm_helper import read_log, trained_per_epoch

    every = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             f"--trainer.callbacks.dirpath={tmp_path / 'every'}", "--trainer.callbacks.every_n_train_steps=4",
             "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename=s{step}"]
    quickstart(tmp_path / "run", 1, *every)
    log = tmp_path / "steps.log"
    proc = quickstart(tmp_path / "new", 2, "--ckpt_path", str(tmp_path / "every" / "sstep=4.ckpt"),
                      "--data.batch_size", "6", "--trainer.callbacks+=sigterm_helper.StepLog",
                      f"--trainer.callbacks.path={log}")
    assert "this run has 9;" in proc.stderr, proc.stderr[-3000:]
    assert [s["step"] for s in read_log(log)[1]] == [5, 6, 7, 8, 9]
    assert len(set(trained_per_epoch(read_log(log)[1])[1])) == 30


@pytest.mark.parametrize("damage, said", [
    (lambda p: p.pop("current"), "loops.fit_loop['epoch_loop.batch_progress'].current is missing"),  # KeyError
    (lambda p: p["current"].update(processed=-1), ".current.processed is -1, not a count"),  # no step, unsaid
    (lambda p: p["total"].update(ready=3.0), ".total.ready is 3.0, not a count"),
])
def test_a_damaged_loop_state_is_one_line_naming_the_file(cut_at_step_3, tmp_path, damage, said):
    """Lightning reads the loop state without a check: a missing count was a KeyError traceback, a negative
    or float one a run whose interrupted epoch got no step and no validation, said as the batch size's doing
    (g10)."""
    ckpt = torch.load(cut_at_step_3 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    damage(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"])
    torch.save(ckpt, tmp_path / "hand.ckpt")
    line = _error(quickstart(tmp_path / "new", 2, "--ckpt_path", str(tmp_path / "hand.ckpt"), check=False))
    assert f"{tmp_path / 'hand.ckpt'}: its loop state (where the run stands) is damaged: " in line and said in line
    assert not (tmp_path / "new").exists()


def test_a_hand_edited_count_far_beyond_the_set_is_not_a_traceback(cut_at_step_3, tmp_path):
    """consumed 2**63 - 1: an int64 overflow traceback as the order drew its positions (g10)."""
    ckpt = torch.load(cut_at_step_3 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    next(v for k, v in ckpt.items() if k.endswith("DataModule"))["consumed"] = 2**63 - 1
    torch.save(ckpt, tmp_path / "hand.ckpt")
    proc = quickstart(tmp_path / "new", 2, "--ckpt_path", str(tmp_path / "hand.ckpt"), "--data.batch_size", "16")
    assert "not one dptune wrote" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


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


def test_a_resume_with_larger_batches_in_the_last_epoch_trains_its_rest(cut_at_step_3, tmp_path):
    """max_epochs 1 and batches of 16: the checkpoint's 3 batches of 8 were a whole epoch at the new size,
    and the resume was refused as having nothing left to train (g5: before config-2.yaml was written). The
    8 samples the epoch had not reached are left: one step (with 8 from the epoch's start), then the
    epoch's validation."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_at_step_3, run)
    proc = quickstart(run, 1, "--ckpt_path", "last", "--data.batch_size", "16")
    assert "epoch 0 step 4 val:" in proc.stderr, proc.stderr[-3000:]
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == 4 == end["lr_schedulers"][0]["last_epoch"]


@pytest.mark.parametrize("change, said", [({"batches": 2}, "at batch 2 of epoch 0, its loop state at batch 3 of epoch 0"),
                                           ({"epoch": 1}, "at batch 3 of epoch 1, its loop state at batch 3 of epoch 0")])
def test_a_hand_edited_count_of_batches_or_epoch_is_drawn_afresh_with_a_warning(cut_at_step_3, tmp_path, change, said):
    """An order record whose batches or epoch are not the loop state's (hand-edited): which of them to
    re-express at the new batch size cannot be told, so the epoch is drawn afresh, and said. (An epoch
    edited ahead of the loops' was resumed as that epoch's rest, and Lightning then drew the whole epoch
    it was in and stopped it after the steps it counted left: some of its samples not trained, unsaid.)"""
    ckpt = torch.load(cut_at_step_3 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k in ckpt if k.endswith("DataModule"))
    ckpt[key].update(change)
    torch.save(ckpt, tmp_path / "hand.ckpt")
    proc = quickstart(tmp_path / "new", 2, "--ckpt_path", str(tmp_path / "hand.ckpt"), "--data.batch_size", "16")
    assert f"record of the training order is {said}: not a record dptune wrote" in proc.stderr, proc.stderr[-3000:]
    assert "continues with" not in proc.stderr


@pytest.mark.parametrize("key", ["--trainer.default_root_dir", "--checkpoint.dirpath", "--trainer.val_check_interval"])
def test_a_blank_folder_or_interval_is_one_line(tmp_path, key):
    """`--trainer.default_root_dir ""` trained into runs/dptune, `--checkpoint.dirpath ""` wrote checkpoints
    into the working folder past the check for a run there, a blank interval said "Invalid time format" (g5)."""
    said = _error(quickstart(tmp_path / "run", 1, key, "", check=False))
    assert f"{key[2:]}: given an empty value" in said
    assert not (tmp_path / "run").exists()
