"""Shared pieces of the ``ptyl`` command line: the parser class, common options, output helpers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ptyl.data import available_datasets
from ptyl.data.text import available_text_datasets
from ptyl.errors import ConfigError
from ptyl.models import available_models
from ptyl.pipeline import TASKS
from ptyl.validation import nonnegative_float, nonnegative_int, positive_float, positive_int  # noqa: F401


class UsageError(ConfigError):
    """A wrong flag or a missing/invalid argument on the command line."""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises :class:`UsageError` instead of printing the usage and exiting, so ``main``
    reports every problem as one ``ptyl: error: ...`` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_common(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--quiet``, ``--debug``, ``--threads`` and ``--config``; on subcommands their defaults are suppressed so
    values given before the subcommand name survive."""
    default = (lambda v: v) if top_level else (lambda v: argparse.SUPPRESS)
    group = parser.add_argument_group("general options")
    group.add_argument("--quiet", "-q", action="store_true", default=default(False),
                       help="no progress bars or progress messages")
    group.add_argument("--debug", action="store_true", default=default(False),
                       help="show the full traceback on errors")
    group.add_argument("--threads", type=positive_int, default=default(None), metavar="N",
                       help="number of CPU threads torch may use (default: torch's choice)")
    if not top_level:
        group.add_argument("--config", metavar="FILE",
                           help="YAML/TOML/JSON file whose keys are this command's long flag names "
                                "(flags on the command line override it)")


def require(args: argparse.Namespace, *names: str) -> None:
    """Options that must be set (by flag or config file); argparse's ``required`` would not see the config file."""
    missing = [n for n in names if getattr(args, n, None) in (None, [])]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"'ptyl {args.command}' needs {flags}")


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def info(args: argparse.Namespace, message: str) -> None:
    """A progress message on stderr (silenced by ``--quiet``); results go to stdout."""
    if progress(args):
        print(message, file=sys.stderr, flush=True)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"width": args.width} if getattr(args, "width", None) is not None else {}


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_name(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose float32, bfloat16 (bf16) or float16 (fp16)")
    return DTYPES[text.lower()]


def add_data_model_options(parser: argparse.ArgumentParser, *, data_default: str | None, model_default: str | None,
                           data_help: str) -> None:
    """``--data`` (a built-in name or a path), ``--model`` (a built-in name or ``module:factory``) and ``--head``;
    ``None`` defaults are the task's (:data:`ptyl.pipeline.TASKS`)."""

    default = f" [{data_default}]" if data_default else " [the task's]"
    parser.add_argument("--data", default=data_default, metavar="NAME|PATH",
                        help=f"{data_help}: {', '.join(available_datasets())}, or your own images: a class-per-folder "
                             f"tree (root/<class>/<image>; root/train + root/test give the splits, else 80/20), an "
                             f".npz file, or an idx pair images.idx,labels.idx; text (--task text): "
                             f"{', '.join(available_text_datasets())}, or your own .csv/.tsv/.jsonl file with a header "
                             f"naming a label and a text column{default}")
    default = f" [{model_default}]" if model_default else ""
    parser.add_argument("--model", default=model_default, metavar="NAME|MODULE:FACTORY",
                        help=f"architecture: {', '.join(available_models())}, or any importable callable returning an "
                             f"nn.Module (package.module:function or path/to/file.py:function; it gets the keyword "
                             f"arguments it accepts of num_classes, in_channels, width){default}")
    parser.add_argument("--head", metavar="MODULE",
                        help="module name of the classifier's head (e.g. fc, classifier, head.fc), used everywhere: "
                             "left out of the prior, replaced for the new task, given the head prior "
                             "[the prior's, or head]")


def add_task_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``--task`` (its choices are :data:`ptyl.pipeline.TASKS`; for ``learn-prior`` / ``pretrain`` the tasks with a
    source stage) and every task's own flags, one argument group per task (:meth:`ptyl.pipeline.Task.add_arguments`).

    Args:
        parser: the subcommand's parser.
        command: ``"finetune"``, ``"learn-prior"`` or ``"pretrain"``.
    """
    names = [name for name, task in TASKS.items() if command == "finetune" or task.has_source_stage()]
    described = "; ".join(f"{name}: {TASKS[name].description}" for name in names)
    parser.add_argument("--task", default=names[0], choices=names, help=f"{described} [{names[0]}]")
    flags = {}
    for name in names:
        group = parser.add_argument_group(f"{name} task")
        TASKS[name].add_arguments(group, command)
        flags[name] = [(a.dest, a.default, a.option_strings[0]) for a in group._group_actions]
    parser.set_defaults(task_flags=flags)


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen task's own flags as ``{dest: value}``; another task's flag given is a :class:`UsageError`.

    Args:
        args: parsed by a parser with :func:`add_task_options`.

    Returns:
        The values of ``args.task``'s flags.
    """
    own = {dest for dest, _, _ in args.task_flags[args.task]}
    for name, flags in args.task_flags.items():
        for dest, default, flag in flags:
            if name != args.task and dest not in own and getattr(args, dest, default) != default:
                raise UsageError(f"{flag} is an option of --task {name}, not of --task {args.task}")
    return {dest: getattr(args, dest) for dest in own}
