"""ProgressLog's lines in the cases a real run meets: several processes, a step budget instead of
epochs, a stream with no length, a validation loader with no length; and where a run's results are
when W&B is off."""

from __future__ import annotations

import logging
import math
import os
from types import SimpleNamespace

import torch

from dptune.training.callbacks import ProgressLog, run_locations


def _trainer(**kw) -> SimpleNamespace:
    base = {"is_global_zero": True, "progress_bar_callback": None, "world_size": 1, "global_step": 0,
            "estimated_stepping_batches": 10, "max_epochs": 2, "current_epoch": 0, "callback_metrics": {},
            "sanity_checking": False, "num_val_batches": [4], "checkpoint_callbacks": [], "loggers": []}
    return SimpleNamespace(**{**base, **kw})


def _lines(caplog, trainer, steps: int = 2, val: bool = False) -> list[str]:
    cb = ProgressLog(every=0)
    cb.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="dptune.training.callbacks"):
        for _ in range(steps):
            trainer.global_step += 1
            cb.on_train_batch_end(trainer, None, None, {"image": torch.zeros(4, 3, 8, 8)}, 0)
        if val:
            cb.on_validation_batch_end(trainer, None, None, {}, 2)
    return [r.getMessage() for r in caplog.records]


def test_images_per_second_count_every_process(caplog, monkeypatch):
    clock = iter([0.0])  # the run starts at 0 s; every later reading is 10 s
    monkeypatch.setattr("dptune.training.callbacks.time.monotonic", lambda: next(clock, 10.0))
    one = _lines(caplog, _trainer(world_size=2), steps=1)[-1]
    # 4 images per process, 2 processes, 10 s
    assert "0.8 images/s" in one and "epoch 1/2 step 1/10 (10%)" in one and "ETA 0:01:30" in one, one


def test_no_epoch_count_step_total_or_eta_where_there_is_none(caplog):
    lines = _lines(caplog, _trainer(max_epochs=-1, estimated_stepping_batches=-1,
                                    num_val_batches=[math.inf]), val=True)
    assert lines[0].startswith("epoch 1 step 1 |"), lines
    assert all("-1" not in ln and "ETA" not in ln and "inf" not in ln for ln in lines), lines
    assert lines[-1] == "validating: batch 3", lines


def test_a_disabled_wandb_run_is_not_named(tmp_path, monkeypatch):
    from dptune.training.callbacks import DPTuneWandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = DPTuneWandbLogger(save_dir=str(tmp_path))
    assert run_locations(_trainer(loggers=[logger])) == []


def test_a_negative_or_endless_interval_is_refused():
    import pytest

    from dptune.errors import ConfigError

    for every in (-5, math.inf, math.nan):
        with pytest.raises(ConfigError, match="progress.every"):
            ProgressLog(every=every)


def test_the_model_summary_shows_no_flops_it_did_not_count(tmp_path):
    """Lightning's summary counts FLOPs only on an ``example_input_array`` (which dptune's tasks
    leave unset: that forward would run on rank 0 alone and hang FSDP); every fit printed a FLOPs
    column of zeros and "0 Total Flops". The table keeps everything else; a run that turns the
    summary off gets none, and a module that has an example input keeps its FLOPs."""
    import lightning.pytorch as pl

    from dptune.training.hardware import DPTuneTrainer

    class Tiny(pl.LightningModule):
        def __init__(self, example: bool) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)
            self.example_input_array = torch.zeros(2, 4) if example else None

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, i):
            return self.layer(batch[0]).sum()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def summary(example: bool, **kwargs) -> str:
        trainer = DPTuneTrainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                default_root_dir=tmp_path, precision="32-true", **kwargs)
        seen: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: seen.append(record.getMessage())
        where = logging.getLogger("lightning.pytorch.callbacks.model_summary")  # Lightning's own, not propagated
        where.addHandler(handler)
        try:
            trainer.fit(Tiny(example))
        finally:
            where.removeHandler(handler)
        return "\n".join(seen)

    table = summary(False)
    assert "Total params" in table and "layer" in table and "Linear" in table, table
    assert "FLOPs" not in table and "Flops" not in table, table
    counted = summary(True)
    assert "Total Flops" in counted and "0         Total Flops" not in counted, counted
    assert summary(False, enable_model_summary=False) == ""
    # a summary callback of the run's own is kept (Rich's included), and Lightning's default is replaced
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

    def summaries(**kwargs) -> list[str]:
        trainer = DPTuneTrainer(logger=False, precision="32-true", default_root_dir=tmp_path, **kwargs)
        return [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, ModelSummary)]

    assert summaries(callbacks=[RichModelSummary()]) == ["RichModelSummary"] and summaries() == ["ModelTable"]


SPAWNED_LOGGER = """
import copy, multiprocessing as mp, os, pickle, sys

def child(logger, q):
    q.put((os.environ.get("WANDB_DIR"), logger.experiment.dir))

if __name__ == "__main__":
    from dptune.training.callbacks import DPTuneWandbLogger
    logger = DPTuneWandbLogger(save_dir=sys.argv[1], mode="offline")
    before = os.environ.get("WANDB_DIR")
    copy.deepcopy(logger), pickle.loads(pickle.dumps(logger))
    print("unchanged", os.environ.get("WANDB_DIR") == before)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(logger, q))
    p.start()
    env, folder = q.get(timeout=300)
    p.join()
    print("child", env, folder)
    print("parent", logger.experiment.dir)
    logger.experiment.finish()
"""


def test_a_spawned_process_attaches_to_the_wandb_run_in_its_own_folder(tmp_path):
    """ddp_spawn (Python API) pickles the logger; the W&B run is created in the launching process and the
    started one attaches to it, and the attached run's folder was the started process's working directory
    (its pictures went into a ``wandb`` folder there, a review). The run's root travels with the logger; a
    copy or a pickle round trip in one process leaves its environment as it was."""
    import subprocess
    import sys

    script = tmp_path / "spawned_logger.py"
    script.write_text(SPAWNED_LOGGER)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "root")], cwd=cwd, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["unchanged"] == "True", out.stdout
    child_dir = lines["child"].split()[1]
    assert child_dir == lines["parent"] and child_dir.startswith(str(tmp_path / "root")), out.stdout
    assert not (cwd / "wandb").exists()


def test_wandb_mode_set_but_empty_is_unset_and_an_unknown_one_is_one_line(monkeypatch):
    """``WANDB_MODE=`` (set, empty) ended a run in a traceback from wandb's settings (a user attack): it is
    read as unset, as a shell means it; a mode W&B does not take is a ConfigError naming where it was given."""
    import pytest

    from dptune.errors import ConfigError
    from dptune.training.callbacks import DPTuneWandbLogger
    from dptune.training.wandb_runs import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    assert wandb_mode() == "offline" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ConfigError, match="WANDB_MODE 'ofline': W&B takes one of online, offline, disabled"):
        wandb_mode()
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(ConfigError, match="trainer.logger.init_args.mode 'dry'"):
        DPTuneWandbLogger(mode="dry")


def test_a_ctrl_c_while_the_wandb_run_closes_keeps_the_command_status(caplog, tmp_path):
    """Closing a command's W&B run (an online upload can take a while) interrupted by Ctrl-C turned a finished
    fit into "the command stopped before it finished", exit 130 (a review): the run is said to be left open,
    with the command to sync it, and the command's status stands."""
    from dptune.training.wandb_runs import finish_wandb_run

    class Run:
        id, dir = "abc123", str(tmp_path / "wandb" / "run-abc123" / "files")

        def finish(self, exit_code):
            raise KeyboardInterrupt

    import sys as _sys
    from types import SimpleNamespace as NS

    fake = NS(run=Run())
    old = _sys.modules.get("wandb")
    _sys.modules["wandb"] = fake
    try:
        with caplog.at_level(logging.WARNING, logger="dptune"):
            finish_wandb_run(None, 0)  # returns: no KeyboardInterrupt out of it
    finally:
        if old is None:
            del _sys.modules["wandb"]
        else:
            _sys.modules["wandb"] = old
    said = [r.getMessage() for r in caplog.records]
    assert any("abc123 was not closed (interrupted (Ctrl-C))" in m and "wandb sync" in m for m in said), said


def test_wandb_credentials_are_read_from_the_netrc_entries_wandb_uses(tmp_path, monkeypatch):
    """``wandb login`` of wandb 0.31 writes its default server (api.forge.coreweave.com) into the netrc, which
    dptune did not count, so its default mode was offline for a logged-in user (a review); an entry without a
    password counted, and ``NETRC`` with ``~`` was not expanded."""
    from dptune.training.wandb_runs import has_credentials, wandb_mode

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_CONFIG_DIR",
                "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # wandb reads ./wandb/settings too (a review: the test read the repo's)
    netrc = tmp_path / ".netrc-wandb"
    monkeypatch.setenv("NETRC", "~/.netrc-wandb")
    assert not has_credentials() and wandb_mode() == "offline"
    netrc.write_text("machine api.forge.coreweave.com\n  login user\n  password " + "a" * 40 + "\n")
    netrc.chmod(0o600)
    assert has_credentials() and wandb_mode() == "online"
    netrc.write_text("machine api.wandb.ai login user\n")  # no password: wandb finds no key
    assert not has_credentials()
    netrc.write_text("machine api.wandb.ai login user password " + "e" * 40 + "\n")  # an older wandb login's
    assert has_credentials()  # the default server's upstream (a review: dropped when dptune read hosts itself)
    netrc.write_text("machine wandb.corp.example login user password " + "b" * 40 + "\n")
    assert not has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.corp.example")
    assert has_credentials()
    # wandb reads one file and the one server it will use (a review): another server's entry does not count,
    # nor does ~/.netrc when NETRC names another file, nor a file that is not text
    netrc.write_text("machine api.wandb.ai login user password " + "c" * 40 + "\n")
    assert not has_credentials()
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "d" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "git.netrc"))
    assert not has_credentials()
    (tmp_path / "git.netrc").write_bytes(b"machine example.org login user password caf\xe9\n")
    assert not has_credentials() and wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_BASE_URL", "http://[bad")
    assert not has_credentials()


def test_wandb_credentials_are_looked_up_for_the_server_wandbs_settings_file_names(tmp_path, monkeypatch):
    """A server chosen with ``wandb login --host`` (wandb's settings file) was not read: dptune counted the default
    server's netrc entry and went online where wandb found no key, and did not count that server's own entry
    (a review). Empty WANDB_* variables count as unset (an empty WANDB_BASE_URL made every run, offline ones too,
    end in wandb's settings error)."""
    from dptune.training.wandb_runs import environment_mode, has_credentials

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC",
                "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert has_credentials()
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.corp.example\n")
    assert not has_credentials()  # wandb uses wandb.corp.example, for which the netrc has no key
    (tmp_path / ".netrc").write_text("machine wandb.corp.example login user password " + "b" * 40 + "\n")
    assert has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")  # the variable wins over the file, as in wandb
    assert not has_credentials()
    for key in ("WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "WANDB_PROJECT"):
        monkeypatch.setenv(key, "")
    assert environment_mode() is None and has_credentials()
    assert not {"WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "WANDB_PROJECT"} & set(os.environ)


def test_wandbs_own_settings_choose_the_mode_and_hold_credentials_and_stay_quiet(tmp_path, monkeypatch, capfd,
                                                                               caplog):
    """``wandb offline`` / ``wandb disabled`` (a mode in wandb's settings file) were overridden: with a netrc
    login dptune sent the run online, where it failed without a network; a key in wandb's settings (SageMaker
    writes one) was not counted; reading wandb's settings early printed a bad file's report a second time
    (and once more per process); a settings file that is not text was "a file it reads"; a netrc that is not
    text, holding the user's key, made the run offline without a word (a review)."""
    import logging

    from dptune.training.wandb_runs import has_credentials, unreadable_file, wandb_mode

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC",
                "WANDB_CONFIG_DIR", "WANDB_DIR", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    workspace = tmp_path / "wandb" / "settings"
    workspace.parent.mkdir()
    for mode in ("offline", "disabled"):  # what `wandb offline` / `wandb disabled` write
        workspace.write_text(f"[default]\nmode = {mode}\n")
        assert wandb_mode() == mode
    workspace.write_text("[default]\nmode = online\n")  # `wandb enabled`: online with credentials only
    assert wandb_mode() == "online"
    (tmp_path / ".netrc").unlink()
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    # wandb says a bad settings file's trouble once: read by dptune first, in silence, it must still say it
    from wandb.errors import term

    monkeypatch.setattr(term, "_silent", False)  # as a fresh process has it (a logger made earlier silences it)
    monkeypatch.setattr(term, "_printed_messages", set())
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    workspace.write_text("mode = offline\n")  # no [default] section
    capfd.readouterr()
    wandb_mode()
    assert "Error reading settings" not in capfd.readouterr().err
    from wandb.sdk.wandb_settings import Settings

    Settings().update_from_system_settings()  # as the run's start reads it
    assert "Error reading settings" in capfd.readouterr().err
    workspace.unlink()
    (tmp_path / ".netrc").unlink()
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\napi_key = " + "b" * 40 + "\n")
    assert has_credentials() and wandb_mode() == "online"
    settings.write_text("[default]\nmode = bogus\n")
    capfd.readouterr()
    wandb_mode()  # wandb's own report of the bad file comes once, when the run starts
    assert "Failed to load settings" not in capfd.readouterr().err
    settings.write_bytes(b"[default]\nentity = caf\xe9\n")
    assert unreadable_file() == str(settings)
    settings.unlink()
    workspace.write_bytes(b"[default]\nentity = caf\xe9\n")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # wandb reads the working folder's all the same
    assert unreadable_file() == os.path.join("wandb", "settings")
    monkeypatch.delenv("WANDB_DIR")
    workspace.unlink()
    (tmp_path / ".netrc").write_bytes(b"machine api.wandb.ai login caf\xe9 password " + b"c" * 40 + b"\n")
    with caplog.at_level(logging.WARNING, logger="dptune"):
        assert wandb_mode() == "offline"
    assert any(f"{tmp_path / '.netrc'} is not a text file" in r.getMessage() for r in caplog.records), caplog.text
