"""What a command line and its config files say, read around jsonargparse: the config files a
command names (one line for one that is not YAML or not a mapping), class paths that have moved,
a starting point given on the command line, and jsonargparse's refusal of a setting said as
``WHERE: KEY: PROBLEM`` naming the file (or the command line) that gave it."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

from dptune.errors import ConfigError
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


def read_config(path: str) -> dict[str, Any] | None:
    """The settings of a ``--config`` file; one line naming it when it is not YAML or not a mapping
    of settings. None when ``path`` is no file (the parser also takes a config given inline)."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: a directory, not a config file")
    if not os.path.isfile(path):
        if "\n" in path or ":" in path or path.startswith("{"):
            return None  # settings given inline
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.load(f, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    if spec is None:
        raise ConfigError(f"{path}: an empty config (no settings in it); give a config with settings, or leave "
                          "--config out")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a config holds settings as a mapping (key: value lines), "
                          f"not a {type(spec).__name__}")
    try:
        json.dumps(spec, default=str)
    except ValueError:
        raise ConfigError(f"{path}: a YAML alias refers to itself (a setting that contains itself)") from None
    return spec


# modules whose classes a saved run config may name, and where they live now
MOVED = {"dptune.callbacks.": "dptune.training.callbacks.", "dptune.strategies.": "dptune.training.strategies.",
         "dptune.hardware.": "dptune.training.hardware."}
PARSER_MODE = "dptune"
SAID: set[str] = set()  # moved names already warned about in this process


def renamed(value: Any, said: set[str]) -> Any:
    """``value`` with class paths of ``MOVED`` modules spelled where they live now; one warning per
    old name (``said``: the names already warned about)."""
    if isinstance(value, dict):
        return {k: renamed(v, said) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, said) for v in value]
    if isinstance(value, str):
        for old, new in MOVED.items():
            if value.startswith(old):
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


KEY_ERROR = re.compile(r'Parser key "([^"]+)": (.*)', re.S)  # jsonargparse: a value its type refuses
# a key no class has: under a subcommand, or in a group (``model``) of it
NO_OPTION = re.compile(r"(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([^']+)'")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (``a, Literal[b, c]`` -> ``a``, ``Literal[b, c]``)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "[(" and 1 or (-1 if c in "])" else 0)
        if c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [p for p in [*parts, text[start:].strip()] if p]


def _type_words(spec: str) -> str:
    """jsonargparse's spelling of a type as a user reads it: ``<class 'int'>`` -> int, NoneType -> null,
    ``typing.Literal[1, 'a']`` -> one of 1, 'a'."""
    spec = spec.strip().replace("typing.", "")
    named = re.fullmatch(r"<class '(?:\w+\.)*(\w+)'>", spec)
    if named:
        return "null" if named.group(1) == "NoneType" else named.group(1)
    if spec.startswith("Literal[") and spec.endswith("]"):
        return "one of " + ", ".join(_split_top(spec[len("Literal["):-1]))
    return spec


def _problem(text: str) -> str:
    """What jsonargparse says is wrong with a value, in a few words: ``expected int or null, given abc``."""
    text = " ".join(text.split())
    union = re.search(r"Subtypes: \[(.*)\] Errors:.*Given value: (.*)$", text)
    if union:
        return f"expected {' or '.join(_type_words(t) for t in _split_top(union.group(1)))}, given {union.group(2)}"
    plain = re.fullmatch(r"Expected a (<class '[\w.]+'>)\. Got value: (.*)", text)
    if plain:
        return f"expected {_type_words(plain.group(1))}, given {plain.group(2)}"
    return text


def _flat(spec: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(spec, dict):
        return {prefix[:-1]: spec} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in spec.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _sources(key: str, args: list[str]) -> list[tuple[str, str]]:
    """Where ``args`` set ``key``, in order: (a config file's path or "the command line", the value as
    text). A config file may hold it under a subcommand (``fit: {trainer: ...}``)."""
    found = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if not name.startswith("-"):
            continue
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if name in ("--config", "-c"):
            try:
                spec = read_config(value)
            except ConfigError:
                spec = None
            where = value
            if spec is None:  # settings given inline
                where = "the command line (--config)"
                try:
                    spec = yaml.safe_load(value)
                except yaml.YAMLError:
                    spec = None
            flat = _flat(spec)
            hits = [flat[k] for k in [key, *(f"{sub}.{key}" for sub in LightningCLI.subcommands())] if k in flat]
            if hits:
                found.append((where, str(hits[0])))
        elif name == f"--{key}":
            found.append(("the command line", value))
    return found


def setting_error(message: str, args: list[str]) -> str | None:
    """jsonargparse's error about one setting as ``WHERE: KEY: PROBLEM``, WHERE the config file (or the
    command line) that gave the value: jsonargparse checks each file as it reads it, so the first
    place whose value is the one refused. None when the message is about no one setting."""
    message = " ".join(message.split())
    bad = KEY_ERROR.fullmatch(message)
    unknown = NO_OPTION.fullmatch(message)
    if bad:
        key, problem = bad.group(1), _problem(bad.group(2))
        given = re.search(r"given (.*)$", problem)
    elif unknown:
        key = ".".join(k for k in unknown.groups() if k)
        problem, given = "no such setting", None
    else:
        return None
    found = _sources(key, args)
    if not found and unknown:  # a config given before the subcommand: its keys carry the subcommand's name
        sub, _, rest = key.partition(".")
        if sub in LightningCLI.subcommands() and rest:
            key, found = rest, _sources(rest, args)
    where = next((w for w, v in found if given is not None and v == given.group(1)), found[0][0] if found else None)
    return f"{where}: {key}: {problem}" if where else f"{key}: {problem}"


def register_loader() -> None:
    """jsonargparse's YAML loader, for config files and command-line values alike, with moved class
    paths renamed (``renamed``)."""
    from jsonargparse import get_loader, set_loader

    plain = get_loader("yaml")
    set_loader(PARSER_MODE, lambda text: renamed(plain(text), SAID), exceptions=(yaml.YAMLError,))
