"""Errors that reach the user as one line, without a traceback."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name
    when the message is empty: what a one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def wait_for_the_launcher(within_s: float = 30.0) -> None:
    """In a process Lightning's launcher started (``dptune.command.end_with_the_launcher``), before it exits on an error
    every process of the run finds (bad data or settings): wait, up to ``within_s``, for the launcher to
    exit first. The launcher watches its children and kills itself with SIGKILL once one of them has
    exited with an error: where it took a few seconds longer than this one to say the same error (a
    loaded machine), the run ended with status -9 (137) instead of 2. The launcher's end ends this
    process (Linux; elsewhere it waits the bound); a launcher still running after ``within_s`` is stuck
    (the error was this process's alone, and the launcher waits for it in a collective), and this process
    exits for it to be ended."""
    launcher = os.environ.get("DPTUNE_LAUNCHER_PID")
    if os.environ.get("LOCAL_RANK", "0") in ("", "0") or not launcher or launcher != str(os.getppid()):
        return
    sys.stderr.flush()
    end = time.monotonic() + within_s
    while time.monotonic() < end and str(os.getppid()) == launcher:
        time.sleep(0.2)


def said_by_another_process(line: str, within_s: float = 600.0) -> bool:
    """Whether another process of this run on this machine has already printed ``line``: every process
    of a run of several checks the data before training and finds the same bad files, and each printed
    the same line. The first process to claim a line prints it. A run is one launch: its launcher's
    process (Lightning's launcher children know it by ``DPTUNE_LAUNCHER_PID``, see ``dptune.command``;
    torchrun's processes are children of its agent), with its main port, so a command run again says its
    lines again; a claim older than ``within_s`` is taken over. Anything else (one process, no
    temporary folder) prints."""
    world = os.environ.get("WORLD_SIZE")
    several = world not in ("", "0", "1") if world is not None else os.environ.get("LOCAL_RANK") is not None
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # torchrun: one agent per launch and machine
        run = f"{os.environ['TORCHELASTIC_RUN_ID']}:{os.getppid()}"
    else:
        run = os.environ.get("DPTUNE_LAUNCHER_PID")
    if not several or not run or not os.environ.get("MASTER_PORT"):
        return False
    key = f"{run}:{os.environ.get('MASTER_ADDR', '')}:{os.environ['MASTER_PORT']}\n{line}"
    mark = os.path.join(tempfile.gettempdir(), "dptune-said-" + hashlib.sha1(key.encode()).hexdigest()[:24])
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        _sweep(os.path.dirname(mark), within_s)
        return False
    except FileExistsError:
        try:
            if time.time() - os.stat(mark).st_mtime < within_s:
                return True
            os.utime(mark)
        except OSError:
            pass
        return False
    except OSError:
        return False


def _sweep(folder: str, within_s: float) -> None:
    """Remove earlier runs' claims (older than ``within_s``)."""
    import glob

    for old in glob.glob(os.path.join(folder, "dptune-said-*")):
        try:
            if time.time() - os.stat(old).st_mtime > within_s:
                os.unlink(old)
        except OSError:
            pass


# what PyTorch's DataLoader makes of an exception raised in a loader worker: it raises the same class again in
# the main process, built from this line, the worker's traceback and the original message
_FROM_A_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call last\):\n")
_LAST_RAISED = re.compile(r"^dptune\.errors\.\w+: ", re.M)


def as_raised(message: object) -> object:
    """The message a dptune error was raised with, where PyTorch's DataLoader raised it again from a loader
    worker's (``--data.num_workers`` >= 1): its text was a worker's traceback ending in that message, which
    the command printed whole after ``error:``. Any other message as it is."""
    if not isinstance(message, str) or not _FROM_A_WORKER.match(message):
        return message
    found = list(_LAST_RAISED.finditer(message))
    return message[found[-1].end():].rstrip("\n") if found else message


class ConfigError(ValueError):
    """A setting that cannot work (conflicting options, a size the backbone cannot take, a model
    reference that does not resolve). The message names the setting and, where one exists, the fix."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(as_raised(a) for a in args))


class DataError(ValueError):
    """Bad input data. The message names the file and what is wrong with it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(as_raised(a) for a in args))


class ModelOutputError(ValueError):
    """The model's output is NaN or infinite: its weights are non-finite, or finite but so large that
    the forward pass overflows (a run that diverged after its last finite check). Nothing is predicted,
    scored, calibrated or exported from such an output."""


@contextmanager
def of_image(name: str) -> Iterator[None]:
    """A ``ModelOutputError`` raised inside names the image ``name`` whose output it was."""
    try:
        yield
    except ModelOutputError as e:
        raise ModelOutputError(f"{name}: {e}") from None


class DataErrors(DataError):
    """Several bad files found in one pass; ``problems`` holds one line per file."""

    def __init__(self, problems: list[str] | str, total: int | None = None, hint: str = "") -> None:
        if isinstance(problems, str):  # raised again from a loader worker's text: the lines as rendered there
            text = str(as_raised(problems))
            self.problems, self.total, self.hint = text.splitlines(), 0, ""
            ValueError.__init__(self, text)
            return
        self.problems = problems
        self.total = total if total is not None else len(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self, cap: int = 20) -> str:
        lines = self.problems[:cap]
        if self.total > cap:
            lines.append(f"... and {self.total - cap} more")
        summary = f"{self.total} bad sample(s) found before training."
        if self.hint:
            summary += f" {self.hint}"
        return "\n".join([*lines, summary])


# the states of a disk that stop a write, whichever file it was (safetensors says them in its own words)
DISK_STATES = {getattr(errno, code): why for code, why in (
    ("ENOSPC", "No space left on device"), ("EDQUOT", "Disk quota exceeded"), ("EROFS", "Read-only file system"),
    ("EFBIG", "File too large")) if hasattr(errno, code)}


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a batch scheduler's, ``timeout``'s, ``docker stop``'s) taken as a Ctrl-C by a command that saves
    what it did when interrupted (``sigterm_interrupts``); the command line says it and exits 143."""

    said, exit_code = "SIGTERM", 143


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """In the block, SIGTERM raises ``Terminated`` (otherwise it ends the process at once, past every
    ``finally``); a SIGTERM the process ignores stays ignored; only the main thread may set it."""
    import signal

    def stop(signum, frame):
        raise Terminated()

    before = None
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def disk_state(e: BaseException) -> str | None:
    """Why a write failed when the disk itself refused it (full, over quota, read-only), else None:
    an ``OSError`` of such an errno, or safetensors' ``SafetensorError`` ("I/O error: No space left on
    device (os error 28)"), which is no ``OSError``."""
    if isinstance(e, OSError):
        return DISK_STATES.get(e.errno)
    if type(e).__name__ == "SafetensorError":
        return next((why for why in DISK_STATES.values() if why in str(e)), None)
    return None


def yaml_problem(e: BaseException) -> str:
    """What the YAML parser found wrong, and where (line and column), in one line (config files and
    label files alike)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def path_arg(value: str) -> str:
    """argparse type of the tools' path options: an empty value (``--json ''``, an unset shell
    variable) is refused, where it would be no file at all (evaluate wrote no scores and said
    nothing) or the current folder (an export's files written into it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return value


def device_arg(value: str) -> str:
    """argparse type of ``--device``: a device this torch can run on, said in one line otherwise
    (``--device cuda`` on a CPU-only torch ended in torch's 'Torch not compiled with CUDA enabled'
    traceback at the first image)."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is no device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    kind = device.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{value}: {why} (torch {torch.__version__}); give --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: there are {torch.cuda.device_count()} CUDA GPU(s) here")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{value}: this torch has no MPS (Apple GPU) support; give --device cpu")
    elif kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value}: dptune's tools run on cpu, cuda or mps")
    return value


class Once(argparse.Action):
    """An argparse action for an option that takes one value: given twice (``--images a --images b``)
    it is refused, where argparse kept the last and dropped the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(self, "_seen", False):
            hint = " (a glob or a folder takes many images)" if self.dest == "images" else ""
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}); "
                         f"give it once{hint}")
        self._seen = True
        setattr(namespace, self.dest, values)
