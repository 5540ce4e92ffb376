"""The ``lina`` command: ``lina train | infer | bench | sim | analyze | cluster``.

Each subcommand lives in its own module under :mod:`lina.commands`; a module there that
defines ``register(subparsers)`` is found automatically. ``register`` adds its parser and
sets ``func`` (called with the parsed namespace, returning an exit code or ``None``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from lina import __version__
from lina.errors import LinaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lina",
        description="Distributed Mixture-of-Experts training and inference without the all-to-all bottleneck.",
    )
    parser.add_argument("--version", action="version", version=f"lina {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import lina.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"lina.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's parser itself as the default ``_parser``: the deepest command
    given on the command line wins, so its usage is the one an unknown option is reported with."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _remember_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand that was given, with its own usage (exit 2)
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except LinaError as err:
        print(f"lina {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"lina {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (e.g. `| head`)
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
