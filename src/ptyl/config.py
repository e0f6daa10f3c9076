"""Configuration files for the ``ptyl`` command line: YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON.

Keys are the long flag names of a subcommand, with dashes or underscores (``n-per-class`` or ``n_per_class``);
values are typed as in the file (lists for multi-valued flags). A table named after the subcommand
(``[finetune]`` in TOML, ``finetune:`` in YAML) is merged over the top-level keys, so one file can configure
several subcommands. Flags given on the command line override the file::

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
from pathlib import Path
from typing import Any

from ptyl.errors import ConfigError

__all__ = ["load_config", "config_defaults"]

_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML / TOML / JSON file into a dict; a missing file raises ``FileNotFoundError``, anything malformed
    :class:`ConfigError` naming the file."""
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .yaml, .yml, .toml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # each parser has its own error type; all mean "malformed file"
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}".splitlines()[0]) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _coerce(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    """Apply the flag's type and choices to a value from a file (argparse only converts command-line strings)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: option {key!r} is a switch: use true or false, got {value!r}")
        return value
    multi = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if multi and not isinstance(value, list):
        value = [value]
    if not multi and isinstance(value, list):
        raise ConfigError(f"{source}: option {key!r} takes a single value, got a list")

    def one(v: Any) -> Any:
        if action.type is not None and not isinstance(v, bool):
            try:
                # int/float take numbers as they are; other flag types (positive_int, dtype_name, ...) parse text,
                # so a YAML/TOML number goes through them as text and gets the same checks as on the command line
                v = action.type(v) if isinstance(v, str) or action.type in (int, float) else action.type(str(v))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ConfigError(f"{source}: option {key!r}: invalid value {v!r} ({err})") from err
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{source}: option {key!r}: invalid choice {v!r} (choose from "
                              f"{', '.join(map(str, action.choices))})")
        return v

    return [one(v) for v in value] if multi else one(value)


def config_defaults(parser: argparse.ArgumentParser, config: dict[str, Any], command: str | None = None,
                    source: str = "config file") -> dict[str, Any]:
    """Map a config dict onto ``parser``'s options: ``{dest: typed value}``. Unknown keys raise
    :class:`ConfigError` listing the valid ones."""
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    if command is not None and isinstance(config.get(command), dict):
        flat.update(config[command])
    actions = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                actions[opt[2:].replace("_", "-")] = action
        if not action.option_strings and action.dest not in ("help",):
            actions[action.dest.replace("_", "-")] = action  # positionals by their name
    out = {}
    for key, value in flat.items():
        norm = str(key).replace("_", "-")
        action = actions.get(norm)
        if action is None or norm in ("help", "config"):
            where = f" for 'ptyl {command}'" if command else ""
            known = sorted(k for k in actions if k not in ("help", "config"))
            raise ConfigError(f"{source}: unknown option {key!r}{where}; valid keys: {', '.join(known)}")
        out[action.dest] = _coerce(action, value, key, source)
    return out
