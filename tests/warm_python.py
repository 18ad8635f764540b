"""A warm Python for the tests' command-line runs: one process per test worker imports torch,
Lightning, transformers and dptune once (about 10 s on one core), then forks a child for every
``python SCRIPT ARGS`` the tests ask for. The child is a fresh process in everything a run can see:
its own argv, working folder, environment, stdin (/dev/null), stdout and stderr (files), Python's
signal handlers, exit code (``sys.exit``'s, 1 and a traceback for an uncaught exception, killed by
SIGINT after an uncaught KeyboardInterrupt as Python does); its interpreter has only imported the
modules before it started. The server never runs a torch operation and starts no Python thread: it
forks with its main thread and the idle native threads importing torch and Lightning leaves (as
PyTorch's DataLoader forks its workers from a process that trained); with a Python thread more,
``run`` answers None and the caller starts a plain subprocess.

Protocol (this file run as a script, by ``WarmPython``): one JSON line per job on stdin
(``script``, ``args``, ``cwd``, ``env``, ``stdout``, ``stderr``: file paths); the server answers
``{"pid": N}`` when the child started and ``{"code": N}`` when it ended (negative: killed by signal).
``DPTUNE_WARM_LOG=FILE`` makes the client write there which runs were forked and which started fresh, and why."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PRELOAD = ("torch", "lightning.pytorch", "lightning.pytorch.cli", "transformers", "dptune.cli")


def _threads() -> int:
    import threading

    return threading.active_count()


def _child(job: dict) -> None:
    """Become ``python job['script'] *job['args']`` and never return."""
    import atexit
    import gc
    import runpy
    import threading

    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at startup
        # a fresh interpreter started from a process that ignores SIGINT (a background job) keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_IGN if job.get("sigint_ignored") else signal.default_int_handler)
        for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY),
                                            (job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                            (job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        if job["env"].get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(line_buffering=True)
        # numpy's and torch's generators as a fresh interpreter seeds them (Python's random reseeds after fork)
        import numpy
        import torch

        numpy.random.seed()
        torch.seed()
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.environ.update(job["by_imports"])
        script = os.path.abspath(job["script"])
        sys.argv = [job["script"], *job["args"]]
        # sys.path as a fresh interpreter builds it: the script's folder, then $PYTHONPATH, then the rest
        extra = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        rest = sys.path[1:]  # [0] is this file's folder
        sys.path[:] = [os.path.dirname(script), *[p for p in extra if p not in rest], *rest]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            code = -signal.SIGINT
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then atexit
        atexit._run_exitfuncs()
        gc.collect()  # files the run left open are flushed as the interpreter's shutdown would
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def serve() -> None:
    import importlib

    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # what the imports themselves set (OpenCV's loader puts its folder on LD_LIBRARY_PATH): a fresh interpreter
    # sets it too, when it imports them
    by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    protocol = sys.stdout
    protocol.write(json.dumps({"ready": True, "threads": _threads(), "env": before, "by_imports": by_imports}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if _threads() != 1:
            protocol.write(json.dumps({"error": f"{_threads()} threads: cannot fork safely"}) + "\n")
            protocol.flush()
            continue
        pid = os.fork()
        if pid == 0:
            _child(job)
        protocol.write(json.dumps({"pid": pid}) + "\n")
        protocol.flush()
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()


# environment variables a run may set differently from the server's own: read when used, not when torch,
# Lightning or transformers are imported (PYTHONPATH: see warm_enough); any other difference (OMP_NUM_THREADS, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, ...) needs a fresh interpreter
# (PYTEST_CURRENT_TEST: pytest sets it for every test phase; PL_GLOBAL_SEED, PL_SEED_WORKERS: seed_everything
# in a test's own process sets them, and Lightning reads them when it seeds)
RUNTIME_ENV = ("WANDB_", "DPTUNE_", "PYTEST_", "PL_", "PYTHONUNBUFFERED", "XDG_CACHE_HOME", "NETRC", "CI",
               "COLUMNS", "LINES")
TESTS = os.path.dirname(os.path.abspath(__file__))


def _paths(env: dict) -> set[str]:
    return {os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p}


def warm_enough(env: dict, base: dict, by_imports: dict) -> bool:
    """Whether a child of a server started with ``base``, whose imports set ``by_imports``, runs as a fresh
    interpreter given ``env`` would."""
    changed = {k for k in env.keys() | base.keys() if env.get(k) != base.get(k)}
    # PYTHONPATH may add this folder (the tests' callbacks) and nothing else: a module the server imported comes
    # from sys.modules, whatever another folder on PYTHONPATH holds
    new, old = (_paths(e) for e in (env, base))
    if new - old <= {TESTS} and old <= new:
        changed.discard("PYTHONPATH")
    return all(k.startswith(RUNTIME_ENV) or (k in by_imports and env.get(k) == by_imports[k]) for k in changed)


def _say(what: str) -> None:
    if os.environ.get("DPTUNE_WARM_LOG"):
        with open(os.environ["DPTUNE_WARM_LOG"], "a") as f:
            f.write(f"{os.getpid()} {what}\n")


class WarmPython:
    """The client: ``run(script, args, cwd, env, timeout)`` gives what ``subprocess.run(..., capture_output=True,
    text=True)`` gives, or None where the server cannot fork (the caller then starts a subprocess)."""

    def __init__(self) -> None:
        import threading

        self.proc: subprocess.Popen | None = None
        self.base: dict = {}
        self.by_imports: dict = {}
        self.broken = False
        self.lock = threading.Lock()  # one job at a time on the server's pipe
        self.pending = b""

    def _start(self) -> bool:
        if self.broken:
            return False
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         bufsize=0, env=dict(os.environ))
            self.pending = b""
            reply = self._read(120)
            if not isinstance(reply, dict) or not reply.get("ready") or reply.get("threads") != 1:
                self.close()
                self.broken = True
                return False
            self.base, self.by_imports = reply["env"], reply["by_imports"]
        return True

    def _read(self, timeout: float) -> dict | str:
        """The server's next line, "timeout", or "eof" (the server died). Reads the pipe's bytes itself: a
        buffered reader can hold a second line that select() then waits for in vain."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return "timeout"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return "eof"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, script: str, args: list[str], cwd, env: dict, timeout: float, tmp: Path):
        with self.lock:
            return self._run(script, args, cwd, env, timeout, tmp)

    def _run(self, script: str, args: list[str], cwd, env: dict, timeout: float, tmp: Path):
        if not self._start() or not warm_enough(env, self.base, self.by_imports):
            _say(f"fresh: broken={self.broken} env={sorted(k for k in env.keys() | self.base.keys() if env.get(k) != self.base.get(k))}")
            return None
        _say(f"warm: {args[:2]}")
        stamp = time.monotonic_ns()
        out, err = tmp / f"warm-{os.getpid()}-{stamp}.out", tmp / f"warm-{os.getpid()}-{stamp}.err"
        argv = [sys.executable, script, *args]
        try:
            self.proc.stdin.write((json.dumps({
                "script": script, "args": args, "cwd": str(cwd), "env": env,
                "by_imports": {k: v for k, v in self.by_imports.items() if k not in env},
                "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                "stdout": str(out), "stderr": str(err)}) + "\n").encode())
            started = self._read(60)
            if not isinstance(started, dict) or "pid" not in started:
                self.close()
                self.broken = True
                _say(f"fresh: the warm Python did not start the run ({started})")
                return None
            done = self._read(timeout)
            if done == "timeout":  # as subprocess.run(timeout=...) does: kill the run, then say it timed out
                os.kill(started["pid"], signal.SIGKILL)  # not reaped yet: the server waits for it
                self._read(60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_bytes(), err.read_bytes())
            if done == "eof":
                self.close()
                raise RuntimeError(f"the tests' warm Python died while it ran {argv}")
            return subprocess.CompletedProcess(argv, done["code"], out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


if __name__ == "__main__":
    serve()
