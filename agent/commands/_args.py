"""argparse types shared by every command: a bad value is refused while parsing, in one
line (``xwamp ping: argument --port: 70000 is not a port (1..65535)``, exit 2), never
found later as a traceback or accepted silently.

Each factory returns a callable for ``add_argument(type=...)``; its ``__name__`` is what
argparse shows when the text is not a number at all.
"""

from __future__ import annotations

import argparse
import math
import socket
from typing import Callable


def _named(fn: Callable[[str], object], name: str) -> Callable[[str], object]:
    fn.__name__ = name  # argparse: "invalid <name> value: 'x'"
    return fn


def integer(lo: int, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An integer in lo..hi (hi None: no upper bound)."""
    span = f"{lo}..{hi}" if hi is not None else f">= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range ({what + ' ' if what else ''}{span})")
        return v

    return _named(parse, "integer")  # type: ignore[return-value]


def port(allow_zero: bool = False) -> Callable[[str], int]:
    """A TCP/UDP port: 1..65535, or 0 too where 0 means "any free port" / "the peer's choice"."""
    return integer(0 if allow_zero else 1, 65535, "port")


def seconds(positive: bool = False, hi: float | None = None) -> Callable[[str], float]:
    """A finite duration in seconds: >= 0, or > 0 with ``positive``; never nan/inf."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds")
        if v < 0 or (positive and v == 0):
            raise argparse.ArgumentTypeError(f"{text} must be {'> 0' if positive else '>= 0'} seconds")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text} is more than {hi:g} seconds")
        return v

    return _named(parse, "seconds")  # type: ignore[return-value]


def rate(allow_zero: bool = False) -> Callable[[str], float]:
    """A finite rate > 0 (packets per second); with ``allow_zero``, 0 too (no cap)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {'>=' if allow_zero else '>'} 0")
        return v

    return _named(parse, "rate")  # type: ignore[return-value]


PORT = port()
PORT_OR_ZERO = port(allow_zero=True)
COUNT = integer(1, None, "count")  # packets, connections, sessions: at least one
DSCP = integer(0, 63, "DSCP")
PADDING = integer(0, 65000, "octets")  # a UDP datagram holds 65507 octets
OCTETS16 = integer(0, 0xFFFF, "octets")
DURATION = seconds()  # 0 allowed (e.g. "run until ^C", "send back to back")
POSITIVE_DURATION = seconds(positive=True)
RATE = rate()
RATE_OR_ZERO = rate(allow_zero=True)  # 0: no cap


def interface(text: str) -> str:
    """The name of an existing network interface (of this network namespace)."""
    try:
        socket.if_nametoindex(text)
    except OSError:
        raise argparse.ArgumentTypeError(f"no interface named {text!r}") from None
    return text


class Parser(argparse.ArgumentParser):
    """Errors in one line on stderr, exit status 2: the usage text stays behind --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")
