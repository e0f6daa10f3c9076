"""Configuration files for the ``ptyl`` command line: YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON.

Keys are the long flag names of a subcommand, with dashes or underscores (``n-per-class`` or ``n_per_class``);
values are strings or numbers, converted and checked exactly as the same text on the command line (lists for
multi-valued flags, true/false for switches; a boolean is never a number, null and non-finite numbers are refused).
A table named after a subcommand (``[finetune]`` in TOML, ``finetune:`` in YAML) is merged over the top-level keys,
so one file can configure several subcommands; any other mapping, unknown key or misspelt section is an error that
lists the valid ones. Flags given on the command line override the file::

    # finetune.yaml
    prior: runs/prior.safetensors
    data: mnist
    n-per-class: 10
    method: sgld

    $ ptyl finetune --config finetune.yaml --lr 0.03
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ptyl.errors import ConfigError

__all__ = ["load_config", "config_defaults"]

_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML / TOML / JSON file into a dict; a missing file raises ``FileNotFoundError``, anything malformed
    :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .yaml, .yml, .toml or .json")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from err
    try:
        if path.suffix.lower() == ".toml":
            # Python 3.11+; needed only for .toml files
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as err:  # each parser has its own error type; all mean "malformed file" (RecursionError too)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {message}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values, "
                          f"got {type(data).__name__}")
    return data


def _show(value: Any) -> str:
    """A config value as the file spells it: ``true``, ``null``, ``0.1``, ``'text'``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value) if isinstance(value, (int, float, str)) else type(value).__name__


def _expects(action: argparse.Action) -> str:
    name = getattr(action.type, "__name__", "")
    if action.type is int or name.endswith("_int"):
        return "an integer"
    if action.type is float or name.endswith("_float"):
        return "a number"
    return "a string" if action.type is None else "a value"


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _coerce(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    """Apply the flag's type and choices to a value from a file, as argparse would to the same text on the command
    line. Only strings and numbers are values (a boolean is not a number; null, mappings and dates are refused)."""
    where = f"{source}: option {key!r}"
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is a switch: use true or false, got {_show(value)}")
        return value
    multi = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(value, list) and not multi:
        raise ConfigError(f"{where} takes a single value, got a list")
    if multi and not isinstance(value, list):
        value = [value]
    if multi and action.nargs == "+" and not value:
        raise ConfigError(f"{where} needs at least one value, got an empty list")

    def one(v: Any) -> Any:
        if isinstance(v, dict):
            raise ConfigError(f"{where} takes {_expects(action)}, got a mapping (only command names are sections)")
        if v is None:
            raise ConfigError(f"{where} has no value (null); remove the key to use the default")
        if isinstance(v, bool):
            raise ConfigError(f"{where} takes {_expects(action)}, not a boolean ({_show(v)})")
        if not isinstance(v, (str, int, float)) or (isinstance(v, float) and _expects(action) == "an integer"):
            raise ConfigError(f"{where} takes {_expects(action)}, got {_show(v)}")
        text = v if isinstance(v, str) else str(v)  # str() of a float round-trips exactly
        try:
            typed = action.type(text) if action.type is not None else text
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where}: invalid value {_show(v)} ({err})") from err
        if isinstance(typed, float) and not math.isfinite(typed):
            raise ConfigError(f"{where} must be a finite number, got {_show(v)}")
        if action.choices is not None and typed not in action.choices:
            raise ConfigError(f"{where}: invalid choice {_show(v)} (choose from "
                              f"{', '.join(map(str, action.choices))})")
        return typed

    return [one(v) for v in value] if multi else one(value)


def _norm(key: Any) -> str:
    return str(key).replace("_", "-")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config keys of a parser (long flag names and positionals) -> their actions."""
    actions = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                actions[_norm(opt[2:])] = action
        if not action.option_strings and action.dest not in ("help",):
            actions[_norm(action.dest)] = action  # positionals by their name
    for name in ("help", "config", "version"):
        actions.pop(name, None)
    return actions


def _typed(parser: argparse.ArgumentParser, values: dict[str, Any], command: str | None, source: str,
           sections: dict[str, argparse.ArgumentParser]) -> dict[str, Any]:
    actions = _options(parser)
    out = {}
    for key, value in values.items():
        action = actions.get(_norm(key))
        if action is None:
            where = f" for 'ptyl {command}'" if command else ""
            owners = [name for name, other in sections.items() if name != command and _norm(key) in _options(other)]
            hint = f" (an option of {', '.join(f'ptyl {o}' for o in owners)}: put it in that section)" if owners else ""
            raise ConfigError(f"{source}: unknown option {key!r}{where}{hint}; "
                              f"valid keys: {', '.join(sorted(actions))}")
        out[action.dest] = _coerce(action, value, key, source)
    return out


def config_defaults(parser: argparse.ArgumentParser, config: dict[str, Any], command: str | None = None,
                    source: str = "config file",
                    sections: dict[str, argparse.ArgumentParser] | None = None) -> dict[str, Any]:
    """Map a config dict onto ``parser``'s options: ``{dest: typed value}``.

    Top-level keys are ``command``'s options; a mapping value is a section and must be named after a command
    (``sections``: command name -> its parser, e.g. :func:`ptyl.cli.subcommand_parsers`; ``command``'s own parser
    is always one of them). The ``command`` section is merged over the top-level keys; the other sections are
    checked against their own commands and otherwise ignored, so one file can configure several commands. Unknown
    keys or sections, values of the wrong type (a boolean is not a number), null and non-finite numbers raise a
    one-line :class:`ConfigError` naming the key and listing the valid ones.
    """
    sections = {_norm(name): p for name, p in (sections or {}).items()}
    if command is not None:
        sections.setdefault(_norm(command), parser)
    flat, own = {}, {}
    for key, value in config.items():
        if not isinstance(value, dict):
            flat[key] = value
        elif _norm(key) in _options(parser) and _norm(key) not in sections:
            _coerce(_options(parser)[_norm(key)], value, key, source)  # raises: a mapping where a value is meant
        elif _norm(key) not in sections:
            valid = f"; valid sections: {', '.join(sorted(sections))}" if sections else " (this command has none)"
            raise ConfigError(f"{source}: unknown section {key!r}{valid}")
        elif _norm(key) == _norm(command or ""):
            own = value
        else:
            _typed(sections[_norm(key)], value, _norm(key), source, sections)  # checked, not used here
    return {**_typed(parser, flat, command, source, sections), **_typed(parser, own, command, source, sections)}
