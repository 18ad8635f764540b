"""A run that diverges (NaN/inf loss or gradients) stops with one line naming the step; a few
isolated non-finite steps are skipped without touching the weights; no checkpoint ever holds a
non-finite tensor."""

from __future__ import annotations

import contextlib
import logging
import math
import signal

import lightning.pytorch as pl
import pytest
import torch
from conftest import CAMVID, needs, run_python
from torch.utils.data import DataLoader, Dataset

from dptune.errors import ConfigError
from dptune.labels import LabelSet
from dptune.tasks.segmentation import SegmentationModule
from dptune.training.checkpointing import Checkpoint


def test_the_count_skips_up_to_its_limit_in_a_row_then_stops():
    from dptune.tasks.optim import NonFiniteSteps

    count = NonFiniteSteps(2)
    verdicts = [count.update(ok) for ok in (True, False, False, True, False, False, False)]
    assert verdicts == ["step", "skip", "skip", "step", "skip", "skip", "stop"]
    assert (count.updates, count.skipped, count.in_a_row) == (2, 5, 3)
    assert NonFiniteSteps(0).update(False) == "stop"
    with pytest.raises(ConfigError, match="nonfinite_skips"):
        NonFiniteSteps(-1)


# ---------------------------------------------------------------------------- in-process runs
class Frames(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
                "mask": torch.randint(0, 3, (64, 64), generator=g)}


class Poisoned(SegmentationModule):
    """NaN loss (``loss``) or an inf gradient (``grad``) at the given optimizer steps (0-based)."""

    def __init__(self, *args, bad_steps=(), how: str = "loss", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad_steps, self.how = set(bad_steps), how

    def loss(self, *args):
        out = super().loss(*args)
        if self.how == "loss" and self.trainer.global_step in self.bad_steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    def on_after_backward(self) -> None:
        if self.how == "grad" and self.trainer.global_step in self.bad_steps:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf


class States(pl.Callback):
    """The weights, BatchNorm statistics and optimizer state after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        opt = trainer.optimizers[0]
        state.update({f"opt{i}.{k}": v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()})
        self.after.append(state)


def _module(tiny_config, **kw) -> Poisoned:
    spec = LabelSet(names=["a", "b", "c"]).to_dict()
    return Poisoned(config=tiny_config, label_spec=spec, image_size=64, lr=1e-3, warmup_steps=0, **kw)


def _fit(module, steps: int, callbacks=(), precision: str = "32-true", **kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
                         callbacks=list(callbacks), limit_val_batches=0, **kw)
    trainer.fit(module, DataLoader(Frames(), batch_size=2))
    return trainer


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_an_isolated_non_finite_step_is_skipped_and_leaves_everything_as_it_was(tiny_config, how, caplog):
    states = States()
    module = _module(tiny_config, bad_steps={2}, how=how)
    with caplog.at_level(logging.WARNING, logger="dptune"):
        trainer = _fit(module, 5, [states])
    assert trainer.global_step == 5  # the run went on
    before, skipped, after = states.after[1], states.after[2], states.after[3]
    # the skipped step changed no weight, no BatchNorm statistic, no optimizer moment
    assert _same(before, skipped) == []
    assert _same(skipped, after), "the next step trains again"
    assert all(torch.isfinite(v).all() for v in states.after[-1].values() if v.is_floating_point())
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    what = "non-finite loss (train/loss=nan" if how == "loss" else "non-finite gradients"
    assert len(warned) == 1 and warned[0].startswith("step 3 (epoch 1, batch 3): " + what), warned


def test_persistent_non_finite_losses_stop_the_run_naming_the_step_and_the_cause(tiny_config):
    module = _module(tiny_config, bad_steps=set(range(1, 100)), nonfinite_skips=2)
    with pytest.raises(ConfigError) as err:
        _fit(module, 10)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("training diverged at step 4 (epoch 1, batch 4): non-finite loss (train/loss=nan")
    assert "3 steps in a row, more than model.nonfinite_skips=2" in msg
    assert "likely cause: a learning rate too high (model.lr 0.001" in msg and "--model.lr" in msg


def test_a_non_finite_loss_before_any_update_blames_the_data_or_the_starting_weights(tiny_config):
    with pytest.raises(ConfigError, match=r"at step 1 .*likely cause: the starting weights or the data"):
        _fit(_module(tiny_config, bad_steps={0}, nonfinite_skips=0), 3)


def test_bf16_gradients_are_checked_too(tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="dptune"):
        trainer = _fit(_module(tiny_config, bad_steps={1}, how="grad"), 3, precision="bf16-mixed")
    assert trainer.global_step == 3
    assert any("step 2 (epoch 1, batch 2): non-finite gradients" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fused", [True, False])
def test_under_a_grad_scaler_a_non_finite_loss_is_skipped_and_overflow_left_to_the_scaler(tiny_config, fused, caplog):
    """16-mixed: the GradScaler skips steps whose gradients overflow (and lowers its scale); that is
    no divergence. A non-finite loss is, and its step changes nothing, whether the optimizer
    unscales its gradients itself (fused AdamW) or the scaler does before the step. (fp16 autocast
    and a GradScaler on the CPU: Lightning's 16-mixed needs a GPU.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fit(how):
        torch.manual_seed(0)  # the overflows depend on the weights: the same ones whichever tests ran before
        module, states = _module(tiny_config, bad_steps={2}, how=how), States()
        module._fused_adamw = lambda: fused
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        with caplog.at_level(logging.WARNING, logger="dptune"):
            trainer = _fit(module, 4, [states], precision=None, plugins=[plugin])
        assert bool(trainer.optimizers[0].defaults.get("fused")) == fused
        assert trainer.precision_plugin.scaler.get_scale() == 2.0**15  # one step skipped by the scaler
        return states.after

    caplog.clear()
    after = fit("loss")
    assert _same(after[1], after[2]) == [] and _same(after[2], after[3])
    # warnings only: an earlier test in the same process may have set dptune's loggers to INFO
    warned = [r.getMessage()[:35] for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["step 3 (epoch 1, batch 3): non-fini"]

    caplog.clear()
    after = fit("grad")
    assert [k for k in _same(after[1], after[2]) if "running" not in k and "num_batches" not in k] == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # the scaler's business


class Joint(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8),
                "mask": torch.randint(0, 3, (64, 64), generator=g), "depth": 1 + 4 * torch.rand(64, 64, generator=g)}


def test_a_joint_model_stops_on_one_task_s_non_finite_loss_and_names_it(tiny_config):
    from dptune.tasks.multitask import MultiTaskModule

    module = MultiTaskModule(config=tiny_config, label_spec=LabelSet(names=["a", "b", "c"]).to_dict(), image_size=64,
                             max_depth=10.0, nonfinite_skips=1)

    def poison(head, args, output):
        return output * math.nan if module.trainer.global_step >= 1 else output

    module.model.depth.head.register_forward_hook(poison)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    with pytest.raises(ConfigError) as err:
        trainer.fit(module, DataLoader(Joint(), batch_size=2))
    msg = str(err.value)
    assert msg.startswith("training diverged at step 3 (epoch 1, batch 3): non-finite loss (train/loss_depth=nan, "
                          "train/loss=nan) in 2 steps in a row"), msg
    assert all(torch.isfinite(p).all() for p in module.parameters())


class Corrupt(pl.Callback):
    """NaN into one weight after the last step: a state the step checks cannot have let through."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == trainer.max_steps:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


@pytest.mark.parametrize("on_exception", [False, True])
def test_no_checkpoint_of_non_finite_weights_is_written_or_selected(tiny_config, tmp_path, on_exception):
    ckpt = Checkpoint(dirpath=tmp_path, save_last=True, save_on_exception=on_exception)
    with pytest.raises(ConfigError, match=r"training diverged: at step 3 .* hold NaN/inf .*no checkpoint written"):
        _fit(_module(tiny_config), 3, [ckpt, Corrupt()])
    assert list(tmp_path.iterdir()) == []
    assert ckpt.best_model_path == ""


# ---------------------------------------------------------------------------- train.py
def _all_finite(path) -> list[str]:
    """Names of the non-finite floating tensors anywhere in a checkpoint: weights, optimizer state,
    callbacks' state (Lightning's "no k-th best yet" sentinel is +-inf), everything."""
    def walk(obj, name):
        if torch.is_tensor(obj):
            if obj.is_floating_point() and not torch.isfinite(obj).all():
                yield name
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, f"{name}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, f"{name}/{i}")

    return list(walk(torch.load(path, map_location="cpu", weights_only=False), ""))


def _outputs_finite(path) -> bool:
    """Whether the checkpoint's model gives finite outputs on a real CamVid frame."""
    import numpy as np
    from PIL import Image

    from dptune.tasks.checkpoints import load_module

    module = load_module(str(path)).eval()
    image = np.asarray(Image.open(sorted((CAMVID / "val").glob("*.jpg"))[0]).convert("RGB").resize((64, 64)))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        logits = module.model(pixel_values=x).logits
    return bool(torch.isfinite(logits).all())


@pytest.mark.slow
@needs(CAMVID)
def test_a_run_whose_weights_overflow_the_forward_pass_selects_no_checkpoint_by_nan_predictions(
        tmp_path, tiny_config_path):
    """One finite update at lr 1e4 leaves finite weights whose forward pass overflows: validation must
    call that no result (NaN), not score the NaN logits' argmax as class 0 and keep it as "best"."""
    from test_train import camvid_args, run_train

    run = tmp_path / "run"
    proc = run_train([*camvid_args(run, tiny_config_path, epochs=4), "--model.lr", "1e4", "--trainer.max_steps", "12",
                      "--trainer.logger", "false"], cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for path in sorted(run.rglob("*.ckpt")):
        assert _all_finite(path) == [], path
        if path.name.startswith("best"):
            assert _outputs_finite(path), f"{path.name} was chosen as best but its predictions are NaN"


@pytest.mark.slow
@needs(CAMVID)
def test_a_diverging_camvid_run_exits_2_with_one_line_and_finite_checkpoints(tmp_path, tiny_config_path):
    from test_train import camvid_args, run_train

    run = tmp_path / "run"
    proc = run_train([*camvid_args(run, tiny_config_path, epochs=2), "--model.lr", "1e4", "--trainer.logger", "false"],
                     cwd=tmp_path, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at step "), errors
    assert "likely cause: a learning rate too high (model.lr 10000" in errors[0]
    ckpts = sorted(run.rglob("*.ckpt"))
    assert ckpts, "the first epoch's checkpoints are still there"
    for path in ckpts:
        assert _all_finite(path) == [], path


class NaNOnOneRank(pl.Callback):
    """From optimizer step ``step`` on, the segmentation head of process ``rank`` outputs NaN
    (``--trainer.callbacks+=test_divergence.NaNOnOneRank``): one process diverges, the other not."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_start(self, trainer, pl_module) -> None:
        def poison(module, args, output):
            bad = trainer.global_rank == self.rank and trainer.global_step >= self.step and module.training
            return output * math.nan if bad else output

        pl_module.model.head.register_forward_hook(poison)


@pytest.mark.slow
@needs(CAMVID)
def test_ddp_stops_every_process_when_one_diverges(tmp_path, tiny_config_path):
    import os

    from conftest import REPO
    from test_train import camvid_args

    run = tmp_path / "run"
    args = [*camvid_args(run, tiny_config_path, epochs=2), "--trainer.logger", "false", "--model.nonfinite_skips", "1",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.callbacks+=test_divergence.NaNOnOneRank", "--trainer.callbacks.step=2"]
    env = dict(os.environ, WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    proc = run_python(REPO / "train.py", args, tmp_path, env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # 7 frames over 2 processes, batch 2: 2 steps per epoch; steps 3 and 4 non-finite on process 1 alone, and
    # both processes stop there, saying the same (process 0 sees it in the gradients DDP averaged)
    assert errors, proc.stderr[-3000:]
    for line in errors:
        assert line.startswith("error: training diverged at step 4 (epoch 2, batch 2): non-finite loss"), line
        assert "on 1 of 2 processes in 2 steps in a row, more than model.nonfinite_skips=1" in line, line
    for path in sorted(run.rglob("*.ckpt")):
        assert _all_finite(path) == [], path


@contextlib.contextmanager
def _pythons_sigint():
    """SIGINT handled by Python's own handler, as in a terminal, whatever ran before on this test worker;
    the handler found is put back afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class SwallowedCtrlC(pl.Callback):
    """A SIGINT that lands in a finalizer at the start of step ``step`` (None: when training ends): the
    handler runs and Python swallows what it raises."""

    def __init__(self, step: int | None = None) -> None:
        self.step = step

    @staticmethod
    def _swallow() -> None:
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._swallow()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.step is None:
            self._swallow()


def test_a_ctrl_c_that_python_swallowed_still_stops_the_fit(tiny_config):
    """SIGINT raises KeyboardInterrupt wherever Python is; in a finalizer (``__del__``, run by the
    garbage collector) it is printed as "Exception ignored" and lost, and the run trained to its end
    with exit 0 (adversarial review). The guard notes the signal and stops at the batch's end."""
    from dptune.training.checkpointing import InterruptGuard

    guard = InterruptGuard()
    with _pythons_sigint():
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a Ctrl-C
            _fit(_module(tiny_config), 6, [SwallowedCtrlC(step=2), guard])
        assert guard.pending is False
        # Lightning puts back the handlers it found at the fit's start (the guard's): outside a fit it acts as
        # Python's own and notes nothing, so it stops no later run
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        assert guard.pending is False
        trainer = _fit(_module(tiny_config), 3, [InterruptGuard()])  # a later fit in the same process
        assert trainer.global_step == 3


def test_a_ctrl_c_swallowed_after_the_last_batch_still_stops_the_fit(tiny_config):
    from dptune.training.checkpointing import InterruptGuard

    with _pythons_sigint(), pytest.raises(SystemExit):
        _fit(_module(tiny_config), 2, [SwallowedCtrlC(), InterruptGuard()])


def test_a_fit_that_failed_leaves_no_handler_that_unguards_the_next_fit(tiny_config):
    """A fit that fails skips the callbacks' teardown, and Lightning puts back the SIGINT handler it found
    at the fit's start: the guard's. The next fit in the process (a notebook, a sweep, the test suite)
    found a handler that was not Python's, left it, and lost a swallowed Ctrl-C (a CI run of the suite)."""
    from dptune.training.checkpointing import InterruptGuard

    class Fails(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            raise RuntimeError("a fault in the first step")

    with _pythons_sigint():
        with pytest.raises(RuntimeError, match="a fault in the first step"):
            _fit(_module(tiny_config), 3, [Fails(), InterruptGuard()])
        with pytest.raises(SystemExit):
            _fit(_module(tiny_config), 4, [SwallowedCtrlC(step=1), InterruptGuard()])
        with pytest.raises(KeyboardInterrupt):  # the stopped fit's handler, outside its fit, acts as Python's own
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        _fit(_module(tiny_config), 2, [InterruptGuard()])  # a fit that ends well puts Python's own handler back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_fit_without_a_ctrl_c_leaves_the_sigint_handler_as_it_was(tiny_config):
    from dptune.training.checkpointing import InterruptGuard

    with _pythons_sigint():
        trainer = _fit(_module(tiny_config), 2, [InterruptGuard()])
        assert trainer.global_step == 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("monitor", ["val/IoU/Tree[s]", "val/IoU/a:b", "val/IoU/{x}", "val/mIoU", "val/IoU/#1"])
def test_the_best_checkpoint_is_named_for_any_class_name(tmp_path, monitor):
    """A monitor named after a class (val/IoU/<name>) goes into the best checkpoint's name with its
    value; Lightning's filename template reads a name as a format field, where [ ] { } : stop it
    (a class Tree[s] ended the run in a KeyError at the first best checkpoint). A name ending in a
    digit is kept apart from the value (class #1 gave best-epoch03-10.2500, read as 10.25)."""
    from dptune.cli import best_filename

    ckpt = Checkpoint(dirpath=tmp_path, monitor=monitor, filename=best_filename(monitor), auto_insert_metric_name=False)
    path = ckpt.format_checkpoint_name({"epoch": torch.tensor(3), monitor: torch.tensor(0.25)})
    name = path.rsplit("/", 1)[-1]
    assert name.startswith("best-epoch03-") and name.endswith("0.2500.ckpt"), name
    value_at = name.rindex("0.2500")
    assert not name[value_at - 1].isdigit(), name
    # the user's own template names the value as it is logged
    mine = Checkpoint(dirpath=tmp_path, monitor=monitor, filename="mine-{epoch}-{" + monitor + ":.3f}",
                      auto_insert_metric_name=False)
    path = mine.format_checkpoint_name({"epoch": torch.tensor(3), monitor: torch.tensor(0.25)})
    assert path.rsplit("/", 1)[-1] == "mine-3-0.250.ckpt"
