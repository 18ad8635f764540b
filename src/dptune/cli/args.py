"""What a command line and its config files say, read around jsonargparse: the config files a
command names (one line for one that is not YAML or not a mapping), class paths that have moved,
and a starting point given on the command line. Where a setting was given: ``dptune.cli.places``."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

from dptune.errors import ConfigError, yaml_problem
from dptune.labels import DuplicateKey, UniqueKeyLoader

log = logging.getLogger(__name__)


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` values of a command line, in order."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


def check_early_configs(args: list[str], subcommands: set[str] | dict) -> None:
    """A config file given before the subcommand (``train.py --config f.yaml fit``) is read by the
    parser above the subcommands, which takes only settings under a subcommand's name (``fit:``) and
    passed any other key over without a word; such a file is one line naming it and its keys."""
    sub = next((i for i, a in enumerate(args) if a in subcommands), None)
    if sub is None:
        return
    for path in config_files(args[:sub]):
        spec = read_config(path)
        if spec is None:  # inline settings
            try:
                spec = yaml.safe_load(path)
            except yaml.YAMLError:
                continue
        stray = [str(k) for k in spec if k not in subcommands and k != "task"] if isinstance(spec, dict) else []
        if stray:
            raise ConfigError(f"{path}: given before the subcommand ({args[sub]}), a config holds settings under the "
                              f"subcommand's name ({args[sub]}: ...); {', '.join(stray[:5])} would be ignored: give the "
                              f"file after the subcommand ({args[sub]} --config {path})")


def read_config(path: str) -> dict[str, Any] | None:
    """The settings of a ``--config`` file; one line naming it when it is not YAML or not a mapping
    of settings. None when ``path`` is no file (the parser also takes a config given inline)."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: a directory, not a config file")
    if not os.path.isfile(path):
        try:
            inline = isinstance(yaml.safe_load(path), dict)
        except yaml.YAMLError as e:
            broken = yaml_problem(e)
            if "\n" in path or path.lstrip().startswith("{"):
                raise ConfigError(f"--config {_short(path)}: settings given inline that are not valid YAML: "
                                  f"{broken}") from None
            if ": " in path:
                raise ConfigError(f"{path}: no such config file, nor settings given inline (not valid YAML: "
                                  f"{broken})") from None
            inline = False
        if inline:
            return None  # settings given inline
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.load(f, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    if spec is None:
        raise ConfigError(f"{path}: an empty config (no settings in it); give a config with settings, or leave "
                          "--config out")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a config holds settings as a mapping (key: value lines), "
                          f"not a {type(spec).__name__}")
    try:
        json.dumps(spec, default=str, skipkeys=True)  # keys that are no strings (dates) are jsonargparse's to refuse
    except ValueError:
        raise ConfigError(f"{path}: a YAML alias refers to itself (a setting that contains itself)") from None
    bad = _sections(spec)
    if bad:
        where, section = bad[0]
        if section is None:
            raise ConfigError(f"{path}: {where}: an empty section (nothing under it); give its settings as "
                              "indented key: value lines, or leave the key out")
        raise ConfigError(f"{path}: {where}: a section of settings (key: value lines), not a "
                          f"{type(section).__name__} ({_short(section)})")
    return spec


SECTIONS = ("model", "data", "trainer")  # each settings or a file of them (optimizer: may name a class alone)


def _sections(spec: dict) -> list[tuple[str, Any]]:
    """The sections of a config (also under a subcommand's name) that hold something other than
    settings: jsonargparse took ``model: [1, 2, 3]`` and dropped every model setting before it."""
    bad = [(sub, spec[sub]) for sub in LightningCLI.subcommands()
           if sub in spec and spec[sub] is not None and not isinstance(spec[sub], dict)]
    for prefix, level in [("", spec), *((f"{sub}.", spec[sub]) for sub in LightningCLI.subcommands()
                                        if isinstance(spec.get(sub), dict))]:
        # a mapping of settings, or the path of a file that holds them (jsonargparse reads it)
        bad += [(prefix + name, level[name]) for name in SECTIONS
                if name in level and not isinstance(level[name], (dict, str))]  # null too: jsonargparse's "Unexpected config"
    return bad


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


# classes (a full name) and modules (a name ending in ".") that a saved run config may name, and
# where they live now; a class's entry is read before its module's
MOVED = {**{f"{module}.{name}": f"dptune.training.checkpointing.{name}"
            for module in ("dptune.callbacks", "dptune.training.callbacks") for name in ("Checkpoint", "InterruptGuard")},
         "dptune.callbacks.": "dptune.training.callbacks.", "dptune.strategies.": "dptune.training.strategies.",
         "dptune.hardware.": "dptune.training.hardware."}
PARSER_MODE = "dptune"
SAID: set[str] = set()  # moved names already warned about in this process


def renamed(value: Any, said: set[str], _inside: frozenset[int] = frozenset()) -> Any:
    """``value`` with class paths of ``MOVED`` modules spelled where they live now; one warning per
    old name (``said``: the names already warned about). A value that contains itself (a YAML alias
    inside its own anchor) is a ``yaml.YAMLError``, which jsonargparse reports as a bad config."""
    if isinstance(value, (dict, list)):
        if id(value) in _inside:
            raise yaml.YAMLError("a YAML alias refers to itself (a setting that contains itself)")
        _inside = _inside | {id(value)}
    if isinstance(value, dict):
        return {k: renamed(v, said, _inside) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, said, _inside) for v in value]
    if isinstance(value, str):
        for old, new in MOVED.items():
            if value == old or (old.endswith(".") and value.startswith(old)):
                now = new + value[len(old):]
                if value not in said:
                    said.add(value)
                    log.warning("%s has moved to %s; read as that (update the config to silence this)", value, now)
                return now
    return value


def renamed_args(args: list[str], said: set[str]) -> list[str]:
    """Command-line values naming a moved class (``--trainer.strategy dptune.strategies.X`` or
    ``--trainer.strategy=...``) renamed as a config's are; jsonargparse keeps a value it cannot
    import as a plain string, so these are renamed before it reads them."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        out.append(f"{key}{eq}{renamed(value, said)}" if (eq or not key) else arg)
    return out


STARTS = ("--model.pretrained", "--model.config")  # a model starts from exactly one


def command_line_start(args: list[str]) -> list[str]:
    """A starting point given on the command line replaces one a config file gave: ``--config
    configs/backbones/dinov2.yaml --model.config tiny.json`` trains from ``tiny.json`` (the preset's
    ``model.pretrained`` is set to null after everything else), as a command-line value replaces a
    config's anywhere else. Both given on the command line stay an error."""
    last: dict[str, str] = {}  # each key's last value on the command line: the one that counts
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if key in STARTS:
            last[key] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    # clearing one (null) is not starting from it
    given = {key for key, value in last.items() if value.strip().lower() not in ("null", "none", "~", "")}
    if len(given) != 1:
        return args
    other = next(key for key in STARTS if key not in given)
    return [*args, other, "null"]


def register_loader() -> None:
    """jsonargparse's YAML loader, for config files and command-line values alike, with moved class
    paths renamed (``renamed``)."""
    from jsonargparse import get_loader, set_loader

    plain = get_loader("yaml")
    set_loader(PARSER_MODE, lambda text: renamed(plain(text), SAID), exceptions=(yaml.YAMLError,))


def mapping_settings(sections: dict[str, type]) -> list[str]:
    """The settings typed as a mapping of free keys (``data.splits``, ``data.segmentation``,
    ``model.references``), from the ``__init__`` of each section's class and of its dptune bases
    (whose settings a subclass takes through ``**kwargs``); the longest first."""
    found = set()
    for section, cls in sections.items():
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or not klass.__module__.startswith("dptune."):
                continue
            for name, param in inspect.signature(init).parameters.items():
                hint = param.annotation if isinstance(param.annotation, str) else repr(param.annotation)
                if re.search(r"\bdict\b", hint):
                    found.add(f"{section}.{name}")
    return sorted(found, key=len, reverse=True)


def command_line_value(text: str) -> Any:
    """A value given on the command line, typed as jsonargparse types a value inside a mapping
    (``64`` a number, ``[64, 96]`` a list, ``{stem}.png`` the string)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, parser_mode=PARSER_MODE)
    parser.add_argument("--value", type=Any)
    return parser.parse_args([f"--value={text}"]).value


def _an_option(arg: str) -> bool:
    """``arg`` is an option, not a value (``-1`` and ``-.5`` are numbers)."""
    try:
        float(arg)
    except ValueError:
        return arg.startswith("-")
    return False


def merge_deep_keys(args: list[str], settings: list[str],
                    in_effect: Callable[[list[str], str], tuple[bool, Any]]) -> list[str]:
    """jsonargparse sets one key of a mapping setting from the command line (``--data.splits.train
    '{...}'``) and took anything deeper as that key's whole value: ``--data.splits.train.masks X``
    replaced the train split by ``{masks: X}`` (its images gone; a synthetic split's size and seed
    silently back to their defaults), ``--data.segmentation.splits.train.masks X`` every split of
    the source. Each such option becomes the key's whole value, merged: what the arguments before
    it make of the setting (``in_effect(arguments, setting)``: whether they could be read, and the
    value) with the one deeper key set. ``settings``: the mapping settings (``mapping_settings``)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, given = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        setting = next((s for s in settings if key.startswith(s + ".")), None)
        keys = key[len(setting) + 1:].split(".") if setting else []
        if setting and not all(keys):
            raise ConfigError(f"--{key}: an empty key (two dots in a row, or one at the end)")
        if len(keys) < 2:
            out.append(arg)
            i += 1
            continue
        if not eq and (i + 1 >= len(args) or _an_option(args[i + 1])):
            raise ConfigError(f"--{key}: expected a value (--{key} VALUE, or --{key}=VALUE for one that starts with -)")
        value = given if eq else args[i + 1]
        read, current = in_effect(out, setting)
        i += 1 if eq else 2
        if not read:  # the arguments before it are wrong: the parser says so, naming them
            out += [arg] if eq else [arg, value]
            continue
        if isinstance(current, list):
            raise ConfigError(f"--{key}: {setting} is a list here ({len(current)} entries), with no key {keys[0]!r} "
                              f"to set; give the whole list (--{setting} '[...]') or set it in a config file")
        if current is not None and not isinstance(current, dict):
            raise ConfigError(f"--{key}: {setting} is {_short(repr(current))}, not a mapping of settings to set "
                              f"{'.'.join(keys)} in")
        top = copy.deepcopy(current.get(keys[0])) if current else None
        node = top = {} if top is None else top
        for depth, name in enumerate(keys[1:], start=1):
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {'.'.join([setting, *keys[:depth]])} is {_short(repr(node))}, not a "
                                  f"mapping of settings to set {'.'.join(keys[depth:])} in")
            if depth == len(keys) - 1:
                node[name] = command_line_value(value)
            elif node.get(name) is None:
                node[name] = {}
            node = node[name]
        out += [f"--{setting}.{keys[0]}", yaml.safe_dump(top, default_flow_style=True, sort_keys=False,
                                                               width=float("inf")).strip()]
    return out
