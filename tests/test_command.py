"""The ``dptune`` console command reaches training and every tool."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dptune.command import COMMANDS, main


def test_every_command_answers_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        out = capsys.readouterr().out
        assert "usage:" in out and "dptune" in out, (name, out[:300])


def test_no_command_lists_them_and_an_unknown_one_is_one_line(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name}" in listed for name in COMMANDS)
    assert main(["train"]) == 2
    assert capsys.readouterr().err.startswith("error: dptune has no command 'train'")


def test_the_installed_console_script_runs(tmp_path):
    """pip install -e . puts ``dptune`` beside the interpreter (pyproject [project.scripts])."""
    exe = shutil.which("dptune", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("dptune is not installed as a console script in this environment (pip install -e .)")
    proc = subprocess.run([exe, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: dptune predict" in proc.stdout, proc.stderr[-2000:]
