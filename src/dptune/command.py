"""The ``dptune`` command: one entry point for training and every tool.

    dptune fit --config configs/quickstart.yaml         # also validate, test (python train.py ...)
    dptune export RUN/checkpoints/last.ckpt OUT        # python scripts/export.py ...
    dptune predict --model OUT --images "photos/*.jpg" --out preds
    dptune evaluate --model OUT --config configs/camvid.yaml --root DATA --split val
    dptune inspect configs/camvid.yaml
    dptune benchmark --baseline

``dptune COMMAND --help`` lists a command's options. ``train.py`` and ``scripts/*.py`` run the same
code for people who run files.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it does); fit / validate / test share train.py's LightningCLI
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("dptune.cli", "train (segmentation, depth, or both: --task / task: in the config)"),
    "validate": ("dptune.cli", "score a checkpoint on the validation split"),
    "test": ("dptune.cli", "score a checkpoint on the test split"),
    "export": ("dptune.export.cli", "a checkpoint as a plain transformers directory (+ ONNX)"),
    "predict": ("dptune.tools.predict", "masks, depth maps or both for images"),
    "evaluate": ("dptune.tools.evaluate", "scores of a checkpoint or export on labelled data"),
    "inspect": ("dptune.tools.inspect", "class counts / depth statistics of a config's data"),
    "benchmark": ("dptune.tools.benchmark", "training throughput, against the plain HF Trainer with --baseline"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dptune COMMAND [options]   (dptune COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # the process's own command line (the console script), not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"dptune {version('dptune')}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: dptune has no command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    if COMMANDS[name][0] == "dptune.cli":
        # the subcommand stays: LightningCLI reads it. sys.argv[0] stays the real script: Lightning's
        # DDP launcher starts the other processes by running it again (``python ABSPATH(argv[0])``
        # for the console script, ``python -m dptune.command`` when run as a module)
        return launch("dptune.cli", argv, entry=False, prog="dptune")  # main closes its W&B run itself
    sys.argv[0] = f"dptune {name}"  # argparse's usage line names the command
    return launch(COMMANDS[name][0], argv[1:], entry=entry)


def launch(module: str, argv: list[str] | None = None, entry: bool | None = None, **kwargs) -> int:
    """Import ``module`` (torch, transformers: seconds) and return its ``main(argv)``. A Ctrl-C that
    the command does not handle itself (one during those imports, or in a command without a handler
    of its own) is one line and exit 130, not a traceback. Every entry point goes through here: the
    ``dptune`` commands, the ``dptune-export`` / ``dptune-inspect`` scripts, ``train.py`` and
    ``scripts/*.py``. ``entry`` (default: no ``argv`` given, the process's own command line): once
    the command has returned, a Ctrl-C exits at once with its status (``finished``)."""
    end_with_the_launcher()  # before the imports: they take seconds, and the launcher may end meanwhile
    try:
        main = importlib.import_module(module).main
        rc = main(**kwargs) if argv is None else main(argv, **kwargs)
    except KeyboardInterrupt as e:  # (a SIGTERM a command takes as one: ``dptune.errors.Terminated``)
        print(f"error: interrupted ({getattr(e, 'said', 'Ctrl-C')}); the command stopped before it finished",
              file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return finished(rc) if (argv is None if entry is None else entry) else rc


def end_with_the_launcher() -> None:
    """A process that Lightning's launcher started for a run of several processes (LOCAL_RANK 1, 2,
    ...) has Linux end it when the launcher ends: a SIGTERM to the launcher while the run started
    (before Lightning had set up its handlers) ended the launcher alone, and the other processes
    waited for it for good. One whose launcher has ended already (it started dptune, whose PID it
    passed on) ends at once. The first process passes its PID on; elsewhere (another OS) nothing."""
    import os
    import signal

    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        os.environ["DPTUNE_LAUNCHER_PID"] = str(os.getpid())
        return
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.environ.get("DPTUNE_LAUNCHER_PID") not in (None, str(os.getppid())):
        os._exit(1)  # started by a dptune launcher that is gone


def finished(rc: int) -> int:
    """The command is done: a Ctrl-C from now on (Python's shutdown after an export or a prediction
    run takes seconds, collecting torch's objects) exits at once with ``rc``, the command's status,
    not with 130 and no word, as if the finished work had failed (``export && upload`` skipped a
    complete export). Only for a process's own command: it replaces the Ctrl-C handler; not for
    training (fit, validate, test), which keeps Python's own handling at exit."""
    import os
    import signal

    def done(_signum, _frame) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) else 0 if rc is None else 1)  # as sys.exit(rc) would

    signal.signal(signal.SIGINT, done)
    return rc


def export_main() -> int:  # the dptune-export script
    return launch("dptune.export.cli")


def inspect_main() -> int:  # the dptune-inspect script
    return launch("dptune.tools.inspect")


if __name__ == "__main__":
    sys.exit(main())
