"""The ``dptune`` console command reaches training and every tool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO

from dptune.command import COMMANDS, main


def test_every_command_answers_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        out = capsys.readouterr().out
        assert "usage:" in out and "dptune" in out, (name, out[:300])
        # an example command continued on the next line keeps its line break (a backslash-newline
        # in the module's docstring joined the lines with a run of spaces: "camvid.yaml         --root")
        joined = [ln for ln in out.splitlines() if ln.lstrip().startswith("python ") and "    --" in ln.strip()]
        assert not joined, (name, joined)


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


@pytest.mark.slow
def test_a_ddp_fit_through_the_console_script_finishes(tmp_path):
    """``dptune fit`` set sys.argv[0] to "dptune"; Lightning starts the other DDP processes by running
    ``python abspath(sys.argv[0])`` again: "can't open file .../dptune", and rank 0 waited forever."""
    import json
    import os
    import signal
    from pathlib import Path

    from conftest import REPO

    exe = Path(sys.executable).parent / "dptune"
    if not exe.is_file():
        pytest.skip("dptune is not installed as a console script in this environment (pip install -e .)")
    splits = {"train": {"count": 8, "seed": 0, "size": [64, 64]}, "val": {"count": 4, "seed": 1, "size": [64, 64]}}
    run = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.splits", json.dumps(splits),
            "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "2",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.precision", "32-true"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PL_TORCH_DISTRIBUTED_BACKEND="gloo")
    proc = subprocess.Popen([str(exe), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the DDP fit hung:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert "can't open file" not in err
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_ctrl_c_while_the_libraries_load_is_one_line_from_every_entry_point(tmp_path):
    """Ctrl-C in the first seconds (torch, transformers, numpy being imported) used to print
    Python's traceback: the commands' own handlers were not in place yet. Simulated by a numpy
    whose import raises KeyboardInterrupt, as a SIGINT arriving then does; every entry point a
    user runs says one line and exits 130."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    fake = tmp_path / "fake" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake.parent}{__import__('os').pathsep}{repo / 'src'}"}
    runs = [[sys.executable, str(repo / "train.py"), "fit", "--help"],
            [sys.executable, "-m", "dptune.command", "export", "--help"]]
    runs += [[sys.executable, str(repo / "scripts" / f"{s}.py"), "--help"] for s in ("export", "predict", "evaluate",
                                                                                    "inspect_data")]
    runs.append([sys.executable, str(repo / "scripts" / "benchmark.py"), "--steps", "1"])  # its --help imports nothing
    bindir = Path(sys.executable).parent
    runs += [[str(bindir / exe), *sub, "--help"] for exe, sub in (("dptune", ["predict"]), ("dptune-export", []),
                                                                  ("dptune-inspect", [])) if (bindir / exe).exists()]
    for cmd in runs:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), \
            (cmd, proc.returncode, proc.stderr[-1500:])


def test_a_ctrl_c_after_the_command_finished_exits_with_its_status_at_once(tmp_path):
    """Python's shutdown after an export takes seconds (collecting torch's objects); a Ctrl-C then made a
    complete export exit 130 with no word (a user attack), or printed a traceback. Simulated by a
    command whose shutdown is interrupted: the finished command's status, at once, nothing printed."""
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "slow_exit.py").write_text(
        "import atexit, os, signal, time\n"
        "def main(argv=None):\n    print('done')\n    return 0\n"
        "def late():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
        "atexit.register(late)\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}{__import__('os').pathsep}{repo / 'src'}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from dptune.command import launch; "
                           "sys.exit(launch('slow_exit'))"], capture_output=True, text=True, timeout=60, env=env)
    took = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stdout == "done\n" and proc.stderr == "", proc.stderr[-1500:]
    assert took < 4.5, took  # not the 5 s the interrupted shutdown would still have taken


def test_an_abbreviated_option_is_refused_not_guessed(capsys):
    """argparse took any unique prefix (``--calibration-c 8``, ``--int8-keep NODE``): a script using one
    breaks, or silently means another option, once a new option shares the prefix. The tools take
    full option names only (``--hel`` is not ``--help``)."""
    for name, (module, _) in COMMANDS.items():
        if module == "dptune.cli":  # LightningCLI's own parser
            continue
        with pytest.raises(SystemExit) as done:
            main([name, "--hel"])
        assert done.value.code == 2 and capsys.readouterr().out == "", name  # no help printed, exit 0


def test_a_launched_process_that_stops_on_an_error_lets_its_launcher_exit_first(tmp_path):
    """Lightning's launcher kills itself with SIGKILL once a process it started has exited with an error:
    where the launcher took a few seconds longer to say the same bad file (a loaded machine), a
    2-process run ended with status -9 instead of 2 (test_ddp's bad-file test failed so in a full suite
    on one core). A started process waits for its launcher to exit first (up to a bound), and returns at
    once in the launcher itself."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "waited"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from dptune.errors import wait_for_the_launcher
        start = time.monotonic()
        wait_for_the_launcher(30)
        open({str(out)!r}, "w").write(str(time.monotonic() - start))
    """))
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, LOCAL_RANK=sys.argv[1], DPTUNE_LAUNCHER_PID=str(os.getpid()))
        subprocess.Popen([sys.executable, {str(child)!r}], env=env)
        time.sleep(3)  # the launcher's own error takes this long; it exits without waiting for the child
    """)
    for rank, low, high in (("1", 2.5, 25), ("0", 0, 2)):
        out.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-c", launcher, rank], check=True, timeout=60)
        for _ in range(300):
            if out.exists() and out.read_text():
                break
            time.sleep(0.1)
        assert low <= float(out.read_text()) <= high, (rank, out.read_text())
