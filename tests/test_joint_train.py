"""Joint (segmentation + depth) training as it runs: the learned loss weights really learn, and a
two-process DDP fit whose batches hold one task only runs to the end."""

from __future__ import annotations

import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs
from test_finetune import joint_args
from test_train import run_train

from dptune.labels import LabelSet


def _module(**kwargs):
    from dptune.tasks.multitask import MultiTaskModule

    labels = LabelSet.from_dict({"names": ["a", "b", "c"]}).to_dict()
    return MultiTaskModule(label_spec=labels, config=dict(TINY), image_size=64, **kwargs)


@pytest.mark.parametrize("weighting", ["uncertainty", "fixed"])
def test_the_optimizer_covers_every_trainable_parameter_of_the_module(weighting):
    module = _module(weighting=weighting)
    grouped = [p for g in module.param_groups() for p in g["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in grouped} == {id(p) for p in trainable} and len(grouped) == len(trainable)
    if weighting == "uncertainty":
        task = next(g for g in module.param_groups() if g["name"] == "task")
        assert task["params"] == [module.weights.log_vars] and task["weight_decay"] == 0.0


def test_a_trainable_parameter_outside_the_network_gets_the_task_group():
    module = _module()
    module.extra = torch.nn.Linear(2, 2)  # trainable, outside the network: must be optimised too
    groups = module.param_groups()
    assert [g["name"] for g in groups].count("task") == 1
    assert sum(p.numel() for g in groups if g["name"] == "task" for p in g["params"]) == 2 + 6  # log_vars + Linear


@pytest.mark.slow
@needs(CAMVID)
@needs(KITCHEN)
def test_a_two_process_joint_fit_with_single_task_batches_runs_to_the_end_and_learns_its_weights(tmp_path, tiny_config_path):
    """Batches of one sample per process: every step at least one process has a batch without one
    of the tasks (its head runs on no rows). DDP's default (find_unused_parameters=False) must not
    fail, and the learned task weights must move away from 1."""
    run = tmp_path / "run"
    args = joint_args(run, ["--model.config", str(tiny_config_path)])
    args[args.index("--data.batch_size") + 1] = "1"
    proc = run_train([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--progress.every", "0"], cwd=tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    log_vars = ckpt["state_dict"]["weights.log_vars"]
    assert (log_vars.abs() > 1e-3).all(), log_vars  # exp(-s) != 1: the weights learned
    steps = [ln for ln in proc.stderr.splitlines() if "images/s" in ln]
    total = int(steps[-1].split("step ")[1].split("/")[1].split()[0])
    assert ckpt["global_step"] == total > 1


@pytest.mark.parametrize("aux_weight", [0.0, 0.4])
@pytest.mark.parametrize("labels", ["segmentation only", "nothing a loss can use"])
@pytest.mark.parametrize("weighting", ["uncertainty", "fixed"])
def test_every_trainable_parameter_gets_a_gradient_from_a_single_task_batch(aux_weight, labels, weighting):
    """What DDP (find_unused_parameters=False) needs of every step: a batch of segmentation samples
    only, with or without the auxiliary head, reaches every trainable parameter; so does a batch
    of depth samples whose depth no loss can use (beyond max_depth), which makes no loss at all
    (the learned weights had no gradient on that process and DDP stopped)."""
    module = _module(aux_weight=aux_weight, max_depth=10.0, weighting=weighting).train()
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "mask": torch.randint(0, 3, (2, 64, 64), dtype=torch.uint8), "depth": torch.zeros(2, 64, 64)}
    if labels == "nothing a loss can use":
        batch["mask"][:] = 255
        batch["depth"][:] = 12.0
    module.training_step(batch, 0).backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.slow
@needs(CAMVID)
@needs(KITCHEN)
def test_a_joint_checkpoint_from_before_the_task_group_resumes(tmp_path, tiny_config_path):
    """Checkpoints written before the learned loss weights had an optimizer group hold one group (and
    one scheduler base LR) fewer; resuming one must work, not stop on 'different number of groups'."""
    run = tmp_path / "run"
    run_train(joint_args(run, ["--model.config", str(tiny_config_path)]), cwd=tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    opt = ckpt["optimizer_states"][0]
    task = opt["param_groups"].pop()
    assert task["name"] == "task"
    for i in task["params"]:
        opt["state"].pop(i, None)
    ckpt["lr_schedulers"][0]["base_lrs"].pop()
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    args = joint_args(tmp_path / "resumed", ["--model.config", str(tiny_config_path)])
    args[args.index("--trainer.max_epochs") + 1] = "2"
    proc = run_train([*args, "--ckpt_path", str(old)], cwd=tmp_path)
    assert "resume with a fresh optimizer state" in proc.stderr
    after = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] > ckpt["global_step"] and len(after["optimizer_states"][0]["param_groups"]) == 5


@pytest.mark.parametrize("fill", ["beyond max_depth", "too few valid pixels"])
def test_depth_rows_the_loss_cannot_use_leave_the_depth_term_out(fill):
    """A depth row counted as labelled by any pixel > 0 made a depth loss of exactly 0 on a batch whose
    depth lay wholly outside [min_depth, max_depth] (or had fewer valid pixels than the loss needs):
    the learned weighting still added exp(-s) * 0 + s, pushing the depth weight up on a batch that
    carries no depth, and train/loss_depth logged a 0 that pulled its epoch mean down."""
    module = _module(weighting="uncertainty", max_depth=10.0).train()
    torch.manual_seed(0)
    image = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    mask = torch.randint(0, 3, (4, 64, 64), dtype=torch.uint8)
    mask[2:] = 255  # rows 2 and 3: depth only
    depth = torch.zeros(4, 64, 64)
    if fill == "beyond max_depth":
        depth[2:] = 12.0
    else:
        depth[2:, 0, :10] = 2.0  # 10 valid pixels, fewer than the 16 the depth loss needs
    losses, unused = module.losses({"image": image, "mask": mask, "depth": depth})
    assert set(losses) == {"segmentation"}, losses
    (module.weights(losses) + unused).backward()
    grad = dict(zip(module.weights.tasks, module.weights.log_vars.grad.tolist(), strict=True))
    assert grad["depth"] == 0.0 and grad["segmentation"] != 0.0, grad
    depth[3] = 0.0
    depth[3, :8, :8] = 3.0  # 64 valid pixels in range: row 3 is a depth row again
    losses, _ = module.losses({"image": image, "mask": mask, "depth": depth})
    assert set(losses) == {"segmentation", "depth"} and losses["depth"] > 0, losses


@needs(CAMVID)
@needs(KITCHEN)
def test_selecting_on_delta_m_without_references_stops_before_training(tmp_path, tiny_config_path):
    """val/delta_m is logged only with model.references; without them the run trained and validated an
    epoch, then stopped with Lightning's traceback ("could not find the monitored key")."""
    run = tmp_path / "run"
    proc = run_train([*joint_args(run, ["--model.config", str(tiny_config_path)]), "--checkpoint.monitor",
                      "val/delta_m", "--checkpoint.mode", "max"], cwd=tmp_path, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "val/delta_m" in errors[0] and "--model.references" in errors[0], errors
    assert not (run / "checkpoints").exists()

@pytest.mark.parametrize("extra, name", [
    ([], "best-epoch{epoch:02d}-mIoU{val/mIoU:.4f}"),
    (["--checkpoint.monitor", "val/delta_m", "--checkpoint.mode", "max"], "best-epoch{epoch:02d}-deltam{val/delta_m:.4f}"),
    (["--checkpoint.monitor", "val/delta_m", "--checkpoint.filename", "mine-{epoch}"], "mine-{epoch}"),
])
def test_the_best_checkpoint_is_named_after_what_selects_it(tmp_path, tiny_config_path, extra, name):
    """Selected by val/delta_m (as joint.md recommends), the best checkpoint was still named
    best-epoch00-mIoU0.0578.ckpt: the name read as the selection. A filename the user gives stays."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dptune.cli import DPTuneCLI, task_classes, trainer_defaults

    model, data = task_classes("multitask")
    cli = DPTuneCLI(model, data, task="multitask", trainer_defaults=trainer_defaults(), seed_everything_default=0,
                    run=False, args=["--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
                                     "--model.config", str(tiny_config_path), "--trainer.logger", "false",
                                     "--trainer.default_root_dir", str(tmp_path / "run"), *extra])
    best = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(best) == 1 and best[0].filename == name, [c.filename for c in best]
