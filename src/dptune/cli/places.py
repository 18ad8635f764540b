"""Where a setting was given: jsonargparse's refusal of a setting and dptune's own, said as
``WHERE: KEY: PROBLEM`` with the config file (or the command line) that gave the value
(``setting_error``, ``named_where``); which argument set a key last (``last_setter``, which
``dptune.cli.run_root`` reads too)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.cli import LightningCLI

log = logging.getLogger(__name__)


KEY_ERROR = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.S)  # jsonargparse: a value its type refuses
# a key no class has: under a subcommand, or in a group (``model``) of it
NO_OPTION = re.compile(r"(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([^']+)'"
                       r"|Option '([^']+)' is not accepted")


# jsonargparse's repr of one key of a mapping given on the command line, in its "given ..." text
NESTED_ARG = re.compile(r"""given NestedArg\(key=(['"])(.*?)\1, val=(.*)\)$""")


def _as_given(value: str) -> str:
    """A value in jsonargparse's repr (``'abc'``, ``None``, ``[1, 2]``) as a user typed it."""
    quoted = re.fullmatch(r"""(['"])(.*)\1""", value)
    text = quoted.group(2) if quoted else "null" if value == "None" else value
    return text if text.strip() else "an empty value"


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


def _class_problem(text: str) -> str | None:
    """The error jsonargparse found inside a ``class_path`` value (a callback's ``init_args``, a class
    that does not import), which its message nests among the errors of every subtype it tried."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)- Problem with given class_path '([^']+)':\s*(.*)$", line)
        if not m:
            continue
        indent, inner = len(m.group(1)), [m.group(3)]
        for nxt in lines[i + 1:]:
            if len(nxt) - len(nxt.lstrip()) <= indent:
                break
            inner.append(nxt.strip())
        said = " ".join(" ".join(inner).split())
        key = re.match(r'Parser key "([^"]+)": (.*)', said)
        return f"{m.group(2)}: {key.group(1)}: {_problem(key.group(2))}" if key else f"{m.group(2)}: {said}"
    return None


def _problem(text: str) -> str:
    """What jsonargparse says is wrong with a value, in a few words: ``expected int or null, given abc``."""
    nested = _class_problem(text)
    if nested:
        return nested
    text = " ".join(text.split())
    union = re.search(r"Subtypes: \[(.*)\] Errors:.*Given value:(.*)$", text)  # a blank value leaves no space
    if union:
        given = union.group(2).strip() or "an empty value"
        return f"expected {' or '.join(_type_words(t) for t in _split_top(union.group(1)))}, given {given}"
    plain = re.fullmatch(r"Expected a (.*)\. Got value:(.*)", text)
    if plain:
        return f"expected {_type_words(plain.group(1))}, given {plain.group(2).strip() or 'an empty value'}"
    return text


def _at(spec: Any, parts: list[str]) -> tuple[bool, Any]:
    """The value at the dotted key ``parts`` of a config (nested mappings, or dotted keys such as
    ``model.lr:`` at any level); (False, None) where it holds none."""
    if not parts:
        return True, spec
    if not isinstance(spec, dict):
        return False, None
    for j in range(len(parts), 0, -1):
        name = ".".join(parts[:j])
        if name in spec:
            found, value = _at(spec[name], parts[j:])
            if found:
                return True, value
    return False, None


def _as_read(text: str) -> Any:
    """``text`` as jsonargparse reads a value or a config (its YAML loader: ``1e3`` is a float)."""
    from jsonargparse import get_loader

    try:
        return get_loader("yaml")(text)
    except Exception:  # noqa: BLE001 -- any value it cannot read is compared as the text it is
        return text


def _same(value: Any, given: str) -> bool:
    """Whether ``value`` (as a config holds it, or command-line text) is what jsonargparse printed."""
    said = " ".join(given.split())
    return any(" ".join(str(v).split()) == said for v in ([value, _as_read(value)] if isinstance(value, str) else [value]))


def _options(args: list[str]) -> Iterator[tuple[str, str]]:
    """Each option of a command line with its value (``--key value`` or ``--key=value``), in order."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name.startswith("-"):
            yield name, value if eq else (args[i + 1] if i + 1 < len(args) else "")


def _config_read(value: str) -> tuple[str, Any] | None:
    """A ``--config`` value as (where it is: the file, or "the command line (--config)" for settings
    given inline; its settings as jsonargparse reads them); None when it cannot be read."""
    where, text = value, value
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                text = f.read()
        else:
            where = "the command line (--config)"  # settings given inline
        return where, _as_read(text)
    except (OSError, UnicodeDecodeError):
        return None


def _given(args: list[str]) -> Iterator[tuple[str, str, Any]]:
    """Each place of a command line that gives settings, in order, as (where, option, what it gives):
    a readable ``--config`` as (its file, or "the command line (--config)" for settings given inline;
    "--config"; its settings), any other option as ("the command line"; its name; its value's text)."""
    for name, value in _options(args):
        if name not in ("--config", "-c"):
            yield "the command line", name, value
            continue
        read = _config_read(value)
        if read is not None:
            yield read[0], "--config", read[1]


def at_any_level(spec: Any, parts: list[str]) -> tuple[bool, Any]:
    """``_at`` at the top of a config or under a subcommand's name (``fit: {trainer: ...}``)."""
    for pre in [[], *([sub] for sub in LightningCLI.subcommands())]:
        hit, got = _at(spec, [*pre, *parts])
        if hit:
            return True, got
    return False, None


def _sources(key: str, args: list[str]) -> list[tuple[str, Any]]:
    """Where ``args`` set ``key``, in order: (a config file's path or "the command line", the value as
    jsonargparse reads it). A config file may hold it under a subcommand (``fit: {trainer: ...}``)."""
    found = []
    for where, name, got in _given(args):
        if name == "--config":
            hit, value = at_any_level(got, key.split("."))
            if hit:
                found.append((where, value))
        elif name == f"--{key}":
            found.append((where, got))  # compared as given and as read (_same)
    return found


def setting_error(message: str, args: list[str]) -> str | None:
    """jsonargparse's error about one setting as ``WHERE: KEY: PROBLEM``, WHERE the config file (or the
    command line) that gave the value: jsonargparse checks each file as it reads it, so the first
    place whose value is the one refused (an unknown key: the first place that has it). WHERE is
    left out when more than one place set the key and none holds the refused value as printed.
    None when the message is about no one setting."""
    bad = KEY_ERROR.search(message)  # the message keeps its lines: a nested class's error is read by its indent
    unknown = NO_OPTION.search(" ".join(message.split()))
    if bad:
        key, problem = bad.group(1), _problem(bad.group(2))
        nested = NESTED_ARG.search(problem)
        if nested:  # one key of a mapping setting on the command line (--model.references.mIoU abc)
            inner = re.search(r"dict\[str, (.+?)\]", problem)
            key = f"{key}.{nested.group(2)}"
            problem = f"expected {_type_words(inner.group(1)) if inner else 'another value'}, given {_as_given(nested.group(3))}"
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
    if unknown:  # jsonargparse stops at the first place that names an unknown key
        where = found[0][0] if found else None
    elif given is None:  # nothing to tell the places apart by
        where = found[0][0] if len(found) == 1 else None
    else:
        where = next((w for w, v in found if _same(v, given.group(1))), found[0][0] if len(found) == 1 else None)
        typed = next((v for w, v in found if w == where and isinstance(v, str) and _same(v, given.group(1))), None)
        if typed is not None and isinstance(_as_read(typed), bool) and typed.strip() != given.group(1):
            # YAML's words for true and false (yes, on, off, ...): said as typed, and how they were read
            problem = f"{problem[:given.start(1)]}{typed} (read as {given.group(1).lower()})"
    return f"{where}: {key}: {problem}" if where else f"{key}: {problem}"


# dptune's own refusal of a setting starts with the setting's key: ``model.lr (...) must be ...``
SETTING_FIRST = re.compile(r"^((?:model|data|trainer|checkpoint|progress)(?:\.[A-Za-z_]\w*)+|seed_everything)\b")


def _held(value: Any, rest: list[str], base: str) -> str | None:
    """Where ``value`` (given for a key around a setting) sets the setting at ``rest`` within it:
    "" when it is a mapping holding it, a file's path when it names a file of settings holding it
    (relative to ``base``, the folder of the config that names it, or to the working folder), else
    None (it sets the section, not this setting)."""
    if isinstance(value, dict):
        return "" if _at(value, rest)[0] else None
    if not isinstance(value, str):
        return None
    for path in dict.fromkeys([os.path.join(base, value), value]):
        if os.path.isfile(path):
            read = _config_read(path)
            return path if read is not None and _at(read[1], rest)[0] else None
    return None


def last_setter(parts: list[str], args: list[str]) -> str | None:
    """The place of the last argument in ``args`` that set the dotted key ``parts`` (a config file,
    "the command line (--config)", "the command line", or a file of a section's settings that one of
    them named): a config file holding it (at the top or under a subcommand, or in a file it gives
    for a key around it: ``data: data.yaml``), or ``--KEY value`` where KEY is it or a key around it
    whose value holds it (``--data.splits '{train: ...}'``, ``--data data.yaml``)."""
    last = None
    for where, name, got in _given(args):
        if name == "--config":
            if at_any_level(got, parts)[0]:
                last = where
                continue
            base = os.path.dirname(where) if os.path.isfile(where) else "."
            for j in range(1, len(parts)):  # a key around it given as a file of its settings
                found, around = at_any_level(got, parts[:j])
                held = _held(around, parts[j:], base) if found and isinstance(around, str) else None
                if held:
                    last = held
            continue
        key = name[2:].split(".")
        if key == parts[:len(key)]:
            rest = parts[len(key):]
            held = "" if not rest else _held(_as_read(got), rest, ".")
            if held is not None:
                last = held or where
    return last


def named_where(message: str, args: list[str]) -> str:
    """``message`` (dptune's line about a setting it refused, starting with the setting's dotted key)
    with the place that gave the value in effect put before it, as jsonargparse's refusals are said
    (``setting_error``): the last argument that set the key or a key around it (``last_setter``).
    Unchanged when none did (a default)."""
    m = SETTING_FIRST.match(message)
    where = last_setter(m.group(1).split("."), args) if m else None
    return f"{where}: {message}" if where else message
