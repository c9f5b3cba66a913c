"""The ``xwamp`` command line: a thin dispatcher over agent/commands/*."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys

from agent import __version__
import agent.commands
from agent.commands._args import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(  # subcommands inherit its one-line errors
        prog="xwamp",
        description="O/TWAMP measurement inside IPsec tunnels, keyed from the kernel's SAs.",
    )
    parser.add_argument("--version", action="version", version=f"xwamp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(agent.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"agent.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a closed pipe is handled below
    except BrokenPipeError:
        # Output piped into `head` that has exited: stop quietly, as a SIGPIPE'd tool does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
