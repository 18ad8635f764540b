"""Write docs/configuration.md from the parser ``dptune fit`` builds, so the reference cannot drift.

    python -m dptune.tools.config_reference            # print the reference
    python -m dptune.tools.config_reference --write    # write docs/configuration.md (or --write PATH)

Every option of dptune's own sections (``model``, ``data``, ``progress``, the run's ``task`` and
``seed_everything``) is listed with its type, default and help text, for each task (segmentation,
depth, multitask). Of the sections that are Lightning's classes (``trainer``, ``checkpoint``), the
options whose default dptune changes are listed with dptune's default; the others are named only, so a
new Lightning release does not change this file (``dptune fit --help`` shows their help for the
installed Lightning). tests/test_config_reference.py checks that the file is what this writes.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dptune import TASKS
from dptune.errors import path_arg

TASK_TITLES = {"segmentation": "Segmentation", "depth": "Depth", "multitask": "Segmentation + depth"}
DEFAULT_OUT = Path("docs") / "configuration.md"
OWN_TOP_LEVEL = ("task",)  # the top-level options dptune adds (the others are LightningCLI's)

# defaults dptune computes where it starts: said in words, so the file does not depend on the machine
MACHINE_DEFAULTS = {
    "trainer.enable_progress_bar": "true on a terminal, false when the output is redirected (progress lines instead)",
}


class _Built(Exception):
    def __init__(self, cli: Any) -> None:
        self.cli = cli


def fit_parser(task: str):
    """The parser of ``dptune fit`` for ``task``: the real CLI class, stopped before it parses."""
    from dptune import cli

    class ParserOnly(cli.DPTuneCLI):
        def parse_arguments(self, parser, args):  # noqa: ARG002 - everything up to here is the real CLI
            raise _Built(self)

    model_class, data_class = cli.task_classes(task)
    try:
        ParserOnly(model_class, data_class, task=task, trainer_defaults=cli.trainer_defaults(),
                   seed_everything_default=0, args=[])
    except _Built as built:
        return built.cli._subcommand_parsers["fit"]
    raise RuntimeError("LightningCLI parsed without calling parse_arguments")


def type_name(hint: Any) -> str:
    """A type hint as a reader writes it: ``int | null``, ``he | hf``, ``list[float]``."""
    if hint is type(None) or hint is None:
        return "null"
    if hint is Any:
        return "any"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [part for a in args if a is not type(None) for part in type_name(a).split(" | ")]
        if type(None) in args:
            parts.append("null")
        return " | ".join(dict.fromkeys(parts))  # Literal[64] and Literal["64"] read the same
    if origin is typing.Literal:
        return " | ".join(str(scalar(a)) for a in args)
    if origin in (list, Sequence, Iterable, typing.List):  # noqa: UP006 - a hint may still say List
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict or hint is dict:
        return "mapping"
    if isinstance(hint, type):
        return {"str": "str", "int": "int", "float": "float", "bool": "bool"}.get(hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "")


def scalar(value: Any) -> Any:
    """A default as plain data (YAML's view of it)."""
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace (class_path + init_args)
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: scalar(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scalar(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def yaml_value(value: Any) -> str:
    text = yaml.safe_dump(scalar(value), default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def help_text(text: str | None) -> str:
    """Docstring help as one markdown paragraph: ``code`` -> `code`, lines joined."""
    text = re.sub(r"\s+", " ", (text or "").strip())
    return re.sub(r"``(.+?)``", r"`\1`", text)


def summary(title: str) -> str:
    """A group's title is the first line of its class's docstring: the first paragraph of that
    docstring, for the classes the CLI module uses, else the title."""
    from dptune import cli

    for value in vars(cli).values():
        doc = inspect.getdoc(value) if isinstance(value, type) else None
        if doc and doc.splitlines()[0].strip() == title.strip():
            return help_text(doc.split("\n\n")[0])
    return help_text(title)


def declared_types(task: str) -> dict[str, Any]:
    """``section.option`` -> the type its class declares (``__init__``'s hints), for the sections
    dptune defines: what the CLI builds each option from, read with ``typing``."""
    import typing

    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningCLI

    from dptune import cli

    model_class, data_class = cli.task_classes(task)
    found: dict[str, Any] = {}
    for section, cls in (("model", model_class), ("data", data_class), ("progress", cli.ProgressLog),
                         ("checkpoint", cli.Checkpoint), ("trainer", cli.DPTuneTrainer)):
        for klass in reversed(cls.__mro__):  # a subclass's hint wins over its base's
            if "__init__" in vars(klass):
                try:
                    hints = typing.get_type_hints(klass.__init__)
                except (NameError, TypeError):
                    continue
                found.update({f"{section}.{k}": v for k, v in hints.items() if k != "return"})
    # the top-level options: the trainer method's, the seed's and the optimizer's (LightningCLI's own)
    fit, optim = typing.get_type_hints(Trainer.fit), typing.get_type_hints(LightningCLI.configure_optimizers)
    found.update(ckpt_path=fit["ckpt_path"], weights_only=fit["weights_only"],
                 seed_everything=typing.get_type_hints(LightningCLI.__init__)["seed_everything_default"],
                 optimizer=optim["optimizer"] | None, lr_scheduler=optim["lr_scheduler"])
    return found


def options(parser, types: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """dest -> {type, default, help, link} for every settable option (help and config actions left
    out; linked options, filled in from another setting, carry ``link``), and section -> the title
    of its group (the first line of its class's docstring)."""
    from jsonargparse import ActionConfigFile

    found: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            if "." in action.dest and group.title:
                titles.setdefault(action.dest.split(".")[0], group.title)
            kind = type(action).__name__
            if kind == "ActionLink":
                source = action.option_strings[0].split(" --> ")[0]
                found[action.dest] = {"link": source, "help": help_text(action.help)}
                continue
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS
                    or isinstance(action, ActionConfigFile) or kind.startswith(("_Help", "_ActionHelp", "_ActionPrint"))):
                continue
            if action.dest in types:
                typ = type_name(types[action.dest])
            elif action.choices:
                typ = " | ".join(map(str, action.choices))
            else:
                typ = type_name(action.type) if action.type else "str"
            found[action.dest] = {"type": typ, "default": action.default, "help": help_text(action.help)}
    return found, titles


def lightning_defaults() -> dict[str, Any]:
    """The defaults of Lightning's own signatures, for ``trainer.*`` and ``checkpoint.*``."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    out: dict[str, Any] = {}
    for prefix, cls in (("trainer", Trainer), ("checkpoint", ModelCheckpoint)):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out[f"{prefix}.{name}"] = p.default
    return out


def entry(name: str, opt: dict[str, Any], defaults: dict[str, Any] | None = None, with_help: bool = True) -> str:
    """One list item; ``defaults`` (task -> value) when the default differs between tasks."""
    if "link" in opt:
        return f"- `{name}`: filled in from the datamodule (`{opt['link']}`), not set directly."
    if name in MACHINE_DEFAULTS:
        default = MACHINE_DEFAULTS[name]
    elif defaults is not None:
        default = "; ".join(f"{TASK_TITLES[t].lower()}: `{yaml_value(v)}`" for t, v in defaults.items())
    else:
        default = f"`{yaml_value(opt['default'])}`"
    line = f"- `{name}` ({opt['type']}; default {default})"
    if with_help and opt["help"]:
        line += f": {opt['help']}"
    return line


def render() -> str:
    parsed = {task: options(fit_parser(task), declared_types(task)) for task in TASKS}
    per_task = {task: found for task, (found, _) in parsed.items()}
    titles = {section: summary(title) for section, title in parsed["segmentation"][1].items()}
    lightning = lightning_defaults()
    out = [
        "# Configuration reference",
        "",
        "Generated from the parser of `dptune fit` by `python -m dptune.tools.config_reference --write`;",
        "do not edit by hand (tests/test_config_reference.py fails when this file and the code differ).",
        "",
        "Every option goes in a YAML config (`dptune fit --config run.yaml`, nested: `model:` then `lr: 0.001`)",
        "or on the command line (`--model.lr 0.001`); the command line wins, and later `--config` files win",
        "over earlier ones. `task:` (or `--task`) picks the task and with it the `model` and `data` options",
        "below. `dptune fit --print_config` prints a run's whole resolved config; `validate` and `test` take",
        "the same options. A value of the wrong type, or a key no option has, stops the command with one line",
        "naming the file (or the command line) that gave it, e.g. `error: run.yaml: trainer.max_epochs:",
        "expected int or null, given abc`.",
        "",
    ]

    def same_everywhere(name: str) -> bool:
        return all(name in per_task[t] and per_task[t][name] == per_task["segmentation"][name] for t in TASKS)

    # the run: top-level options; only ``task`` is dptune's own, the others are Lightning's
    top = [n for n in per_task["segmentation"] if "." not in n]
    out += ["## The run", ""]
    out += [entry(n, per_task["segmentation"][n], with_help=n in OWN_TOP_LEVEL) for n in top]
    out += ["", "All but `" + "`, `".join(n for n in top if n in OWN_TOP_LEVEL) + "` are LightningCLI's "
            "(`dptune fit --help` describes them for the installed Lightning).", ""]

    for section, title in (("model", "Model"), ("data", "Data")):
        shared = [n for n in per_task["segmentation"] if n.startswith(section + ".") and same_everywhere(n)]
        out += [f"## {title} (`{section}.*`)", ""]
        if shared:
            out += ["Every task:", ""] + [entry(n, per_task["segmentation"][n]) for n in shared] + [""]
        for task in TASKS:
            own = [n for n in per_task[task] if n.startswith(section + ".") and n not in shared]
            if own:
                out += [f"### {TASK_TITLES[task]} (`task: {task}`)", ""]
                out += [entry(n, per_task[task][n]) for n in own] + [""]

    out += ["## Progress lines (`progress.*`)", "", titles["progress"], ""]
    for name, opt in per_task["segmentation"].items():
        if name.startswith("progress."):
            out.append(entry(name, opt))
    out.append("")

    for section, title in (("checkpoint", "Checkpoints"), ("trainer", "Trainer")):
        names = [n for n in per_task["segmentation"] if n.startswith(section + ".")]
        changed, others = [], []
        for n in names:
            values = {t: per_task[t][n]["default"] for t in TASKS}
            differs = any(yaml_value(v) != yaml_value(values["segmentation"]) for v in values.values())
            if differs or n in MACHINE_DEFAULTS or n not in lightning \
                    or yaml_value(values["segmentation"]) != yaml_value(lightning[n]):
                changed.append(entry(n, per_task["segmentation"][n], values if differs else None, with_help=False))
            else:
                others.append(f"`{n.split('.', 1)[1]}`")
        out += [f"## {title} (`{section}.*`)", "", titles[section].rstrip(".") + ".", "",
                "dptune's defaults:", ""] + changed + [""]
        out += ["Its other options keep Lightning's defaults (`dptune fit --help` describes them): "
                + ", ".join(others) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dptune.tools.config_reference", description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--write", nargs="?", const=str(DEFAULT_OUT), metavar="PATH", type=path_arg,
                    help=f"write the reference to PATH (default {DEFAULT_OUT}) instead of printing it")
    args = ap.parse_args(argv)
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
