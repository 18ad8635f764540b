"""SIGTERM mid-epoch: exit 0 with a loadable checkpoint; resuming continues from it exactly where
Lightning makes that possible (weights, Adam moments, step, LR schedule)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import CAMVID, REPO, needs, run_python
from sigterm_helper import read_log, trained_per_epoch, validations
from test_train import VAL, camvid_args

pytestmark = [pytest.mark.slow, needs(CAMVID)]
TRAIN = {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}  # 4 frames: 2 steps/epoch


def _run(args, cwd, extra_env=None):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"), **(extra_env or {}))
    t = time.time()
    proc = run_python(REPO / "train.py", args, cwd, env, timeout=300)  # a hang fails, never stalls the suite
    return proc, time.time() - t


def _args(run, config):
    a = camvid_args(run, config, epochs=3, train=TRAIN)
    a[a.index("--data.splits") + 1] = json.dumps({"train": TRAIN, "val": VAL})
    return [*a, "--trainer.logger", "false"]


def _state_sums(ckpt: dict) -> tuple[float, float]:
    weights = sum(v.double().abs().sum().item() for v in ckpt["state_dict"].values() if v.is_floating_point())
    moments = sum(s["exp_avg"].double().abs().sum().item() for s in ckpt["optimizer_states"][0]["state"].values())
    return weights, moments


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_config_path):
    log = "--trainer.callbacks+=sigterm_helper.StepLog"
    full, _ = _run([*_args(tmp_path / "full", tiny_config_path), log, f"--trainer.callbacks.path={tmp_path}/full.log"],
                   tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu")

    run = tmp_path / "cut"
    cut, seconds = _run([*_args(run, tiny_config_path), "--trainer.callbacks+=sigterm_helper.SigtermAt",
                         "--trainer.callbacks.step=3", log, f"--trainer.callbacks.path={tmp_path}/cut.log"], tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert seconds < 60
    assert "SIGTERM: saved" in cut.stderr
    mid = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert mid["global_step"] == 3  # mid-epoch: epoch 1 of 2-step epochs
    assert not list((run / "checkpoints").glob("*.partial"))

    resumed, _ = _run([*_args(run, tiny_config_path), "--ckpt_path", "last", log,
                       f"--trainer.callbacks.path={tmp_path}/cut.log"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == ref["global_step"] == 6
    # the resumed run starts from the checkpoint written at SIGTERM: same weights, same Adam moments
    starts, steps = read_log(tmp_path / "cut.log")
    weights, moments = _state_sums(mid)
    assert starts[-1]["start"] == 3
    assert starts[-1]["weights"] == pytest.approx(weights, rel=1e-9)
    assert starts[-1]["exp_avg"] == pytest.approx(moments, rel=1e-9) and moments > 0
    # and trains every remaining step at the uninterrupted run's learning rate
    _, ref_steps = read_log(tmp_path / "full.log")
    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps, ref_steps, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=1e-15)
    # and on the same images in the same order: the interrupted epoch (steps 3-4) trains the image
    # its first step had not reached (a fresh shuffle trained some twice and others not at all)
    assert trained_per_epoch(steps) == trained_per_epoch(ref_steps)
    assert all(sorted(seen) == [0, 1, 2, 3] for seen in trained_per_epoch(steps).values())
    # with the same augmentations and dropout: the run ends with the uninterrupted run's weights and moments
    # (they differed: Lightning restores no random state, and the loader drew afresh)
    assert [s["loss"] for s in steps] == [s["loss"] for s in ref_steps]
    for key, value in ref["state_dict"].items():
        assert torch.equal(end["state_dict"][key], value), key
    for a, b in zip(end["optimizer_states"][0]["state"].values(), ref["optimizer_states"][0]["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert end["lr_schedulers"][0]["last_epoch"] == ref["lr_schedulers"][0]["last_epoch"]


@pytest.mark.parametrize("step", [2, 6])
def test_sigterm_at_the_last_step_of_an_epoch_validates_that_epoch_on_resume(tmp_path, tiny_config_path, step):
    """Preempted at an epoch's last training step (2: the first epoch's; 6: the run's last), Lightning
    stops after the first of the epoch's 3 validation batches: the resumed run scores that epoch from
    its first batch (as the uninterrupted run does) and, at the end, picks the best checkpoint, instead
    of skipping the epoch's validation or refusing to resume with "nothing is left to train"."""
    full = tmp_path / "full.log"
    done, _ = _run([*_args(tmp_path / "full", tiny_config_path), "--trainer.callbacks+=sigterm_helper.StepLog",
                    f"--trainer.callbacks.path={full}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run, log = tmp_path / "cut", tmp_path / "cut.log"
    logged = ["--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    cut, _ = _run([*_args(run, tiny_config_path), "--trainer.callbacks+=sigterm_helper.SigtermAt",
                   f"--trainer.callbacks.step={step}", *logged], tmp_path)
    assert cut.returncode == 0 and "SIGTERM: saved" in cut.stderr, cut.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == step
    assert list(validations(log)) == [2, 4][:step // 2 - 1]

    resumed, _ = _run([*_args(run, tiny_config_path), "--ckpt_path", "last", *logged], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    scored, expected = validations(log), validations(full)
    assert list(scored) == list(expected) == [2, 4, 6]
    assert scored[step] == pytest.approx(expected[step], rel=1e-5) and "val/mIoU" in scored[step]
    _, steps = read_log(log)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 6
    assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith("best")]
    # the finished run is finished: its checkpoint holds no cut validation to resume for (a review)
    again, _ = _run([*_args(run, tiny_config_path), "--ckpt_path", "last"], tmp_path)
    assert again.returncode == 2 and "nothing is left to train" in again.stderr, again.stderr[-2000:]


def test_sigterm_in_a_two_process_validation_of_uneven_shards_ends_it_then_stops(tmp_path, tiny_config_path):
    """2 processes, 5 validation images in batches of 2: shards of 3 and 2 images, 2 batches and 1.
    SIGTERM at the epoch's last step: Lightning stopped the first process after its first validation
    batch while the second, at its last batch, went on to the metric sync: hung until killed (a
    review). The validation ends, then the run stops; the resume scores the rest as one process would."""
    run, log = tmp_path / "cut", tmp_path / "cut.log"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"]
    cut, _ = _run([*_args(run, tiny_config_path), *ddp, "--trainer.callbacks+=sigterm_helper.SigtermAt",
                   "--trainer.callbacks.step=1"], tmp_path)
    assert cut.returncode == 0 and "SIGTERM: saved" in cut.stderr, cut.stderr[-3000:]
    assert list(validations(log)) == [1]  # 4 frames on 2 processes: one step per epoch
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 1
    resumed, _ = _run([*_args(run, tiny_config_path), *ddp, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(validations(log)) == [1, 2, 3]


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_process_of_two_mid_epoch_stops_both_at_the_same_step(tmp_path, tiny_config_path, rank):
    """Lightning's handler broadcast from inside the signal handler on the process that got SIGTERM,
    whatever collective the others were in: the run hung for good (a user attack, 8 of 9 tries); a
    signal to the child alone stopped it alone. Both processes stop after the step, last.ckpt holds it."""
    run = tmp_path / "cut"
    log = ["--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={tmp_path}/cut.log"]
    args = [*_args(run, tiny_config_path), "--data.batch_size", "1", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.callbacks+=sigterm_helper.SigtermAt",
            "--trainer.callbacks.step=1", f"--trainer.callbacks.rank={rank}", *log]
    cut, _ = _run(args, tmp_path)
    assert cut.returncode == 0 and "SIGTERM: saved" in cut.stderr, cut.stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert saved["global_step"] == 1  # 2 frames a process, batch 1: mid-epoch
    resumed, _ = _run([*_args(run, tiny_config_path), "--data.batch_size", "1", "--trainer.accelerator", "cpu",
                       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--ckpt_path", "last", *log], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")["global_step"] == 6
    # each epoch, the interrupted one too, trained each of the 4 frames once over the two processes
    # (Lightning restarted the interrupted epoch's loader: its second step took the first step's frames)
    per_epoch = trained_per_epoch(read_log(tmp_path / "cut.log")[1])
    assert sorted(per_epoch) == [0, 1, 2] and all(sorted(seen) == [0, 1, 2, 3] for seen in per_epoch.values())


def test_sigterm_before_the_first_step_says_no_checkpoint_was_written(tmp_path, tiny_config_path):
    """SIGTERM during the sanity check logged "SIGTERM: saved  at step 0" (no file, no path; a review)."""
    run = tmp_path / "cut"
    cut, _ = _run([*_args(run, tiny_config_path), "--trainer.callbacks+=sigterm_helper.SigtermInSanityCheck"],
                  tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "SIGTERM at step 0: no checkpoint was written" in cut.stderr and "SIGTERM: saved" not in cut.stderr
    assert not (run / "checkpoints" / "last.ckpt").exists()


def test_sigterm_to_the_launcher_while_a_two_process_run_starts_ends_the_other_process_too(tmp_path, tiny_config_path):
    """SIGTERM to the first process while the run starts (before Lightning's handlers are set up)
    ended it alone; the process it had started waited for it for good (a user attack: alive after
    842 s). Whenever the signal comes, no process of the run outlives the launcher by long."""
    import signal
    import subprocess
    import sys

    args = [*_args(tmp_path / "run", tiny_config_path), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"))
    parent = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        for _ in range(240):  # until the second process is there
            found = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
            if found:
                child = int(found[0])
                break
            time.sleep(0.25)
        assert child is not None, "the run never started its second process"
        time.sleep(1.0)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=120)
        for _ in range(120):
            if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"process {child} outlived the launcher by 30 s")
    finally:
        for pid in (parent.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.parametrize("seed", ["false", "true"])
def test_two_processes_without_a_seed_share_one_order(tmp_path, tiny_config_path, seed):
    """With ``--seed_everything false`` each process has its own initial seed: each drew its own order
    and took its half of it, so a quarter of the samples trained twice an epoch and as many never (a
    user attack). The processes take rank 0's seed (also the one ``true`` draws)."""
    log = tmp_path / "steps.log"
    proc, _ = _run([*_args(tmp_path / "run", tiny_config_path), "--data.batch_size", "1", "--trainer.accelerator",
                    "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--seed_everything", seed,
                    "--trainer.callbacks+=sigterm_helper.StepLog", f"--trainer.callbacks.path={log}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_epoch = trained_per_epoch(read_log(log)[1])
    assert sorted(per_epoch) == [0, 1, 2] and all(sorted(seen) == [0, 1, 2, 3] for seen in per_epoch.values())
