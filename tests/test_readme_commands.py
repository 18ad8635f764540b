"""The README's commands run as written: the ones that fit on a CPU in a test are run (the quickstart
and its export, with the installed ``dptune`` console command), every other one is checked as far as
it can be without its data, GPUs or hours: training commands resolve (``--print_config``), tool
commands use only options the tool has. The guides' ``dptune`` commands are checked the same way.
Every README command is in exactly one of these kinds; a new one fails here until it is given one."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import REPO

BIN = Path(sys.executable).parent
DPTUNE = BIN / "dptune"  # the console script pip install -e . put beside this interpreter

# run here, as written, in a scratch folder that sees the repository's configs/ (~1-2 minutes on 2 cores)
RUN = ["dptune fit --config configs/quickstart.yaml",
       "dptune export runs/quickstart/checkpoints/last.ckpt out/quickstart"]
# installs: not run (they would change this environment); checked against what is installed
SETUP = ("pip install ",)
# the whole test suite, of which this test is part: not run from here
SUITE = ["python -m pytest -q -n auto --dist loadfile"]
# training commands: resolved with --print_config (they need the shared data, GPUs, or hours)
PARSE = ("dptune fit ", "dptune validate ", "dptune test ")
# tool commands on a run's outputs: each option must be one the tool takes (`dptune TOOL --help`)
OPTIONS = ("dptune export ", "dptune predict ", "dptune evaluate ", "dptune inspect ", "dptune benchmark ")

# config files a command reads that the command before it in the same block writes: left out of its
# --print_config, and that earlier command must be the one writing them
PRODUCED = {"weights.yaml": "--out weights.yaml"}

GUIDES = ["segmentation.md", "depth.md", "joint.md", "training.md", "distributed.md", "export.md", "backbones.md"]


def commands(path: Path) -> list[str]:
    """The commands of a markdown file's ```bash blocks: continuation lines joined, comments and
    shebangs left out."""
    found, block, inside = [], [], False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if not inside or not line.strip() or line.lstrip().startswith("#"):
            continue
        block.append(line.strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            found.append(" ".join(block))
            block = []
    return found


def kind(command: str) -> str:
    if command in RUN:
        return "run"
    if command.startswith(SETUP):
        return "setup"
    if command in SUITE:
        return "suite"
    if command.startswith(PARSE):
        return "parse"
    if command.startswith(OPTIONS):
        return "options"
    return "unclassified"


def dptune_env() -> dict:
    return dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def argv_of(command: str) -> list[str]:
    return [a.strip("[]") for a in shlex.split(command) if a.strip("[]")]  # [--onnx]: an optional flag


def tool_of(argv: list[str]) -> str:
    """The tool whose --help lists a command's options: ``benchmark --infer`` has its own."""
    return "benchmark --infer" if argv[1] == "benchmark" and "--infer" in argv else argv[1]


def test_every_readme_command_has_a_kind():
    listed = commands(REPO / "README.md")
    unclassified = [c for c in listed if kind(c) == "unclassified"]
    assert unclassified == [], f"README commands this test does not know how to check: {unclassified}"
    assert [c for c in listed if kind(c) == "run"] == RUN, "the quickstart commands changed: update RUN"
    assert {"setup", "suite", "parse", "options"} <= {kind(c) for c in listed}


def test_the_setup_commands_name_what_is_installed():
    """Not run: the torch they pin is the one installed, and dptune is installed from this checkout
    with its console command."""
    setup = [c for c in commands(REPO / "README.md") if kind(c) == "setup"]
    pin = next(re.search(r"torch==([\d.]+)", c).group(1) for c in setup if "torch==" in c)
    assert version("torch").split("+")[0] == pin
    assert 'pip install -e ".[dev]"' in setup
    import dptune

    assert Path(dptune.__file__).resolve().is_relative_to(REPO / "src")
    assert DPTUNE.exists(), f"{DPTUNE}: no dptune console script beside {sys.executable} (pip install -e .)"


def test_the_readmes_cpu_commands_run_as_written(tmp_path):
    """The quickstart and its export, in a scratch folder whose ``configs`` is the repository's; the
    export loads in plain transformers, as the README says."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for command in RUN:
        argv = argv_of(command)
        assert argv[0] == "dptune"
        proc = subprocess.run([str(DPTUNE), *argv[1:]], cwd=tmp_path, env=dptune_env(), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    run = tmp_path / "runs" / "quickstart"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list((run / "checkpoints").glob("best-epoch*-mIoU0.*.ckpt"))
    assert (run / "wandb").is_dir()
    from transformers import DPTForSemanticSegmentation

    model = DPTForSemanticSegmentation.from_pretrained(tmp_path / "out" / "quickstart")
    assert model.config.num_labels > 1


CHECK = r"""
import contextlib, io, json, sys
from dptune.command import main
results = []
for argv in json.loads(open(sys.argv[1]).read()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"argv": argv, "code": code, "out": out.getvalue()})
open(sys.argv[2], "w").write(json.dumps(results))
"""


def parse_argv(doc: str, command: str, listed: list[tuple[str, str]]) -> list[str]:
    """A training command's arguments, less a ``--config`` the command before it writes."""
    argv, out = argv_of(command)[1:], []
    for i, arg in enumerate(argv):
        if arg in PRODUCED and argv[i - 1] == "--config":
            before = listed[listed.index((doc, command)) - 1][1]
            assert PRODUCED[arg] in before, f"{doc}: {command}: {arg} is written by no command before it"
            out.pop()
            continue
        out.append(arg)
    return out


def resolved_value(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


def test_the_other_commands_resolve_or_use_only_options_their_tool_has(tmp_path):
    """README and guides: training commands resolve with ``--print_config`` (each ``--a.b value`` as
    given), tool commands name only options of their tool. In one process: dptune is imported once."""
    listed = [(doc, c) for doc in ["README.md", *[f"docs/{g}" for g in GUIDES]] for c in commands(REPO / doc)]
    parse = [(doc, c) for doc, c in listed if kind(c) == "parse"]
    tools = sorted({tool_of(argv_of(c)) for _, c in listed if kind(c) == "options"})
    assert len(parse) >= 8 and {"export", "predict", "evaluate", "inspect"} <= set(tools)
    jobs = [parse_argv(doc, c, listed) + ["--print_config"] for doc, c in parse] + [[*t.split(), "--help"] for t in tools]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(dptune_env(), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())

    for (doc, command), result in zip(parse, results[:len(parse)], strict=True):
        assert result["code"] in (0, None), f"{doc}: {command}\n{result['out'][-2000:]}"
        config = yaml.safe_load(result["out"])
        assert isinstance(config, dict) and "model" in config and "data" in config, f"{doc}: {command}"
        argv = argv_of(command)
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag.startswith("--") and "." in flag and not value.startswith("--"):
                got = resolved_value(config, flag[2:])
                assert got == yaml.safe_load(value) or str(got) == value, f"{doc}: {command}: {flag} -> {got!r}"

    helps = {" ".join(argv[:-1]): r["out"] for argv, r in zip(jobs[len(parse):], results[len(parse):], strict=True)}
    for doc, command in listed:
        if kind(command) != "options":
            continue
        argv = argv_of(command)
        tool = tool_of(argv)
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[tool]), \
                f"{doc}: {command}: `dptune {tool}` has no option {flag}"


@pytest.mark.parametrize("doc", ["README.md", *[f"docs/{g}" for g in GUIDES]])
def test_docs_say_dptune_commands_not_retired_script_names(doc):
    """The guides' commands use ``dptune COMMAND`` (``train.py`` and ``scripts/`` still run the same)."""
    for command in commands(REPO / doc):
        assert not re.match(r"python scripts/(export|predict|evaluate|inspect_data|benchmark)\.py", command), \
            f"{doc}: {command}"
