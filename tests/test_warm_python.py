"""The tests' warm Python (warm_python.py) runs a script as a fresh interpreter would: argv, working
folder, environment, sys.path with $PYTHONPATH, stdout / stderr, and the exit code of sys.exit, of an
uncaught exception and of an uncaught KeyboardInterrupt; an environment a fresh interpreter would read at
import time (thread counts, CPU dispatch) is started fresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SCRIPT = r"""
import json, os, signal, sys
how = sys.argv[1]
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("DPTUNE_PROBE"), "path0": sys.path[0],
                  "extra": os.environ.get("PYTHONPATH", "") in sys.path, "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                  "sigpipe": int(signal.getsignal(signal.SIGPIPE)), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd"))[:4]}))
print("to stderr", file=sys.stderr)
if how == "seed":
    import numpy
    print(numpy.random.rand())
UNCLOSED = open("unclosed.txt", "w")
UNCLOSED.write(how)
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise ValueError("boom")
if how == "ctrl-c":
    raise KeyboardInterrupt
"""


def test_a_warm_run_is_what_a_fresh_interpreter_gives(tmp_path):
    import json

    from warm_python import WarmPython

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    extra = os.path.dirname(os.path.abspath(__file__))  # the one folder PYTHONPATH may add (the tests' callbacks)
    warm = WarmPython()
    try:
        env = dict(os.environ, DPTUNE_PROBE="yes", PYTHONPATH=str(extra), WANDB_MODE="offline")
        for how, code in [("ok", 0), ("exit", 3), ("raise", 1), ("ctrl-c", -signal.SIGINT)]:
            ran = warm.run(str(script), [how, "x y"], tmp_path, env, 120, tmp_path)
            fresh = subprocess.run([sys.executable, str(script), how, "x y"], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=120)
            assert ran is not None and ran.returncode == fresh.returncode == code, (how, ran, fresh)
            assert json.loads(ran.stdout.splitlines()[0]) == json.loads(fresh.stdout.splitlines()[0])
            assert ran.stderr.splitlines()[0] == "to stderr"
            assert ("ValueError: boom" in ran.stderr) == (how == "raise") == ("ValueError: boom" in fresh.stderr)
            assert (tmp_path / "unclosed.txt").read_text() == how  # flushed at exit, as an interpreter's shutdown does
        # unseeded numpy differs from run to run, as in fresh interpreters
        draws = {warm.run(str(script), ["seed"], tmp_path, env, 120, tmp_path).stdout.splitlines()[1] for _ in range(2)}
        assert len(draws) == 2
        # read when torch loads: a warm child cannot honour it, so the caller starts a fresh interpreter
        assert warm.run(str(script), ["ok"], tmp_path, dict(env, OMP_NUM_THREADS="1"), 120, tmp_path) is None
        # another folder on PYTHONPATH could not replace a module the warm Python imported: fresh too
        assert warm.run(str(script), ["ok"], tmp_path, dict(env, PYTHONPATH=str(tmp_path)), 120, tmp_path) is None
        assert not list(tmp_path.glob("warm-*"))  # its output files are gone
    finally:
        warm.close()
