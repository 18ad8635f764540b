"""Resume and clipping through train.py on the synthetic quickstart (no data files needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python
from sigterm_helper import read_log, trained_per_epoch, validations

pytestmark = pytest.mark.slow

SPLITS = {"train": {"count": 32, "seed": 0, "size": [64, 64]}, "val": {"count": 8, "seed": 1, "size": [64, 64]}}


def quickstart(run: Path, epochs: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["fit", "--config", "configs/quickstart.yaml", "--data.splits", json.dumps(SPLITS),
            "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "8",
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(run),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"))
    proc = run_python(REPO / "train.py", args, REPO, env, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")


def test_resume_into_a_longer_run_follows_the_longer_schedule(tmp_path):
    """1 epoch, then --ckpt_path last with 3 epochs: every resumed step trains at the LR of an
    uninterrupted 3-epoch run. (Before: the restored schedule kept the 1-epoch length and trained at LR 0.)"""
    full = tmp_path / "full"
    quickstart(full, 3, "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={full}.log")
    run = tmp_path / "cut"
    log = f"--trainer.callbacks.path={run}.log"
    quickstart(run, 1, "--trainer.callbacks+=sigterm_helper.StepLog", log)
    one = _ckpt(run)
    resumed = quickstart(run, 3, "--trainer.callbacks+=sigterm_helper.StepLog", log, "--ckpt_path", "last")
    assert "the schedule follows this run" in resumed.stderr
    # the finished run's last.ckpt, written at the validation that ended its epoch, is dptune's own record:
    # it was said to be "not a record dptune wrote", its epoch "drawn afresh"
    assert "not a record dptune wrote" not in resumed.stderr and "drawn afresh" not in resumed.stderr, resumed.stderr

    _, ref = read_log(f"{full}.log")
    starts, got = read_log(f"{run}.log")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 13))
    for a, b in zip(got[4:], ref[4:], strict=True):  # steps 5-12: the resumed run
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9, abs=1e-15), (a, b)
    assert max(got[-2]["lr"]) > 0  # the resumed epochs train (the last step's LR is the poly end, 0)
    end, end_ref = _ckpt(run), _ckpt(full)
    assert [g["lr"] for g in end["optimizer_states"][0]["param_groups"]] == pytest.approx(
        [g["lr"] for g in end_ref["optimizer_states"][0]["param_groups"]], rel=1e-9, abs=1e-15)
    assert end["lr_schedulers"][0]["total_steps"] == end_ref["lr_schedulers"][0]["total_steps"] == 12
    assert "LR schedule: the checkpoint's run had 4 optimizer steps, this run has 12" in resumed.stderr  # the new length
    # the resumed run started from the checkpoint's weights and Adam moments, not from scratch
    weights = sum(v.double().abs().sum().item() for v in one["state_dict"].values() if v.is_floating_point())
    moments = sum(s["exp_avg"].double().abs().sum().item() for s in one["optimizer_states"][0]["state"].values())
    assert starts[1]["start"] == 4 and starts[1]["exp_avg"] == pytest.approx(moments, rel=1e-9)
    assert starts[1]["weights"] == pytest.approx(weights, rel=1e-9)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_gradient_clipping_and_accumulation_work_with_every_precision(tmp_path, precision):
    """Lightning refuses to clip for an optimizer that unscales inside its step (fused AdamW);
    with --trainer.gradient_clip_val the optimizer is the unfused one. Accumulating 2 batches
    halves the optimizer steps (4 batches: 2 steps)."""
    run = tmp_path / precision
    quickstart(run, 1, "--trainer.precision", precision, "--trainer.gradient_clip_val", "1.0")
    assert _ckpt(run)["global_step"] == 4
    quickstart(tmp_path / "accumulate", 1, "--trainer.precision", precision, "--trainer.gradient_clip_val", "1.0",
               "--trainer.accumulate_grad_batches", "2")
    assert _ckpt(tmp_path / "accumulate")["global_step"] == 2


def test_fused_adamw_only_without_clipping(tiny_config):
    from types import SimpleNamespace

    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    m = SegmentationModule(config=tiny_config, label_spec=LabelSet(names=["a", "b"]).to_dict(), image_size=64)
    for clip, fused in [(None, True), (0, True), (1.0, False)]:
        m._trainer = SimpleNamespace(gradient_clip_val=clip, estimated_stepping_batches=10)
        opt = m.configure_optimizers()["optimizer"]
        assert bool(opt.defaults["fused"]) is fused, clip


def _contents(folder):
    """Each file under ``folder`` by its digest, each link by where it points: W&B links
    logs/debug-core.log to a file in ~/.cache/wandb that its service process may still append to after
    the run ended (a run elsewhere did not write it)."""
    import hashlib

    return {p: os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_symlink() or p.is_file()}


@pytest.mark.parametrize("logger, logged", [([], "wandb/offline-run-*"),
                                            (["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"],
                                             "**/metrics.csv")])
def test_a_run_continued_elsewhere_from_its_config_writes_only_where_it_is_told(logger, logged, tmp_path):
    """`fit --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --trainer.default_root_dir
    NEW` wrote its checkpoints (and W&B run) into RUN, over RUN's own: config.yaml held the checkpoint
    folder and log folder derived from RUN's root as if the user had set them."""
    run, new = tmp_path / "run", tmp_path / "new"
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"))
    first = ["fit", "--config", "configs/quickstart.yaml", "--data.splits", json.dumps(SPLITS), "--data.image_size", "64",
             "--data.crop_size", "64", "--data.batch_size", "8", "--trainer.max_epochs", "1",
             "--trainer.default_root_dir", str(run), *logger]  # dptune's own logger: W&B, offline
    proc = run_python(REPO / "train.py", first, REPO, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _contents(run)
    config = next(run.rglob("config.yaml"))  # beside the checkpoints, or in the CSV logger's version folder
    args = ["fit", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(new)]
    proc = run_python(REPO / "train.py", args, REPO, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _contents(run)
    assert after == before  # the earlier run's files, as they were
    assert (new / "checkpoints" / "last.ckpt").is_file() and _ckpt(new)["epoch"] == 1
    assert list(new.glob(logged))


def test_a_warmup_as_long_as_the_run_is_said(tiny_config, caplog):
    """model.warmup_steps 1000 in a 10-step run trained without a word at a tenth of the LR at most."""
    import logging
    from types import SimpleNamespace

    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    said = {}
    for steps, ratio in ((1000, 0.05), (10, 0.05), (9, 0.05), (None, 1.0), (None, 0.9)):
        m = SegmentationModule(config=tiny_config, label_spec=LabelSet(names=["a", "b"]).to_dict(), image_size=64,
                               warmup_steps=steps, warmup_ratio=ratio)
        m._trainer = SimpleNamespace(gradient_clip_val=None, estimated_stepping_batches=10)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dptune"):
            m.configure_optimizers()
        said[steps, ratio] = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
    assert said[9, 0.05] == said[None, 0.9] == []
    assert said[1000, 0.05] == ["model.warmup_steps 1000 is not shorter than this run's 10 optimizer steps: the LR "
                                "rises to 1% of model.lr (0.0001) at the last step and never decays; set a shorter "
                                "warmup (model.warmup_ratio below 1, or fewer model.warmup_steps)"]
    assert "rises to 100% of model.lr" in said[10, 0.05][0]
    assert said[None, 1.0][0].startswith("model.warmup_ratio 1 makes a warmup (10 steps) not shorter than")


def test_a_run_moved_to_another_folder_resumes_there_with_its_last_and_best_checkpoints(tmp_path):
    """A run copied to another folder (scratch to home) and resumed there wrote last-v1.ckpt beside a
    stale last.ckpt (which export took) and forgot its best score: a second best-*.ckpt stayed
    beside the first, and an epoch worse than the earlier best was reported as the best checkpoint."""
    import shutil

    from sigterm_helper import validations

    first, log = tmp_path / "scratch", tmp_path / "steps.log"
    logged = ("--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}")
    quickstart(first, 1, *logged)
    moved = Path(shutil.copytree(first, tmp_path / "home"))
    shutil.rmtree(first)  # gone, as scratch space is
    proc = quickstart(moved, 3, *logged, "--ckpt_path", "last")
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("last")] == ["last.ckpt"], names
    assert _ckpt(moved)["global_step"] == 12
    best = [n for n in names if n.startswith("best")]
    scores = validations(log)
    assert len(best) == 1 and len(scores) == 3, names
    assert best[0].endswith(f"{max(s['val/mIoU'] for s in scores.values()):.4f}.ckpt"), (best, scores)
    assert f"best checkpoint: {moved / 'checkpoints' / best[0]}" in proc.stderr


@pytest.mark.parametrize("kept", [["best-a.ckpt", "last.ckpt"], ["best-b.ckpt", "last.ckpt"]])
def test_a_moved_run_resumed_from_a_best_checkpoint_follows_the_files_that_are_there(tmp_path, kept):
    """A best-*.ckpt records the top-k files of its moment; the run removed one of them later. Resumed
    in a moved folder, the whole record was dropped (one file missing) and Lightning wrote last-v1.ckpt
    beside a stale last.ckpt (a review). The files that are there are followed; the best and the k-th
    are those among them."""
    import warnings

    from dptune.training.checkpointing import Checkpoint

    old, new = tmp_path / "scratch" / "checkpoints", tmp_path / "home" / "checkpoints"
    new.mkdir(parents=True)
    for name in kept:
        (new / name).write_bytes(b"x")
    state = {"monitor": "val/mIoU", "best_model_score": torch.tensor(0.5), "best_model_path": str(old / "best-a.ckpt"),
             "current_score": torch.tensor(0.3), "dirpath": str(old),
             "best_k_models": {str(old / "best-a.ckpt"): torch.tensor(0.5), str(old / "best-b.ckpt"): torch.tensor(0.3)},
             "kth_best_model_path": str(old / "best-b.ckpt"), "last_model_path": str(old / "last.ckpt")}
    cb = Checkpoint(dirpath=str(new), monitor="val/mIoU", mode="max", save_top_k=2, save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "The dirpath has changed ... won't be reloaded"
        cb.load_state_dict(state)
    best = kept[0]
    assert cb.last_model_path == str(new / "last.ckpt")
    assert list(cb.best_k_models) == [str(new / best)] and cb.best_model_path == cb.kth_best_model_path == str(new / best)
    assert float(cb.best_model_score) == pytest.approx(0.5 if best == "best-a.ckpt" else 0.3)


def test_a_resume_on_two_processes_follows_the_length_of_its_own_epochs(tmp_path):
    """3 epochs on one process (4 steps each: 12), resumed on two (2 steps each) for a 4th epoch:
    Lightning counted 4 x 2 = 8 steps, below the 12 done, and the resume was refused as having nothing
    left to train (a user attack; the other way round the schedule ended before the run did). The run
    takes the 2 steps of its 4th epoch and the schedule ends with it."""
    run = tmp_path / "run"
    quickstart(run, 3)
    assert _ckpt(run)["global_step"] == 12
    proc = quickstart(run, 4, "--ckpt_path", "last", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp")
    assert "this run has 14" in proc.stderr, proc.stderr[-3000:]
    end = _ckpt(run)
    assert end["global_step"] == 14 and end["lr_schedulers"][0]["last_epoch"] == 14


def test_a_mid_epoch_resume_on_two_processes_trains_the_rest_of_the_epoch_and_validates_it(tmp_path):
    """Cut at step 2 of 4 on one process (16 of 32 samples), resumed on two (2 steps of 16 an epoch):
    Lightning counted the checkpoint's 2 batches as a whole epoch and ended it at once, without its
    validation. Counted as 1 of this run's, the epoch trains the 16 it had not reached, split between
    the processes, and is scored."""
    run, log = tmp_path / "run", tmp_path / "steps.log"
    logged = ["--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=2", *logged)
    proc = quickstart(run, 2, "--ckpt_path", "last", *logged, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp")
    assert "epoch 0 continues with the 16 of its 32 training samples it had not reached\n" in proc.stderr, \
        proc.stderr[-3000:]
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen[0]) == list(range(32)) and sorted(seen[1]) == list(range(32))
    assert sorted(validations(log)) == [3, 5]
    end = _ckpt(run)
    assert end["global_step"] == 5 and end["lr_schedulers"][0]["last_epoch"] == 5


def test_a_mid_epoch_resume_with_a_smaller_batch_trains_the_rest_of_the_epoch_and_validates_it(tmp_path):
    """Cut at step 2 of 4 (batches of 8), resumed with batches of 4: Lightning counted the checkpoint's 2
    batches as 2 of the new size, so 8 - 2 = 6 steps, 24 samples, where 16 were left, and the epoch trained
    8 of its samples twice (an earlier fix made the order run on into the epoch's start rather than end the
    epoch without its validation). The checkpoint's count is made this run's (4 batches of 4): the epoch
    trains the 16 it had not reached, each once, then is scored, and the schedule ends with the run. Cut
    again at step 3 and resumed, the rest is the 12 the epoch still had not reached."""
    run, log = tmp_path / "run", tmp_path / "steps.log"
    logged = ["--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    quickstart(run, 2, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=2", *logged)
    assert _ckpt(run)["global_step"] == 2
    proc = quickstart(run, 2, "--ckpt_path", "last", "--data.batch_size", "4", *logged,
                      "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=3")
    assert "epoch 0: the checkpoint's 2 batches of it count as 4 at this run's batch size" in proc.stderr
    assert "epoch 0 continues with the 16 of its 32 training samples it had not reached\n" in proc.stderr, \
        proc.stderr[-3000:]
    assert _ckpt(run)["global_step"] == 3
    proc = quickstart(run, 2, "--ckpt_path", "last", "--data.batch_size", "4", *logged)
    assert "epoch 0 continues with the 12 of its 32 training samples it had not reached\n" in proc.stderr, \
        proc.stderr[-3000:]
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen[0]) == list(range(32)) and sorted(seen[1]) == list(range(32))
    assert sorted(validations(log)) == [6, 14]
    end = _ckpt(run)
    assert end["global_step"] == 14 and end["lr_schedulers"][0]["last_epoch"] == 14


def test_a_resume_from_a_checkpoint_written_every_n_steps_trains_what_the_whole_run_trains(tmp_path):
    """A ``ModelCheckpoint(every_n_train_steps=6)`` file of a 12-step run is written as a training batch
    ends, before Lightning counts it complete: the schedule was set one batch short (the LR differed
    from step 7 on, 5.83e-4 against 5.45e-4; a review). Resumed from it, the run trains the same steps
    at the same LRs on the same samples and ends with the same weights."""
    full, log, res = tmp_path / "full", tmp_path / "full.log", tmp_path / "res.log"
    every = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             f"--trainer.callbacks.dirpath={tmp_path / 'every'}", "--trainer.callbacks.every_n_train_steps=6",
             "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename=s{step}"]
    quickstart(full, 3, *every, "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}")
    quickstart(tmp_path / "resumed", 3, "--ckpt_path", str(tmp_path / "every" / "sstep=6.ckpt"),
               "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={res}")
    (_, ref), (_, steps) = read_log(log), read_log(res)
    assert [s["step"] for s in steps] == list(range(7, 13))
    for a, b in zip(steps, ref[6:], strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12) and a["index"] == b["index"]
    end, ref_end = _ckpt(tmp_path / "resumed"), _ckpt(full)
    assert all(torch.equal(end["state_dict"][k], v) for k, v in ref_end["state_dict"].items())


def test_a_run_stopped_at_max_steps_mid_epoch_and_extended_does_not_claim_to_continue_that_epoch(tmp_path):
    """Stopped by max_steps 6 in the middle of epoch 1 and extended: Lightning counts epoch 1 as done
    and draws epoch 2's order, but the log said epoch 1 continued (a review)."""
    run = tmp_path / "run"
    quickstart(run, 3, "--trainer.max_steps", "6")
    proc = quickstart(run, 3, "--ckpt_path", "last", "--trainer.max_steps", "12")
    assert "continues with the" not in proc.stderr, proc.stderr[-3000:]


def test_overfit_batches_writes_no_training_order_into_its_checkpoints(tmp_path):
    """Lightning puts its own sampler in for overfit_batches: a resume from a SIGTERM in epoch 1 said
    "epoch 0 continues" with samples of an order that never trained (a review)."""
    run = tmp_path / "run"
    quickstart(run, 3, "--trainer.overfit_batches", "2", "--trainer.callbacks+=sigterm_helper.SigtermAt",
               "--trainer.callbacks.step=3")
    assert _ckpt(run)["global_step"] == 3 and not _ckpt(run).get("SegmentationDataModule")
    proc = quickstart(run, 3, "--ckpt_path", "last", "--trainer.overfit_batches", "2")
    assert "continues with the" not in proc.stderr, proc.stderr[-3000:]


def test_loaders_made_again_each_epoch_keep_the_order_after_a_resume(tmp_path):
    """With reload_dataloaders_every_n_epochs 1 the resume line came again at every reload (a review);
    the loaders made again keep the run's order: each epoch trains each sample once."""
    run, log = tmp_path / "run", tmp_path / "steps.log"
    args = ["--trainer.reload_dataloaders_every_n_epochs", "1", "--seed_everything", "true",
            "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    quickstart(run, 3, *args, "--trainer.callbacks+=sigterm_helper.SigtermAt", "--trainer.callbacks.step=6")
    proc = quickstart(run, 3, "--ckpt_path", "last", *args)
    assert proc.stderr.count("continues with the") == 1, proc.stderr[-3000:]
    seen = trained_per_epoch(read_log(log)[1])
    assert sorted(seen) == [0, 1, 2] and all(sorted(v) == list(range(32)) for v in seen.values())


def test_sigterm_inside_an_accumulation_window_loses_none_of_its_batches(tmp_path):
    """Batches of 8 accumulated in pairs; SIGTERM as the first batch of epoch 1's second window ends:
    the run stopped before the window's step, the checkpoint held the step before it, and the resume
    stepped on the window's second batch alone (its first batch's gradient lost, the weights differed
    from the uninterrupted run's; a review). The run stops at the window's end and resumes exactly."""
    full, run = tmp_path / "full", tmp_path / "run"
    acc = ["--trainer.accumulate_grad_batches", "2", "--trainer.precision", "32-true"]
    quickstart(full, 3, *acc)
    cut = quickstart(run, 3, *acc, "--trainer.callbacks+=sigterm_helper.SigtermAtBatch",
                     "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=2")
    assert "SIGTERM: saved" in cut.stderr and _ckpt(run)["global_step"] == 4, cut.stderr[-3000:]
    quickstart(run, 3, *acc, "--ckpt_path", "last")
    end, ref = _ckpt(run), _ckpt(full)
    assert end["global_step"] == ref["global_step"] == 6
    assert all(torch.equal(end["state_dict"][k], v) for k, v in ref["state_dict"].items())


def test_a_resume_keeps_its_seed_and_its_config_says_so(tmp_path):
    """Resumed with another --seed_everything (or true, as a requeue script repeats it), the run went on
    from the checkpoint's seed without a word while config-2.yaml recorded the new one: given back, that
    seed did not repeat the run (f4 review). The resume says it keeps the checkpoint's seed and records it."""
    import yaml

    run = tmp_path / "run"
    quickstart(run, 2, "--seed_everything", "7", "--trainer.callbacks+=sigterm_helper.SigtermAt",
               "--trainer.callbacks.step=2")
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "resume.ckpt")
    proc = quickstart(run, 2, "--ckpt_path", "last", "--seed_everything", "true")
    assert "resume: seed_everything true -> 7 (the checkpoint's run's" in proc.stderr, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config-2.yaml").read_text())["seed_everything"] == 7
    # false (no seeding) too went on from the checkpoint's seed, and its config recorded false (g1 review)
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "resume.ckpt").rename(run / "checkpoints" / "last.ckpt")
    proc = quickstart(run, 2, "--ckpt_path", "last", "--seed_everything", "false")
    assert "resume: seed_everything false -> 7 (the checkpoint's run's" in proc.stderr, proc.stderr[-3000:]
    # the same settings as the first resume's: its record holds them (a config-3.yaml said false)
    assert {yaml.safe_load(p.read_text())["seed_everything"] for p in run.glob("config-*.yaml")} == {7}
