"""The ``ptyl`` command line.

    ptyl learn-prior --data kmnist --out prior.safetensors      # source: pretrain + SWAG -> prior file
    ptyl inspect prior.safetensors                              # what is in it
    ptyl finetune --prior prior.safetensors --data mnist --n-per-class 10 --inference sgld --out run/
    ptyl evaluate --weights run/model.safetensors --data mnist
    ptyl demo                                                   # the whole story, ~8 minutes on 2 CPU cores

Every subcommand takes ``--config FILE`` (YAML/TOML/JSON, keys = long flag names; flags override it), ``--quiet``,
``--threads N`` and ``--debug``. Errors print one line ``ptyl: error: ...`` and exit with status 2 (1 for an
unexpected internal error); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

import torch

from ptyl.cli._common import Parser, UsageError, add_common
from ptyl.config import config_defaults, load_config
from ptyl.errors import PtylError
from ptyl.version import __version__

__all__ = ["build_parser", "main", "subcommand_parsers"]

_MODULES = ("source", "inspect", "finetune", "demo")


def build_parser() -> Parser:
    """The ``ptyl`` parser with every subcommand."""
    parser = Parser(prog="ptyl", description="Pre-Train Your Loss: Bayesian transfer learning with learned priors "
                                             "(Shwartz-Ziv et al., NeurIPS 2022).",
                    epilog="Run 'ptyl COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"ptyl {__version__}")
    add_common(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in _MODULES:
        importlib.import_module(f"ptyl.cli.{name}").add_parsers(subparsers)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of a parser (``build_parser()``'s: ``finetune``, ``learn-prior``, ...).

    Args:
        parser: a parser with subcommands.

    Returns:
        Command name -> its parser (the sections a config file may have, :func:`ptyl.config.config_defaults`).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}  # pragma: no cover


def _parse_known(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        where = f"ptyl {args.command}" if args.command else "ptyl"
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{where} --help')")
    return args


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = _parse_known(parser, argv)
    if args.command is None:
        raise UsageError("choose a command: pretrain, learn-prior, inspect, finetune, evaluate, demo "
                         "(see 'ptyl --help')")
    config = getattr(args, "config", None)
    if config:
        sections = subcommand_parsers(parser)
        sub = sections[args.command]
        sub.set_defaults(**config_defaults(sub, load_config(config), args.command, source=str(config),
                                           sections=sections))
        args = _parse_known(parser, argv)  # again: flags on the command line override the file
    return args


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ptyl`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _parse(argv)
        debug = debug or bool(getattr(args, "debug", False))
        if getattr(args, "threads", None):
            torch.set_num_threads(int(args.threads))
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except KeyboardInterrupt:
        print("ptyl: interrupted", file=sys.stderr)
        return 130
    except (PtylError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            FloatingPointError) as err:
        if debug:
            traceback.print_exc()
        print(f"ptyl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # an internal error: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"ptyl: error: unexpected {type(err).__name__}: {_one_line(err)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
