"""train.py's error handling: bad settings and data end in one line, bugs keep their traceback."""

from __future__ import annotations

import pytest
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
    import subprocess
    import sys

    from conftest import REPO

    def print_config(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train.py", "fit", *args, "--print_config"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

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
